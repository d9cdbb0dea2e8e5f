//! Accept loops. Traffic listeners stop accepting when draining starts and
//! hand each connection to the drain, which lets it finish in-flight
//! requests; admin listeners keep answering while the proxy drains.

use std::net::SocketAddr;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};

use crate::detect::Detected;
use crate::{Shared, admin, cork, inbound, outbound};

/// The next connection, or `None` once draining has started (the listener
/// is then dropped by the caller, so new connections are refused).
async fn accept(listener: &TcpListener, shared: &Shared) -> Option<(TcpStream, SocketAddr)> {
    let draining = shared.drain.started();
    tokio::pin!(draining);
    loop {
        tokio::select! {
            _ = &mut draining => return None,
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, peer));
                }
                Err(e) => tracing::warn!(error = %e, "accept failed"),
            },
        }
    }
}

/// Plain HTTP (HTTP/1.1 or h2c) from the app: the outbound listener, used as
/// an explicit proxy (local mode) or reached through interception, in which
/// case the connection's original destination is known.
pub async fn serve_outbound(listener: TcpListener, shared: Arc<Shared>, shards: Arc<Shards>) {
    while let Some((tcp, peer)) = accept(&listener, &shared).await {
        shards.hand(Side::Outbound, &shared, tcp, peer);
    }
}

/// Serves one connection from the app, on the thread it was dealt to.
fn outbound_conn(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    // An explicit proxy's clients speak HTTP.
    let Some(dst) = shared.sockets.original_dst(&tcp) else {
        serve_http(shared, tcp, peer, None);
        return;
    };
    let snapshot = shared.snapshot.borrow().clone();
    // A declared TCP or TLS service is tunnelled as it is: no HTTP
    // parsing, no waiting for the client to speak first.
    if let Some(service) = snapshot.tcp.get(&dst).cloned() {
        shared
            .drain
            .track(crate::tcp::outbound(shared.clone(), tcp, service));
        return;
    }
    // A port declared HTTP: nothing to detect.
    if snapshot.speaks_http(dst) {
        serve_http(shared, tcp, peer, Some(dst));
        return;
    }
    // Anywhere else the first bytes say what the connection is; a
    // client silent for the detection timeout waits for its server.
    let within = snapshot.detection_timeout(shared.cfg.protocol_detection_timeout);
    let s = shared.clone();
    shared.drain.track(async move {
        match crate::detect::detect(&tcp, within).await {
            Detected::Http => serve_http(&s, tcp, peer, Some(dst)),
            Detected::Tls(sni) => crate::tcp::by_server_name(s, tcp, dst, sni).await,
            Detected::Opaque => crate::tcp::passthrough(s, tcp, dst).await,
            Detected::Closed => {}
        }
    });
}

/// Serves HTTP/1.1 or h2c from the app on `tcp`.
fn serve_http(shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr, dst: Option<SocketAddr>) {
    let conn = Arc::new(outbound::Conn {
        original_dst: dst,
        peer,
    });
    let s = shared.clone();
    let svc = service_fn(move |req| outbound::handle(s.clone(), conn.clone(), req));
    let conn = http_server()
        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
        .into_owned();
    shared.drain.serve(conn);
}

/// Mutual TLS from other sidecars: the inbound listener.
pub async fn serve_inbound(listener: TcpListener, shared: Arc<Shared>, shards: Arc<Shards>) {
    while let Some((tcp, peer_addr)) = accept(&listener, &shared).await {
        shards.hand(Side::Inbound, &shared, tcp, peer_addr);
    }
}

/// Serves one connection from another sidecar (or a plaintext client),
/// on the thread it was dealt to.
fn inbound_conn(shared: &Arc<Shared>, tcp: TcpStream, peer_addr: SocketAddr) {
    let shared = shared.clone();
    tokio::spawn(async move {
        // Each connection uses the certificate current when it arrives.
        // A TLS ClientHello starts with 0x16; anything else (or nothing
        // within the sniff window: a server-first protocol) is plaintext.
        let mut first = [0u8; 1];
        let within = shared
            .snapshot
            .borrow()
            .detection_timeout(shared.cfg.protocol_detection_timeout);
        let peeked = match within {
            Some(t) => tokio::time::timeout(t, tcp.peek(&mut first)).await,
            None => Ok(tcp.peek(&mut first).await),
        };
        match peeked {
            Ok(Ok(1)) if first[0] == 0x16 => {}
            Ok(Ok(0) | Err(_)) => return,
            _ => {
                let dst = shared.sockets.original_dst(&tcp);
                return plaintext_inbound(shared, tcp, peer_addr, dst).await;
            }
        }
        let Some(tls) = shared.tls.borrow().clone() else {
            tracing::debug!(%peer_addr, "refusing inbound connection: no certificate yet");
            return;
        };
        let stream = match tokio_rustls::TlsAcceptor::from(tls.server.clone())
            .accept(tcp)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(%peer_addr, error = %e, "inbound mTLS handshake refused");
                return;
            }
        };
        let session = stream.get_ref().1;
        let conn = match mesh_identity::peer_identity(session.peer_certificates()) {
            mesh_identity::PeerIdentity::Mesh(id) => Arc::new(inbound::Conn::new(
                &shared.cfg.identity,
                id,
                peer_addr,
                session.server_name(),
            )),
            mesh_identity::PeerIdentity::Unauthenticated => {
                tracing::warn!(%peer_addr, "inbound peer has no SPIFFE identity");
                return;
            }
        };
        let s = shared.clone();
        let revoked = inbound::revoked(&shared, conn.clone());
        // Boxed: hyper spawns a task per HTTP/2 stream, and the request
        // path's future inline (2,304 bytes in a test build) would be
        // copied into each and out.
        let svc = service_fn(move |req| Box::pin(inbound::handle(s.clone(), conn.clone(), req)));
        let (stream, cork) = cork::cork(stream);
        let conn = http_server()
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        shared.drain.serve_corked_until(conn, cork, revoked);
    });
}

