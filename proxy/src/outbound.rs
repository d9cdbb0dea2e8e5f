//! Outbound: requests from the app (explicit HTTP proxy in local mode) are
//! routed by pilot's config and carried to the chosen endpoint's sidecar as
//! HTTP/2 over mutual TLS, checking that it presents the endpoint's identity
//! (or, as the cluster's DestinationRule tls and the endpoint say, plaintext
//! or TLS originated here: `origin.rs`).

use std::sync::Arc;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use std::sync::atomic::Ordering;

use crate::accesslog::{Arrival, Entry};
use crate::balance::{HashKey, Outcome};
use crate::flags::Flags;
use crate::metrics::{Observation, Peers, RequestLabels};
use crate::observe::{self, ReqBody};
use crate::origin::{self, Via};
use crate::pool::{Body, PoolError};
use crate::replay::Replay;
use crate::route::{self, Action, Failure, RequestView};
use crate::state::{Cluster, Endpoint, Snapshot};
use crate::wire::{self, local_reply};
use crate::{OutboundPolicy, Shared, trace};

/// Why the proxy answered a request itself.
struct Refusal {
    status: StatusCode,
    flags: Flags,
    message: String,
}

fn refuse(status: StatusCode, flags: Flags, message: String) -> Refusal {
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
    /// The app's address (its IP is what consistent hashing on the source IP hashes).
    pub peer: std::net::SocketAddr,
}

