//! VirtualService HTTP routes: every field checked when the model is built
//! (naming the field and what to write instead), and turned into the
//! proxies' `HttpRoute` when resources are generated. What the mesh does not
//! do is refused as unsupported, never dropped.

use std::collections::BTreeMap;

use mesh_proto::resources as pb;

use crate::istio::{
    Destination, HeaderOperations, Headers, HttpRoute, MatchKind, Percent, StringMatch,
    parse_duration,
};

/// Istio's retry policy for routes that do not set `retries`.
const DEFAULT_RETRY_ON: &[&str] = &[
    "connect-failure",
    "refused-stream",
    "unavailable",
    "cancelled",
    "retriable-status-codes",
];
const DEFAULT_RETRY_ATTEMPTS: u32 = 2;
const DEFAULT_RETRIABLE_CODES: &[u32] = &[503];

const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-4xx",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

/// gRPC status names as Istio's `grpcStatus` takes them.
const GRPC_CODES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Checks one HTTP route's own fields (destinations are checked by the
/// model, which knows the services). `at` is `"<resource>: spec.http[i]"`.
pub fn check(at: &str, r: &HttpRoute, errors: &mut Vec<String>) {
    let mut err = |field: &str, what: String| errors.push(format!("{at}{field}: {what}"));
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => err(
            "",
            "needs one of route, redirect or directResponse".to_string(),
        ),
        1 => {}
        _ => err(
            "",
            "sets more than one of route, redirect and directResponse; keep one".to_string(),
        ),
    }
    if r.delegate.is_some() {
        err(
            ".delegate",
            "delegate VirtualServices are not supported".into(),
        );
    }
    let weights: u32 = r.route.iter().map(|d| d.weight.unwrap_or(0)).sum();
    if r.route.len() > 1 && weights != 100 {
        err(".route", format!("weights add up to {weights}, not 100"));
    }
    for (j, m) in r.matches.iter().enumerate() {
        let f = format!(".match[{j}]");
        for (name, sm) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(sm) = sm
                && let Err(e) = check_match(sm, false)
            {
                err(&format!("{f}.{name}"), e);
            }
        }
        for (list, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
            ("queryParams", &m.query_params),
        ] {
            for (k, sm) in map {
                if let Err(e) = check_match(sm, true) {
                    err(&format!("{f}.{list}.{k}"), e);
                }
                if list == "queryParams" && sm.prefix.is_some() {
                    err(
                        &format!("{f}.{list}.{k}"),
                        "prefix matches are not supported for query parameters (Istio's rule); use exact or regex".into(),
                    );
                }
                if list != "queryParams" && http::HeaderName::from_bytes(k.as_bytes()).is_err() {
                    err(
                        &format!("{f}.{list}"),
                        format!("{k:?} is not a header name"),
                    );
                }
            }
        }
        if m.gateways.iter().any(|g| g != "mesh") {
            err(
                &format!("{f}.gateways"),
                "gateways are not supported; only \"mesh\"".into(),
            );
        }
    }
    if let Some(t) = &r.timeout
        && let Err(e) = parse_duration(t)
    {
        err(".timeout", e);
    }
    if let Some(rt) = &r.retries {
        if let Some(t) = &rt.per_try_timeout
            && let Err(e) = parse_duration(t)
        {
            err(".retries.perTryTimeout", e);
        }
        if let Some(on) = &rt.retry_on {
            for c in on.split(',').map(str::trim).filter(|c| !c.is_empty()) {
                let code_ok = c.parse::<u16>().is_ok_and(|n| (100..600).contains(&n));
                if !code_ok && !RETRY_ON.contains(&c) {
                    err(
                        ".retries.retryOn",
                        format!(
                            "{c:?} is not a retry condition; use status codes or {}",
                            RETRY_ON.join(", ")
                        ),
                    );
                }
            }
        }
        if let Some(b) = &rt.backoff
            && let Err(e) = parse_duration(b)
        {
            err(".retries.backoff", e);
        }
    }
    if let Some(f) = &r.fault {
        if let Some(d) = &f.delay {
            match (&d.fixed_delay, &d.exponential_delay) {
                (Some(t), _) => {
                    if let Err(e) = parse_duration(t) {
                        err(".fault.delay.fixedDelay", e);
                    }
                }
                (None, Some(_)) => err(
                    ".fault.delay.exponentialDelay",
                    "exponential delays are not supported; use fixedDelay".into(),
                ),
                (None, None) => err(".fault.delay", "needs fixedDelay".into()),
            }
            check_percent(".fault.delay.percentage", d.percentage.as_ref(), &mut err);
        }
        if let Some(a) = &f.abort {
            if a.http2_error.is_some() {
                err(
                    ".fault.abort.http2Error",
                    "HTTP/2 error aborts are not supported; use httpStatus or grpcStatus".into(),
                );
            }
            match (&a.http_status, &a.grpc_status) {
                (Some(s), _) if !(200..=599).contains(s) => err(
                    ".fault.abort.httpStatus",
                    format!("{s} is not an HTTP status between 200 and 599"),
                ),
                (_, Some(g)) if !GRPC_CODES.contains(&g.as_str()) => err(
                    ".fault.abort.grpcStatus",
                    format!("{g:?} is not a gRPC status name (like UNAVAILABLE)"),
                ),
                (None, None) => err(".fault.abort", "needs httpStatus or grpcStatus".into()),
                _ => {}
            }
            check_percent(".fault.abort.percentage", a.percentage.as_ref(), &mut err);
        }
    }
    check_percent(".mirrorPercentage", r.mirror_percentage.as_ref(), &mut err);
    for (j, m) in r.mirrors.iter().enumerate() {
        check_percent(
            &format!(".mirrors[{j}].percentage"),
            m.percentage.as_ref(),
            &mut err,
        );
    }
    if let Some(rw) = &r.rewrite {
        if rw.uri.is_some() && rw.uri_regex_rewrite.is_some() {
            err(
                ".rewrite",
                "sets both uri and uriRegexRewrite; keep one".into(),
            );
        }
        if let Some(rr) = &rw.uri_regex_rewrite
            && let Err(e) = regex::Regex::new(&rr.pattern)
        {
            err(".rewrite.uriRegexRewrite.match", bad_regex(&e));
        }
    }
    if let Some(rd) = &r.redirect {
        if let Some(code) = rd.redirect_code
            && ![301, 302, 303, 307, 308].contains(&code)
        {
            err(
                ".redirect.redirectCode",
                format!("{code} is not a redirect status (301, 302, 303, 307, 308)"),
            );
        }
        if rd.derive_port.is_some() {
            err(
                ".redirect.derivePort",
                "derivePort is not supported; set port".into(),
            );
        }
    }
    if let Some(d) = &r.direct_response {
        if !(200..=599).contains(&d.status) {
            err(
                ".directResponse.status",
                format!("{} is not an HTTP status between 200 and 599", d.status),
            );
        }
        if let Some(b) = &d.body
            && let Some(bytes) = &b.bytes
            && base64_decode(bytes).is_none()
        {
            err(".directResponse.body.bytes", "is not base64".into());
        }
    }
    if let Some(c) = &r.cors_policy {
        for (j, o) in c.allow_origins.iter().enumerate() {
            if let Err(e) = check_match(o, false) {
                err(&format!(".corsPolicy.allowOrigins[{j}]"), e);
            }
        }
        if let Some(t) = &c.max_age
            && let Err(e) = parse_duration(t)
        {
            err(".corsPolicy.maxAge", e);
        }
    }
    let mut headers = vec![(String::new(), r.headers.as_ref())];
    for (j, d) in r.route.iter().enumerate() {
        headers.push((format!(".route[{j}]"), d.headers.as_ref()));
    }
    for (f, h) in headers {
        let Some(h) = h else { continue };
        for (side, ops) in [("request", &h.request), ("response", &h.response)] {
            let Some(ops) = ops else { continue };
            for name in ops.set.keys().chain(ops.add.keys()).chain(&ops.remove) {
                if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                    err(
                        &format!("{f}.headers.{side}"),
                        format!("{name:?} is not a header name"),
                    );
                }
            }
            for v in ops.set.values().chain(ops.add.values()) {
                if http::HeaderValue::from_str(v).is_err() {
                    err(
                        &format!("{f}.headers.{side}"),
                        format!("{v:?} is not a valid header value"),
                    );
                }
            }
        }
    }
}

