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
/// when its content does. The name is shared with every proxy stream that
/// remembers having sent it, so 2,000 streams hold one copy.
#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub name: Arc<str>,
    /// A hash of the encoded resource; on the wire as 16 hex digits.
    pub version: u64,
    pub any: prost_types::Any,
}

impl Versioned {
    fn new<M: Message>(name: &str, type_url: &str, msg: &M) -> Self {
        let value = msg.encode_to_vec();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        value.hash(&mut h);
        Self {
            name: Arc::from(name),
            version: h.finish(),
            any: prost_types::Any {
                type_url: type_url.to_string(),
                value,
            },
        }
    }

    /// The version as xDS carries it.
    pub fn version_string(&self) -> String {
        wire_version(self.version)
    }
}

/// A version as xDS carries it: 16 hex digits.
pub fn wire_version(v: u64) -> String {
    format!("{v:016x}")
}

/// A version a proxy reports having (`initial_resource_versions`); `None`
/// when it is not one pilot could have sent, so it never matches.
pub fn parse_version(v: &str) -> Option<u64> {
    (v.len() == 16).then(|| u64::from_str_radix(v, 16).ok())?
}

/// Shared: a snapshot built after a change takes from the one before
/// every resource the change left as it was.
pub type ByName = BTreeMap<String, Arc<Versioned>>;

/// Clusters and endpoints, by type.
type Types = BTreeMap<&'static str, ByName>;

/// All resources of a model: each service's clusters, endpoints and routes,
/// listeners by proxy id, and which services each proxy is told of.
#[derive(Debug)]
pub struct Snapshot {
    pub version: u64,
    /// When this config was built: convergence is measured from here.
    pub created: std::time::Instant,
    /// By service host, its clusters and endpoints (by type) for each set
    /// of DestinationRules proxies may follow for it
    /// ([`Model::rule_choices`]): which one a proxy is sent depends on its
    /// namespace, by the rules' namespaces and `exportTo`.
    by_host: BTreeMap<String, Vec<(Vec<usize>, Types)>>,
    /// By service host, its route configs for each VirtualService proxies
    /// may follow to it ([`Model::route_choices`]): which one a proxy is
    /// sent depends on its namespace, by the VirtualServices' `exportTo`.
    routes: BTreeMap<String, Vec<(Option<usize>, ByName)>>,
    /// The hosts each proxy is told of (its services' `exportTo` and its
    /// Sidecar), shared by proxies of one namespace and Sidecar.
    views: BTreeMap<String, Arc<Vec<String>>>,
    pub listeners: ByName,
    pub model: Arc<Model>,
}

impl Snapshot {
    pub fn build(model: Arc<Model>, version: u64) -> Self {
        Self::build_after(model, version, None)
    }

