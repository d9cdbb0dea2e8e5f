//! The admission webhook's exchange: an `admission.k8s.io/v1`
//! AdmissionReview in, the same review with a response out, carrying the
//! injection as a base64 JSON Patch. Pure; `server` does the HTTPS.

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use serde_json::{Value, json};

use crate::{Config, NamespacePolicy, Outcome, Skip};

pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A request that is not an AdmissionReview the webhook can answer at all
/// (HTTP 400 with this text).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadRequest(pub String);

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Injected,
    Skipped(Skip),
    /// Refused; the message is shown to whoever created the object.
    Denied(String),
}

#[derive(Debug)]
pub struct Answer {
    /// The AdmissionReview to send back (HTTP 200).
    pub review: Value,
    pub verdict: Verdict,
    pub dry_run: bool,
    /// `namespace/name` (or generateName) for logs.
    pub pod: String,
}

/// Answers one AdmissionReview. The API server calls only for pods its
/// selectors picked (a namespace with injection on, or a pod asking for
/// it), so the namespace counts as enabled here and the pod's own
/// annotations decide the rest. A dry run gets the same patch (there are
/// no side effects to hold back) and is marked so the server does not
/// count it.
pub fn review(body: &[u8], cfg: &Config) -> Result<Answer, BadRequest> {
    let review: Value = serde_json::from_slice(body)
        .map_err(|e| BadRequest(format!("the body is not JSON: {e}")))?;
    let field = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
    match (field(&review, "apiVersion"), field(&review, "kind")) {
        (Some(v), Some(k)) if v == API_VERSION && k == "AdmissionReview" => {}
        (v, k) => {
            return Err(BadRequest(format!(
                "expected an {API_VERSION} AdmissionReview, got apiVersion {} kind {}; \
                 the webhook configuration must list admissionReviewVersions: [v1]",
                v.as_deref().unwrap_or("(none)"),
                k.as_deref().unwrap_or("(none)")
            )));
        }
    }
    let request = review
        .get("request")
        .ok_or_else(|| BadRequest("the AdmissionReview has no request".into()))?;
    let uid = field(request, "uid").ok_or_else(|| BadRequest("request.uid is missing".into()))?;
    let dry_run = request
        .get("dryRun")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let namespace = field(request, "namespace");
    let answer = |verdict: Verdict, patch: Option<Vec<u8>>, pod: String| {
        let mut response = json!({"uid": uid, "allowed": true});
        if let Verdict::Denied(message) = &verdict {
            response["allowed"] = json!(false);
            response["status"] = json!({"code": 400, "reason": "BadRequest", "message": message});
        }
        if let Some(patch) = patch {
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Answer {
            review: json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}),
            verdict,
            dry_run,
            pod,
        }
    };

    let kind = request.get("kind").cloned().unwrap_or(Value::Null);
    let (group, version, kind_name) = (
        field(&kind, "group").unwrap_or_default(),
        field(&kind, "version").unwrap_or_default(),
        field(&kind, "kind").unwrap_or_default(),
    );
    let object_name = field(request, "name").unwrap_or_default();
    if (group.as_str(), version.as_str(), kind_name.as_str()) != ("", "v1", "Pod") {
        let shown = if group.is_empty() {
            version
        } else {
            format!("{group}/{version}")
        };
        return Ok(answer(
            Verdict::Denied(format!(
                "the sidecar injector only mutates v1 Pods, not {shown} {kind_name}; \
                 the webhook's rules should select pods only"
            )),
            None,
            object_name,
        ));
    }
    let operation = field(request, "operation").unwrap_or_default();
    if operation != "CREATE" {
        return Ok(answer(
            Verdict::Skipped(Skip::NotACreate(operation)),
            None,
            object_name,
        ));
    }
    let Some(object) = request.get("object") else {
        return Err(BadRequest("request.object is missing".into()));
    };
    let pod: Pod = match serde_path_to_error::deserialize(object) {
        Ok(pod) => pod,
        Err(e) => {
            return Ok(answer(
                Verdict::Denied(format!(
                    "request.object is not a valid Pod: at {}: {}",
                    e.path(),
                    e.inner()
                )),
                None,
                object_name,
            ));
        }
    };
    let ns = namespace
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    let pod_id = format!("{ns}/{name}");
    match crate::inject(&pod, &ns, &NamespacePolicy::Enabled, cfg) {
        Ok(Outcome::Injected(injected)) => {
            // Both sides as the Pod type writes them, so that the patch
            // holds the injection and nothing the round trip normalised.
            let before = serde_json::to_value(&pod).expect("a Pod serializes");
            let after = serde_json::to_value(&*injected).expect("a Pod serializes");
            let patch = json_patch::diff(&before, &after);
            let bytes = serde_json::to_vec(&patch).expect("a patch serializes");
            let mut answer = answer(Verdict::Injected, Some(bytes), pod_id);
            let warnings = crate::warnings(&pod, cfg);
            if !warnings.is_empty() {
                // kubectl prints these to whoever created the pod.
                answer.review["response"]["warnings"] = json!(warnings);
            }
            Ok(answer)
        }
        Ok(Outcome::Skipped(skip)) => Ok(answer(Verdict::Skipped(skip), None, pod_id)),
        Err(e) => Ok(answer(
            Verdict::Denied(format!("sidecar injection refused pod {pod_id}: {e}")),
            None,
            pod_id,
        )),
    }
}
