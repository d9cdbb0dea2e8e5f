//! Istio-standard metrics, one registry per proxy: request and TCP metrics
//! reported by both sidecars of a hop, with Istio's names, labels and
//! buckets, and the proxy's own health read at each scrape.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use crate::identity::Tls;
use crate::wire::PeerMeta;
use crate::xds::XdsStatus;

/// Istio's buckets for `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's buckets for `istio_request_bytes` and `istio_response_bytes`.
pub const BYTES_BUCKETS: [f64; 9] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8];

/// Who talked to whom: the labels request and TCP metrics share.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peers {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub connection_security_policy: &'static str,
}

const UNKNOWN: &str = "unknown";

impl Peers {
    /// Everything `unknown` until filled in, as Istio labels what it cannot tell.
    pub fn new(reporter: &'static str) -> Self {
        let u = || UNKNOWN.to_string();
        Self {
            reporter,
            source_workload: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_cluster: u(),
            destination_workload: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_service: u(),
            destination_service_name: u(),
            destination_service_namespace: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_cluster: u(),
            connection_security_policy: UNKNOWN,
        }
    }

    pub fn source(&mut self, m: &PeerMeta, principal: impl ToString) {
        self.source_workload.clone_from(&m.workload);
        self.source_workload_namespace.clone_from(&m.namespace);
        self.source_app.clone_from(&m.app);
        self.source_version.clone_from(&m.version);
        self.source_canonical_service
            .clone_from(&m.canonical_service);
        self.source_canonical_revision
            .clone_from(&m.canonical_revision);
        self.source_cluster.clone_from(&m.cluster);
        self.source_principal = principal.to_string();
    }

    pub fn destination(&mut self, m: &PeerMeta, principal: impl ToString) {
        self.destination_workload.clone_from(&m.workload);
        self.destination_workload_namespace.clone_from(&m.namespace);
        self.destination_app.clone_from(&m.app);
        self.destination_version.clone_from(&m.version);
        self.destination_canonical_service
            .clone_from(&m.canonical_service);
        self.destination_canonical_revision
            .clone_from(&m.canonical_revision);
        self.destination_cluster.clone_from(&m.cluster);
        self.destination_principal = principal.to_string();
    }

    /// The destination service by its host
    /// (`reviews.default.svc.cluster.local`: name `reviews`, namespace `default`).
    pub fn service(&mut self, host: &str) {
        let mut parts = host.split('.');
        self.destination_service_name = parts.next().unwrap_or_default().to_string();
        self.destination_service_namespace = parts.next().unwrap_or(UNKNOWN).to_string();
        self.destination_service = host.to_string();
    }
}

/// Labels of the request metrics, named as Istio names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub request_protocol: &'static str,
    pub response_code: u16,
    /// Empty for requests that are not gRPC, as Istio reports them.
    pub grpc_response_status: String,
    pub response_flags: &'static str,
}

/// Labels of the TCP metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub request_protocol: &'static str,
    pub response_flags: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn bytes_histogram() -> Histogram {
    Histogram::new(BYTES_BUCKETS)
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Histograms<RequestLabels>,
    pub request_bytes: Histograms<RequestLabels>,
    pub response_bytes: Histograms<RequestLabels>,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent: Family<TcpLabels, Counter>,
    pub tcp_received: Family<TcpLabels, Counter>,
    /// Retries sent (attempts after the first).
    pub retries: Counter,
    /// Retries the policy wanted but the retry budget refused.
    pub retries_over_budget: Counter,
    /// Retries the policy wanted beyond the cluster's maxRetries in flight.
    pub retries_overflow: Counter,
    /// The app's metrics could not be read for the agent port's merge.
    pub app_scrape_failures: Counter,
    /// Connections to other sidecars opened.
    pub sidecar_connections: Counter,
}

