//! Watching an exchange to its end. The request body's bytes are counted as
//! they pass; the response's as it streams back. When the response's last
//! frame leaves (or the response is dropped: the client went away), one
//! callback gets the totals and the gRPC status (from the headers of a
//! trailers-only answer, else from the trailers), for metrics, access logs
//! and tap. Nothing here waits: the counting rides on frames already moving.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body as HttpBody, Frame, SizeHint};
use hyper::body::Incoming;

use crate::pool::Body;

/// Request body bytes seen so far, shared by the counting body and the
/// response's observer, and whether the body failed (a malformed one,
/// such as bad chunking, or a client that went away mid-body).
#[derive(Debug, Default)]
pub struct Tally(AtomicU64, AtomicBool);

impl Tally {
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> bool {
        self.1.load(Ordering::Relaxed)
    }
}

/// A request body that counts its bytes into a [`Tally`].
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    tally: Arc<Tally>,
}

/// The request body type both request paths handle.
pub type ReqBody = Counted<Incoming>;

impl<B> Counted<B> {
    pub fn new(inner: B, tally: Arc<Tally>) -> Self {
        Self { inner, tally }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &r {
            let n = match (f.data_ref(), f.trailers_ref()) {
                (Some(d), _) => d.len(),
                (None, Some(t)) => header_bytes(t),
                _ => 0,
            };
            self.tally.0.fetch_add(n as u64, Ordering::Relaxed);
        } else if let Poll::Ready(Some(Err(_))) = &r {
            self.tally.1.store(true, Ordering::Relaxed);
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes a header block takes on an HTTP/1 wire (`name: value\r\n`), the
/// size Istio's byte metrics count headers at.
pub fn header_bytes(h: &HeaderMap) -> usize {
    h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum()
}

/// Bytes of a request's head: the request line and its headers.
pub fn request_head_bytes<B>(req: &http::Request<B>) -> u64 {
    let target = req.uri().path_and_query().map_or(1, |p| p.as_str().len());
    (req.method().as_str().len() + target + 11 + header_bytes(req.headers()) + 2) as u64
}

/// An exchange under way: when it began, its request head's size, and
/// its request body's running count.
pub struct Begun {
    start: Instant,
    request_head: u64,
    tally: Arc<Tally>,
}

impl Begun {
    /// Whether reading the request's body failed: what went wrong is the
    /// client's, not the upstream's.
    pub fn request_failed(&self) -> bool {
        self.tally.failed()
    }

    /// Starts watching `req`: its body now counts its bytes.
    pub fn new(req: http::Request<Incoming>) -> (Self, http::Request<ReqBody>) {
        let tally = Arc::new(Tally::default());
        let begun = Self {
            start: Instant::now(),
            request_head: request_head_bytes(&req),
            tally: tally.clone(),
        };
        (begun, req.map(|b| Counted::new(b, tally)))
    }

    /// `resp`, whose body runs `finish` when it ends.
    pub fn finish(
        self,
        resp: http::Response<Body>,
        finish: impl FnOnce(Done) + Send + Sync + 'static,
    ) -> http::Response<Body> {
        Observed::wrap(resp, self.start, self.request_head, self.tally, finish)
    }
}

/// How an exchange ended.
#[derive(Clone, Copy, Debug)]
pub struct Done {
    pub duration: Duration,
    /// Request head and body.
    pub request_bytes: u64,
    /// Response head and body (trailers included).
    pub response_bytes: u64,
    /// The bodies alone (request trailers included), as access logs count them.
    pub request_body_bytes: u64,
    pub response_body_bytes: u64,
    pub grpc_status: Option<u32>,
    /// The response's body ended early: an error, or the client left.
    pub cut_short: bool,
}

impl From<&Done> for crate::metrics::Observation {
    fn from(d: &Done) -> Self {
        Self {
            duration: d.duration,
            request_bytes: d.request_bytes,
            response_bytes: d.response_bytes,
        }
    }
}

type Finish = Box<dyn FnOnce(Done) + Send + Sync>;

/// A response body that reports [`Done`] once, when it ends.
pub struct Observed {
    inner: Body,
    start: Instant,
    request_head: u64,
    tally: Arc<Tally>,
    response_head: u64,
    bytes: u64,
    grpc_status: Option<u32>,
    finish: Option<Finish>,
}

fn grpc_status(h: &HeaderMap) -> Option<u32> {
    h.get("grpc-status")?.to_str().ok()?.parse().ok()
}

impl Observed {
    /// Wraps `resp`'s body; `finish` runs when it ends.
    fn wrap(
        resp: http::Response<Body>,
        start: Instant,
        request_head: u64,
        tally: Arc<Tally>,
        finish: impl FnOnce(Done) + Send + Sync + 'static,
    ) -> http::Response<Body> {
        let head = 17 + header_bytes(resp.headers()) as u64;
        let grpc_status = grpc_status(resp.headers());
        resp.map(|inner| {
            let ended = inner.is_end_stream();
            let mut o = Observed {
                inner,
                start,
                request_head,
                tally,
                response_head: head,
                bytes: head,
                grpc_status,
                finish: Some(Box::new(finish)),
            };
            // An empty body is never polled: its exchange is over now.
            if ended {
                o.end(false);
            }
            http_body_util::BodyExt::boxed(o)
        })
    }

    fn end(&mut self, cut_short: bool) {
        if let Some(f) = self.finish.take() {
            f(Done {
                duration: self.start.elapsed(),
                request_bytes: self.request_head + self.tally.get(),
                response_bytes: self.bytes,
                request_body_bytes: self.tally.get(),
                response_body_bytes: self.bytes - self.response_head,
                grpc_status: self.grpc_status,
                cut_short,
            });
        }
    }
}

impl HttpBody for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref() {
                    this.bytes += header_bytes(t) as u64;
                    this.grpc_status = grpc_status(t).or(this.grpc_status);
                }
                if this.inner.is_end_stream() {
                    this.end(false);
                }
            }
            Poll::Ready(None) => this.end(false),
            Poll::Ready(Some(Err(_))) => this.end(true),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        self.end(true);
    }
}