/// Plaintext arriving on the inbound port: a client without a sidecar,
/// redirected by the pod's capture rules. Served only where the workload's
/// PeerAuthentication mode for that port is not STRICT; HTTP goes through
/// the inbound path (no client identity), declared TCP is spliced as is.
async fn plaintext_inbound(
    shared: Arc<Shared>,
    tcp: TcpStream,
    peer_addr: SocketAddr,
    original_dst: Option<SocketAddr>,
) {
    let Some(dst) = original_dst else {
        tracing::warn!(%peer_addr, "plaintext to the inbound port refused: only mutual TLS is accepted here");
        return;
    };
    let port = u32::from(dst.port());
    let snapshot = shared.snapshot.borrow().clone();
    if !snapshot.accepts_plaintext(port) {
        tracing::warn!(%peer_addr, port, "plaintext refused: the workload's mTLS mode is STRICT");
        return;
    }
    let conn = inbound::Conn::plaintext(port, peer_addr);
    if snapshot.inbound.get(&port).is_some_and(|p| p.tcp) {
        let decision = snapshot.authz.decide(&conn.authz_request(port, None, None));
        if !decision.allowed() {
            tracing::warn!(%peer_addr, port, "plaintext TCP connection {}", decision.reason());
            return;
        }
        let app = shared.cfg.app_addr(dst.port());
        let Ok(app_tcp) = mesh_identity::grpc::dial(app, shared.cfg.socket_mark).await else {
            tracing::warn!(%peer_addr, %app, "plaintext TCP: the app does not answer");
            return;
        };
        let s = shared.clone();
        shared.drain.track(async move {
            crate::tcp::splice_while_allowed(tcp, app_tcp, &s, Arc::new(conn), None, port).await;
        });
        return;
    }
    let conn = Arc::new(conn);
    let s = shared.clone();
    let revoked = inbound::revoked(&shared, conn.clone());
    let svc = service_fn(move |req| inbound::handle(s.clone(), conn.clone(), req));
    let conn = http_server()
        .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
        .into_owned();
    shared.drain.serve_until(conn, revoked);
}

/// HTTP/1.1 and HTTP/2 served alike, upgrades included: HTTP/1.1's
/// `Connection: upgrade` and HTTP/2's extended CONNECT (`:protocol`,
/// RFC 8441), which carries them between sidecars.
fn http_server() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http2().enable_connect_protocol();
    builder
}

/// Admin, readiness and stats: served until the proxy stops.
pub async fn serve_admin(listener: TcpListener, shared: Arc<Shared>, which: admin::Endpoints) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let s = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| admin::handle(s.clone(), which, req));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

/// Which listener accepted a connection.
#[derive(Clone, Copy)]
enum Side {
    Outbound = 0,
    Inbound = 1,
}

type Handed = (Side, std::net::TcpStream, SocketAddr);

/// The single-threaded runtime each serving thread runs on.
pub fn runtime(cfg: &crate::Config) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .max_io_events_per_tick(cfg.io_events_per_tick.into())
        .enable_all()
        .build()
}

/// The proxy's serving threads beyond the one the listeners run on
/// (`Config::threads`). The accept loops deal connections to the threads
/// in turn, the listeners' own first; a connection is then served to the
/// end on its thread, whose requests go over that thread's own pools
/// (`Shared::for_shard`), so no request wakes another thread. Like nginx's
/// or Envoy's workers: each thread's share of the work stays on it, where
/// tokio's work-stealing runtime moved tasks between threads and woke one
/// thread from another for most requests.
pub struct Shards {
    others: Vec<tokio::sync::mpsc::UnboundedSender<Handed>>,
    /// Each listener's turn, so each deals its own connections evenly.
    next: [std::sync::atomic::AtomicUsize; 2],
}

