use std::time::Duration;

use clap::{Parser, Subcommand};

/// mimalloc: about 7 % fewer instructions per request than glibc's
/// allocator for about 0.4 MB more idle RSS (ARCHITECTURE.md, "Performance
/// notes").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    report_huge_pages();
    let cli = Cli::parse();
    match (cli.command, cli.args) {
        (Some(Command::Wait { health, timeout }), _) => {
            Ok(mesh_proxy::cli::wait_ready(health, timeout)?)
        }
        (None, Some(args)) => mesh_proxy::cli::run_process(args),
        (None, None) => unreachable!("clap requires the proxy's flags without a subcommand"),
    }
}

/// Keeps the kernel from backing this process's heap with 2 MiB pages
/// where transparent huge pages are "always" on: mimalloc's arenas are
/// aligned for them, and one huge page is more than a sidecar's whole heap
/// (idle RSS under "always": 18.5-20.8 MB with neither this nor the crate's
/// `no_thp`, 11.2 with both). The kernel checks the flag at each fault, so
/// it has to be set before the first allocation: std's start-up allocates
/// before `main`, so this runs as a constructor, ahead of mimalloc's own
/// (which gcc builds without a priority).
#[cfg(target_os = "linux")]
#[used]
#[unsafe(link_section = ".init_array.00101")]
static NO_HUGE_PAGES: extern "C" fn() = no_huge_pages;

/// 0, or the errno the opt-out failed with, for `main` to report.
#[cfg(target_os = "linux")]
static HUGE_PAGES_ERRNO: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

#[cfg(target_os = "linux")]
extern "C" fn no_huge_pages() {
    if let Err(errno) = nix::sys::prctl::set_thp_disable(true) {
        HUGE_PAGES_ERRNO.store(errno as i32, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Says so when the constructor above could not opt out.
fn report_huge_pages() {
    #[cfg(target_os = "linux")]
    match HUGE_PAGES_ERRNO.load(std::sync::atomic::Ordering::Relaxed) {
        0 => {}
        errno => tracing::warn!(
            error = %std::io::Error::from_raw_os_error(errno),
            "could not opt out of transparent huge pages; RSS may be a few MB higher"
        ),
    }
}