/// What one finished request adds to its series.
#[derive(Clone, Copy, Debug)]
pub struct Observation {
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// A request series' four metrics, looked up once.
#[derive(Clone)]
pub struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    fn observe(&self, o: &Observation) {
        self.requests.inc();
        self.duration.observe(o.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(o.request_bytes as f64);
        self.response_bytes.observe(o.response_bytes as f64);
    }
}

/// A TCP connection's four series, looked up when it opens.
pub struct TcpSeries {
    closed: Counter,
    sent: Counter,
    received: Counter,
}

impl TcpSeries {
    /// `sent` and `received` are from the reporting sidecar's side:
    /// received from the connection's client, sent back to it.
    pub fn closed(&self, sent: u64, received: u64) {
        self.sent.inc_by(sent);
        self.received.inc_by(received);
        self.closed.inc();
    }
}

impl Metrics {
    /// `health` is read at each scrape for the proxy's own state.
    pub fn new(health: Health) -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled by the proxy",
            requests.clone(),
        );
        let duration = Histograms::new_with_constructor(duration_histogram as fn() -> Histogram);
        registry.register(
            "istio_request_duration_milliseconds",
            "Time from the request's arrival to its response's last byte",
            duration.clone(),
        );
        let request_bytes = Histograms::new_with_constructor(bytes_histogram as fn() -> Histogram);
        registry.register(
            "istio_request_bytes",
            "Request sizes, headers and body",
            request_bytes.clone(),
        );
        let response_bytes = Histograms::new_with_constructor(bytes_histogram as fn() -> Histogram);
        registry.register(
            "istio_response_bytes",
            "Response sizes, headers and body",
            response_bytes.clone(),
        );
        let tcp = |registry: &mut Registry, name: &str, help: &str| {
            let f = Family::<TcpLabels, Counter>::default();
            registry.register(name, help, f.clone());
            f
        };
        let tcp_opened = tcp(
            &mut registry,
            "istio_tcp_connections_opened",
            "TCP connections opened",
        );
        let tcp_closed = tcp(
            &mut registry,
            "istio_tcp_connections_closed",
            "TCP connections closed",
        );
        let tcp_sent = tcp(
            &mut registry,
            "istio_tcp_sent_bytes",
            "Bytes sent back to the connection's client",
        );
        let tcp_received = tcp(
            &mut registry,
            "istio_tcp_received_bytes",
            "Bytes received from the connection's client",
        );
        let retries = Counter::default();
        registry.register("mesh_retries", "Retries the sidecar sent", retries.clone());
        let retries_over_budget = Counter::default();
        registry.register(
            "mesh_retries_over_budget",
            "Retries not sent because the destination's retry budget was spent",
            retries_over_budget.clone(),
        );
        let retries_overflow = Counter::default();
        registry.register(
            "mesh_retries_overflow",
            "Retries not sent because the destination's connectionPool.http.maxRetries were all in flight",
            retries_overflow.clone(),
        );
        let app_scrape_failures = Counter::default();
        registry.register(
            "istio_agent_scrape_failures",
            "Scrapes of the app's own metrics (for the merge on the agent port) that failed",
            app_scrape_failures.clone(),
        );
        let sidecar_connections = Counter::default();
        registry.register(
            "mesh_sidecar_connections_opened",
            "HTTP/2 connections to other sidecars this sidecar opened (a DestinationRule's connectionPool retires and closes them)",
            sidecar_connections.clone(),
        );
        registry.register_collector(Box::new(health));
        Self {
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            retries,
            retries_over_budget,
            retries_overflow,
            app_scrape_failures,
            sidecar_connections,
        }
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }

    fn series(&self, labels: &RequestLabels) -> Series {
        Series {
            requests: self.requests.get_or_create(labels).clone(),
            duration: self.duration.get_or_create(labels).clone(),
            request_bytes: self.request_bytes.get_or_create(labels).clone(),
            response_bytes: self.response_bytes.get_or_create(labels).clone(),
        }
    }

    /// Records one request (for callers without a [`SeriesCache`]).
    pub fn observe(&self, labels: &RequestLabels, o: &Observation) {
        self.series(labels).observe(o);
    }

    /// Counts a TCP connection opened; the returned series count its close.
    pub fn tcp_opened(&self, labels: &TcpLabels) -> TcpSeries {
        self.tcp_opened.get_or_create(labels).inc();
        TcpSeries {
            closed: self.tcp_closed.get_or_create(labels).clone(),
            sent: self.tcp_sent.get_or_create(labels).clone(),
            received: self.tcp_received.get_or_create(labels).clone(),
        }
    }
}

