//! `meshctl authz check`: which AuthorizationPolicies apply to a workload
//! and, for a described request, whether they allow it and which rule
//! decided. Live, it asks the workload's sidecar, which decides over the
//! policies it enforces now; offline, it reads config files, resolves them
//! as pilot does, and decides with the sidecar's own code.

use std::path::PathBuf;

use anyhow::Context;
use mesh_pilot::model::Model;
use mesh_pilot::store::ConfigSet;
use mesh_proto::resources as pb;
pub use mesh_proxy::authz::{Checked, Described};
use mesh_proxy::authz::{InScope, Policies};

/// Loads config directories and files into one set.
pub fn load(paths: &[PathBuf]) -> anyhow::Result<Model> {
    let mut set = ConfigSet::default();
    for p in paths {
        if p.is_dir() {
            set.resources
                .extend(mesh_pilot::store::load_dir(p)?.resources);
        } else {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            set.resources
                .extend(mesh_pilot::store::parse_file(p, &text)?);
        }
    }
    Model::build(&set, mesh_identity::DEFAULT_TRUST_DOMAIN)
        .map_err(|e| anyhow::anyhow!("the config is invalid:\n  {}", e.join("\n  ")))
}

/// Offline: the policies for `workload` (name or name.namespace) as
/// pilot would resolve them from `model`, and the decision for `req` when
/// one is described, made by the sidecar's own code.
pub fn check(model: &Model, workload: &str, req: Option<&Described>) -> anyhow::Result<Checked> {
    let w = model
        .workloads
        .values()
        .find(|w| w.name == workload || w.proxy_id() == workload)
        .with_context(|| {
            let known: Vec<&str> = model.workloads.values().map(|w| w.name.as_str()).collect();
            format!(
                "no workload {workload:?}; the config has {}",
                known.join(", ")
            )
        })?;
    let policies: Vec<pb::AuthorizationPolicy> = model
        .authz
        .iter()
        .filter(|a| a.scope.applies_to(w))
        .map(|a| a.policy.clone())
        .collect();
    let decision = match req {
        None => None,
        Some(req) => {
            let compiled = Policies::compile(&policies).map_err(anyhow::Error::msg)?;
            let first_port = model
                .services
                .values()
                .filter(|s| {
                    s.namespace == w.namespace
                        && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                        && !s.selector.is_empty()
                })
                .flat_map(|s| s.ports.iter().map(|p| p.target_port.unwrap_or(p.number)))
                .next();
            Some(
                req.decide(&compiled, first_port)
                    .map_err(anyhow::Error::msg)?,
            )
        }
    };
    Ok(Checked {
        workload: w.proxy_id(),
        policies: policies.iter().map(InScope::of).collect(),
        decision,
    })
}

/// Live: asks the workload's sidecar (found through pilot's debug address)
/// which policies it enforces now and what they decide for `req`.
pub async fn check_live(
    pilot_debug: std::net::SocketAddr,
    workload: &str,
    req: Option<&Described>,
) -> anyhow::Result<Checked> {
    let admin = crate::inspect::admin_addr(pilot_debug, workload).await?;
    let url = format!("http://{admin}/authz/check");
    let answer =
        crate::inspect::call_json(&url, Some(&serde_json::json!({ "request": req }))).await?;
    serde_json::from_value(answer).with_context(|| format!("{url} did not answer a check"))
}
