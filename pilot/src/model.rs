//! The mesh model: the config set resolved into services, workloads, routes
//! and subsets, with every reference checked. A model that does not build is
//! rejected whole and the previous one keeps serving.

use std::collections::BTreeMap;
use std::sync::Arc;

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
    /// A ServiceEntry's own `endpoints`: this service's alone, and no
    /// proxy of the mesh's runs for them.
    pub inline: Vec<Workload>,
    /// The namespaces whose proxies are told of it (Istio's `exportTo`:
    /// `*`, `.`, `~` or names); every namespace when empty.
    pub export_to: Vec<String>,
}

/// Istio's outboundTrafficPolicy modes: what a proxy does with traffic
/// for no service it knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outbound {
    AllowAny,
    RegistryOnly,
}

/// One Sidecar resource, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct SidecarScope {
    pub namespace: String,
    pub name: String,
    /// `workloadSelector.labels`; `None` for the namespace's default (or,
    /// in the root namespace, the mesh's).
    pub selector: Option<Labels>,
    /// Its egress hosts as (namespace, host) patterns.
    pub hosts: Vec<(String, String)>,
    pub outbound: Option<Outbound>,
}

impl SidecarScope {
    /// Whether a proxy in `namespace` under this Sidecar is told of `svc`:
    /// an egress host `ns/host` whose namespace is `*`, `.` (the proxy's
    /// own) or the service's, and whose host is `*`, `*.<suffix>` or the
    /// service's host. `~` is no namespace.
    pub fn imports(&self, svc: &Service, namespace: &str) -> bool {
        self.hosts.iter().any(|(ns, host)| {
            let ns_ok = match ns.as_str() {
                "*" => true,
                "." => svc.namespace == namespace,
                "~" => false,
                other => svc.namespace == other,
            };
            let host_ok = match host.strip_prefix('*') {
                Some("") => true,
                Some(suffix) => svc.host.ends_with(suffix),
                None => svc.host == *host,
            };
            ns_ok && host_ok
        })
    }
}

impl Routes {
    /// Whether every namespace's proxies see it.
    pub fn exported_everywhere(&self) -> bool {
        self.export_to.is_empty() || self.export_to.iter().any(|e| e == "*")
    }

    /// Whether some namespace's proxies are routed by both `self` and
    /// `other` (where the one loaded first wins).
    pub fn overlaps(&self, other: &Routes) -> bool {
        let named = |r: &Routes| -> Vec<String> {
            r.export_to
                .iter()
                .filter(|e| *e != "~")
                .map(|e| {
                    if e == "." {
                        r.namespace.clone()
                    } else {
                        e.clone()
                    }
                })
                .collect()
        };
        match (self.exported_everywhere(), other.exported_everywhere()) {
            (true, true) => true,
            (true, false) => !named(other).is_empty(),
            (false, true) => !named(self).is_empty(),
            (false, false) => named(self).iter().any(|n| named(other).contains(n)),
        }
    }
}

impl Service {
    /// Whether proxies in `namespace` may see it, by its `exportTo`.
    pub fn exported_to(&self, namespace: &str) -> bool {
        exported(&self.export_to, &self.namespace, namespace)
    }
}

/// Istio's `exportTo` of a resource in `own` namespace: whether proxies in
/// `namespace` see it. Everywhere when empty; `*` everywhere, `.` its own
/// namespace, `~` nowhere, else the namespaces named.
pub fn exported(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to.iter().any(|e| match e.as_str() {
            "*" => true,
            "." => own == namespace,
            other => other == namespace,
        })
}

/// Istio's default cluster ID.
pub const DEFAULT_CLUSTER_ID: &str = "Kubernetes";

#[derive(Clone, Debug, PartialEq)]
pub struct Workload {
    pub name: String,
    pub namespace: String,
    pub address: String,
    /// Shared with the WorkloadEntry (or pod) it was made from.
    pub labels: Arc<Labels>,
    pub service_account: String,
    pub ports: BTreeMap<String, u32>,
    /// Whether a sidecar stands in front of it (mutual TLS to its inbound
    /// listener) or requests go to its address as they are.
    pub sidecar: bool,
    /// "region/zone/subzone" (`locality_of`).
    pub locality: String,
}

/// A workload's locality: as its entry says, else from Istio's
/// `istio-locality` label (`region.zone.subzone`), else the topology labels
/// (`topology.kubernetes.io/region`, `.../zone`, `topology.istio.io/subzone`).
pub fn locality_of(explicit: Option<&str>, labels: &Labels) -> String {
    if let Some(l) = explicit.filter(|l| !l.is_empty()) {
        return l.to_string();
    }
    if let Some(l) = labels.get("istio-locality") {
        return l.replace('.', "/");
    }
    let part = |k: &str| labels.get(k).map(String::as_str).unwrap_or_default();
    let parts = [
        part("topology.kubernetes.io/region"),
        part("topology.kubernetes.io/zone"),
        part("topology.istio.io/subzone"),
    ];
    parts.join("/").trim_end_matches('/').to_string()
}

/// Istio's label saying whether an endpoint has a sidecar (`istio`) or not.
pub const TLS_MODE_LABEL: &str = "security.istio.io/tlsMode";

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
    /// The VirtualService's name, for messages.
    pub name: String,
    /// The VirtualService's `exportTo`: which namespaces' proxies it routes.
    pub export_to: Vec<String>,
    pub http: Vec<HttpRoute>,
    /// For the service's opaque TCP ports.
    pub tcp: Vec<crate::istio::TcpRoute>,
    /// For the service's TLS ports, by server name.
    pub tls: Vec<crate::istio::TlsRoute>,
}

/// A DestinationRule as proxies follow it.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub namespace: String,
    /// Its host, fully qualified, or a wildcard such as `*.local`.
    pub host: String,
    /// Shared with the loaded resource, not copied.
    pub dr: Arc<DestinationRule>,
}

impl Rule {
    /// Whether it sets traffic policies, for itself or a subset.
    pub fn has_policy(&self) -> bool {
        self.dr.traffic_policy.is_some()
            || self.dr.subsets.iter().any(|s| s.traffic_policy.is_some())
    }
}