    /// As [`Snapshot::build`], sharing with `previous` every resource that
    /// encodes the same: after one endpoint changes, the two snapshots
    /// that live side by side while proxies move over differ by that
    /// resource, not by a whole copy of the mesh.
    pub fn build_after(model: Arc<Model>, version: u64, previous: Option<&Snapshot>) -> Self {
        // The same choice of rules before, or else the first: a resource is
        // reused only when it encodes the same, so a miss costs a copy.
        let before = |host: &str, choice: &[usize], t: &str| {
            let variants = previous?.by_host.get(host)?;
            let same = variants.iter().find(|(c, _)| c == choice);
            same.or(variants.first())?.1.get(t)
        };
        let members = model.members();
        // Which services each workload is an endpoint of, for its listener.
        let mut serves: std::collections::HashMap<String, Vec<&Service>> = Default::default();
        for svc in model.services.values() {
            for e in &members[svc.host.as_str()] {
                let id = e.proxy_id();
                if model.workloads.get(&id) == Some(*e) {
                    serves.entry(id).or_default().push(svc);
                }
            }
        }
        let mut by_host = BTreeMap::new();
        let mut routes = BTreeMap::new();
        for svc in model.services.values() {
            let svc_members = &members[svc.host.as_str()];
            let mut variants = Vec::new();
            for choice in model.rule_choices(&svc.host) {
                let (clusters_before, endpoints_before) = (
                    before(&svc.host, &choice, type_url::CLUSTER),
                    before(&svc.host, &choice, type_url::ENDPOINTS),
                );
                let (subsets, policy) = model.rule_set(&choice);
                let mut clusters = ByName::new();
                let mut endpoints = ByName::new();
                for port in &svc.ports {
                    let named = subsets.iter().map(|(name, labels)| Some((*name, *labels)));
                    for subset in std::iter::once(None).chain(named) {
                        let name = subset.map(|(name, _)| name);
                        let mut c = cluster(svc, port, name);
                        crate::dr::apply(policy, name, port.number, &mut c);
                        let labels = subset.map(|(_, labels)| labels);
                        let eps = cluster_endpoints(&model, svc_members, port, labels, &c.name);
                        let fresh = Versioned::new(&c.name, type_url::ENDPOINTS, &eps);
                        let shared = reuse(was(endpoints_before, &c.name), fresh);
                        endpoints.insert(c.name.clone(), shared);
                        let fresh = Versioned::new(&c.name, type_url::CLUSTER, &c);
                        let shared = reuse(was(clusters_before, &c.name), fresh);
                        clusters.insert(c.name.clone(), shared);
                    }
                }
                let types = BTreeMap::from([
                    (type_url::CLUSTER, clusters),
                    (type_url::ENDPOINTS, endpoints),
                ]);
                variants.push((choice, types));
            }
            by_host.insert(svc.host.clone(), variants);
            let variants = model
                .route_choices(&svc.host)
                .into_iter()
                .map(|choice| {
                    let vs = choice.map(|i| &model.routes[&svc.host][i]);
                    let routes_before = previous
                        .and_then(|p| p.routes.get(&svc.host)?.iter().find(|(c, _)| *c == choice))
                        .map(|(_, by_name)| by_name);
                    let mut routes = ByName::new();
                    for port in &svc.ports {
                        let rc = route_config(&model, svc, port, vs);
                        let fresh = Versioned::new(&rc.name, type_url::ROUTE, &rc);
                        routes.insert(rc.name.clone(), reuse(was(routes_before, &rc.name), fresh));
                    }
                    (choice, routes)
                })
                .collect();
            routes.insert(svc.host.clone(), variants);
        }
        let listeners = model
            .workloads
            .values()
            .map(|w| {
                let id = w.proxy_id();
                let own = serves.get(&id).map_or(&[][..], Vec::as_slice);
                let fresh =
                    Versioned::new(LISTENER_NAME, type_url::LISTENER, &listener(&model, w, own));
                let shared = reuse(previous.and_then(|p| p.listeners.get(&id)), fresh);
                (id, shared)
            })
            .collect();
        let mut scopes: BTreeMap<(&str, Option<&str>), Arc<Vec<String>>> = BTreeMap::new();
        let views = model
            .workloads
            .values()
            .map(|w| {
                let sidecar = model.sidecar_for(&w.namespace, &w.labels);
                let scope = (w.namespace.as_str(), sidecar.map(|s| s.name.as_str()));
                let view = scopes
                    .entry(scope)
                    .or_insert_with(|| Arc::new(visible_hosts(&model, &w.namespace, &w.labels)));
                (w.proxy_id(), view.clone())
            })
            .collect();
        Self {
            version,
            created: std::time::Instant::now(),
            by_host,
            routes,
            views,
            listeners,
            model,
        }
    }

