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

/// The Secret (in [`crate::CONTROL_PLANE_NAMESPACE`]) holding the sidecar
/// injector's serving certificate (`tls.crt`, `tls.key`).
pub const INJECTOR_TLS: &str = "mesh-injector-tls";
/// The MutatingWebhookConfiguration whose CA bundle must trust it.
pub const WEBHOOK_CONFIGURATION: &str = "mesh-sidecar-injector";
/// How long the injector's serving certificate lives.
pub const WEBHOOK_CERT_LIFETIME: std::time::Duration =
    std::time::Duration::from_secs(365 * 24 * 3600);
/// The Secret's annotation naming the root (SHA-256) that signed it.
const SIGNED_BY: &str = "mesh.io/signing-root";

/// The DNS names the API server calls the injector by, through `service`.
pub fn webhook_dns_names(service: &str) -> Vec<String> {
    let ns = crate::CONTROL_PLANE_NAMESPACE;
    vec![
        format!("{service}.{ns}.svc"),
        format!("{service}.{ns}.svc.cluster.local"),
    ]
}

/// Whether the injector's certificate in `secret` should be replaced:
/// missing or unreadable, signed under another root than the one that
/// signs now (after a rotation's switch), or past half its lifetime.
fn webhook_cert_stale(
    secret: Option<&k8s_openapi::api::core::v1::Secret>,
    signing_root: &str,
    now: std::time::SystemTime,
) -> bool {
    let Some(secret) = secret else { return true };
    let signed_by = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(SIGNED_BY));
    if signed_by.map(String::as_str) != Some(signing_root) {
        return true;
    }
    let Some(pem) = secret.data.as_ref().and_then(|d| d.get("tls.crt")) else {
        return true;
    };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(&pem.0) else {
        return true;
    };
    let Ok(cert) = block.parse_x509() else {
        return true;
    };
    let validity = cert.validity();
    let (start, end) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    now >= start + (end - start) / 2
}

/// Keeps the sidecar injector trusted by the API server for as long as
/// citadel runs: its serving certificate (Secret [`INJECTOR_TLS`], which the
/// injector re-reads when it changes) is issued again at half its lifetime
/// and when a root rotation switches the signing root, and the CA bundle
/// of each webhook in [`WEBHOOK_CONFIGURATION`] follows the trust bundle
/// (both roots while a rotation is under way). Checked every `every` and
/// at each change of the bundle; failures are logged and retried.
pub async fn keep_webhook_current(
    client: kube::Client,
    authority: std::sync::Arc<crate::authority::Authority>,
    service: String,
    every: std::time::Duration,
) {
    use base64::Engine;
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::Secret;
    use kube::api::{Patch, PatchParams};

    let ns = crate::CONTROL_PLANE_NAMESPACE;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client);
    let params = PatchParams::apply("mesh-citadel").force();
    let mut bundles = authority.watch();
    // The bundle generation the webhooks' CA bundle was last set to.
    let mut trusted: Option<u64> = None;
    loop {
        let bundle = bundles.borrow_and_update().clone();
        match secrets.get_opt(INJECTOR_TLS).await {
            Ok(secret)
                if webhook_cert_stale(
                    secret.as_ref(),
                    &bundle.signing_root,
                    std::time::SystemTime::now(),
                ) =>
            {
                match authority.issue_dns(&webhook_dns_names(&service), WEBHOOK_CERT_LIFETIME) {
                    Ok((chain, key)) => {
                        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
                        let body = serde_json::json!({
                            "apiVersion": "v1", "kind": "Secret",
                            "metadata": {"name": INJECTOR_TLS, "namespace": ns,
                                "annotations": {SIGNED_BY: bundle.signing_root}},
                            "type": "kubernetes.io/tls",
                            "data": {"tls.crt": b64(&chain), "tls.key": b64(&key)},
                        });
                        match secrets
                            .patch(INJECTOR_TLS, &params, &Patch::Apply(body))
                            .await
                        {
                            Ok(_) => tracing::info!(
                                "issued the sidecar injector a new serving certificate"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "cannot store the injector's certificate")
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "cannot issue the injector's certificate"),
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the injector's certificate"),
        }
        if trusted != Some(bundle.generation) {
            match webhooks.get_opt(WEBHOOK_CONFIGURATION).await {
                Ok(Some(current)) => {
                    let ca_bundle =
                        base64::engine::general_purpose::STANDARD.encode(bundle.roots_pem());
                    // Each webhook by name (the list's key), only its CA bundle.
                    let hooks: Vec<serde_json::Value> = current
                        .webhooks
                        .iter()
                        .flatten()
                        .map(|w| serde_json::json!({"name": w.name, "clientConfig": {"caBundle": ca_bundle}}))
                        .collect();
                    let body = serde_json::json!({
                        "apiVersion": "admissionregistration.k8s.io/v1",
                        "kind": "MutatingWebhookConfiguration",
                        "metadata": {"name": WEBHOOK_CONFIGURATION},
                        "webhooks": hooks,
                    });
                    match webhooks
                        .patch(WEBHOOK_CONFIGURATION, &params, &Patch::Apply(body))
                        .await
                    {
                        Ok(_) => trusted = Some(bundle.generation),
                        Err(e) => tracing::warn!(error = %e, "cannot set the webhook's CA bundle"),
                    }
                }
                // Not installed (yet): nothing to keep.
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read the webhook configuration"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = bundles.changed() => if changed.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Secret;
    use std::time::{Duration, SystemTime};

    #[test]
    fn the_injectors_certificate_is_replaced_past_half_its_life_or_under_another_root() {
        let dir = tempfile::tempdir().unwrap();
        let authority =
            crate::authority::Authority::open(dir.path(), "cluster.local", None).unwrap();
        let signing = authority.bundle().signing_root.clone();
        let (chain, _) = authority
            .issue_dns(&webhook_dns_names("cp"), Duration::from_secs(1000))
            .unwrap();
        let issued = SystemTime::now();
        let secret = |root: &str| Secret {
            metadata: kube::api::ObjectMeta {
                annotations: Some([(SIGNED_BY.to_string(), root.to_string())].into()),
                ..Default::default()
            },
            data: Some(
                [(
                    "tls.crt".to_string(),
                    k8s_openapi::ByteString(chain.clone().into_bytes()),
                )]
                .into(),
            ),
            ..Default::default()
        };
        let fresh = secret(&signing);
        // Issued a little back-dated: well inside the first half, and past it.
        assert!(!webhook_cert_stale(
            Some(&fresh),
            &signing,
            issued + Duration::from_secs(300)
        ));
        assert!(webhook_cert_stale(
            Some(&fresh),
            &signing,
            issued + Duration::from_secs(700)
        ));
        assert!(webhook_cert_stale(
            Some(&secret("another-root")),
            &signing,
            issued
        ));
        assert!(webhook_cert_stale(None, &signing, issued));
    }
}
