//! pilot's metrics on the monitoring port (15014, `/metrics`), with
//! istiod's names: pushes and rejections per type, push and convergence
//! latency, connected proxies, and config loads.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TypeName {
    /// istiod's short names: `cds`, `eds`, `lds`, `rds`.
    pub r#type: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pushes: Family<TypeName, Counter>,
    rejects: Family<TypeName, Counter>,
    pub push_time: Histogram,
    pub convergence: Histogram,
    config_loads: Family<ResultLabel, Counter>,
    connected: Gauge,
    services: Gauge,
}

/// istiod's short name for a type.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        mesh_proto::type_url::CLUSTER => "cds",
        mesh_proto::type_url::ENDPOINTS => "eds",
        mesh_proto::type_url::LISTENER => "lds",
        mesh_proto::type_url::ROUTE => "rds",
        _ => "other",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let pushes = Family::<TypeName, Counter>::default();
        registry.register(
            "pilot_xds_pushes",
            "Responses pushed to proxies, by type",
            pushes.clone(),
        );
        let rejects = Family::<TypeName, Counter>::default();
        registry.register(
            "pilot_total_xds_rejects",
            "Responses proxies rejected (NACK), by type",
            rejects.clone(),
        );
        let push_time = Histogram::new(exponential_buckets(0.0001, 4.0, 10));
        registry.register(
            "pilot_xds_push_time",
            "Seconds to build and send one push to one proxy",
            push_time.clone(),
        );
        let convergence = Histogram::new(exponential_buckets(0.001, 3.0, 12));
        registry.register(
            "pilot_proxy_convergence_time",
            "Seconds from a config change to a proxy acknowledging everything it changed",
            convergence.clone(),
        );
        let config_loads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "mesh_pilot_config_loads",
            "Config loads: applied, or rejected (the last good config kept serving)",
            config_loads.clone(),
        );
        let connected = Gauge::default();
        registry.register("pilot_xds", "Proxies connected", connected.clone());
        let services = Gauge::default();
        registry.register("pilot_services", "Services pilot knows", services.clone());
        Self {
            registry,
            pushes,
            rejects,
            push_time,
            convergence,
            config_loads,
            connected,
            services,
        }
    }
}

impl Metrics {
    pub fn pushed(&self, type_url: &str) {
        self.pushes
            .get_or_create(&TypeName {
                r#type: short(type_url),
            })
            .inc();
    }

    pub fn rejected(&self, type_url: &str) {
        self.rejects
            .get_or_create(&TypeName {
                r#type: short(type_url),
            })
            .inc();
    }

    pub fn config_load(&self, applied: bool) {
        let result = if applied { "applied" } else { "rejected" };
        self.config_loads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Prometheus text, with the gauges read now.
    pub fn encode(&self, connected: usize, services: usize) -> String {
        self.connected.set(connected as i64);
        self.services.set(services as i64);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
