use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use mesh_identity::SpiffeId;

/// The mesh's certificate authority.
#[derive(Parser)]
struct Args {
    /// Directory holding the root key, root certificate and token key.
    #[arg(long, env = "CITADEL_STATE_DIR", default_value = "citadel-state")]
    state_dir: PathBuf,
    /// Sign with this operator-supplied material (Istio's plug-in layout:
    /// ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem) instead of a
    /// generated self-signed root.
    #[arg(long, env = "CITADEL_PLUGIN_CERTS")]
    plugin_certs: Option<PathBuf>,
    /// Also accept Kubernetes service-account tokens, checked by
    /// TokenReview with the API server from the in-cluster or kubeconfig
    /// credentials; and keep the mesh-ca-root-cert ConfigMap (the trust
    /// bundle injected pods mount) in every namespace.
    #[arg(long, env = "CITADEL_KUBERNETES")]
    kubernetes: bool,
    /// The audience Kubernetes tokens must carry.
    #[arg(long, default_value = mesh_citadel::kubernetes::DEFAULT_AUDIENCE)]
    token_audience: String,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CreateCertificate (the default).
    Serve {
        #[arg(long, env = "CITADEL_LISTEN", default_value = mesh_citadel::DEFAULT_LISTEN)]
        listen: std::net::SocketAddr,
        /// Where `/metrics` is served.
        #[arg(long, env = "CITADEL_MONITORING_LISTEN", default_value = mesh_citadel::DEFAULT_MONITORING_LISTEN)]
        monitoring_listen: std::net::SocketAddr,
    },
    /// Print a local-mode token granting one identity.
    MintToken {
        #[arg(long)]
        identity: SpiffeId,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut config = mesh_citadel::Config::new(&args.state_dir);
    config.plugin_dir = args.plugin_certs;
    let citadel = mesh_citadel::Citadel::open(config)?;
    match args.command.unwrap_or(Command::Serve {
        listen: mesh_citadel::DEFAULT_LISTEN.parse()?,
        monitoring_listen: mesh_citadel::DEFAULT_MONITORING_LISTEN.parse()?,
    }) {
        Command::Serve {
            listen,
            monitoring_listen,
        } => {
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("binding {listen}"))?;
            let monitoring = tokio::net::TcpListener::bind(monitoring_listen)
                .await
                .with_context(|| format!("binding --monitoring-listen {monitoring_listen}"))?;
            tokio::spawn(mesh_citadel::metrics::serve(
                citadel.authority().clone(),
                monitoring,
            ));
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            let mut extra: Vec<std::sync::Arc<dyn mesh_citadel::Authenticator>> = Vec::new();
            if args.kubernetes {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API server for TokenReview")?;
                extra.push(std::sync::Arc::new(
                    mesh_citadel::kubernetes::TokenReviewer::new(
                        client.clone(),
                        &args.token_audience,
                        citadel.trust_domain(),
                    ),
                ));
                // Injected pods mount the trust bundle from their namespace.
                tokio::spawn(mesh_citadel::kubernetes::publish_roots(
                    client.clone(),
                    citadel.authority().watch(),
                    Duration::from_secs(30),
                ));
                // The API server keeps trusting the sidecar injector.
                tokio::spawn(mesh_citadel::kubernetes::keep_webhook_current(
                    client,
                    citadel.authority().clone(),
                    mesh_citadel::CONTROL_PLANE_NAME.to_string(),
                    Duration::from_secs(60),
                ));
            }
            citadel.serve_with(listener, extra, shutdown).await?;
        }
        Command::MintToken { identity, ttl_secs } => {
            println!(
                "{}",
                citadel.mint_token(&identity, Duration::from_secs(ttl_secs))
            );
        }
    }
    Ok(())
}
