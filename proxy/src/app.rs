//! HTTP/1.1 connections to the app on the inbound side's request path:
//! kept alive, reused last-in first-out, and handed back once a response
//! has been read to its end. A request that an idle connection could not
//! carry because the app had closed it (and so was never sent) goes out on
//! another one, as a client pool must for apps with short keep-alive
//! timeouts.
//!
//! The inbound side's own, rather than hyper-util's pool: an inbound sidecar
//! talks to one address or a few, so finding one needs no hashing, and
//! nothing here copies the request's future around as hyper-util's did.
//! Upgrades, HTTP/2 apps, probes and everything else still use
//! `Shared::app_h1` and `Shared::app_h2`.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};

use http::uri::{Authority, PathAndQuery};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;

use crate::platform::Dialer;
use crate::pool::Body;

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("request has no address to send it to")]
    NoAuthority,
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("HTTP/1.1 handshake: {0}")]
    Handshake(hyper::Error),
    #[error("{}", crate::pool::chain(.0))]
    Http(hyper::Error),
}

/// Idle connections by app address; an inbound sidecar has one or a few.
type Idle = Vec<(Authority, Vec<SendRequest<Body>>)>;

#[derive(Clone)]
pub struct AppPool {
    dialer: Dialer,
    idle: Arc<Mutex<Idle>>,
}

impl AppPool {
    pub fn new(dialer: Dialer) -> Self {
        Self {
            dialer,
            idle: Default::default(),
        }
    }

    /// Sends `req` to the address in its URI, which goes out in origin
    /// form, with a `Host` header from that address if it had none.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Returning>, AppError> {
        let authority = req
            .uri()
            .authority()
            .cloned()
            .ok_or(AppError::NoAuthority)?;
        let path = req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        *req.uri_mut() = Uri::from(path);
        if !req.headers().contains_key(http::header::HOST)
            && let Ok(host) = HeaderValue::from_str(authority.as_str())
        {
            req.headers_mut().insert(http::header::HOST, host);
        }
        loop {
            let (mut sender, reused) = match self.checkout(&authority) {
                Some(sender) => (sender, true),
                // Boxed: connecting is rare, and inlined it would make every
                // request's future larger.
                None => (Box::pin(self.connect(&authority)).await?, false),
            };
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = Some(Back {
                        pool: self.clone(),
                        authority,
                        sender,
                    });
                    return Ok(resp.map(|body| Returning::new(body, back)));
                }
                Err(mut e) => match e.take_message() {
                    // Never sent: the app closed the idle connection first.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(AppError::Http(e.into_error())),
                },
            }
        }
    }

    /// The idle connection to `authority` used last, if it can take a
    /// request now; any that cannot (the app closed them) are dropped on
    /// the way.
    fn checkout(&self, authority: &Authority) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap();
        let (_, conns) = idle.iter_mut().find(|(a, _)| a == authority)?;
        while let Some(sender) = conns.pop() {
            if sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn put(&self, authority: Authority, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap();
        match idle.iter_mut().find(|(a, _)| *a == authority) {
            Some((_, conns)) => conns.push(sender),
            None => idle.push((authority, vec![sender])),
        }
    }

    async fn connect(&self, authority: &Authority) -> Result<SendRequest<Body>, AppError> {
        let uri = Uri::builder()
            .scheme("http")
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| AppError::Connect(std::io::Error::other(e)))?;
        let io = tower::Service::call(&mut self.dialer.clone(), uri)
            .await
            .map_err(AppError::Connect)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(AppError::Handshake)?;
        let app = authority.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%app, error = %e, "app connection closed");
            }
        });
        Ok(sender)
    }
}

/// What goes back to the pool once a response is read to its end.
struct Back {
    pool: AppPool,
    authority: Authority,
    sender: SendRequest<Body>,
}

impl Back {
    fn give(self) {
        if self.sender.is_ready() {
            self.pool.put(self.authority, self.sender);
        } else if !self.sender.is_closed() {
            // The connection has yet to see the end of the response itself
            // (rare); it goes back once it has.
            let Back {
                pool,
                authority,
                mut sender,
            } = self;
            tokio::spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.put(authority, sender);
                }
            });
        }
    }
}

