//! Opaque TCP between sidecars: the outbound side opens an HTTP/2 CONNECT
//! stream to the endpoint's sidecar over the same mutual-TLS connection
//! HTTP uses (the peer's identity checked the same way), and both sides
//! splice bytes. The inbound side connects to the app port the CONNECT
//! names, if the workload serves it. Endpoints without a sidecar get the
//! bytes directly, in plaintext.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;

use crate::observe::ReqBody;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::Shared;
use crate::metrics::{Peers, TcpLabels, TcpSeries};
use crate::origin::Via;
use crate::pool::Body;
use crate::state::{Cluster, TcpService};
use crate::wire::{self, local_reply};

/// Carries one captured connection to a TCP service's endpoint: of the
/// cluster the service port's TCP routes choose, else the service's own.
/// On a TLS port the routes see the ClientHello's server name.
pub async fn outbound(shared: Arc<Shared>, client: TcpStream, service: TcpService) {
    let sni = match service.tls {
        true => crate::detect::server_name(&client, None).await,
        false => None,
    };
    carry(shared, client, service, sni).await;
}

/// A client stream (captured, or a CONNECT tunnel the app opened), the
/// way to a TCP service's endpoint; `sni` for its tls routes.
pub trait Client: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Client for T {}

/// Carries `client` to an endpoint of the cluster `service`'s routes
/// choose (by `sni` on a TLS port), else of the service's own.
pub async fn carry(
    shared: Arc<Shared>,
    mut client: impl Client,
    service: TcpService,
    sni: Option<String>,
) {
    let cluster = match routed(&shared, &service, sni.as_deref()) {
        Ok(c) => c,
        Err(missing) => {
            tracing::warn!(cluster = %missing, "TCP route to a cluster this sidecar does not have: closing the connection");
            count_failed(&shared, &service.cluster, None, "NR");
            return;
        }
    };
    let name = &cluster.config.name;
    let Some(ep) = cluster.pick(None).cloned() else {
        tracing::warn!(cluster = %name, "no endpoints: closing the TCP connection");
        count_failed(&shared, &cluster, None, "UH");
        return;
    };
    let id = match cluster.transport.via(&ep) {
        Via::Sidecar(id) => id.clone(),
        Via::Plain => return direct(&shared, client, &cluster, &ep, None).await,
        Via::Tls(tls) => return direct(&shared, client, &cluster, &ep, Some(tls)).await,
        Via::Refused(why) => {
            tracing::warn!(cluster = %name, "{why}: closing the TCP connection");
            count_failed(&shared, &cluster, Some(&ep), "UF");
            return;
        }
    };
    let Some(tls) = shared.tls.borrow().clone() else {
        return;
    };
    let target = format!("{}:{}", ep.pb.address, ep.pb.port);
    let mut req = Request::builder()
        .method(Method::CONNECT)
        .uri(Uri::try_from(target.as_str()).expect("an address and port make an authority"))
        .version(http::Version::HTTP_2)
        .body(
            Empty::<Bytes>::new()
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("valid CONNECT");
    if let Some(src) = &shared.snapshot.borrow().own.source_header {
        req.headers_mut().insert(wire::SOURCE, src.clone());
    }
    let resp = match shared
        .pool
        .send(&tls, ep.tunnel, &id, &cluster.sni, &cluster.conns, req)
        .await
    {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            tracing::warn!(%target, status = %r.status(), "peer sidecar refused the TCP tunnel");
            count_failed(&shared, &cluster, Some(&ep), "UF");
            return;
        }
        Err(e) => {
            tracing::warn!(%target, error = %e, "TCP tunnel failed");
            count_failed(&shared, &cluster, Some(&ep), "UF");
            return;
        }
    };
    match hyper::upgrade::on(resp).await {
        Ok(upgraded) => {
            let series = outbound_series(&shared, &cluster, Some(&ep), "-");
            let mut client = Counting::new(&mut client);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(upgraded)).await;
            if let Some(series) = series {
                series.closed(client.written, client.read);
            }
        }
        Err(e) => tracing::warn!(%target, error = %e, "TCP tunnel upgrade failed"),
    }
}

/// The cluster a connection to `service`'s port goes to: a destination,
/// by weight, of the first of the port's TCP routes that takes it (routes
/// pilot sends as the port's route config); the service's own without one.
/// `Err` names a cluster the route chose that this sidecar does not have.
fn routed(
    shared: &Shared,
    service: &TcpService,
    sni: Option<&str>,
) -> Result<Arc<Cluster>, String> {
    let own = &service.cluster;
    let Some(dest) = service
        .routes
        .as_ref()
        .and_then(|t| t.select_tcp(own.config.port, sni))
        .and_then(|r| r.pick())
    else {
        return Ok(own.clone());
    };
    if dest.cluster == own.config.name {
        return Ok(own.clone());
    }
    shared
        .snapshot
        .borrow()
        .clusters
        .get(&dest.cluster)
        .cloned()
        .ok_or_else(|| dest.cluster.clone())
}

