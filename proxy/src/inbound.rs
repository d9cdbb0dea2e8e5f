//! Inbound: accepts only mutual TLS from peers holding a mesh certificate,
//! and forwards each request to the app on the port it was meant for.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_identity::SpiffeId;
use mesh_proto::resources as pb;

use crate::Shared;
use crate::metrics::{RequestLabels, service_name_namespace};
use crate::pool::Body;
use crate::wire::{self, PeerMeta, local_reply};

pub async fn handle(
    shared: Arc<Shared>,
    peer: Arc<SpiffeId>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let mut labels = shared.destination_labels();
    labels.reporter = "destination";
    labels.connection_security_policy = "mutual_tls";
    labels.source_principal = peer.to_string();
    labels.request_protocol = if req.version() == http::Version::HTTP_2 {
        "http2"
    } else {
        "http"
    };
    if let Some(src) = req
        .headers()
        .get(wire::SOURCE)
        .and_then(|v| v.to_str().ok())
    {
        let m = PeerMeta::decode(src);
        // Only what the certificate vouches for is trusted: the namespace.
        if m.namespace == peer.namespace {
            labels.source_workload = m.workload;
            labels.source_app = m.app;
            labels.source_version = m.version;
        }
    }
    labels.source_workload_namespace = peer.namespace.clone();
    let resp = forward(&shared, &peer, req, &mut labels).await;
    labels.response_code = resp.status().as_u16();
    shared.metrics.requests.get_or_create(&labels).inc();
    Ok(resp)
}

async fn forward(
    shared: &Shared,
    peer: &SpiffeId,
    req: Request<Incoming>,
    labels: &mut RequestLabels,
) -> Response<Body> {
    let snapshot = shared.snapshot.borrow().clone();
    let Some(listener) = snapshot.listener.as_ref() else {
        return local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "sidecar has no inbound config yet",
        );
    };
    let port = req
        .headers()
        .get(wire::TARGET_PORT)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    let Some(port) = port.and_then(|p| listener.ports.iter().find(|ip| ip.port == p)) else {
        return local_reply(
            StatusCode::NOT_FOUND,
            "request names no port this workload serves",
        );
    };
    if let Some(svc) = port.services.first() {
        let (name, ns) = service_name_namespace(svc);
        labels.destination_service = svc.clone();
        labels.destination_service_name = name;
        labels.destination_service_namespace = ns;
    }
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_default();
    let app = SocketAddr::new(shared.cfg.pod_ip, port.port as u16);
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = match Uri::builder()
        .scheme("http")
        .authority(app.to_string())
        .path_and_query(path)
        .build()
    {
        Ok(u) => u,
        Err(e) => return local_reply(StatusCode::BAD_REQUEST, format!("bad request target: {e}")),
    };
    wire::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(wire::TARGET_PORT);
    parts.headers.remove(wire::SOURCE);
    if let Ok(v) = format!("By={};URI={peer}", shared.cfg.identity).parse() {
        parts.headers.insert(wire::XFCC, v);
    }
    let h2 = matches!(
        pb::Protocol::try_from(port.protocol),
        Ok(pb::Protocol::Http2 | pb::Protocol::Grpc)
    );
    let client = if h2 { &shared.app_h2 } else { &shared.app_h1 };
    if !h2 {
        parts.version = http::Version::HTTP_11;
        if let Ok(v) = authority.parse() {
            parts.headers.insert(http::header::HOST, v);
        }
    }
    match client
        .request(Request::from_parts(parts, body.boxed()))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            wire::strip_hop_by_hop(&mut parts.headers);
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            labels.response_flags = "UF";
            tracing::warn!(%app, error = %e, "app request failed");
            local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app at {app} unreachable: {e}"),
            )
        }
    }
}
