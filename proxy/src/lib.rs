//! The sidecar data plane: identity from citadel, config from pilot,
//! outbound routing to other sidecars over mutual TLS, inbound mTLS to the
//! app, metrics and admin endpoints.
#![forbid(unsafe_code)]

pub mod accesslog;
pub mod admin;
pub mod app;
pub mod authz;
pub mod balance;
pub mod budget;
pub mod capture;
pub mod cli;
pub mod config;
mod cork;
mod detect;
pub mod drain;
pub mod flags;
mod http_extra;
pub mod identity;
pub mod inbound;
pub mod jwt;
pub mod metrics;
pub mod observe;
pub mod origin;
pub mod outbound;
pub mod platform;
pub mod pool;
pub mod probe;
pub mod replay;
pub mod route;
mod server;
pub mod state;
pub mod tap;
mod tcp;
pub mod trace;
pub mod wire;
pub mod xds;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

pub use config::{Config, OutboundPolicy, Ports};

use crate::drain::Drain;
use crate::identity::Tls;
use crate::metrics::Metrics;
use crate::pool::{Body, Pool};
use crate::state::Snapshot;
use crate::xds::XdsStatus;

/// Istio's mesh ID, on spans; the mesh is one trust domain's.
pub const MESH_ID: &str = "cluster.local";

/// What every request handler shares. Control-plane data arrives through
/// `watch` receivers; handlers clone the current `Arc` and never lock.
pub struct Shared {
    pub cfg: Arc<Config>,
    pub tls: watch::Receiver<Option<Arc<Tls>>>,
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    pub xds_status: watch::Receiver<XdsStatus>,
    pub metrics: Arc<Metrics>,
    pub access_log: Arc<accesslog::Writer>,
    pub tap: Arc<tap::Tap>,
    /// Exports sampled spans.
    pub tracer: Arc<trace::Tracer>,
    pub pool: Pool,
    /// HTTP/1.1 to the app for requests arriving at the inbound side.
    pub app: app::AppPool,
    /// Plain HTTP to the app otherwise (upgrades, HTTP/2 apps, probes),
    /// and to destinations outside the mesh.
    pub app_h1: Client<platform::Dialer, Body>,
    pub app_h2: Client<platform::Dialer, Body>,
    pub drain: Arc<Drain>,
    pub sockets: Arc<dyn platform::Sockets>,
}

/// What feeds a [`Shared`]'s receivers: the identity task's certificates
/// and the xDS client's config and status.
struct Feeds {
    tls: watch::Sender<Option<Arc<Tls>>>,
    snapshot: watch::Sender<Arc<Snapshot>>,
    status: watch::Sender<XdsStatus>,
}

impl Shared {
    /// A proxy for `cfg` with no certificate or config yet, and the senders
    /// that will bring them.
    fn new(cfg: Arc<Config>, sockets: Box<dyn platform::Sockets>) -> (Arc<Self>, Feeds) {
        let (tls_tx, tls_rx) = watch::channel(None);
        let (snap_tx, snap_rx) = watch::channel(Arc::new(Snapshot::default()));
        let (status_tx, status_rx) = watch::channel(XdsStatus::default());
        let access_log = Arc::new(accesslog::Writer::new(cfg.access_log_file.clone()));
        let tap = Arc::new(tap::Tap::default());
        let tracer = Arc::new(trace::Tracer::default());
        let metrics = Arc::new(Metrics::new(metrics::Health {
            xds: status_rx.clone(),
            tls: tls_rx.clone(),
            access_log: access_log.clone(),
            tap: tap.clone(),
            trace: tracer.stats.clone(),
        }));
        let (pool, app, app_h1, app_h2) = pools(&cfg, &metrics);
        let shared = Arc::new(Shared {
            cfg,
            tls: tls_rx,
            snapshot: snap_rx,
            xds_status: status_rx,
            metrics,
            access_log,
            tap,
            tracer,
            pool,
            app,
            app_h1,
            app_h2,
            drain: Arc::default(),
            sockets: sockets.into(),
        });
        let feeds = Feeds {
            tls: tls_tx,
            snapshot: snap_tx,
            status: status_tx,
        };
        (shared, feeds)
    }

