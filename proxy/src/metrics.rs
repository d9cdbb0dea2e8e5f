//! Istio-standard request metrics, one registry per proxy.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// Labels of `istio_requests_total`, named as Istio names them.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub request_protocol: &'static str,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    /// Retries sent (attempts after the first).
    pub retries: Counter,
    /// Retries the policy wanted but the retry budget refused.
    pub retries_over_budget: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        // prometheus-client appends `_total` to counters.
        registry.register(
            "istio_requests",
            "Requests handled by the proxy",
            requests.clone(),
        );
        let retries = Counter::default();
        registry.register("mesh_retries", "Retries the sidecar sent", retries.clone());
        let retries_over_budget = Counter::default();
        registry.register(
            "mesh_retries_over_budget",
            "Retries not sent because the destination's retry budget was spent",
            retries_over_budget.clone(),
        );
        Self {
            registry,
            requests,
            retries,
            retries_over_budget,
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

/// Counters already looked up, by a small key (response code and the like),
/// so that the request path does not build and hash a label set per request.
/// A miss builds the labels once.
pub struct SeriesCache<K>(std::sync::Mutex<Vec<(K, Counter)>>);

impl<K> Default for SeriesCache<K> {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Vec::new()))
    }
}

impl<K: PartialEq> SeriesCache<K> {
    pub fn inc(
        &self,
        key: K,
        family: &Family<RequestLabels, Counter>,
        labels: impl FnOnce() -> RequestLabels,
    ) {
        let mut series = self.0.lock().unwrap();
        if let Some((_, c)) = series.iter().find(|(k, _)| *k == key) {
            c.inc();
            return;
        }
        let counter = family.get_or_create(&labels()).clone();
        counter.inc();
        series.push((key, counter));
    }
}

impl std::fmt::Debug for SeriesCache<(u16, &'static str, &'static str)> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SeriesCache")
    }
}

/// The service's short name and namespace from its host
/// (`reviews.default.svc.cluster.local` -> `reviews`, `default`).
pub fn service_name_namespace(host: &str) -> (String, String) {
    let mut parts = host.split('.');
    let name = parts.next().unwrap_or_default().to_string();
    let ns = parts.next().unwrap_or_default().to_string();
    (name, ns)
}
