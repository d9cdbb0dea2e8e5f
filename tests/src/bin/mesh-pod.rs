//! What runs inside a test pod (a network namespace): the capture set-up,
//! the sidecar, or a sample app. The pod tests start it with `ip netns exec`.

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Load the capture rules (IPv4), as the init container would.
    Capture(mesh_proxy::capture::CaptureConfig),
    /// Run the sidecar.
    Proxy(mesh_proxy::cli::ProxyArgs),
    /// Run a sample app.
    App(mesh_samples::AppArgs),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    match Cli::parse().command {
        Command::Capture(cfg) => mesh_proxy::capture::apply(&cfg, mesh_proxy::capture::Family::V4)?,
        Command::Proxy(args) => mesh_proxy::cli::run_process(args, || {})?,
        Command::App(app) => {
            tokio::runtime::Runtime::new()?.block_on(app.run(mesh_proxy::cli::shutdown_signal()))?
        }
    }
    Ok(())
}