/// A response body from the app that hands its connection back to the
/// pool at its end. Dropped before its end, it takes the connection with
/// it: hyper closes a connection whose response was not read through.
pub struct Returning {
    body: Incoming,
    back: Option<Back>,
}

impl Returning {
    fn new(body: Incoming, back: Option<Back>) -> Self {
        let mut r = Self { body, back };
        if r.body.is_end_stream() {
            r.give_back();
        }
        r
    }

    fn give_back(&mut self) {
        if let Some(back) = self.back.take() {
            back.give();
        }
    }
}

impl hyper::body::Body for Returning {
    type Data = hyper::body::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.body.is_end_stream() => self.give_back(),
            // An error ends the connection with the body.
            Some(Err(_)) => self.back = None,
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pool() -> AppPool {
        AppPool::new(Dialer::new(None, None))
    }

    fn get(addr: std::net::SocketAddr, path: &str) -> Request<Body> {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::new().map_err(|e| match e {}).boxed())
            .unwrap()
    }

    /// An app that answers every request on a connection with its path, and
    /// (when `close_after` is set) closes each connection a moment after
    /// that many answers, as an app with a short keep-alive timeout does.
    /// Counts the connections it accepted.
    async fn app(close_after: Option<usize>) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut tcp, _) = listener.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut answered = 0;
                    loop {
                        let mut chunk = [0u8; 4096];
                        let n = match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_string();
                            buf.drain(..end + 4);
                            let line = head.lines().next().unwrap_or_default().to_string();
                            let host = head
                                .lines()
                                .find_map(|l| l.strip_prefix("host: "))
                                .unwrap_or("-")
                                .to_string();
                            let body = format!("{line} host={host}");
                            let reply = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                            if tcp.write_all(reply.as_bytes()).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if Some(answered) == close_after {
                                tokio::time::sleep(std::time::Duration::from_millis(30)).await;
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    async fn text(resp: Response<Returning>) -> String {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(body.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn requests_one_after_another_share_one_connection_in_origin_form() {
        let (addr, accepted) = app(None).await;
        let pool = pool();
        for path in ["/a", "/b?x=1", "/c"] {
            let answer = text(pool.send(get(addr, path)).await.unwrap()).await;
            assert_eq!(answer, format!("GET {path} HTTP/1.1 host={addr}"));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn requests_at_once_open_a_connection_each_and_then_reuse_them() {
        let (addr, accepted) = app(None).await;
        let pool = pool();
        let (a, b) = tokio::join!(pool.send(get(addr, "/a")), pool.send(get(addr, "/b")));
        let (a, b) = tokio::join!(text(a.unwrap()), text(b.unwrap()));
        assert!(
            a.starts_with("GET /a ") && b.starts_with("GET /b "),
            "{a} / {b}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        let (c, d) = tokio::join!(pool.send(get(addr, "/c")), pool.send(get(addr, "/d")));
        text(c.unwrap()).await;
        text(d.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_while_idle_is_replaced_without_a_failure() {
        let (addr, accepted) = app(Some(1)).await;
        let pool = pool();
        for path in ["/a", "/b", "/c"] {
            let resp = pool.send(get(addr, path)).await;
            let answer = text(resp.unwrap_or_else(|e| panic!("{path}: {e}"))).await;
            assert!(answer.starts_with(&format!("GET {path} ")), "{answer}");
            // Idle in the pool while the app closes it.
            tokio::time::sleep(std::time::Duration::from_millis(80)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_response_not_read_through_does_not_hand_back_its_connection() {
        let (addr, accepted) = app(None).await;
        let pool = pool();
        drop(pool.send(get(addr, "/a")).await.unwrap());
        text(pool.send(get(addr, "/b")).await.unwrap()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_named_as_refused() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let e = pool().send(get(addr, "/")).await.err().unwrap().to_string();
        assert!(e.starts_with("connect: ") && e.contains("refused"), "{e}");
    }
}
