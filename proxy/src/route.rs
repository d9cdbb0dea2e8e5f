//! Routes as the request path uses them: each `RouteConfig` compiled once
//! per snapshot (regexes built, header names and values parsed, matches on
//! the calling workload decided up front), then per request the first
//! matching route and a weighted pick among its destinations.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use mesh_proto::resources as pb;
use rand::Rng;
use regex::Regex;

/// A string matcher (Istio's StringMatch); regexes match the whole value.
#[derive(Debug, Clone)]
pub enum Str {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

impl Str {
    fn compile(m: &pb::StringMatch, at: &str) -> Result<Option<Self>, String> {
        use pb::string_match::Kind;
        Ok(match &m.kind {
            None => None,
            Some(Kind::Exact(s)) => Some(Str::Exact(s.clone())),
            Some(Kind::Prefix(s)) => Some(Str::Prefix(s.clone())),
            Some(Kind::Regex(r)) => Some(Str::Regex(
                regex::RegexBuilder::new(&format!("^(?:{r})$"))
                    .size_limit(1 << 20)
                    .build()
                    .map_err(|e| format!("{at}: regex {r:?} does not compile: {e}"))?,
            )),
        })
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => v == e,
            Str::Prefix(p) => v.starts_with(p.as_str()),
            Str::Regex(r) => r.is_match(v),
        }
    }

    fn matches_ignore_case(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => v.eq_ignore_ascii_case(e),
            Str::Prefix(p) => v
                .get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p)),
            Str::Regex(r) => r.is_match(v),
        }
    }
}

fn opt_str(m: &Option<pb::StringMatch>, at: &str) -> Result<Option<Str>, String> {
    m.as_ref().map_or(Ok(None), |m| Str::compile(m, at))
}

/// One HTTP match: every part set must hold.
#[derive(Debug, Clone, Default)]
pub struct Match {
    pub uri: Option<Str>,
    ignore_uri_case: bool,
    scheme: Option<Str>,
    method: Option<Str>,
    authority: Option<Str>,
    /// `None` matcher: the header only has to be present.
    headers: Vec<(HeaderName, Option<Str>)>,
    without_headers: Vec<(HeaderName, Option<Str>)>,
    query: Vec<(String, Option<Str>)>,
    port: u32,
    /// tls routes: server names (lower case; `*.x` covers names under x).
    sni_hosts: Vec<String>,
}

/// What the request looks like to the matchers.
pub struct RequestView<'a> {
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub method: &'a str,
    pub scheme: &'a str,
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// The service port the request is addressed to.
    pub port: u32,
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, m: &Option<Str>) -> bool {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return false;
    }
    match m {
        None => true,
        Some(m) => values.any(|v| v.to_str().is_ok_and(|v| m.matches(v))),
    }
}

use crate::wire::query_param;