/// `CONNECT host:port` from the app (an HTTP proxy's tunnel, as
/// `https_proxy` clients open): to a mesh TCP or TLS service by name, its
/// routes and endpoints as for a captured connection (no server name is
/// read, so tls routes that need one do not match); to a destination
/// outside the mesh, resolved and passed through under ALLOW_ANY. An HTTP
/// service is refused: its requests go through the sidecar as HTTP.
pub async fn tunnel(shared: Arc<Shared>, req: Request<crate::observe::ReqBody>) -> Response<Body> {
    let Some(target) = req.uri().authority().map(|a| a.as_str().to_string()) else {
        return local_reply(StatusCode::BAD_REQUEST, "CONNECT needs host:port");
    };
    let snapshot = shared.snapshot.borrow().clone();
    if let Some(service) = snapshot.opaque_service(&target).cloned() {
        let upgrade = hyper::upgrade::on(req);
        let s = shared.clone();
        shared.drain.track(async move {
            match upgrade.await {
                Ok(io) => carry(s, TokioIo::new(io), service, None).await,
                Err(e) => tracing::debug!(error = %e, "CONNECT tunnel not opened"),
            }
        });
        return Response::new(wire::empty());
    }
    if snapshot.route_config_exact(&target).is_some() {
        return local_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            format!(
                "{target} is an HTTP service: send its requests through the sidecar, not a CONNECT tunnel"
            ),
        );
    }
    if snapshot.outbound_policy(shared.cfg.outbound_policy) == crate::OutboundPolicy::RegistryOnly {
        return local_reply(
            StatusCode::BAD_GATEWAY,
            format!(
                "{target} is outside the mesh and the outbound traffic policy is REGISTRY_ONLY (BlackHoleCluster)"
            ),
        );
    }
    let addrs: Vec<std::net::SocketAddr> = match tokio::net::lookup_host(target.as_str()).await {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            return local_reply(StatusCode::BAD_GATEWAY, format!("{target}: {e}"));
        }
    };
    // Each address the name has, in the resolver's order, until one answers.
    let mut last = format!("{target}: no address");
    for dst in addrs {
        let connect = mesh_identity::grpc::dial(dst, shared.cfg.socket_mark);
        match tokio::time::timeout(crate::pool::CONNECT_TIMEOUT, connect).await {
            Ok(Ok(upstream)) => {
                let upgrade = hyper::upgrade::on(req);
                let s = shared.clone();
                shared.drain.track(async move {
                    match upgrade.await {
                        Ok(io) => splice_outside(&s, TokioIo::new(io), upstream).await,
                        Err(e) => tracing::debug!(error = %e, "CONNECT tunnel not opened"),
                    }
                });
                return Response::new(wire::empty());
            }
            Ok(Err(e)) => last = format!("{target} ({dst}): {e}"),
            Err(_) => last = format!("{target} ({dst}): connect timed out"),
        }
    }
    local_reply(StatusCode::SERVICE_UNAVAILABLE, last)
}

/// A captured connection of TLS to no service's address: the service
/// whose host is the ClientHello's server name on that port takes it, as
/// a TLS service's connections do; with none, it passes through.
pub async fn by_server_name(
    shared: Arc<Shared>,
    client: TcpStream,
    dst: std::net::SocketAddr,
    sni: Option<String>,
) {
    let service = sni.and_then(|name| {
        let snapshot = shared.snapshot.borrow();
        snapshot.tls_service(dst.port(), &name).cloned()
    });
    match service {
        Some(service) => outbound(shared, client, service).await,
        None => passthrough(shared, client, dst).await,
    }
}

