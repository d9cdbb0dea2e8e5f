//! The one drain path. SIGTERM (or the caller's shutdown future) and the
//! admin endpoint both start it: listeners stop accepting, readiness turns
//! false, each open connection finishes its in-flight requests and closes
//! (HTTP/1 `Connection: close`, HTTP/2 GOAWAY), and after a grace deadline
//! whatever is left is dropped.

use std::future::Future;
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::io::AsyncWrite;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::cork::Cork;

/// Istio's default drain duration.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(5);

/// How long requests in flight on a connection that a new policy revoked
/// may take before the connection is cut.
pub const REVOKED_GRACE: Duration = Duration::from_secs(1);

pub struct Drain {
    signal: watch::Sender<bool>,
    /// True once [`Drain::finish`] has returned: what is left is cut.
    finished: watch::Sender<bool>,
    connections: TaskTracker,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            signal: watch::channel(false).0,
            finished: watch::channel(false).0,
            connections: TaskTracker::new(),
        }
    }
}

impl Drain {
    /// Starts draining; later calls do nothing more.
    pub fn start(&self) {
        self.signal
            .send_if_modified(|draining| !std::mem::replace(draining, true));
    }

    pub fn is_draining(&self) -> bool {
        *self.signal.borrow()
    }

    /// Resolves once draining has started.
    pub fn started(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.signal.subscribe();
        async move {
            let _ = rx.wait_for(|d| *d).await;
        }
    }

    /// Serves one connection as a tracked task: it runs until it ends by
    /// itself, or, once draining starts, until its in-flight requests are done.
    pub fn serve<C>(&self, conn: C)
    where
        C: GracefulConnection + Send + 'static,
        C::Output: Send,
    {
        self.serve_until(conn, std::future::pending());
    }

    /// As [`Drain::serve`], and once `revoked` resolves (a new policy
    /// allows nothing more on the connection) it is closed the same way,
    /// except that requests in flight get [`REVOKED_GRACE`] and are then
    /// cut: a stream the policy now denies must not outlive it.
    pub fn serve_until<C>(&self, conn: C, revoked: impl Future<Output = ()> + Send + 'static)
    where
        C: GracefulConnection + Send + 'static,
        C::Output: Send,
    {
        self.connections.spawn(until(conn, self.started(), revoked));
    }

    /// As [`Drain::serve_until`], with the connection's stream corked
    /// while its task is polled: what one poll writes goes out as one.
    pub(crate) fn serve_corked_until<C, T>(
        &self,
        conn: C,
        cork: Cork<T>,
        revoked: impl Future<Output = ()> + Send + 'static,
    ) where
        C: GracefulConnection + Send + 'static,
        C::Output: Send,
        T: AsyncWrite + Unpin + Send + 'static,
    {
        let served = until(conn, self.started(), revoked);
        self.connections.spawn(cork.around(served));
    }

    /// Runs `task` (an opaque TCP connection) as tracked work: draining
    /// waits for it up to the grace period.
    pub fn track(&self, task: impl Future<Output = ()> + Send + 'static) {
        self.connections.spawn(task);
    }

    /// Waits up to `grace` for every connection to finish; returns how many
    /// were still open at the deadline.
    pub async fn finish(&self, grace: Duration) -> usize {
        self.connections.close();
        let left = match tokio::time::timeout(grace, self.connections.wait()).await {
            Ok(()) => 0,
            Err(_) => self.connections.len(),
        };
        self.finished.send_replace(true);
        left
    }

    /// Resolves once [`Drain::finish`] has returned: every connection has
    /// ended or the grace period is over. A serving thread keeps its
    /// runtime, and so the connections on it, until then.
    pub fn finished(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.finished.subscribe();
        async move {
            let _ = rx.wait_for(|f| *f).await;
        }
    }
}

/// Serves `conn` until it ends by itself, or closes it gracefully once
/// draining starts or `revoked` resolves.
async fn until<C>(conn: C, started: impl Future<Output = ()>, revoked: impl Future<Output = ()>)
where
    C: GracefulConnection,
{
    tokio::pin!(conn);
    let grace = tokio::select! {
        _ = conn.as_mut() => return,
        _ = started => None,
        _ = revoked => Some(REVOKED_GRACE),
    };
    conn.as_mut().graceful_shutdown();
    match grace {
        None => drop(conn.await),
        Some(grace) => drop(tokio::time::timeout(grace, conn).await),
    }
}
