//! Choosing an endpoint within a cluster (DestinationRule `loadBalancer`),
//! ejecting failing ones (`outlierDetection`) and bounding concurrency
//! (`connectionPool`: the circuit breaker).

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::HeaderName;
use http_body::{Body as HttpBody, Frame, SizeHint};
use mesh_proto::resources as pb;
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::state::Endpoint;

/// A stable hash (FNV-1a, then MurmurHash3's finalizer so that short keys
/// spread over all 64 bits), so every sidecar maps a key to the same endpoint.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h = bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    });
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51afd7ed558ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
    h ^ (h >> 33)
}

/// Where a request's hash key comes from.
#[derive(Debug)]
pub enum HashKey {
    Header(HeaderName),
    Cookie {
        name: String,
        path: String,
        ttl: Duration,
    },
    SourceIp,
    Query(String),
}

#[derive(Debug)]
enum Table {
    /// Sorted (point, endpoint index).
    Ring(Vec<(u64, usize)>),
    /// Endpoint index per slot.
    Maglev(Vec<usize>),
}

#[derive(Debug)]
enum Policy {
    RoundRobin,
    Random,
    LeastRequest,
    PeakEwma,
    /// The endpoint the app dialled (`Balancer::passthrough`).
    Passthrough,
    Hash(HashKey, Table),
}

/// Per-endpoint load and health, kept beside the endpoint.
#[derive(Debug, Default)]
pub struct EndpointStats {
    /// Requests in flight.
    pub active: AtomicU32,
    /// Peak-EWMA of response latency, and when it was last updated.
    ewma: Mutex<Option<(f64, Instant)>>,
    outlier: Mutex<OutlierState>,
}

#[derive(Debug, Default)]
struct OutlierState {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
}

fn since_epoch(t: Instant) -> u64 {
    crate::wire::since_start(t).as_nanos() as u64
}

/// How long latencies are remembered (Linkerd's default decay).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// A latency to assume for endpoints never measured.
const EWMA_DEFAULT_NS: f64 = 1_000_000.0;
/// Envoy's cap on a growing ejection.
const MAX_EJECTION: Duration = Duration::from_secs(300);

impl EndpointStats {
    fn cost(&self) -> f64 {
        let active = self.active.load(Ordering::Relaxed) as f64;
        let ewma = self
            .ewma
            .lock()
            .unwrap()
            .map_or(EWMA_DEFAULT_NS, |(v, _)| v);
        ewma * (active + 1.0)
    }

    pub fn observe_latency(&self, rtt: Duration) {
        let now = Instant::now();
        let rtt = rtt.as_nanos() as f64;
        let mut e = self.ewma.lock().unwrap();
        let next = match *e {
            None => rtt,
            // Peak: a slower answer counts at once; faster ones decay in.
            Some((prev, _)) if rtt > prev => rtt,
            Some((prev, at)) => {
                let w = (-(now - at).as_secs_f64() / EWMA_DECAY.as_secs_f64()).exp();
                prev * w + rtt * (1.0 - w)
            }
        };
        *e = Some((next, now));
    }

    fn ejected(&self, now: Instant) -> bool {
        self.outlier
            .lock()
            .unwrap()
            .ejected_until
            .is_some_and(|t| t > now)
    }
}

/// Outlier detection settings, compiled.
#[derive(Debug, Clone)]
pub struct Outlier {
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    base_ejection: Duration,
    max_ejection_percent: u32,
    min_health_percent: u32,
}

/// What an attempt came to, for outlier detection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// A 5xx that is not a gateway error.
    ServerError,
    /// 502, 503, 504, or no answer at all (connect failure, reset, timeout).
    GatewayError,
}

/// The concurrency limits of a cluster (Envoy's circuit breakers).
#[derive(Debug)]
pub struct Breaker {
    active: Arc<Semaphore>,
    pending: AtomicU32,
    max_pending: u32,
}

