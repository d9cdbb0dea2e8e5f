//! The proxy's view of the mesh: the resources pilot sent, indexed and
//! pre-parsed for the request path. A `Snapshot` is immutable; each accepted
//! xDS update builds a new one and swaps it in whole.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use http::uri::Authority;
use mesh_identity::SpiffeId;
use mesh_proto::resources as pb;

use crate::metrics::{Peers, SeriesCache};
use crate::route::RouteTable;
use crate::wire::PeerMeta;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub listener: Option<pb::Listener>,
    /// This pod as pilot describes it, ready for headers and labels.
    pub own: Own,
    /// Inbound app ports by number.
    pub inbound: HashMap<u32, Arc<InboundPort>>,
    /// Route configs by name, compiled.
    pub routes: HashMap<String, Arc<RouteTable>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Opaque TCP and TLS services by VIP and port.
    pub tcp: HashMap<SocketAddr, TcpService>,
    /// Ports some service declares HTTP (HTTP/2, gRPC) on: captured
    /// connections to them are HTTP, as Istio's wildcard HTTP listener per
    /// port makes them, whatever address they were dialled to.
    http_ports: std::collections::HashSet<u16>,
    /// TLS services by port, then host name (`*.example.com` for a
    /// wildcard host): found by the ClientHello's server name, whatever
    /// address the app dialled, as Envoy's filter chains match SNI.
    tls_hosts: HashMap<u16, HashMap<String, TcpService>>,
    /// Opaque TCP and TLS services by route config name (`host:port`),
    /// for CONNECT tunnels apps open by name.
    opaque_by_route: HashMap<String, TcpService>,
    /// Domain (host without port) -> route configs by port.
    domains: HashMap<String, Vec<Arc<RouteTable>>>,
    /// Which types pilot has answered at least once.
    pub answered: usize,
    /// The workload's AuthorizationPolicies, compiled.
    pub authz: Arc<crate::authz::Policies>,
    /// The workload's RequestAuthentication JWT rules, compiled.
    pub jwt: Arc<crate::jwt::Rules>,
    /// The workload's access-log rules (from its Telemetry), compiled.
    pub access_log: Arc<crate::accesslog::Rules>,
    /// The workload's tracing settings (from its Telemetry), compiled.
    pub tracing: Arc<crate::trace::Settings>,
    /// Istio's request metrics switched off (by a Telemetry resource) on
    /// the calling side, and on the called side.
    pub client_metrics_off: bool,
    pub server_metrics_off: bool,
}

/// What this pod tells its peers about itself, and how it labels metrics.
#[derive(Debug, Default)]
pub struct Own {
    pub meta: PeerMeta,
    /// `x-mesh-source` value sent with every outbound request.
    pub source_header: Option<HeaderValue>,
}

/// An app port reachable through the inbound listener.
#[derive(Debug)]
pub struct InboundPort {
    pub port: u32,
    /// Where the app listens: the pod's address and this port.
    pub app: Authority,
    /// The same on loopback, for pods whose traffic is captured.
    pub app_loopback: Authority,
    pub h2: bool,
    /// Declared TCP: opaque bytes, never parsed as HTTP.
    pub tcp: bool,
    pub service: String,
}

/// Whether a port or cluster of `protocol` speaks HTTP/2 (gRPC does).
pub fn speaks_h2(protocol: i32) -> bool {
    matches!(
        pb::Protocol::try_from(protocol),
        Ok(pb::Protocol::Http2 | pb::Protocol::Grpc)
    )
}

/// A cluster with its endpoints and its round-robin cursor.
#[derive(Debug)]
pub struct Cluster {
    pub config: pb::Cluster,
    /// How its endpoints are spoken to (mutual TLS, plaintext, or TLS this
    /// sidecar originates).
    pub transport: Arc<crate::origin::Transport>,
    /// Plaintext clients within its connectTimeout, when it sets one.
    pub direct: Arc<crate::origin::Direct>,
    pub endpoints: Vec<Arc<Endpoint>>,
    /// Load balancing, outlier detection and the circuit breaker.
    pub balancer: crate::balance::Balancer,
    /// Counts requests and retries to this destination.
    pub budget: Arc<crate::budget::RetryBudget>,
    /// The server name sent to its endpoints' sidecars.
    pub sni: Arc<str>,
    /// How its connections to sidecars are made and kept.
    pub conns: crate::pool::Settings,
}

