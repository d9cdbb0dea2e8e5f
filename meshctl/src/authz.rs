//! `meshctl authz check`: which AuthorizationPolicies apply to a workload
//! and, for a described request, whether they allow it and which rule
//! decided. Offline: it reads the config files, resolves them as pilot
//! does, and decides with the sidecar's own code.

use std::path::PathBuf;

use anyhow::{Context, bail};
use mesh_pilot::model::Model;
use mesh_pilot::store::ConfigSet;
use mesh_proto::resources as pb;

/// A request to check, as the command line describes it.
#[derive(Debug, Default)]
pub struct Check {
    /// The caller's principal (`cluster.local/ns/NS/sa/SA`, `spiffe://`
    /// optional); `None` for a plaintext caller without a sidecar.
    pub from: Option<String>,
    pub source_ip: Option<std::net::IpAddr>,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    pub port: Option<u32>,
    /// A TCP connection rather than an HTTP request.
    pub tcp: bool,
    /// The claims of a JWT the request carries, taken as verified.
    pub jwt_claims: Option<serde_json::Value>,
}

pub struct Outcome {
    pub policies: Vec<pb::AuthorizationPolicy>,
    pub decision: Option<mesh_proxy::authz::Decision>,
    pub workload: String,
}

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

/// The policies for `workload` (name or name.namespace), and the decision
/// for `check` when it names a caller or a path.
pub fn check(model: &Model, workload: &str, req: Option<&Check>) -> anyhow::Result<Outcome> {
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
    let Some(req) = req else {
        return Ok(Outcome {
            policies,
            decision: None,
            workload: w.proxy_id(),
        });
    };
    let compiled = mesh_proxy::authz::Policies::compile(&policies).map_err(anyhow::Error::msg)?;
    let principal = req
        .from
        .as_deref()
        .map(|p| p.strip_prefix("spiffe://").unwrap_or(p).to_string());
    let namespace = principal.as_deref().and_then(|p| {
        let mut parts = p.split('/');
        parts
            .find(|s| *s == "ns")
            .and(parts.next())
            .map(str::to_string)
    });
    if principal.is_some() && namespace.is_none() {
        bail!("--from must look like cluster.local/ns/<namespace>/sa/<account>");
    }
    let port = match req.port {
        Some(p) => p,
        None => model
            .services
            .values()
            .filter(|s| {
                s.namespace == w.namespace
                    && s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
                    && !s.selector.is_empty()
            })
            .flat_map(|s| s.ports.iter().map(|p| p.target_port.unwrap_or(p.number)))
            .next()
            .context("the workload serves no port; give --port")?,
    };
    let mut headers = http::HeaderMap::new();
    for (k, v) in &req.headers {
        headers.insert(
            http::HeaderName::from_bytes(k.as_bytes()).with_context(|| format!("--header {k}"))?,
            v.parse().with_context(|| format!("--header {k}={v}"))?,
        );
    }
    let host = req.host.clone().unwrap_or_default().to_ascii_lowercase();
    let http = (!req.tcp).then(|| mesh_proxy::authz::HttpParts {
        host: &host,
        method: &req.method,
        path: &req.path,
        headers: &headers,
    });
    let auth = req.jwt_claims.as_ref().map(|claims| {
        let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
        mesh_proxy::jwt::Verified {
            principal: format!(
                "{}/{}",
                s("iss").unwrap_or_default(),
                s("sub").unwrap_or_default()
            ),
            audiences: match claims.get("aud") {
                Some(serde_json::Value::String(a)) => vec![a.clone()],
                Some(serde_json::Value::Array(a)) => a
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect(),
                _ => vec![],
            },
            presenter: s("azp"),
            claims: claims.clone(),
        }
    });
    let decision = compiled.decide(&mesh_proxy::authz::Request {
        principal: principal.as_deref(),
        namespace: namespace.as_deref(),
        source_ip: req.source_ip,
        port,
        http,
        auth: auth.as_ref(),
    });
    Ok(Outcome {
        policies,
        decision: Some(decision),
        workload: w.proxy_id(),
    })
}

/// For people: the decision first (`yes` / `no`), then why, then the
/// policies in scope.
pub fn render(o: &Outcome) -> String {
    let mut out = String::new();
    if let Some(d) = &o.decision {
        out.push_str(if d.allowed() { "yes\n" } else { "no\n" });
        out.push_str(&format!("{}\n", d.reason()));
    }
    if o.policies.is_empty() {
        out.push_str(&format!(
            "no AuthorizationPolicy applies to {}\n",
            o.workload
        ));
    } else {
        out.push_str(&format!("policies that apply to {}:\n", o.workload));
        for p in &o.policies {
            let action = pb::authorization_policy::Action::try_from(p.action)
                .map(|a| a.as_str_name())
                .unwrap_or("?");
            out.push_str(&format!(
                "  {:<40} {:<6} {} rules\n",
                p.name,
                action,
                p.rules.len()
            ));
        }
    }
    out
}