impl Breaker {
    /// A slot for one request, waiting in the pending queue if there is
    /// room; `None` means the request overflows (503, flag UO).
    pub async fn acquire(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.active.clone().try_acquire_owned() {
            return Some(p);
        }
        let queued = self.pending.fetch_add(1, Ordering::AcqRel);
        if queued >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        let permit = self.active.clone().acquire_owned().await.ok();
        self.pending.fetch_sub(1, Ordering::AcqRel);
        permit
    }
}

/// A response body that holds a breaker slot until it is done.
pub struct Held<B> {
    inner: B,
    _permit: OwnedSemaphorePermit,
}

impl<B> Held<B> {
    pub fn new(inner: B, permit: OwnedSemaphorePermit) -> Self {
        Self {
            inner,
            _permit: permit,
        }
    }
}

impl<B: HttpBody<Data = Bytes> + Unpin> HttpBody for Held<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A cluster's balancing, ejection and limits.
#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    next: AtomicUsize,
    pub outlier: Option<Outlier>,
    /// Until when (ns since `since_epoch`'s start) some endpoint may be
    /// ejected: picks before then check each endpoint, later ones need not.
    ejected_until: std::sync::atomic::AtomicU64,
    pub breaker: Option<Arc<Breaker>>,
    pub connect_timeout: Option<Duration>,
    /// Retries that may be in flight at once (`maxRetries`); `None`: any.
    retries: Option<Arc<Semaphore>>,
    /// The endpoints grouped by locality, when the cluster balances by it.
    localities: Option<Localities>,
}

/// Endpoints grouped as a cluster's localityLbSetting says, seen from this
/// proxy's locality.
#[derive(Debug)]
enum Localities {
    /// Priority levels, nearest first: each takes the traffic its healthy
    /// share allows (Envoy's overprovisioning factor 1.4), the rest spills
    /// to the next.
    Failover(Vec<Vec<Arc<Endpoint>>>),
    /// Shares (`distribute`), each scaled by its group's health as a
    /// level's is.
    Weighted(Vec<(u32, Vec<Arc<Endpoint>>)>),
}

/// Envoy's overprovisioning factor: a level keeps all its traffic until
/// fewer than 1/1.4 (about 71 %) of its endpoints are healthy.
const OVERPROVISIONING: f64 = 1.4;

/// One of `groups` at random, each as likely as its share; `None` when
/// every share is zero.
fn pick_share<'a>(
    groups: impl Iterator<Item = &'a [Arc<Endpoint>]>,
    shares: &[f64],
) -> Option<&'a [Arc<Endpoint>]> {
    let total: f64 = shares.iter().sum();
    if total <= 0.0 {
        return None;
    }
    let mut roll = rand::rng().random::<f64>() * total;
    let mut last = None;
    for (g, share) in groups.zip(shares) {
        if *share > 0.0 {
            last = Some(g);
            if roll < *share {
                return Some(g);
            }
        }
        roll -= share;
    }
    last
}

/// "region/zone/subzone" as its three parts (missing ones empty).
fn locality_parts(l: &str) -> [&str; 3] {
    let mut it = l.splitn(3, '/');
    [
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    ]
}

/// Whether locality `l` is under `pattern` (`region/zone/*`, `region`, `*`).
fn locality_matches(pattern: &str, l: &str) -> bool {
    let have = locality_parts(l);
    for (i, p) in pattern.split('/').enumerate() {
        if p == "*" {
            return true;
        }
        if i >= 3 || have[i] != p {
            return false;
        }
    }
    true
}

