use std::net::IpAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// The mesh's command-line tool.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole mesh locally: control plane, sample app, a sidecar per workload.
    Demo {
        /// Send N requests to productpage through the mesh, print a summary,
        /// and exit 0 only if all succeeded with every hop over mutual TLS.
        #[arg(long)]
        requests: Option<usize>,
        /// Directory of Istio YAML to run (default: the bookinfo sample).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Where citadel's keys, tokens and logs go (default: a fresh temp dir).
        #[arg(long)]
        state_dir: Option<PathBuf>,
        /// Loopback address for citadel and pilot.
        #[arg(long, default_value = meshctl::demo::DEFAULT_CONTROL_PLANE_IP)]
        control_plane_ip: IpAddr,
    },
    /// Run a sidecar (used by `demo` for each pod).
    #[command(hide = true)]
    Proxy(mesh_proxy::cli::ProxyArgs),
    /// Run a sample app (used by `demo` for each pod).
    #[command(hide = true)]
    App(mesh_samples::AppArgs),
}

fn init_logs(default: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default.into()),
        )
        .init();
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Command::Proxy(args) = cli.command {
        init_logs("info");
        return mesh_proxy::cli::run_process(args).map_err(|e| anyhow::anyhow!("{e}"));
    }
    tokio::runtime::Runtime::new()?.block_on(run(cli.command))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Demo {
            requests,
            config,
            state_dir,
            control_plane_ip,
        } => {
            init_logs("warn");
            let opts = meshctl::demo::Options {
                requests,
                config_dir: config,
                state_dir,
                control_plane_ip,
            };
            if !meshctl::demo::run(opts).await? {
                std::process::exit(1);
            }
        }
        Command::Proxy(_) => unreachable!("handled before the runtime starts"),
        Command::App(app) => {
            init_logs("info");
            app.run(mesh_proxy::cli::shutdown_signal()).await?;
        }
    }
    Ok(())
}
