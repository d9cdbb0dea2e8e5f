//! Who is asking for a certificate. Each authenticator looks at the caller's
//! credentials and either grants an identity, refuses, or passes (not its kind
//! of credential). More kinds (Kubernetes TokenReview, renewal by a current
//! mesh certificate) plug in here.

use std::sync::Arc;

use futures::future::BoxFuture;
use mesh_identity::SpiffeId;

use crate::token::{TokenError, TokenSigner};

/// The credentials a caller brought.
pub struct Caller<'a> {
    /// The bearer token from the `authorization` metadata, if any.
    pub bearer: Option<&'a str>,
    /// The identity of the caller's client certificate, if it presented one.
    pub peer: Option<&'a SpiffeId>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("bearer token refused: {0}")]
    Token(#[from] TokenError),
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
                Some(token) => Ok(Some(self.0.verify(token)?)),
                None => Ok(None),
            }
        })
    }
}
