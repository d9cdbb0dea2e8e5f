//! `meshctl kube-inject`: the pod templates inside workload manifests
//! (multi-document YAML, `List`s included) injected as the webhook would.
//! Kinds without a pod template pass through unchanged. Any document that
//! cannot be injected fails the whole run, so nothing half-injected is
//! ever printed.

use k8s_openapi::api::core::v1::{Pod, PodTemplateSpec};
use serde_json::Value;

use crate::{Config, NamespacePolicy, Outcome, Skip};

/// Where each kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// One workload's result, for the report on stderr.
#[derive(Debug, PartialEq, Eq)]
pub struct Note {
    /// `Deployment shop/reviews-v1`.
    pub workload: String,
    /// `None`: injected.
    pub skipped: Option<Skip>,
    /// What the user should hear about an injected workload
    /// ([`crate::warnings`]).
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeInjectError {
    #[error("the input is not YAML: {0}")]
    Yaml(String),
    #[error("document {doc} ({workload}): {why}")]
    Document {
        doc: usize,
        workload: String,
        why: String,
    },
}

/// Injects every pod template in `yaml`; returns the documents as YAML
/// and what happened to each workload.
pub fn inject_yaml(yaml: &str, cfg: &Config) -> Result<(String, Vec<Note>), KubeInjectError> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(yaml).map_err(|e| KubeInjectError::Yaml(e.to_string()))?;
    let mut notes = Vec::new();
    let mut out = Vec::with_capacity(docs.len());
    for (i, doc) in docs.into_iter().enumerate() {
        if doc.is_null() {
            continue;
        }
        out.push(
            inject_object(doc, cfg, &mut notes).map_err(|(workload, why)| {
                KubeInjectError::Document {
                    doc: i + 1,
                    workload,
                    why,
                }
            })?,
        );
    }
    let text =
        serde_saphyr::to_string_multiple(&out).map_err(|e| KubeInjectError::Yaml(e.to_string()))?;
    Ok((text, notes))
}

fn describe(obj: &Value) -> String {
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or("").to_string();
    let kind = s(obj.get("kind"));
    let meta = obj.get("metadata");
    let name = s(meta.and_then(|m| m.get("name")));
    match s(meta.and_then(|m| m.get("namespace"))) {
        ns if ns.is_empty() => format!("{kind} {name}"),
        ns => format!("{kind} {ns}/{name}"),
    }
}

/// One object; `Err((workload, why))`.
fn inject_object(
    mut obj: Value,
    cfg: &Config,
    notes: &mut Vec<Note>,
) -> Result<Value, (String, String)> {
    let kind = obj
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let workload = describe(&obj);
    let namespace = obj
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_string();
    if kind == "List" {
        if let Some(Value::Array(items)) = obj.get_mut("items") {
            for item in items.iter_mut() {
                *item = inject_object(item.take(), cfg, notes)?;
            }
        }
        return Ok(obj);
    }
    let fail = |why: String| (workload.clone(), why);
    let parse_err = |at: &str, e: serde_path_to_error::Error<serde_json::Error>| {
        fail(format!(
            "{at} is not a valid pod: at {}: {}",
            e.path(),
            e.inner()
        ))
    };
    let path = template_path(&kind);
    let pointer: String = path
        .iter()
        .flat_map(|p| p.iter())
        .map(|p| format!("/{p}"))
        .collect();
    let pod: Pod = if kind == "Pod" {
        serde_path_to_error::deserialize(&obj).map_err(|e| parse_err("the object", e))?
    } else if let Some(path) = path {
        let at = path.join(".");
        let template = obj
            .pointer(&pointer)
            .ok_or_else(|| fail(format!("{at} is missing")))?;
        let t: PodTemplateSpec =
            serde_path_to_error::deserialize(template).map_err(|e| parse_err(&at, e))?;
        Pod {
            metadata: t.metadata.unwrap_or_default(),
            spec: t.spec,
            status: None,
        }
    } else {
        return Ok(obj);
    };
    let injected = match crate::inject(&pod, &namespace, &NamespacePolicy::Enabled, cfg) {
        Ok(Outcome::Injected(p)) => p,
        Ok(Outcome::Skipped(skip)) => {
            notes.push(Note {
                workload,
                skipped: Some(skip),
                warnings: Vec::new(),
            });
            return Ok(obj);
        }
        Err(e) => return Err(fail(e.to_string())),
    };
    notes.push(Note {
        workload,
        skipped: None,
        warnings: crate::warnings(&pod, cfg),
    });
    if kind == "Pod" {
        return Ok(serde_json::to_value(&*injected).expect("a Pod serializes"));
    }
    let Pod { metadata, spec, .. } = *injected;
    let template = PodTemplateSpec {
        metadata: Some(metadata),
        spec,
    };
    *obj.pointer_mut(&pointer).expect("read above") =
        serde_json::to_value(&template).expect("a template serializes");
    Ok(obj)
}
