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

/// Gives the heap memory the proxy has freed back to the system, every
/// `period`, from a thread of its own. glibc keeps freed pages mapped, so
/// a burst of connections would otherwise stay in the sidecar's RSS for
/// good (bench-dataplane: 13.5 MB after a 64-connection burst against 8.7
/// MB idle; a trim brought one sidecar back to 10.0). Envoy's overload
/// manager shrinks its heap the same way.
fn release_free_heap_every(period: Duration) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let spawned = std::thread::Builder::new()
        .name("heap-release".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            loop {
                std::thread::sleep(period);
                // SAFETY: malloc_trim only returns free memory glibc holds.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no heap-release thread; freed memory stays resident");
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = period;
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
        (None, Some(args)) => {
            release_free_heap_every(Duration::from_secs(10));
            mesh_proxy::cli::run_process(args)
        }
        (None, None) => unreachable!("clap requires the proxy's flags without a subcommand"),
    }
}