/// How far an endpoint is from this proxy (0: nearest), by `failoverPriority`
/// labels when given, else by region, zone and subzone (and the failover
/// region after the own region).
fn priority(setting: &pb::LocalityLb, own: &pb::Workload, e: &pb::Endpoint) -> usize {
    let mine = locality_parts(&own.locality);
    let theirs = locality_parts(&e.locality);
    if !setting.failover_priority.is_empty() {
        let value = |labels: &std::collections::HashMap<String, String>,
                     parts: [&str; 3],
                     k: &str| match k {
            "topology.kubernetes.io/region" => Some(parts[0].to_string()),
            "topology.kubernetes.io/zone" => Some(parts[1].to_string()),
            "topology.istio.io/subzone" => Some(parts[2].to_string()),
            _ => labels.get(k).cloned(),
        };
        let matched = setting
            .failover_priority
            .iter()
            .take_while(|k| {
                let a = value(&own.labels, mine, k);
                a.is_some() && a == value(&e.labels, theirs, k)
            })
            .count();
        return setting.failover_priority.len() - matched;
    }
    match (mine, theirs) {
        ([r, z, s], [r2, z2, s2]) if r == r2 && z == z2 && s == s2 => 0,
        ([r, z, _], [r2, z2, _]) if r == r2 && z == z2 => 1,
        ([r, ..], [r2, ..]) if r == r2 => 2,
        ([r, ..], [r2, ..])
            if setting
                .failover_rules
                .iter()
                .any(|f| f.from == r && f.to == r2) =>
        {
            3
        }
        _ => 4,
    }
}

impl Default for Balancer {
    fn default() -> Self {
        Self {
            policy: Policy::RoundRobin,
            next: AtomicUsize::new(0),
            outlier: None,
            ejected_until: Default::default(),
            breaker: None,
            connect_timeout: None,
            retries: None,
            localities: None,
        }
    }
}

