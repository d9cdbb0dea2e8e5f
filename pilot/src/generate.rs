//! Turns the model into the resources each proxy receives. Everything but the
//! inbound listener is the same for every proxy, so it is built once per
//! model and shared.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use mesh_proto::resources as pb;
use mesh_proto::type_url;
use prost::Message;

use crate::istio::ServicePort;
use crate::model::{Model, Service, Workload};

/// One resource as it goes on the wire, with a version that changes exactly
/// when its content does.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub version: String,
    pub any: prost_types::Any,
}

impl Versioned {
    fn new<M: Message>(type_url: &str, msg: &M) -> Self {
        let value = msg.encode_to_vec();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        Self {
            version: format!("{:016x}", h.finish()),
            any: prost_types::Any {
                type_url: type_url.to_string(),
                value,
            },
        }
    }
}

pub type ByName = BTreeMap<String, Versioned>;

/// All resources of a model: shared ones by type, listeners by proxy id.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// When this config was built: convergence is measured from here.
    pub created: std::time::Instant,
    pub shared: BTreeMap<&'static str, ByName>,
    pub listeners: BTreeMap<String, Versioned>,
    pub model: Arc<Model>,
}

impl Snapshot {
    pub fn build(model: Arc<Model>, version: u64) -> Self {
        let mut clusters = ByName::new();
        let mut endpoints = ByName::new();
        let mut routes = ByName::new();
        for svc in model.services.values() {
            for port in &svc.ports {
                let mut subsets: Vec<Option<&str>> = vec![None];
                if let Some(s) = model.subsets.get(&svc.host) {
                    subsets.extend(s.keys().map(|k| Some(k.as_str())));
                }
                for subset in subsets {
                    let mut c = cluster(svc, port, subset);
                    crate::dr::apply(model.policies.get(&svc.host), subset, port.number, &mut c);
                    let eps = cluster_endpoints(&model, svc, port, subset, &c.name);
                    endpoints.insert(c.name.clone(), Versioned::new(type_url::ENDPOINTS, &eps));
                    clusters.insert(c.name.clone(), Versioned::new(type_url::CLUSTER, &c));
                }
                let rc = route_config(&model, svc, port);
                routes.insert(rc.name.clone(), Versioned::new(type_url::ROUTE, &rc));
            }
        }
        let listeners = model
            .workloads
            .values()
            .map(|w| {
                (
                    w.proxy_id(),
                    Versioned::new(type_url::LISTENER, &listener(&model, w)),
                )
            })
            .collect();
        let shared = BTreeMap::from([
            (type_url::CLUSTER, clusters),
            (type_url::ENDPOINTS, endpoints),
            (type_url::ROUTE, routes),
        ]);
        Self {
            version,
            created: std::time::Instant::now(),
            shared,
            listeners,
            model,
        }
    }

    /// The resources of one type that the proxy `proxy_id` should hold.
    pub fn for_proxy(&self, type_url: &str, proxy_id: &str) -> ByName {
        if type_url == type_url::LISTENER {
            return self
                .listeners
                .get(proxy_id)
                .map(|l| ByName::from([(LISTENER_NAME.to_string(), l.clone())]))
                .unwrap_or_default();
        }
        self.shared.get(type_url).cloned().unwrap_or_default()
    }
}

pub const LISTENER_NAME: &str = "inbound";

pub fn cluster_name(port: u32, subset: Option<&str>, host: &str) -> String {
    format!("outbound|{port}|{}|{host}", subset.unwrap_or_default())
}

fn protocol(port: &ServicePort) -> pb::Protocol {
    let declared = port
        .protocol
        .as_deref()
        .unwrap_or_default()
        .to_ascii_uppercase();
    let from_name = port
        .name
        .as_deref()
        .unwrap_or_default()
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_uppercase();
    let p = if declared.is_empty() {
        from_name
    } else {
        declared
    };
    match p.as_str() {
        "HTTP2" => pb::Protocol::Http2,
        "GRPC" | "GRPC-WEB" => pb::Protocol::Grpc,
        // HTTPS is TLS the app speaks itself: opaque to the sidecar, as in Istio.
        "TCP" | "TLS" | "HTTPS" | "MONGO" | "MYSQL" | "REDIS" => pb::Protocol::Tcp,
        _ => pb::Protocol::Http,
    }
}

fn cluster(svc: &Service, port: &ServicePort, subset: Option<&str>) -> pb::Cluster {
    pb::Cluster {
        name: cluster_name(port.number, subset, &svc.host),
        service: svc.host.clone(),
        port: port.number,
        subset: subset.unwrap_or_default().to_string(),
        protocol: protocol(port) as i32,
        vips: svc.vips.iter().map(|v| v.to_string()).collect(),
        ..Default::default()
    }
}

/// The port a workload's application listens on for a service port.
fn target_port(w: &Workload, port: &ServicePort) -> u32 {
    port.name
        .as_ref()
        .and_then(|n| w.ports.get(n).copied())
        .or(port.target_port)
        .unwrap_or(port.number)
}

pub(crate) fn cluster_endpoints(
    model: &Model,
    svc: &Service,
    port: &ServicePort,
    subset: Option<&str>,
    name: &str,
) -> pb::ClusterEndpoints {
    let labels = subset.and_then(|s| model.subsets.get(&svc.host).and_then(|m| m.get(s)));
    let endpoints = model
        .endpoints_of(svc, labels)
        .map(|w| pb::Endpoint {
            address: w.address.clone(),
            port: target_port(w, port),
            identity: if w.sidecar {
                w.identity(&model.trust_domain).to_string()
            } else {
                String::new()
            },
            tunnel_port: if w.sidecar {
                mesh_proto::ports::INBOUND as u32
            } else {
                0
            },
            workload: w.name.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone().into_iter().collect(),
            cluster: model.cluster_id.clone(),
        })
        .collect();
    pb::ClusterEndpoints {
        cluster: name.to_string(),
        endpoints,
    }
}

