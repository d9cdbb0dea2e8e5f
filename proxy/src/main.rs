use clap::Parser;

/// The mesh's sidecar proxy.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: mesh_proxy::cli::ProxyArgs,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    mesh_proxy::cli::run_process(Cli::parse().args)
}
