use std::time::Duration;

use clap::{Parser, Subcommand};

/// The mesh's sidecar proxy. Without a subcommand it runs the proxy.
#[derive(Parser)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    args: Option<mesh_proxy::cli::ProxyArgs>,
}

#[derive(Subcommand)]
enum Command {
    /// Wait until the proxy beside it is ready (exit 0), or give up (exit
    /// 1): the injected postStart hook that holds the app's containers
    /// until the proxy can carry their traffic.
    Wait {
        #[arg(long, default_value = "127.0.0.1:15021")]
        health: std::net::SocketAddr,
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    match (cli.command, cli.args) {
        (Some(Command::Wait { health, timeout }), _) => {
            Ok(mesh_proxy::cli::wait_ready(health, timeout)?)
        }
        (None, Some(args)) => mesh_proxy::cli::run_process(args),
        (None, None) => unreachable!("clap requires the proxy's flags without a subcommand"),
    }
}