/// How closely a rule's `pattern` names `host`: `None` when it does not; an
/// exact name beats any wildcard, and a longer wildcard a shorter one.
pub fn host_match(pattern: &str, host: &str) -> Option<usize> {
    match pattern.strip_prefix('*') {
        None => (pattern == host).then_some(usize::MAX),
        Some(suffix) => host.ends_with(suffix).then_some(suffix.len()),
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Model {
    pub trust_domain: String,
    /// Istio's cluster ID for everything this model describes.
    pub cluster_id: String,
    pub services: BTreeMap<String, Service>,
    pub workloads: BTreeMap<String, Workload>,
    /// By host, every VirtualService for it in load order: a proxy takes
    /// the first exported to its namespace ([`Model::route_choice`]).
    pub routes: BTreeMap<String, Vec<Routes>>,
    /// Every DestinationRule, in load order. A proxy follows those
    /// [`Model::rule_choice`] picks for its namespace.
    pub rules: Vec<Rule>,
    /// By namespace, the indices in `rules` of its DestinationRules.
    rules_by_ns: BTreeMap<String, Vec<usize>>,
    /// By (namespace, host), the rule setting its traffic policies, for errors.
    policy_owners: BTreeMap<(String, String), String>,
    /// PeerAuthentications, checked: (namespace, name, selector, mode, port modes).
    pub peer_auth: Vec<PeerAuth>,
    /// AuthorizationPolicies, checked and in the proxies' form.
    pub authz: Vec<Authz>,
    /// RequestAuthentications: their JWT rules in the proxies' form.
    pub jwt: Vec<Jwt>,
    /// Telemetry resources, checked and in the proxies' form.
    pub telemetry: Vec<TelemetryPolicy>,
    /// Sidecar resources, checked: which services each proxy is told of.
    pub sidecars: Vec<SidecarScope>,
    /// The mesh config's `outboundTrafficPolicy.mode`, when it sets one.
    pub outbound: Option<Outbound>,
    /// The mesh config's `protocolDetectionTimeout`, when it sets one.
    pub protocol_detection_ms: Option<u64>,
    /// Access logs as JSON rather than Istio's text format (pilot's
    /// `--access-log-encoding`, Istio's `meshConfig.accessLogEncoding`).
    pub access_log_json: bool,
    /// The mesh config's extension providers by name: an OTLP collector's
    /// `host:port`, or (`Err`) what a provider the mesh cannot use for
    /// traces is ("a zipkin provider").
    pub tracing_providers: BTreeMap<String, Result<String, String>>,
    /// The collector (`host:port`) of the mesh config's
    /// `defaultProviders.tracing`: where traces go without a Telemetry, or
    /// from one that names no provider.
    pub default_collector: Option<String>,
}

/// One Telemetry resource. `None` fields are not set by it: a workload
/// takes each from the most specific Telemetry that sets it (selector,
/// then namespace, then root namespace), as Istio resolves them.
#[derive(Clone, Debug, PartialEq)]
pub struct TelemetryPolicy {
    pub scope: Scope,
    /// `<namespace>/<name>`.
    pub source: String,
    pub access_logs: Option<Vec<mesh_proto::resources::AccessLog>>,
    pub tracing: Option<mesh_proto::resources::Tracing>,
    /// Metrics switched off: (client side, server side).
    pub metrics_off: Option<(bool, bool)>,
}

impl TelemetryPolicy {
    /// 0 for a selector's, 1 for a namespace's, 2 for the mesh's.
    pub fn rank(&self) -> u8 {
        match (&self.scope.selector, self.scope.namespace == ROOT_NAMESPACE) {
            (Some(_), _) => 0,
            (None, false) => 1,
            (None, true) => 2,
        }
    }
}

/// The access-log provider the mesh defines (Istio's built-in name).
pub const ACCESS_LOG_PROVIDER: &str = "envoy";

#[derive(Clone, Debug, PartialEq)]
pub struct Jwt {
    pub scope: Scope,
    pub rules: Vec<mesh_proto::resources::JwtRule>,
}

/// Which workloads a security policy covers: from the root namespace,
/// every workload; otherwise those in its namespace; in both cases only
/// those its selector (if any) picks.
#[derive(Clone, Debug, PartialEq)]
pub struct Scope {
    pub namespace: String,
    pub selector: Option<Labels>,
}

impl Scope {
    pub fn applies_to(&self, w: &Workload) -> bool {
        (self.namespace == ROOT_NAMESPACE || self.namespace == w.namespace)
            && self
                .selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }

    /// The scope of a policy in `meta`'s namespace with `selector`; an
    /// empty selector is refused (it would select nothing in Istio, which
    /// is never what was meant).
    fn of(
        meta: &Meta,
        selector: Option<&crate::istio::MatchLabels>,
        ctx: &str,
        errors: &mut Vec<String>,
    ) -> Option<Self> {
        let selector = match selector {
            Some(s) if s.match_labels.is_empty() => {
                errors.push(format!(
                    "{ctx}: spec.selector.matchLabels is empty; remove spec.selector to cover the whole namespace"
                ));
                return None;
            }
            Some(s) => Some(s.match_labels.clone()),
            None => None,
        };
        Some(Self {
            namespace: meta.namespace.to_string(),
            selector,
        })
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Authz {
    pub scope: Scope,
    pub policy: mesh_proto::resources::AuthorizationPolicy,
}

const CONDITION_KEYS: [&str; 6] = [
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.port",
    "connection.sni",
];

fn check_cidrs(list: &[String], at: &str, errors: &mut Vec<String>) {
    for c in list {
        let (addr, bits) = c
            .split_once('/')
            .map_or((c.as_str(), None), |(a, b)| (a, Some(b)));
        let ok = match addr.parse::<std::net::IpAddr>() {
            Err(_) => false,
            Ok(ip) => {
                let max = if ip.is_ipv4() { 32 } else { 128 };
                bits.is_none_or(|b| b.parse::<u8>().is_ok_and(|b| b <= max))
            }
        };
        if !ok {
            errors.push(format!("{at}: {c:?} is not an IP address or CIDR"));
        }
    }
}

fn check_ports(list: &[String], at: &str, errors: &mut Vec<String>) {
    for p in list {
        if p.parse::<u16>().is_err() {
            errors.push(format!("{at}: {p:?} is not a port number"));
        }
    }
}

/// Istio's root namespace: a PeerAuthentication there without a selector
/// covers the whole mesh.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// A PeerAuthentication mode; `None` where it is UNSET (inherited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MtlsMode {
    Strict,
    Permissive,
    Disable,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuth {
    pub namespace: String,
    pub name: String,
    pub selector: Option<Labels>,
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u32, MtlsMode>,
}

impl PeerAuth {
    /// Whether its selector picks `w` (one without a selector picks none
    /// by itself: it is its namespace's).
    pub fn selects(&self, w: &Workload) -> bool {
        self.namespace == w.namespace
            && self
                .selector
                .as_ref()
                .is_some_and(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    }
}

fn mtls_mode(mode: Option<&str>) -> Result<Option<MtlsMode>, String> {
    match mode.unwrap_or("UNSET") {
        "UNSET" => Ok(None),
        "STRICT" => Ok(Some(MtlsMode::Strict)),
        "PERMISSIVE" => Ok(Some(MtlsMode::Permissive)),
        "DISABLE" => Ok(Some(MtlsMode::Disable)),
        other => Err(format!(
            "{other:?} is not a mode; use UNSET, STRICT, PERMISSIVE or DISABLE"
        )),
    }
}

impl Model {
    /// What `w`'s inbound side accepts, as Istio resolves it: a
    /// PeerAuthentication selecting the workload, else its namespace's, else
    /// the root namespace's, else PERMISSIVE; UNSET inherits from the next
    /// level. Also the per-port overrides of the selecting one.
    pub fn mtls_for(&self, w: &Workload) -> (MtlsMode, BTreeMap<u32, MtlsMode>) {
        let workload = self.peer_auth.iter().find(|p| p.selects(w));
        let namespace = self
            .peer_auth
            .iter()
            .find(|p| p.namespace == w.namespace && p.selector.is_none());
        let mesh = self
            .peer_auth
            .iter()
            .find(|p| p.namespace == ROOT_NAMESPACE && p.selector.is_none());
        let mode = [workload, namespace, mesh]
            .into_iter()
            .flatten()
            .find_map(|p| p.mode)
            .unwrap_or(MtlsMode::Permissive);
        let ports = workload.map(|p| p.ports.clone()).unwrap_or_default();
        (mode, ports)
    }

    fn add_authz(
        &mut self,
        meta: &Meta,
        ap: &crate::istio::AuthorizationPolicy,
        errors: &mut Vec<String>,
    ) {
        use mesh_proto::resources as pb;
        let ctx = at(meta, "AuthorizationPolicy");
        let action = match ap.action.as_deref().unwrap_or("ALLOW") {
            "ALLOW" => pb::authorization_policy::Action::Allow,
            "DENY" => pb::authorization_policy::Action::Deny,
            "AUDIT" => pb::authorization_policy::Action::Audit,
            "CUSTOM" => {
                errors.push(format!(
                    "{ctx}: spec.action CUSTOM (external authorization) is not supported; use ALLOW or DENY"
                ));
                return;
            }
            other => {
                errors.push(format!(
                    "{ctx}: spec.action {other:?} is not ALLOW, DENY, AUDIT or CUSTOM"
                ));
                return;
            }
        };
        if ap.target_ref.is_some() || !ap.target_refs.is_empty() {
            errors.push(format!(
                "{ctx}: spec.targetRef(s) is not supported (it names Gateway API objects); use spec.selector"
            ));
        }
        if ap.provider.is_some() {
            errors.push(format!(
                "{ctx}: spec.provider is only for action CUSTOM, which is not supported"
            ));
        }
        let Some(scope) = Scope::of(meta, ap.selector.as_ref(), &ctx, errors) else {
            return;
        };
        let mut rules = Vec::new();
        for (i, r) in ap.rules.iter().enumerate() {
            let mut from = Vec::new();
            for (j, f) in r.from.iter().enumerate() {
                let s = &f.source;
                let at = format!("{ctx}: spec.rules[{i}].from[{j}].source");
                check_cidrs(&s.ip_blocks, &format!("{at}.ipBlocks"), errors);
                check_cidrs(&s.not_ip_blocks, &format!("{at}.notIpBlocks"), errors);
                check_cidrs(&s.remote_ip_blocks, &format!("{at}.remoteIpBlocks"), errors);
                check_cidrs(
                    &s.not_remote_ip_blocks,
                    &format!("{at}.notRemoteIpBlocks"),
                    errors,
                );
                from.push(pb::AuthzSource {
                    principals: s.principals.clone(),
                    not_principals: s.not_principals.clone(),
                    request_principals: s.request_principals.clone(),
                    not_request_principals: s.not_request_principals.clone(),
                    namespaces: s.namespaces.clone(),
                    not_namespaces: s.not_namespaces.clone(),
                    ip_blocks: s.ip_blocks.clone(),
                    not_ip_blocks: s.not_ip_blocks.clone(),
                    remote_ip_blocks: s.remote_ip_blocks.clone(),
                    not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
                });
            }
            let mut to = Vec::new();
            for (j, t) in r.to.iter().enumerate() {
                let o = &t.operation;
                let at = format!("{ctx}: spec.rules[{i}].to[{j}].operation");
                check_ports(&o.ports, &format!("{at}.ports"), errors);
                check_ports(&o.not_ports, &format!("{at}.notPorts"), errors);
                to.push(pb::AuthzOperation {
                    hosts: o.hosts.clone(),
                    not_hosts: o.not_hosts.clone(),
                    ports: o.ports.clone(),
                    not_ports: o.not_ports.clone(),
                    methods: o.methods.clone(),
                    not_methods: o.not_methods.clone(),
                    paths: o.paths.clone(),
                    not_paths: o.not_paths.clone(),
                });
            }
            let mut when = Vec::new();
            for (j, c) in r.when.iter().enumerate() {
                let at = format!("{ctx}: spec.rules[{i}].when[{j}]");
                let known = CONDITION_KEYS.contains(&c.key.as_str())
                    || c.key.starts_with("request.auth.")
                    || (c.key.starts_with("request.headers[") && c.key.ends_with(']'));
                if !known {
                    errors.push(format!(
                        "{at}.key {:?} is not supported; use request.headers[...], source.ip, remote.ip, source.namespace, source.principal, destination.port, connection.sni or request.auth.*",
                        c.key
                    ));
                }
                if matches!(c.key.as_str(), "source.ip" | "remote.ip") {
                    check_cidrs(&c.values, &format!("{at}.values"), errors);
                    check_cidrs(&c.not_values, &format!("{at}.notValues"), errors);
                }
                if c.key == "destination.port" {
                    check_ports(&c.values, &format!("{at}.values"), errors);
                    check_ports(&c.not_values, &format!("{at}.notValues"), errors);
                }
                if c.values.is_empty() && c.not_values.is_empty() {
                    errors.push(format!("{at}: needs values or notValues"));
                }
                when.push(pb::AuthzCondition {
                    key: c.key.clone(),
                    values: c.values.clone(),
                    not_values: c.not_values.clone(),
                });
            }
            rules.push(pb::AuthzRule { from, to, when });
        }
        self.authz.push(Authz {
            scope,
            policy: pb::AuthorizationPolicy {
                name: format!("{}/{}", meta.namespace, meta.name),
                action: action as i32,
                rules,
            },
        });
    }

    fn add_mesh_config(
        &mut self,
        meta: &Meta,
        mc: &crate::istio::MeshConfig,
        errors: &mut Vec<String>,
    ) {
        let ctx = at(meta, "ConfigMap");
        if let Some(o) = &mc.outbound_traffic_policy {
            self.outbound = outbound_mode(&ctx, "data.mesh.outboundTrafficPolicy.mode", o, errors);
        }
        if let Some(t) = &mc.protocol_detection_timeout {
            match crate::istio::parse_duration(t) {
                Ok(d) => self.protocol_detection_ms = Some(d.as_millis() as u64),
                Err(e) => errors.push(format!("{ctx}: data.mesh.protocolDetectionTimeout: {e}")),
            }
        }
        let ignored: Vec<&str> = mc
            .other
            .keys()
            .chain(mc.default_providers.other.keys())
            .map(String::as_str)
            .collect();
        if !ignored.is_empty() {
            tracing::info!(config = %ctx, ?ignored, "mesh config settings pilot does not read");
        }
        for p in &mc.extension_providers {
            let provider = match (&p.opentelemetry, p.other.keys().next()) {
                (Some(o), None) if o.http.is_some() => {
                    Err("an OTLP/HTTP provider (opentelemetry.http)".into())
                }
                (Some(o), None) => Ok(format!("{}:{}", o.service, o.port)),
                (None, Some(kind)) => Err(format!("a {kind} provider")),
                _ => {
                    errors.push(format!(
                        "{ctx}: data.mesh.extensionProviders[{:?}]: give exactly one provider kind",
                        p.name
                    ));
                    continue;
                }
            };
            self.tracing_providers.insert(p.name.clone(), provider);
        }
        match mc.default_providers.tracing.as_slice() {
            [] => {}
            [name] => match self.tracing_provider(name) {
                Ok(addr) => self.default_collector = Some(addr),
                Err(e) => errors.push(format!("{ctx}: data.mesh.defaultProviders.tracing: {e}")),
            },
            _ => errors.push(format!(
                "{ctx}: data.mesh.defaultProviders.tracing: name one provider; the sidecars export to one collector"
            )),
        }
    }

    /// The collector's `host:port` for tracing provider `name`.
    fn tracing_provider(&self, name: &str) -> Result<String, String> {
        match self.tracing_providers.get(name) {
            Some(Ok(addr)) => Ok(addr.clone()),
            Some(Err(kind)) => Err(format!(
                "provider {name:?} is {kind}; the sidecars export traces over OTLP/gRPC (an opentelemetry provider)"
            )),
            None => Err(format!(
                "no extensionProvider named {name:?} in the mesh config (ConfigMap {ROOT_NAMESPACE}/istio, data.mesh.extensionProviders)"
            )),
        }
    }

    fn add_telemetry(
        &mut self,
        meta: &Meta,
        t: &crate::istio::Telemetry,
        errors: &mut Vec<String>,
    ) {
        use mesh_proto::resources as pb;
        let ctx = at(meta, "Telemetry");
        if t.target_ref.is_some() || !t.target_refs.is_empty() {
            errors.push(format!(
                "{ctx}: spec.targetRef(s) is not supported; use spec.selector"
            ));
        }
        let Some(scope) = Scope::of(meta, t.selector.as_ref(), &ctx, errors) else {
            return;
        };
        let side =
            |m: &Option<crate::istio::WorkloadMode>, at: &str, errors: &mut Vec<String>| match m
                .as_ref()
                .and_then(|m| m.mode.as_deref())
            {
                None | Some("CLIENT_AND_SERVER") => pb::TrafficSide::ClientAndServer,
                Some("CLIENT") => pb::TrafficSide::Client,
                Some("SERVER") => pb::TrafficSide::Server,
                Some(other) => {
                    errors.push(format!(
                        "{at}.match.mode {other:?} is not one of CLIENT_AND_SERVER, CLIENT, SERVER"
                    ));
                    pb::TrafficSide::ClientAndServer
                }
            };
        let mut access_logs = Vec::new();
        for (i, a) in t.access_logging.iter().enumerate() {
            let at = format!("{ctx}: spec.accessLogging[{i}]");
            let side = side(&a.match_, &at, errors);
            for (j, p) in a.providers.iter().enumerate() {
                if p.name != ACCESS_LOG_PROVIDER {
                    errors.push(format!(
                        "{at}.providers[{j}].name {:?} is not a provider the mesh defines; use {ACCESS_LOG_PROVIDER:?}",
                        p.name
                    ));
                }
            }
            let filter = a
                .filter
                .as_ref()
                .map(|f| f.expression.clone())
                .unwrap_or_default();
            if !filter.is_empty()
                && let Err(e) = mesh_proto::filter::compile(&filter)
            {
                errors.push(format!("{at}.filter.expression: {e}"));
            }
            if a.disabled != Some(true) {
                access_logs.push(pb::AccessLog {
                    encoding: if self.access_log_json {
                        pb::access_log::Encoding::Json
                    } else {
                        pb::access_log::Encoding::Text
                    } as i32,
                    filter,
                    side: side as i32,
                });
            }
        }
        let mut tracing = None;
        for (i, tr) in t.tracing.iter().enumerate() {
            let at = format!("{ctx}: spec.tracing[{i}]");
            if i > 0 {
                errors.push(format!(
                    "{at}: only one tracing entry per Telemetry is supported"
                ));
                break;
            }
            let percent = tr
                .random_sampling_percentage
                .unwrap_or(mesh_proto::DEFAULT_TRACE_SAMPLING_PERCENT);
            if !(0.0..=100.0).contains(&percent) {
                errors.push(format!(
                    "{at}.randomSamplingPercentage {percent} is not between 0 and 100"
                ));
            }
            let collector = match tr.providers.as_slice() {
                [] => self.default_collector.clone().unwrap_or_default(),
                [p] => self.tracing_provider(&p.name).unwrap_or_else(|e| {
                    errors.push(format!("{at}.providers: {e}"));
                    String::new()
                }),
                _ => {
                    errors.push(format!(
                        "{at}.providers: name one provider; the sidecars export to one collector"
                    ));
                    String::new()
                }
            };
            let mut out = pb::Tracing {
                sampling_percent: percent,
                collector,
                disable_span_reporting: tr.disable_span_reporting.unwrap_or(false),
                side: side(&tr.match_, &at, errors) as i32,
                ..Default::default()
            };
            for (name, tag) in &tr.custom_tags {
                match tag {
                    crate::istio::CustomTag {
                        literal: Some(l),
                        header: None,
                        environment: None,
                    } => drop(out.literal_tags.insert(name.clone(), l.value.clone())),
                    crate::istio::CustomTag {
                        literal: None,
                        header: Some(h),
                        environment: None,
                    } => drop(out.header_tags.insert(name.clone(), h.name.clone())),
                    _ => errors.push(format!(
                        "{at}.customTags.{name}: set exactly one of literal or header (environment is not supported)"
                    )),
                }
            }
            tracing = Some(out);
        }
        let mut metrics_off = None;
        for (i, m) in t.metrics.iter().enumerate() {
            let at = format!("{ctx}: spec.metrics[{i}]");
            let (mut client, mut server) = metrics_off.unwrap_or((false, false));
            if m.reporting_interval.is_some() {
                errors.push(format!(
                    "{at}.reportingInterval is not supported; Prometheus reads the sidecars when it scrapes"
                ));
            }
            for (j, o) in m.overrides.iter().enumerate() {
                let at = format!("{at}.overrides[{j}]");
                let selector = o.match_.clone().unwrap_or_default();
                let all = matches!(selector.metric.as_deref(), None | Some("ALL_METRICS"))
                    && selector.custom_metric.is_none();
                if !all || o.tag_overrides.is_some() {
                    errors.push(format!(
                        "{at}: only switching all metrics off or on is supported (match.metric ALL_METRICS with disabled); per-metric overrides and tagOverrides are not"
                    ));
                    continue;
                }
                let off = o.disabled.unwrap_or(false);
                let mode = crate::istio::WorkloadMode {
                    mode: selector.mode.clone(),
                };
                match side(&Some(mode), &at, errors) {
                    pb::TrafficSide::ClientAndServer => (client, server) = (off, off),
                    pb::TrafficSide::Client => client = off,
                    pb::TrafficSide::Server => server = off,
                }
            }
            metrics_off = Some((client, server));
            if let Some(p) = m.providers.iter().find(|p| p.name != "prometheus") {
                errors.push(format!(
                    "{at}.providers: {:?} is not a metrics provider the mesh has; use \"prometheus\"",
                    p.name
                ));
            }
        }
        self.telemetry.push(TelemetryPolicy {
            scope,
            source: format!("{}/{}", meta.namespace, meta.name),
            access_logs: (!t.access_logging.is_empty()).then_some(access_logs),
            tracing,
            metrics_off,
        });
    }

    fn add_request_authn(
        &mut self,
        meta: &Meta,
        ra: &crate::istio::RequestAuthentication,
        errors: &mut Vec<String>,
    ) {
        use mesh_proto::resources as pb;
        let ctx = at(meta, "RequestAuthentication");
        if ra.target_ref.is_some() || !ra.target_refs.is_empty() {
            errors.push(format!(
                "{ctx}: spec.targetRef(s) is not supported; use spec.selector"
            ));
        }
        let Some(scope) = Scope::of(meta, ra.selector.as_ref(), &ctx, errors) else {
            return;
        };
        let mut rules = Vec::new();
        for (i, r) in ra.jwt_rules.iter().enumerate() {
            let at = format!("{ctx}: spec.jwtRules[{i}]");
            if r.issuer.is_empty() {
                errors.push(format!("{at}.issuer is required"));
            }
            if !r.from_cookies.is_empty() {
                errors.push(format!(
                    "{at}.fromCookies is not supported; use fromHeaders or fromParams"
                ));
            }
            let jwks = match (&r.jwks, &r.jwks_uri) {
                (Some(j), _) => {
                    let ok = serde_json::from_str::<serde_json::Value>(j)
                        .ok()
                        .is_some_and(|v| v.get("keys").is_some_and(|k| k.is_array()));
                    if !ok {
                        errors.push(format!(
                            "{at}.jwks is not a JWKS document (JSON with a \"keys\" array)"
                        ));
                    }
                    j.clone()
                }
                (None, Some(uri)) => {
                    if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                        errors.push(format!("{at}.jwksUri {uri:?} is not an http(s) URL"));
                    }
                    crate::jwks::cached(uri).unwrap_or_default()
                }
                (None, None) => {
                    errors.push(format!("{at}: give jwks or jwksUri"));
                    String::new()
                }
            };
            rules.push(pb::JwtRule {
                source: format!("{}/{}", meta.namespace, meta.name),
                issuer: r.issuer.clone(),
                audiences: r.audiences.clone(),
                jwks,
                jwks_uri: r.jwks_uri.clone().unwrap_or_default(),
                from_headers: r
                    .from_headers
                    .iter()
                    .map(|h| pb::JwtHeader {
                        name: h.name.clone(),
                        prefix: h.prefix.clone().unwrap_or_default(),
                    })
                    .collect(),
                from_params: r.from_params.clone(),
                forward_original_token: r.forward_original_token,
                output_payload_to_header: r.output_payload_to_header.clone().unwrap_or_default(),
                output_claim_to_headers: r
                    .output_claim_to_headers
                    .iter()
                    .map(|c| pb::ClaimToHeader {
                        header: c.header.clone(),
                        claim: c.claim.clone(),
                    })
                    .collect(),
            });
        }
        self.jwt.push(Jwt { scope, rules });
    }

    fn add_peer_auth(
        &mut self,
        meta: &Meta,
        pa: &crate::istio::PeerAuthentication,
        errors: &mut Vec<String>,
    ) {
        let ctx = at(meta, "PeerAuthentication");
        let mode = match mtls_mode(pa.mtls.as_ref().and_then(|m| m.mode.as_deref())) {
            Ok(m) => m,
            Err(e) => {
                errors.push(format!("{ctx}: spec.mtls.mode {e}"));
                None
            }
        };
        let selector = pa
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone())
            .filter(|l| !l.is_empty());
        if !pa.port_level_mtls.is_empty() && selector.is_none() {
            errors.push(format!(
                "{ctx}: spec.portLevelMtls needs spec.selector: port-level modes apply to selected workloads only"
            ));
        }
        let mut ports = BTreeMap::new();
        for (port, m) in &pa.port_level_mtls {
            let Ok(n) = port.parse::<u32>() else {
                errors.push(format!(
                    "{ctx}: spec.portLevelMtls key {port:?} is not a port number"
                ));
                continue;
            };
            match mtls_mode(m.mode.as_deref()) {
                Ok(Some(mode)) => {
                    ports.insert(n, mode);
                }
                Ok(None) => {}
                Err(e) => errors.push(format!("{ctx}: spec.portLevelMtls[{n}].mode {e}")),
            }
        }
        // Two without a selector in one namespace: Istio uses the oldest;
        // files carry no age, so say so rather than guess.
        if selector.is_none()
            && let Some(other) = self
                .peer_auth
                .iter()
                .find(|p| *p.namespace == *meta.namespace && p.selector.is_none())
        {
            errors.push(format!(
                "{ctx}: namespace {} already has a PeerAuthentication without a selector ({}); keep one",
                meta.namespace, other.name
            ));
        }
        self.peer_auth.push(PeerAuth {
            namespace: meta.namespace.to_string(),
            name: meta.name.to_string(),
            selector,
            mode,
            ports,
        });
    }
}

/// Makes a short host name fully qualified in `namespace`, as Istio does.
pub fn fqdn(host: &str, namespace: &str) -> String {
    if host.contains('.') {
        host.to_string()
    } else {
        format!("{host}.{namespace}.svc.cluster.local")
    }
}

/// How errors name a resource: `<file>: <kind> <namespace>/<name>`.
/// The resources of `set` but for any that repeats the kind, namespace
/// and name of one before it: each such is an error naming where the name
/// was taken, and is left out (a name is one resource, as in Kubernetes).
fn unique<'a>(set: &'a ConfigSet, errors: &mut Vec<String>) -> Vec<&'a (Meta, Resource)> {
    let mut seen: std::collections::HashMap<(&str, &str, &str), &Meta> = Default::default();
    let mut out = Vec::with_capacity(set.resources.len());
    for item @ (meta, res) in &set.resources {
        let kind = res.kind();
        match seen.entry((kind, &meta.namespace, &meta.name)) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(meta);
                out.push(item);
            }
            std::collections::hash_map::Entry::Occupied(first) => {
                let place = if first.get().file == meta.file {
                    "earlier in the same file".to_string()
                } else {
                    format!("in {}", first.get().file.display())
                };
                errors.push(format!(
                    "{}: the name is taken by the {kind} {place}; names are unique per kind and namespace, so rename or remove one",
                    at(meta, kind)
                ));
            }
        }
    }
    out
}