pub async fn handle(
    shared: Arc<Shared>,
    conn: Arc<Conn>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::convert::Infallible> {
    let protocol = wire::protocol_label(&req);
    let caller_h2 = req.version() == http::Version::HTTP_2;
    let (begun, mut req) = observe::Begun::new(req);
    if req.method() == http::Method::CONNECT {
        // Boxed: a rare path, kept out of every request's future.
        return Ok(Box::pin(crate::tcp::tunnel(shared, req)).await);
    }
    let snapshot = shared.snapshot.borrow().clone();
    let (context, span) = snapshot.tracing.begin(
        &shared.tracer,
        trace::Side::Client,
        &mut req,
        Some(conn.peer),
    );
    // Kept only when an access log or a tap will want it.
    let arrival = (snapshot.access_log.client.is_some() || shared.tap.active())
        .then(|| Box::new(Arrival::of(&req, Some(conn.peer), conn.original_dst)));
    let mut chosen = Chosen::Nothing;
    let mut flags = Flags::NONE;
    let mut served = Served::default();
    let result = forward(
        &shared,
        &snapshot,
        &conn,
        req,
        &context,
        &mut chosen,
        &mut flags,
        &mut served,
    )
    .await;
    let mut resp = match result {
        Ok(resp) => resp,
        // The request never went whole: the client's fault, not the
        // upstream's (Envoy's DPE).
        Err(_) if begun.request_failed() => {
            flags |= Flags::DPE;
            local_reply(StatusCode::BAD_REQUEST, "malformed request body")
        }
        Err(r) => {
            flags |= r.flags;
            local_reply(r.status, r.message)
        }
    };
    if caller_h2 {
        wire::unindexed_date(resp.headers_mut());
    }
    let code = resp.status().as_u16();
    let flags = flags.as_str();
    let finish = move |done: observe::Done| {
        let o = Observation::from(&done);
        let labels = || {
            let mut peers = Peers::new("source");
            peers.source(&snapshot.own.meta, &shared.cfg.identity);
            match &chosen {
                Chosen::Nothing => {}
                Chosen::Cluster(c) => c.labels(&mut peers),
                Chosen::Mesh(c, e) => {
                    c.labels(&mut peers);
                    e.labels(&mut peers);
                    if c.transport.is_mesh(e) {
                        peers.connection_security_policy = "mutual_tls";
                    }
                }
                Chosen::Outside(name) => {
                    peers.destination_service = name.to_string();
                    peers.destination_service_name = name.to_string();
                }
            }
            RequestLabels {
                peers,
                request_protocol: protocol,
                response_code: code,
                grpc_response_status: done.grpc_status.map(|s| s.to_string()).unwrap_or_default(),
                response_flags: flags,
            }
        };
        let metrics = &shared.metrics;
        match &chosen {
            _ if snapshot.client_metrics_off => {}
            Chosen::Mesh(_, e) => e.series.observe(
                (code, flags, protocol, done.grpc_status),
                metrics,
                labels,
                &o,
            ),
            _ => metrics.observe(&labels(), &o),
        }
        if let Some(arrival) = &arrival {
            let (upstream_host, upstream_cluster, destination_principal) = match &chosen {
                Chosen::Mesh(c, e) => (
                    Some(format!("{}:{}", e.pb.address, e.pb.port)),
                    Some(c.config.name.clone()),
                    e.identity.as_ref().map(ToString::to_string),
                ),
                Chosen::Cluster(c) => (None, Some(c.config.name.clone()), None),
                Chosen::Outside(name) => (
                    conn.original_dst.map(|d| d.to_string()),
                    Some(name.to_string()),
                    None,
                ),
                Chosen::Nothing => (None, None, None),
            };
            let answered = flags == "-" && upstream_host.is_some();
            let entry = Entry {
                arrival,
                code,
                flags,
                details: if answered { "via_upstream" } else { "-" },
                grpc_status: done.grpc_status,
                bytes_received: done.request_body_bytes,
                bytes_sent: done.response_body_bytes,
                duration: done.duration,
                upstream_host,
                upstream_cluster,
                source_principal: Some(shared.cfg.identity.to_string()),
                destination_principal,
                mtls: matches!(&chosen, Chosen::Mesh(c, e) if c.transport.is_mesh(e)),
                upstream_service_time: served.upstream_time,
                route_name: match &chosen {
                    Chosen::Outside(PASSTHROUGH) => Some("allow_any"),
                    Chosen::Outside(_) => Some("block_all"),
                    _ => served.route.as_deref(),
                },
                // The app's own connection is plaintext.
                requested_server_name: None,
            };
            shared.report(snapshot.access_log.client.as_deref(), "outbound", &entry);
        }
        if span.is_some() {
            let (upstream_cluster, service) = match &chosen {
                Chosen::Mesh(c, _) | Chosen::Cluster(c) => (
                    Some(c.config.name.as_str()),
                    Some(format!("{}:{}", c.config.service, c.config.port)),
                ),
                Chosen::Outside(name) => (Some(*name), None),
                Chosen::Nothing => (None, None),
            };
            let ended = trace::Ended {
                code,
                flags,
                upstream_cluster,
                service,
                request_size: done.request_body_bytes,
                response_size: done.response_body_bytes,
            };
            shared.trace(&snapshot, span, &ended);
        }
    };
    Ok(begun.finish(resp, finish))
}

/// The request's authority: from an absolute-form target, else the Host header.
fn authority(req: &Request<ReqBody>) -> Option<&str> {
    match req.uri().authority() {
        Some(a) => Some(a.as_str()),
        None => req.headers().get(http::header::HOST)?.to_str().ok(),
    }
}

/// The authority a routed request names: its target's, else its Host, else
/// the address the app dialled.
fn named_authority(
    parts: &http::request::Parts,
    dialled: Option<std::net::SocketAddr>,
) -> Result<Authority, String> {
    if let Some(a) = parts.uri.authority() {
        return Ok(a.clone());
    }
    match (parts.headers.get(http::header::HOST), dialled) {
        (Some(h), _) => {
            Authority::try_from(h.as_bytes()).map_err(|e| format!("bad host {h:?}: {e}"))
        }
        (None, Some(d)) => {
            Authority::try_from(d.to_string()).map_err(|e| format!("bad host {d}: {e}"))
        }
        (None, None) => Err("request names no host".into()),
    }
}

/// Istio's cluster names for outside the mesh.
const PASSTHROUGH: &str = "PassthroughCluster";
const BLACKHOLE: &str = "BlackHoleCluster";

/// What became of a request on its way, for its access log.
#[derive(Default)]
struct Served {
    /// The route that took it.
    route: Option<Arc<str>>,
    /// From sending it upstream to the answer's headers, retries included.
    upstream_time: Option<std::time::Duration>,
}

/// What a request was sent to, for its metrics.
enum Chosen {
    Nothing,
    /// A destination service, before (or without) an endpoint.
    Cluster(Arc<Cluster>),
    Mesh(Arc<Cluster>, Arc<Endpoint>),
    /// Istio's names for outside the mesh: `PassthroughCluster`, `BlackHoleCluster`.
    Outside(&'static str),
}

#[allow(clippy::too_many_arguments)] // the request's own state, and three out-parameters
async fn forward(
    shared: &Arc<Shared>,
    snapshot: &Snapshot,
    conn: &Conn,
    req: Request<ReqBody>,
    context: &trace::Context,
    chosen: &mut Chosen,
    flags: &mut Flags,
    served: &mut Served,
) -> Result<Response<Body>, Refusal> {
    if let Some(dst) = conn.original_dst.filter(|d| shared.cfg.is_own_listener(*d)) {
        return Err(refuse(
            StatusCode::LOOP_DETECTED,
            Flags::NONE,
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
        // Boxed: keeps the mesh path's future small.
        return Box::pin(outside_the_mesh(
            shared, snapshot, conn, req, context, chosen,
        ))
        .await;
    };
    let (mut parts, body) = req.into_parts();
    let named = named_authority(&parts, conn.original_dst)
        .map_err(|m| refuse(StatusCode::BAD_REQUEST, Flags::NONE, m))?;
    let authority_str = named.as_str();
    // Asked before `prepare` drops the hop-by-hop headers that ask it.
    let upgrade = wire::upgrade_asked(parts.version, &parts.headers);
    let view = RequestView {
        path: parts.uri.path(),
        query: parts.uri.query(),
        method: parts.method.as_str(),
        scheme: parts.uri.scheme_str().unwrap_or("http"),
        authority: authority_str,
        headers: &parts.headers,
        port: rc.config.port,
    };
    let Some((route, matched)) = rc.select(&view) else {
        return Err(refuse(
            StatusCode::NOT_FOUND,
            Flags::NR,
            format!("no route of {} matches {}", rc.config.name, view.path),
        ));
    };
    served.route = Some(route.name.clone());
    let origin = route
        .cors
        .as_ref()
        .and_then(|c| Some((c, parts.headers.get(http::header::ORIGIN)?.clone())))
        .filter(|(c, o)| o.to_str().is_ok_and(|o| c.allows(o)));
    if let Some((cors, origin)) = &origin
        && parts.method == http::Method::OPTIONS
        && parts
            .headers
            .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD)
    {
        return Ok(crate::http_extra::cors_preflight(cors, origin));
    }
    let new_path = route.rewritten_path(matched, parts.uri.path(), parts.uri.query());
    match &route.action {
        Action::Forward => {}
        Action::Redirect(rd) => {
            let path = new_path
                .as_deref()
                .unwrap_or_else(|| parts.uri.path_and_query().map_or("/", |p| p.as_str()));
            return Ok(crate::http_extra::redirect(rd, authority_str, path));
        }
        Action::Direct(status, body) => {
            let mut resp = Response::new(wire::full(body.clone()));
            *resp.status_mut() = *status;
            route.response_headers.apply(resp.headers_mut());
            return Ok(resp);
        }
    }
    if let Some(fault) = &route.fault {
        if let Some((delay, pct)) = fault.delay
            && route::roll(pct)
        {
            *flags |= Flags::DI;
            Box::pin(tokio::time::sleep(delay)).await;
        }
        if let Some(abort) = &fault.abort
            && route::roll(abort.percentage)
        {
            *flags |= Flags::FI;
            return Ok(match abort.grpc {
                Some(code) => wire::grpc_reply(code, "fault filter abort"),
                None => local_reply(abort.status, "fault filter abort"),
            });
        }
    }
    let Some(dest) = route.pick() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            Flags::NR,
            format!("route {} has no destination", route.name),
        ));
    };
    let Some(cluster) = snapshot.clusters.get(&dest.cluster) else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            Flags::NR,
            format!(
                "route {} names cluster {}, which this proxy does not have",
                route.name, dest.cluster
            ),
        ));
    };
    *chosen = Chosen::Cluster(cluster.clone());
    let Some(tls) = shared.tls.borrow().clone() else {
        return Err(refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            Flags::UF,
            "proxy has no certificate yet".into(),
        ));
    };
    // The request as every attempt sends it.
    let host = match route.rewrite.as_ref().and_then(|r| r.authority.clone()) {
        Some(a) => a,
        None => named.clone(),
    };
    prepare(&mut parts, host, new_path.as_deref(), snapshot)
        .map_err(|m| refuse(StatusCode::BAD_REQUEST, Flags::NONE, m))?;
    route.request_headers.apply(&mut parts.headers);
    dest.request_headers.apply(&mut parts.headers);
    // The app's side of a switch it asked for; each attempt's transport
    // puts the upgrade in its own form (`send_to`).
    let downstream = upgrade.as_ref().and_then(|u| {
        parts.extensions.insert(u.clone());
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    });

    let (hash, set_cookie) = match cluster.balancer.hash_key() {
        Some(k) => hash_of(k, &parts, conn),
        None => (None, None),
    };
    let attempts = Attempts {
        shared,
        tls: &tls,
        cluster,
        retry: route.retry.as_ref(),
        deadline: route.timeout.map(|t| tokio::time::Instant::now() + t),
        hash,
        original_dst: conn.original_dst,
        context,
    };
    let (replay, body) = if http_body::Body::is_end_stream(&body) {
        // Nothing to keep: every attempt (and mirror) sends an empty body.
        (None, Sent::Empty)
    } else if route.retry.is_some() || !route.mirrors.is_empty() {
        let r = Replay::new(body, shared.cfg.retry_buffer_bytes);
        (Some(r.clone()), Sent::Replay(r))
    } else {
        (None, Sent::Once(Some(body)))
    };
    for m in route.mirrors.iter().filter(|_| upgrade.is_none()) {
        if route::roll(m.percentage)
            && let Some(c) = snapshot.clusters.get(&m.cluster)
            && (replay.is_some() || matches!(body, Sent::Empty))
        {
            mirror(shared, &tls, c.clone(), &parts, replay.clone(), context);
        }
    }
    // Boxed: the attempts' future (sends, timeouts) is allocated once in
    // place rather than growing every request's future.
    let sent = std::time::Instant::now();
    let mut resp = Box::pin(attempts.run(parts, body, chosen, flags)).await?;
    served.upstream_time = Some(sent.elapsed());
    if let (Some(u), Some(down)) = (&upgrade, downstream)
        && matches!(
            resp.status(),
            StatusCode::OK | StatusCode::SWITCHING_PROTOCOLS
        )
        && resp
            .extensions()
            .get::<hyper::upgrade::OnUpgrade>()
            .is_some()
    {
        // The far side switched: the app hears its 101 and the two
        // connections are joined.
        let up = hyper::upgrade::on(&mut resp);
        shared.drain.track(wire::splice_upgraded(down, up));
        resp = u.switched(resp.headers());
    }
    route.response_headers.apply(resp.headers_mut());
    dest.response_headers.apply(resp.headers_mut());
    if let Some(c) = set_cookie {
        resp.headers_mut().append(http::header::SET_COOKIE, c);
    }
    if let Some((cors, origin)) = origin {
        crate::http_extra::cors_response(cors, origin, resp.headers_mut());
    }
    Ok(resp)
}

