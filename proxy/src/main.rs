use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh_identity::SpiffeId;

/// The mesh's sidecar proxy.
#[derive(Parser)]
struct Args {
    /// Workload name (the WorkloadEntry's metadata.name).
    #[arg(long, env = "MESH_WORKLOAD")]
    workload: String,
    #[arg(long, env = "MESH_NAMESPACE", default_value = "default")]
    namespace: String,
    #[arg(long, env = "MESH_SERVICE_ACCOUNT", default_value = "default")]
    service_account: String,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = mesh_identity::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,
    /// The pod's address: listeners bind here and the app is reached here.
    #[arg(long, env = "MESH_POD_IP")]
    pod_ip: IpAddr,
    #[arg(long, env = "PILOT_ADDR", default_value = "127.0.0.1:15012")]
    pilot_addr: SocketAddr,
    #[arg(long, env = "CA_ADDR", default_value = "127.0.0.1:15011")]
    ca_addr: SocketAddr,
    /// PEM file with the mesh's trusted roots.
    #[arg(long, env = "CA_ROOT_FILE")]
    ca_root_file: PathBuf,
    /// File holding the token that grants this workload its identity.
    #[arg(long, env = "CA_TOKEN_FILE")]
    token_file: PathBuf,
    /// Requested certificate lifetime in seconds (0: citadel's default).
    #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 0)]
    cert_lifetime_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let a = Args::parse();
    let read = |p: &PathBuf, flag: &str| {
        std::fs::read_to_string(p).with_context(|| format!("reading {flag} {}", p.display()))
    };
    let cfg = mesh_proxy::Config {
        proxy_id: format!("{}.{}", a.workload, a.namespace),
        identity: SpiffeId::new(&a.trust_domain, &a.namespace, &a.service_account),
        pod_ip: a.pod_ip,
        pilot_addr: a.pilot_addr,
        ca_addr: a.ca_addr,
        ca_token: read(&a.token_file, "--token-file")?.trim().to_string(),
        roots_pem: read(&a.ca_root_file, "--ca-root-file")?,
        cert_lifetime: Duration::from_secs(a.cert_lifetime_secs),
        ports: mesh_proxy::Ports::default(),
    };
    mesh_proxy::run(cfg, shutdown_signal()).await?;
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