pub fn at(meta: &Meta, kind: &str) -> String {
    format!(
        "{}: {kind} {}/{}",
        meta.file.display(),
        meta.namespace,
        meta.name
    )
}

impl Model {
    pub fn build(set: &ConfigSet, trust_domain: &str) -> Result<Self, Vec<String>> {
        Self::build_with(set, trust_domain, |_| {})
    }

    /// As [`Model::build`], with mesh-wide settings applied by `mesh` first.
    pub fn build_with(
        set: &ConfigSet,
        trust_domain: &str,
        mesh: impl FnOnce(&mut Model),
    ) -> Result<Self, Vec<String>> {
        let mut m = Model {
            trust_domain: trust_domain.to_string(),
            cluster_id: DEFAULT_CLUSTER_ID.to_string(),
            ..Default::default()
        };
        mesh(&mut m);
        let mut errors = Vec::new();
        let resources = unique(set, &mut errors);
        // Telemetry names the mesh config's providers: read it first.
        let mut meshes = resources.iter().filter_map(|(meta, r)| match r {
            Resource::MeshConfig(mc) => Some((meta, mc)),
            _ => None,
        });
        if let Some((meta, mc)) = meshes.next() {
            m.add_mesh_config(meta, mc, &mut errors);
        }
        for (meta, _) in meshes {
            errors.push(format!(
                "{}: a second mesh config; keep one ConfigMap {ROOT_NAMESPACE}/istio",
                at(meta, "ConfigMap")
            ));
        }
        for (meta, res) in &resources {
            match res {
                Resource::MeshConfig(_) => {}
                Resource::KubeService(svc) => {
                    if m.services.contains_key(&svc.host) {
                        errors.push(format!(
                            "{}: host {} is also defined by a ServiceEntry; remove one of them",
                            at(meta, "Service"),
                            svc.host
                        ));
                    } else {
                        m.services.insert(svc.host.clone(), (**svc).clone());
                    }
                }
                Resource::Pod(w) => {
                    m.workloads.insert(w.proxy_id(), (**w).clone());
                }
                Resource::ServiceEntry(se) => m.add_service(meta, se, &mut errors),
                Resource::WorkloadEntry(we) => {
                    let w = Workload {
                        name: meta.name.to_string(),
                        namespace: meta.namespace.to_string(),
                        address: we.address.clone(),
                        labels: we.labels.clone(),
                        service_account: we
                            .service_account
                            .clone()
                            .unwrap_or_else(|| "default".to_string()),
                        ports: we.ports.clone(),
                        // The mesh runs a sidecar beside each of its
                        // WorkloadEntries unless its label says otherwise.
                        sidecar: we.labels.get(TLS_MODE_LABEL).is_none_or(|m| m == "istio"),
                        locality: locality_of(we.locality.as_deref(), &we.labels),
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
                Resource::DestinationRule(dr) => m.add_rule(meta, dr, &mut errors),
                Resource::VirtualService(_) => {}
                Resource::PeerAuthentication(pa) => m.add_peer_auth(meta, pa, &mut errors),
                Resource::AuthorizationPolicy(ap) => m.add_authz(meta, ap, &mut errors),
                Resource::RequestAuthentication(ra) => m.add_request_authn(meta, ra, &mut errors),
                Resource::Telemetry(t) => m.add_telemetry(meta, t, &mut errors),
                Resource::Sidecar(sc) => m.add_sidecar(meta, sc, &mut errors),
            }
        }
        for (meta, res) in &resources {
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
        let mut inline = Vec::new();
        for (i, e) in se.endpoints.iter().enumerate() {
            if e.address.parse::<std::net::IpAddr>().is_err() {
                errors.push(format!(
                    "{}: spec.endpoints[{i}].address {:?} is not an IP address (endpoints by DNS name are not supported yet)",
                    at(meta, "ServiceEntry"),
                    e.address
                ));
                continue;
            }
            inline.push(Workload {
                name: meta.name.to_string(),
                namespace: meta.namespace.to_string(),
                address: e.address.clone(),
                labels: e.labels.clone(),
                service_account: e
                    .service_account
                    .clone()
                    .unwrap_or_else(|| "default".to_string()),
                ports: e.ports.clone(),
                // As in Istio: only an endpoint labelled as having one.
                sidecar: e.labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio"),
                locality: locality_of(e.locality.as_deref(), &e.labels),
            });
        }
        if !inline.is_empty() && se.workload_selector.is_some() {
            errors.push(format!(
                "{}: spec: give endpoints or workloadSelector, not both",
                at(meta, "ServiceEntry")
            ));
        }
        for host in &se.hosts {
            let host = fqdn(host, &meta.namespace);
            if self.services.contains_key(&host) {
                errors.push(format!(
                    "{}: host {host} is already defined by another ServiceEntry or a Kubernetes Service",
                    at(meta, "ServiceEntry")
                ));
                continue;
            }
            self.services.insert(
                host.clone(),
                Service {
                    host,
                    namespace: meta.namespace.to_string(),
                    ports: se.ports.clone(),
                    selector: se
                        .workload_selector
                        .as_ref()
                        .map(|s| s.labels.clone())
                        .unwrap_or_default(),
                    vips: vips.clone(),
                    inline: inline.clone(),
                    export_to: se.export_to.clone(),
                },
            );
        }
    }

    fn add_sidecar(&mut self, meta: &Meta, sc: &crate::istio::Sidecar, errors: &mut Vec<String>) {
        let ctx = at(meta, "Sidecar");
        let before = errors.len();
        let unsupported = [
            ("spec.ingress", !sc.ingress.is_empty()),
            (
                "spec.inboundConnectionPool",
                sc.inbound_connection_pool.is_some(),
            ),
            (
                "spec.outboundTrafficPolicy.egressProxy",
                sc.outbound_traffic_policy
                    .as_ref()
                    .is_some_and(|o| o.egress_proxy.is_some()),
            ),
        ];
        for (field, set) in unsupported {
            if set {
                errors.push(format!("{ctx}: {field} is not supported yet; remove it"));
            }
        }
        if sc.egress.is_empty() {
            errors.push(format!(
                "{ctx}: spec.egress is empty; list the hosts this workload may reach, e.g. \"./*\" and \"istio-system/*\""
            ));
        }
        let mut hosts = Vec::new();
        for (i, e) in sc.egress.iter().enumerate() {
            for (field, set) in [
                ("port", e.port.is_some()),
                ("bind", e.bind.is_some()),
                ("captureMode", e.capture_mode.is_some()),
            ] {
                if set {
                    errors.push(format!(
                        "{ctx}: spec.egress[{i}].{field} is not supported yet; remove it"
                    ));
                }
            }
            if e.hosts.is_empty() {
                errors.push(format!("{ctx}: spec.egress[{i}].hosts is empty"));
            }
            for (j, h) in e.hosts.iter().enumerate() {
                match h.split_once('/') {
                    Some((ns, host)) if !ns.is_empty() && !host.is_empty() => {
                        hosts.push((ns.to_string(), host.to_string()));
                    }
                    _ => errors.push(format!(
                        "{ctx}: spec.egress[{i}].hosts[{j}] {h:?} must be <namespace>/<host>, e.g. \"./*\" or \"prod/reviews.prod.svc.cluster.local\""
                    )),
                }
            }
        }
        let outbound = sc
            .outbound_traffic_policy
            .as_ref()
            .and_then(|o| outbound_mode(&ctx, "spec.outboundTrafficPolicy.mode", o, errors));
        let selector = match &sc.workload_selector {
            Some(s) if s.labels.is_empty() => {
                errors.push(format!(
                    "{ctx}: spec.workloadSelector.labels is empty; remove spec.workloadSelector to cover the whole namespace"
                ));
                None
            }
            Some(s) => Some(s.labels.clone()),
            None => None,
        };
        if selector.is_none()
            && let Some(other) = self
                .sidecars
                .iter()
                .find(|o| *o.namespace == *meta.namespace && o.selector.is_none())
        {
            errors.push(format!(
                "{ctx}: Sidecar {}/{} already covers the namespace; give this one a spec.workloadSelector or merge them",
                other.namespace, other.name
            ));
        }
        if errors.len() == before {
            self.sidecars.push(SidecarScope {
                namespace: meta.namespace.to_string(),
                name: meta.name.to_string(),
                selector,
                hosts,
                outbound,
            });
        }
    }

    /// The Sidecar that scopes a proxy in `namespace` with `labels`: the
    /// first (by name) in its namespace whose selector picks it, else its
    /// namespace's default, else the root namespace's default.
    /// Which of `host`'s VirtualServices ([`Model::routes`]) proxies in
    /// `namespace` follow, by its place: the first loaded of those exported
    /// to the namespace (two for one host conflict, and the first wins, as
    /// in Istio). `None`: the service's default route.
    pub fn route_choice(&self, host: &str, namespace: &str) -> Option<usize> {
        self.routes
            .get(host)?
            .iter()
            .position(|r| exported(&r.export_to, &r.namespace, namespace))
    }

    /// Every choice [`Model::route_choice`] can make for `host`, whatever
    /// the namespace: the VirtualServices up to the first exported
    /// everywhere, and `None` when none is.
    pub fn route_choices(&self, host: &str) -> Vec<Option<usize>> {
        let mut choices = Vec::new();
        for (i, r) in self.routes.get(host).into_iter().flatten().enumerate() {
            choices.push(Some(i));
            if r.exported_everywhere() {
                return choices;
            }
        }
        choices.push(None);
        choices
    }

    pub fn sidecar_for(&self, namespace: &str, labels: &Labels) -> Option<&SidecarScope> {
        let default_of = |ns: &str| {
            self.sidecars
                .iter()
                .find(|s| s.namespace == ns && s.selector.is_none())
        };
        self.sidecars
            .iter()
            .filter(|s| s.namespace == namespace)
            .filter(|s| s.selector.as_ref().is_some_and(|sel| selects(sel, labels)))
            .min_by(|a, b| a.name.cmp(&b.name))
            .or_else(|| default_of(namespace))
            .or_else(|| default_of(ROOT_NAMESPACE))
    }

    /// Whether a proxy in `namespace` under `sidecar` is told of `svc`.
    pub fn visible(&self, svc: &Service, namespace: &str, sidecar: Option<&SidecarScope>) -> bool {
        svc.exported_to(namespace) && sidecar.is_none_or(|s| s.imports(svc, namespace))
    }

    fn add_rule(&mut self, meta: &Meta, dr: &Arc<DestinationRule>, errors: &mut Vec<String>) {
        let ctx = at(meta, "DestinationRule");
        crate::dr::check(&ctx, dr, errors);
        let rule = Rule {
            namespace: meta.namespace.to_string(),
            host: fqdn(&dr.host, &meta.namespace),
            dr: dr.clone(),
        };
        // Several rules of a namespace may name subsets of one host; only
        // one may set policies. Other namespaces' rules are theirs.
        if rule.has_policy() {
            let key = (rule.namespace.clone(), rule.host.clone());
            if let Some(other) = self.policy_owners.get(&key) {
                errors.push(format!(
                    "{ctx}: spec.trafficPolicy: {other} already sets traffic policies for {} in namespace {}; merge them into one DestinationRule",
                    rule.host, rule.namespace
                ));
                return;
            }
            self.policy_owners.insert(key, ctx);
        }
        self.rules_by_ns
            .entry(rule.namespace.clone())
            .or_default()
            .push(self.rules.len());
        self.rules.push(rule);
    }

    /// The DestinationRules a proxy in `namespace` follows for `host`, as
    /// indices in `rules`. Istio's lookup: the rules of the proxy's own
    /// namespace, then those of the service's namespace, then those of the
    /// root namespace, each taken only when exported to the proxy's
    /// namespace; in the first of these with any rule for the host, the
    /// rules of its most specific host (an exact name over `*.suffix`).
    pub fn rule_choice(&self, host: &str, namespace: &str) -> Vec<usize> {
        if self.rules.is_empty() {
            return Vec::new();
        }
        let svc_ns = self.services.get(host).map(|s| s.namespace.as_str());
        for from in [Some(namespace), svc_ns, Some(ROOT_NAMESPACE)]
            .into_iter()
            .flatten()
        {
            let Some(indices) = self.rules_by_ns.get(from) else {
                continue;
            };
            let applicable = || {
                indices.iter().copied().filter(|&i| {
                    let r = &self.rules[i];
                    exported(&r.dr.export_to, &r.namespace, namespace)
                })
            };
            let best = applicable()
                .filter_map(|i| host_match(&self.rules[i].host, host))
                .max();
            if let Some(best) = best {
                return applicable()
                    .filter(|&i| host_match(&self.rules[i].host, host) == Some(best))
                    .collect();
            }
        }
        Vec::new()
    }

    /// Every choice [`Model::rule_choice`] can make for `host`, whatever
    /// the namespace, each once. Namespaces no rule names or is in choose
    /// alike, so one of them (`""`, which no namespace is) stands for all.
    pub fn rule_choices(&self, host: &str) -> Vec<Vec<usize>> {
        let mut namespaces = vec!["", ROOT_NAMESPACE];
        namespaces.extend(self.services.get(host).map(|s| s.namespace.as_str()));
        for r in self
            .rules
            .iter()
            .filter(|r| host_match(&r.host, host).is_some())
        {
            namespaces.push(&r.namespace);
            namespaces.extend(r.dr.export_to.iter().map(String::as_str));
        }
        let mut choices: Vec<Vec<usize>> = Vec::new();
        for ns in namespaces {
            let choice = self.rule_choice(host, ns);
            if !choices.contains(&choice) {
                choices.push(choice);
            }
        }
        choices
    }

    /// The subsets a choice of rules defines, by name (the first rule to
    /// name one defines it), and the rule among them setting policies.
    pub fn rule_set<'a>(
        &'a self,
        choice: &[usize],
    ) -> (BTreeMap<&'a str, &'a Labels>, Option<&'a DestinationRule>) {
        let mut subsets = BTreeMap::new();
        for &i in choice {
            for s in &self.rules[i].dr.subsets {
                subsets.entry(s.name.as_str()).or_insert(&s.labels);
            }
        }
        let policy = choice
            .iter()
            .map(|&i| &self.rules[i])
            .find(|r| r.has_policy())
            .map(|r| &*r.dr);
        (subsets, policy)
    }

    fn add_routes(&mut self, meta: &Meta, vs: &VirtualService, errors: &mut Vec<String>) {
        let ctx = at(meta, "VirtualService");
        // Bound only to gateways: nothing for sidecars.
        if !vs.gateways.is_empty() && !vs.gateways.iter().any(|g| g == "mesh") {
            return;
        }
        let mut tcp = vs.tcp.clone();
        for (i, route) in tcp.iter_mut().enumerate() {
            crate::vs::check_tcp(&format!("{ctx}: spec.tcp[{i}]"), route, errors);
        }
        let mut tls = vs.tls.clone();
        for (i, route) in tls.iter_mut().enumerate() {
            crate::vs::check_tls(&format!("{ctx}: spec.tls[{i}]"), route, errors);
        }
        let l4 = tcp
            .iter_mut()
            .enumerate()
            .map(|(i, r)| (format!("spec.tcp[{i}]"), &mut r.route))
            .chain(
                tls.iter_mut()
                    .enumerate()
                    .map(|(i, r)| (format!("spec.tls[{i}]"), &mut r.route)),
            );
        for (field, route) in l4 {
            for (j, d) in route.iter_mut().enumerate() {
                d.destination.host = fqdn(&d.destination.host, &meta.namespace);
                let where_ = format!("{field}.route[{j}].destination");
                self.check_destination(&ctx, &where_, &d.destination, errors);
            }
        }
        let mut http = vs.http.clone();
        for (i, route) in http.iter_mut().enumerate() {
            let field = format!("spec.http[{i}]");
            crate::vs::check(&format!("{ctx}: {field}"), route, errors);
            let mirrors = route
                .mirror
                .iter_mut()
                .map(|d| (format!("{field}.mirror"), d))
                .chain(route.mirrors.iter_mut().enumerate().map(|(j, m)| {
                    (
                        format!("{field}.mirrors[{j}].destination"),
                        &mut m.destination,
                    )
                }));
            let routes = route.route.iter_mut().enumerate().map(|(j, d)| {
                (
                    format!("{field}.route[{j}].destination"),
                    &mut d.destination,
                )
            });
            for (where_, dest) in routes.chain(mirrors) {
                dest.host = fqdn(&dest.host, &meta.namespace);
                self.check_destination(&ctx, &where_, dest, errors);
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
            self.routes.entry(host).or_default().push(Routes {
                namespace: meta.namespace.to_string(),
                name: meta.name.to_string(),
                export_to: vs.export_to.clone(),
                http: http.clone(),
                tcp: tcp.clone(),
                tls: tls.clone(),
            });
        }
    }

    fn check_destination(
        &self,
        ctx: &str,
        where_: &str,
        dest: &crate::istio::Destination,
        errors: &mut Vec<String>,
    ) {
        let Some(svc) = self.services.get(&dest.host) else {
            errors.push(format!(
                "{ctx}: {where_}.host {} is not a known service; add a ServiceEntry for it",
                dest.host
            ));
            return;
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
            let known = self.rules.iter().any(|r| {
                host_match(&r.host, &dest.host).is_some()
                    && r.dr.subsets.iter().any(|s| s.name == *subset)
            });
            if !known {
                errors.push(format!(
                    "{ctx}: {where_}.subset {subset:?} is not defined by any DestinationRule for {}",
                    dest.host
                ));
            }
        }
    }

    /// Every service's endpoints by host: the workloads of its namespace
    /// its selector picks, and a ServiceEntry's own endpoints. One pass over
    /// the workloads, grouped by namespace first.
    pub fn members(&self) -> std::collections::HashMap<&str, Vec<&Workload>> {
        let mut by_ns: std::collections::HashMap<&str, Vec<&Workload>> = Default::default();
        for w in self.workloads.values() {
            by_ns.entry(w.namespace.as_str()).or_default().push(w);
        }
        self.services
            .values()
            .map(|svc| {
                let selected = by_ns
                    .get(svc.namespace.as_str())
                    .into_iter()
                    .flatten()
                    .copied()
                    .filter(|w| !svc.selector.is_empty() && selects(&svc.selector, &w.labels));
                (svc.host.as_str(), selected.chain(&svc.inline).collect())
            })
            .collect()
    }
}

/// An outboundTrafficPolicy's mode; `None` when unset, or wrong (then
/// reported).
pub(crate) fn outbound_mode(
    ctx: &str,
    field: &str,
    policy: &crate::istio::OutboundTrafficPolicy,
    errors: &mut Vec<String>,
) -> Option<Outbound> {
    match policy.mode.as_deref() {
        None => None,
        Some("ALLOW_ANY") => Some(Outbound::AllowAny),
        Some("REGISTRY_ONLY") => Some(Outbound::RegistryOnly),
        Some(other) => {
            errors.push(format!(
                "{ctx}: {field} {other:?} is not ALLOW_ANY or REGISTRY_ONLY"
            ));
            None
        }
    }
}

pub fn selects(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Result<Model, Vec<String>> {
        let set = ConfigSet {
            resources: crate::store::parse_file(std::path::Path::new("pa.yaml"), yaml).unwrap(),
        };
        Model::build(&set, "cluster.local")
    }

    const WORKLOADS: &str = "apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: a, namespace: shop}
spec: {address: 10.0.0.1, labels: {app: a}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: b, namespace: shop}
spec: {address: 10.0.0.2, labels: {app: b}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: c, namespace: other}
spec: {address: 10.0.0.3, labels: {app: c}}
";

    fn mode(m: &Model, proxy: &str) -> (MtlsMode, BTreeMap<u32, MtlsMode>) {
        m.mtls_for(&m.workloads[proxy])
    }

    #[test]
    fn peer_authentication_resolves_workload_then_namespace_then_mesh() {
        // Nothing said: PERMISSIVE, as in Istio.
        let m = model(WORKLOADS).unwrap();
        assert_eq!(mode(&m, "a.shop").0, MtlsMode::Permissive);
        let m = model(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: default, namespace: istio-system}}
spec: {{mtls: {{mode: STRICT}}}}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {{name: default, namespace: shop}}
spec: {{mtls: {{mode: PERMISSIVE}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: b, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: b}}}}
  mtls: {{mode: UNSET}}
  portLevelMtls: {{8080: {{mode: DISABLE}}}}
"
        ))
        .unwrap();
        // Namespace beats mesh; a workload's UNSET inherits the namespace's.
        assert_eq!(mode(&m, "a.shop").0, MtlsMode::Permissive);
        assert_eq!(
            mode(&m, "b.shop"),
            (
                MtlsMode::Permissive,
                BTreeMap::from([(8080, MtlsMode::Disable)])
            )
        );
        // Another namespace gets the mesh-wide mode.
        assert_eq!(mode(&m, "c.other").0, MtlsMode::Strict);
    }

    #[test]
    fn bad_request_authentications_are_reported_with_the_field() {
        let errors = model(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  jwtRules:
  - jwks: 'not json'
  - issuer: https://a.test
    jwksUri: ftp://a.test/keys
    fromCookies: [session]
  - issuer: https://b.test
"
        ))
        .unwrap_err();
        let all = errors.join("\n");
        for want in [
            "spec.jwtRules[0].issuer is required",
            "spec.jwtRules[0].jwks is not a JWKS document",
            "spec.jwtRules[1].jwksUri \"ftp://a.test/keys\" is not an http(s) URL",
            "spec.jwtRules[1].fromCookies is not supported",
            "spec.jwtRules[2]: give jwks or jwksUri",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        // A misspelt field is refused when the file is read, naming it.
        let typo = crate::store::parse_file(
            std::path::Path::new("ra.yaml"),
            "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: typo, namespace: shop}
spec:
  jwtRule: []
",
        )
        .unwrap_err()
        .to_string();
        assert!(
            typo.contains("ra.yaml")
                && typo.contains("shop/typo")
                && typo.contains("unknown field `jwtRule`"),
            "{typo}"
        );
    }

    #[test]
    fn bad_peer_authentications_are_reported_with_the_field() {
        let errors = model(&format!(
            "{WORKLOADS}---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: typo, namespace: shop}}
spec: {{mtls: {{mode: STRICTT}}}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {{name: ports, namespace: other}}
spec: {{portLevelMtls: {{http: {{mode: STRICT}}}}}}
"
        ))
        .unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("PeerAuthentication shop/typo: spec.mtls.mode \"STRICTT\" is not a mode"),
            "{all}"
        );
        assert!(
            all.contains("spec.portLevelMtls needs spec.selector"),
            "{all}"
        );
        assert!(all.contains("key \"http\" is not a port number"), "{all}");
    }

    #[test]
    fn telemetry_resolves_selector_then_namespace_then_mesh_per_setting() {
        use mesh_proto::resources as pb;
        let m = model(&format!(
            "{WORKLOADS}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  accessLogging: [{{providers: [{{name: envoy}}]}}]
  tracing: [{{randomSamplingPercentage: 10}}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: shop, namespace: shop}}
spec:
  accessLogging:
  - match: {{mode: SERVER}}
    filter: {{expression: 'response.code >= 500'}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: b-quiet, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: b}}}}
  accessLogging: [{{disabled: true}}]
  tracing:
  - randomSamplingPercentage: 100
    customTags:
      team: {{literal: {{value: payments}}}}
      user: {{header: {{name: x-user}}}}