/// An opaque TCP service port: its own cluster, and the route config
/// (the VirtualService's `tcp` routes) that may send a connection to
/// another cluster instead.
#[derive(Clone, Debug)]
pub struct TcpService {
    pub cluster: Arc<Cluster>,
    pub routes: Option<Arc<RouteTable>>,
    /// A TLS port: the ClientHello's server name takes part in routing.
    pub tls: bool,
}

/// An endpoint, parsed once: where its sidecar listens, what identity it must
/// present, and its request counters.
#[derive(Debug)]
pub struct Endpoint {
    pub pb: pb::Endpoint,
    /// Where requests to it go: its sidecar's inbound listener, or its
    /// own address and port when it has no sidecar.
    pub tunnel: SocketAddr,
    /// What its sidecar must present; `None`: it has no sidecar.
    pub identity: Option<SpiffeId>,
    /// `x-mesh-target-port` value: the app port behind the sidecar.
    pub target_port: HeaderValue,
    /// The endpoint's workload as metrics name it.
    pub meta: PeerMeta,
    /// Outbound request series by (response code, flags, protocol, gRPC status).
    pub series: SeriesCache<(u16, &'static str, &'static str, Option<u32>)>,
    /// Load and health, for balancing and outlier detection.
    pub stats: crate::balance::EndpointStats,
}

impl Endpoint {
    pub fn new(pb: pb::Endpoint) -> Option<Self> {
        let ip = pb.address.parse().ok()?;
        let (tunnel, identity) = match pb.tunnel_port {
            0 => (SocketAddr::new(ip, pb.port as u16), None),
            t => (
                SocketAddr::new(ip, t as u16),
                Some(pb.identity.parse().ok()?),
            ),
        };
        Some(Self {
            tunnel,
            identity,
            target_port: HeaderValue::from(pb.port),
            meta: PeerMeta::from_labels(&pb.workload, &pb.namespace, &pb.labels, &pb.cluster),
            series: SeriesCache::default(),
            stats: Default::default(),
            pb,
        })
    }

    /// Destination labels for requests sent to this endpoint.
    pub fn labels(&self, into: &mut Peers) {
        into.destination(&self.meta, &self.pb.identity);
    }
}

impl Cluster {
    /// An endpoint for a request; `key` is its hash for consistent hashing.
    pub fn pick(&self, key: Option<u64>) -> Option<&Arc<Endpoint>> {
        self.balancer.pick(&self.endpoints, key)
    }

    /// Service labels for requests to this cluster.
    pub fn labels(&self, into: &mut Peers) {
        into.service(&self.config.service);
    }
}

/// The raw resources as received, by type then name; the source a
/// `Snapshot` is built from.
#[derive(Clone, Debug, Default)]
pub struct Resources {
    pub listener: Option<pb::Listener>,
    pub routes: HashMap<String, pb::RouteConfig>,
    pub clusters: HashMap<String, pb::Cluster>,
    pub endpoints: HashMap<String, pb::ClusterEndpoints>,
    pub answered: std::collections::BTreeSet<String>,
}

impl Resources {
    pub fn snapshot(&self) -> Snapshot {
        self.snapshot_after(None)
    }