fn check_percent(field: &str, p: Option<&Percent>, err: &mut impl FnMut(&str, String)) {
    if let Some(p) = p
        && !(0.0..=100.0).contains(&p.value)
    {
        err(
            field,
            format!("{} is not a percentage from 0 to 100", p.value),
        );
    }
}

fn check_match(m: &StringMatch, empty_ok: bool) -> Result<(), String> {
    match m.kind()? {
        None if !empty_ok => Err("needs one of exact, prefix or regex".into()),
        Some(MatchKind::Regex(r)) => regex::Regex::new(&anchored(r))
            .map(drop)
            .map_err(|e| bad_regex(&e)),
        _ => Ok(()),
    }
}

fn bad_regex(e: &regex::Error) -> String {
    let text = e.to_string();
    let first = text.lines().last().unwrap_or(&text).trim();
    format!("the regex does not compile (RE2 syntax): {first}")
}

/// Istio's regexes match the whole value.
pub fn anchored(r: &str) -> String {
    format!("^(?:{r})$")
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(s.trim())
        .ok()
}

use crate::istio::duration_ms as ms;

fn percent(p: Option<&Percent>) -> f64 {
    p.map_or(100.0, |p| p.value)
}

fn wire_match(m: &StringMatch) -> Option<pb::StringMatch> {
    use pb::string_match::Kind;
    let kind = match m.kind().ok()?? {
        MatchKind::Exact(s) => Kind::Exact(s.to_string()),
        MatchKind::Prefix(s) => Kind::Prefix(s.to_string()),
        MatchKind::Regex(s) => Kind::Regex(s.to_string()),
    };
    Some(pb::StringMatch { kind: Some(kind) })
}