    /// The resources of one type that the proxy `proxy_id` should hold:
    /// for clusters, endpoints and routes, those of the services it is
    /// told of. A proxy pilot does not know (`<name>.<namespace>`) is
    /// scoped as a workload without labels in that namespace.
    /// Borrowed: a push copies only what changed.
    pub fn for_proxy(&self, type_url: &str, proxy_id: &str) -> BTreeMap<&str, &Versioned> {
        if type_url == type_url::LISTENER {
            return self
                .listeners
                .get(proxy_id)
                .map(|l| BTreeMap::from([(LISTENER_NAME, &**l)]))
                .unwrap_or_default();
        }
        // Names may hold dots; namespaces cannot.
        let namespace = proxy_id.rsplit_once('.').map_or("", |(_, ns)| ns);
        let unknown;
        let hosts = match self.views.get(proxy_id) {
            Some(v) => v.as_slice(),
            None => {
                unknown = visible_hosts(&self.model, namespace, &Default::default());
                unknown.as_slice()
            }
        };
        let of_host = |h: &String| -> Option<&ByName> {
            if type_url != type_url::ROUTE {
                let variants = self.by_host.get(h)?;
                let types = match variants.as_slice() {
                    // Every namespace follows the same rules.
                    [(_, only)] => only,
                    _ => {
                        let choice = self.model.rule_choice(h, namespace);
                        &variants.iter().find(|(c, _)| *c == choice)?.1
                    }
                };
                return types.get(type_url);
            }
            let choice = self.model.route_choice(h, namespace);
            let variants = self.routes.get(h)?;
            variants.iter().find(|(c, _)| *c == choice).map(|(_, r)| r)
        };
        hosts
            .iter()
            .filter_map(of_host)
            .flat_map(|by_name| by_name.iter().map(|(n, r)| (n.as_str(), &**r)))
            .collect()
    }
}

/// The resource named `name` in `by_name`, if any.
fn was<'a>(by_name: Option<&'a ByName>, name: &str) -> Option<&'a Arc<Versioned>> {
    by_name?.get(name)
}

/// `fresh`, or the resource it replaces when that encodes the same.
fn reuse(before: Option<&Arc<Versioned>>, fresh: Versioned) -> Arc<Versioned> {
    match before {
        Some(old) if **old == fresh => old.clone(),
        _ => Arc::new(fresh),
    }
}

/// The hosts a proxy in `namespace` with `labels` is told of.
fn visible_hosts(model: &Model, namespace: &str, labels: &crate::istio::Labels) -> Vec<String> {
    let sidecar = model.sidecar_for(namespace, labels);
    model
        .services
        .values()
        .filter(|svc| model.visible(svc, namespace, sidecar))
        .map(|svc| svc.host.clone())
        .collect()
}

