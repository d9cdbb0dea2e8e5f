//! Inbound: accepts only mutual TLS from peers holding a mesh certificate,
//! and forwards each request to the app on the port it was meant for.

use std::sync::Arc;

use http::uri::Scheme;
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use mesh_identity::SpiffeId;

use crate::accesslog::{Arrival, Entry};
use crate::metrics::{Observation, Peers, RequestLabels, SeriesCache};
use crate::observe::{self, ReqBody};
use crate::pool::Body;
use crate::state::{InboundPort, Snapshot};
use crate::wire::{self, PeerMeta, local_reply};
use crate::{Shared, trace};

/// A connection's request series, by (source metadata, app port,
/// response code, protocol, gRPC status).
type SeriesKey = (Option<HeaderValue>, u32, u16, &'static str, Option<u32>);

/// One inbound connection: the peer it is from, what the app is told about
/// it, and the counters its requests have used.
pub struct Conn {
    /// The client's identity; `None` for plaintext from a client without a
    /// sidecar (accepted only where the workload's mode is not STRICT).
    pub peer: Option<SpiffeId>,
    /// Plaintext: the app port the client dialled (its original destination).
    plain_port: Option<u32>,
    /// The peer's SPIFFE ID without `spiffe://`, as policies name principals.
    principal: Option<String>,
    pub peer_addr: Option<std::net::SocketAddr>,
    xfcc: Option<HeaderValue>,
    /// The peer's address as `x-forwarded-for` gets it.
    xff: Option<HeaderValue>,
    /// The server name the peer sidecar asked for (`connection.sni`).
    pub sni: Option<Box<str>>,
    series: SeriesCache<SeriesKey>,
}

impl Conn {
    pub fn new(
        own: &SpiffeId,
        peer: SpiffeId,
        peer_addr: std::net::SocketAddr,
        sni: Option<&str>,
    ) -> Self {
        let principal = peer.to_string();
        Self {
            xfcc: format!("By={own};URI={peer}").parse().ok(),
            principal: Some(
                principal
                    .strip_prefix("spiffe://")
                    .unwrap_or(&principal)
                    .to_string(),
            ),
            peer: Some(peer),
            plain_port: None,
            peer_addr: Some(peer_addr),
            xff: client_address(peer_addr),
            sni: sni.map(Box::from),
            series: SeriesCache::default(),
        }
    }

    /// A plaintext connection to app port `port`.
    pub fn plaintext(port: u32, peer_addr: std::net::SocketAddr) -> Self {
        Self {
            peer: None,
            plain_port: Some(port),
            principal: None,
            peer_addr: Some(peer_addr),
            xff: client_address(peer_addr),
            xfcc: None,
            sni: None,
            series: SeriesCache::default(),
        }
    }

    /// What `x-forwarded-proto` says when no hop before set it.
    fn proto(&self) -> &'static str {
        if self.peer.is_some() { "https" } else { "http" }
    }

    /// What authorization knows of this connection, for a request to `port`.
    pub fn authz_request<'a>(
        &'a self,
        port: u32,
        http: Option<crate::authz::HttpParts<'a>>,
        auth: Option<&'a crate::jwt::Verified>,
    ) -> crate::authz::Request<'a> {
        crate::authz::Request {
            principal: self.principal.as_deref(),
            namespace: self.peer.as_ref().map(|p| p.namespace.as_str()),
            source_ip: self.peer_addr.map(|a| a.ip()),
            port,
            http,
            auth,
            sni: self.sni.as_deref(),
        }
    }

    /// Why `snapshot` refuses this connection because it is plaintext, if
    /// it does (the port's mTLS mode is now STRICT).
    pub fn plaintext_refused(&self, snapshot: &Snapshot) -> Option<String> {
        let port = self.plain_port?;
        (!snapshot.accepts_plaintext(port)).then(|| {
            format!("plaintext to port {port} refused: the workload's mTLS mode is now STRICT")
        })
    }

    /// Why `snapshot` allows nothing more on this connection, if so: its
    /// policies deny every request it could carry (see
    /// [`crate::authz::Policies::revokes`]), or it is plaintext to a port
    /// now STRICT.
    fn revoked_by(&self, snapshot: &Snapshot) -> Option<String> {
        if let Some(why) = self.plaintext_refused(snapshot) {
            return Some(why);
        }
        let conn = self.authz_request(self.plain_port.unwrap_or(0), None, None);
        snapshot
            .authz
            .revokes(&conn, self.plain_port)
            .map(|d| d.reason())
    }
}

fn client_address(addr: std::net::SocketAddr) -> Option<HeaderValue> {
    HeaderValue::from_str(&addr.ip().to_string()).ok()
}

