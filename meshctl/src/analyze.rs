//! `meshctl analyze DIR|FILE...`: what pilot would refuse in a config, and
//! what it would accept but is probably not what was meant.
//!
//! Errors are exactly pilot's: a file it cannot read or parse (unknown
//! fields included, for the kinds that refuse them), and every reference
//! or value the model rejects, each naming the file, the resource and the
//! field. Warnings need the config to build: selectors that select no
//! workload, and HTTP routes that can never match because an earlier
//! route matches every request.

use std::path::{Path, PathBuf};

use mesh_pilot::istio::Labels;
use mesh_pilot::model::{Model, ROOT_NAMESPACE};
use mesh_pilot::store::{ConfigSet, Meta, Resource};
use serde::Serialize;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
}

#[derive(Clone, Debug, Serialize)]
pub struct Finding {
    pub level: Level,
    pub message: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub findings: Vec<Finding>,
    pub errors: usize,
    pub warnings: usize,
}

impl Report {
    fn push(&mut self, level: Level, message: String) {
        match level {
            Level::Error => self.errors += 1,
            Level::Warning => self.warnings += 1,
        }
        self.findings.push(Finding { level, message });
    }
}

/// The YAML files named: a directory's `*.yaml`/`*.yml`, or files as given.
fn files(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut in_dir: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|d| {
                    d.filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|f| {
                            matches!(f.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
                        })
                        .collect()
                })
                .unwrap_or_default();
            in_dir.sort();
            out.extend(in_dir);
        } else {
            out.push(p.clone());
        }
    }
    out
}

pub fn analyze(paths: &[PathBuf]) -> Report {
    let mut report = Report::default();
    for p in paths.iter().filter(|p| !p.exists()) {
        report.push(
            Level::Error,
            format!("{}: no such file or directory", p.display()),
        );
    }
    let texts = files(paths).into_iter().map(|file| {
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("{}: cannot read: {e}", file.display()));
        (file, text)
    });
    analyze_texts(report, texts)
}

/// As [`analyze`], of one file's text already read.
pub fn analyze_text(file: &Path, text: &str) -> Report {
    let texts = [(file.to_path_buf(), Ok(text.to_string()))];
    analyze_texts(Report::default(), texts)
}

fn analyze_texts(
    mut report: Report,
    texts: impl IntoIterator<Item = (PathBuf, Result<String, String>)>,
) -> Report {
    let mut set = ConfigSet::default();
    for (file, text) in texts {
        match text
            .and_then(|text| mesh_pilot::store::parse_file(&file, &text).map_err(|e| e.to_string()))
        {
            Ok(resources) => set.resources.extend(resources),
            Err(e) => report.push(Level::Error, e),
        }
    }
    match Model::build(&set, mesh_identity::DEFAULT_TRUST_DOMAIN) {
        Err(errors) => {
            for e in errors {
                report.push(Level::Error, e);
            }
        }
        Ok(model) => {
            warnings(&set, &model, &mut report);
            peer_auth_overlaps(&model, &mut report);
            route_conflicts(&model, &mut report);
        }
    }
    report
}

fn warnings(set: &ConfigSet, model: &Model, report: &mut Report) {
    let selects = |meta: &Meta, labels: &Labels| {
        model.workloads.values().any(|w| {
            (*meta.namespace == *ROOT_NAMESPACE || *w.namespace == *meta.namespace)
                && labels.iter().all(|(k, v)| w.labels.get(k) == Some(v))
        })
    };
    for (meta, res) in &set.resources {
        let (kind, selector, field) = match res {
            Resource::PeerAuthentication(p) => (
                "PeerAuthentication",
                p.selector.as_ref().map(|s| &s.match_labels),
                "spec.selector.matchLabels",
            ),
            Resource::AuthorizationPolicy(p) => (
                "AuthorizationPolicy",
                p.selector.as_ref().map(|s| &s.match_labels),
                "spec.selector.matchLabels",
            ),
            Resource::RequestAuthentication(p) => (
                "RequestAuthentication",
                p.selector.as_ref().map(|s| &s.match_labels),
                "spec.selector.matchLabels",
            ),
            Resource::Telemetry(t) => (
                "Telemetry",
                t.selector.as_ref().map(|s| &s.match_labels),
                "spec.selector.matchLabels",
            ),
            Resource::Sidecar(sc) => (
                "Sidecar",
                sc.workload_selector.as_ref().map(|s| &s.labels),
                "spec.workloadSelector.labels",
            ),
            Resource::ServiceEntry(se) => (
                "ServiceEntry",
                se.workload_selector.as_ref().map(|s| &s.labels),
                "spec.workloadSelector.labels",
            ),
            Resource::VirtualService(vs) => {
                shadowed(meta, vs, report);
                continue;
            }
            Resource::DestinationRule(dr) => {
                let http = dr
                    .traffic_policy
                    .iter()
                    .flat_map(|p| {
                        let levels = p.port_level_settings.iter().map(|s| &s.connection_pool);
                        std::iter::once(&p.connection_pool).chain(levels)
                    })
                    .chain(
                        dr.subsets
                            .iter()
                            .flat_map(|s| s.traffic_policy.iter().map(|p| &p.connection_pool)),
                    )
                    .flatten()
                    .filter_map(|pool| pool.http.as_ref());
                let mut ignored = Vec::new();
                for h in http {
                    for (field, set) in [
                        ("h2UpgradePolicy", h.h2_upgrade_policy.is_some()),
                        ("useClientProtocol", h.use_client_protocol.is_some()),
                        ("maxConcurrentStreams", h.max_concurrent_streams.is_some()),
                    ] {
                        if set && !ignored.contains(&field) {
                            ignored.push(field);
                        }
                    }
                }
                not_acted_on(meta, "DestinationRule", &ignored, report);
                continue;
            }
            _ => continue,
        };
        if let Some(labels) = selector.filter(|l| !l.is_empty())
            && !selects(meta, labels)
        {
            report.push(
                Level::Warning,
                format!(
                    "{}: {kind} {}/{}: {field} {} selects no workload in {}; check the labels",
                    meta.file.display(),
                    meta.namespace,
                    meta.name,
                    render_labels(labels),
                    if *meta.namespace == *ROOT_NAMESPACE {
                        "the mesh".to_string()
                    } else {
                        format!("namespace {}", meta.namespace)
                    }
                ),
            );
        }
    }
}

