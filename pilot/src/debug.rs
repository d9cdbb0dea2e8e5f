//! pilot's debug endpoints (control-plane monitoring port, 15014):
//! `/debug/syncz` (per proxy and type: sent, acked, NACKed) and
//! `/debug/config_errors` (why the last config load was rejected) and
//! `/metrics` (Prometheus).

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::Pilot;
use crate::status::{ProxyStatus, Sync};

/// One row of `/debug/syncz`.
#[derive(Serialize)]
struct SyncRow<'a> {
    #[serde(flatten)]
    proxy: &'a ProxyStatus,
    /// Sync state by short type name (`Listener`, `Cluster`, ...).
    sync: std::collections::BTreeMap<&'a str, Sync>,
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec_pretty(body).expect("serializable"),
        )))
        .expect("valid response")
}

fn syncz(pilot: &Pilot) -> Response<Full<Bytes>> {
    let proxies = pilot.proxies();
    let rows: Vec<SyncRow> = proxies
        .iter()
        .map(|p| SyncRow {
            proxy: p,
            sync: mesh_proto::type_url::ALL
                .iter()
                .map(|t| {
                    let short = t.rsplit('.').next().unwrap_or(t);
                    (
                        short,
                        p.types.get(t).map(|s| s.sync()).unwrap_or(Sync::NotSent),
                    )
                })
                .collect(),
        })
        .collect();
    json(StatusCode::OK, &rows)
}

fn route(pilot: &Pilot, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/debug/syncz" => syncz(pilot),
        "/debug/config_errors" => json(StatusCode::OK, &pilot.errors()),
        "/metrics" => Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(pilot.metrics_text())))
            .expect("valid response"),
        other => json(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": format!("no such page {other}"), "pages": ["/debug/syncz", "/debug/config_errors", "/metrics"]}),
        ),
    }
}

impl Pilot {
    /// Serves the debug endpoints on `listener` until `shutdown`.
    pub async fn serve_debug(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        loop {
            let tcp = tokio::select! {
                _ = &mut shutdown => return,
                accepted = listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(_) => continue,
                },
            };
            let pilot = self.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let resp = route(&pilot, &req);
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}
