//! A request body that can be sent more than once: frames are forwarded as
//! they arrive (nothing waits for the whole body) and kept, up to a limit,
//! so a retry or a mirror can send them again. Past the limit the copy is
//! dropped and the body can no longer be replayed; the attempt reading it
//! carries on streaming.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};

use crate::observe::ReqBody;
use tokio::sync::Notify;

/// How much of a request body is kept for retries and mirrors.
pub const DEFAULT_LIMIT: usize = 64 * 1024;

struct State {
    /// Kept frames; empty once the limit was passed.
    frames: Vec<Frame<Bytes>>,
    kept_bytes: usize,
    /// Frames taken from `source` so far.
    taken: usize,
    source: Option<ReqBody>,
    done: bool,
    overflowed: bool,
    failed: bool,
    limit: usize,
}

/// The shared body; `body()` gives each attempt its own reader.
#[derive(Clone)]
pub struct Replay {
    state: Arc<Mutex<State>>,
    complete: Arc<Notify>,
}

fn copy(f: &Frame<Bytes>) -> Frame<Bytes> {
    match (f.data_ref(), f.trailers_ref()) {
        (Some(d), _) => Frame::data(d.clone()),
        (None, Some(t)) => Frame::trailers(t.clone()),
        (None, None) => Frame::data(Bytes::new()),
    }
}

impl Replay {
    pub fn new(source: ReqBody, limit: usize) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                frames: Vec::new(),
                kept_bytes: 0,
                taken: 0,
                done: source.is_end_stream(),
                source: Some(source),
                overflowed: false,
                failed: false,
                limit,
            })),
            complete: Arc::new(Notify::new()),
        }
    }

    /// A reader from the first frame. Only valid while `can_replay()`.
    pub fn body(&self) -> ReplayBody {
        ReplayBody {
            replay: self.clone(),
            pos: 0,
        }
    }

    /// Whether a new reader would see the whole body.
    pub fn can_replay(&self) -> bool {
        let s = self.state.lock().unwrap();
        !s.overflowed && !s.failed
    }

    /// Waits until the body has been read to its end (true), or will
    /// never be whole again (false).
    pub async fn whole(&self) -> bool {
        loop {
            let notified = self.complete.notified();
            {
                let s = self.state.lock().unwrap();
                if s.overflowed || s.failed {
                    return false;
                }
                if s.done {
                    return true;
                }
            }
            notified.await;
        }
    }
}

pub struct ReplayBody {
    replay: Replay,
    pos: usize,
}

impl HttpBody for ReplayBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let mut s = this.replay.state.lock().unwrap();
        if this.pos < s.taken {
            if s.overflowed {
                // This reader started before the copy was dropped and is
                // behind the source: it cannot be served. Readers are only
                // made while the body can be replayed, so this is a reader
                // abandoned by its attempt.
                return Poll::Ready(None);
            }
            let f = copy(&s.frames[this.pos]);
            this.pos += 1;
            return Poll::Ready(Some(Ok(f)));
        }
        if s.done {
            return Poll::Ready(None);
        }
        let Some(src) = s.source.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(src).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                s.source = None;
                drop(s);
                this.replay.complete.notify_waiters();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                s.source = None;
                drop(s);
                this.replay.complete.notify_waiters();
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                s.taken += 1;
                this.pos = s.taken;
                if !s.overflowed {
                    s.kept_bytes += frame.data_ref().map_or(0, |d| d.len());
                    if s.kept_bytes > s.limit {
                        s.overflowed = true;
                        s.frames = Vec::new();
                        drop(s);
                        this.replay.complete.notify_waiters();
                    } else {
                        s.frames.push(copy(&frame));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.replay.state.lock().unwrap();
        s.done && self.pos >= s.taken
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.replay.state.lock().unwrap();
        match &s.source {
            Some(src) if self.pos >= s.taken => src.size_hint(),
            _ => SizeHint::default(),
        }
    }
}
