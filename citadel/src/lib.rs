//! Citadel, the mesh's certificate authority. It keeps a root in a state
//! directory, authenticates callers, and signs CSRs for exactly the SPIFFE
//! identity a caller is authorised for.
#![forbid(unsafe_code)]

pub mod auth;
pub mod authority;
mod service;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mesh_identity::SpiffeId;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::TcpListener;
use tonic::transport::Server;

pub use auth::{Authenticator, Caller, LocalTokens};
pub use authority::{Authority, AuthorityError};
pub use token::{TokenError, TokenSigner};

/// Default workload certificate lifetime.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest lifetime a caller may ask for.
pub const DEFAULT_MAX_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default address of the CA (see ARCHITECTURE.md: it has its own port).
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15011";
/// The namespace the control plane's own identities live in.
pub const CONTROL_PLANE_NAMESPACE: &str = "mesh-system";

#[derive(Clone, Debug)]
pub struct Config {
    pub state_dir: PathBuf,
    pub trust_domain: String,
    pub default_lifetime: Duration,
    pub max_lifetime: Duration,
}

impl Config {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
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
        let authority = Arc::new(Authority::open(&config.state_dir, &config.trust_domain)?);
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

    pub fn root_pem(&self) -> &str {
        self.authority.root_pem()
    }

    pub fn authority(&self) -> &Arc<Authority> {
        &self.authority
    }

    /// Mints a local-mode token that lets its bearer obtain certificates for `identity`.
    pub fn mint_token(&self, identity: &SpiffeId, ttl: Duration) -> String {
        self.tokens.mint(identity, ttl)
    }

    /// Serves CreateCertificate over TLS on `listener` until `shutdown`
    /// resolves. Citadel's own serving certificate is issued by its
    /// authority and renewed like every workload's.
    pub async fn serve(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let authority = self.authority.clone();
        let identity = self.identity();
        let lifetime = self.config.default_lifetime;
        let fetch = move || {
            let (authority, identity) = (authority.clone(), identity.clone());
            async move {
                let (chain, key) = authority.issue_own(&identity, lifetime)?;
                mesh_identity::Credentials::from_pem(&chain, &key, authority.root_pem())
                    .map_err(|e| ServeError::OwnCertificate(e.to_string()))
            }
        };
        // Client certificates are optional: callers may authenticate with a token.
        let (tls, renewal) =
            mesh_identity::renew::rotating_server_config("citadel", fetch, false, &[b"h2"]).await;
        let service = service::CertificateService {
            authority: self.authority.clone(),
            authenticators: vec![Arc::new(LocalTokens(self.tokens.clone()))],
            default_lifetime: self.config.default_lifetime,
            max_lifetime: self.config.max_lifetime,
        };
        let addr: Option<SocketAddr> = listener.local_addr().ok();
        tracing::info!(?addr, "citadel serving CreateCertificate over TLS");
        let served = Server::builder()
            .add_service(IstioCertificateServiceServer::new(service))
            .serve_with_incoming_shutdown(
                mesh_identity::grpc::tls_incoming(listener, tls),
                shutdown,
            )
            .await;
        renewal.abort();
        served?;
        Ok(())
    }
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
