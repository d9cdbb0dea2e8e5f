//! Kubernetes service-account tokens, checked with the API server's
//! TokenReview (`authentication.k8s.io/v1`) through kube-rs, as Istio's CA
//! does. The review asks for citadel's audience, and a token is accepted
//! only if the API server confirms that audience (a server that is not
//! audience-aware answers without it and is refused). The identity granted
//! is the token's service account: `system:serviceaccount:NS:SA` becomes
//! `spiffe://<trust-domain>/ns/NS/sa/SA`.

use futures::future::BoxFuture;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::{Api, PostParams};
use mesh_identity::SpiffeId;

use crate::auth::{AuthError, Authenticator, Caller};

/// The audience Istio's CA asks for, so that tokens projected for Istio
/// work unchanged.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";

pub struct TokenReviewer {
    client: kube::Client,
    audience: String,
    trust_domain: String,
}

impl TokenReviewer {
    pub fn new(client: kube::Client, audience: &str, trust_domain: &str) -> Self {
        Self {
            client,
            audience: audience.to_string(),
            trust_domain: trust_domain.to_string(),
        }
    }

    async fn review(&self, token: &str) -> Result<SpiffeId, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(e.to_string()))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Kubernetes(match status.error {
                Some(e) if !e.is_empty() => e,
                _ => "the API server did not authenticate it".into(),
            }));
        }
        let audiences = status.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Err(AuthError::Kubernetes(format!(
                "the API server did not confirm audience {:?} (it answered {audiences:?}); \
                 mount a projected token with that audience",
                self.audience
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
            return Err(AuthError::Kubernetes(format!(
                "{username:?} is not a service account"
            )));
        };
        let Some((ns, sa)) = rest
            .split_once(':')
            .filter(|(n, s)| !n.is_empty() && !s.is_empty())
        else {
            return Err(AuthError::Kubernetes(format!(
                "{username:?} is not system:serviceaccount:<namespace>:<name>"
            )));
        };
        Ok(SpiffeId::new(&self.trust_domain, ns, sa))
    }
}

/// A Kubernetes token is a JWT: three dot-separated parts.
fn looks_like_jwt(token: &str) -> bool {
    token.split('.').count() == 3
}

impl Authenticator for TokenReviewer {
    fn authenticate<'a>(
        &'a self,
        caller: &'a Caller<'a>,
    ) -> BoxFuture<'a, Result<Option<SpiffeId>, AuthError>> {
        Box::pin(async move {
            match caller.bearer {
                Some(token) if looks_like_jwt(token) => self.review(token).await.map(Some),
                _ => Ok(None),
            }
        })
    }
}
