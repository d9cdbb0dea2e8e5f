//! An OTLP/gRPC trace receiver that is not the mesh's: `py/otlp_receiver.py`,
//! python grpcio serving the TraceService from the opentelemetry-proto
//! package's generated classes. It appends each span it receives to a file
//! as one JSON line.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;
use serde_json::Value;

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/otlp_receiver.py");

/// Why the receiver cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    let ok = Command::new("python3")
        .args([
            "-c",
            "import grpc; from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc",
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| {
        "needs python3 with grpcio and opentelemetry-proto (python3 -m pip install grpcio opentelemetry-proto)".to_string()
    })
}

/// Installs the receiver's python packages with pip when they are missing.
pub fn ensure() -> anyhow::Result<()> {
    if missing().is_none() {
        return Ok(());
    }
    eprintln!("installing grpcio opentelemetry-proto with pip");
    for extra in [&[][..], &["--break-system-packages"][..]] {
        let ok = Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "grpcio",
                "opentelemetry-proto",
            ])
            .args(extra)
            .status()?
            .success();
        if ok {
            return Ok(());
        }
    }
    anyhow::bail!("{}", missing().unwrap_or_default())
}

/// The receiver process, ended by its PID when dropped.
pub struct Receiver {
    child: Child,
    pub port: u16,
    out: PathBuf,
}

impl Receiver {
    /// Starts a receiver on 127.0.0.1 (a free port), writing into `dir`.
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::spawn(dir, &[])
    }

    /// A wedged collector: it accepts every export and never answers.
    pub fn start_stalled(dir: &Path) -> anyhow::Result<Self> {
        Self::spawn(dir, &["--stall"])
    }

    fn spawn(dir: &Path, mode: &[&str]) -> anyhow::Result<Self> {
        let out = dir.join("spans.jsonl");
        let mut child = Command::new("python3")
            .args([SCRIPT, "127.0.0.1:0", out.to_str().context("path")?])
            .args(mode)
            .stdout(Stdio::piped())
            .spawn()
            .context("starting python3")?;
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("the OTLP receiver did not start: it said {line:?}");
        };
        Ok(Self { child, port, out })
    }

    /// The receiver's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How many exports a stalled receiver has taken and not answered.
    pub fn stalled_exports(&self) -> usize {
        let mut stalled = self.out.clone().into_os_string();
        stalled.push(".stalled");
        std::fs::read_to_string(stalled)
            .unwrap_or_default()
            .lines()
            .count()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
