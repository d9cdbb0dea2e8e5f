//! Istio's AuthorizationPolicy, decided per request on the inbound side.
//!
//! Semantics (Istio's documentation): CUSTOM is not supported (pilot
//! refuses it); any matching DENY policy denies; then, if ALLOW policies
//! apply, the request is allowed only if one of them matches; with none, it
//! is allowed. AUDIT policies never change the outcome. A policy matches if
//! any of its rules does; a rule matches if any of its `from` sources, any
//! of its `to` operations and all of its `when` conditions match (an empty
//! list matches anything); within a source or operation every non-empty
//! field must match and no `not` field may. Strings match exactly, by
//! prefix (`abc*`), by suffix (`*abc`) or as `*` (present at all).
//!
//! For TCP (no HTTP request), HTTP-only fields (request principals, hosts,
//! methods, paths, request headers, request.auth.*) cannot be checked: an
//! ALLOW rule that uses one never matches, and in a DENY rule they are
//! ignored, so the deny covers more rather than less.
//!
//! Policies are compiled once per config snapshot (CIDRs parsed, strings
//! split into match kinds); a policy that does not compile rejects the
//! whole config (NACK), so a broken update never opens access.

use std::net::IpAddr;

use http::HeaderMap;
use mesh_proto::resources as pb;

/// What is known about a request (or, for TCP, a connection).
#[derive(Debug, Default)]
pub struct Request<'a> {
    /// The peer's SPIFFE ID without `spiffe://`, if it presented one.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source_ip: Option<IpAddr>,
    /// The app port the request is for.
    pub port: u32,
    /// `None` for TCP: HTTP-only fields cannot be checked.
    pub http: Option<HttpParts<'a>>,
    /// A JWT that RequestAuthentication verified, if the request had one.
    pub auth: Option<&'a crate::jwt::Verified>,
    /// The server name the peer asked for in its TLS handshake (`None`
    /// for plaintext): sidecars send `outbound_.<port>_.<subset>_.<host>`.
    pub sni: Option<&'a str>,
}

#[derive(Debug)]
pub struct HttpParts<'a> {
    /// Lowercase (hosts match case-insensitively; patterns are folded).
    pub host: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

/// The outcome, and which policy and rule (index in the policy) decided it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Allow { by: Option<(String, usize)> },
    Deny { by: Option<(String, usize)> },
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }

    /// Who decided, for logs and `meshctl authz check`.
    pub fn reason(&self) -> String {
        match self {
            Decision::Allow { by: Some((p, r)) } => format!("allowed by {p} rule {r}"),
            Decision::Allow { by: None } => "allowed: no ALLOW policy applies".into(),
            Decision::Deny { by: Some((p, r)) } => format!("denied by {p} rule {r}"),
            Decision::Deny { by: None } => "denied: ALLOW policies apply and none matches".into(),
        }
    }
}

/// A request described by hand, as `meshctl authz check` takes it (and
/// sends it to a sidecar's admin `POST /authz/check`).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Described {
    /// The caller's principal (`cluster.local/ns/NS/sa/SA`, `spiffe://`
    /// optional); `None` for a plaintext caller without a sidecar.
    pub from: Option<String>,
    pub source_ip: Option<IpAddr>,
    pub method: String,
    pub path: String,
    pub host: Option<String>,
    pub headers: Vec<(String, String)>,
    /// The app port; `None`: the workload's first.
    pub port: Option<u32>,
    /// A TCP connection rather than an HTTP request.
    pub tcp: bool,
    /// The claims of a JWT the request carries, taken as verified.
    pub jwt_claims: Option<serde_json::Value>,
}

impl Default for Described {
    fn default() -> Self {
        Self {
            from: None,
            source_ip: None,
            method: "GET".into(),
            path: "/".into(),
            host: None,
            headers: Vec::new(),
            port: None,
            tcp: false,
            jwt_claims: None,
        }
    }
}

impl Described {
    /// The decision of `policies` for this request; `default_port` when it
    /// names none. An error says which part of the description is wrong.
    pub fn decide(
        &self,
        policies: &Policies,
        default_port: Option<u32>,
    ) -> Result<Decision, String> {
        let principal = self
            .from
            .as_deref()
            .map(|p| p.strip_prefix("spiffe://").unwrap_or(p));
        let namespace = match principal {
            None => None,
            Some(p) => Some(
                format!("spiffe://{p}")
                    .parse::<mesh_identity::SpiffeId>()
                    .map(|id| id.namespace)
                    .map_err(|_| {
                        "--from must look like cluster.local/ns/<namespace>/sa/<account>"
                            .to_string()
                    })?,
            ),
        };
        let port = self
            .port
            .or(default_port)
            .ok_or("the workload serves no port; give --port")?;
        let mut headers = HeaderMap::new();
        for (k, v) in &self.headers {
            headers.insert(
                http::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|_| format!("--header {k}: not a header name"))?,
                v.parse()
                    .map_err(|_| format!("--header {k}={v}: not a header value"))?,
            );
        }
        let host = self.host.clone().unwrap_or_default().to_ascii_lowercase();
        let http = (!self.tcp).then(|| HttpParts {
            host: &host,
            method: &self.method,
            path: &self.path,
            headers: &headers,
        });
        let auth = self.jwt_claims.as_ref().map(|claims| {
            let s = |k: &str| claims.get(k).and_then(|v| v.as_str()).map(str::to_string);
            crate::jwt::Verified {
                principal: format!(
                    "{}/{}",
                    s("iss").unwrap_or_default(),
                    s("sub").unwrap_or_default()
                ),
                audiences: match claims.get("aud") {
                    Some(serde_json::Value::String(a)) => vec![a.clone()],
                    Some(serde_json::Value::Array(a)) => a
                        .iter()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect(),
                    _ => vec![],
                },
                presenter: s("azp"),
                claims: claims.clone(),
            }
        });
        Ok(policies.decide(&Request {
            principal,
            namespace: namespace.as_deref(),
            source_ip: self.source_ip,
            port,
            http,
            auth: auth.as_ref(),
            // The offline check describes no TLS handshake.
            sni: None,
        }))
    }
}

