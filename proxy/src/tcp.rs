//! Opaque TCP between sidecars: the outbound side opens an HTTP/2 CONNECT
//! stream to the endpoint's sidecar over the same mutual-TLS connection
//! HTTP uses (the peer's identity checked the same way), and both sides
//! splice bytes. The inbound side connects to the app port the CONNECT
//! names, if the workload serves it.

use std::sync::Arc;

use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Shared;
use crate::pool::Body;
use crate::state::Cluster;
use crate::wire::{self, local_reply};

/// Carries one captured connection to a TCP service's endpoint.
pub async fn outbound(shared: Arc<Shared>, mut client: TcpStream, cluster: Arc<Cluster>) {
    let name = &cluster.config.name;
    let Some(ep) = cluster.pick(None).cloned() else {
        tracing::warn!(cluster = %name, "no endpoints: closing the TCP connection");
        return;
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
    let resp = match shared.pool.send(&tls, ep.tunnel, &ep.identity, req).await {
        Ok(r) if r.status() == StatusCode::OK => r,
        Ok(r) => {
            tracing::warn!(%target, status = %r.status(), "peer sidecar refused the TCP tunnel");
            return;
        }
        Err(e) => {
            tracing::warn!(%target, error = %e, "TCP tunnel failed");
            return;
        }
    };
    match hyper::upgrade::on(resp).await {
        Ok(upgraded) => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut TokioIo::new(upgraded)).await;
        }
        Err(e) => tracing::warn!(%target, error = %e, "TCP tunnel upgrade failed"),
    }
}

/// Answers a CONNECT from a peer sidecar: connects to the app port it
/// names and splices the stream to it.
pub async fn inbound(
    shared: &Shared,
    conn: &Arc<crate::inbound::Conn>,
    mut req: Request<Incoming>,
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
    let snapshots = shared.snapshot.clone();
    let conn = conn.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                splice_while_allowed(
                    TokioIo::new(upgraded),
                    app_tcp,
                    snapshots,
                    conn,
                    u32::from(port),
                )
                .await;
            }
            Err(e) => tracing::warn!(%app, error = %e, "TCP tunnel upgrade failed"),
        }
    });
    Response::new(Empty::new().map_err(|never| match never {}).boxed())
}

/// Splices `a` and `b` until either side closes, or until a new config's
/// AuthorizationPolicies no longer allow the connection (checked on every
/// config change): a policy change reaches connections already open.
pub async fn splice_while_allowed<A, B>(
    mut a: A,
    mut b: B,
    mut snapshots: tokio::sync::watch::Receiver<Arc<crate::state::Snapshot>>,
    conn: Arc<crate::inbound::Conn>,
    port: u32,
) where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    snapshots.borrow_and_update();
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    loop {
        tokio::select! {
            _ = &mut copy => return,
            changed = snapshots.changed() => {
                if changed.is_err() {
                    return;
                }
                let decision = snapshots
                    .borrow_and_update()
                    .authz
                    .decide(&conn.authz_request(port, None, None));
                if !decision.allowed() {
                    tracing::warn!(port, "closing an open TCP connection: {}", decision.reason());
                    return;
                }
            }
        }
    }
}