impl Shards {
    /// Starts `shared.cfg.threads - 1` threads, each waiting for the
    /// connections dealt to it. Once the accept loops are gone (draining
    /// has started), each serves what it holds until the drain finishes:
    /// ending its runtime sooner would cut its requests in flight.
    pub fn spawn(shared: &Arc<Shared>) -> Result<Arc<Self>, crate::ProxyError> {
        let threads = shared.cfg.threads.max(1);
        let mut others = Vec::with_capacity(threads - 1);
        for index in 1..threads {
            let failed = |source| crate::ProxyError::Thread {
                index,
                threads,
                source,
            };
            let rt = runtime(&shared.cfg).map_err(failed)?;
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Handed>();
            let shard = Arc::new(shared.for_shard());
            std::thread::Builder::new()
                .name(format!("mesh-serve-{index}"))
                .spawn(move || {
                    rt.block_on(async move {
                        while let Some((side, tcp, peer)) = rx.recv().await {
                            match TcpStream::from_std(tcp) {
                                Ok(tcp) => serve_conn(side, &shard, tcp, peer),
                                Err(e) => tracing::warn!(%peer, error = %e, "cannot take over a connection"),
                            }
                        }
                        // Gone without a drain (the proxy's task was
                        // dropped): nothing to wait for.
                        if shard.drain.is_draining() {
                            shard.drain.finished().await;
                        }
                    });
                })
                .map_err(failed)?;
            others.push(tx);
        }
        Ok(Arc::new(Self {
            others,
            next: Default::default(),
        }))
    }

    /// Serves `tcp` here or hands it to the next thread in turn.
    fn hand(&self, side: Side, shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
        use std::sync::atomic::Ordering::Relaxed;
        let turn = self.next[side as usize].fetch_add(1, Relaxed) % (self.others.len() + 1);
        let Some(other) = turn.checked_sub(1).map(|i| &self.others[i]) else {
            return serve_conn(side, shared, tcp, peer);
        };
        match tcp.into_std() {
            Ok(std) => {
                if let Err(back) = other.send((side, std, peer)) {
                    // That thread has stopped: serve the connection here.
                    match TcpStream::from_std(back.0.1) {
                        Ok(tcp) => serve_conn(side, shared, tcp, peer),
                        Err(e) => tracing::warn!(%peer, error = %e, "connection lost"),
                    }
                }
            }
            Err(e) => tracing::warn!(%peer, error = %e, "cannot hand a connection over"),
        }
    }
}

fn serve_conn(side: Side, shared: &Arc<Shared>, tcp: TcpStream, peer: SocketAddr) {
    match side {
        Side::Outbound => outbound_conn(shared, tcp, peer),
        Side::Inbound => inbound_conn(shared, tcp, peer),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// Takes every connection for one redirected to where it arrived.
    struct Arrived;

    impl crate::platform::Sockets for Arrived {
        fn original_dst(&self, tcp: &TcpStream) -> Option<SocketAddr> {
            tcp.local_addr().ok()
        }
    }

    /// The status line a plaintext request to `addr` gets, or
    /// `(closed unanswered)`.
    async fn status_line(addr: SocketAddr) -> String {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: here\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 256];
        while !answer.contains(&b'\n') {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
        }
        let text = String::from_utf8_lossy(&answer);
        text.lines()
            .next()
            .unwrap_or("(closed unanswered)")
            .to_string()
    }

    #[tokio::test]
    async fn a_connection_dealt_to_a_thread_that_has_stopped_is_served_here() {
        let cfg = crate::Config::new(
            "t.default",
            mesh_identity::SpiffeId::new("cluster.local", "default", "t"),
            "127.0.0.1".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
            "127.0.0.1:9".parse().unwrap(),
        );
        let (shared, feeds) = Shared::new(Arc::new(cfg), Box::new(Arrived));
        // A config that takes plaintext (PERMISSIVE) and serves no port.
        let mut snapshot = crate::state::Snapshot::default();
        snapshot.listener = Some(mesh_proto::resources::Listener {
            mtls: mesh_proto::resources::MtlsMode::Permissive as i32,
            ..Default::default()
        });
        feeds.snapshot.send_replace(Arc::new(snapshot));
        // One other thread, already gone: its end of the channel dropped.
        let (stopped, _) = tokio::sync::mpsc::unbounded_channel();
        let shards = Shards {
            others: vec![stopped],
            next: Default::default(),
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Turn 0 is this thread's; turn 1 the stopped one's.
        for turn in 0..2 {
            let client = tokio::spawn(status_line(addr));
            let (tcp, peer) = listener.accept().await.unwrap();
            shards.hand(Side::Inbound, &shared, tcp, peer);
            let status = tokio::time::timeout(Duration::from_secs(10), client)
                .await
                .expect("an answer within 10 s")
                .unwrap();
            // The inbound side's own answer, on either turn.
            assert_eq!(status, "HTTP/1.1 404 Not Found", "turn {turn}");
        }
    }
}