fn wire_headers(map: &BTreeMap<String, StringMatch>, lower: bool) -> Vec<pb::HeaderMatch> {
    map.iter()
        .map(|(k, v)| pb::HeaderMatch {
            name: if lower {
                k.to_ascii_lowercase()
            } else {
                k.clone()
            },
            value: wire_match(v),
        })
        .collect()
}

fn wire_ops(ops: Option<&HeaderOperations>) -> Option<pb::HeaderOps> {
    let ops = ops?;
    let lower = |m: &BTreeMap<String, String>| {
        m.iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect()
    };
    Some(pb::HeaderOps {
        set: lower(&ops.set),
        add: lower(&ops.add),
        remove: ops.remove.iter().map(|r| r.to_ascii_lowercase()).collect(),
    })
}

fn side(h: Option<&Headers>, response: bool) -> Option<pb::HeaderOps> {
    let h = h?;
    wire_ops(if response {
        h.response.as_ref()
    } else {
        h.request.as_ref()
    })
}

/// Istio's `retries` as the proxy takes it; the default policy when unset.
fn retries(r: &HttpRoute) -> Option<pb::RetryPolicy> {
    let Some(rt) = &r.retries else {
        return Some(pb::RetryPolicy {
            attempts: DEFAULT_RETRY_ATTEMPTS,
            per_try_timeout_ms: 0,
            retry_on: DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect(),
            retriable_status_codes: DEFAULT_RETRIABLE_CODES.to_vec(),
        });
    };
    let attempts = rt.attempts.unwrap_or(DEFAULT_RETRY_ATTEMPTS);
    if attempts == 0 {
        return None;
    }
    let mut retry_on = Vec::new();
    let mut codes = Vec::new();
    let conditions = rt.retry_on.as_deref().map_or_else(
        || DEFAULT_RETRY_ON.iter().map(|s| s.to_string()).collect(),
        |s| {
            s.split(',')
                .map(|c| c.trim().to_string())
                .collect::<Vec<_>>()
        },
    );
    for c in conditions.into_iter().filter(|c| !c.is_empty()) {
        match c.parse::<u32>() {
            Ok(code) => codes.push(code),
            Err(_) => retry_on.push(c),
        }
    }
    if rt.retry_on.is_none() {
        codes.extend_from_slice(DEFAULT_RETRIABLE_CODES);
    }
    if !codes.is_empty() && !retry_on.iter().any(|c| c == "retriable-status-codes") {
        retry_on.push("retriable-status-codes".into());
    }
    Some(pb::RetryPolicy {
        attempts,
        per_try_timeout_ms: ms(rt.per_try_timeout.as_ref()),
        retry_on,
        retriable_status_codes: codes,
    })
}