/// The body each attempt sends.
enum Sent {
    Empty,
    Once(Option<ReqBody>),
    Replay(Replay),
}

impl Sent {
    fn next(&mut self) -> Option<Body> {
        match self {
            Sent::Empty => Some(wire::empty()),
            Sent::Once(b) => b.take().map(|b| b.boxed()),
            Sent::Replay(r) => r.can_replay().then(|| r.body().boxed()),
        }
    }
}

/// A request's attempts at one destination, under its retry policy, the
/// route's timeout and the destination's retry budget.
struct Attempts<'a> {
    shared: &'a Shared,
    tls: &'a crate::identity::Tls,
    cluster: &'a Arc<Cluster>,
    retry: Option<&'a route::Retry>,
    deadline: Option<tokio::time::Instant>,
    /// The request's consistent-hash key.
    hash: Option<u64>,
    /// Where the app was connecting to (PASSTHROUGH balancing).
    original_dst: Option<std::net::SocketAddr>,
    context: &'a trace::Context,
}

/// One attempt's result.
enum Tried {
    Answered(Response<Body>),
    Failed(Failure, String),
}

impl Attempts<'_> {
    async fn run(
        &self,
        parts: http::request::Parts,
        mut body: Sent,
        chosen: &mut Chosen,
        flags: &mut Flags,
    ) -> Result<Response<Body>, Refusal> {
        let max = self.retry.map_or(0, |r| r.attempts);
        let permit = match &self.cluster.balancer.breaker {
            None => None,
            Some(b) => match b.acquire().await {
                Some(p) => Some(p),
                None => {
                    return Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Flags::UO,
                        "upstream connect error or disconnect/reset before headers. reset reason: overflow".into(),
                    ));
                }
            },
        };
        self.cluster.budget.deposit();
        let mut attempt = 0;
        // The cluster's slot (maxRetries) for the retry in flight, held
        // until the next attempt ends.
        let mut _retrying = None;
        loop {
            let dialled = self
                .cluster
                .balancer
                .passthrough(&self.cluster.endpoints, self.original_dst);
            let Some(endpoint) = dialled.or_else(|| self.cluster.pick(self.hash)).cloned() else {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flags::UH,
                    format!("no healthy endpoints for {}", self.cluster.config.name),
                ));
            };
            *chosen = Chosen::Mesh(self.cluster.clone(), endpoint.clone());
            let Some(b) = body.next() else {
                return Err(refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    Flags::URX,
                    "request body too large to retry".into(),
                ));
            };
            let mut p = parts.clone();
            p.headers
                .insert(wire::TARGET_PORT, endpoint.target_port.clone());
            let req = Request::from_parts(p, b);
            let tried = self.attempt(&endpoint, req).await;
            let timed_out_overall = self
                .deadline
                .is_some_and(|d| tokio::time::Instant::now() >= d);
            let failure = match &tried {
                Tried::Answered(resp) => Failure::Status(resp.status().as_u16(), grpc_status(resp)),
                Tried::Failed(f, _) => *f,
            };
            let outcome = match failure {
                Failure::Status(502..=504, _) => Outcome::GatewayError,
                Failure::Status(code, _) if code >= 500 => Outcome::ServerError,
                Failure::Status(..) => Outcome::Success,
                _ => Outcome::GatewayError,
            };
            self.cluster
                .balancer
                .record(&self.cluster.endpoints, &endpoint, outcome);
            let retriable = self.retry.is_some_and(|r| r.retries(failure));
            let wanted = retriable
                && !timed_out_overall
                && attempt < max
                && match &body {
                    Sent::Empty => true,
                    Sent::Replay(r) => r.can_replay(),
                    Sent::Once(_) => false,
                };
            let slot = wanted.then(|| self.cluster.balancer.retry_slot()).flatten();
            if wanted && slot.is_none() {
                self.shared.metrics.retries_overflow.inc();
            }
            let had_slot = slot.is_some();
            let again = had_slot && self.cluster.budget.withdraw(&self.shared.cfg.retry_budget);
            if again {
                _retrying = slot;
            }
            if again {
                if let Tried::Failed(_, e) = &tried {
                    tracing::debug!(endpoint = %endpoint.tunnel, error = %e, attempt, "retrying");
                }
                self.shared.metrics.retries.inc();
                attempt += 1;
                continue;
            }
            if retriable && attempt >= max && max > 0 {
                *flags |= Flags::URX;
            }
            if had_slot {
                self.shared.metrics.retries_over_budget.inc();
            }
            return match tried {
                Tried::Answered(resp) => Ok(match permit {
                    // The slot is held until the answer has been read.
                    Some(p) => {
                        let (parts, body) = resp.into_parts();
                        Response::from_parts(parts, crate::balance::Held::new(body, p).boxed())
                    }
                    None => resp,
                }),
                Tried::Failed(Failure::Timeout, _) => Err(refuse(
                    StatusCode::GATEWAY_TIMEOUT,
                    Flags::UT,
                    "upstream request timeout".into(),
                )),
                Tried::Failed(Failure::Reset, e) => {
                    tracing::warn!(endpoint = %endpoint.tunnel, error = %e, "upstream request failed");
                    Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Flags::UC,
                        format!("upstream connect error or disconnect/reset before headers: {e}"),
                    ))
                }
                Tried::Failed(_, e) => {
                    tracing::warn!(endpoint = %endpoint.tunnel, error = %e, "upstream request failed");
                    Err(refuse(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Flags::UF,
                        format!("upstream connect error: {e}"),
                    ))
                }
            };
        }
    }

    async fn attempt(&self, endpoint: &Endpoint, req: Request<Body>) -> Tried {
        let started = self
            .cluster
            .balancer
            .wants_latency()
            .then(std::time::Instant::now);
        endpoint.stats.active.fetch_add(1, Ordering::Relaxed);
        let _done = scopeguard(|| {
            endpoint.stats.active.fetch_sub(1, Ordering::Relaxed);
        });
        let send = send_to(
            self.shared,
            self.tls,
            self.cluster,
            endpoint,
            req,
            self.context,
        );
        let per_try = self
            .retry
            .and_then(|r| r.per_try_timeout)
            .map(|t| tokio::time::Instant::now() + t);
        let limit = match (per_try, self.deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let result = match limit {
            Some(at) => match tokio::time::timeout_at(at, send).await {
                Ok(r) => r,
                Err(_) => return Tried::Failed(Failure::Timeout, "timed out".into()),
            },
            None => send.await,
        };
        if let Some(t) = started {
            endpoint.stats.observe_latency(t.elapsed());
        }
        match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                parts.version = http::Version::HTTP_11;
                Tried::Answered(Response::from_parts(parts, body.boxed()))
            }
            Err(e) => Tried::Failed(classify(&e), e.to_string()),
        }
    }
}

