//! Sets up (or removes) a pod's traffic capture, as Istio's init container
//! does: outbound TCP to the sidecar's 15001, inbound to 15006, the proxy's
//! own traffic (UID 1337 or its mark) left alone.

use clap::{Parser, ValueEnum};
use mesh_proxy::capture::{self, CaptureConfig, Family};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    capture: CaptureConfig,
    /// Print the iptables-restore input instead of loading it.
    #[arg(long)]
    dry_run: bool,
    /// Remove the rules and chains instead of adding them.
    #[arg(long)]
    cleanup: bool,
    /// Address families to set up.
    #[arg(long, value_enum, default_value = "both")]
    family: Families,
}

#[derive(Clone, Copy, ValueEnum)]
enum Families {
    V4,
    V6,
    Both,
}

fn main() {
    let cli = Cli::parse();
    let families: &[Family] = match cli.family {
        Families::V4 => &[Family::V4],
        Families::V6 => &[Family::V6],
        Families::Both => &[Family::V4, Family::V6],
    };
    for &f in families {
        let result = if cli.dry_run {
            cli.capture
                .rules(f, false)
                .map(|r| print!("# {}\n{r}", f.restore()))
        } else if cli.cleanup {
            capture::cleanup(f)
        } else {
            capture::apply(&cli.capture, f)
        };
        if let Err(e) = result {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
