use clap::Parser;

/// The mesh's sidecar proxy.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: mesh_proxy::cli::ProxyArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cfg = Cli::parse().args.into_config()?;
    mesh_proxy::run(cfg, mesh_proxy::cli::shutdown_signal()).await?;
    Ok(())
}
