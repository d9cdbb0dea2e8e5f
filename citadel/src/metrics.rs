//! citadel's metrics, Prometheus text, with Istio's names where Istio has
//! them: certificate requests, issuances, refusals, signing latency and
//! the roots' expiry.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

use crate::authority::Authority;

/// Serves `GET /metrics` on `listener` for as long as the task runs (the
/// standalone citadel's monitoring port; in one process with pilot,
/// pilot's 15014 serves these instead).
pub async fn serve(authority: std::sync::Arc<Authority>, listener: tokio::net::TcpListener) {
    use hyper::service::service_fn;
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let authority = authority.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let resp = if req.uri().path() == "/metrics" {
                    hyper::Response::new(http_body_util::Full::new(hyper::body::Bytes::from(
                        encode_text(&authority),
                    )))
                } else {
                    let mut r = hyper::Response::new(http_body_util::Full::new(
                        hyper::body::Bytes::from_static(b"only /metrics here\n"),
                    ));
                    *r.status_mut() = hyper::StatusCode::NOT_FOUND;
                    r
                };
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
        });
    }
}

/// Everything citadel reports, read from the authority now.
pub fn encode_text(authority: &Authority) -> String {
    let issued: u64 = authority.issued().values().sum();
    let refused = authority.refused();
    let mut r = Registry::default();
    r.register(
        "citadel_server_csr",
        "Certificate signing requests received",
        ConstCounter::new(issued + refused),
    );
    r.register(
        "citadel_server_success_cert_issuance",
        "Certificates issued",
        ConstCounter::new(issued),
    );
    r.register(
        "citadel_server_csr_refused",
        "Certificate requests refused (bad credentials, CSR for another identity, bad CSR)",
        ConstCounter::new(refused),
    );
    r.register(
        "citadel_server_csr_sign_seconds",
        "Time to sign one workload certificate",
        authority.sign_seconds.clone(),
    );
    if let Some(expiry) = authority.bundle().roots.iter().map(|r| r.not_after).min() {
        r.register(
            "citadel_server_root_cert_expiry_timestamp",
            "When the earliest trusted root expires (Unix seconds)",
            ConstGauge::new(expiry),
        );
    }
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}