/// One retry in flight, counted against the cluster's `maxRetries` until
/// it is dropped.
pub struct RetrySlot(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

fn ring(endpoints: &[Arc<Endpoint>], size: u64) -> Table {
    let size = size.clamp(1024, 8 * 1024 * 1024) as usize;
    let per = size.div_ceil(endpoints.len().max(1));
    let mut points: Vec<(u64, usize)> = endpoints
        .iter()
        .enumerate()
        .flat_map(|(i, e)| (0..per).map(move |r| (hash(format!("{}_{r}", e.tunnel).as_bytes()), i)))
        .collect();
    points.sort_unstable();
    Table::Ring(points)
}

/// Maglev's lookup table (Eisenbud et al., 2016): each endpoint fills
/// slots in its own permutation order, in turn, until the table is full.
fn maglev(endpoints: &[Arc<Endpoint>], size: u64) -> Table {
    const DEFAULT: u64 = 65_537;
    let m = if size == 0 { DEFAULT } else { size } as usize;
    let n = endpoints.len();
    if n == 0 {
        return Table::Maglev(Vec::new());
    }
    let perms: Vec<(usize, usize)> = endpoints
        .iter()
        .map(|e| {
            let name = e.tunnel.to_string();
            let offset = hash(name.as_bytes()) as usize % m;
            let skip = hash(format!("{name}#skip").as_bytes()) as usize % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    let mut next = vec![0usize; n];
    let mut table = vec![usize::MAX; m];
    let mut filled = 0;
    'fill: loop {
        for i in 0..n {
            let (offset, skip) = perms[i];
            let mut c = (offset + next[i] * skip) % m;
            while table[c] != usize::MAX {
                next[i] += 1;
                c = (offset + next[i] * skip) % m;
            }
            table[c] = i;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Table::Maglev(table)
}

impl Balancer {
    /// `breaker`: the previous snapshot's, when the limits are unchanged.
    pub fn new(
        c: &pb::Cluster,
        endpoints: &[Arc<Endpoint>],
        breaker: Option<Arc<Breaker>>,
    ) -> Self {
        use pb::consistent_hash::Key;
        use pb::load_balancer::Simple;
        let policy = match &c.lb {
            None => Policy::RoundRobin,
            Some(lb) => match (&lb.hash, Simple::try_from(lb.simple)) {
                (Some(h), _) => {
                    let key = match &h.key {
                        Some(Key::Header(n)) => HeaderName::from_bytes(n.as_bytes())
                            .map(HashKey::Header)
                            .unwrap_or(HashKey::SourceIp),
                        Some(Key::Cookie(c)) => HashKey::Cookie {
                            name: c.name.clone(),
                            path: c.path.clone(),
                            ttl: Duration::from_millis(c.ttl_ms),
                        },
                        Some(Key::QueryParameter(q)) => HashKey::Query(q.clone()),
                        Some(Key::SourceIp(_)) | None => HashKey::SourceIp,
                    };
                    let table = if h.maglev {
                        maglev(endpoints, h.size)
                    } else {
                        ring(endpoints, h.size)
                    };
                    Policy::Hash(key, table)
                }
                (None, Ok(Simple::Random)) => Policy::Random,
                (None, Ok(Simple::LeastRequest)) => Policy::LeastRequest,
                (None, Ok(Simple::PeakEwma)) => Policy::PeakEwma,
                (None, Ok(Simple::Passthrough)) => Policy::Passthrough,
                (None, _) => Policy::RoundRobin,
            },
        };
        let h2 = crate::state::speaks_h2(c.protocol);
        let breaker = breaker.or_else(|| {
            c.pool.as_ref().and_then(|p| {
                let limit = |v: u32| if v == 0 { u32::MAX } else { v };
                // HTTP/1.1 apps take one request per connection at a time.
                let active = if h2 {
                    limit(p.http2_max_requests)
                } else {
                    limit(p.max_connections).min(limit(p.http2_max_requests))
                };
                let pending = if h2 {
                    0
                } else {
                    limit(p.http1_max_pending_requests)
                };
                (active != u32::MAX).then(|| {
                    Arc::new(Breaker {
                        active: Arc::new(Semaphore::new(active as usize)),
                        pending: AtomicU32::new(0),
                        max_pending: pending,
                    })
                })
            })
        });
        Self {
            policy,
            next: AtomicUsize::new(0),
            ejected_until: endpoints
                .iter()
                .filter_map(|e| e.stats.outlier.lock().unwrap().ejected_until)
                .max()
                .map_or(0, since_epoch)
                .into(),
            outlier: c.outlier.as_ref().map(|o| Outlier {
                consecutive_5xx: o.consecutive_5xx_errors,
                consecutive_gateway: o.consecutive_gateway_errors,
                base_ejection: Duration::from_millis(o.base_ejection_time_ms),
                max_ejection_percent: o.max_ejection_percent,
                min_health_percent: o.min_health_percent,
            }),
            breaker,
            connect_timeout: c
                .pool
                .as_ref()
                .filter(|p| p.connect_timeout_ms > 0)
                .map(|p| Duration::from_millis(p.connect_timeout_ms)),
            retries: c
                .pool
                .as_ref()
                .filter(|p| p.max_retries > 0)
                .map(|p| Arc::new(Semaphore::new(p.max_retries as usize))),
            localities: None,
        }
    }

    /// Groups `endpoints` by locality as the cluster's setting says, seen
    /// from `own` (this proxy's workload). Nothing to group without a
    /// setting, without a locality of its own, or under consistent hashing
    /// (whose table spans every endpoint).
    pub fn with_localities(
        mut self,
        c: &pb::Cluster,
        endpoints: &[Arc<Endpoint>],
        own: Option<&pb::Workload>,
    ) -> Self {
        let setting = c.lb.as_ref().and_then(|lb| lb.locality.as_ref());
        let (Some(setting), Some(own)) = (setting, own) else {
            return self;
        };
        if own.locality.is_empty() || matches!(self.policy, Policy::Hash(..)) {
            return self;
        }
        if let Some(rule) = setting
            .distribute
            .iter()
            .find(|d| locality_matches(&d.from, &own.locality))
        {
            let mut to: Vec<(&String, &u32)> = rule.to.iter().collect();
            // The most specific pattern takes an endpoint first.
            to.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            let mut groups: Vec<(u32, Vec<Arc<Endpoint>>)> =
                to.iter().map(|(_, w)| (**w, Vec::new())).collect();
            for e in endpoints {
                if let Some(i) = to
                    .iter()
                    .position(|(p, _)| locality_matches(p, &e.pb.locality))
                {
                    groups[i].1.push(e.clone());
                }
            }
            groups.retain(|(w, g)| *w > 0 && !g.is_empty());
            self.localities = Some(Localities::Weighted(groups));
        } else if setting.failover {
            let mut levels: Vec<Vec<Arc<Endpoint>>> =
                vec![Vec::new(); 5.max(setting.failover_priority.len() + 1)];
            for e in endpoints {
                levels[priority(setting, own, &e.pb)].push(e.clone());
            }
            levels.retain(|l| !l.is_empty());
            if levels.len() > 1 {
                self.localities = Some(Localities::Failover(levels));
            }
        }
        self
    }

    /// The endpoints a request may go to: every one, or one locality
    /// group chosen by the cluster's locality setting.
    fn group<'a>(&'a self, endpoints: &'a [Arc<Endpoint>]) -> &'a [Arc<Endpoint>] {
        let Some(localities) = &self.localities else {
            return endpoints;
        };
        let now = Instant::now();
        // Nothing ejected: every group is whole.
        let whole = since_epoch(now) >= self.ejected_until.load(Ordering::Relaxed);
        let health = |g: &[Arc<Endpoint>]| match whole {
            true => 1.0,
            false => {
                let healthy = g.iter().filter(|e| !e.stats.ejected(now)).count();
                (OVERPROVISIONING * healthy as f64 / g.len() as f64).min(1.0)
            }
        };
        match localities {
            Localities::Weighted(groups) => {
                let shares: Vec<f64> = groups.iter().map(|(w, g)| *w as f64 * health(g)).collect();
                pick_share(groups.iter().map(|(_, g)| g.as_slice()), &shares).unwrap_or(endpoints)
            }
            Localities::Failover(levels) => {
                if whole {
                    return &levels[0];
                }
                let mut left = 1.0f64;
                let shares: Vec<f64> = levels
                    .iter()
                    .map(|l| {
                        let share = health(l).min(left);
                        left -= share;
                        share
                    })
                    .collect();
                // Everything ejected: the nearest level, whose ejections
                // the outlier's own panic rules then weigh.
                pick_share(levels.iter().map(Vec::as_slice), &shares).unwrap_or(&levels[0])
            }
        }
    }

    /// A slot for one more retry, or `None` when `maxRetries` are in flight.
    pub fn retry_slot(&self) -> Option<RetrySlot> {
        match &self.retries {
            None => Some(RetrySlot(None)),
            Some(s) => s
                .clone()
                .try_acquire_owned()
                .ok()
                .map(|p| RetrySlot(Some(p))),
        }
    }

    /// PASSTHROUGH: the endpoint at `dst`, the address the app dialled,
    /// when the cluster has it. `None` when the policy is another, or
    /// there is no such endpoint (then `pick` chooses round robin).
    pub fn passthrough<'a>(
        &self,
        endpoints: &'a [Arc<Endpoint>],
        dst: Option<std::net::SocketAddr>,
    ) -> Option<&'a Arc<Endpoint>> {
        if !matches!(self.policy, Policy::Passthrough) {
            return None;
        }
        let dst = dst?;
        endpoints
            .iter()
            .find(|e| e.pb.port == u32::from(dst.port()) && e.pb.address.parse() == Ok(dst.ip()))
    }

    /// Whether picks weigh latency (only then is it measured).
    pub fn wants_latency(&self) -> bool {
        matches!(self.policy, Policy::PeakEwma)
    }

    pub fn hash_key(&self) -> Option<&HashKey> {
        match &self.policy {
            Policy::Hash(k, _) => Some(k),
            _ => None,
        }
    }

    /// An endpoint for a request (`key`: its hash, for consistent hashing).
    pub fn pick<'a>(
        &'a self,
        endpoints: &'a [Arc<Endpoint>],
        key: Option<u64>,
    ) -> Option<&'a Arc<Endpoint>> {
        let endpoints = self.group(endpoints);
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        // Ejected endpoints are skipped, unless too few would be left.
        let now = self
            .outlier
            .as_ref()
            .map(|_| Instant::now())
            .filter(|t| since_epoch(*t) < self.ejected_until.load(Ordering::Relaxed));
        let usable = |e: &Endpoint| now.is_none_or(|t| !e.stats.ejected(t));
        let panic_mode = match (&self.outlier, now) {
            (Some(o), Some(t)) => {
                let healthy = endpoints.iter().filter(|e| !e.stats.ejected(t)).count();
                healthy == 0 || healthy * 100 < n * o.min_health_percent as usize
            }
            _ => false,
        };
        let ok = |e: &Endpoint| panic_mode || usable(e);
        match &self.policy {
            Policy::RoundRobin | Policy::Passthrough => {
                let start = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| &endpoints[(start + i) % n]).find(|e| ok(e))
            }
            Policy::Random => {
                let start = rand::rng().random_range(0..n);
                (0..n).map(|i| &endpoints[(start + i) % n]).find(|e| ok(e))
            }
            Policy::LeastRequest | Policy::PeakEwma => {
                let mut rng = rand::rng();
                let mut choose = || {
                    let start = rng.random_range(0..n);
                    (0..n).map(|i| &endpoints[(start + i) % n]).find(|e| ok(e))
                };
                let (a, b) = (choose()?, choose()?);
                let cost = |e: &Endpoint| match self.policy {
                    Policy::PeakEwma => e.stats.cost(),
                    _ => e.stats.active.load(Ordering::Relaxed) as f64,
                };
                Some(if cost(b) < cost(a) { b } else { a })
            }
            Policy::Hash(_, table) => {
                let key = key.unwrap_or_else(|| rand::rng().random());
                match table {
                    Table::Ring(points) if !points.is_empty() => {
                        let at = points.partition_point(|(p, _)| *p < key);
                        (0..points.len())
                            .map(|i| &endpoints[points[(at + i) % points.len()].1])
                            .find(|e| ok(e))
                    }
                    Table::Maglev(slots) if !slots.is_empty() => {
                        let at = (key % slots.len() as u64) as usize;
                        let first = &endpoints[slots[at]];
                        if ok(first) {
                            return Some(first);
                        }
                        (1..slots.len())
                            .map(|i| &endpoints[slots[(at + i) % slots.len()]])
                            .find(|e| ok(e))
                    }
                    _ => endpoints.first(),
                }
            }
        }
    }

    /// Records an attempt's outcome; may eject the endpoint.
    pub fn record(&self, endpoints: &[Arc<Endpoint>], e: &Endpoint, outcome: Outcome) {
        let Some(o) = &self.outlier else { return };
        let now = Instant::now();
        let mut s = e.stats.outlier.lock().unwrap();
        match outcome {
            Outcome::Success => {
                s.consecutive_5xx = 0;
                s.consecutive_gateway = 0;
                return;
            }
            Outcome::ServerError => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway = 0;
            }
            Outcome::GatewayError => {
                s.consecutive_5xx += 1;
                s.consecutive_gateway += 1;
            }
        }
        let trips = (o.consecutive_5xx > 0 && s.consecutive_5xx >= o.consecutive_5xx)
            || (o.consecutive_gateway > 0 && s.consecutive_gateway >= o.consecutive_gateway);
        if !trips || s.ejected_until.is_some_and(|t| t > now) {
            return;
        }
        drop(s);
        // At most max_ejection_percent of the endpoints out at once, but
        // always at least one (Envoy's rule).
        let ejected = endpoints.iter().filter(|x| x.stats.ejected(now)).count();
        let allowed = (endpoints.len() * o.max_ejection_percent as usize / 100).max(1);
        let mut s = e.stats.outlier.lock().unwrap();
        if ejected >= allowed {
            return;
        }
        s.times_ejected += 1;
        let for_ = (o.base_ejection * s.times_ejected).min(MAX_EJECTION.max(o.base_ejection));
        s.ejected_until = Some(now + for_);
        self.ejected_until
            .fetch_max(since_epoch(now + for_), Ordering::Relaxed);
        s.consecutive_5xx = 0;
        s.consecutive_gateway = 0;
        tracing::info!(endpoint = %e.tunnel, for_ = ?for_, "ejecting endpoint (outlier detection)");
    }
}