/// One checked route in the proxies' form. `cluster_of` names the cluster a
/// destination resolves to.
/// Checks one TCP route: a destination, weights adding up to 100 when
/// there are several, and matches on what a sidecar can see of a
/// connection (port, source labels and namespace).
pub fn check_tcp(at: &str, r: &crate::istio::TcpRoute, errors: &mut Vec<String>) {
    let matches = r
        .matches
        .iter()
        .map(|m| (&m.destination_subnets, &m.gateways));
    check_l4(at, &r.route, matches, errors);
}

/// Checks one TLS route as a TCP route, and that each match names the
/// server names it is for (Istio requires `sniHosts`).
pub fn check_tls(at: &str, r: &crate::istio::TlsRoute, errors: &mut Vec<String>) {
    let matches = r
        .matches
        .iter()
        .map(|m| (&m.destination_subnets, &m.gateways));
    check_l4(at, &r.route, matches, errors);
    if r.matches.is_empty() {
        errors.push(format!(
            "{at}.match: needs at least one match with sniHosts"
        ));
    }
    for (i, m) in r.matches.iter().enumerate() {
        if m.sni_hosts.is_empty() {
            errors.push(format!(
                "{at}.match[{i}].sniHosts: needs at least one server name"
            ));
        }
        for (j, h) in m.sni_hosts.iter().enumerate() {
            let name = h.strip_prefix("*.").unwrap_or(h);
            let valid = h == "*"
                || (!name.is_empty()
                    && name.split('.').all(|l| {
                        !l.is_empty()
                            && l.len() <= 63
                            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    }));
            if !valid {
                errors.push(format!(
                    "{at}.match[{i}].sniHosts[{j}]: {h:?} is not a server name (`name.example.com` or `*.example.com`)"
                ));
            }
        }
    }
}

fn check_l4<'a>(
    at: &str,
    route: &[crate::istio::RouteDestination],
    matches: impl Iterator<Item = (&'a Vec<String>, &'a Vec<String>)>,
    errors: &mut Vec<String>,
) {
    let mut err = |field: &str, what: String| errors.push(format!("{at}{field}: {what}"));
    if route.is_empty() {
        err(".route", "needs at least one destination".to_string());
    }
    let weights: u32 = route.iter().map(|d| d.weight.unwrap_or(0)).sum();
    if route.len() > 1 && weights != 100 {
        err(".route", format!("weights add up to {weights}, not 100"));
    }
    for (i, (subnets, gateways)) in matches.enumerate() {
        if !subnets.is_empty() {
            err(
                &format!(".match[{i}].destinationSubnets"),
                "is not supported yet; match on port instead".to_string(),
            );
        }
        if gateways.iter().any(|g| g != "mesh") {
            err(
                &format!(".match[{i}].gateways"),
                "only `mesh` (the sidecars) is supported".to_string(),
            );
        }
    }
}

/// A TCP route in wire form: an HTTP route whose matches carry only the
/// port and the source, and whose destinations are weighted clusters.
pub fn tcp_to_wire(
    name: String,
    r: &crate::istio::TcpRoute,
    cluster_of: &dyn Fn(&Destination) -> String,
) -> pb::HttpRoute {
    let matches = r.matches.iter().map(|m| pb::HttpMatch {
        port: m.port.unwrap_or(0),
        source_labels: m.source_labels.clone().into_iter().collect(),
        source_namespace: m.source_namespace.clone().unwrap_or_default(),
        ..Default::default()
    });
    l4_to_wire(name, matches.collect(), &r.route, cluster_of)
}

/// A TLS route in wire form: a TCP route whose matches also name the
/// server names (lower case) they take.
pub fn tls_to_wire(
    name: String,
    r: &crate::istio::TlsRoute,
    cluster_of: &dyn Fn(&Destination) -> String,
) -> pb::HttpRoute {
    let matches = r.matches.iter().map(|m| pb::HttpMatch {
        port: m.port.unwrap_or(0),
        source_labels: m.source_labels.clone().into_iter().collect(),
        source_namespace: m.source_namespace.clone().unwrap_or_default(),
        sni_hosts: m.sni_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        ..Default::default()
    });
    l4_to_wire(name, matches.collect(), &r.route, cluster_of)
}