/// Whether `any` decodes as the message `type_url` names: what a proxy
/// does first with each resource it is sent.
pub fn decode_check(type_url: &str, any: &prost_types::Any) -> Result<(), String> {
    if any.type_url != type_url {
        return Err(format!("sent as {} in a {type_url} push", any.type_url));
    }
    let value = any.value.as_slice();
    let decoded = match type_url {
        type_url::LISTENER => pb::Listener::decode(value).map(drop),
        type_url::CLUSTER => pb::Cluster::decode(value).map(drop),
        type_url::ENDPOINTS => pb::ClusterEndpoints::decode(value).map(drop),
        type_url::ROUTE => pb::RouteConfig::decode(value).map(drop),
        other => return Err(format!("unknown type {other}")),
    };
    decoded.map_err(|e| e.to_string())
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
        "TLS" | "HTTPS" => pb::Protocol::Tls,
        "TCP" | "MONGO" | "MYSQL" | "REDIS" => pb::Protocol::Tcp,
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

/// A cluster's endpoints: `members` (the service's endpoints) narrowed to
/// a subset's labels.
pub(crate) fn cluster_endpoints(
    model: &Model,
    members: &[&Workload],
    port: &ServicePort,
    labels: Option<&crate::istio::Labels>,
    name: &str,
) -> pb::ClusterEndpoints {
    let endpoints = members
        .iter()
        .filter(|w| labels.is_none_or(|l| crate::model::selects(l, &w.labels)))
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
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cluster: model.cluster_id.clone(),
            locality: w.locality.clone(),
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

/// The route config of `svc`'s `port` under the VirtualService `vs` (its
/// default route without one).
fn route_config(
    model: &Model,
    svc: &Service,
    port: &ServicePort,
    vs: Option<&crate::model::Routes>,
) -> pb::RouteConfig {
    let routes = match vs {
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
            let proto = protocol(port);
            if matches!(proto, pb::Protocol::Tcp | pb::Protocol::Tls) {
                // An opaque port: on a TLS port the tls routes (by server
                // name) first; then the tcp routes, else the service itself.
                let tls = r.tls.iter().filter(|_| proto == pb::Protocol::Tls);
                let mut routes: Vec<pb::HttpRoute> =
                    tls.enumerate()
                        .map(|(i, t)| crate::vs::tls_to_wire(format!("tls-{i}"), t, &cluster_of))
                        .chain(r.tcp.iter().enumerate().map(|(i, t)| {
                            crate::vs::tcp_to_wire(format!("tcp-{i}"), t, &cluster_of)
                        }))
                        .collect();
                routes.push(crate::vs::default_route(cluster_name(
                    port.number,
                    None,
                    &svc.host,
                )));
                routes
            } else {
                r.http
                    .iter()
                    .enumerate()
                    .map(|(i, h)| {
                        let name = h.name.clone().unwrap_or_else(|| format!("route-{i}"));
                        crate::vs::to_wire(name, h, &cluster_of)
                    })
                    .collect()
            }
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

/// A workload's inbound listener; `serves` are the services it is an
/// endpoint of.
fn listener(model: &Model, w: &Workload, serves: &[&Service]) -> pb::Listener {
    let mut ports: BTreeMap<u32, pb::InboundPort> = BTreeMap::new();
    for svc in serves {
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
            labels: w
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            service_account: w.service_account.clone(),
            cluster: model.cluster_id.clone(),
            locality: w.locality.clone(),
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
        outbound_policy: match model
            .sidecar_for(&w.namespace, &w.labels)
            .and_then(|s| s.outbound)
            .or(model.outbound)
        {
            None => pb::OutboundPolicy::Unset,
            Some(crate::model::Outbound::AllowAny) => pb::OutboundPolicy::AllowAny,
            Some(crate::model::Outbound::RegistryOnly) => pb::OutboundPolicy::RegistryOnly,
        } as i32,
        protocol_detection_timeout_ms: model.protocol_detection_ms,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{ConfigSet, parse_file};

    fn model(yaml: &str) -> Result<Model, Vec<String>> {
        let set = ConfigSet {
            resources: parse_file(std::path::Path::new("scope.yaml"), yaml).unwrap(),
        };
        Model::build(&set, "cluster.local")
    }

    fn entry(ns: &str, name: &str, export_to: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [{name}]\n  ports: [{{number: 80, name: http}}]\n  exportTo: {export_to}\n"
        )
    }

    fn workload(ns: &str, name: &str, app: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {{address: 10.0.0.1, labels: {{app: {app}}}}}\n"
        )
    }

    fn sidecar(ns: &str, name: &str, selector: &str, hosts: &str, extra: &str) -> String {
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{selector}  egress:\n  - hosts: {hosts}\n{extra}"
        )
    }

    /// The short names of the services `proxy` is sent clusters of.
    fn sees(snapshot: &Snapshot, proxy: &str) -> Vec<String> {
        let mut hosts: Vec<String> = snapshot
            .for_proxy(type_url::CLUSTER, proxy)
            .keys()
            .map(|k| {
                k.rsplit('|')
                    .next()
                    .unwrap()
                    .split('.')
                    .next()
                    .unwrap()
                    .to_string()
            })
            .collect();
        hosts.sort();
        hosts.dedup();
        hosts
    }

    #[test]
    fn export_to_and_sidecars_decide_which_services_each_proxy_is_sent() {
        let yaml = [
            entry("a", "svc-a", "[]"),
            entry("b", "svc-b", "[\".\"]"),
            entry("b", "svc-b-to-a", "[a]"),
            entry("b", "svc-b-all", "[\"*\"]"),
            entry("c", "svc-c", "[]"),
            entry("istio-system", "shared", "[]"),
            workload("a", "w-a", "x"),
            workload("a", "w-special", "special"),
            workload("b", "w-b", "x"),
            workload("c", "w-c", "x"),
            // The mesh's default: its own namespace and istio-system.
            sidecar(
                "istio-system",
                "default",
                "",
                "[\"./*\", \"istio-system/*\"]",
                "",
            ),
            // One workload in a: everything exported to it.
            sidecar(
                "a",
                "special",
                "  workloadSelector: {labels: {app: special}}\n",
                "[\"*/*\"]",
                "",
            ),
            // Namespace c's default: b's services by suffix, and its own.
            sidecar(
                "c",
                "default",
                "",
                "[\"b/*.svc.cluster.local\", \"./*\"]",
                "",
            ),
        ]
        .concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        assert_eq!(sees(&snapshot, "w-a.a"), ["shared", "svc-a"]);
        assert_eq!(
            sees(&snapshot, "w-special.a"),
            ["shared", "svc-a", "svc-b-all", "svc-b-to-a", "svc-c"],
            "exportTo [.] keeps svc-b in b"
        );
        assert_eq!(
            sees(&snapshot, "w-b.b"),
            ["shared", "svc-b", "svc-b-all"],
            "exportTo [a] hides svc-b-to-a even in its own namespace"
        );
        assert_eq!(sees(&snapshot, "w-c.c"), ["svc-b-all", "svc-c"]);
        // A proxy pilot has no workload for is scoped by its namespace.
        assert_eq!(sees(&snapshot, "stray.c"), ["svc-b-all", "svc-c"]);
        // Routes and endpoints follow the same view.
        assert!(
            snapshot
                .for_proxy(type_url::ROUTE, "w-a.a")
                .keys()
                .all(|k| !k.contains("svc-c"))
        );
        assert_eq!(snapshot.for_proxy(type_url::ENDPOINTS, "w-c.c").len(), 2);
    }

    #[test]
    fn a_snapshot_after_a_change_shares_every_resource_the_change_left_alone() {
        let mesh = |b_address: &str| {
            let mut yaml = String::new();
            for app in ["a", "b"] {
                yaml += &format!(
                    "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: {app}, namespace: ns}}\nspec:\n  hosts: [{app}]\n  ports: [{{number: 80, name: http}}]\n  workloadSelector: {{labels: {{app: {app}}}}}\n"
                );
            }
            yaml += &workload("ns", "w-a", "a");
            yaml += &workload("ns", "w-b", "b").replace("10.0.0.1", b_address);
            Arc::new(model(&yaml).unwrap())
        };
        let first = Snapshot::build(mesh("10.0.0.2"), 1);
        let second = Snapshot::build_after(mesh("10.0.0.3"), 2, Some(&first));
        let resource = |s: &Snapshot, t: &str, host: &str| {
            let name = if t == type_url::ROUTE {
                "80".to_string()
            } else {
                cluster_name(80, None, host)
            };
            s.by_host[host][0].1[t][&name].clone()
        };
        let same = |t: &str, host: &str| {
            Arc::ptr_eq(&resource(&first, t, host), &resource(&second, t, host))
        };
        assert!(
            !same(type_url::ENDPOINTS, "b.ns.svc.cluster.local"),
            "b's endpoint moved"
        );
        assert_ne!(
            resource(&first, type_url::ENDPOINTS, "b.ns.svc.cluster.local").version,
            resource(&second, type_url::ENDPOINTS, "b.ns.svc.cluster.local").version
        );
        assert!(same(type_url::ENDPOINTS, "a.ns.svc.cluster.local"));
        for host in ["a.ns.svc.cluster.local", "b.ns.svc.cluster.local"] {
            assert!(same(type_url::CLUSTER, host), "{host}");
        }
        assert!(Arc::ptr_eq(
            &first.listeners["w-a.ns"],
            &second.listeners["w-a.ns"]
        ));
        assert!(
            !Arc::ptr_eq(&first.listeners["w-b.ns"], &second.listeners["w-b.ns"]),
            "w-b's own listener names its new address"
        );
        // Built without a previous snapshot, nothing is shared.
        let alone = Snapshot::build(mesh("10.0.0.3"), 2);
        assert!(!Arc::ptr_eq(
            &resource(&alone, type_url::CLUSTER, "a.ns.svc.cluster.local"),
            &resource(&second, type_url::CLUSTER, "a.ns.svc.cluster.local")
        ));
    }

    /// A DestinationRule in `ns` for `host` whose connection pool allows
    /// `max` connections (each rule's mark), with `subsets` by name.
    fn rule(
        ns: &str,
        name: &str,
        host: &str,
        export_to: &str,
        max: u32,
        subsets: &[&str],
    ) -> String {
        let subsets: String = subsets
            .iter()
            .map(|s| format!("  - name: {s}\n    labels: {{app: {s}}}\n"))
            .collect();
        let subsets = if subsets.is_empty() {
            String::new()
        } else {
            format!("  subsets:\n{subsets}")
        };
        format!(
            "---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  host: \"{host}\"\n  exportTo: {export_to}\n  trafficPolicy: {{connectionPool: {{tcp: {{maxConnections: {max}}}}}}}\n{subsets}"
        )
    }

    /// What `proxy` is sent for svc.s: each cluster's connection limit
    /// (the mark of the rule it follows), by subset.
    fn limits(snapshot: &Snapshot, proxy: &str) -> BTreeMap<String, u32> {
        snapshot
            .for_proxy(type_url::CLUSTER, proxy)
            .values()
            .map(|v| pb::Cluster::decode(v.any.value.as_slice()).unwrap())
            .filter(|c| c.service == "svc.s.svc.cluster.local")
            .map(|c| (c.subset, c.pool.map_or(0, |p| p.max_connections)))
            .collect()
    }

    #[test]
    fn destination_rules_are_followed_from_the_proxys_namespace_then_the_services_then_the_root() {
        const HOST: &str = "svc.s.svc.cluster.local";
        let base = [
            entry("s", "svc", "[]"),
            workload("s", "w-s", "x"),
            workload("a", "w-a", "x"),
            workload("b", "w-b", "x"),
            workload("c", "w-c", "x"),
            workload("x", "w-x", "x"),
        ]
        .concat();
        let yaml = [
            base.clone(),
            // The mesh's default, and a more specific one for namespace s.
            rule("istio-system", "mesh", "*.local", "[]", 1, &[]),
            rule(
                "istio-system",
                "in-s",
                "*.s.svc.cluster.local",
                "[]",
                2,
                &[],
            ),
            // The owner's, for itself and b.
            rule("s", "owner", HOST, "[., b]", 3, &["v1"]),
            // Team a's own, for a only.
            rule("a", "team-a", "svc.s.svc.cluster.local", "[.]", 4, &["v2"]),
            // x's rule for someone else's service: x's proxies alone follow it.
            rule("x", "team-x", HOST, "[\"*\"]", 5, &[]),
        ]
        .concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        let want = |pairs: &[(&str, u32)]| -> BTreeMap<String, u32> {
            pairs.iter().map(|(s, m)| (s.to_string(), *m)).collect()
        };
        // Its own namespace's rule first, subsets and all.
        assert_eq!(limits(&snapshot, "w-a.a"), want(&[("", 4), ("v2", 4)]));
        assert_eq!(limits(&snapshot, "w-x.x"), want(&[("", 5)]));
        // Then the service's namespace's, where exported.
        assert_eq!(limits(&snapshot, "w-s.s"), want(&[("", 3), ("v1", 3)]));
        assert_eq!(limits(&snapshot, "w-b.b"), want(&[("", 3), ("v1", 3)]));
        // Then the root's, the more specific host over *.local; x's rule
        // exported everywhere is not c's, as in Istio.
        assert_eq!(limits(&snapshot, "w-c.c"), want(&[("", 2)]));
        // A proxy pilot has no workload for is looked up by its namespace.
        assert_eq!(limits(&snapshot, "w-z.z"), want(&[("", 2)]));
        // Subsets narrow endpoints by the labels of the rule followed.
        let eps = snapshot.for_proxy(type_url::ENDPOINTS, "w-a.a");
        assert!(eps.contains_key(format!("outbound|80|v2|{HOST}").as_str()));
        assert!(!eps.contains_key(format!("outbound|80|v1|{HOST}").as_str()));
        // With no rule but the root's *.local, everyone shares one cluster.
        let yaml = [base, rule("istio-system", "mesh", "*.local", "[]", 1, &[])].concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        for proxy in ["w-a.a", "w-s.s", "w-z.z"] {
            assert_eq!(limits(&snapshot, proxy), want(&[("", 1)]), "{proxy}");
        }
        assert_eq!(snapshot.by_host[HOST].len(), 1);
    }

    #[test]
    fn only_one_rule_of_a_namespace_may_set_a_hosts_policies() {
        let base = entry("s", "svc", "[]");
        const HOST: &str = "svc.s.svc.cluster.local";
        let errors = model(
            &[
                base.clone(),
                rule("s", "one", HOST, "[]", 1, &[]),
                rule("s", "two", HOST, "[]", 2, &[]),
            ]
            .concat(),
        )
        .unwrap_err();
        assert!(
            errors.iter().any(|e| e.contains("DestinationRule s/two")
                && e.contains("DestinationRule s/one already sets traffic policies")),
            "{errors:?}"
        );
        // Another namespace's rule for the same host is its own.
        model(
            &[
                base,
                rule("s", "one", HOST, "[]", 1, &[]),
                rule("a", "two", HOST, "[]", 2, &[]),
            ]
            .concat(),
        )
        .unwrap();
    }

    #[test]
    fn a_virtual_services_export_to_decides_which_namespaces_follow_it() {
        let vs = |ns: &str, name: &str, export_to: &str| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  hosts: [svc.s.svc.cluster.local]\n  exportTo: {export_to}\n  http:\n  - name: {name}\n    route:\n    - destination: {{host: svc.s.svc.cluster.local}}\n"
            )
        };
        let route_names = |snapshot: &Snapshot, proxy: &str| -> Vec<String> {
            let routes = snapshot.for_proxy(type_url::ROUTE, proxy);
            let rc =
                pb::RouteConfig::decode(routes["svc.s.svc.cluster.local:80"].any.value.as_slice())
                    .unwrap();
            rc.routes.into_iter().map(|r| r.name).collect()
        };
        let base = [
            entry("s", "svc", "[]"),
            workload("a", "w-a", "x"),
            workload("b", "w-b", "x"),
            workload("c", "w-c", "x"),
        ]
        .concat();
        // Team a's rule for itself only; the service owner's for everyone.
        let yaml = [
            base.clone(),
            vs("a", "only-a", "[.]"),
            vs("s", "owner", "[\"*\"]"),
        ]
        .concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        assert_eq!(route_names(&snapshot, "w-a.a"), ["only-a"]);
        assert_eq!(
            route_names(&snapshot, "w-b.b"),
            ["owner"],
            "a's rule is not exported to b"
        );
        // Exported to a and b by name: c follows no VirtualService.
        let yaml = [base.clone(), vs("a", "a-and-b", "[a, b]")].concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        assert_eq!(route_names(&snapshot, "w-a.a"), ["a-and-b"]);
        assert_eq!(route_names(&snapshot, "w-b.b"), ["a-and-b"]);
        let default = route_names(&snapshot, "w-c.c");
        assert_eq!(default.len(), 1);
        assert_ne!(default, ["a-and-b"], "c gets the service's default route");
        // Without exportTo a rule is everyone's, and the first loaded wins.
        let yaml = [base, vs("a", "first", "[]"), vs("s", "second", "[]")].concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        for proxy in ["w-a.a", "w-b.b", "w-c.c"] {
            assert_eq!(route_names(&snapshot, proxy), ["first"], "{proxy}");
        }
    }

    #[test]
    fn the_outbound_policy_comes_from_the_sidecar_else_the_mesh_config() {
        let mesh = "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n";
        let yaml = [
            mesh.to_string(),
            entry("a", "svc-a", "[]"),
            workload("a", "w-a", "x"),
            workload("a", "w-open", "open"),
            sidecar(
                "a",
                "open",
                "  workloadSelector: {labels: {app: open}}\n",
                "[\"*/*\"]",
                "  outboundTrafficPolicy: {mode: ALLOW_ANY}\n",
            ),
        ]
        .concat();
        let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
        let policy = |proxy: &str| {
            let l = &snapshot.for_proxy(type_url::LISTENER, proxy)[LISTENER_NAME];
            pb::Listener::decode(l.any.value.as_slice())
                .unwrap()
                .outbound_policy()
        };
        assert_eq!(policy("w-a.a"), pb::OutboundPolicy::RegistryOnly);
        assert_eq!(policy("w-open.a"), pb::OutboundPolicy::AllowAny);
    }

    #[test]
    fn the_protocol_detection_timeout_comes_from_the_mesh_config() {
        let timeout = |mesh: &str| {
            let yaml = [
                mesh.to_string(),
                entry("a", "svc-a", "[]"),
                workload("a", "w-a", "x"),
            ]
            .concat();
            let snapshot = Snapshot::build(Arc::new(model(&yaml).unwrap()), 1);
            let l = &snapshot.for_proxy(type_url::LISTENER, "w-a.a")[LISTENER_NAME];
            pb::Listener::decode(l.any.value.as_slice())
                .unwrap()
                .protocol_detection_timeout_ms
        };
        let mesh = |v: &str| {
            format!(
                "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: istio, namespace: istio-system}}\ndata:\n  mesh: |\n    protocolDetectionTimeout: {v}\n"
            )
        };
        assert_eq!(timeout(&mesh("1.5s")), Some(1500));
        assert_eq!(timeout(&mesh("0s")), Some(0));
        assert_eq!(timeout(""), None, "unset: the proxy's own setting");
        let err = model(&[mesh("soon"), entry("a", "svc-a", "[]")].concat())
            .unwrap_err()
            .join("\n");
        assert!(
            err.contains("data.mesh.protocolDetectionTimeout") && err.contains("\"soon\""),
            "{err}"
        );
    }

    #[test]
    fn sidecars_the_mesh_cannot_honour_are_reported() {
        let cases = [
            (
                sidecar("a", "s", "", "[reviews]", ""),
                "must be <namespace>/<host>",
            ),
            (
                sidecar(
                    "a",
                    "s",
                    "",
                    "[\"./*\"]",
                    "  ingress: [{port: {number: 80}}]\n",
                ),
                "spec.ingress is not supported yet",
            ),
            (
                sidecar(
                    "a",
                    "s",
                    "",
                    "[\"./*\"]",
                    "  outboundTrafficPolicy: {mode: SOMETIMES}\n",
                ),
                "not ALLOW_ANY or REGISTRY_ONLY",
            ),
            (
                sidecar(
                    "a",
                    "s",
                    "  workloadSelector: {labels: {}}\n",
                    "[\"./*\"]",
                    "",
                ),
                "workloadSelector.labels is empty",
            ),
            (
                [
                    sidecar("a", "s", "", "[\"./*\"]", ""),
                    sidecar("a", "t", "", "[\"./*\"]", ""),
                ]
                .concat(),
                "Sidecar a/s already covers the namespace",
            ),
        ];
        for (yaml, expected) in cases {
            let errors = model(&yaml).unwrap_err().join("\n");
            assert!(errors.contains("scope.yaml: Sidecar a/"), "{errors}");
            assert!(errors.contains(expected), "{expected}: {errors}");
        }
    }
}
