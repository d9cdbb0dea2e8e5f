//! The mesh model: the config set resolved into services, workloads, routes
//! and subsets, with every reference checked. A model that does not build is
//! rejected whole and the previous one keeps serving.

use std::collections::BTreeMap;

use crate::istio::{DestinationRule, HttpRoute, Labels, ServiceEntry, ServicePort, VirtualService};
use crate::store::{ConfigSet, Meta, Resource};

#[derive(Clone, Debug, PartialEq)]
pub struct Service {
    pub host: String,
    pub namespace: String,
    pub ports: Vec<ServicePort>,
    pub selector: Labels,
    /// Virtual IPs (ServiceEntry `addresses`): apps may call the service by them.
    pub vips: Vec<std::net::IpAddr>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub address: String,
    pub labels: Labels,
    pub service_account: String,
    pub ports: BTreeMap<String, u32>,
}

impl Workload {
    /// The id a workload's proxy announces in its xDS Node: `<name>.<namespace>`.
    pub fn proxy_id(&self) -> String {
        format!("{}.{}", self.name, self.namespace)
    }

    pub fn identity(&self, trust_domain: &str) -> mesh_identity::SpiffeId {
        mesh_identity::SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

/// A VirtualService's HTTP routes for one host, with hosts made fully qualified.
#[derive(Clone, Debug, PartialEq)]
pub struct Routes {
    pub namespace: String,
    pub http: Vec<HttpRoute>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub trust_domain: String,
    pub services: BTreeMap<String, Service>,
    pub workloads: BTreeMap<String, Workload>,
    pub routes: BTreeMap<String, Routes>,
    pub subsets: BTreeMap<String, BTreeMap<String, Labels>>,
}

/// Makes a short host name fully qualified in `namespace`, as Istio does.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

fn at(meta: &Meta, kind: &str) -> String {
    format!(
        "{}: {kind} {}/{}",
        meta.file.display(),
        meta.namespace,
        meta.name
    )
}

impl Model {
    pub fn build(set: &ConfigSet, trust_domain: &str) -> Result<Self, Vec<String>> {
        let mut m = Model {
            trust_domain: trust_domain.to_string(),
            ..Default::default()
        };
        let mut errors = Vec::new();
        for (meta, res) in &set.resources {
            match res {
                Resource::ServiceEntry(se) => m.add_service(meta, se, &mut errors),
                Resource::WorkloadEntry(we) => {
                    let w = Workload {
                        name: meta.name.clone(),
                        namespace: meta.namespace.clone(),
                        address: we.address.clone(),
                        labels: we.labels.clone(),
                        service_account: we
                            .service_account
                            .clone()
                            .unwrap_or_else(|| "default".to_string()),
                        ports: we.ports.clone(),
                    };
                    if w.address.parse::<std::net::IpAddr>().is_err() {
                        errors.push(format!(
                            "{}: spec.address {:?} is not an IP address",
                            at(meta, "WorkloadEntry"),
                            w.address
                        ));
                    }
                    m.workloads.insert(w.proxy_id(), w);
                }
                Resource::DestinationRule(dr) => m.add_subsets(meta, dr),
                Resource::VirtualService(_) => {}
            }
        }
        for (meta, res) in &set.resources {
            if let Resource::VirtualService(vs) = res {
                m.add_routes(meta, vs, &mut errors);
            }
        }
        if errors.is_empty() {
            Ok(m)
        } else {
            Err(errors)
        }
    }

    fn add_service(&mut self, meta: &Meta, se: &ServiceEntry, errors: &mut Vec<String>) {
        if se.ports.is_empty() {
            errors.push(format!("{}: spec.ports is empty", at(meta, "ServiceEntry")));
        }
        let mut vips = Vec::new();
        for (i, a) in se.addresses.iter().enumerate() {
            match a.parse::<std::net::IpAddr>() {
                Ok(ip) => vips.push(ip),
                Err(_) => errors.push(format!(
                    "{}: spec.addresses[{i}] {a:?} is not an IP address (CIDRs are not supported yet)",
                    at(meta, "ServiceEntry")
                )),
            }
        }
        for host in &se.hosts {
            let host = fqdn(host, &meta.namespace);
            if self.services.contains_key(&host) {
                errors.push(format!(
                    "{}: host {host} is already defined by another ServiceEntry",
                    at(meta, "ServiceEntry")
                ));
                continue;
            }
            self.services.insert(
                host.clone(),
                Service {
                    host,
                    namespace: meta.namespace.clone(),
                    ports: se.ports.clone(),
                    selector: se
                        .workload_selector
                        .as_ref()
                        .map(|s| s.labels.clone())
                        .unwrap_or_default(),
                    vips: vips.clone(),
                },
            );
        }
    }

    fn add_subsets(&mut self, meta: &Meta, dr: &DestinationRule) {
        let host = fqdn(&dr.host, &meta.namespace);
        let entry = self.subsets.entry(host).or_default();
        for s in &dr.subsets {
            entry.insert(s.name.clone(), s.labels.clone());
        }
    }

    fn add_routes(&mut self, meta: &Meta, vs: &VirtualService, errors: &mut Vec<String>) {
        let ctx = at(meta, "VirtualService");
        let mut http = vs.http.clone();
        for (i, route) in http.iter_mut().enumerate() {
            let field = format!("spec.http[{i}]");
            if route.route.is_empty() {
                errors.push(format!("{ctx}: {field}.route is empty"));
            }
            let weights: u32 = route.route.iter().map(|d| d.weight.unwrap_or(0)).sum();
            if route.route.len() > 1 && weights != 100 {
                errors.push(format!(
                    "{ctx}: {field}.route weights add up to {weights}, not 100"
                ));
            }
            for (j, m) in route.matches.iter().enumerate() {
                let regex = matches!(m.uri, Some(crate::istio::StringMatch::Regex(_)))
                    || m.headers
                        .values()
                        .any(|h| matches!(h, crate::istio::StringMatch::Regex(_)));
                if regex {
                    errors.push(format!(
                        "{ctx}: {field}.match[{j}]: regex matches are not supported yet; use exact or prefix"
                    ));
                }
            }
            for (j, d) in route.route.iter_mut().enumerate() {
                d.destination.host = fqdn(&d.destination.host, &meta.namespace);
                let dest = &d.destination;
                let where_ = format!("{field}.route[{j}].destination");
                let Some(svc) = self.services.get(&dest.host) else {
                    errors.push(format!(
                        "{ctx}: {where_}.host {} is not a known service; add a ServiceEntry for it",
                        dest.host
                    ));
                    continue;
                };
                if let Some(p) = &dest.port
                    && !svc.ports.iter().any(|sp| sp.number == p.number)
                {
                    errors.push(format!(
                        "{ctx}: {where_}.port {} is not a port of {}",
                        p.number, dest.host
                    ));
                }
                if let Some(subset) = &dest.subset {
                    let known = self
                        .subsets
                        .get(&dest.host)
                        .is_some_and(|s| s.contains_key(subset));
                    if !known {
                        errors.push(format!(
                            "{ctx}: {where_}.subset {subset:?} is not defined by any DestinationRule for {}",
                            dest.host
                        ));
                    }
                }
            }
        }
        for host in &vs.hosts {
            let host = fqdn(host, &meta.namespace);
            if !self.services.contains_key(&host) {
                errors.push(format!(
                    "{ctx}: spec.hosts: {host} is not a known service; add a ServiceEntry for it"
                ));
                continue;
            }
            self.routes.entry(host).or_insert_with(|| Routes {
                namespace: meta.namespace.clone(),
                http: http.clone(),
            });
        }
    }

    /// Workloads a service selects, optionally narrowed to a subset's labels.
    pub fn endpoints_of<'a>(
        &'a self,
        svc: &'a Service,
        subset: Option<&'a Labels>,
    ) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads.values().filter(move |w| {
            w.namespace == svc.namespace
                && !svc.selector.is_empty()
                && selects(&svc.selector, &w.labels)
                && subset.is_none_or(|s| selects(s, &w.labels))
        })
    }
}

pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}
