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
    mesh_injector::server::serve(
        listener,
        rx,
        Arc::new(args.config.into()),
        Arc::default(),
        shutdown,
    )
    .await;
    Ok(())
}
