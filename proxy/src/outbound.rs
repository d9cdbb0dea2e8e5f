//! Outbound: requests from the app (explicit HTTP proxy in local mode) are
//! routed by pilot's config and carried to the chosen endpoint's sidecar as
//! HTTP/2 over mutual TLS, checking that it presents the endpoint's identity.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_proto::resources as pb;

use crate::Shared;
use crate::metrics::{RequestLabels, service_name_namespace};
use crate::pool::Body;
use crate::wire::{self, local_reply};

/// Istio's response flags for what the proxy itself answered.
mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_FAILURE: &str = "UF";
    pub const NONE: &str = "-";
}

pub async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let protocol = if req.version() == http::Version::HTTP_2 {
        "http2"
    } else {
        "http"
    };
    let (resp, labels) = forward(&shared, req).await;
    let mut labels = labels;
    labels.reporter = "source";
    labels.request_protocol = protocol;
    labels.response_code = resp.status().as_u16();
    shared.metrics.requests.get_or_create(&labels).inc();
    Ok(resp)
}

fn authority(req: &Request<Incoming>) -> Option<String> {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

async fn forward(shared: &Shared, req: Request<Incoming>) -> (Response<Body>, RequestLabels) {
    let mut labels = shared.source_labels();
    let fail = |labels: RequestLabels, status, flag, msg: String| {
        let mut l = labels;
        l.response_flags = flag;
        (local_reply(status, msg), l)
    };
    let Some(authority) = authority(&req) else {
        return fail(
            labels,
            StatusCode::BAD_REQUEST,
            flags::NO_ROUTE,
            "request names no host".into(),
        );
    };
    let snapshot = shared.snapshot.borrow().clone();
    let Some(rc) = snapshot.route_config(&authority, 80) else {
        return fail(
            labels,
            StatusCode::NOT_FOUND,
            flags::NO_ROUTE,
            format!("no route to {authority}: not a mesh service"),
        );
    };
    let path = req.uri().path();
    let Some(route) = crate::route::select(rc, path, req.headers()) else {
        return fail(
            labels,
            StatusCode::NOT_FOUND,
            flags::NO_ROUTE,
            format!("no route of {} matches {path}", rc.name),
        );
    };
    let Some(cluster) = crate::route::pick_cluster(route).and_then(|c| snapshot.clusters.get(c))
    else {
        return fail(
            labels,
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY_UPSTREAM,
            format!("route {} has no known destination", route.name),
        );
    };
    let host = &cluster.config.service;
    let (svc_name, svc_ns) = service_name_namespace(host);
    labels.destination_service = host.clone();
    labels.destination_service_name = svc_name;
    labels.destination_service_namespace = svc_ns;
    let Some(endpoint) = cluster.pick().cloned() else {
        return fail(
            labels,
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY_UPSTREAM,
            format!("no endpoints for {}", cluster.config.name),
        );
    };
    destination_labels(&mut labels, &endpoint);
    let Some(tls) = shared.tls.borrow().clone() else {
        return fail(
            labels,
            StatusCode::SERVICE_UNAVAILABLE,
            flags::UPSTREAM_FAILURE,
            "proxy has no certificate yet".into(),
        );
    };
    let (Ok(ip), Ok(expected)) = (endpoint.address.parse(), endpoint.identity.parse()) else {
        return fail(
            labels,
            StatusCode::SERVICE_UNAVAILABLE,
            flags::UPSTREAM_FAILURE,
            "endpoint is malformed".into(),
        );
    };
    let upstream = match build_upstream(req, &authority, &endpoint, &shared.source_meta()) {
        Ok(r) => r,
        Err(msg) => return fail(labels, StatusCode::BAD_REQUEST, flags::NONE, msg),
    };
    let addr = SocketAddr::new(ip, endpoint.tunnel_port as u16);
    match shared.pool.send(&tls, addr, &expected, upstream).await {
        Ok(resp) => {
            labels.connection_security_policy = "mutual_tls";
            let (mut parts, body) = resp.into_parts();
            parts.version = http::Version::HTTP_11;
            (Response::from_parts(parts, body.boxed()), labels)
        }
        Err(e) => {
            tracing::warn!(%authority, endpoint = %addr, error = %e, "upstream request failed");
            fail(
                labels,
                StatusCode::SERVICE_UNAVAILABLE,
                flags::UPSTREAM_FAILURE,
                format!("upstream connect error: {e}"),
            )
        }
    }
}

fn destination_labels(labels: &mut RequestLabels, ep: &pb::Endpoint) {
    labels.destination_workload = ep.workload.clone();
    labels.destination_workload_namespace = ep.namespace.clone();
    labels.destination_principal = ep.identity.clone();
    labels.destination_app = ep.labels.get("app").cloned().unwrap_or_default();
    labels.destination_version = ep.labels.get("version").cloned().unwrap_or_default();
}

fn build_upstream(
    req: Request<Incoming>,
    authority: &str,
    ep: &pb::Endpoint,
    source: &str,
) -> Result<Request<Body>, String> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    parts.uri = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(|e| format!("bad request target: {e}"))?;
    parts.version = http::Version::HTTP_2;
    wire::strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(http::header::HOST);
    parts.headers.insert(wire::TARGET_PORT, ep.port.into());
    parts.headers.insert(
        wire::SOURCE,
        source
            .parse()
            .map_err(|_| "bad source metadata".to_string())?,
    );
    Ok(Request::from_parts(parts, body.boxed()))
}