/// What `meshctl authz check` reports: the policies in scope for a
/// workload and, for a described request, the decision.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Checked {
    pub workload: String,
    pub policies: Vec<InScope>,
    pub decision: Option<Decision>,
}

/// A policy in scope, in short.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct InScope {
    pub name: String,
    pub action: String,
    pub rules: usize,
}

impl InScope {
    pub fn of(p: &pb::AuthorizationPolicy) -> Self {
        Self {
            name: p.name.clone(),
            action: pb::authorization_policy::Action::try_from(p.action)
                .map_or("?", |a| a.as_str_name())
                .to_string(),
            rules: p.rules.len(),
        }
    }
}

impl Checked {
    /// For people: the decision first (`yes` / `no`), then why, then the
    /// policies in scope.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(d) = &self.decision {
            out.push_str(if d.allowed() { "yes\n" } else { "no\n" });
            out.push_str(&format!("{}\n", d.reason()));
        }
        if self.policies.is_empty() {
            out.push_str(&format!(
                "no AuthorizationPolicy applies to {}\n",
                self.workload
            ));
        } else {
            out.push_str(&format!("policies that apply to {}:\n", self.workload));
            for p in &self.policies {
                out.push_str(&format!(
                    "  {:<40} {:<6} {} rules\n",
                    p.name, p.action, p.rules
                ));
            }
        }
        out
    }
}

/// A string pattern as Istio writes them.
#[derive(Clone, Debug)]
enum Pattern {
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    fn new(s: &str, fold: bool) -> Self {
        let s = if fold {
            s.to_ascii_lowercase()
        } else {
            s.to_string()
        };
        if s == "*" {
            Pattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            Pattern::Prefix(p.to_string())
        } else if let Some(p) = s.strip_prefix('*') {
            Pattern::Suffix(p.to_string())
        } else {
            Pattern::Exact(s)
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(e) => v == e,
            Pattern::Prefix(p) => v.starts_with(p.as_str()),
            Pattern::Suffix(p) => v.ends_with(p.as_str()),
        }
    }
}

/// A `values` / `not_values` pair: matches if any of `is` matches (or `is`
/// is empty) and none of `not` does. `None` values (unknown) match only
/// an empty `is` and never a `not`.
#[derive(Clone, Debug, Default)]
struct Field {
    is: Vec<Pattern>,
    not: Vec<Pattern>,
}

impl Field {
    fn new(is: &[String], not: &[String], fold: bool) -> Self {
        Self {
            is: is.iter().map(|s| Pattern::new(s, fold)).collect(),
            not: not.iter().map(|s| Pattern::new(s, fold)).collect(),
        }
    }

    fn used(&self) -> bool {
        !self.is.is_empty() || !self.not.is_empty()
    }

    fn matches(&self, v: Option<&str>) -> bool {
        let any = |ps: &[Pattern]| v.is_some_and(|v| ps.iter().any(|p| p.matches(v)));
        (self.is.is_empty() || any(&self.is)) && !any(&self.not)
    }
}

#[derive(Clone, Debug)]
struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(s: &str) -> Result<Self, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{s:?} has an invalid prefix length"))?,
        };
        Ok(Self { net, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(i)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.bits)).unwrap_or(0);
                u32::from(n) & mask == u32::from(i) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(i)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.bits))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(i) & mask
            }
            _ => false,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Cidrs {
    is: Vec<Cidr>,
    not: Vec<Cidr>,
}

impl Cidrs {
    fn new(is: &[String], not: &[String]) -> Result<Self, String> {
        let parse = |v: &[String]| {
            v.iter()
                .map(|s| Cidr::parse(s))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            is: parse(is)?,
            not: parse(not)?,
        })
    }

    fn matches(&self, ip: Option<IpAddr>) -> bool {
        let any = |cs: &[Cidr]| ip.is_some_and(|ip| cs.iter().any(|c| c.contains(ip)));
        (self.is.is_empty() || any(&self.is)) && !any(&self.not)
    }
}

#[derive(Clone, Debug, Default)]
struct Source {
    principals: Field,
    request_principals: Field,
    namespaces: Field,
    ip_blocks: Cidrs,
    remote_ip_blocks: Cidrs,
}

#[derive(Clone, Debug, Default)]
struct Ports {
    is: Vec<u32>,
    not: Vec<u32>,
}

impl Ports {
    fn new(is: &[String], not: &[String], at: &str) -> Result<Self, String> {
        let parse = |v: &[String]| {
            v.iter()
                .map(|p| {
                    p.parse::<u16>()
                        .map(u32::from)
                        .map_err(|_| format!("{at}: {p:?} is not a port number"))
                })
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Self {
            is: parse(is)?,
            not: parse(not)?,
        })
    }

    fn matches(&self, port: u32) -> bool {
        (self.is.is_empty() || self.is.contains(&port)) && !self.not.contains(&port)
    }
}

#[derive(Clone, Debug, Default)]
struct Operation {
    hosts: Field,
    ports: Ports,
    methods: Field,
    paths: Field,
}

#[derive(Clone, Debug)]
enum Key {
    Header(http::HeaderName),
    SourceIp,
    RemoteIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationPort,
    Sni,
    /// request.auth.principal / audiences / presenter.
    AuthPrincipal,
    AuthAudiences,
    AuthPresenter,
    /// request.auth.claims[a][b]...: a (nested) claim.
    AuthClaim(Vec<String>),
}

