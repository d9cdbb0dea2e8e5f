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

/// The ConfigMap injected pods mount the trust bundle from.
pub const ROOT_CONFIGMAP: &str = "mesh-ca-root-cert";
const ROOT_KEY: &str = "root-cert.pem";
/// Namespaces the injector never touches.
const SKIPPED_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// Keeps `ROOT_CONFIGMAP` (key `root-cert.pem`) in every namespace holding
/// the current trust bundle, as Istio's CA does for its own: namespaces are
/// listed every `every`, and the ConfigMap is server-side applied where it
/// is new or when the bundle changes (a root rotation), so a steady mesh
/// costs one list per period. Failures are logged and retried next period.
pub async fn publish_roots(
    client: kube::Client,
    mut bundles: tokio::sync::watch::Receiver<std::sync::Arc<crate::authority::Bundle>>,
    every: std::time::Duration,
) {
    use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
    use kube::api::{ListParams, Patch, PatchParams};
    use std::collections::HashMap;

    // Namespace → the bundle generation it holds.
    let mut published: HashMap<String, u64> = HashMap::new();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let params = PatchParams::apply("mesh-citadel").force();
    loop {
        let bundle = bundles.borrow_and_update().clone();
        match namespaces.list(&ListParams::default()).await {
            Ok(list) => {
                let names: Vec<String> = list
                    .items
                    .into_iter()
                    .filter_map(|ns| ns.metadata.name)
                    .filter(|n| !SKIPPED_NAMESPACES.contains(&n.as_str()))
                    .collect();
                published.retain(|ns, _| names.contains(ns));
                for ns in names {
                    if published.get(&ns) == Some(&bundle.generation) {
                        continue;
                    }
                    let cm = ConfigMap {
                        metadata: kube::api::ObjectMeta {
                            name: Some(ROOT_CONFIGMAP.into()),
                            namespace: Some(ns.clone()),
                            ..Default::default()
                        },
                        data: Some([(ROOT_KEY.to_string(), bundle.roots_pem())].into()),
                        ..Default::default()
                    };
                    let api: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
                    let mut body = serde_json::to_value(&cm).expect("a ConfigMap serializes");
                    body["apiVersion"] = "v1".into();
                    body["kind"] = "ConfigMap".into();
                    match api
                        .patch(ROOT_CONFIGMAP, &params, &Patch::Apply(body))
                        .await
                    {
                        Ok(_) => {
                            published.insert(ns, bundle.generation);
                        }
                        Err(e) => {
                            tracing::warn!(namespace = %ns, error = %e, "cannot publish the trust bundle")
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot list namespaces to publish the trust bundle")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = bundles.changed() => if changed.is_err() { return },
        }
    }
}