/// Marks an upgrade request with [`wire::Upgrade`] (an extended CONNECT
/// becoming the app's `GET`); whether it is one.
fn mark_upgrade<B>(req: &mut Request<B>) -> bool {
    let upgrade = match req.method() == http::Method::CONNECT {
        true => wire::Upgrade::from_connect(req),
        false => wire::upgrade_asked(req.version(), req.headers()),
    };
    upgrade.map(|u| req.extensions_mut().insert(u)).is_some()
}

/// Resolves once a new config allows nothing more on `conn`; the
/// connection is then closed. Never resolves otherwise.
pub fn revoked(shared: &Shared, conn: Arc<Conn>) -> impl Future<Output = ()> + Send + 'static {
    let mut snapshots = shared.snapshot.clone();
    snapshots.borrow_and_update();
    async move {
        while snapshots.changed().await.is_ok() {
            let why = conn.revoked_by(&snapshots.borrow_and_update());
            if let Some(why) = why {
                tracing::warn!(peer = ?conn.peer_addr, "closing an open connection: {why}");
                return;
            }
        }
        std::future::pending().await
    }
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let (begun, mut req) = observe::Begun::new(req);
    // An upgrade (WebSocket and the like): from a peer sidecar as HTTP/2
    // extended CONNECT, from a client without one as HTTP/1.1's. It takes
    // the HTTP path (authorization sees the GET the app sent) and switches
    // once the app does.
    if !mark_upgrade(&mut req) && req.method() == http::Method::CONNECT {
        if conn.peer.is_none() {
            return Ok(local_reply(
                StatusCode::FORBIDDEN,
                "CONNECT is for sidecars over mutual TLS",
            ));
        }
        // Boxed: a rare path, kept out of every request's future.
        return Ok(Box::pin(crate::tcp::inbound(&shared, &conn, req)).await);
    }
    let mut protocol = wire::protocol_label(&req);
    let source = req.headers().get(wire::SOURCE).cloned();
    let snapshot = shared.snapshot.borrow().clone();
    let port = match conn.plain_port {
        Some(p) => Some(p),
        None => req
            .headers()
            .get(wire::TARGET_PORT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u32>().ok()),
    }
    .and_then(|p| snapshot.inbound.get(&p).cloned());
    let mut req = req;
    let (_, span) = snapshot.tracing.begin(
        &shared.tracer,
        trace::Side::Server,
        &mut req,
        conn.peer_addr,
    );
    // Kept only when an access log or a tap will want it.
    let wanted = snapshot.access_log.server.is_some() || shared.tap.active();
    let arrival = wanted.then(|| {
        let local = port
            .as_ref()
            .map(|p| std::net::SocketAddr::new(shared.cfg.pod_ip, p.port as u16));
        let mut a = Arrival::of(&req, conn.peer_addr, local);
        // As the app speaks it, not as the sidecars carried it.
        if conn.peer.is_some() && port.as_ref().is_some_and(|p| !p.h2) {
            a.protocol = "HTTP/1.1";
        }
        Box::new(a)
    });
    let mut details = "-";
    let mut upstream_time = None;
    // Sidecars speak HTTP/2 to each other whatever the app speaks: label
    // the protocol the app port talks, as the source's sidecar does.
    if let (Some(p), Some(_), "http2") = (&port, &conn.peer, protocol) {
        protocol = if p.h2 { "http2" } else { "http" };
    }
    let resp = match &port {
        None if snapshot.listener.is_none() => local_reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "sidecar has no inbound config yet",
        ),
        None => local_reply(
            StatusCode::NOT_FOUND,
            "request names no port this workload serves",
        ),
        Some(port) => {
            let mut req = req;
            match authenticate(&snapshot, &mut req) {
                Err(_) => {
                    details = "jwt_authn_access_denied";
                    jwt_refused()
                }
                Ok(auth) => match authorize(&snapshot, &conn, port.port, &req, auth.as_ref()) {
                    Some(denied) => {
                        details = "rbac_access_denied_matched_policy";
                        denied
                    }
                    None => {
                        let sent = std::time::Instant::now();
                        let (resp, answered) = forward(&shared, &conn, port, req).await;
                        if answered {
                            details = "via_upstream";
                            upstream_time = Some(sent.elapsed());
                        }
                        resp
                    }
                },
            }
        }
    };
    // A request body that broke on the way in is the caller's fault.
    let malformed = details != "via_upstream" && begun.request_failed();
    let resp = match malformed {
        true => local_reply(StatusCode::BAD_REQUEST, "malformed request body"),
        false => resp,
    };
    let code = resp.status().as_u16();
    // The app unreachable is the one failure the inbound side tells apart yet.
    let flags = match (malformed, code) {
        (true, _) => "DPE",
        (false, 503) => "UF",
        _ => "-",
    };
    let finish = move |done: observe::Done| {
        let o = Observation::from(&done);
        let key = (
            source.clone(),
            port.as_ref().map_or(0, |p| p.port),
            code,
            protocol,
            done.grpc_status,
        );
        let labels = || RequestLabels {
            peers: peers(&shared, &snapshot, &conn, source.as_ref(), port.as_deref()),
            request_protocol: protocol,
            response_code: code,
            grpc_response_status: done.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
            response_flags: flags,
        };
        if !snapshot.server_metrics_off {
            conn.series.observe(key, &shared.metrics, labels, &o);
        }
        if let Some(arrival) = &arrival {
            let entry = Entry {
                arrival,
                code,
                flags,
                details,
                grpc_status: done.grpc_status,
                bytes_received: done.request_body_bytes,
                bytes_sent: done.response_body_bytes,
                duration: done.duration,
                upstream_host: port
                    .as_ref()
                    .map(|p| shared.cfg.app_addr(p.port as u16).to_string()),
                upstream_cluster: port.as_ref().map(|p| format!("inbound|{}||", p.port)),
                source_principal: conn.peer.as_ref().map(ToString::to_string),
                destination_principal: Some(shared.cfg.identity.to_string()),
                mtls: conn.peer.is_some(),
                upstream_service_time: upstream_time,
                // Istio's inbound route has this one name.
                route_name: port.as_ref().map(|_| "default"),
                requested_server_name: conn.sni.as_deref(),
            };
            shared.report(snapshot.access_log.server.as_deref(), "inbound", &entry);
        }
        if span.is_some() {
            let cluster = port.as_ref().map(|p| format!("inbound|{}||", p.port));
            let service = port.as_ref().and_then(|p| {
                let peers = peers(&shared, &snapshot, &conn, source.as_ref(), Some(p));
                (peers.destination_service != "unknown")
                    .then(|| format!("{}:{}", peers.destination_service, p.port))
            });
            let ended = trace::Ended {
                code,
                flags,
                upstream_cluster: cluster.as_deref(),
                service,
                request_size: done.request_body_bytes,
                response_size: done.response_body_bytes,
            };
            shared.trace(&snapshot, span, &ended);
        }
    };
    Ok(begun.finish(resp, finish))
}