#[cfg(test)]
mod localities {
    use super::*;

    fn own(locality: &str) -> pb::Workload {
        pb::Workload {
            locality: locality.into(),
            labels: [("network".to_string(), "n1".to_string())].into(),
            ..Default::default()
        }
    }

    fn ep(locality: &str, network: &str) -> pb::Endpoint {
        pb::Endpoint {
            locality: locality.into(),
            labels: [("network".to_string(), network.to_string())].into(),
            ..Default::default()
        }
    }

    #[test]
    fn nearer_endpoints_come_first() {
        let s = pb::LocalityLb {
            failover: true,
            failover_rules: vec![pb::LocalityFailover {
                from: "us-east".into(),
                to: "eu-west".into(),
            }],
            ..Default::default()
        };
        let me = own("us-east/a/1");
        let p = |l: &str| priority(&s, &me, &ep(l, ""));
        assert_eq!(p("us-east/a/1"), 0);
        assert_eq!(p("us-east/a/2"), 1);
        assert_eq!(p("us-east/b"), 2);
        assert_eq!(p("eu-west/c"), 3, "the failover region");
        assert_eq!(p("ap-south/d"), 4);
        // By labels instead, in order.
        let by_labels = pb::LocalityLb {
            failover: true,
            failover_priority: vec!["topology.kubernetes.io/region".into(), "network".into()],
            ..Default::default()
        };
        let p = |l: &str, n: &str| priority(&by_labels, &me, &ep(l, n));
        assert_eq!(p("us-east/z", "n1"), 0);
        assert_eq!(p("us-east/z", "n2"), 1);
        assert_eq!(p("eu-west/z", "n1"), 2, "the first label decides first");
    }

