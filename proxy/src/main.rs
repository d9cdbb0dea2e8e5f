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
        (None, Some(args)) => mesh_proxy::cli::run_process(args, release_start_up_code),
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

/// Once the proxy has settled (ready, with the same certificate and config
/// for `mesh_proxy::SETTLE`), the code only start-up runs (reading flags,
/// the first certificate, applying config) has done its work: this unmaps
/// it from the process (`MADV_DONTNEED`), about 1.3 MB of the sidecar's
/// idle resident set. The pages are the binary file's, unmodified, so
/// nothing is lost: a later call into them (a config update) maps them
/// again from the page cache, the next settle unmaps them again, and the
/// kernel may drop them from the page cache once no process maps them.
///
/// `build.rs` links the sidecar with `sidecar.order`: the functions that
/// serve, then `mesh_layout_cold_begin`, the functions only start-up runs,
/// and `mesh_layout_cold_end`. Linked without that layout, the two markers
/// lie side by side, the stretch between them holds no whole page, and
/// nothing is released.
fn release_start_up_code() {
    if let Err(error) = layout::release() {
        tracing::warn!(%error, "could not unmap the start-up code");
    }
}

#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod layout {
    // Each marker is a function of its own, in a section of its own, for
    // the linker to place by name. Never called.
    std::arch::global_asm!(
        ".pushsection .text.mesh_layout_cold_begin,\"ax\",@progbits",
        ".globl mesh_layout_cold_begin",
        ".hidden mesh_layout_cold_begin",
        ".type mesh_layout_cold_begin,@function",
        "mesh_layout_cold_begin:",
        "ud2",
        ".size mesh_layout_cold_begin, . - mesh_layout_cold_begin",
        ".popsection",
        ".pushsection .text.mesh_layout_cold_end,\"ax\",@progbits",
        ".globl mesh_layout_cold_end",
        ".hidden mesh_layout_cold_end",
        ".type mesh_layout_cold_end,@function",
        "mesh_layout_cold_end:",
        "ud2",
        ".size mesh_layout_cold_end, . - mesh_layout_cold_end",
        ".popsection",
    );

    unsafe extern "C" {
        safe fn mesh_layout_cold_begin();
        safe fn mesh_layout_cold_end();
    }

    /// Unmaps the whole pages between the markers. Says so first: code
    /// that runs after the unmapping maps its pages again.
    pub fn release() -> std::io::Result<()> {
        const PAGE: usize = 4096;
        let begin = (mesh_layout_cold_begin as *const ()).addr();
        let end = (mesh_layout_cold_end as *const ()).addr();
        let (begin, end) = (begin.next_multiple_of(PAGE), end / PAGE * PAGE);
        if end <= begin {
            return Ok(());
        }
        tracing::debug!(bytes = end - begin, "unmapping the start-up code");
        let start = std::ptr::NonNull::new(std::ptr::without_provenance_mut(begin))
            .expect("code does not start at address 0");
        // SAFETY: whole pages of this binary's code, a private mapping of
        // the file that nothing writes to; dropping them only means the
        // next call into them maps them from the file again.
        unsafe {
            nix::sys::mman::madvise(
                start,
                end - begin,
                nix::sys::mman::MmapAdvise::MADV_DONTNEED,
            )
        }?;
        Ok(())
    }
}

#[cfg(not(all(target_os = "linux", target_arch = "x86_64")))]
mod layout {
    /// Elsewhere the sidecar is linked without the layout.
    pub fn release() -> std::io::Result<()> {
        Ok(())
    }
}