impl Key {
    fn http_only(&self) -> bool {
        !matches!(
            self,
            Key::SourceIp
                | Key::RemoteIp
                | Key::SourceNamespace
                | Key::SourcePrincipal
                | Key::DestinationPort
                | Key::Sni
        )
    }
}

#[derive(Clone, Debug)]
struct Condition {
    key: Key,
    values: Field,
    ips: Option<Cidrs>,
    ports: Option<Ports>,
}

#[derive(Clone, Debug, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
    /// Uses a field only HTTP requests have.
    http_only: bool,
}

#[derive(Clone, Debug)]
struct Policy {
    name: String,
    action: pb::authorization_policy::Action,
    rules: Vec<Rule>,
}

/// The policies for one workload, compiled.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    deny: Vec<Policy>,
    allow: Vec<Policy>,
}

impl Policies {
    /// Compiles `policies`; an error names the policy and the field.
    pub fn compile(policies: &[pb::AuthorizationPolicy]) -> Result<Self, String> {
        let mut out = Policies::default();
        for p in policies {
            let action = pb::authorization_policy::Action::try_from(p.action).map_err(|_| {
                format!(
                    "authorization policy {}: unknown action {}",
                    p.name, p.action
                )
            })?;
            let rules = p
                .rules
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    compile_rule(r)
                        .map_err(|e| format!("authorization policy {}: rules[{i}].{e}", p.name))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let policy = Policy {
                name: p.name.clone(),
                action,
                rules,
            };
            match action {
                pb::authorization_policy::Action::Allow => out.allow.push(policy),
                pb::authorization_policy::Action::Deny => out.deny.push(policy),
                pb::authorization_policy::Action::Audit => {}
                pb::authorization_policy::Action::Custom => {
                    return Err(format!(
                        "authorization policy {}: action CUSTOM (external authorization) is not supported",
                        p.name
                    ));
                }
            }
        }
        Ok(out)
    }

    /// A set that denies everything: what a config that fails to compile
    /// leaves in force (it never should: such a config is NACKed first).
    pub fn deny_all() -> Self {
        Policies {
            deny: vec![Policy {
                name: "(invalid policy config)".into(),
                action: pb::authorization_policy::Action::Deny,
                rules: vec![Rule::default()],
            }],
            allow: vec![],
        }
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty()
    }

    pub fn decide(&self, req: &Request<'_>) -> Decision {
        for p in &self.deny {
            if let Some(i) = p.rules.iter().position(|r| r.matches(req, p.action)) {
                return Decision::Deny {
                    by: Some((p.name.clone(), i)),
                };
            }
        }
        if self.allow.is_empty() {
            return Decision::Allow { by: None };
        }
        for p in &self.allow {
            if let Some(i) = p.rules.iter().position(|r| r.matches(req, p.action)) {
                return Decision::Allow {
                    by: Some((p.name.clone(), i)),
                };
            }
        }
        Decision::Deny { by: None }
    }
}

/// What can be said of every request a connection may carry: `Some(true)`
/// all match, `Some(false)` none does, `None` it depends on the request
/// (its method, path, headers, token, or port where the connection carries
/// several).
type OnConnection = Option<bool>;

fn all_of(each: impl IntoIterator<Item = OnConnection>) -> OnConnection {
    let mut out = Some(true);
    for m in each {
        match m {
            Some(false) => return Some(false),
            None => out = None,
            Some(true) => {}
        }
    }
    out
}

fn any_of(each: impl IntoIterator<Item = OnConnection>) -> OnConnection {
    let mut out = Some(false);
    for m in each {
        match m {
            Some(true) => return Some(true),
            None => out = None,
            Some(false) => {}
        }
    }
    out
}

impl Policies {
    /// Whether these policies now deny every request an open connection
    /// could carry, judged from what the connection alone tells (`conn`,
    /// whose `http` is `None`): its peer, namespace and address, and its
    /// app port when it has one (`port`; `None` for a connection between
    /// sidecars, which carries requests for every port). Such a connection
    /// is closed when a new config arrives; one that some request could
    /// still pass stays open and each request is judged as it comes.
    pub fn revokes(&self, conn: &Request<'_>, port: Option<u32>) -> Option<Decision> {
        for p in &self.deny {
            if let Some(i) = p
                .rules
                .iter()
                .position(|r| r.on_connection(conn, port) == Some(true))
            {
                return Some(Decision::Deny {
                    by: Some((p.name.clone(), i)),
                });
            }
        }
        let none_allows = self.allow.iter().all(|p| {
            p.rules
                .iter()
                .all(|r| r.on_connection(conn, port) == Some(false))
        });
        (!self.allow.is_empty() && none_allows).then_some(Decision::Deny { by: None })
    }
}