/// Runs `f` when dropped (also when the future holding it is).
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

/// The consistent-hash key of a request, and the cookie to set when the
/// key is a cookie the request did not carry.
fn hash_of(
    key: &HashKey,
    parts: &http::request::Parts,
    conn: &Conn,
) -> (Option<u64>, Option<http::HeaderValue>) {
    use crate::balance::hash;
    match key {
        HashKey::Header(name) => (parts.headers.get(name).map(|v| hash(v.as_bytes())), None),
        HashKey::SourceIp => (Some(hash(conn.peer.ip().to_string().as_bytes())), None),
        HashKey::Query(name) => (
            wire::query_param(parts.uri.query(), name).map(|v| hash(v.as_bytes())),
            None,
        ),
        HashKey::Cookie { name, path, ttl } => {
            let found = parts
                .headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .find_map(|c| {
                    let (k, v) = c.trim().split_once('=')?;
                    (k == name).then(|| v.to_string())
                });
            match found {
                Some(v) => (Some(hash(v.as_bytes())), None),
                None => {
                    // Like Envoy: a new cookie, so this client sticks from now on.
                    let value = format!("{:016x}", rand::random::<u64>());
                    let mut cookie = format!("{name}={value}");
                    if !path.is_empty() {
                        cookie.push_str(&format!("; Path={path}"));
                    }
                    if !ttl.is_zero() {
                        cookie.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
                    }
                    cookie.push_str("; HttpOnly");
                    (
                        Some(hash(value.as_bytes())),
                        http::HeaderValue::from_str(&cookie).ok(),
                    )
                }
            }
        }
    }
}

