//! Writes a connection's task makes while it is polled, held and sent as
//! one when the poll ends.
//!
//! hyper's HTTP/2 server hands h2 each response body chunk, and h2 sends a
//! DATA frame over 256 bytes from the chunk's own buffer instead of copying
//! it into its write buffer; to make room for the next frame it flushes. So
//! a poll of an inbound sidecar connection that finished nine responses
//! wrote nine times: nine TLS records, nine syscalls, nine TCP segments,
//! each waking the peer sidecar. Corked, the poll's frames are copied into
//! one buffer and go out in one record and one write when the poll ends.
//!
//! [`cork`] splits a stream into the [`Corked`] I/O the connection uses and
//! the [`Cork`] that wraps the future driving it. Outside that future's
//! poll (an upgraded connection's tunnel, a shutdown) the I/O writes
//! through, after whatever is still held.

use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes held past which a write first sends what is held: a poll that
/// writes more than this (large bodies) goes out in pieces of about this
/// size, and the peer's back-pressure reaches the connection as usual.
const HOLD_AT_MOST: usize = 64 * 1024;

/// Buffer capacity kept between polls; more is let go once sent.
const KEEP_AT_MOST: usize = 16 * 1024;

struct State<T> {
    io: T,
    held: BytesMut,
    /// How much of `held` has been sent.
    sent: usize,
    /// Set while the future driving the connection is polled.
    corked: bool,
    /// The connection asked for a flush while corked.
    flush: bool,
    /// How sending what was held after a poll failed: the connection's
    /// next write or flush returns it.
    failed: Option<io::ErrorKind>,
}