fn l4_to_wire(
    name: String,
    matches: Vec<pb::HttpMatch>,
    route: &[crate::istio::RouteDestination],
    cluster_of: &dyn Fn(&Destination) -> String,
) -> pb::HttpRoute {
    pb::HttpRoute {
        name,
        matches,
        clusters: route
            .iter()
            .map(|d| pb::WeightedCluster {
                cluster: cluster_of(&d.destination),
                weight: d.weight.unwrap_or(if route.len() == 1 { 100 } else { 0 }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

pub fn to_wire(
    name: String,
    r: &HttpRoute,
    cluster_of: &dyn Fn(&Destination) -> String,
) -> pb::HttpRoute {
    let matches = r
        .matches
        .iter()
        .map(|m| pb::HttpMatch {
            name: m.name.clone().unwrap_or_default(),
            uri: m.uri.as_ref().and_then(wire_match),
            scheme: m.scheme.as_ref().and_then(wire_match),
            method: m.method.as_ref().and_then(wire_match),
            authority: m.authority.as_ref().and_then(wire_match),
            headers: wire_headers(&m.headers, true),
            without_headers: wire_headers(&m.without_headers, true),
            query_params: wire_headers(&m.query_params, false),
            port: m.port.unwrap_or(0),
            source_labels: m.source_labels.clone().into_iter().collect(),
            source_namespace: m.source_namespace.clone().unwrap_or_default(),
            ignore_uri_case: m.ignore_uri_case,
            sni_hosts: Vec::new(),
        })
        .collect();
    let clusters = r
        .route
        .iter()
        .map(|d| pb::WeightedCluster {
            cluster: cluster_of(&d.destination),
            weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
            request_headers: side(d.headers.as_ref(), false),
            response_headers: side(d.headers.as_ref(), true),
        })
        .collect();
    let mut mirrors: Vec<pb::Mirror> = r
        .mirror
        .iter()
        .map(|d| pb::Mirror {
            cluster: cluster_of(d),
            percentage: r
                .mirror_percentage
                .as_ref()
                .map(|p| p.value)
                .or(r.mirror_percent.map(f64::from))
                .unwrap_or(100.0),
        })
        .collect();
    mirrors.extend(r.mirrors.iter().map(|m| pb::Mirror {
        cluster: cluster_of(&m.destination),
        percentage: percent(m.percentage.as_ref()),
    }));
    let fault = r.fault.as_ref().map(|f| pb::Fault {
        delay: f.delay.as_ref().map(|d| pb::FaultDelay {
            fixed_delay_ms: ms(d.fixed_delay.as_ref()),
            percentage: d
                .percentage
                .as_ref()
                .map(|p| p.value)
                .or(d.percent.map(f64::from))
                .unwrap_or(100.0),
        }),
        abort: f.abort.as_ref().map(|a| {
            let grpc = a
                .grpc_status
                .as_ref()
                .and_then(|g| GRPC_CODES.iter().position(|c| c == g));
            pb::FaultAbort {
                http_status: a.http_status.unwrap_or(200),
                grpc_status: grpc.unwrap_or(0) as u32,
                grpc: grpc.is_some(),
                percentage: percent(a.percentage.as_ref()),
            }
        }),
    });
    pb::HttpRoute {
        name,
        matches,
        clusters,
        rewrite: r.rewrite.as_ref().map(|rw| pb::Rewrite {
            uri: rw.uri.clone().unwrap_or_default(),
            authority: rw.authority.clone().unwrap_or_default(),
            uri_regex: rw
                .uri_regex_rewrite
                .as_ref()
                .map(|x| x.pattern.clone())
                .unwrap_or_default(),
            uri_regex_substitution: rw
                .uri_regex_rewrite
                .as_ref()
                .map(|x| x.rewrite.clone())
                .unwrap_or_default(),
        }),
        redirect: r.redirect.as_ref().map(|rd| pb::Redirect {
            uri: rd.uri.clone().unwrap_or_default(),
            authority: rd.authority.clone().unwrap_or_default(),
            scheme: rd.scheme.clone().unwrap_or_default(),
            port: rd.port.unwrap_or(0),
            code: rd.redirect_code.unwrap_or(301),
        }),
        direct_response: r.direct_response.as_ref().map(|d| pb::DirectResponse {
            status: d.status,
            body: d
                .body
                .as_ref()
                .and_then(|b| match (&b.string, &b.bytes) {
                    (Some(s), _) => Some(s.clone().into_bytes()),
                    (None, Some(b)) => base64_decode(b),
                    _ => None,
                })
                .unwrap_or_default(),
        }),
        request_headers: side(r.headers.as_ref(), false),
        response_headers: side(r.headers.as_ref(), true),
        timeout_ms: ms(r.timeout.as_ref()),
        retries: if r.route.is_empty() { None } else { retries(r) },
        fault,
        mirrors,
        cors: r.cors_policy.as_ref().map(|c| pb::CorsPolicy {
            allow_origins: c
                .allow_origins
                .iter()
                .filter_map(wire_match)
                .chain(c.allow_origin.iter().map(|o| pb::StringMatch {
                    kind: Some(pb::string_match::Kind::Exact(o.clone())),
                }))
                .collect(),
            allow_methods: c.allow_methods.clone(),
            allow_headers: c.allow_headers.clone(),
            expose_headers: c.expose_headers.clone(),
            max_age_s: ms(c.max_age.as_ref()) / 1000,
            allow_credentials: c.allow_credentials.unwrap_or(false),
        }),
    }
}

/// The route a service gets without a VirtualService: everything to the
/// service port's cluster, with Istio's default retries.
pub fn default_route(cluster: String) -> pb::HttpRoute {
    let r = HttpRoute::default();
    pb::HttpRoute {
        name: "default".into(),
        clusters: vec![pb::WeightedCluster {
            cluster,
            weight: 100,
            ..Default::default()
        }],
        retries: retries(&r),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> HttpRoute {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn errors(yaml: &str) -> Vec<String> {
        let mut e = Vec::new();
        check("vs: spec.http[0]", &route(yaml), &mut e);
        e
    }

    #[test]
    fn every_bad_field_is_named() {
        let e = errors(
            "
match:
- uri: {regex: '(unclosed'}
  queryParams: {q: {prefix: a}}
  headers: {x: {exact: a, prefix: b}}
route:
- destination: {host: a}
  weight: 60
- destination: {host: b}
  weight: 30
timeout: 5 seconds
retries: {attempts: 3, retryOn: '5xx,teapot', perTryTimeout: 1x}
fault:
  delay: {fixedDelay: 7s, percentage: {value: 120}}
  abort: {grpcStatus: NOPE}
",
        );
        let all = e.join("\n");
        for want in [
            "spec.http[0].match[0].uri: the regex does not compile",
            "spec.http[0].match[0].queryParams.q: prefix matches are not supported",
            "spec.http[0].match[0].headers.x: sets more than one",
            "spec.http[0].route: weights add up to 90, not 100",
            "spec.http[0].timeout: \"5 seconds\" is not a duration",
            "spec.http[0].retries.retryOn: \"teapot\" is not a retry condition",
            "spec.http[0].retries.perTryTimeout: \"1x\" is not a duration",
            "spec.http[0].fault.delay.percentage: 120 is not a percentage",
            "spec.http[0].fault.abort.grpcStatus: \"NOPE\"",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert_eq!(e.len(), 9, "{all}");
    }

    #[test]
    fn a_route_needs_exactly_one_action() {
        assert!(errors("match: [{uri: {exact: /}}]")[0].contains("needs one of route"));
        assert!(
            errors("route: [{destination: {host: a}}]\ndirectResponse: {status: 200}")[0]
                .contains("more than one")
        );
        assert!(errors("redirect: {uri: /x, redirectCode: 200}")[0].contains("redirectCode"));
    }

    #[test]
    fn retries_default_to_istios_policy_and_codes_move_to_their_list() {
        let w = |yaml: &str| to_wire("r".into(), &route(yaml), &|d| d.host.clone());
        let d = w("route: [{destination: {host: a}}]").retries.unwrap();
        assert_eq!(d.attempts, 2);
        assert_eq!(d.retriable_status_codes, vec![503]);
        assert!(d.retry_on.contains(&"connect-failure".to_string()));
        let r = w("route: [{destination: {host: a}}]\nretries: {attempts: 3, retryOn: 'gateway-error,409', perTryTimeout: 0.5s}")
            .retries
            .unwrap();
        assert_eq!(r.attempts, 3);
        assert_eq!(r.per_try_timeout_ms, 500);
        assert_eq!(r.retry_on, vec!["gateway-error", "retriable-status-codes"]);
        assert_eq!(r.retriable_status_codes, vec![409]);
        assert!(
            w("route: [{destination: {host: a}}]\nretries: {attempts: 0}")
                .retries
                .is_none()
        );
    }

    #[test]
    fn faults_default_to_every_request() {
        let r = to_wire(
            "r".into(),
            &route(
                "route: [{destination: {host: a}}]\nfault: {abort: {grpcStatus: UNAVAILABLE}, delay: {fixedDelay: 1m30s}}",
            ),
            &|d| d.host.clone(),
        );
        let f = r.fault.unwrap();
        assert_eq!(f.delay.unwrap().fixed_delay_ms, 90_000);
        let a = f.abort.unwrap();
        assert!(a.grpc);
        assert_eq!((a.grpc_status, a.percentage), (14, 100.0));
    }

    #[test]
    fn tcp_routes_are_checked_and_carry_port_source_and_weights() {
        let tcp = |yaml: &str| -> crate::istio::TcpRoute { serde_saphyr::from_str(yaml).unwrap() };
        let mut e = Vec::new();
        check_tcp(
            "vs: spec.tcp[0]",
            &tcp(
                "match: [{destinationSubnets: [10.0.0.0/8], gateways: [ingress]}]\nroute:\n- {destination: {host: a}, weight: 70}\n- {destination: {host: b}, weight: 20}",
            ),
            &mut e,
        );
        let all = e.join("\n");
        for want in [
            "spec.tcp[0].route: weights add up to 90, not 100",
            "spec.tcp[0].match[0].destinationSubnets: is not supported yet",
            "spec.tcp[0].match[0].gateways: only `mesh`",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(
            serde_saphyr::from_str::<crate::istio::TcpRoute>("route: []\ntimeout: 1s").is_err()
        );
        let wire = tcp_to_wire(
            "tcp-0".into(),
            &tcp(
                "match: [{port: 9000, sourceLabels: {app: sleep}, sourceNamespace: default}]\nroute: [{destination: {host: a}}]",
            ),
            &|d| d.host.clone(),
        );
        assert_eq!(wire.matches[0].port, 9000);
        assert_eq!(wire.matches[0].source_labels["app"], "sleep");
        assert_eq!(wire.matches[0].source_namespace, "default");
        assert_eq!(
            (wire.clusters[0].cluster.as_str(), wire.clusters[0].weight),
            ("a", 100)
        );
    }

    #[test]
    fn tls_routes_need_server_names_and_carry_them_lower_case() {
        let tls = |yaml: &str| -> crate::istio::TlsRoute { serde_saphyr::from_str(yaml).unwrap() };
        let mut e = Vec::new();
        check_tls(
            "vs: spec.tls[0]",
            &tls(
                "match: [{port: 443}, {sniHosts: [\"bad name\", \"*.ok.example\"]}]\nroute: [{destination: {host: a}}]",
            ),
            &mut e,
        );
        let all = e.join("\n");
        for want in [
            "spec.tls[0].match[0].sniHosts: needs at least one server name",
            "spec.tls[0].match[1].sniHosts[0]: \"bad name\" is not a server name",
        ] {
            assert!(all.contains(want), "missing {want:?} in:\n{all}");
        }
        assert!(!all.contains("sniHosts[1]"), "{all}");
        // `match` is required, as in Istio.
        assert!(serde_saphyr::from_str::<crate::istio::TlsRoute>("route: []").is_err());
        let wire = tls_to_wire(
            "tls-0".into(),
            &tls(
                "match: [{sniHosts: [Api.Example.com], port: 443}]\nroute: [{destination: {host: a}}]",
            ),
            &|d| d.host.clone(),
        );
        assert_eq!(wire.matches[0].sni_hosts, ["api.example.com"]);
        assert_eq!(wire.matches[0].port, 443);
    }
}