/// A captured connection to no mesh service that is not HTTP (or was
/// silent: a server-first protocol): spliced to its original destination
/// under ALLOW_ANY (`PassthroughCluster`), closed under REGISTRY_ONLY
/// (`BlackHoleCluster`).
pub async fn passthrough(shared: Arc<Shared>, client: impl Client, dst: std::net::SocketAddr) {
    let snapshot = shared.snapshot.borrow().clone();
    let policy = snapshot.outbound_policy(shared.cfg.outbound_policy);
    if shared.cfg.is_own_listener(dst) {
        tracing::warn!(%dst, "TCP to this sidecar's own listener: refusing to loop");
        return;
    }
    if policy == crate::OutboundPolicy::RegistryOnly {
        tracing::warn!(%dst, "TCP to a destination outside the mesh refused: the outbound traffic policy is REGISTRY_ONLY (BlackHoleCluster)");
        if let Some(series) = outside_series(&shared, &snapshot, "BlackHoleCluster", "UH") {
            series.closed(0, 0);
        }
        return;
    }
    let connect = mesh_identity::grpc::dial(dst, shared.cfg.socket_mark);
    let upstream = match tokio::time::timeout(crate::pool::CONNECT_TIMEOUT, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::warn!(%dst, error = %e, "TCP passthrough connect failed");
            if let Some(series) = outside_series(&shared, &snapshot, "PassthroughCluster", "UF") {
                series.closed(0, 0);
            }
            return;
        }
        Err(_) => {
            tracing::warn!(%dst, "TCP passthrough connect timed out");
            if let Some(series) = outside_series(&shared, &snapshot, "PassthroughCluster", "UF") {
                series.closed(0, 0);
            }
            return;
        }
    };
    splice_outside(&shared, client, upstream).await;
}

/// Copies a connection to a destination outside the mesh both ways,
/// counted under `PassthroughCluster`.
async fn splice_outside(shared: &Shared, mut client: impl Client, mut upstream: TcpStream) {
    let snapshot = shared.snapshot.borrow().clone();
    let series = outside_series(shared, &snapshot, "PassthroughCluster", "-");
    let mut client = Counting::new(&mut client);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
    if let Some(series) = series {
        series.closed(client.written, client.read);
    }
}

/// Counts a connection to a destination outside the mesh, named as Istio
/// names those (`PassthroughCluster`, `BlackHoleCluster`).
fn outside_series(
    shared: &Shared,
    snapshot: &crate::state::Snapshot,
    name: &str,
    flags: &'static str,
) -> Option<TcpSeries> {
    if snapshot.client_metrics_off {
        return None;
    }
    let mut peers = Peers::new("source");
    peers.source(&snapshot.own.meta, &shared.cfg.identity);
    peers.service(name);
    Some(shared.metrics.tcp_opened(&TcpLabels {
        peers,
        request_protocol: "tcp",
        response_flags: flags,
    }))
}

/// Carries a connection to an endpoint's own address: plaintext to one
/// without a sidecar (auto mutual TLS) or under DISABLE, or with TLS this
/// sidecar originates (`tls`: SIMPLE or MUTUAL). The connect and the TLS
/// handshake together get the cluster's connectTimeout; a failed
/// handshake closes the app's connection, which never goes out in
/// plaintext instead.
async fn direct(
    shared: &Shared,
    mut client: impl Client,
    cluster: &Cluster,
    ep: &crate::state::Endpoint,
    tls: Option<&crate::origin::Originate>,
) {
    let within = cluster
        .balancer
        .connect_timeout
        .unwrap_or(crate::pool::CONNECT_TIMEOUT);
    let connect = async {
        let tcp = mesh_identity::grpc::dial(ep.tunnel, shared.cfg.socket_mark)
            .await
            .map_err(|e| format!("TCP connect failed: {e}"))?;
        if let Some(k) = &cluster.conns.keepalive {
            let _ = crate::pool::keepalive(&tcp, k);
        }
        Ok::<_, String>(match tls {
            None => Upstream::Plain(tcp),
            Some(o) => Upstream::Tls(Box::new(
                o.handshake(tcp)
                    .await
                    .map_err(|e| format!("TLS origination failed: {e}"))?,
            )),
        })
    };
    let upstream = match tokio::time::timeout(within, connect).await {
        Ok(Ok(s)) => s,
        Ok(Err(why)) => {
            tracing::warn!(endpoint = %ep.tunnel, cluster = %cluster.config.name, "{why}");
            count_failed(shared, cluster, Some(ep), "UF");
            return;
        }
        Err(_) => {
            tracing::warn!(endpoint = %ep.tunnel, cluster = %cluster.config.name, "TCP connect timed out");
            count_failed(shared, cluster, Some(ep), "UF");
            return;
        }
    };
    let series = outbound_series(shared, cluster, Some(ep), "-");
    let mut client = Counting::new(&mut client);
    let _ = match upstream {
        Upstream::Plain(mut s) => tokio::io::copy_bidirectional(&mut client, &mut s).await,
        Upstream::Tls(mut s) => tokio::io::copy_bidirectional(&mut client, &mut *s).await,
    };
    if let Some(series) = series {
        series.closed(client.written, client.read);
    }
}

enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Counts a connection to `cluster` that failed before carrying a byte.
fn count_failed(
    shared: &Shared,
    cluster: &Cluster,
    ep: Option<&crate::state::Endpoint>,
    flags: &'static str,
) {
    if let Some(series) = outbound_series(shared, cluster, ep, flags) {
        series.closed(0, 0);
    }
}

