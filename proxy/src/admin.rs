//! Admin (15000), readiness (15021), Prometheus (15090) and agent (15020)
//! endpoints.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_proto::resources as pb;
use serde_json::{Value, json};

use crate::Shared;
use crate::pool::Body;
use crate::wire::{full, local_reply};

#[derive(Clone, Copy, Debug)]
pub enum Endpoints {
    /// Everything: readiness, config dump, stats.
    Admin,
    /// Only `/healthz/ready`.
    Health,
    /// Only `/stats/prometheus`.
    Stats,
    /// Kubelet's side: `/healthz/ready`, the app's own probes
    /// (`/app-health/<container>/livez|readyz|startupz`) and
    /// `POST /quitquitquit` (drain and exit, for Jobs in legacy mode).
    Agent,
}

pub async fn handle(
    shared: Arc<Shared>,
    which: Endpoints,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    use Endpoints::*;
    match (which, req.method(), req.uri().path()) {
        (Admin, &Method::POST, "/drain") | (Agent, &Method::POST, "/quitquitquit") => {
            shared.drain.start();
            return Ok(local_reply(StatusCode::OK, "draining"));
        }
        (Admin, &Method::POST, "/authz/check") => return Ok(authz_check(&shared, req).await),
        (Agent, &Method::GET, "/stats/prometheus") => {
            return Ok(prometheus(merged(&shared).await));
        }
        (Agent, &Method::GET, path) if path.starts_with("/app-health/") => {
            return Ok(match shared.cfg.app_probers.get(path) {
                Some(prober) => crate::probe::run(&shared, prober).await,
                None => local_reply(StatusCode::NOT_FOUND, "no such app probe"),
            });
        }
        _ => {}
    }
    if req.method() != Method::GET {
        return Ok(local_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "GET only (POST only for /drain, /authz/check and /quitquitquit)",
        ));
    }
    Ok(match (which, req.uri().path()) {
        (Admin | Health | Agent, "/healthz/ready") => match shared.not_ready() {
            None => local_reply(StatusCode::OK, "ready"),
            Some(why) => local_reply(StatusCode::SERVICE_UNAVAILABLE, why),
        },
        (Admin | Stats, "/stats/prometheus") => prometheus(shared.metrics.encode()),
        (Admin, "/tap") => Response::builder()
            .header(http::header::CONTENT_TYPE, "application/x-ndjson")
            .body(
                shared
                    .tap
                    .stream(crate::tap::Filter::from_query(req.uri().query())),
            )
            .expect("static parts are valid"),
        (Admin, "/config_dump") => Response::builder()
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(full(
                serde_json::to_string_pretty(&config_dump(&shared)).expect("json"),
            ))
            .expect("static parts are valid"),
        _ => local_reply(StatusCode::NOT_FOUND, "not found"),
    })
}

fn prometheus(text: String) -> Response<Body> {
    Response::builder()
        .header(
            http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )
        .body(full(text))
        .expect("static parts are valid")
}

/// How long the agent port waits for the app's metrics.
const APP_SCRAPE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The app's metrics (when the injector said where they are) followed by
/// the proxy's, as Istio's agent merges them. An app that cannot be read
/// costs only its own part: it is counted in
/// `istio_agent_scrape_failures_total` and logged.
async fn merged(shared: &Shared) -> String {
    let mut out = String::new();
    if let Some(m) = &shared.cfg.app_metrics {
        let addr = shared.cfg.app_addr(m.port);
        let url = format!("http://{addr}{}", m.path);
        let scrape = async {
            let req = Request::get(&url)
                .header(http::header::ACCEPT, "text/plain")
                .body(crate::wire::empty())
                .map_err(|e| e.to_string())?;
            let resp = shared
                .app_h1
                .request(req)
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!("the app answered {}", resp.status()));
            }
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            String::from_utf8(body.to_vec()).map_err(|_| "not UTF-8 text".to_string())
        };
        match tokio::time::timeout(APP_SCRAPE_TIMEOUT, scrape).await {
            Ok(Ok(text)) => {
                // One `# EOF` only, at the very end (the proxy's).
                for line in text.lines().filter(|l| l.trim() != "# EOF") {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            Ok(Err(e)) => {
                shared.metrics.app_scrape_failures.inc();
                tracing::warn!(%url, error = %e, "cannot read the app's metrics");
            }
            Err(_) => {
                shared.metrics.app_scrape_failures.inc();
                tracing::warn!(%url, "the app's metrics did not come within {APP_SCRAPE_TIMEOUT:?}");
            }
        }
    }
    out.push_str(&shared.metrics.encode());
    out
}