/// A gRPC status in the response headers (a trailers-only answer).
fn grpc_status<B>(resp: &Response<B>) -> Option<u8> {
    resp.headers()
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn classify(e: &crate::pool::PoolError) -> Failure {
    use std::error::Error;
    if e.is_connect() {
        return Failure::Connect;
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return Failure::Refused;
        }
        source = s.source();
    }
    Failure::Reset
}

/// Sends one request to `endpoint` the way `cluster` speaks to its
/// endpoints: mutual TLS to its sidecar, plaintext, or TLS originated here.
/// A sidecar reads the trace context from `traceparent`; a destination
/// without one also gets B3's headers.
async fn send_to(
    shared: &Shared,
    tls: &crate::identity::Tls,
    cluster: &Cluster,
    endpoint: &Endpoint,
    mut req: Request<Body>,
    context: &trace::Context,
) -> Result<Response<Incoming>, PoolError> {
    let h2 = crate::state::speaks_h2(cluster.config.protocol);
    let upgrade = req.extensions_mut().remove::<wire::Upgrade>();
    let via = cluster.transport.via(endpoint);
    if let Some(u) = upgrade {
        match via {
            Via::Sidecar(_) => u.to_connect(&mut req),
            _ => u.to_h1(&mut req),
        }
    }
    if !matches!(via, Via::Sidecar(_)) {
        context.write_b3(req.headers_mut());
    }
    let direct = |error| PoolError::Direct {
        addr: endpoint.tunnel,
        error,
    };
    match via {
        Via::Sidecar(id) => {
            shared
                .pool
                .send(tls, endpoint.tunnel, id, &cluster.sni, &cluster.conns, req)
                .await
        }
        // Boxed: paths off the mesh stay out of the size of every
        // request's future, as the pool's connect does.
        Via::Plain => {
            let client = cluster.direct.client(shared, h2);
            Box::pin(origin::send(client, Scheme::HTTP, endpoint.tunnel, h2, req))
                .await
                .map_err(direct)
        }
        Via::Tls(o) => Box::pin(origin::send(
            o.client(shared.cfg.socket_mark),
            Scheme::HTTPS,
            endpoint.tunnel,
            h2,
            req,
        ))
        .await
        .map_err(direct),
        Via::Refused(why) => Err(PoolError::Refused(endpoint.tunnel, why)),
    }
}