/// Counts a connection the source sidecar opened to `cluster` (unless a
/// Telemetry switched the calling side's metrics off).
fn outbound_series(
    shared: &Shared,
    cluster: &Cluster,
    ep: Option<&crate::state::Endpoint>,
    flags: &'static str,
) -> Option<TcpSeries> {
    let snapshot = shared.snapshot.borrow().clone();
    if snapshot.client_metrics_off {
        return None;
    }
    let mut peers = Peers::new("source");
    peers.source(&snapshot.own.meta, &shared.cfg.identity);
    cluster.labels(&mut peers);
    if let Some(ep) = ep {
        ep.labels(&mut peers);
        if cluster.transport.is_mesh(ep) {
            peers.connection_security_policy = "mutual_tls";
        }
    }
    Some(shared.metrics.tcp_opened(&TcpLabels {
        peers,
        request_protocol: "tcp",
        response_flags: flags,
    }))
}

/// A stream that counts what passes through it.
pub struct Counting<T> {
    inner: T,
    pub read: u64,
    pub written: u64,
}

impl<T> Counting<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            read: 0,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.read += (buf.filled().len() - before) as u64;
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.written += *n as u64;
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Answers a CONNECT from a peer sidecar: connects to the app port it
/// names and splices the stream to it.
pub async fn inbound(
    shared: &Arc<Shared>,
    conn: &Arc<crate::inbound::Conn>,
    mut req: Request<ReqBody>,
) -> Response<Body> {
    let port = req.uri().authority().and_then(|a| a.port_u16());
    let served = port.filter(|p| {
        shared
            .snapshot
            .borrow()
            .inbound
            .contains_key(&u32::from(*p))
    });
    let Some(port) = served else {
        return local_reply(
            StatusCode::NOT_FOUND,
            "CONNECT names no port this workload serves",
        );
    };
    // TCP: the policies decide on the connection alone.
    let decision =
        shared
            .snapshot
            .borrow()
            .authz
            .decide(&conn.authz_request(u32::from(port), None, None));
    if !decision.allowed() {
        tracing::warn!(port, "TCP connection {}", decision.reason());
        return local_reply(StatusCode::FORBIDDEN, crate::inbound::RBAC_DENIED);
    }
    let app = shared.cfg.app_addr(port);
    let app_tcp = match mesh_identity::grpc::dial(app, shared.cfg.socket_mark).await {
        Ok(s) => s,
        Err(e) => {
            return local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("app at {app} unreachable: {e}"),
            );
        }
    };
    let _ = app_tcp.set_nodelay(true);
    let upgrade = hyper::upgrade::on(&mut req);
    let source = req.headers().get(wire::SOURCE).cloned();
    let shared = shared.clone();
    let conn = conn.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                splice_while_allowed(
                    TokioIo::new(upgraded),
                    app_tcp,
                    &shared,
                    conn,
                    source.as_ref(),
                    u32::from(port),
                )
                .await;
            }
            Err(e) => tracing::warn!(%app, error = %e, "TCP tunnel upgrade failed"),
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}

/// Splices the client's stream `a` and the app's `b` until either side
/// closes, or until a new config's AuthorizationPolicies no longer allow
/// the connection, or its mTLS mode no longer accepts it as plaintext
/// (checked on every config change): a policy change reaches connections
/// already open. Counted in the TCP metrics, as the destination's sidecar
/// reports them.
pub async fn splice_while_allowed<A, B>(
    a: A,
    mut b: B,
    shared: &Shared,
    conn: Arc<crate::inbound::Conn>,
    source: Option<&http::HeaderValue>,
    port: u32,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut snapshots = shared.snapshot.clone();
    let snapshot = snapshots.borrow_and_update().clone();
    let served = snapshot.inbound.get(&port).map(|p| &**p);
    let series = (!snapshot.server_metrics_off).then(|| {
        shared.metrics.tcp_opened(&TcpLabels {
            peers: crate::inbound::peers(shared, &snapshot, &conn, source, served),
            request_protocol: "tcp",
            response_flags: "-",
        })
    });
    drop(snapshot);
    let mut a = Counting::new(a);
    {
        let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                _ = &mut copy => break,
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = snapshots.borrow_and_update().clone();
                    let refused = conn.plaintext_refused(&snapshot).or_else(|| {
                        let decision = snapshot.authz.decide(&conn.authz_request(port, None, None));
                        (!decision.allowed()).then(|| decision.reason())
                    });
                    if let Some(why) = refused {
                        tracing::warn!(port, "closing an open TCP connection: {why}");
                        break;
                    }
                }
            }
        }
    }
    if let Some(series) = series {
        series.closed(a.written, a.read);
    }
}