"
        ))
        .unwrap();
        let t = |w: &str| crate::generate::telemetry(&m, &m.workloads[w]);
        // c: only the mesh's.
        let c = t("c.other");
        assert_eq!(c.access_logs.len(), 1);
        assert_eq!(
            c.access_logs[0].side,
            pb::TrafficSide::ClientAndServer as i32
        );
        assert_eq!(c.tracing.as_ref().unwrap().sampling_percent, 10.0);
        // a: its namespace's access log, the mesh's tracing.
        let a = t("a.shop");
        assert_eq!(a.access_logs.len(), 1);
        assert_eq!(a.access_logs[0].filter, "response.code >= 500");
        assert_eq!(a.access_logs[0].side, pb::TrafficSide::Server as i32);
        assert_eq!(a.tracing.as_ref().unwrap().sampling_percent, 10.0);
        assert_eq!(a.sources, ["shop/shop", "istio-system/mesh-default"]);
        // b: its own: logs off, full sampling with tags.
        let b = t("b.shop");
        assert!(b.access_logs.is_empty());
        let tr = b.tracing.unwrap();
        assert_eq!(tr.sampling_percent, 100.0);
        assert_eq!(tr.literal_tags["team"], "payments");
        assert_eq!(tr.header_tags["user"], "x-user");
    }

    #[test]
    fn telemetry_mistakes_are_named() {
        let errors = model(
            "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: bad, namespace: shop}
spec:
  accessLogging:
  - providers: [{name: stackdriver}]
    filter: {expression: 'respnse.code >= 400'}
    match: {mode: BOTH}
  tracing: [{randomSamplingPercentage: 150, providers: [{name: jaeger}]}]
  metrics: [{overrides: [{match: {metric: REQUEST_COUNT}, disabled: true}]}]
",
        )
        .unwrap_err()
        .join("\n");
        for needle in [
            "spec.accessLogging[0].providers[0].name \"stackdriver\" is not a provider",
            "spec.accessLogging[0].filter.expression: unknown attribute \"respnse\"",
            "spec.accessLogging[0].match.mode \"BOTH\"",
            "spec.tracing[0].randomSamplingPercentage 150",
            "spec.tracing[0].providers: no extensionProvider named \"jaeger\" in the mesh config",
            "spec.metrics[0].overrides[0]: only switching all metrics off or on is supported",
        ] {
            assert!(errors.contains(needle), "{needle:?} not in:\n{errors}");
        }
        assert!(errors.contains("Telemetry shop/bad"), "{errors}");
    }

    #[test]
    fn endpoints_without_a_sidecar_carry_no_identity_and_no_tunnel() {
        let m = model(&format!(
            "{WORKLOADS}---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: vm, namespace: shop}}
spec: {{address: 10.0.0.9, labels: {{app: a, security.istio.io/tlsMode: disabled}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: a, namespace: shop}}
spec:
  hosts: [a.shop.svc.cluster.local]
  ports: [{{number: 80, name: http}}]
  workloadSelector: {{labels: {{app: a}}}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy, namespace: shop}}
spec:
  hosts: [legacy.example.com]
  ports: [{{number: 80, name: http}}]
  endpoints:
  - {{address: 192.0.2.7, ports: {{http: 8080}}}}
  - {{address: 192.0.2.8, labels: {{security.istio.io/tlsMode: istio}}, serviceAccount: legacy}}
"
        ))
        .unwrap();
        let eps = |host: &str| {
            let svc = &m.services[host];
            let members = m.members()[host].clone();
            crate::generate::cluster_endpoints(&m, &members, &svc.ports[0], None, "c").endpoints
        };
        let a = eps("a.shop.svc.cluster.local");
        let by = |addr: &str| a.iter().find(|e| e.address == addr).unwrap().clone();
        assert_eq!(
            by("10.0.0.1").tunnel_port,
            mesh_proto::ports::INBOUND as u32
        );
        assert_eq!(
            by("10.0.0.1").identity,
            "spiffe://cluster.local/ns/shop/sa/default"
        );
        // Labelled as having no sidecar: neither tunnel nor identity.
        assert_eq!(
            (by("10.0.0.9").tunnel_port, by("10.0.0.9").identity.as_str()),
            (0, "")
        );
        // A ServiceEntry's own endpoints: no sidecar unless labelled so;
        // the named port maps to the endpoint's.
        let legacy = eps("legacy.example.com");
        assert_eq!(legacy.len(), 2);
        assert_eq!((legacy[0].port, legacy[0].tunnel_port), (8080, 0));
        assert_eq!(
            legacy[1].identity,
            "spiffe://cluster.local/ns/shop/sa/legacy"
        );
        // They are no proxies of the mesh's.
        assert!(
            !m.workloads
                .values()
                .any(|w| w.address.starts_with("192.0.2."))
        );

        let errors = model(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: dns, namespace: shop}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https}]
  endpoints: [{address: api.example.com}]
