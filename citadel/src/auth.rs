//! Who is asking for a certificate. Each authenticator looks at the caller's
//! credentials and either grants an identity, refuses, or passes (not its kind
//! of credential). They are tried in order; the first that grants or
//! refuses decides.

use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_identity::SpiffeId;
use rustls_pki_types::CertificateDer;

use crate::authority::Authority;
use crate::token::{TokenError, TokenSigner};

/// The credentials a caller brought.
pub struct Caller<'a> {
    /// The bearer token from the `authorization` metadata, if any.
    pub bearer: Option<&'a str>,
    /// The client certificate chain the caller presented over TLS, leaf
    /// first, already verified against the bundle of the handshake's time.
    pub peer_chain: Option<&'a [CertificateDer<'static>]>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bearer token refused: {0}")]
    Token(#[from] TokenError),
    #[error("client certificate refused: {0}")]
    Certificate(String),
    #[error("Kubernetes token refused: {0}")]
    Kubernetes(String),
    #[error("cannot check the token with Kubernetes right now: {0}")]
    Unavailable(String),
}

pub trait Authenticator: Send + Sync + 'static {
    /// `Ok(None)`: this authenticator has nothing to say about the caller.
    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<SpiffeId>, AuthError>>;
}

/// Local mode: tokens citadel minted itself.
pub struct LocalTokens(pub Arc<TokenSigner>);

impl Authenticator for LocalTokens {
    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<SpiffeId>, AuthError>> {
        Box::pin(async move {
            match caller.bearer {
                // A JWT (three parts) is some other issuer's: not ours to judge.
                Some(token) if token.split('.').count() != 3 => Ok(Some(self.0.verify(token)?)),
                _ => Ok(None),
            }
        })
    }
}

/// Renewal: a workload presenting its current mesh certificate over mutual
/// TLS gets certificates for the identity it already holds. The chain must
/// still lead to a root in the current bundle (a root removed by a
/// rotation no longer vouches for anyone, even on a connection opened
/// before it was removed).
pub struct MeshCertificate(pub Arc<Authority>);

impl Authenticator for MeshCertificate {
    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<SpiffeId>, AuthError>> {
        Box::pin(async move {
            let Some(chain) = caller.peer_chain.filter(|c| !c.is_empty()) else {
                return Ok(None);
            };
            let last = mesh_identity::sha256_hex(chain[chain.len() - 1].as_ref());
            if !self.0.bundle().roots.iter().any(|r| r.sha256 == last) {
                return Err(AuthError::Certificate(
                    "it chains to a root this CA no longer trusts; authenticate with a token"
                        .into(),
                ));
            }
            let leaf = &chain[0];
            if mesh_identity::not_after(leaf).map_err(|e| AuthError::Certificate(e.to_string()))?
                <= std::time::SystemTime::now()
            {
                return Err(AuthError::Certificate("it has expired".into()));
            }
            mesh_identity::identity_of(leaf)
                .map(Some)
                .map_err(|e| AuthError::Certificate(e.to_string()))
        })
    }
}