/// Sends a copy of the request to a mirror cluster once the body is whole,
/// and forgets it: the answer is dropped and nothing waits for it.
fn mirror(
    shared: &Arc<Shared>,
    tls: &Arc<crate::identity::Tls>,
    cluster: Arc<Cluster>,
    parts: &http::request::Parts,
    body: Option<Replay>,
    context: &trace::Context,
) {
    let Some(endpoint) = cluster.pick(None).cloned() else {
        return;
    };
    let mut parts = parts.clone();
    // Envoy's convention: the mirror sees the host with "-shadow".
    if let Some(a) = parts.uri.authority() {
        let (host, port) = crate::state::split_authority(a.as_str());
        let shadow = match port {
            Some(p) => format!("{host}-shadow:{p}"),
            None => format!("{host}-shadow"),
        };
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = shadow.parse().ok();
        parts.uri = Uri::from_parts(uri).unwrap_or_default();
    }
    parts
        .headers
        .insert(wire::TARGET_PORT, endpoint.target_port.clone());
    let shared = shared.clone();
    let tls = tls.clone();
    let context = *context;
    tokio::spawn(async move {
        let send = async {
            let body = match body {
                None => wire::empty(),
                Some(b) if b.whole().await => b.body().boxed(),
                Some(_) => return,
            };
            let req = Request::from_parts(parts, body);
            let sent = send_to(&shared, &tls, &cluster, &endpoint, req, &context);
            if let Ok(resp) = sent.await {
                let _ = resp.into_body().collect().await;
            }
        };
        let _ = tokio::time::timeout(MIRROR_TIMEOUT, send).await;
    });
}