",
        )
        .unwrap_err()
        .join("\n");
        assert!(
            errors.contains("spec.endpoints[0].address \"api.example.com\" is not an IP address"),
            "{errors}"
        );
    }

    const MESH_CONFIG: &str = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data:
  mesh: |-
    accessLogFile: /dev/stdout
    defaultProviders:
      tracing: [otel]
    extensionProviders:
    - name: otel
      opentelemetry: {service: collector.observability.svc.cluster.local, port: 4317}
    - name: zipkin
      zipkin: {service: zipkin.istio-system.svc.cluster.local, port: 9411}
    - name: otel-http
      opentelemetry:
        service: collector.observability.svc.cluster.local
        port: 4318
        maxTagLength: 256
        http: {path: /v1/traces}
";

    #[test]
    fn the_mesh_configs_tracing_provider_is_the_default_and_telemetry_names_it() {
        let m = model(&format!(
            "{WORKLOADS}---
{MESH_CONFIG}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: shop, namespace: shop}}
spec:
  tracing: [{{providers: [{{name: otel}}], randomSamplingPercentage: 100}}]
  metrics:
  - overrides: [{{match: {{metric: ALL_METRICS, mode: CLIENT}}, disabled: true}}]
"
        ))
        .unwrap();
        let t = |w: &str| crate::generate::telemetry(&m, &m.workloads[w]);
        // No Telemetry for c: the default provider at Istio's 1 %.
        let c = t("c.other");
        let tr = c.tracing.unwrap();
        assert_eq!(
            tr.collector,
            "collector.observability.svc.cluster.local:4317"
        );
        assert_eq!(tr.sampling_percent, 1.0);
        assert!(!c.client_metrics_off && !c.server_metrics_off);
        // The shop's: all of it sampled, to the same collector; the
        // calling side's metrics off.
        let a = t("a.shop");
        let tr = a.tracing.unwrap();
        assert_eq!(tr.sampling_percent, 100.0);
        assert_eq!(
            tr.collector,
            "collector.observability.svc.cluster.local:4317"
        );
        assert!(a.client_metrics_off && !a.server_metrics_off);

        // Naming a provider that is not OTLP is an error that says so.
        let errors = model(&format!(
            "{MESH_CONFIG}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: z, namespace: istio-system}}
spec:
  tracing: [{{providers: [{{name: zipkin}}]}}]
"
        ))
        .unwrap_err()
        .join("\n");
        assert!(
            errors.contains("provider \"zipkin\" is a zipkin provider; the sidecars export traces over OTLP/gRPC"),
            "{errors}"
        );
        let errors = model(&format!(
            "{MESH_CONFIG}---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: z, namespace: istio-system}}
spec:
  tracing: [{{providers: [{{name: otel-http}}]}}]
"
        ))
        .unwrap_err()
        .join("\n");
        assert!(
            errors.contains("provider \"otel-http\" is an OTLP/HTTP provider (opentelemetry.http); the sidecars export traces over OTLP/gRPC"),
            "{errors}"
        );
        // Other ConfigMaps are not the mesh's; a bad mesh config names its field.
        let other =
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: app-settings}\ndata: {x: y}\n";
        assert!(model(other).unwrap().default_collector.is_none());
        let bad = MESH_CONFIG.replace("port: 4317", "port: many");
        let err = crate::store::parse_file(std::path::Path::new("mesh.yaml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ConfigMap istio-system/istio"), "{err}");
        assert!(err.contains("data.mesh"), "{err}");
    }
}