fn compile_rule(r: &pb::AuthzRule) -> Result<Rule, String> {
    let mut http_only = false;
    let mut from = Vec::new();
    for (i, s) in r.from.iter().enumerate() {
        let at = |e: String| format!("from[{i}].source.{e}");
        let request_principals =
            Field::new(&s.request_principals, &s.not_request_principals, false);
        http_only |= request_principals.used();
        from.push(Source {
            principals: Field::new(&s.principals, &s.not_principals, false),
            request_principals,
            namespaces: Field::new(&s.namespaces, &s.not_namespaces, false),
            ip_blocks: Cidrs::new(&s.ip_blocks, &s.not_ip_blocks)
                .map_err(|e| at(format!("ipBlocks: {e}")))?,
            remote_ip_blocks: Cidrs::new(&s.remote_ip_blocks, &s.not_remote_ip_blocks)
                .map_err(|e| at(format!("remoteIpBlocks: {e}")))?,
        });
    }
    let mut to = Vec::new();
    for (i, o) in r.to.iter().enumerate() {
        let op = Operation {
            hosts: Field::new(&o.hosts, &o.not_hosts, true),
            ports: Ports::new(&o.ports, &o.not_ports, &format!("to[{i}].operation.ports"))?,
            methods: Field::new(&o.methods, &o.not_methods, false),
            paths: Field::new(&o.paths, &o.not_paths, false),
        };
        http_only |= op.hosts.used() || op.methods.used() || op.paths.used();
        to.push(op);
    }
    let mut when = Vec::new();
    for (i, c) in r.when.iter().enumerate() {
        let key = parse_key(&c.key).map_err(|e| format!("when[{i}].key: {e}"))?;
        let ips = match key {
            Key::SourceIp | Key::RemoteIp => Some(
                Cidrs::new(&c.values, &c.not_values)
                    .map_err(|e| format!("when[{i}].values: {e}"))?,
            ),
            _ => None,
        };
        let ports = match key {
            Key::DestinationPort => Some(Ports::new(
                &c.values,
                &c.not_values,
                &format!("when[{i}].values"),
            )?),
            _ => None,
        };
        http_only |= key.http_only();
        when.push(Condition {
            values: Field::new(&c.values, &c.not_values, false),
            key,
            ips,
            ports,
        });
    }
    Ok(Rule {
        from,
        to,
        when,
        http_only,
    })
}

fn parse_key(key: &str) -> Result<Key, String> {
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        return http::HeaderName::from_bytes(name.as_bytes())
            .map(Key::Header)
            .map_err(|_| format!("{name:?} is not a header name"));
    }
    Ok(match key {
        "source.ip" => Key::SourceIp,
        "remote.ip" => Key::RemoteIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.port" => Key::DestinationPort,
        "connection.sni" => Key::Sni,
        "request.auth.principal" => Key::AuthPrincipal,
        "request.auth.audiences" => Key::AuthAudiences,
        "request.auth.presenter" => Key::AuthPresenter,
        k if k.starts_with("request.auth.claims[") && k.ends_with(']') => {
            let inner = &k["request.auth.claims[".len()..k.len() - 1];
            let path: Vec<String> = inner.split("][").map(str::to_string).collect();
            if path.iter().any(String::is_empty) {
                return Err(format!("{k:?} names an empty claim"));
            }
            Key::AuthClaim(path)
        }
        other => return Err(format!("{other:?} is not a supported condition key")),
    })
}

impl Rule {
    fn matches(&self, req: &Request<'_>, action: pb::authorization_policy::Action) -> bool {
        let tcp = req.http.is_none();
        if tcp && self.http_only && action == pb::authorization_policy::Action::Allow {
            return false;
        }
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(req)))
            && (self.to.is_empty() || self.to.iter().any(|o| o.matches(req)))
            && self.when.iter().all(|c| c.matches(req))
    }
}

impl Rule {
    /// This rule for every request on a connection (see [`Policies::revokes`]).
    fn on_connection(&self, conn: &Request<'_>, port: Option<u32>) -> OnConnection {
        let from = any_of(self.from.iter().map(|s| {
            let known = s.principals.matches(conn.principal)
                && s.namespaces.matches(conn.namespace)
                && s.ip_blocks.matches(conn.source_ip)
                && s.remote_ip_blocks.matches(conn.source_ip);
            all_of([Some(known), (!s.request_principals.used()).then_some(true)])
        }));
        let to = any_of(self.to.iter().map(|o| {
            let ports = match port {
                Some(p) => Some(o.ports.matches(p)),
                None => (o.ports.is.is_empty() && o.ports.not.is_empty()).then_some(true),
            };
            let request = o.hosts.used() || o.methods.used() || o.paths.used();
            all_of([ports, (!request).then_some(true)])
        }));
        let when = all_of(self.when.iter().map(|c| match c.key {
            Key::SourceIp
            | Key::RemoteIp
            | Key::SourceNamespace
            | Key::SourcePrincipal
            | Key::Sni => Some(c.matches(conn)),
            Key::DestinationPort => port.map(|p| c.ports.as_ref().is_some_and(|ps| ps.matches(p))),
            _ => None,
        }));
        all_of([
            if self.from.is_empty() {
                Some(true)
            } else {
                from
            },
            if self.to.is_empty() { Some(true) } else { to },
            when,
        ])
    }
}

impl Source {
    fn matches(&self, req: &Request<'_>) -> bool {
        self.principals.matches(req.principal)
            && self.namespaces.matches(req.namespace)
            && self.ip_blocks.matches(req.source_ip)
            && self.remote_ip_blocks.matches(req.source_ip)
            // For TCP the field is ignored (DENY) or the rule never gets
            // here (ALLOW).
            && (req.http.is_none()
                || self
                    .request_principals
                    .matches(req.auth.map(|a| a.principal.as_str())))
    }
}

impl Operation {
    fn matches(&self, req: &Request<'_>) -> bool {
        let port_ok = self.ports.matches(req.port);
        let Some(h) = &req.http else {
            return port_ok;
        };
        port_ok
            && self.hosts.matches(Some(h.host))
            && self.methods.matches(Some(h.method))
            && self.paths.matches(Some(h.path))
    }
}

impl Condition {
    /// A list-valued attribute (audiences, a list claim): matches if any
    /// element does, and none is in `not_values`.
    fn any_of(&self, values: Vec<&str>) -> bool {
        let is = self.values.is.is_empty()
            || values
                .iter()
                .any(|v| self.values.is.iter().any(|p| p.matches(v)));
        let not = values
            .iter()
            .any(|v| self.values.not.iter().any(|p| p.matches(v)));
        is && !not
    }