    /// A snapshot that keeps the request-path state (load, ejections,
    /// budgets, breakers) of `prev` for whatever did not change.
    pub fn snapshot_after(&self, prev: Option<&Snapshot>) -> Snapshot {
        let own_workload = self.listener.as_ref().and_then(|l| l.workload.as_ref());
        // Checked when each arrived (a bad one is NACKed), so none is skipped.
        let routes: HashMap<_, _> = self
            .routes
            .iter()
            .filter_map(|(k, v)| {
                Some((
                    k.clone(),
                    Arc::new(RouteTable::compile(v, own_workload).ok()?),
                ))
            })
            .collect();
        let mut domains: HashMap<String, Vec<Arc<RouteTable>>> = HashMap::new();
        for rc in routes.values() {
            for d in &rc.config.domains {
                domains.entry(d.clone()).or_default().push(rc.clone());
            }
        }
        let clusters: HashMap<String, Arc<Cluster>> = self
            .clusters
            .iter()
            .map(|(name, c)| {
                // What the previous snapshot knew of this cluster carries
                // over: an endpoint's load, latency and ejection, the
                // cluster's retry budget and (same limits) breaker.
                let before = prev.and_then(|p| p.clusters.get(name));
                let endpoints: Vec<Arc<Endpoint>> = self
                    .endpoints
                    .get(name)
                    .map(|e| {
                        e.endpoints
                            .iter()
                            .filter_map(|pb| {
                                let same = before.and_then(|b| {
                                    b.endpoints.iter().find(|old| old.pb == *pb).cloned()
                                });
                                same.or_else(|| Endpoint::new(pb.clone()).map(Arc::new))
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let breaker = before
                    .filter(|b| b.config.pool == c.pool && b.config.protocol == c.protocol)
                    .and_then(|b| b.balancer.breaker.clone());
                let balancer = crate::balance::Balancer::new(c, &endpoints, breaker)
                    .with_localities(c, &endpoints, own_workload);
                let connect = balancer.connect_timeout;
                // Same settings: the same transport, pooled connections and all.
                let transport = before
                    .filter(|b| {
                        b.config.tls == c.tls
                            && b.config.service == c.service
                            && b.config.protocol == c.protocol
                            && b.balancer.connect_timeout == connect
                    })
                    .map(|b| b.transport.clone())
                    .unwrap_or_else(|| {
                        Arc::new(crate::origin::Transport::load(
                            c.tls.as_ref(),
                            &c.service,
                            speaks_h2(c.protocol),
                            connect,
                        ))
                    });
                let direct = before
                    .filter(|b| b.direct.connect == connect)
                    .map(|b| b.direct.clone())
                    .unwrap_or_else(|| Arc::new(crate::origin::Direct::new(connect)));
                let cluster = Cluster {
                    transport,
                    direct,
                    balancer,
                    config: c.clone(),
                    endpoints,
                    budget: before.map(|b| b.budget.clone()).unwrap_or_default(),
                    sni: crate::pool::cluster_sni(name),
                    conns: crate::pool::Settings::of(c.pool.as_ref()),
                };
                (name.clone(), Arc::new(cluster))
            })
            .collect();
        let (own, inbound) = self.own();
        let telemetry = self.listener.as_ref().and_then(|l| l.telemetry.as_ref());
        let http_ports = clusters
            .values()
            .filter(|c| {
                matches!(
                    pb::Protocol::try_from(c.config.protocol),
                    Ok(pb::Protocol::Http | pb::Protocol::Http2 | pb::Protocol::Grpc)
                )
            })
            .map(|c| c.config.port as u16)
            .collect();
        let opaque: Vec<TcpService> = clusters
            .values()
            .filter(|c| c.config.subset.is_empty())
            .filter_map(|c| {
                let tls = match pb::Protocol::try_from(c.config.protocol) {
                    Ok(pb::Protocol::Tcp) => false,
                    Ok(pb::Protocol::Tls) => true,
                    _ => return None,
                };
                Some(TcpService {
                    cluster: c.clone(),
                    routes: routes
                        .get(&format!("{}:{}", c.config.service, c.config.port))
                        .cloned(),
                    tls,
                })
            })
            .collect();
        let tcp = opaque
            .iter()
            .flat_map(|s| {
                let port = s.cluster.config.port as u16;
                s.cluster.config.vips.iter().filter_map(move |v| {
                    let ip: std::net::IpAddr = v.parse().ok()?;
                    Some((SocketAddr::new(ip, port), s.clone()))
                })
            })
            .collect();
        let opaque_by_route = opaque
            .iter()
            .map(|s| {
                let c = &s.cluster.config;
                (format!("{}:{}", c.service, c.port), s.clone())
            })
            .collect();
        let mut tls_hosts: HashMap<u16, HashMap<String, TcpService>> = HashMap::new();
        for s in opaque.into_iter().filter(|s| s.tls) {
            let host = s.cluster.config.service.to_ascii_lowercase();
            tls_hosts
                .entry(s.cluster.config.port as u16)
                .or_default()
                .insert(host, s);
        }
        Snapshot {
            listener: self.listener.clone(),
            own,
            inbound,
            routes,
            clusters,
            tcp,
            tls_hosts,
            opaque_by_route,
            http_ports,
            domains,
            answered: self.answered.len(),
            // Checked when the listener arrived (a bad one is NACKed), so
            // this cannot fail; were it to, nothing is allowed.
            authz: Arc::new(
                self.listener
                    .as_ref()
                    .map(|l| {
                        crate::authz::Policies::compile(&l.policies)
                            .unwrap_or_else(|_| crate::authz::Policies::deny_all())
                    })
                    .unwrap_or_default(),
            ),
            jwt: Arc::new(
                self.listener
                    .as_ref()
                    .and_then(|l| crate::jwt::Rules::compile(&l.jwt_rules).ok())
                    .unwrap_or_default(),
            ),
            // Checked on arrival too; a filter that could not compile logs nothing.
            access_log: Arc::new(
                telemetry
                    .and_then(|t| crate::accesslog::Rules::compile(&t.access_logs).ok())
                    .unwrap_or_default(),
            ),
            tracing: Arc::new(crate::trace::Settings::compile(
                telemetry.and_then(|t| t.tracing.as_ref()),
            )),
            client_metrics_off: telemetry.is_some_and(|t| t.client_metrics_off),
            server_metrics_off: telemetry.is_some_and(|t| t.server_metrics_off),
        }
    }

    fn own(&self) -> (Own, HashMap<u32, Arc<InboundPort>>) {
        let Some(l) = &self.listener else {
            return Default::default();
        };
        let w = l.workload.clone().unwrap_or_default();
        let meta = PeerMeta::from_labels(&w.name, &w.namespace, &w.labels, &w.cluster);
        let inbound = l
            .ports
            .iter()
            .filter_map(|p| {
                let ip: std::net::IpAddr = w.address.parse().ok()?;
                let loopback: std::net::IpAddr = if ip.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                };
                let authority = |ip| SocketAddr::new(ip, p.port as u16).to_string().parse().ok();
                let port = InboundPort {
                    port: p.port,
                    app: authority(ip)?,
                    app_loopback: authority(loopback)?,
                    h2: speaks_h2(p.protocol),
                    tcp: pb::Protocol::try_from(p.protocol) == Ok(pb::Protocol::Tcp),
                    service: p.services.first().cloned().unwrap_or_default(),
                };
                Some((p.port, Arc::new(port)))
            })
            .collect();
        let own = Own {
            source_header: meta.encode().parse().ok(),
            meta,
        };
        (own, inbound)
    }
}

impl Snapshot {
    /// Whether the workload takes plaintext (from a client without a
    /// sidecar) on app port `port`: its mode there is not STRICT.
    /// The outbound traffic policy pilot sent for this workload (its
    /// Sidecar's, else the mesh config's), else `default`.
    pub fn outbound_policy(&self, default: crate::OutboundPolicy) -> crate::OutboundPolicy {
        match self.listener.as_ref().map(|l| l.outbound_policy()) {
            Some(pb::OutboundPolicy::AllowAny) => crate::OutboundPolicy::AllowAny,
            Some(pb::OutboundPolicy::RegistryOnly) => crate::OutboundPolicy::RegistryOnly,
            _ => default,
        }
    }

    pub fn accepts_plaintext(&self, port: u32) -> bool {
        let Some(l) = &self.listener else {
            return false;
        };
        let mode = l.port_mtls.get(&port).copied().unwrap_or(l.mtls);
        mode != pb::MtlsMode::Strict as i32
    }

    /// True once pilot has answered every type the proxy subscribes to.
    pub fn complete(&self) -> bool {
        self.answered >= mesh_proto::type_url::ALL.len()
    }

    /// The TLS service on `port` whose host is the server name `sni`, or
    /// the most specific wildcard host (`*.example.com`) covering it.
    pub fn tls_service(&self, port: u16, sni: &str) -> Option<&TcpService> {
        let hosts = self.tls_hosts.get(&port)?;
        if let Some(s) = hosts.get(sni) {
            return Some(s);
        }
        let mut rest = sni;
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(s) = hosts.get(&format!("*.{parent}")) {
                return Some(s);
            }
            rest = parent;
        }
        hosts.get("*")
    }

    /// The opaque TCP or TLS service an authority (`host:port`, short
    /// names and VIPs as for HTTP) names, if it names one.
    pub fn opaque_service(&self, authority: &str) -> Option<&TcpService> {
        let rc = self.route_config_exact(authority)?;
        self.opaque_by_route.get(&rc.config.name)
    }

    /// The route config for `host:port` with exactly that port.
    pub fn route_config_exact(&self, authority: &str) -> Option<&Arc<RouteTable>> {
        let port = split_authority(authority).1?;
        self.route_config(authority, port)
            .filter(|rc| rc.config.port == u32::from(port))
    }

    /// Whether `dst`'s port is one a service declares HTTP (or HTTP/2,
    /// gRPC) on: its connections are HTTP, with nothing to detect (a
    /// client that connects ahead of its first request is not mistaken
    /// for a server-first protocol).
    pub fn speaks_http(&self, dst: SocketAddr) -> bool {
        self.http_ports.contains(&dst.port())
    }

    /// How long a silent client is waited for (pilot's word, else
    /// `default`); `None`: until it speaks.
    pub fn detection_timeout(&self, default: std::time::Duration) -> Option<std::time::Duration> {
        let t = self
            .listener
            .as_ref()
            .and_then(|l| l.protocol_detection_timeout_ms)
            .map_or(default, std::time::Duration::from_millis);
        (!t.is_zero()).then_some(t)
    }

    /// The route config for an authority (`host` or `host:port`). Without a
    /// port, a host with a single port matches it; `default_port` breaks ties.
    pub fn route_config(&self, authority: &str, default_port: u16) -> Option<&Arc<RouteTable>> {
        let (host, port) = split_authority(authority);
        let configs = match self.domains.get(host) {
            Some(c) => c,
            None => self.domains.get(&host.to_ascii_lowercase())?,
        };
        let port = port.unwrap_or(default_port) as u32;
        configs
            .iter()
            .find(|rc| rc.config.port == port)
            .or_else(|| (configs.len() == 1).then(|| &configs[0]))
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

#[cfg(test)]
mod carry_over {
    use super::*;

    fn resources(clusters: &[&str]) -> Resources {
        let mut r = Resources::default();
        for name in clusters {
            r.clusters.insert(
                name.to_string(),
                pb::Cluster {
                    name: name.to_string(),
                    ..Default::default()
                },
            );
            r.endpoints.insert(
                name.to_string(),
                pb::ClusterEndpoints {
                    cluster: name.to_string(),
                    endpoints: vec![pb::Endpoint {
                        address: "127.0.0.9".into(),
                        port: 9080,
                        identity: "spiffe://cluster.local/ns/default/sa/x".into(),
                        tunnel_port: 15006,
                        ..Default::default()
                    }],
                },
            );
        }
        r
    }

    #[test]
    fn an_unrelated_change_keeps_endpoint_load_and_the_retry_budget() {
        let first = resources(&["a"]).snapshot();
        let a = &first.clusters["a"];
        a.endpoints[0]
            .stats
            .active
            .store(5, std::sync::atomic::Ordering::Relaxed);
        let next = resources(&["a", "b"]).snapshot_after(Some(&first));
        let a2 = &next.clusters["a"];
        assert!(Arc::ptr_eq(&a.endpoints[0], &a2.endpoints[0]));
        assert!(Arc::ptr_eq(&a.budget, &a2.budget));
        // A changed endpoint starts afresh.
        let mut changed = resources(&["a"]);
        changed.endpoints.get_mut("a").unwrap().endpoints[0].port = 9081;
        let moved = changed.snapshot_after(Some(&next));
        assert!(!Arc::ptr_eq(
            &a.endpoints[0],
            &moved.clusters["a"].endpoints[0]
        ));
    }
}