/// `meshctl authz check` live: the AuthorizationPolicies this sidecar
/// enforces now and, for the request described in the body
/// (`{"request": Described}`; `null`, or no body, to list only), their decision, made
/// as the inbound path makes it. 400 names what is wrong in the request.
async fn authz_check(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    #[derive(serde::Deserialize)]
    struct Asked {
        #[serde(default)]
        request: Option<crate::authz::Described>,
    }
    const LIMIT: usize = 64 * 1024;
    let body = match http_body_util::Limited::new(req.into_body(), LIMIT)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let asked: Asked = match serde_json::from_slice(if body.is_empty() { b"{}" } else { &body }) {
        Ok(a) => a,
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, format!("not a check: {e}")),
    };
    let snapshot = shared.snapshot.borrow().clone();
    let Some(listener) = &snapshot.listener else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "no listener config from pilot yet",
        );
    };
    let decision = match &asked.request {
        None => None,
        Some(r) => {
            let first_port = listener.ports.first().map(|p| p.port);
            match r.decide(&snapshot.authz, first_port) {
                Ok(d) => Some(d),
                Err(e) => return local_reply(StatusCode::BAD_REQUEST, &e),
            }
        }
    };
    let checked = crate::authz::Checked {
        workload: shared.cfg.proxy_id.clone(),
        policies: listener
            .policies
            .iter()
            .map(crate::authz::InScope::of)
            .collect(),
        decision,
    };
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(full(serde_json::to_string(&checked).expect("json")))
        .expect("static parts are valid")
}

fn config_dump(shared: &Shared) -> Value {
    let snapshot = shared.snapshot.borrow().clone();
    let cert = shared.tls.borrow().as_ref().map(|t| {
        json!({
            "identity": t.creds.identity.to_string(),
            "seconds_to_expiry": t.creds.remaining().as_secs(),
        })
    });
    let listener = snapshot.listener.as_ref().map(|l| {
        json!({
            "workload": l.workload.as_ref().map(|w| json!({
                "name": w.name, "namespace": w.namespace, "identity": w.identity,
                "address": w.address, "labels": w.labels,
            })),
            "ports": l.ports.iter().map(|p| json!({
                "port": p.port, "protocol": protocol(p.protocol), "services": p.services,
            })).collect::<Vec<_>>(),
            "mtls": if l.mtls == pb::MtlsMode::Strict as i32 { "STRICT" } else { "PERMISSIVE" },
            "telemetry": l.telemetry.as_ref().map(|t| json!({
                "sources": t.sources,
                "access_logs": t.access_logs.iter().map(|a| json!({
                    "encoding": pb::access_log::Encoding::try_from(a.encoding).map_or("?", |e| e.as_str_name()),
                    "filter": a.filter,
                    "side": pb::TrafficSide::try_from(a.side).map_or("?", |s| s.as_str_name()),
                })).collect::<Vec<_>>(),
                "tracing": t.tracing.as_ref().map(|tr| json!({
                    "sampling_percent": tr.sampling_percent,
                    "disable_span_reporting": tr.disable_span_reporting,
                    "side": pb::TrafficSide::try_from(tr.side).map_or("?", |s| s.as_str_name()),
                    "literal_tags": tr.literal_tags,
                    "header_tags": tr.header_tags,
                    "collector": tr.collector,
                })),
                "client_metrics_off": t.client_metrics_off,
                "server_metrics_off": t.server_metrics_off,
            })),
        })
    });
    let mut routes: Vec<_> = snapshot.routes.values().collect();
    routes.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    let mut clusters: Vec<_> = snapshot.clusters.values().collect();
    clusters.sort_by(|a, b| a.config.name.cmp(&b.config.name));
    json!({
        "proxy_id": shared.cfg.proxy_id,
        "identity": shared.cfg.identity.to_string(),
        "certificate": cert,
        "xds": *shared.xds_status.borrow(),
        "listener": listener,
        "routes": routes.iter().map(|r| &r.config).collect::<Vec<_>>(),
        "clusters": clusters.iter().map(|c| json!({
            "name": c.config.name,
            "protocol": protocol(c.config.protocol),
            "tls": c.config.tls.as_ref().map(|t| json!({
                "mode": pb::client_tls::Mode::try_from(t.mode)
                    .map_or("UNKNOWN", |m| m.as_str_name()),
                "sni": t.sni,
                "ca_certificates": t.ca_certificates,
                "client_certificate": t.client_certificate,
                "subject_alt_names": t.subject_alt_names,
                "insecure_skip_verify": t.insecure_skip_verify,
            })),
            "endpoints": c.endpoints.iter().map(|e| json!({
                "address": format!("{}:{}", e.pb.address, e.pb.port),
                "identity": e.pb.identity,
                "workload": e.pb.workload,
                "sidecar": e.identity.is_some(),
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn protocol(p: i32) -> &'static str {
    pb::Protocol::try_from(p)
        .map(|p| p.as_str_name())
        .unwrap_or("UNKNOWN")
}