impl<T: AsyncWrite + Unpin> State<T> {
    /// Sends what is held, then flushes the stream if anything was sent or
    /// a flush was asked for.
    fn send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
            self.flush = true;
        }
        self.sent = 0;
        if self.held.capacity() > KEEP_AT_MOST {
            // A large body passed through; an idle connection keeps little.
            self.held = BytesMut::new();
        } else {
            self.held.clear();
        }
        if self.flush {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// The error sending what was held last met, if it failed.
    fn check(&self) -> io::Result<()> {
        match self.failed {
            Some(kind) => Err(io::Error::new(kind, "sending held bytes failed")),
            None => Ok(()),
        }
    }

    /// Makes room for `len` more bytes: sends what is held once it would
    /// pass [`HOLD_AT_MOST`].
    fn room_for(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<()>> {
        let unsent = self.held.len() - self.sent;
        if unsent > 0 && unsent + len > HOLD_AT_MOST {
            ready!(self.send_held(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

type Shared<T> = Arc<Mutex<State<T>>>;

fn lock<T>(s: &Shared<T>) -> MutexGuard<'_, State<T>> {
    // Nothing under the lock leaves the state half-changed if it panics.
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Splits `io` into the stream a connection uses and the cork for the
/// future that drives it.
pub fn cork<T>(io: T) -> (Corked<T>, Cork<T>) {
    let shared = Arc::new(Mutex::new(State {
        io,
        held: BytesMut::new(),
        sent: 0,
        corked: false,
        flush: false,
        failed: None,
    }));
    (Corked(shared.clone()), Cork(shared))
}

/// The stream side: reads pass through; writes are held while corked.
pub struct Corked<T>(Shared<T>);

/// The task side: wraps the future that drives the connection.
pub struct Cork<T>(Shared<T>);

impl<T> Cork<T> {
    /// `fut`, with the stream corked while it is polled and what it wrote
    /// sent after each poll. Once `fut` is done, its last bytes are sent
    /// before it returns.
    pub fn around<F: Future>(self, fut: F) -> Around<T, F> {
        Around {
            fut,
            shared: self.0,
            out: None,
        }
    }
}

pin_project_lite::pin_project! {
    /// See [`Cork::around`].
    pub struct Around<T, F: Future> {
        #[pin]
        fut: F,
        shared: Shared<T>,
        out: Option<F::Output>,
    }
}

impl<T: AsyncWrite + Unpin, F: Future> Future for Around<T, F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        if this.out.is_none() {
            lock(this.shared).corked = true;
            let polled = this.fut.poll(cx);
            lock(this.shared).corked = false;
            match polled {
                Poll::Ready(out) => *this.out = Some(out),
                Poll::Pending => {
                    // Pending here leaves the task waiting on the stream
                    // too, and the next poll sends the rest.
                    let mut s = lock(this.shared);
                    if s.failed.is_none()
                        && let Poll::Ready(Err(e)) = s.send_held(cx)
                    {
                        // The connection meets it on its next write, or
                        // now, if it is waiting for one to be flushed: one
                        // wake-up, not one a poll.
                        s.failed = Some(e.kind());
                        cx.waker().wake_by_ref();
                    }
                    return Poll::Pending;
                }
            }
        }
        // The connection is done: what it wrote last goes out first (the
        // stream may live on, upgraded, and then writes through after it).
        let mut s = lock(this.shared);
        if s.failed.is_none() && s.send_held(cx).is_pending() {
            return Poll::Pending;
        }
        drop(s);
        Poll::Ready(this.out.take().expect("polled after completion"))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Corked<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut lock(&self.0).io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Corked<T> {
    /// One buffer is a vectored write of one (h2 and hyper write vectored
    /// here, since `is_write_vectored` says so).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut s = lock(&self.0);
        s.check()?;
        if !s.corked {
            ready!(s.send_held(cx))?;
            return Pin::new(&mut s.io).poll_write_vectored(cx, bufs);
        }
        let len = bufs.iter().map(|b| b.len()).sum();
        ready!(s.room_for(cx, len))?;
        for b in bufs {
            s.held.extend_from_slice(b);
        }
        Poll::Ready(Ok(len))
    }

    /// Vectored writes are copied into the held buffer whole, so a caller
    /// gives them rather than copying into a buffer of its own.
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        s.check()?;
        if s.corked {
            // Sent, and the stream flushed, when the poll ends.
            s.flush = true;
            return Poll::Ready(Ok(()));
        }
        s.flush = true;
        s.send_held(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut s = lock(&self.0);
        ready!(s.send_held(cx))?;
        Pin::new(&mut s.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A stream that records each write it is given, as one syscall would.
    #[derive(Clone, Default)]
    struct Writes(Arc<Mutex<Vec<Vec<u8>>>>, Arc<AtomicUsize>);

    impl AsyncRead for Writes {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.1.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl Writes {
        fn taken(&self) -> Vec<Vec<u8>> {
            std::mem::take(&mut self.0.lock().unwrap())
        }
    }

    #[tokio::test]
    async fn a_polls_writes_and_flushes_go_out_as_one_write_when_it_ends() {
        let stream = Writes::default();
        let (mut io, cork) = cork(stream.clone());
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let seen = stream.clone();
        let task = tokio::spawn(cork.around(async move {
            for frame in [&b"HEADERS"[..], b"DATA one", b"DATA two"] {
                io.write_all(frame).await.unwrap();
                io.flush().await.unwrap();
                // Nothing reaches the stream while the poll goes on.
                assert!(seen.0.lock().unwrap().is_empty());
            }
            wait.await.unwrap();
            io.write_all(b"last").await.unwrap();
            io.flush().await.unwrap();
            io
        }));
        tokio::task::yield_now().await;
        tokio::task::yield_now().await;
        assert_eq!(stream.taken(), [b"HEADERSDATA oneDATA two".to_vec()]);
        assert_eq!(
            stream.1.load(Ordering::Relaxed),
            1,
            "one flush for the poll"
        );
        go.send(()).unwrap();
        let mut io = task.await.unwrap();
        // The future's last write went out before it returned.
        assert_eq!(stream.taken(), [b"last".to_vec()]);
        // Outside the future, writes go straight through.
        io.write_all(b"tunnel").await.unwrap();
        assert_eq!(stream.taken(), [b"tunnel".to_vec()]);
    }

    #[tokio::test]
    async fn a_poll_that_writes_more_than_it_may_hold_sends_it_in_pieces() {
        let stream = Writes::default();
        let (mut io, cork) = cork(stream.clone());
        let chunk = vec![7u8; HOLD_AT_MOST / 2 + 1];
        let fut = async move {
            for _ in 0..3 {
                io.write_all(&chunk).await.unwrap();
            }
            io
        };
        let io = cork.around(fut).await;
        let sizes: Vec<usize> = stream.taken().iter().map(Vec::len).collect();
        let one = HOLD_AT_MOST / 2 + 1;
        assert_eq!(sizes, [one, one, one]);
        // The idle connection does not keep a buffer that size.
        assert!(lock(&io.0).held.capacity() <= KEEP_AT_MOST);
    }

    /// A stream whose peer has gone.
    struct Gone;

    impl AsyncWrite for Gone {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_send_that_failed_after_a_poll_fails_the_connections_next_write() {
        let (mut io, cork) = cork(Gone);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let mut conn = Box::pin(async move {
            // Held: the failure comes when the poll ends.
            io.write_all(b"response").await.unwrap();
            wait.await.unwrap();
            io.write_all(b"next").await
        });
        let polls = Arc::new(AtomicUsize::new(0));
        let counted = polls.clone();
        let task = tokio::spawn(cork.around(std::future::poll_fn(move |cx| {
            counted.fetch_add(1, Ordering::Relaxed);
            conn.as_mut().poll(cx)
        })));
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        // Woken once to meet the failure, not polled over and over.
        assert_eq!(polls.load(Ordering::Relaxed), 2);
        go.send(()).unwrap();
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    #[tokio::test]
    async fn reads_pass_through_and_a_real_peer_gets_every_byte_in_order() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let peer = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"ping").await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut io, cork) = cork(tcp);
        cork.around(async move {
            let mut b = [0u8; 4];
            io.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"ping");
            for i in 0..100u8 {
                io.write_all(&[i; 1000]).await.unwrap();
                io.flush().await.unwrap();
            }
            io.shutdown().await.unwrap();
        })
        .await;
        let got = peer.await.unwrap();
        assert_eq!(got.len(), 100_000);
        assert!(
            got.chunks(1000)
                .enumerate()
                .all(|(i, c)| c.iter().all(|&b| b == i as u8))
        );
    }
}
