//! Citadel, the mesh's certificate authority. It keeps a root in a state
//! directory, authenticates callers, and signs CSRs for exactly the SPIFFE
//! identity a caller is authorised for.
#![forbid(unsafe_code)]

pub mod auth;
pub mod authority;
pub mod csr;
pub mod kubernetes;
pub mod material;
pub mod metrics;
mod service;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_identity::SpiffeId;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_proto::resources::ca_admin_server::CaAdminServer;
use mesh_proto::resources::trust_bundle_service_server::TrustBundleServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use auth::{Authenticator, Caller, LocalTokens, MeshCertificate};
pub use authority::{Authority, AuthorityError, Bundle, Phase};
pub use token::{TokenError, TokenSigner};

/// Default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a caller may ask for.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default address of the CA (see ARCHITECTURE.md: it has its own port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15011";
/// Where the standalone citadel serves `/metrics`.
pub const DEFAULT_MONITORING_LISTEN: &str = "127.0.0.1:15015";
/// The namespace the control plane's own identities live in.
pub const CONTROL_PLANE_NAMESPACE: &str = "mesh-system";
/// The control plane's name on a cluster: its Deployment, ServiceAccount
/// and the Service the admission webhook is called through.
pub const CONTROL_PLANE_NAME: &str = "mesh-control-plane";

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    /// Operator-supplied signing material in Istio's plug-in layout
    /// (`ca-cert.pem`, `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`);
    /// without it citadel generates a self-signed root on first start.
    pub plugin_dir: Option<PathBuf>,
    pub trust_domain: String,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
}

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            plugin_dir: None,
            trust_domain: mesh_identity::DEFAULT_TRUST_DOMAIN.to_string(),
            default_lifetime: DEFAULT_LIFETIME,
            max_lifetime: DEFAULT_MAX_LIFETIME,
        }
    }
}

pub struct Citadel {
    config: Config,
    authority: Arc<Authority>,
    tokens: Arc<TokenSigner>,
}

impl Citadel {
    pub fn open(config: Config) -> Result<Self, AuthorityError> {
        let authority = Arc::new(Authority::open(
            &config.state_dir,
            &config.trust_domain,
            config.plugin_dir.as_deref(),
        )?);
        let tokens = Arc::new(TokenSigner::open(&config.state_dir)?);
        Ok(Self {
            config,
            authority,
            tokens,
        })
    }

    /// The identity citadel's own serving certificate carries.
    pub fn identity(&self) -> SpiffeId {
        SpiffeId::new(
            &self.config.trust_domain,
            CONTROL_PLANE_NAMESPACE,
            "citadel",
        )
    }

    pub fn trust_domain(&self) -> &str {
        &self.config.trust_domain
    }

    /// The roots workloads trust now, PEM (more than one during a rotation).
    pub fn roots_pem(&self) -> String {
        self.authority.bundle().roots_pem()
    }

    /// The file citadel keeps holding the current trust bundle (PEM).
    pub fn bundle_file(&self) -> PathBuf {
        self.config.state_dir.join(authority::BUNDLE_FILE)
    }

    /// The identity allowed to use the `CaAdmin` service (`meshctl ca`).
    pub fn admin_identity(&self) -> SpiffeId {
        admin_identity(&self.config.trust_domain)
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// citadel's metrics, Prometheus text.
    pub fn metrics(&self) -> String {
        metrics::encode_text(&self.authority)
    }

    /// Mints a local-mode token that lets its bearer obtain certificates for `identity`.
    pub fn mint_token(&self, identity: &SpiffeId, ttl: Duration) -> String {
        self.tokens.mint(identity, ttl)
    }

    /// Serves CreateCertificate, the trust bundle and the admin service
    /// over TLS on `listener` until `shutdown` resolves. Citadel's own
    /// serving certificate is issued by its authority, renewed like every
    /// workload's, and re-issued whenever the bundle changes.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        self.serve_with(listener, Vec::new(), shutdown).await
    }

    /// As [`Citadel::serve`], trying `extra` authenticators (Kubernetes
    /// TokenReview, say) after the mesh certificate and local tokens.
    pub async fn serve_with(
        &self,
        listener: TcpListener,
        extra: Vec<Arc<dyn Authenticator>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let authority = self.authority.clone();
        let identity = self.identity();
        let lifetime = self.config.default_lifetime;
        let fetch = move || {
            let (authority, identity) = (authority.clone(), identity.clone());
            async move {
                let (chain, key) = authority.issue_own(&identity, lifetime)?;
                mesh_identity::Credentials::from_pem(&chain, &key, &authority.bundle().roots_pem())
                    .map_err(|e| ServeError::OwnCertificate(e.to_string()))
            }
        };
        let wake = Arc::new(tokio::sync::Notify::new());
        let (creds_tx, creds_rx) = tokio::sync::watch::channel(None);
        let renewal = tokio::spawn(mesh_identity::renew::renew_forever(
            "citadel",
            fetch,
            wake.clone(),
            move |c| {
                creds_tx.send_replace(Some(c));
            },
        ));
        let mut bundles = self.authority.watch();
        let rewake = tokio::spawn(async move {
            while bundles.changed().await.is_ok() {
                wake.notify_one();
            }
        });
        // Client certificates are optional: callers may authenticate with a token.
        let tls = mesh_identity::renew::server_configs("citadel", creds_rx, false, &[b"h2"]).await;
        let mut authenticators: Vec<Arc<dyn Authenticator>> = vec![
            Arc::new(MeshCertificate(self.authority.clone())),
            Arc::new(LocalTokens(self.tokens.clone())),
        ];
        authenticators.extend(extra);
        let (closing_tx, closing) = tokio::sync::watch::channel(false);
        let services = service::Services(Arc::new(service::Shared::new(
            self.authority.clone(),
            authenticators,
            self.config.default_lifetime,
            self.config.max_lifetime,
            self.admin_identity(),
            closing,
        )));
        let shutdown = async move {
            shutdown.await;
            closing_tx.send_replace(true);
        };
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(?addr, "citadel serving CreateCertificate over TLS");
        let served = Server::builder()
            .add_service(IstioCertificateServiceServer::new(services.clone()))
            .add_service(TrustBundleServiceServer::new(services.clone()))
            .add_service(CaAdminServer::new(services))
            .serve_with_incoming_shutdown(
                mesh_identity::grpc::tls_incoming(listener, tls),
                shutdown,
            )
            .await;
        renewal.abort();
        rewake.abort();
        served?;
        Ok(())
    }
}

/// The identity allowed to use the `CaAdmin` service.
pub fn admin_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, CONTROL_PLANE_NAMESPACE, "mesh-admin")
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Authority(#[from] AuthorityError),
    #[error("citadel's own certificate: {0}")]
    OwnCertificate(String),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
