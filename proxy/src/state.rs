//! The proxy's view of the mesh: the resources pilot sent, indexed for the
//! request path. A `Snapshot` is immutable; each accepted xDS update builds a
//! new one and swaps it in whole.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_proto::resources as pb;

#[derive(Debug, Default)]
pub struct Snapshot {
    pub listener: Option<pb::Listener>,
    pub routes: HashMap<String, Arc<pb::RouteConfig>>,
    pub clusters: HashMap<String, Arc<Cluster>>,
    /// Domain (host without port) -> route configs by port.
    domains: HashMap<String, Vec<Arc<pb::RouteConfig>>>,
    /// Which types pilot has answered at least once.
    pub answered: usize,
}

/// A cluster with its endpoints and its round-robin cursor.
#[derive(Debug)]
pub struct Cluster {
    pub config: pb::Cluster,
    pub endpoints: Vec<Arc<pb::Endpoint>>,
    next: AtomicUsize,
}

impl Cluster {
    pub fn pick(&self) -> Option<&Arc<pb::Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        self.endpoints.get(i % self.endpoints.len())
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
        let routes: HashMap<_, _> = self
            .routes
            .iter()
            .map(|(k, v)| (k.clone(), Arc::new(v.clone())))
            .collect();
        let mut domains: HashMap<String, Vec<Arc<pb::RouteConfig>>> = HashMap::new();
        for rc in routes.values() {
            for d in &rc.domains {
                domains.entry(d.clone()).or_default().push(rc.clone());
            }
        }
        let clusters = self
            .clusters
            .iter()
            .map(|(name, c)| {
                let endpoints = self
                    .endpoints
                    .get(name)
                    .map(|e| e.endpoints.iter().cloned().map(Arc::new).collect())
                    .unwrap_or_default();
                let cluster = Cluster {
                    config: c.clone(),
                    endpoints,
                    next: AtomicUsize::new(0),
                };
                (name.clone(), Arc::new(cluster))
            })
            .collect();
        Snapshot {
            listener: self.listener.clone(),
            routes,
            clusters,
            domains,
            answered: self.answered.len(),
        }
    }
}

impl Snapshot {
    /// True once pilot has answered every type the proxy subscribes to.
    pub fn complete(&self) -> bool {
        self.answered >= mesh_proto::type_url::ALL.len()
    }

    /// The route config for an authority (`host` or `host:port`). Without a
    /// port, a host with a single port matches it; `default_port` breaks ties.
    pub fn route_config(
        &self,
        authority: &str,
        default_port: u16,
    ) -> Option<&Arc<pb::RouteConfig>> {
        let (host, port) = split_authority(authority);
        let configs = self.domains.get(&host.to_ascii_lowercase())?;
        let port = port.unwrap_or(default_port) as u32;
        configs
            .iter()
            .find(|rc| rc.port == port)
            .or_else(|| (configs.len() == 1).then(|| &configs[0]))
    }
}

/// Splits `host[:port]` (IPv6 literals in brackets).
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            return (host, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}