/// Series already looked up, by a small key (response code and the like),
/// so that the request path does not build and hash a label set per
/// request. A miss builds the labels once.
pub struct SeriesCache<K>(std::sync::Mutex<Vec<(K, Series)>>);

impl<K> Default for SeriesCache<K> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<K> std::fmt::Debug for SeriesCache<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeriesCache")
    }
}

impl<K: PartialEq> SeriesCache<K> {
    pub fn observe(
        &self,
        key: K,
        metrics: &Metrics,
        labels: impl FnOnce() -> RequestLabels,
        o: &Observation,
    ) {
        let mut series = self.0.lock().unwrap();
        if let Some((_, s)) = series.iter().find(|(k, _)| *k == key) {
            s.observe(o);
            return;
        }
        let s = metrics.series(&labels());
        s.observe(o);
        series.push((key, s));
    }
}

/// The proxy's own state, read at each scrape: its control-plane
/// connection, the config it holds, and its certificate's remaining life.
pub struct Health {
    pub xds: watch::Receiver<XdsStatus>,
    pub tls: watch::Receiver<Option<Arc<Tls>>>,
    pub access_log: Arc<crate::accesslog::Writer>,
    pub tap: Arc<crate::tap::Tap>,
    pub trace: Arc<crate::trace::Stats>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Health")
    }
}

impl Collector for Health {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let xds = self.xds.borrow().clone();
        let gauge = |encoder: &mut DescriptorEncoder, name: &str, help: &str, v: f64| {
            let g = ConstGauge::new(v);
            let m = encoder.encode_descriptor(name, help, None, g.metric_type())?;
            g.encode(m)
        };
        gauge(
            &mut encoder,
            "mesh_proxy_control_plane_connected",
            "1 while the proxy's xDS stream to pilot is up",
            if xds.connected { 1.0 } else { 0.0 },
        )?;
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_config_updates",
            "Config responses from pilot, by whether the proxy applied (ACK) or rejected (NACK) them",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (result, n) in [("ack", xds.acks), ("nack", xds.nacks)] {
            let labels = [("result", result)];
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_config_version_info",
            "pilot's version of the config the proxy last applied",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        let labels = [("version", xds.version.as_str())];
        ConstGauge::new(1i64).encode(family.encode_family(&labels)?)?;
        if let Some(tls) = self.tls.borrow().as_ref() {
            gauge(
                &mut encoder,
                "mesh_proxy_cert_expiry_seconds",
                "Seconds until the workload certificate expires",
                tls.creds.remaining().as_secs_f64(),
            )?;
        }
        for (name, help, n) in [
            (
                "mesh_proxy_access_log_lines_dropped",
                "Access-log lines dropped because the log's output fell behind",
                &self.access_log.dropped,
            ),
            (
                "mesh_proxy_tap_events_dropped",
                "Tap events a tap reader missed because it fell behind",
                &self.tap.dropped,
            ),
        ] {
            let c = ConstCounter::new(n.load(Ordering::Relaxed));
            let m = encoder.encode_descriptor(name, help, None, c.metric_type())?;
            c.encode(m)?;
        }
        let t = &self.trace;
        let c = ConstCounter::new(t.exported.load(Ordering::Relaxed));
        let m = encoder.encode_descriptor(
            "mesh_proxy_trace_spans_exported",
            "Spans the collector accepted",
            None,
            c.metric_type(),
        )?;
        c.encode(m)?;
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_trace_spans_dropped",
            "Spans dropped: the export queue was full (queue_full) or the collector did not take them (export_failed)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for (reason, n) in [
            ("queue_full", &t.dropped_queue_full),
            ("export_failed", &t.dropped_export_failed),
        ] {
            let labels = [("reason", reason)];
            ConstCounter::new(n.load(Ordering::Relaxed)).encode(family.encode_family(&labels)?)?;
        }
        let mut family = encoder.encode_descriptor(
            "mesh_proxy_trace_context_malformed",
            "Requests whose trace-context header could not be read (the request went on in a new trace)",
            None,
            prometheus_client::metrics::MetricType::Counter,
        )?;
        for h in crate::trace::Header::ALL {
            let labels = [("header", h.label())];
            let n = t.malformed[h as usize].load(Ordering::Relaxed);
            ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