    #[test]
    fn locality_patterns() {
        assert!(locality_matches("us-east/zone-a/*", "us-east/zone-a/s1"));
        assert!(locality_matches("us-east/*", "us-east/zone-b"));
        assert!(locality_matches("*", "anywhere/at/all"));
        assert!(locality_matches("us-east", "us-east/zone-a"));
        assert!(!locality_matches("us-east/zone-a/*", "us-east/zone-b/s1"));
        assert!(!locality_matches("eu-west/*", "us-east/zone-a"));
    }
}

#[cfg(test)]
mod retry_slots {
    use super::*;

    #[test]
    fn max_retries_bounds_the_retries_in_flight() {
        let cluster = pb::Cluster {
            pool: Some(pb::ConnectionPool {
                max_retries: 2,
                ..Default::default()
            }),
            ..Default::default()
        };
        let b = Balancer::new(&cluster, &[], None);
        let first = b.retry_slot().expect("one");
        let _second = b.retry_slot().expect("two");
        assert!(b.retry_slot().is_none(), "a third retry in flight");
        drop(first);
        assert!(
            b.retry_slot().is_some(),
            "a slot comes back when its retry ends"
        );
        let unlimited = Balancer::new(&pb::Cluster::default(), &[], None);
        let held: Vec<_> = (0..100).filter_map(|_| unlimited.retry_slot()).collect();
        assert_eq!(held.len(), 100);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| {
                Arc::new(
                    Endpoint::new(pb::Endpoint {
                        address: format!("127.0.0.{}", i + 1),
                        port: 9080,
                        identity: "spiffe://cluster.local/ns/default/sa/x".into(),
                        tunnel_port: 15006,
                        ..Default::default()
                    })
                    .unwrap(),
                )
            })
            .collect()
    }

    fn cluster(lb: Option<pb::LoadBalancer>, outlier: Option<pb::OutlierDetection>) -> pb::Cluster {
        pb::Cluster {
            lb,
            outlier,
            ..Default::default()
        }
    }

    fn hashed(maglev: bool) -> pb::LoadBalancer {
        pb::LoadBalancer {
            hash: Some(pb::ConsistentHash {
                key: Some(pb::consistent_hash::Key::Header("x-user".into())),
                maglev,
                size: 0,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn consistent_hashing_is_sticky_spreads_and_moves_few_keys() {
        for maglev in [false, true] {
            let eps = endpoints(4);
            let b = Balancer::new(&cluster(Some(hashed(maglev)), None), &eps, None);
            let pick =
                |b: &Balancer, eps: &[Arc<Endpoint>], k: u64| b.pick(eps, Some(k)).unwrap().tunnel;
            let keys: Vec<u64> = (0..2000u32).map(|k| hash(&k.to_be_bytes())).collect();
            let first: Vec<_> = keys.iter().map(|k| pick(&b, &eps, *k)).collect();
            assert_eq!(
                first,
                keys.iter().map(|k| pick(&b, &eps, *k)).collect::<Vec<_>>()
            );
            for e in &eps {
                let share = first.iter().filter(|t| **t == e.tunnel).count();
                assert!(
                    (300..700).contains(&share),
                    "maglev={maglev}: {share} of 2000 on one of 4"
                );
            }
            // Dropping one endpoint moves (mostly) only its keys.
            let fewer = eps[..3].to_vec();
            let b2 = Balancer::new(&cluster(Some(hashed(maglev)), None), &fewer, None);
            let moved = keys
                .iter()
                .zip(&first)
                .filter(|(k, was)| **was != eps[3].tunnel && pick(&b2, &fewer, **k) != **was)
                .count();
            assert!(
                moved < 200,
                "maglev={maglev}: {moved} keys moved needlessly"
            );
        }
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(2);
        let lb = pb::LoadBalancer {
            simple: pb::load_balancer::Simple::LeastRequest as i32,
            ..Default::default()
        };
        let b = Balancer::new(&cluster(Some(lb), None), &eps, None);
        eps[0].stats.active.store(10, Ordering::Relaxed);
        let to_idle = (0..1000)
            .filter(|_| b.pick(&eps, None).unwrap().tunnel == eps[1].tunnel)
            .count();
        // Two random choices: both land on the busy one a quarter of the time.
        assert!(to_idle > 650, "{to_idle}");
    }

    #[test]
    fn consecutive_errors_eject_for_a_growing_time_within_the_percentage() {
        let eps = endpoints(3);
        let od = pb::OutlierDetection {
            consecutive_5xx_errors: 2,
            base_ejection_time_ms: 60_000,
            max_ejection_percent: 10,
            ..Default::default()
        };
        let b = Balancer::new(&cluster(None, Some(od)), &eps, None);
        b.record(&eps, &eps[0], Outcome::ServerError);
        b.record(&eps, &eps[0], Outcome::Success);
        b.record(&eps, &eps[0], Outcome::ServerError);
        assert!(
            !eps[0].stats.ejected(Instant::now()),
            "a success resets the count"
        );
        b.record(&eps, &eps[0], Outcome::GatewayError);
        assert!(eps[0].stats.ejected(Instant::now()));
        assert!((0..30).all(|_| b.pick(&eps, None).unwrap().tunnel != eps[0].tunnel));
        // 10 % of 3 rounds to none, but one may always go: not a second.
        b.record(&eps, &eps[1], Outcome::ServerError);
        b.record(&eps, &eps[1], Outcome::ServerError);
        assert!(!eps[1].stats.ejected(Instant::now()));
    }
}
