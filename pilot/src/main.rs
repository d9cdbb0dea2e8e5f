use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Pilot: Istio config in, delta xDS out.
#[derive(Parser)]
struct Args {
    /// Directory of Istio YAML (watched).
    #[arg(long, env = "PILOT_CONFIG_DIR")]
    config_dir: PathBuf,
    #[arg(long, env = "PILOT_LISTEN", default_value = mesh_pilot::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The monitoring port: `/metrics`, `/debug/syncz`, `/debug/config_errors`.
    #[arg(
        long,
        env = "PILOT_MONITORING_LISTEN",
        default_value = "127.0.0.1:15014"
    )]
    monitoring_listen: SocketAddr,
    /// Citadel's address.
    #[arg(long, env = "CA_ADDR", default_value = "127.0.0.1:15011")]
    ca_addr: SocketAddr,
    /// PEM file with the mesh's trusted roots.
    #[arg(long, env = "CA_ROOT_FILE")]
    ca_root_file: PathBuf,
    /// File holding the token that grants pilot its identity.
    #[arg(long, env = "CA_TOKEN_FILE")]
    token_file: PathBuf,
    /// The cluster this pilot serves (Istio's cluster ID), as metrics label it.
    #[arg(long, env = "CLUSTER_ID", default_value = mesh_pilot::model::DEFAULT_CLUSTER_ID)]
    cluster_id: String,
    /// Access logs as Istio's TEXT format or as JSON (Istio's meshConfig.accessLogEncoding).
    #[arg(long, env = "ACCESS_LOG_ENCODING", default_value = "TEXT", value_parser = ["TEXT", "JSON"])]
    access_log_encoding: String,
    /// Also read Istio's custom resources and the cluster's Services,
    /// EndpointSlices, Pods and Namespaces from Kubernetes (in-cluster
    /// credentials, or the kubeconfig).
    #[arg(long, env = "PILOT_KUBERNETES")]
    kubernetes: bool,
}

fn main() -> anyhow::Result<()> {
    limit_malloc_arenas();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run())
}

/// glibc's malloc gives each thread that contends for memory an arena of
/// its own, up to eight per core, and freed memory stays resident in
/// each. Pilot allocates on its async workers (thousands of proxy streams)
/// and on blocking threads (each config reload builds a whole new model):
/// at 2,000 proxies the extra arenas held about 40 MB (`bench-pilot`'s
/// rss_mb, 244 MB against 204 MB with two arenas). Two keep the workers
/// from contending on one lock. Set before any other thread exists.
fn limit_malloc_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets a tunable of glibc's allocator; this runs
    // first in main, before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let roots = std::fs::read_to_string(&args.ca_root_file)
        .with_context(|| format!("reading --ca-root-file {}", args.ca_root_file.display()))?;
    let token = std::fs::read_to_string(&args.token_file)
        .with_context(|| format!("reading --token-file {}", args.token_file.display()))?;
    let mut config = mesh_pilot::Config::new(&args.config_dir);
    config.cluster_id = args.cluster_id;
    config.access_log_json = args.access_log_encoding == "JSON";
    let pilot = mesh_pilot::Pilot::new(config);
    let (tls, _renewal) = pilot
        .server_tls(args.ca_addr, token.trim().to_string(), roots)
        .await
        .context("pilot's certificate")?;
    let _watch = pilot.watch()?;
    let _cluster = if args.kubernetes {
        let client = kube::Client::try_default()
            .await
            .context("--kubernetes: no in-cluster credentials or kubeconfig")?;
        Some(pilot.watch_kubernetes(client).await)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let monitoring = tokio::net::TcpListener::bind(args.monitoring_listen)
        .await
        .with_context(|| format!("binding --monitoring-listen {}", args.monitoring_listen))?;
    tokio::spawn(
        pilot
            .clone()
            .serve_debug(monitoring, std::future::pending()),
    );
    pilot
        .serve(listener, tls, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
