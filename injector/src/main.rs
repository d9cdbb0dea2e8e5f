use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

/// The mesh's sidecar injector: a Kubernetes mutating admission webhook
/// over HTTPS (POST /inject).
#[derive(Parser)]
struct Args {
    #[arg(long, env = "MESH_INJECTOR_LISTEN", default_value = "0.0.0.0:15017")]
    listen: SocketAddr,
    /// Serving certificate chain (PEM); re-read when it changes.
    #[arg(long, env = "MESH_INJECTOR_TLS_CERT")]
    tls_cert: PathBuf,
    /// Its private key (PEM).
    #[arg(long, env = "MESH_INJECTOR_TLS_KEY")]
    tls_key: PathBuf,
    /// Follow Istio's mesh config in the cluster (ConfigMap
    /// istio-system/istio, through the in-cluster service account or the
    /// kubeconfig): its defaultConfig's concurrency,
    /// terminationDrainDuration and holdApplicationUntilProxyStarts apply to
    /// pods that do not set their own. A mesh config that does not parse is logged and
    /// the last good one stays in force.
    #[arg(long, conflicts_with = "mesh_config")]
    kubernetes: bool,
    #[command(flatten)]
    config: mesh_injector::ConfigArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let config = mesh_injector::Config::try_from(args.config)?;
    let (config_tx, config_rx) = tokio::sync::watch::channel(Arc::new(config.clone()));
    if args.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("connecting to the Kubernetes API server")?;
        tokio::spawn(mesh_injector::mesh::follow(client, config, config_tx));
    }
    // Without --kubernetes the sender is dropped here: the receivers keep
    // the flags' config.
    let tls = mesh_injector::server::tls_from_files(&args.tls_cert, &args.tls_key)?;
    let (tx, rx) = tokio::sync::watch::channel(tls);
    tokio::spawn(mesh_injector::server::reload_files(
        args.tls_cert,
        args.tls_key,
        tx,
        Duration::from_secs(10),
    ));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(addr = %listener.local_addr()?, "sidecar injector serving");
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    mesh_injector::server::serve(listener, rx, config_rx, Arc::default(), shutdown).await;
    Ok(())
}
