//! The app's own kubelet probes, run by the proxy when kubelet asks the
//! agent port (the injector moved them there: under STRICT mutual TLS
//! kubelet cannot reach the app, and under capture a TCP probe would only
//! reach the proxy). Answers 200 when the app passes, the app's status when
//! it answers 400 or more, and 503 naming why when it cannot be reached in
//! the probe's time. HTTP, HTTPS (any certificate, as kubelet), TCP and
//! gRPC (`grpc.health.v1.Health/Check`) checks, as kubelet runs them.

use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use mesh_proto::probers::{Grpc, HttpGet, Prober};

use crate::Shared;
use crate::pool::Body;
use crate::wire::{empty, local_reply};

pub async fn run(shared: &Shared, prober: &Prober) -> Response<Body> {
    let limit = Duration::from_secs(prober.timeout_seconds.max(1).into());
    let check = async {
        if let Some(get) = &prober.http_get {
            http_get(shared, get).await
        } else if let Some(tcp) = &prober.tcp_socket {
            let addr = shared.cfg.app_addr(tcp.port);
            mesh_identity::grpc::dial(addr, shared.cfg.socket_mark)
                .await
                .map(drop)
                .map_err(|e| unavailable(format!("cannot connect to the app on {addr}: {e}")))
        } else if let Some(g) = &prober.grpc {
            grpc_health(shared, g).await
        } else {
            Err(unavailable("the probe names no check".into()))
        }
    };
    match tokio::time::timeout(limit, check).await {
        Ok(Ok(())) => local_reply(StatusCode::OK, "ok"),
        Ok(Err((status, why))) => local_reply(status, why),
        Err(_) => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the app did not answer within {}s", limit.as_secs()),
        ),
    }
}

type Failed = (StatusCode, String);

fn unavailable(why: String) -> Failed {
    (StatusCode::SERVICE_UNAVAILABLE, why)
}

/// kubelet's HTTP(S) GET: passes below 400. HTTPS takes any certificate.
async fn http_get(shared: &Shared, get: &HttpGet) -> Result<(), Failed> {
    let addr = shared.cfg.app_addr(get.port);
    let scheme = if get.https { "https" } else { "http" };
    let mut req = Request::get(format!("{scheme}://{addr}{}", get.path))
        .header(http::header::USER_AGENT, "kube-probe")
        // A new connection each time, as kubelet's: a pooled one
        // could outlive the app's listener.
        .header(http::header::CONNECTION, "close");
    if let Some(host) = &get.host {
        req = req.header(http::header::HOST, host);
    }
    for h in &get.http_headers {
        req = req.header(&h.name, &h.value);
    }
    let req = req
        .body(empty())
        .map_err(|e| unavailable(format!("the probe's request is not valid: {e}")))?;
    let answered = match get.https {
        false => shared
            .app_h1
            .request(req)
            .await
            .map(|r| r.status())
            .map_err(|e| e.to_string()),
        true => https_get(shared, addr, req).await,
    };
    match answered {
        Ok(status) if status.as_u16() < 400 => Ok(()),
        Ok(status) => Err((status, format!("the app answered {status}"))),
        Err(e) => Err(unavailable(format!("cannot reach the app on {addr}: {e}"))),
    }
}

async fn https_get(
    shared: &Shared,
    addr: std::net::SocketAddr,
    req: Request<Body>,
) -> Result<StatusCode, String> {
    let tcp = mesh_identity::grpc::dial(addr, shared.cfg.socket_mark)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(crate::origin::unverified_client())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status())
}

/// kubelet's gRPC probe: the app's `grpc.health.v1.Health/Check` must
/// answer SERVING.
async fn grpc_health(shared: &Shared, g: &Grpc) -> Result<(), Failed> {
    use tonic_health::pb::health_check_response::ServingStatus;
    let addr = shared.cfg.app_addr(g.port);
    let mark = shared.cfg.socket_mark;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unavailable(format!("the app's address {addr}: {e}")))?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
            mesh_identity::grpc::dial(addr, mark)
                .await
                .map(TokioIo::new)
        }))
        .await
        .map_err(|e| unavailable(format!("cannot reach the app on {addr}: {e}")))?;
    let request = tonic_health::pb::HealthCheckRequest {
        service: g.service.clone().unwrap_or_default(),
    };
    let answer = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(request)
        .await
        .map_err(|s| unavailable(format!("the app's health check failed: {}", s.message())))?;
    match answer.into_inner().status() {
        ServingStatus::Serving => Ok(()),
        other => Err(unavailable(format!(
            "the app's gRPC health is {}",
            other.as_str_name()
        ))),
    }
}