/// Settings pilot accepts but the mesh does not act on: said, so nothing
/// is silently different. The connection pool's HTTP/2 upgrade settings
/// (sidecars always speak HTTP/2 to each other).
fn not_acted_on(meta: &Meta, kind: &str, pool_fields: &[&str], report: &mut Report) {
    let at = format!(
        "{}: {kind} {}/{}",
        meta.file.display(),
        meta.namespace,
        meta.name
    );
    for field in pool_fields {
        report.push(
            Level::Warning,
            format!(
                "{at}: connectionPool.http.{field} is not acted on: sidecars always speak HTTP/2 to each other"
            ),
        );
    }
}

/// Workloads more than one selector PeerAuthentication picks: the first
/// loaded applies, which is easy to get wrong.
fn peer_auth_overlaps(model: &Model, report: &mut Report) {
    for w in model.workloads.values() {
        let picks: Vec<&mesh_pilot::model::PeerAuth> =
            model.peer_auth.iter().filter(|p| p.selects(w)).collect();
        if let [first, rest @ ..] = picks.as_slice()
            && !rest.is_empty()
        {
            let others: Vec<String> = rest
                .iter()
                .map(|p| format!("{}/{}", p.namespace, p.name))
                .collect();
            report.push(
                Level::Warning,
                format!(
                    "PeerAuthentication {}/{} and {} all select workload {}/{}: only {}/{} applies; narrow the selectors so one does",
                    first.namespace,
                    first.name,
                    others.join(", "),
                    w.namespace,
                    w.name,
                    first.namespace,
                    first.name
                ),
            );
        }
    }
}

/// VirtualServices for one host that some namespace's proxies would both
/// follow: only the first loaded applies there (Istio's IST0109).
fn route_conflicts(model: &Model, report: &mut Report) {
    for (host, all) in &model.routes {
        for (i, later) in all.iter().enumerate() {
            if let Some(first) = all[..i].iter().find(|r| r.overlaps(later)) {
                report.push(
                    Level::Warning,
                    format!(
                        "VirtualService {}/{} and {}/{} both route {host} for the same namespaces: only {}/{} applies there; merge them, or set exportTo so each namespace follows one",
                        first.namespace, first.name, later.namespace, later.name, first.namespace, first.name
                    ),
                );
            }
        }
    }
}

/// Routes after one that matches everything (no `match`, or a match with
/// no conditions) can never be reached.
fn shadowed(meta: &Meta, vs: &mesh_pilot::istio::VirtualService, report: &mut Report) {
    let catch_all = |r: &mesh_pilot::istio::HttpRoute| {
        r.matches.is_empty()
            || r.matches
                .iter()
                .any(|m| m.uri.is_none() && m.headers.is_empty())
    };
    if let Some(first) = vs.http.iter().position(catch_all) {
        for later in first + 1..vs.http.len() {
            report.push(
                Level::Warning,
                format!(
                    "{}: VirtualService {}/{}: spec.http[{later}] can never match: spec.http[{first}] before it matches every request; move it up or narrow spec.http[{first}]",
                    meta.file.display(),
                    meta.namespace,
                    meta.name
                ),
            );
        }
    }
}

fn render_labels(labels: &Labels) -> String {
    let inner: Vec<String> = labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    format!("{{{}}}", inner.join(", "))
}

/// For people: one line per finding, then a count.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for f in &r.findings {
        let level = match f.level {
            Level::Error => "error",
            Level::Warning => "warning",
        };
        out.push_str(&format!("{level}: {}\n", f.message));
    }
    out.push_str(&format!("{} errors, {} warnings\n", r.errors, r.warnings));
    out
}

/// The config fuzz target's body (`pilot/fuzz/fuzz_targets/config.rs`), shared
/// with the test that replays its seeds and every crash it found: any
/// bytes through what pilot does on a reload and through `analyze`. It
/// panics where either would, or where a refusal does not say why.
#[doc(hidden)]
pub fn fuzz_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match mesh_pilot::serve_text(text) {
        Ok((_, rejected)) => assert!(rejected.iter().all(|e| !e.is_empty())),
        Err(errors) => assert!(!errors.is_empty() && errors.iter().all(|e| !e.is_empty())),
    }
    let report = analyze_text(Path::new("config.yaml"), text);
    assert_eq!(report.errors + report.warnings, report.findings.len());
}