    /// The same proxy for another serving thread (`server::Shards`):
    /// everything shared but the connection pools, each of whose
    /// connections is driven by the runtime that opened it.
    fn for_shard(&self) -> Self {
        let (pool, app, app_h1, app_h2) = pools(&self.cfg, &self.metrics);
        Self {
            cfg: self.cfg.clone(),
            tls: self.tls.clone(),
            snapshot: self.snapshot.clone(),
            xds_status: self.xds_status.clone(),
            metrics: self.metrics.clone(),
            access_log: self.access_log.clone(),
            tap: self.tap.clone(),
            tracer: self.tracer.clone(),
            pool,
            app,
            app_h1,
            app_h2,
            drain: self.drain.clone(),
            sockets: self.sockets.clone(),
        }
    }

    /// A finished request, to the access log (under `rule`, when the
    /// workload's Telemetry has one for this side) and to any tap.
    pub fn report(
        &self,
        rule: Option<&accesslog::Rule>,
        direction: &'static str,
        entry: &accesslog::Entry<'_>,
    ) {
        if let Some(rule) = rule {
            self.access_log.log(rule, entry);
        }
        if self.tap.active() {
            self.tap.publish(tap::Event::of(direction, entry));
        }
    }

    /// A sampled request's span, ended and queued for the collector.
    pub fn trace(
        &self,
        snapshot: &Snapshot,
        span: Option<Box<trace::Pending>>,
        e: &trace::Ended<'_>,
    ) {
        let (Some(span), Some(collector)) = (span, &snapshot.tracing.collector) else {
            return;
        };
        let own = &snapshot.own.meta;
        let span = span.end(own, self.cfg.pod_ip, &self.cfg.proxy_id, e);
        let service = format!("{}.{}", own.canonical_service, own.namespace);
        self.tracer.record(collector, &service, span);
    }

    /// Why the proxy is not ready, or `None` when it is.
    pub fn not_ready(&self) -> Option<&'static str> {
        if self.drain.is_draining() {
            return Some("draining");
        }
        match self.tls.borrow().as_ref() {
            None => return Some("no certificate from citadel yet"),
            // Renewal failing is no reason to go unready while the
            // certificate still works; its expiry is.
            Some(t) if t.creds.remaining().is_zero() => {
                return Some("certificate expired and citadel has not renewed it");
            }
            Some(_) => {}
        }
        if !self.snapshot.borrow().complete() {
            return Some("no config from pilot yet");
        }
        None
    }
}

/// A serving thread's own connections: to peer sidecars, to the app over
/// HTTP/1.1 for the inbound side, and hyper's clients for the rest.
type Pools = (
    Pool,
    app::AppPool,
    Client<platform::Dialer, Body>,
    Client<platform::Dialer, Body>,
);

fn pools(cfg: &Config, metrics: &Metrics) -> Pools {
    let dialer = || platform::Dialer::new(cfg.socket_mark, None);
    (
        Pool::new(cfg.socket_mark, metrics.sidecar_connections.clone()),
        app::AppPool::new(dialer()),
        dialer().client(false),
        dialer().client(true),
    )
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start serving thread {index} of {threads}: {source}")]
    Thread {
        index: usize,
        threads: usize,
        source: std::io::Error,
    },
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind { addr, source })
}

/// Runs a proxy until `shutdown` resolves.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), ProxyError> {
    run_with_sockets(cfg, Box::new(platform::Linux), shutdown).await
}

/// As [`run`], calling `settled` each time the proxy has been ready for
/// [`SETTLE`] with no new certificate or config (the sidecar binary then
/// hands back the code that start-up and config updates run).
pub async fn run_settled(
    cfg: Config,
    shutdown: impl Future<Output = ()>,
    settled: fn(),
) -> Result<(), ProxyError> {
    serve(cfg, Box::new(platform::Linux), shutdown, Some(settled)).await
}