    fn matches(&self, req: &Request<'_>) -> bool {
        match &self.key {
            Key::SourceIp | Key::RemoteIp => {
                self.ips.as_ref().is_some_and(|c| c.matches(req.source_ip))
            }
            Key::SourceNamespace => self.values.matches(req.namespace),
            Key::SourcePrincipal => self.values.matches(req.principal),
            Key::DestinationPort => self.ports.as_ref().is_some_and(|p| p.matches(req.port)),
            Key::Sni => self.values.matches(req.sni),
            Key::Header(name) => match &req.http {
                // TCP: ignored in a DENY rule (an ALLOW one never gets here).
                None => true,
                Some(h) => {
                    let v = h.headers.get(name).and_then(|v| v.to_str().ok());
                    self.values.matches(v)
                }
            },
            // TCP: ignored in a DENY rule (an ALLOW one never gets here).
            _ if req.http.is_none() => true,
            Key::AuthPrincipal => self.values.matches(req.auth.map(|a| a.principal.as_str())),
            Key::AuthPresenter => self
                .values
                .matches(req.auth.and_then(|a| a.presenter.as_deref())),
            Key::AuthAudiences => self.any_of(
                req.auth
                    .map(|a| a.audiences.iter().map(String::as_str).collect())
                    .unwrap_or_default(),
            ),
            Key::AuthClaim(path) => {
                let mut v = req.auth.map(|a| &a.claims);
                for p in path {
                    v = v.and_then(|v| v.get(p));
                }
                let values: Vec<&str> = match v {
                    Some(serde_json::Value::String(s)) => vec![s.as_str()],
                    Some(serde_json::Value::Array(a)) => {
                        a.iter().filter_map(|v| v.as_str()).collect()
                    }
                    _ => vec![],
                };
                self.any_of(values)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! Cases from Istio's AuthorizationPolicy reference and security tasks.
    #![allow(clippy::cloned_ref_to_slice_refs, clippy::type_complexity)]
    use super::*;
    use pb::authorization_policy::Action;

    fn policy(name: &str, action: Action, rules: Vec<pb::AuthzRule>) -> pb::AuthorizationPolicy {
        pb::AuthorizationPolicy {
            name: name.into(),
            action: action as i32,
            rules,
        }
    }

    fn strs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    fn from(s: pb::AuthzSource) -> pb::AuthzRule {
        pb::AuthzRule {
            from: vec![s],
            ..Default::default()
        }
    }

    fn to(o: pb::AuthzOperation) -> pb::AuthzRule {
        pb::AuthzRule {
            to: vec![o],
            ..Default::default()
        }
    }

    /// ALLOW: reviews' identity, method GET.
    fn reviews_may_get(name: &str) -> pb::AuthorizationPolicy {
        policy(
            name,
            Action::Allow,
            vec![pb::AuthzRule {
                from: vec![pb::AuthzSource {
                    principals: strs(&[REVIEWS]),
                    ..Default::default()
                }],
                to: vec![pb::AuthzOperation {
                    methods: strs(&["GET"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        )
    }

    const REVIEWS: &str = "cluster.local/ns/default/sa/bookinfo-reviews";
    const PRODUCTPAGE: &str = "cluster.local/ns/default/sa/bookinfo-productpage";

    struct Req {
        principal: Option<&'static str>,
        ns: Option<&'static str>,
        ip: &'static str,
        port: u32,
        http: Option<(
            &'static str,
            &'static str,
            &'static str,
            Vec<(&'static str, &'static str)>,
        )>,
        sni: Option<&'static str>,
    }

    fn get(principal: Option<&'static str>, path: &'static str) -> Req {
        Req {
            principal,
            ns: principal.map(|p| p.split('/').nth(2).unwrap()),
            ip: "10.244.0.12",
            port: 9080,
            http: Some(("ratings:9080", "GET", path, vec![])),
            sni: Some("outbound_.9080_._.ratings.default.svc.cluster.local"),
        }
    }

    fn decide(policies: &[pb::AuthorizationPolicy], r: &Req) -> Decision {
        let headers: HeaderMap = r
            .http
            .as_ref()
            .map(|(_, _, _, h)| {
                h.iter()
                    .map(|(k, v)| (k.parse().unwrap(), v.parse().unwrap()))
                    .collect()
            })
            .unwrap_or_default();
        let req = Request {
            principal: r.principal,
            namespace: r.ns,
            source_ip: Some(r.ip.parse().unwrap()),
            port: r.port,
            http: r.http.as_ref().map(|(host, method, path, _)| HttpParts {
                host,
                method,
                path,
                headers: &headers,
            }),
            auth: None,
            sni: r.sni,
        };
        Policies::compile(policies).unwrap().decide(&req)
    }

    fn allowed(policies: &[pb::AuthorizationPolicy], r: &Req) -> bool {
        decide(policies, r).allowed()
    }

    #[test]
    fn no_policy_allows_and_allow_nothing_denies() {
        let r = get(Some(REVIEWS), "/ratings/0");
        assert!(allowed(&[], &r));
        // `spec: {}`: ALLOW with no rules matches nothing: allow-nothing.
        let allow_nothing = policy("default/allow-nothing", Action::Allow, vec![]);
        assert_eq!(
            decide(&[allow_nothing.clone()], &r),
            Decision::Deny { by: None }
        );
        // `rules: [{}]` matches everything.
        let allow_all = policy("default/allow-all", Action::Allow, vec![Default::default()]);
        assert!(allowed(&[allow_nothing, allow_all.clone()], &r));
        // deny-all: DENY with one empty rule; DENY is evaluated first.
        let deny_all = policy("default/deny-all", Action::Deny, vec![Default::default()]);
        assert_eq!(
            decide(&[allow_all, deny_all], &r),
            Decision::Deny {
                by: Some(("default/deny-all".into(), 0))
            }
        );
        // An empty DENY (no rules) denies nothing; AUDIT never decides.
        let deny_nothing = policy("default/deny-nothing", Action::Deny, vec![]);
        let audit = policy("default/audit", Action::Audit, vec![Default::default()]);
        assert!(allowed(&[deny_nothing, audit], &r));
    }

    #[test]
    fn principals_namespaces_and_their_not_forms() {
        let only_reviews = policy(
            "default/ratings",
            Action::Allow,
            vec![from(pb::AuthzSource {
                principals: strs(&[REVIEWS]),
                ..Default::default()
            })],
        );
        assert!(allowed(&[only_reviews.clone()], &get(Some(REVIEWS), "/")));
        assert!(!allowed(
            &[only_reviews.clone()],
            &get(Some(PRODUCTPAGE), "/")
        ));
        assert!(
            !allowed(&[only_reviews], &get(None, "/")),
            "plaintext has no principal"
        );
        // principals ["*"]: any authenticated peer, which plaintext is not.
        let any_mtls = policy(
            "default/mtls",
            Action::Allow,
            vec![from(pb::AuthzSource {
                principals: strs(&["*"]),
                ..Default::default()
            })],
        );
        assert!(allowed(&[any_mtls.clone()], &get(Some(PRODUCTPAGE), "/")));
        assert!(!allowed(&[any_mtls], &get(None, "/")));
        // Prefix and suffix forms.
        let suffix = policy(
            "default/sa",
            Action::Allow,
            vec![from(pb::AuthzSource {
                principals: strs(&["*/sa/bookinfo-reviews"]),
                ..Default::default()
            })],
        );
        assert!(allowed(&[suffix.clone()], &get(Some(REVIEWS), "/")));
        assert!(!allowed(&[suffix], &get(Some(PRODUCTPAGE), "/")));
        // DENY from outside namespace default (notNamespaces): plaintext,
        // with no namespace, is "not default" too.
        let outsiders = policy(
            "default/outsiders",
            Action::Deny,
            vec![from(pb::AuthzSource {
                not_namespaces: strs(&["default"]),
                ..Default::default()
            })],
        );
        assert!(allowed(&[outsiders.clone()], &get(Some(REVIEWS), "/")));
        let mut foreign = get(Some("cluster.local/ns/other/sa/x"), "/");
        foreign.ns = Some("other");
        assert!(!allowed(&[outsiders.clone()], &foreign));
        assert!(!allowed(&[outsiders], &get(None, "/")));
    }

    #[test]
    fn paths_methods_hosts_ports_and_ip_blocks() {
        let admin_deny = policy(
            "default/no-admin",
            Action::Deny,
            vec![to(pb::AuthzOperation {
                paths: strs(&["/admin*", "*/secret", "/exact"]),
                ..Default::default()
            })],
        );
        for (path, ok) in [
            ("/admin", false),
            ("/admin/x", false),
            ("/a/secret", false),
            ("/exact", false),
            ("/exactly", true),
            ("/public", true),
        ] {
            assert_eq!(
                allowed(&[admin_deny.clone()], &get(Some(REVIEWS), path)),
                ok,
                "{path}"
            );
        }
        let read_only = policy(
            "default/read-only",
            Action::Allow,
            vec![to(pb::AuthzOperation {
                methods: strs(&["GET", "HEAD"]),
                hosts: strs(&["Ratings:9080"]),
                ports: strs(&["9080"]),
                ..Default::default()
            })],
        );
        assert!(
            allowed(&[read_only.clone()], &get(Some(REVIEWS), "/")),
            "hosts are case-insensitive"
        );
        let mut post = get(Some(REVIEWS), "/");
        post.http.as_mut().unwrap().1 = "POST";
        assert!(!allowed(&[read_only.clone()], &post));
        let mut other_port = get(Some(REVIEWS), "/");
        other_port.port = 9081;
        assert!(!allowed(&[read_only], &other_port));
        let not_port = policy(
            "default/not-port",
            Action::Allow,
            vec![to(pb::AuthzOperation {
                not_ports: strs(&["9081"]),
                ..Default::default()
            })],
        );
        assert!(allowed(&[not_port.clone()], &get(Some(REVIEWS), "/")));
        assert!(!allowed(&[not_port], &other_port));
        let from_node1 = policy(
            "default/node1",
            Action::Allow,
            vec![from(pb::AuthzSource {
                ip_blocks: strs(&["10.244.1.0/24", "192.0.2.7"]),
                ..Default::default()
            })],
        );
        assert!(!allowed(&[from_node1.clone()], &get(Some(REVIEWS), "/")));
        let mut n1 = get(Some(REVIEWS), "/");
        n1.ip = "10.244.1.16";
        assert!(allowed(&[from_node1.clone()], &n1));
        n1.ip = "192.0.2.7";
        assert!(allowed(&[from_node1], &n1));
    }

    #[test]
    fn when_conditions_and_rules_combining() {
        // from AND to AND when, within one rule; any rule of a policy.
        let v1_from_reviews = policy(
            "default/v1",
            Action::Allow,
            vec![
                pb::AuthzRule {
                    from: vec![pb::AuthzSource {
                        principals: strs(&[REVIEWS]),
                        ..Default::default()
                    }],
                    to: vec![pb::AuthzOperation {
                        methods: strs(&["GET"]),
                        ..Default::default()
                    }],
                    when: vec![pb::AuthzCondition {
                        key: "request.headers[x-version]".into(),
                        values: strs(&["v1", "v2*"]),
                        not_values: strs(&["v2-beta"]),
                    }],
                },
                pb::AuthzRule {
                    when: vec![pb::AuthzCondition {
                        key: "source.namespace".into(),
                        values: strs(&["ops"]),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
        );
        let with = |v: &'static str| {
            let mut r = get(Some(REVIEWS), "/");
            r.http.as_mut().unwrap().3 = vec![("x-version", v)];
            r
        };
        assert_eq!(
            decide(&[v1_from_reviews.clone()], &with("v1")),
            Decision::Allow {
                by: Some(("default/v1".into(), 0))
            }
        );
        assert!(allowed(&[v1_from_reviews.clone()], &with("v2-final")));
        assert!(!allowed(&[v1_from_reviews.clone()], &with("v2-beta")));
        assert!(
            !allowed(&[v1_from_reviews.clone()], &get(Some(REVIEWS), "/")),
            "header missing"
        );
        let mut ops = get(Some("cluster.local/ns/ops/sa/bot"), "/");
        ops.ns = Some("ops");
        assert_eq!(
            decide(&[v1_from_reviews], &ops),
            Decision::Allow {
                by: Some(("default/v1".into(), 1))
            }
        );
        let by_ip_and_port = policy(
            "default/cond",
            Action::Deny,
            vec![pb::AuthzRule {
                when: vec![
                    pb::AuthzCondition {
                        key: "source.ip".into(),
                        values: strs(&["10.244.0.0/24"]),
                        ..Default::default()
                    },
                    pb::AuthzCondition {
                        key: "destination.port".into(),
                        values: strs(&["9080"]),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
        );
        assert!(!allowed(
            &[by_ip_and_port.clone()],
            &get(Some(REVIEWS), "/")
        ));
        let mut elsewhere = get(Some(REVIEWS), "/");
        elsewhere.ip = "10.244.1.5";
        assert!(allowed(&[by_ip_and_port], &elsewhere));
    }

    #[test]
    fn connection_sni_is_the_name_the_calling_sidecar_asked_for() {
        // Istio's documented use: allow only connections meant for one
        // service's port, by the SNI the client sidecar sends.
        let only_ratings_9080 = policy(
            "default/sni",
            Action::Allow,
            vec![pb::AuthzRule {
                when: vec![pb::AuthzCondition {
                    key: "connection.sni".into(),
                    values: strs(&["outbound_.9080_.*"]),
                    not_values: strs(&["*_.v2_.ratings.default.svc.cluster.local"]),
                }],
                ..Default::default()
            }],
        );
        assert!(allowed(
            &[only_ratings_9080.clone()],
            &get(Some(REVIEWS), "/")
        ));
        let mut v2 = get(Some(REVIEWS), "/");
        v2.sni = Some("outbound_.9080_.v2_.ratings.default.svc.cluster.local");
        assert!(!allowed(&[only_ratings_9080.clone()], &v2), "notValues");
        let mut other_port = get(Some(REVIEWS), "/");
        other_port.sni = Some("outbound_.9091_._.ratings.default.svc.cluster.local");
        assert!(!allowed(&[only_ratings_9080.clone()], &other_port));
        // Plaintext has no SNI: a condition with values cannot match it.
        let mut plaintext = get(None, "/");
        plaintext.sni = None;
        assert!(!allowed(&[only_ratings_9080], &plaintext));
    }

    #[test]
    fn request_principals_without_a_token() {
        // Requiring a JWT: no token, no request principal, no match.
        let require_jwt = policy(
            "default/require-jwt",
            Action::Allow,
            vec![from(pb::AuthzSource {
                request_principals: strs(&["*"]),
                ..Default::default()
            })],
        );
        assert!(!allowed(&[require_jwt], &get(Some(REVIEWS), "/")));
        // Istio's "deny requests without a token on /secure".
        let deny_no_jwt = policy(
            "default/secure",
            Action::Deny,
            vec![pb::AuthzRule {
                from: vec![pb::AuthzSource {
                    not_request_principals: strs(&["*"]),
                    ..Default::default()
                }],
                to: vec![pb::AuthzOperation {
                    paths: strs(&["/secure*"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        assert!(!allowed(
            &[deny_no_jwt.clone()],
            &get(Some(REVIEWS), "/secure/x")
        ));
        assert!(allowed(&[deny_no_jwt], &get(Some(REVIEWS), "/open")));
    }

    #[test]
    fn tcp_ignores_http_fields_the_safe_way() {
        let tcp = |principal| Req {
            principal,
            ns: Some("default"),
            ip: "10.244.0.12",
            port: 7000,
            http: None,
            sni: Some("outbound_.7000_._.db.default.svc.cluster.local"),
        };
        // ALLOW with an HTTP-only field never matches TCP...
        let allow_get = reviews_may_get("default/allow-get");
        assert!(!allowed(&[allow_get], &tcp(Some(REVIEWS))));
        // ...while one on ports and principals does.
        let allow_port = policy(
            "default/allow-port",
            Action::Allow,
            vec![pb::AuthzRule {
                from: vec![pb::AuthzSource {
                    principals: strs(&[REVIEWS]),
                    ..Default::default()
                }],
                to: vec![pb::AuthzOperation {
                    ports: strs(&["7000"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        assert!(allowed(&[allow_port.clone()], &tcp(Some(REVIEWS))));
        assert!(!allowed(&[allow_port], &tcp(Some(PRODUCTPAGE))));
        // A DENY with paths and a port: the path is ignored, the port decides.
        let deny = policy(
            "default/deny-admin",
            Action::Deny,
            vec![to(pb::AuthzOperation {
                paths: strs(&["/admin"]),
                ports: strs(&["7000"]),
                ..Default::default()
            })],
        );
        assert!(!allowed(&[deny.clone()], &tcp(Some(REVIEWS))));
        let mut elsewhere = tcp(Some(REVIEWS));
        elsewhere.port = 7001;
        assert!(allowed(&[deny], &elsewhere));
    }

    /// Whether `policies` close an open connection from `principal`
    /// (between sidecars: every port) or plaintext from `ip` to `port`.
    fn revokes(
        policies: &[pb::AuthorizationPolicy],
        principal: Option<&str>,
        port: Option<u32>,
    ) -> Option<Decision> {
        let conn = Request {
            principal,
            namespace: principal.map(|p| p.split('/').nth(2).unwrap()),
            source_ip: Some("10.244.0.12".parse().unwrap()),
            port: port.unwrap_or(0),
            http: None,
            auth: None,
            sni: None,
        };
        Policies::compile(policies).unwrap().revokes(&conn, port)
    }

    #[test]
    fn a_connection_is_closed_only_when_no_request_on_it_could_pass() {
        let only_reviews = reviews_may_get("default/ratings-viewer");
        // Another caller can send nothing this allows: closed.
        assert_eq!(
            revokes(&[only_reviews.clone()], Some(PRODUCTPAGE), None),
            Some(Decision::Deny { by: None })
        );
        // Reviews' GETs pass, its other methods not: it depends, kept open.
        assert_eq!(revokes(&[only_reviews.clone()], Some(REVIEWS), None), None);
        // Plaintext has no principal.
        assert!(revokes(&[only_reviews], None, Some(9080)).is_some());
        // Allow-nothing and deny-all close everything.
        let nothing = policy("default/allow-nothing", Action::Allow, vec![]);
        assert!(revokes(&[nothing], Some(REVIEWS), None).is_some());
        let deny_all = policy(
            "default/deny-all",
            Action::Deny,
            vec![pb::AuthzRule::default()],
        );
        assert_eq!(
            revokes(&[deny_all], Some(REVIEWS), None),
            Some(Decision::Deny {
                by: Some(("default/deny-all".into(), 0))
            })
        );
        // A DENY on a path or a header leaves the rest of the traffic.
        let deny_path = policy(
            "default/no-admin",
            Action::Deny,
            vec![pb::AuthzRule {
                to: vec![pb::AuthzOperation {
                    paths: strs(&["/admin*"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        assert_eq!(revokes(&[deny_path], Some(REVIEWS), None), None);
        let deny_header = policy(
            "default/no-debug",
            Action::Deny,
            vec![pb::AuthzRule {
                when: vec![pb::AuthzCondition {
                    key: "request.headers[x-debug]".into(),
                    values: strs(&["1"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        assert_eq!(revokes(&[deny_header], Some(REVIEWS), None), None);
        // A DENY by namespace closes that namespace's connections only.
        let deny_ns = policy(
            "default/no-test",
            Action::Deny,
            vec![from(pb::AuthzSource {
                namespaces: strs(&["test"]),
                ..Default::default()
            })],
        );
        assert!(revokes(&[deny_ns.clone()], Some("cluster.local/ns/test/sa/x"), None).is_some());
        assert_eq!(revokes(&[deny_ns], Some(REVIEWS), None), None);
        // Ports: known for plaintext, every port between sidecars.
        let deny_port = policy(
            "default/no-9080",
            Action::Deny,
            vec![to(pb::AuthzOperation {
                ports: strs(&["9080"]),
                ..Default::default()
            })],
        );
        assert!(revokes(&[deny_port.clone()], None, Some(9080)).is_some());
        assert_eq!(revokes(&[deny_port.clone()], None, Some(9090)), None);
        assert_eq!(revokes(&[deny_port], Some(REVIEWS), None), None);
        let allow_port = policy(
            "default/only-9090",
            Action::Allow,
            vec![pb::AuthzRule {
                when: vec![pb::AuthzCondition {
                    key: "destination.port".into(),
                    values: strs(&["9090"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        );
        assert!(revokes(&[allow_port.clone()], None, Some(9080)).is_some());
        assert_eq!(revokes(&[allow_port], Some(REVIEWS), None), None);
        // A token requirement depends on each request.
        let jwt = policy(
            "default/require-jwt",
            Action::Allow,
            vec![from(pb::AuthzSource {
                request_principals: strs(&["*"]),
                ..Default::default()
            })],
        );
        assert_eq!(revokes(&[jwt], Some(REVIEWS), None), None);
    }

    #[test]
    fn bad_policies_do_not_compile_and_say_where() {
        let bad = |rule: pb::AuthzRule, action: Action| {
            Policies::compile(&[policy("default/bad", action, vec![rule])]).unwrap_err()
        };
        let e = bad(
            from(pb::AuthzSource {
                ip_blocks: strs(&["10.0.0.0/33"]),
                ..Default::default()
            }),
            Action::Allow,
        );
        assert!(
            e.contains("default/bad")
                && e.contains("from[0].source.ipBlocks")
                && e.contains("prefix length"),
            "{e}"
        );
        let e = bad(
            to(pb::AuthzOperation {
                ports: strs(&["http"]),
                ..Default::default()
            }),
            Action::Deny,
        );
        assert!(
            e.contains("to[0].operation.ports") && e.contains("\"http\""),
            "{e}"
        );
        let e = bad(
            pb::AuthzRule {
                when: vec![pb::AuthzCondition {
                    key: "request.time".into(),
                    ..Default::default()
                }],
                ..Default::default()
            },
            Action::Allow,
        );
        assert!(
            e.contains("when[0].key") && e.contains("request.time"),
            "{e}"
        );
        let e = bad(Default::default(), Action::Custom);
        assert!(e.contains("CUSTOM"), "{e}");
    }
}