/// How long a mirrored request may take before it is dropped.
const MIRROR_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// A request for no mesh service: with an original destination (captured
/// traffic) it passes through to it under ALLOW_ANY and is refused under
/// REGISTRY_ONLY (pilot's word for this workload, else the proxy's flag);
/// without one (explicit proxy) there is nowhere to send it.
async fn outside_the_mesh(
    shared: &Shared,
    snapshot: &Snapshot,
    conn: &Conn,
    req: Request<ReqBody>,
    context: &trace::Context,
    chosen: &mut Chosen,
) -> Result<Response<Body>, Refusal> {
    let Some(dst) = conn.original_dst else {
        let what = authority(&req).unwrap_or("(no host)").to_string();
        return Err(refuse(
            StatusCode::NOT_FOUND,
            Flags::NR,
            format!("no route to {what}: not a mesh service"),
        ));
    };
    if snapshot.outbound_policy(shared.cfg.outbound_policy) == OutboundPolicy::RegistryOnly {
        *chosen = Chosen::Outside(BLACKHOLE);
        return Err(refuse(
            StatusCode::BAD_GATEWAY,
            Flags::NR,
            format!(
                "{dst} is outside the mesh and the outbound traffic policy is REGISTRY_ONLY (BlackHoleCluster)"
            ),
        ));
    }
    *chosen = Chosen::Outside(PASSTHROUGH);
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
            Flags::NONE,
            format!("bad request target: {e}"),
        )
    })?;
    if parts.version != http::Version::HTTP_2 {
        wire::strip_hop_by_hop(&mut parts.headers);
    }
    parts.version = http::Version::HTTP_11;
    wire::forwarded(&mut parts.headers, None, "http");
    context.write_b3(&mut parts.headers);
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
            Flags::UF,
            format!("passthrough to {dst} failed: {e}"),
        )),
    }
}

