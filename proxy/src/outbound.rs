//! Outbound: requests from the app (explicit HTTP proxy in local mode) are
//! routed by pilot's config and carried to the chosen endpoint's sidecar as
//! HTTP/2 over mutual TLS, checking that it presents the endpoint's identity.

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use crate::metrics::RequestLabels;
use crate::pool::Body;
use crate::state::{Cluster, Endpoint, Snapshot};
use crate::wire::{self, local_reply};
use crate::{OutboundPolicy, Shared};

/// Istio's response flags for what the proxy itself answered.
mod flags {
    pub const NO_ROUTE: &str = "NR";
    pub const NO_HEALTHY_UPSTREAM: &str = "UH";
    pub const UPSTREAM_FAILURE: &str = "UF";
    pub const NONE: &str = "-";
}

/// Why the proxy answered a request itself.
struct Refusal {
    status: StatusCode,
    flags: &'static str,
    message: String,
}

fn refuse(status: StatusCode, flags: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        flags,
        message,
    }
}

/// One connection from the app.
pub struct Conn {
    /// Where the app was connecting to, when interception redirected it here.
    pub original_dst: Option<std::net::SocketAddr>,
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let protocol = wire::protocol_label(&req);
    let snapshot = shared.snapshot.borrow().clone();
    let mut chosen = Chosen::Nothing;
    let result = forward(&shared, &snapshot, &conn, req, &mut chosen).await;
    let (resp, flags) = match result {
        Ok(resp) => (resp, flags::NONE),
        Err(r) => (local_reply(r.status, r.message), r.flags),
    };
    let code = resp.status().as_u16();
    let labels = |cluster: Option<&Cluster>, endpoint: Option<&Endpoint>| {
        let mut l = source_labels(&shared, &snapshot);
        l.request_protocol = protocol;
        l.response_code = code;
        l.response_flags = flags;
        if let Some(c) = cluster {
            c.labels(&mut l);
        }
        if let Some(e) = endpoint {
            e.labels(&mut l);
            if flags == flags::NONE {
                l.connection_security_policy = "mutual_tls";
            }
        }
        l
    };
    let family = &shared.metrics.requests;
    match &chosen {
        Chosen::Mesh(c, e) => e
            .series
            .inc((code, flags, protocol), family, || labels(Some(c), Some(e))),
        Chosen::Nothing => {
            family.get_or_create(&labels(None, None)).inc();
        }
        Chosen::Outside(name) => {
            let mut l = labels(None, None);
            l.destination_service = name.to_string();
            l.destination_service_name = name.to_string();
            family.get_or_create(&l).inc();
        }
    }
    Ok(resp)
}

fn source_labels(shared: &Shared, snapshot: &Snapshot) -> RequestLabels {
    let m = &snapshot.own.meta;
    RequestLabels {
        reporter: "source",
        source_workload: m.workload.clone(),
        source_workload_namespace: shared.cfg.identity.namespace.clone(),
        source_principal: shared.cfg.identity.to_string(),
        source_app: m.app.clone(),
        source_version: m.version.clone(),
        connection_security_policy: "unknown",
        ..Default::default()
    }
}

/// The request's authority: from an absolute-form target, else the Host header.
fn authority(req: &Request<Incoming>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(http::header::HOST)?.to_str().ok(),
    }
}