impl Match {
    fn compile(m: &pb::HttpMatch, at: &str) -> Result<Self, String> {
        let headers = |list: &[pb::HeaderMatch], what: &str| {
            list.iter()
                .map(|h| {
                    let name = HeaderName::from_bytes(h.name.as_bytes())
                        .map_err(|_| format!("{at}: {what} {:?} is not a header name", h.name))?;
                    Ok((name, opt_str(&h.value, at)?))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Match {
            uri: opt_str(&m.uri, at)?,
            ignore_uri_case: m.ignore_uri_case,
            scheme: opt_str(&m.scheme, at)?,
            method: opt_str(&m.method, at)?,
            authority: opt_str(&m.authority, at)?,
            headers: headers(&m.headers, "header")?,
            without_headers: headers(&m.without_headers, "header")?,
            query: m
                .query_params
                .iter()
                .map(|q| Ok((q.name.clone(), opt_str(&q.value, at)?)))
                .collect::<Result<_, String>>()?,
            port: m.port,
            sni_hosts: m.sni_hosts.clone(),
        })
    }

    /// Whether a connection to `port` asking for server name `sni` (TLS)
    /// meets this match's port and server names.
    fn takes(&self, port: u32, sni: Option<&str>) -> bool {
        (self.port == 0 || self.port == port)
            && (self.sni_hosts.is_empty()
                || sni.is_some_and(|name| self.sni_hosts.iter().any(|h| sni_matches(h, name))))
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        let uri_ok = match &self.uri {
            None => true,
            Some(m) if self.ignore_uri_case => m.matches_ignore_case(r.path),
            Some(m) => m.matches(r.path),
        };
        uri_ok
            && (self.port == 0 || self.port == r.port)
            && self.method.as_ref().is_none_or(|m| m.matches(r.method))
            && self.scheme.as_ref().is_none_or(|m| m.matches(r.scheme))
            && self
                .authority
                .as_ref()
                .is_none_or(|m| m.matches(r.authority))
            && self
                .headers
                .iter()
                .all(|(n, m)| header_matches(r.headers, n, m))
            && !self
                .without_headers
                .iter()
                .any(|(n, m)| header_matches(r.headers, n, m))
            && self.query.iter().all(|(n, m)| {
                query_param(r.query, n).is_some_and(|v| m.as_ref().is_none_or(|m| m.matches(v)))
            })
    }
}

/// Whether server name `name` is `host`, or under `*.suffix`; `*` takes all.
fn sni_matches(host: &str, name: &str) -> bool {
    match host.strip_prefix('*') {
        Some("") => true,
        Some(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        None => host == name,
    }
}

/// Header changes (Istio's `headers.request` / `headers.response`).
#[derive(Debug, Clone, Default)]
pub struct HeaderOps {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl HeaderOps {
    fn compile(ops: &Option<pb::HeaderOps>, at: &str) -> Result<Self, String> {
        let Some(ops) = ops else {
            return Ok(Self::default());
        };
        let name = |n: &str| {
            HeaderName::from_bytes(n.as_bytes())
                .map_err(|_| format!("{at}: {n:?} is not a header name"))
        };
        let pairs = |m: &std::collections::HashMap<String, String>| {
            let mut v = m
                .iter()
                .map(|(k, v)| {
                    let value = HeaderValue::from_str(v)
                        .map_err(|_| format!("{at}: {v:?} is not a header value"))?;
                    Ok((name(k)?, value))
                })
                .collect::<Result<Vec<_>, String>>()?;
            v.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
            Ok::<_, String>(v)
        };
        Ok(Self {
            set: pairs(&ops.set)?,
            add: pairs(&ops.add)?,
            remove: ops
                .remove
                .iter()
                .map(|n| name(n))
                .collect::<Result<_, _>>()?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for n in &self.remove {
            headers.remove(n);
        }
        for (n, v) in &self.set {
            headers.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            headers.append(n.clone(), v.clone());
        }
    }
}

#[derive(Debug, Clone)]
pub struct Dest {
    pub cluster: String,
    pub weight: u32,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
}

#[derive(Debug, Clone)]
pub enum Action {
    Forward,
    Redirect(pb::Redirect),
    Direct(http::StatusCode, Bytes),
}

#[derive(Debug, Clone)]
pub enum UriRewrite {
    /// Replace the matched prefix (or the whole path) with this.
    Replace(String),
    /// Replace every match of the regex; the substitution uses `${n}`.
    Regex(Regex, String),
}

#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    pub uri: Option<UriRewrite>,
    pub authority: Option<http::uri::Authority>,
}

/// Which failures a retry policy retries (Istio's `retryOn`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn(u16);

impl RetryOn {
    pub const FIVE_XX: u16 = 1;
    pub const GATEWAY_ERROR: u16 = 1 << 1;
    pub const RESET: u16 = 1 << 2;
    pub const CONNECT_FAILURE: u16 = 1 << 3;
    pub const REFUSED_STREAM: u16 = 1 << 4;
    pub const RETRIABLE_4XX: u16 = 1 << 5;
    pub const STATUS_CODES: u16 = 1 << 6;
    pub const CANCELLED: u16 = 1 << 7;
    pub const DEADLINE_EXCEEDED: u16 = 1 << 8;
    pub const INTERNAL: u16 = 1 << 9;
    pub const RESOURCE_EXHAUSTED: u16 = 1 << 10;
    pub const UNAVAILABLE: u16 = 1 << 11;

    pub fn has(self, bit: u16) -> bool {
        self.0 & bit != 0
    }

    fn parse(list: &[String], at: &str) -> Result<Self, String> {
        let mut bits = 0;
        for c in list {
            bits |= match c.as_str() {
                "5xx" => Self::FIVE_XX,
                "gateway-error" => Self::GATEWAY_ERROR,
                "reset" => Self::RESET,
                "connect-failure" => Self::CONNECT_FAILURE,
                "refused-stream" => Self::REFUSED_STREAM,
                "retriable-4xx" => Self::RETRIABLE_4XX,
                "retriable-status-codes" => Self::STATUS_CODES,
                "cancelled" => Self::CANCELLED,
                "deadline-exceeded" => Self::DEADLINE_EXCEEDED,
                "internal" => Self::INTERNAL,
                "resource-exhausted" => Self::RESOURCE_EXHAUSTED,
                "unavailable" => Self::UNAVAILABLE,
                other => return Err(format!("{at}: unknown retry condition {other:?}")),
            };
        }
        Ok(Self(bits))
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    /// Retries after the first attempt.
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on: RetryOn,
    pub codes: Vec<u16>,
}

/// Why an attempt failed, for deciding whether to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Never reached the peer (connect or TLS failed).
    Connect,
    /// The peer refused the stream before processing it.
    Refused,
    /// Reset or disconnected after the request went out.
    Reset,
    /// The per-try timeout expired.
    Timeout,
    /// An HTTP status, and a gRPC status from the response headers.
    Status(u16, Option<u8>),
}

impl Retry {
    fn compile(p: &pb::RetryPolicy, at: &str) -> Result<Self, String> {
        Ok(Self {
            attempts: p.attempts,
            per_try_timeout: (p.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(p.per_try_timeout_ms)),
            on: RetryOn::parse(&p.retry_on, at)?,
            codes: p
                .retriable_status_codes
                .iter()
                .map(|c| u16::try_from(*c).unwrap_or(0))
                .collect(),
        })
    }

    /// Whether this policy retries a failure, as Envoy defines its conditions.
    pub fn retries(&self, f: Failure) -> bool {
        let on = self.on;
        let any_reset = RetryOn::FIVE_XX | RetryOn::GATEWAY_ERROR | RetryOn::RESET;
        match f {
            Failure::Connect => on.has(any_reset | RetryOn::CONNECT_FAILURE),
            Failure::Refused => on.has(any_reset | RetryOn::REFUSED_STREAM),
            Failure::Reset | Failure::Timeout => on.has(any_reset),
            Failure::Status(code, grpc) => {
                (on.has(RetryOn::FIVE_XX) && (500..600).contains(&code))
                    || (on.has(RetryOn::GATEWAY_ERROR) && matches!(code, 502..=504))
                    || (on.has(RetryOn::RETRIABLE_4XX) && code == 409)
                    || (on.has(RetryOn::STATUS_CODES) && self.codes.contains(&code))
                    || grpc.is_some_and(|g| match g {
                        1 => on.has(RetryOn::CANCELLED),
                        4 => on.has(RetryOn::DEADLINE_EXCEEDED),
                        8 => on.has(RetryOn::RESOURCE_EXHAUSTED),
                        13 => on.has(RetryOn::INTERNAL),
                        14 => on.has(RetryOn::UNAVAILABLE),
                        _ => false,
                    })
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Fault {
    pub delay: Option<(Duration, f64)>,
    pub abort: Option<Abort>,
}

#[derive(Debug, Clone)]
pub struct Abort {
    pub status: http::StatusCode,
    /// A gRPC status to answer with instead of an HTTP one.
    pub grpc: Option<u32>,
    pub percentage: f64,
}

/// True for `percentage` percent of calls.
pub fn roll(percentage: f64) -> bool {
    percentage >= 100.0 || (percentage > 0.0 && rand::rng().random::<f64>() * 100.0 < percentage)
}

#[derive(Debug, Clone)]
pub struct Mirror {
    pub cluster: String,
    pub percentage: f64,
}

#[derive(Debug, Clone)]
pub struct Cors {
    pub origins: Vec<Str>,
    pub methods: Option<HeaderValue>,
    pub headers: Option<HeaderValue>,
    pub expose: Option<HeaderValue>,
    pub max_age: Option<HeaderValue>,
    pub credentials: bool,
}

impl Cors {
    fn compile(c: &pb::CorsPolicy, at: &str) -> Result<Self, String> {
        let join = |v: &[String]| {
            (!v.is_empty())
                .then(|| HeaderValue::from_str(&v.join(",")))
                .transpose()
                .map_err(|_| format!("{at}: bad CORS header list {v:?}"))
        };
        Ok(Self {
            origins: c
                .allow_origins
                .iter()
                .filter_map(|o| Str::compile(o, at).transpose())
                .collect::<Result<_, _>>()?,
            methods: join(&c.allow_methods)?,
            headers: join(&c.allow_headers)?,
            expose: join(&c.expose_headers)?,
            max_age: (c.max_age_s > 0).then(|| HeaderValue::from(c.max_age_s)),
            credentials: c.allow_credentials,
        })
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|o| o.matches(origin))
    }
}

#[derive(Debug, Clone)]
pub struct Route {
    /// As pilot named it: the VirtualService route's `name`, `route-N`
    /// for an unnamed one, `default` without a VirtualService.
    pub name: Arc<str>,
    pub matches: Vec<Match>,
    pub dests: Vec<Dest>,
    total_weight: u32,
    pub action: Action,
    pub rewrite: Option<Rewrite>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
    pub cors: Option<Cors>,
}

/// Istio's `\1`-style back-references in a regex rewrite, as `${1}`.
fn substitution(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, chars.peek()) {
            ('\\', Some(d)) if d.is_ascii_digit() => {
                out.push_str(&format!("${{{d}}}"));
                chars.next();
            }
            ('$', _) => out.push_str("$$"),
            _ => out.push(c),
        }
    }
    out
}

impl Route {
    /// Compiles a route. `own` is the calling workload's labels and
    /// namespace: matches on the source are decided here, once.
    pub fn compile(r: &pb::HttpRoute, own: Option<&pb::Workload>) -> Result<Self, String> {
        let at = format!("route {:?}", r.name);
        let at = at.as_str();
        let mut matches = Vec::new();
        for m in &r.matches {
            let compiled = Match::compile(m, at)?;
            let from_source = match own {
                None => true,
                Some(w) => {
                    m.source_labels
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
                        && (m.source_namespace.is_empty() || m.source_namespace == w.namespace)
                }
            };
            if from_source {
                matches.push(compiled);
            }
        }
        // Every match was for another workload: the route never applies here.
        let never = !r.matches.is_empty() && matches.is_empty();
        let dests = r
            .clusters
            .iter()
            .map(|c| {
                Ok(Dest {
                    cluster: c.cluster.clone(),
                    weight: c.weight,
                    request_headers: HeaderOps::compile(&c.request_headers, at)?,
                    response_headers: HeaderOps::compile(&c.response_headers, at)?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let action = match (&r.redirect, &r.direct_response) {
            (Some(rd), _) => Action::Redirect(rd.clone()),
            (None, Some(d)) => Action::Direct(
                http::StatusCode::from_u16(d.status as u16)
                    .map_err(|_| format!("{at}: {} is not an HTTP status", d.status))?,
                Bytes::from(d.body.clone()),
            ),
            (None, None) => Action::Forward,
        };
        let rewrite = match &r.rewrite {
            None => None,
            Some(rw) => Some(Rewrite {
                uri: if !rw.uri_regex.is_empty() {
                    Some(UriRewrite::Regex(
                        Regex::new(&rw.uri_regex)
                            .map_err(|e| format!("{at}: rewrite regex does not compile: {e}"))?,
                        substitution(&rw.uri_regex_substitution),
                    ))
                } else if !rw.uri.is_empty() {
                    Some(UriRewrite::Replace(rw.uri.clone()))
                } else {
                    None
                },
                authority: if rw.authority.is_empty() {
                    None
                } else {
                    Some(rw.authority.parse().map_err(|_| {
                        format!("{at}: rewrite authority {:?} is not a host", rw.authority)
                    })?)
                },
            }),
        };
        let fault = r.fault.as_ref().map(|f| Fault {
            delay: f
                .delay
                .as_ref()
                .map(|d| (Duration::from_millis(d.fixed_delay_ms), d.percentage)),
            abort: f.abort.as_ref().map(|a| Abort {
                status: http::StatusCode::from_u16(a.http_status as u16)
                    .unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE),
                grpc: a.grpc.then_some(a.grpc_status),
                percentage: a.percentage,
            }),
        });
        Ok(Route {
            name: r.name.as_str().into(),
            total_weight: if never {
                0
            } else {
                dests.iter().map(|d| d.weight).sum()
            },
            matches: if never {
                vec![Match {
                    // Matches nothing: a port no request carries.
                    port: u32::MAX,
                    ..Default::default()
                }]
            } else {
                matches
            },
            dests,
            action,
            rewrite,
            request_headers: HeaderOps::compile(&r.request_headers, at)?,
            response_headers: HeaderOps::compile(&r.response_headers, at)?,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            retry: r
                .retries
                .as_ref()
                .filter(|p| p.attempts > 0)
                .map(|p| Retry::compile(p, at))
                .transpose()?,
            fault,
            mirrors: r
                .mirrors
                .iter()
                .map(|m| Mirror {
                    cluster: m.cluster.clone(),
                    percentage: m.percentage,
                })
                .collect(),
            cors: r.cors.as_ref().map(|c| Cors::compile(c, at)).transpose()?,
        })
    }

    /// The first of this route's matches the request meets; `Some(None)`
    /// when the route has no matches (it takes everything).
    pub fn matching(&self, req: &RequestView<'_>) -> Option<Option<&Match>> {
        if self.matches.is_empty() {
            return Some(None);
        }
        self.matches.iter().find(|m| m.matches(req)).map(Some)
    }

    /// Whether this route takes a TCP connection to `port` (with TLS
    /// server name `sni`): TCP and TLS routes match on the port, the
    /// server name and the source, which was settled when the route was
    /// compiled.
    pub fn takes_connection(&self, port: u32, sni: Option<&str>) -> bool {
        self.matches.is_empty() || self.matches.iter().any(|m| m.takes(port, sni))
    }

    /// A weighted random pick among the destinations.
    pub fn pick(&self) -> Option<&Dest> {
        if self.dests.len() <= 1 || self.total_weight == 0 {
            return self.dests.first();
        }
        let mut n = rand::rng().random_range(0..self.total_weight);
        for d in &self.dests {
            if n < d.weight {
                return Some(d);
            }
            n -= d.weight;
        }
        None
    }

    /// The path (with query) after this route's rewrite, if it changes it.
    pub fn rewritten_path(
        &self,
        m: Option<&Match>,
        path: &str,
        query: Option<&str>,
    ) -> Option<String> {
        let new_path = match self.rewrite.as_ref()?.uri.as_ref()? {
            UriRewrite::Regex(re, sub) => re.replace_all(path, sub.as_str()).into_owned(),
            UriRewrite::Replace(to) => match m.and_then(|m| m.uri.as_ref()) {
                Some(Str::Prefix(p)) => format!("{to}{}", path.get(p.len()..).unwrap_or("")),
                Some(_) => to.clone(),
                None => format!("{to}{}", path.strip_prefix('/').unwrap_or(path)),
            },
        };
        Some(match query {
            Some(q) => format!("{new_path}?{q}"),
            None => new_path,
        })
    }
}

/// A compiled `RouteConfig`.
#[derive(Debug)]
pub struct RouteTable {
    pub config: pb::RouteConfig,
    pub routes: Vec<Route>,
}

impl RouteTable {
    pub fn compile(rc: &pb::RouteConfig, own: Option<&pb::Workload>) -> Result<Self, String> {
        Ok(Self {
            routes: rc
                .routes
                .iter()
                .map(|r| Route::compile(r, own))
                .collect::<Result<_, String>>()
                .map_err(|e| format!("{}: {e}", rc.name))?,
            config: rc.clone(),
        })
    }

    /// The first route that takes a TCP connection to `port`.
    pub fn select_tcp(&self, port: u32, sni: Option<&str>) -> Option<&Route> {
        self.routes.iter().find(|r| r.takes_connection(port, sni))
    }

    /// The first route that matches, and the match that did.
    pub fn select(&self, req: &RequestView<'_>) -> Option<(&Route, Option<&Match>)> {
        self.routes
            .iter()
            .find_map(|r| r.matching(req).map(|m| (r, m)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pb::string_match::Kind;

    #[test]
    fn tls_routes_take_the_server_names_they_list() {
        let rc = pb::RouteConfig {
            name: "db:443".into(),
            port: 443,
            routes: vec![
                pb::HttpRoute {
                    name: "tls-0".into(),
                    matches: vec![pb::HttpMatch {
                        sni_hosts: vec!["*.internal.example".into(), "db.example".into()],
                        ..Default::default()
                    }],
                    clusters: vec![pb::WeightedCluster {
                        cluster: "internal".into(),
                        weight: 100,
                        ..Default::default()
                    }],
                    ..Default::default()
                },
                pb::HttpRoute {
                    name: "default".into(),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let table = RouteTable::compile(&rc, None).unwrap();
        let chosen = |sni: Option<&str>| table.select_tcp(443, sni).map(|r| &*r.name);
        assert_eq!(chosen(Some("db.example")), Some("tls-0"));
        assert_eq!(chosen(Some("a.b.internal.example")), Some("tls-0"));
        // The wildcard needs a name under it, not the bare suffix.
        assert_eq!(chosen(Some("internal.example")), Some("default"));
        assert_eq!(chosen(Some("other.example")), Some("default"));
        assert_eq!(chosen(None), Some("default"));
    }

    fn sm(kind: Kind) -> Option<pb::StringMatch> {
        Some(pb::StringMatch { kind: Some(kind) })
    }

    fn view<'a>(path: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        RequestView {
            path,
            query,
            method: "GET",
            scheme: "http",
            authority: "reviews:9080",
            headers,
            port: 9080,
        }
    }

    fn route(name: &str, matches: Vec<pb::HttpMatch>) -> pb::HttpRoute {
        pb::HttpRoute {
            name: name.into(),
            matches,
            ..Default::default()
        }
    }

    fn table(routes: Vec<pb::HttpRoute>) -> RouteTable {
        RouteTable::compile(
            &pb::RouteConfig {
                name: "reviews:9080".into(),
                routes,
                ..Default::default()
            },
            Some(&pb::Workload {
                namespace: "default".into(),
                labels: [("app".to_string(), "productpage".to_string())].into(),
                ..Default::default()
            }),
        )
        .unwrap()
    }

    fn pick<'a>(t: &'a RouteTable, path: &str, headers: &HeaderMap) -> Option<&'a str> {
        t.select(&view(path, headers)).map(|(r, _)| &*r.name)
    }

    #[test]
    fn first_match_wins() {
        let t = table(vec![
            route(
                "jason",
                vec![pb::HttpMatch {
                    headers: vec![pb::HeaderMatch {
                        name: "end-user".into(),
                        value: sm(Kind::Exact("jason".into())),
                    }],
                    ..Default::default()
                }],
            ),
            route(
                "prefix",
                vec![pb::HttpMatch {
                    uri: sm(Kind::Prefix("/api".into())),
                    ..Default::default()
                }],
            ),
            route("rest", vec![]),
        ]);
        let mut h = HeaderMap::new();
        assert_eq!(pick(&t, "/api/x", &h), Some("prefix"));
        assert_eq!(pick(&t, "/other", &h), Some("rest"));
        h.insert("end-user", "jason".parse().unwrap());
        assert_eq!(pick(&t, "/api/x", &h), Some("jason"));
    }

    #[test]
    fn regex_query_without_headers_case_and_source() {
        let t = table(vec![
            route(
                "regex",
                vec![pb::HttpMatch {
                    uri: sm(Kind::Regex("/v[0-9]+/items".into())),
                    ..Default::default()
                }],
            ),
            route(
                "query",
                vec![pb::HttpMatch {
                    query_params: vec![pb::HeaderMatch {
                        name: "debug".into(),
                        value: sm(Kind::Exact("1".into())),
                    }],
                    ..Default::default()
                }],
            ),
            route(
                "nocase",
                vec![pb::HttpMatch {
                    uri: sm(Kind::Prefix("/Admin".into())),
                    ignore_uri_case: true,
                    without_headers: vec![pb::HeaderMatch {
                        name: "x-block".into(),
                        value: None,
                    }],
                    ..Default::default()
                }],
            ),
            route(
                "other-source",
                vec![pb::HttpMatch {
                    source_labels: [("app".to_string(), "reviews".to_string())].into(),
                    ..Default::default()
                }],
            ),
            route(
                "this-source",
                vec![pb::HttpMatch {
                    source_labels: [("app".to_string(), "productpage".to_string())].into(),
                    source_namespace: "default".into(),
                    uri: sm(Kind::Exact("/mine".into())),
                    ..Default::default()
                }],
            ),
        ]);
        let mut h = HeaderMap::new();
        assert_eq!(pick(&t, "/v12/items", &h), Some("regex"));
        // Regexes match the whole path.
        assert_eq!(pick(&t, "/v12/items/x", &h), None);
        assert_eq!(pick(&t, "/x?a=b&debug=1", &h), Some("query"));
        assert_eq!(pick(&t, "/x?debug=10", &h), None);
        assert_eq!(pick(&t, "/aDMIN/users", &h), Some("nocase"));
        assert_eq!(pick(&t, "/mine", &h), Some("this-source"));
        h.insert("x-block", "".parse().unwrap());
        assert_eq!(pick(&t, "/aDMIN/users", &h), None);
    }

    #[test]
    fn a_regex_the_proxy_cannot_compile_is_an_error_naming_the_route() {
        let e = RouteTable::compile(
            &pb::RouteConfig {
                name: "reviews:9080".into(),
                routes: vec![route(
                    "bad",
                    vec![pb::HttpMatch {
                        uri: sm(Kind::Regex("(".into())),
                        ..Default::default()
                    }],
                )],
                ..Default::default()
            },
            None,
        )
        .unwrap_err();
        assert!(e.contains("reviews:9080") && e.contains("\"bad\""), "{e}");
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_regex() {
        let mut r = route(
            "r",
            vec![pb::HttpMatch {
                uri: sm(Kind::Prefix("/old/".into())),
                ..Default::default()
            }],
        );
        r.rewrite = Some(pb::Rewrite {
            uri: "/new/".into(),
            ..Default::default()
        });
        let t = table(vec![r]);
        let h = HeaderMap::new();
        let (chosen, m) = t.select(&view("/old/a", &h)).unwrap();
        assert_eq!(
            chosen.rewritten_path(m, "/old/a", Some("q=1")).as_deref(),
            Some("/new/a?q=1")
        );
        let mut r = route("rx", vec![]);
        r.rewrite = Some(pb::Rewrite {
            uri_regex: "^/service/([^/]+)(/.*)$".into(),
            uri_regex_substitution: "\\2/instance/\\1".into(),
            ..Default::default()
        });
        let t = table(vec![r]);
        assert_eq!(
            t.routes[0]
                .rewritten_path(None, "/service/foo/v1/api", None)
                .as_deref(),
            Some("/v1/api/instance/foo")
        );
    }

    #[test]
    fn retry_conditions_follow_envoys_definitions() {
        let p = |on: &[&str], codes: &[u32]| {
            Retry::compile(
                &pb::RetryPolicy {
                    attempts: 1,
                    retry_on: on.iter().map(|s| s.to_string()).collect(),
                    retriable_status_codes: codes.to_vec(),
                    ..Default::default()
                },
                "r",
            )
            .unwrap()
        };
        let gw = p(&["gateway-error"], &[]);
        assert!(gw.retries(Failure::Status(503, None)));
        assert!(!gw.retries(Failure::Status(500, None)));
        assert!(gw.retries(Failure::Connect) && gw.retries(Failure::Timeout));
        let cf = p(&["connect-failure"], &[]);
        assert!(cf.retries(Failure::Connect) && !cf.retries(Failure::Reset));
        let codes = p(&["retriable-status-codes"], &[503]);
        assert!(codes.retries(Failure::Status(503, None)));
        assert!(!codes.retries(Failure::Status(502, None)));
        let grpc = p(&["unavailable"], &[]);
        assert!(grpc.retries(Failure::Status(200, Some(14))));
        assert!(!grpc.retries(Failure::Status(200, Some(13))));
    }

    #[test]
    fn weights_split_traffic() {
        let mut r = route("w", vec![]);
        r.clusters = [("a", 80), ("b", 20), ("never", 0)]
            .into_iter()
            .map(|(c, w)| pb::WeightedCluster {
                cluster: c.into(),
                weight: w,
                ..Default::default()
            })
            .collect();
        let t = table(vec![r]);
        let a = (0..10_000)
            .filter(|_| t.routes[0].pick().unwrap().cluster == "a")
            .count();
        assert!((7_600..8_400).contains(&a), "{a} of 10000 went to a");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn exact_prefix_and_regex_agree(value in "[a-z/]{0,12}", pat in "[a-z/]{0,4}") {
                let exact = Str::Exact(pat.clone());
                let prefix = Str::Prefix(pat.clone());
                let re = Str::compile(&pb::StringMatch { kind: Some(Kind::Regex(format!("{}.*", regex::escape(&pat)))) }, "p").unwrap().unwrap();
                let exact_re = Str::compile(&pb::StringMatch { kind: Some(Kind::Regex(regex::escape(&pat))) }, "p").unwrap().unwrap();
                prop_assert_eq!(prefix.matches(&value), value.starts_with(&pat));
                prop_assert_eq!(re.matches(&value), prefix.matches(&value));
                prop_assert_eq!(exact_re.matches(&value), exact.matches(&value));
                prop_assert_eq!(exact.matches(&value), value == pat);
            }

            #[test]
            fn a_wildcard_server_name_covers_exactly_the_names_under_it(
                labels in proptest::collection::vec("[a-c]{1,2}", 1..4),
                suffix in proptest::collection::vec("[a-c]{1,2}", 1..3),
            ) {
                let suffix = suffix.join(".");
                let name = labels.join(".");
                let wildcard = format!("*.{suffix}");
                let under = format!("{name}.{suffix}");
                prop_assert!(sni_matches(&wildcard, &under));
                prop_assert_eq!(sni_matches(&wildcard, &name), name.ends_with(&format!(".{suffix}")));
                prop_assert!(!sni_matches(&wildcard, &suffix), "the bare suffix is not under it");
                prop_assert!(sni_matches(&name, &name) && sni_matches("*", &name));
                prop_assert_eq!(sni_matches(&name, &under), false);
            }

            #[test]
            fn ignore_case_equals_lowercased_comparison(value in "[a-zA-Z/]{0,12}", pat in "[a-zA-Z/]{0,4}") {
                let prefix = Str::Prefix(pat.clone());
                prop_assert_eq!(
                    prefix.matches_ignore_case(&value),
                    value.to_ascii_lowercase().starts_with(&pat.to_ascii_lowercase())
                );
            }

            #[test]
            fn query_params_find_exactly_the_named_parameter(
                pairs in proptest::collection::vec(("[a-c]{1,2}", "[0-9]{0,2}"), 0..5),
                name in "[a-c]{1,2}",
            ) {
                let q = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&");
                let want = pairs.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
                prop_assert_eq!(query_param(Some(&q), &name), want);
            }

            #[test]
            fn without_headers_is_the_negation_of_headers(present in any::<bool>(), val in "[a-z]{0,3}", want in "[a-z]{0,3}") {
                let mut h = HeaderMap::new();
                if present {
                    h.insert("x-k", HeaderValue::from_str(&val).unwrap());
                }
                let hm = vec![pb::HeaderMatch { name: "x-k".into(), value: sm(Kind::Exact(want.clone())) }];
                let with = Match::compile(&pb::HttpMatch { headers: hm.clone(), ..Default::default() }, "p").unwrap();
                let without = Match::compile(&pb::HttpMatch { without_headers: hm, ..Default::default() }, "p").unwrap();
                let v = view("/", &h);
                prop_assert_eq!(with.matches(&v), !without.matches(&v));
                prop_assert_eq!(with.matches(&v), present && val == want);
            }
        }
    }
}