/// Istio's answer to a request its policies deny.
pub const RBAC_DENIED: &str = "RBAC: access denied";

/// Envoy's answer to a request whose JWT does not verify.
pub const JWT_REFUSED: &str = "Jwt verification fails";

/// RequestAuthentication: `Ok(Some(..))` for a request with a valid JWT,
/// `Ok(None)` without one, `Err(reason)` with an invalid one.
fn authenticate(
    snapshot: &crate::state::Snapshot,
    req: &mut Request<ReqBody>,
) -> Result<Option<crate::jwt::Verified>, String> {
    if snapshot.jwt.is_empty() {
        return Ok(None);
    }
    let uri = req.uri().clone();
    match snapshot.jwt.check(&uri, req.headers_mut()) {
        crate::jwt::Outcome::Absent => Ok(None),
        crate::jwt::Outcome::Valid(v) => Ok(Some(v)),
        crate::jwt::Outcome::Invalid(why) => {
            tracing::warn!(path = uri.path(), "JWT refused: {why}");
            Err(why)
        }
    }
}

/// The 401 for a refused token.
fn jwt_refused() -> Response<Body> {
    let mut resp = local_reply(StatusCode::UNAUTHORIZED, JWT_REFUSED);
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"mesh\", error=\"invalid_token\""),
    );
    resp
}