/// What a request was sent to, for its metrics.
enum Chosen {
    Nothing,
    Mesh(Arc<Cluster>, Arc<Endpoint>),
    /// Istio's names for outside the mesh: `PassthroughCluster`, `BlackHoleCluster`.
    Outside(&'static str),
}

async fn forward(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &Conn,
    req: Request<Incoming>,
    chosen: &mut Chosen,
) -> Result<Response<Body>, Refusal> {
    if let Some(dst) = conn.original_dst.filter(|d| shared.cfg.is_own_listener(*d)) {
        return Err(refuse(
            StatusCode::LOOP_DETECTED,
            flags::NONE,
            format!("{dst} is this sidecar's own listener: refusing to loop"),
        ));
    }
    // A Host without a port means the port the app connected to.
    let default_port = conn.original_dst.map_or(80, |d| d.port());
    let by_host = authority(&req).and_then(|a| snapshot.route_config(a, default_port));
    // Else the address the app dialled may be a service's VIP.
    let by_dst = || {
        let d = conn.original_dst?;
        snapshot.route_config(&d.ip().to_string(), d.port())
    };
    let Some(rc) = by_host.or_else(by_dst) else {
        return outside_the_mesh(shared, conn, req, chosen).await;
    };
    let authority_str = match authority(&req) {
        Some(a) => a.to_string(),
        None => conn.original_dst.map(|d| d.to_string()).unwrap_or_default(),
    };
    let authority_str = authority_str.as_str();
    let path = req.uri().path();
    let Some(route) = crate::route::select(rc, path, req.headers()) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            flags::NO_ROUTE,
            format!("no route of {} matches {path}", rc.name),
        ));
    };
    let Some(cluster) = crate::route::pick_cluster(route).and_then(|c| snapshot.clusters.get(c))
    else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY_UPSTREAM,
            format!("route {} has no known destination", route.name),
        ));
    };
    let Some(endpoint) = cluster.pick().cloned() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::NO_HEALTHY_UPSTREAM,
            format!("no endpoints for {}", cluster.config.name),
        ));
    };
    let authority: Authority = authority_str.parse().map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            flags::NONE,
            format!("bad host {authority_str:?}: {e}"),
        )
    })?;
    *chosen = Chosen::Mesh(cluster.clone(), endpoint.clone());
    let Some(tls) = shared.tls.borrow().clone() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::UPSTREAM_FAILURE,
            "proxy has no certificate yet".into(),
        ));
    };
    let upstream = upstream_request(req, authority, &endpoint, snapshot)
        .map_err(|m| refuse(StatusCode::BAD_REQUEST, flags::NONE, m))?;
    match shared
        .pool
        .send(&tls, endpoint.tunnel, &endpoint.identity, upstream)
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            parts.version = http::Version::HTTP_11;
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(e) => {
            tracing::warn!(endpoint = %endpoint.tunnel, error = %e, "upstream request failed");
            Err(refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                flags::UPSTREAM_FAILURE,
                format!("upstream connect error: {e}"),
            ))
        }
    }
}

/// A request for no mesh service: with an original destination (captured
/// traffic) it passes through to it under ALLOW_ANY and is refused under
/// REGISTRY_ONLY; without one (explicit proxy) there is nowhere to send it.
async fn outside_the_mesh(
    shared: &Shared,
    conn: &Conn,
    req: Request<Incoming>,
    chosen: &mut Chosen,
) -> Result<Response<Body>, Refusal> {
    let Some(dst) = conn.original_dst else {
        let what = authority(&req).unwrap_or("(no host)").to_string();
        return Err(refuse(
            StatusCode::NOT_FOUND,
            flags::NO_ROUTE,
            format!("no route to {what}: not a mesh service"),
        ));
    };
    if shared.cfg.outbound_policy == OutboundPolicy::RegistryOnly {
        *chosen = Chosen::Outside("BlackHoleCluster");
        return Err(refuse(
            StatusCode::BAD_GATEWAY,
            flags::NO_ROUTE,
            format!(
                "{dst} is outside the mesh and the outbound traffic policy is REGISTRY_ONLY (BlackHoleCluster)"
            ),
        ));
    }
    *chosen = Chosen::Outside("PassthroughCluster");
    let host = authority(&req).map_or_else(|| dst.to_string(), str::to_string);
    let (mut parts, body) = req.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Authority::try_from(dst.to_string()).ok();
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| {
        refuse(
            StatusCode::BAD_REQUEST,
            flags::NONE,
            format!("bad request target: {e}"),
        )
    })?;
    if parts.version != http::Version::HTTP_2 {
        wire::strip_hop_by_hop(&mut parts.headers);
    }
    parts.version = http::Version::HTTP_11;
    if let Ok(h) = http::HeaderValue::from_str(&host) {
        parts.headers.insert(http::header::HOST, h);
    }
    match shared
        .app_h1
        .request(Request::from_parts(parts, body.boxed()))
        .await
    {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            wire::strip_hop_by_hop(&mut parts.headers);
            Ok(Response::from_parts(parts, body.boxed()))
        }
        Err(e) => Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            flags::UPSTREAM_FAILURE,
            format!("passthrough to {dst} failed: {e}"),
        )),
    }
}

fn upstream_request(
    req: Request<Incoming>,
    authority: Authority,
    ep: &Endpoint,
    snapshot: &Snapshot,
) -> Result<Request<Body>, String> {
    let (mut parts, body) = req.into_parts();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| format!("bad request target: {e}"))?;
    if parts.version != http::Version::HTTP_2 {
        wire::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
    }
    parts.version = http::Version::HTTP_2;
    parts
        .headers
        .insert(wire::TARGET_PORT, ep.target_port.clone());
    if let Some(src) = &snapshot.own.source_header {
        parts.headers.insert(wire::SOURCE, src.clone());
    }
    Ok(Request::from_parts(parts, body.boxed()))
}