/// As [`run`], asking `sockets` about connections (tests stand in for the OS).
pub async fn run_with_sockets(
    cfg: Config,
    sockets: Box<dyn platform::Sockets>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ProxyError> {
    serve(cfg, sockets, shutdown, None).await
}

async fn serve(
    cfg: Config,
    sockets: Box<dyn platform::Sockets>,
    shutdown: impl Future<Output = ()>,
    settled: Option<fn()>,
) -> Result<(), ProxyError> {
    let cfg = Arc::new(cfg);
    let p = cfg.ports;
    let outbound = bind(cfg.addr(p.outbound)).await?;
    let inbound = bind(cfg.addr(p.inbound)).await?;
    let admin = bind(cfg.addr(p.admin)).await?;
    let stats = bind(cfg.addr(p.stats)).await?;
    let health = bind(cfg.addr(p.health)).await?;
    let agent = bind(cfg.addr(p.agent)).await?;

    let (shared, feeds) = Shared::new(cfg.clone(), sockets);
    let shards = server::Shards::spawn(&shared)?;

    let mut tasks = JoinSet::new();
    tasks.spawn(identity::run(cfg.clone(), feeds.tls));
    tasks
        .spawn(xds::Client::new(cfg.clone(), feeds.snapshot, feeds.status).run(shared.tls.clone()));
    tasks.spawn(server::serve_outbound(
        outbound,
        shared.clone(),
        shards.clone(),
    ));
    tasks.spawn(server::serve_inbound(inbound, shared.clone(), shards));
    for (listener, which) in [
        (admin, admin::Endpoints::Admin),
        (stats, admin::Endpoints::Stats),
        (health, admin::Endpoints::Health),
        (agent, admin::Endpoints::Agent),
    ] {
        tasks.spawn(server::serve_admin(listener, shared.clone(), which));
    }
    if let Some(then) = settled {
        tasks.spawn(when_settled(shared.clone(), then));
    }
    tracing::info!(proxy = %cfg.proxy_id, ip = %cfg.pod_ip, identity = %cfg.identity, "proxy started");
    tokio::select! {
        _ = shutdown => shared.drain.start(),
        _ = shared.drain.started() => {}
    }
    tracing::info!(proxy = %cfg.proxy_id, grace = ?cfg.drain_grace, "draining");
    let left = shared.drain.finish(cfg.drain_grace).await;
    if left > 0 {
        tracing::warn!(proxy = %cfg.proxy_id, connections = left, "grace period over; closing what is left");
    }
    tasks.shutdown().await;
    tracing::info!(proxy = %cfg.proxy_id, "proxy stopped");
    Ok(())
}

/// How long the proxy stays ready with the same certificate and config
/// before it counts as settled.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Calls `then` each time the proxy has been ready for [`SETTLE`] since
/// it started or its certificate or config last changed. Ends when either
/// source goes away.
async fn when_settled(shared: Arc<Shared>, then: fn()) {
    let (mut tls, mut snapshot) = (shared.tls.clone(), shared.snapshot.clone());
    // Since the last call: a change not yet settled.
    let mut unsettled = true;
    loop {
        let quiet = async {
            if unsettled && shared.not_ready().is_none() {
                tokio::time::sleep(SETTLE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        let changed = tokio::select! {
            changed = tls.changed() => changed,
            changed = snapshot.changed() => changed,
            () = quiet => {
                then();
                unsettled = false;
                continue;
            }
        };
        if changed.is_err() {
            return;
        }
        unsettled = true;
    }
}

#[cfg(test)]
mod future_sizes {
    fn size3<F, A, B, C, Fut>(_: F) -> usize
    where
        F: Fn(A, B, C) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    /// Every request's future is moved (memcpy) into its task or
    /// dispatcher; rare paths such as connecting must stay boxed so that
    /// the common path stays small (the connect path once made it 7.4 KB).
    #[test]
    fn request_futures_stay_small() {
        let outbound = size3(crate::outbound::handle);
        let inbound = size3(crate::inbound::handle);
        assert!(
            outbound <= 3072,
            "outbound::handle future is {outbound} bytes"
        );
        // 2.2 KB since each request carries its start time and byte tally
        // for the request metrics.
        assert!(inbound <= 2304, "inbound::handle future is {inbound} bytes");
    }
}