/// Turns the app's request into the one sent to the peer sidecar:
/// absolute URI with the (possibly rewritten) authority and path, HTTP/2,
/// no hop-by-hop headers, and the mesh's own headers.
fn prepare(
    parts: &mut http::request::Parts,
    authority: Authority,
    new_path: Option<&str>,
    snapshot: &Snapshot,
) -> Result<(), String> {
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(Scheme::HTTP);
    uri.authority = Some(authority);
    if let Some(p) = new_path {
        uri.path_and_query = Some(
            p.parse()
                .map_err(|e| format!("rewritten path {p:?}: {e}"))?,
        );
    }
    if uri.path_and_query.is_none() {
        uri.path_and_query = Some(http::uri::PathAndQuery::from_static("/"));
    }
    parts.uri = Uri::from_parts(uri).map_err(|e| format!("bad request target: {e}"))?;
    if parts.version != http::Version::HTTP_2 {
        wire::strip_hop_by_hop(&mut parts.headers);
        parts.headers.remove(http::header::HOST);
    }
    parts.version = http::Version::HTTP_2;
    // The app spoke plaintext HTTP to this sidecar.
    wire::forwarded(&mut parts.headers, None, "http");
    if let Some(src) = &snapshot.own.source_header {
        parts.headers.insert(wire::SOURCE, src.clone());
    }
    Ok(())
}