/// The names by which an application may call a service: the full host and
/// its shorter forms.
fn domains(host: &str) -> Vec<String> {
    let mut out = vec![host.to_string()];
    if let Some(short) = host.strip_suffix(".svc.cluster.local") {
        out.push(format!("{short}.svc"));
        out.push(short.to_string());
        if let Some((name, _ns)) = short.split_once('.') {
            out.push(name.to_string());
        }
    }
    out
}

fn route_config(model: &Model, svc: &Service, port: &ServicePort) -> pb::RouteConfig {
    let routes = match model.routes.get(&svc.host) {
        None => vec![crate::vs::default_route(cluster_name(
            port.number,
            None,
            &svc.host,
        ))],
        Some(r) => {
            // A destination without a port: this port for the service itself,
            // else the other service's first port.
            let cluster_of = |dest: &crate::istio::Destination| {
                let dest_port = dest.port.as_ref().map(|p| p.number).unwrap_or_else(|| {
                    if dest.host == svc.host {
                        port.number
                    } else {
                        model.services[&dest.host].ports[0].number
                    }
                });
                cluster_name(dest_port, dest.subset.as_deref(), &dest.host)
            };
            r.http
                .iter()
                .enumerate()
                .map(|(i, h)| {
                    let name = h.name.clone().unwrap_or_else(|| format!("route-{i}"));
                    crate::vs::to_wire(name, h, &cluster_of)
                })
                .collect()
        }
    };
    let mut domains = domains(&svc.host);
    domains.extend(svc.vips.iter().map(|ip| ip.to_string()));
    pb::RouteConfig {
        name: format!("{}:{}", svc.host, port.number),
        domains,
        port: port.number,
        routes,
    }
}

fn listener(model: &Model, w: &Workload) -> pb::Listener {
    let mut ports: BTreeMap<u32, pb::InboundPort> = BTreeMap::new();
    for svc in model.services.values() {
        if !model.endpoints_of(svc, None).any(|e| e == w) {
            continue;
        }
        for port in &svc.ports {
            let target = target_port(w, port);
            let entry = ports.entry(target).or_insert_with(|| pb::InboundPort {
                port: target,
                protocol: protocol(port) as i32,
                services: vec![],
            });
            entry.services.push(svc.host.clone());
        }
    }
    let (mode, port_modes) = model.mtls_for(w);
    pb::Listener {
        name: LISTENER_NAME.to_string(),
        workload: Some(pb::Workload {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            identity: w.identity(&model.trust_domain).to_string(),
            address: w.address.clone(),
            labels: w.labels.clone().into_iter().collect(),
            service_account: w.service_account.clone(),
            cluster: model.cluster_id.clone(),
        }),
        ports: ports.into_values().collect(),
        mtls: wire_mode(mode) as i32,
        port_mtls: port_modes
            .into_iter()
            .map(|(p, m)| (p, wire_mode(m) as i32))
            .collect(),
        policies: model
            .authz
            .iter()
            .filter(|a| a.scope.applies_to(w))
            .map(|a| a.policy.clone())
            .collect(),
        jwt_rules: model
            .jwt
            .iter()
            .filter(|j| j.scope.applies_to(w))
            .flat_map(|j| j.rules.iter().cloned())
            .collect(),
        telemetry: Some(telemetry(model, w)),
    }
}

/// A workload's Telemetry: each setting from the most specific resource
/// that sets it (selector, then namespace, then root namespace).
pub(crate) fn telemetry(model: &Model, w: &crate::model::Workload) -> pb::Telemetry {
    let mut applying: Vec<_> = model
        .telemetry
        .iter()
        .filter(|t| t.scope.applies_to(w))
        .collect();
    applying.sort_by_key(|t| t.rank());
    let access = applying.iter().find(|t| t.access_logs.is_some());
    let tracing = applying.iter().find(|t| t.tracing.is_some());
    let metrics = applying.iter().find(|t| t.metrics_off.is_some());
    let mut sources: Vec<String> = [access, tracing, metrics]
        .into_iter()
        .flatten()
        .map(|t| t.source.clone())
        .collect();
    sources.dedup();
    pb::Telemetry {
        access_logs: access
            .and_then(|t| t.access_logs.clone())
            .unwrap_or_default(),
        // No Telemetry says: the mesh config's default provider, at 1 %.
        tracing: tracing.and_then(|t| t.tracing.clone()).or_else(|| {
            Some(pb::Tracing {
                sampling_percent: mesh_proto::DEFAULT_TRACE_SAMPLING_PERCENT,
                collector: model.default_collector.clone()?,
                ..Default::default()
            })
        }),
        sources,
        client_metrics_off: metrics.and_then(|t| t.metrics_off).is_some_and(|m| m.0),
        server_metrics_off: metrics.and_then(|t| t.metrics_off).is_some_and(|m| m.1),
    }
}

fn wire_mode(m: crate::model::MtlsMode) -> pb::MtlsMode {
    match m {
        crate::model::MtlsMode::Strict => pb::MtlsMode::Strict,
        crate::model::MtlsMode::Permissive => pb::MtlsMode::Permissive,
        crate::model::MtlsMode::Disable => pb::MtlsMode::Disable,
    }
}
