//! Connections to other sidecars: HTTP/2 over mutual TLS, one multiplexed
//! connection per (address, expected identity, server name), made on first
//! use and replaced when it closes. The server name is the cluster's, in
//! Istio's form (`outbound_.9080_.v1_.reviews.default.svc.cluster.local`),
//! so the serving sidecar's `connection.sni` conditions see which service
//! and subset the connection is for; a connection carries one cluster's
//! requests, as Envoy's per-cluster pools do.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::combinators::BoxBody;
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_identity::SpiffeId;
use rustls::pki_types::ServerName;

use crate::identity::Tls;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect to {0}: timed out")]
    Timeout(SocketAddr),
    #[error("mTLS handshake with {addr} (expecting {expected}): {source}")]
    Tls {
        addr: SocketAddr,
        expected: SpiffeId,
        source: std::io::Error,
    },
    #[error("TLS config: {0}")]
    Config(#[from] rustls::Error),
    #[error("HTTP/2 to {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    /// A request to an endpoint without a sidecar, or to a server this
    /// sidecar originates TLS to.
    #[error("request to {addr}: {}", chain(error))]
    Direct {
        addr: SocketAddr,
        error: hyper_util::client::legacy::Error,
    },
    /// The cluster's transport rules the endpoint out.
    #[error("{1}")]
    Refused(SocketAddr, String),
}

/// An error with its causes, as one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

impl PoolError {
    /// Whether the request never reached the peer, so sending it elsewhere is safe.
    pub fn is_connect(&self) -> bool {
        match self {
            PoolError::Http(..) => false,
            PoolError::Direct { error, .. } => error.is_connect(),
            _ => true,
        }
    }
}

#[derive(Default)]
pub struct Pool {
    /// By address, then a short list (usually one) by identity and name.
    conns: Mutex<HashMap<SocketAddr, Vec<Open>>>,
    /// Mark for the sockets to peers (`Config::socket_mark`).
    mark: Option<u32>,
}

struct Open {
    expected: SpiffeId,
    sni: Arc<str>,
    sender: SendRequest<Body>,
}

impl Pool {
    pub fn new(mark: Option<u32>) -> Self {
        Self {
            conns: Mutex::default(),
            mark,
        }
    }

    pub async fn send(
        &self,
        tls: &Tls,
        addr: SocketAddr,
        expected: &SpiffeId,
        sni: &Arc<str>,
        req: http::Request<Body>,
    ) -> Result<http::Response<Incoming>, PoolError> {
        self.send_within(tls, addr, expected, sni, req, CONNECT_TIMEOUT)
            .await
    }

    /// As `send`, connecting (when no connection is open) within `connect_timeout`.
    pub async fn send_within(
        &self,
        tls: &Tls,
        addr: SocketAddr,
        expected: &SpiffeId,
        sni: &Arc<str>,
        req: http::Request<Body>,
        connect_timeout: Duration,
    ) -> Result<http::Response<Incoming>, PoolError> {
        let existing = self.conns.lock().unwrap().get(&addr).and_then(|open| {
            open.iter()
                .find(|o| o.expected == *expected && o.sni == *sni && !o.sender.is_closed())
                .map(|o| o.sender.clone())
        });
        let mut sender = match existing {
            Some(s) => s,
            None => {
                // Boxed: connecting is rare, and inlined it would make every
                // request's future several kilobytes larger.
                let s = Box::pin(connect(
                    tls,
                    addr,
                    expected,
                    sni,
                    self.mark,
                    connect_timeout,
                ))
                .await?;
                let mut conns = self.conns.lock().unwrap();
                let open = conns.entry(addr).or_default();
                open.retain(|o| {
                    !o.sender.is_closed() && (o.expected != *expected || o.sni != *sni)
                });
                open.push(Open {
                    expected: expected.clone(),
                    sni: sni.clone(),
                    sender: s.clone(),
                });
                s
            }
        };
        sender
            .send_request(req)
            .await
            .map_err(|e| PoolError::Http(addr, e))
    }
}

async fn connect(
    tls: &Tls,
    addr: SocketAddr,
    expected: &SpiffeId,
    sni: &str,
    mark: Option<u32>,
    connect_timeout: Duration,
) -> Result<SendRequest<Body>, PoolError> {
    let config = tls.client_for(expected)?;
    let tcp = tokio::time::timeout(connect_timeout, mesh_identity::grpc::dial(addr, mark))
        .await
        .map_err(|_| PoolError::Timeout(addr))?
        .map_err(|e| PoolError::Connect(addr, e))?;
    let _ = tcp.set_nodelay(true);
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(server_name(sni, addr), tcp)
        .await
        .map_err(|source| PoolError::Tls {
            addr,
            expected: expected.clone(),
            source,
        })?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| PoolError::Http(addr, e))?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "sidecar connection closed");
        }
    });
    Ok(sender)
}

/// `sni` as a TLS server name; the address when it is not a DNS name
/// (a host that is an IP literal).
fn server_name(sni: &str, addr: SocketAddr) -> ServerName<'static> {
    ServerName::try_from(sni.to_string())
        .ok()
        .filter(|n| matches!(n, ServerName::DnsName(_)))
        .unwrap_or(ServerName::IpAddress(addr.ip().into()))
}

/// The server name a sidecar sends for cluster `outbound|9080|v1|reviews...`:
/// `outbound_.9080_.v1_.reviews...`, and `outbound_.9080_._.reviews...`
/// without a subset, as Istio's do.
pub fn cluster_sni(cluster: &str) -> Arc<str> {
    Arc::from(cluster.replace('|', "_."))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_server_name_is_istios_form_of_the_cluster() {
        assert_eq!(
            &*super::cluster_sni("outbound|9080||ratings.default.svc.cluster.local"),
            "outbound_.9080_._.ratings.default.svc.cluster.local"
        );
        assert_eq!(
            &*super::cluster_sni("outbound|9080|v1|reviews.default.svc.cluster.local"),
            "outbound_.9080_.v1_.reviews.default.svc.cluster.local"
        );
    }
}
