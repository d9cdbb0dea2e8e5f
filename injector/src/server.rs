//! The webhook over HTTPS (15017): `POST /inject` takes AdmissionReviews,
//! `GET /healthz/ready` answers 200. Each connection gets the newest TLS
//! config from a watch (`mesh_identity::grpc::tls_incoming`), so a renewed
//! certificate applies without a restart. A request the webhook cannot answer gets a 400 naming why; no
//! request takes the server down.

use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::Config;
use crate::webhook::{self, Verdict};

/// Kubernetes objects are at most ~1.5 MiB in etcd; reviews carry one.
const MAX_BODY: usize = 8 << 20;

/// What the webhook did, for logs and tests.
#[derive(Debug, Default)]
pub struct Counts {
    pub injected: AtomicU64,
    pub skipped: AtomicU64,
    pub denied: AtomicU64,
    pub bad_requests: AtomicU64,
    pub dry_runs: AtomicU64,
}

/// Serves until `shutdown` resolves, each review with the newest `cfg`
/// (the mesh config's defaults change while it runs).
pub async fn serve(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    cfg: watch::Receiver<Arc<Config>>,
    counts: Arc<Counts>,
    shutdown: impl Future<Output = ()>,
) {
    use tokio_stream::StreamExt;
    let mut incoming = mesh_identity::grpc::tls_incoming(listener, tls);
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => return,
            next = incoming.next() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(_)) => continue,
                None => return,
            },
        };
        let (cfg, counts) = (cfg.clone(), counts.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req| handle(req, cfg.borrow().clone(), counts.clone()));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
        .expect("static parts are valid")
}

async fn handle(
    req: Request<Incoming>,
    cfg: Arc<Config>,
    counts: Arc<Counts>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let text = "text/plain; charset=utf-8";
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => return Ok(reply(StatusCode::OK, text, "ready\n")),
        (&Method::POST, "/inject") => {}
        (_, "/inject") => {
            return Ok(reply(
                StatusCode::METHOD_NOT_ALLOWED,
                text,
                "POST an AdmissionReview\n",
            ));
        }
        _ => return Ok(reply(StatusCode::NOT_FOUND, text, "not found\n")),
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            counts.bad_requests.fetch_add(1, Ordering::Relaxed);
            let why = if e.is::<http_body_util::LengthLimitError>() {
                format!("the body is over {MAX_BODY} bytes\n")
            } else {
                format!("reading the body: {e}\n")
            };
            return Ok(reply(StatusCode::BAD_REQUEST, text, why));
        }
    };
    match webhook::review(&body, &cfg) {
        Ok(answer) => {
            let counter = match (&answer.verdict, answer.dry_run) {
                (_, true) => &counts.dry_runs,
                (Verdict::Injected, _) => &counts.injected,
                (Verdict::Skipped(_), _) => &counts.skipped,
                (Verdict::Denied(_), _) => &counts.denied,
            };
            counter.fetch_add(1, Ordering::Relaxed);
            match &answer.verdict {
                Verdict::Injected => {
                    tracing::info!(pod = %answer.pod, dry_run = answer.dry_run, "injected")
                }
                Verdict::Skipped(why) => {
                    tracing::debug!(pod = %answer.pod, %why, "not injected")
                }
                Verdict::Denied(why) => tracing::warn!(pod = %answer.pod, %why, "refused"),
            }
            let body = serde_json::to_vec(&answer.review).expect("a review serializes");
            Ok(reply(StatusCode::OK, "application/json", body))
        }
        Err(bad) => {
            counts.bad_requests.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %bad, "bad admission request");
            Ok(reply(StatusCode::BAD_REQUEST, text, format!("{bad}\n")))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no {what}", path.display())]
    Empty { path: PathBuf, what: &'static str },
    #[error("certificate and key do not go together: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A server config from PEM files (chain, key).
pub fn tls_from_files(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.into(),
            source,
        })
    };
    let chain: Vec<_> = rustls_pemfile::certs(&mut &read(cert)?[..])
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::Empty {
            path: cert.into(),
            what: "PEM certificate",
        });
    }
    let key = rustls_pemfile::private_key(&mut &read(key)?[..])
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::Empty {
            path: key.into(),
            what: "PEM private key",
        })?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Re-reads `cert` and `key` every `every` and publishes a new config when
/// they changed and load; a bad pair is logged and the old one keeps
/// serving.
pub async fn reload_files(
    cert: PathBuf,
    key: PathBuf,
    tx: watch::Sender<Arc<ServerConfig>>,
    every: Duration,
) {
    let stamp = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut last = (stamp(&cert), stamp(&key));
    loop {
        tokio::time::sleep(every).await;
        let now = (stamp(&cert), stamp(&key));
        if now == last {
            continue;
        }
        match tls_from_files(&cert, &key) {
            Ok(config) => {
                tracing::info!(cert = %cert.display(), "serving certificate reloaded");
                tx.send_replace(config);
                last = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate not reloaded; keeping the old one")
            }
        }
    }
}