/// `Some(403)` if the workload's AuthorizationPolicies deny `req`.
fn authorize(
    snapshot: &crate::state::Snapshot,
    conn: &Conn,
    port: u32,
    req: &Request<ReqBody>,
    auth: Option<&crate::jwt::Verified>,
) -> Option<Response<Body>> {
    if snapshot.authz.is_empty() {
        return None;
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or_default()
        .to_ascii_lowercase();
    let parts = crate::authz::HttpParts {
        host: &host,
        method: req.method().as_str(),
        path: req.uri().path(),
        headers: req.headers(),
    };
    let decision = snapshot
        .authz
        .decide(&conn.authz_request(port, Some(parts), auth));
    if decision.allowed() {
        return None;
    }
    tracing::warn!(
        peer = conn.principal.as_deref().unwrap_or("(plaintext)"),
        method = %req.method(),
        path = req.uri().path(),
        port,
        "request {}",
        decision.reason()
    );
    Some(local_reply(StatusCode::FORBIDDEN, RBAC_DENIED))
}

/// Who a request or connection on `port` is from and to, as the
/// destination's sidecar reports it.
pub fn peers(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &Conn,
    source: Option<&HeaderValue>,
    port: Option<&InboundPort>,
) -> Peers {
    let mut p = Peers::new("destination");
    p.destination(&snapshot.own.meta, &shared.cfg.identity);
    if let Some(peer) = &conn.peer {
        p.source_principal = peer.to_string();
        p.source_workload_namespace.clone_from(&peer.namespace);
        p.connection_security_policy = "mutual_tls";
        // Only what the certificate vouches for is trusted: the namespace.
        if let Some(m) = source.and_then(|v| v.to_str().ok()).map(PeerMeta::decode)
            && m.namespace == peer.namespace
        {
            p.source(&m, peer);
        }
    } else {
        p.connection_security_policy = "none";
    }
    if let Some(port) = port {
        p.service(&port.service);
    }
    p
}

async fn forward(
    shared: &Shared,
    conn: &Conn,
    port: &InboundPort,
    req: Request<ReqBody>,
) -> (Response<Body>, bool) {
    let (mut parts, body) = req.into_parts();
    let upgrading = parts.extensions.get::<wire::Upgrade>().is_some();
    let original = parts.uri.authority().cloned();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    // Captured pods: the app on loopback, which the capture rules leave alone.
    uri.authority = Some(if shared.cfg.capture {
        port.app_loopback.clone()
    } else {
        port.app.clone()
    });
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = match Uri::from_parts(uri) {
        Ok(u) => u,
        Err(e) => {
            let reply = local_reply(StatusCode::BAD_REQUEST, format!("bad request target: {e}"));
            return (reply, false);
        }
    };
    if parts.version != http::Version::HTTP_2 {
        wire::strip_hop_by_hop(&mut parts.headers);
    }
    parts.headers.remove(wire::TARGET_PORT);
    parts.headers.remove(wire::SOURCE);
    if let Some(v) = &conn.xfcc {
        parts.headers.insert(wire::XFCC, v.clone());
    }
    wire::forwarded(&mut parts.headers, conn.xff.as_ref(), conn.proto());
    if !port.h2 || upgrading {
        // An upgrade's caller is told apart by its version (`switch_app`).
        if !upgrading {
            parts.version = http::Version::HTTP_11;
        }
        if let Some(host) = original.and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    let req = Request::from_parts(parts, body.boxed());
    if upgrading {
        // Boxed: rare, and kept out of every request's future.
        return Box::pin(switch_app(shared, port, req)).await;
    }
    let resp = if port.h2 {
        match shared.app_h2.request(req).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(e) => return (app_unreachable(port, &e), false),
        }
    } else {
        // Boxed: inline, its future (848 bytes in a test build) would be
        // copied with every request's.
        match Box::pin(shared.app.send(req)).await {
            Ok(resp) => resp.map(BodyExt::boxed),
            Err(e) => return (app_unreachable(port, &e), false),
        }
    };
    let (mut parts, body) = resp.into_parts();
    wire::strip_hop_by_hop(&mut parts.headers);
    // Callers are sidecars, over HTTP/2, but for plaintext ones.
    wire::unindexed_date(&mut parts.headers);
    (Response::from_parts(parts, body), true)
}

fn app_unreachable(port: &InboundPort, e: &dyn std::fmt::Display) -> Response<Body> {
    tracing::warn!(app = %port.app, error = %e, "app request failed");
    local_reply(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("app at {} unreachable: {e}", port.app),
    )
}

/// An upgrade the caller asked for, sent to the app as HTTP/1.1's; when
/// the app switches, the caller's side (a peer sidecar's HTTP/2 stream,
/// answered 200, or an HTTP/1.1 client, answered 101) is joined to it.
async fn switch_app(
    shared: &Shared,
    port: &InboundPort,
    mut req: Request<Body>,
) -> (Response<Body>, bool) {
    let Some(u) = req.extensions_mut().remove::<wire::Upgrade>() else {
        let reply = local_reply(StatusCode::INTERNAL_SERVER_ERROR, "not an upgrade");
        return (reply, false);
    };
    let caller = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>();
    let from_sidecar = req.version() == http::Version::HTTP_2;
    u.to_h1(&mut req);
    match shared.app_h1.request(req).await {
        Ok(mut resp) => {
            if let Some(caller) = caller
                && resp.status() == StatusCode::SWITCHING_PROTOCOLS
            {
                let app = hyper::upgrade::on(&mut resp);
                shared.drain.track(wire::splice_upgraded(caller, app));
                let answer = match from_sidecar {
                    true => wire::Upgrade::accepted(resp.headers()),
                    false => u.switched(resp.headers()),
                };
                return (answer, true);
            }
            let (mut parts, body) = resp.into_parts();
            wire::strip_hop_by_hop(&mut parts.headers);
            (Response::from_parts(parts, body.boxed()), true)
        }
        Err(e) => (app_unreachable(port, &e), false),
    }
}
