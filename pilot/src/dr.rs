//! DestinationRule traffic policies: checked when the model is built, and
//! resolved per cluster (a subset's settings over port-level ones over the
//! rule's own, field by field, as Istio merges them).

use mesh_proto::resources as pb;

use crate::istio::{
    ClientTls, ConnectionPoolSettings, DestinationRule, LoadBalancerSettings, OutlierDetection,
    TrafficPolicy, parse_duration,
};

/// Checks a rule's policies. `at` names the resource.
pub fn check(at: &str, dr: &DestinationRule, errors: &mut Vec<String>) {
    if let Some(p) = &dr.traffic_policy {
        check_policy(at, "spec.trafficPolicy", p, errors);
    }
    for (i, s) in dr.subsets.iter().enumerate() {
        if let Some(p) = &s.traffic_policy {
            check_policy(at, &format!("spec.subsets[{i}].trafficPolicy"), p, errors);
        }
    }
    if dr.workload_selector.is_some() {
        errors.push(format!(
            "{at}: spec.workloadSelector: DestinationRules for selected workloads are not supported; drop it to apply the rule to every client"
        ));
    }
}

fn check_policy(at: &str, field: &str, p: &TrafficPolicy, errors: &mut Vec<String>) {
    let mut err = |f: String, what: String| errors.push(format!("{at}: {field}{f}: {what}"));
    let parts = std::iter::once((
        String::new(),
        p.load_balancer.as_ref(),
        p.connection_pool.as_ref(),
        p.outlier_detection.as_ref(),
        p.tls.as_ref(),
    ))
    .chain(p.port_level_settings.iter().enumerate().map(|(i, s)| {
        (
            format!(".portLevelSettings[{i}]"),
            s.load_balancer.as_ref(),
            s.connection_pool.as_ref(),
            s.outlier_detection.as_ref(),
            s.tls.as_ref(),
        )
    }));
    for (f, lb, pool, od, tls) in parts {
        if let Some(lb) = lb {
            check_lb(&f, lb, &mut err);
        }
        if let Some(pool) = pool {
            let durations = [
                (
                    "tcp.connectTimeout",
                    pool.tcp.as_ref().and_then(|t| t.connect_timeout.as_ref()),
                ),
                (
                    "tcp.idleTimeout",
                    pool.tcp.as_ref().and_then(|t| t.idle_timeout.as_ref()),
                ),
                (
                    "tcp.maxConnectionDuration",
                    pool.tcp
                        .as_ref()
                        .and_then(|t| t.max_connection_duration.as_ref()),
                ),
                (
                    "http.idleTimeout",
                    pool.http.as_ref().and_then(|h| h.idle_timeout.as_ref()),
                ),
                (
                    "tcp.tcpKeepalive.time",
                    pool.tcp
                        .as_ref()
                        .and_then(|t| t.tcp_keepalive.as_ref()?.time.as_ref()),
                ),
                (
                    "tcp.tcpKeepalive.interval",
                    pool.tcp
                        .as_ref()
                        .and_then(|t| t.tcp_keepalive.as_ref()?.interval.as_ref()),
                ),
            ];
            for (name, d) in durations {
                if let Some(d) = d
                    && let Err(e) = parse_duration(d)
                {
                    err(format!("{f}.connectionPool.{name}"), e);
                }
            }
        }
        if let Some(od) = od {
            for (name, d) in [
                ("interval", &od.interval),
                ("baseEjectionTime", &od.base_ejection_time),
            ] {
                if let Some(d) = d
                    && let Err(e) = parse_duration(d)
                {
                    err(format!("{f}.outlierDetection.{name}"), e);
                }
            }
            for (name, v) in [
                ("maxEjectionPercent", od.max_ejection_percent),
                ("minHealthPercent", od.min_health_percent),
            ] {
                if let Some(v) = v
                    && v > 100
                {
                    err(
                        format!("{f}.outlierDetection.{name}"),
                        format!("{v} is not a percentage from 0 to 100"),
                    );
                }
            }
        }
        if let Some(tls) = tls {
            let mode = tls.mode.as_deref().unwrap_or("DISABLE");
            if tls_mode(mode).is_none() {
                err(
                    format!("{f}.tls.mode"),
                    format!("{mode:?} is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL"),
                );
            }
            if tls.credential_name.is_some() {
                err(
                    format!("{f}.tls.credentialName"),
                    "credentials from Kubernetes secrets are not supported; give caCertificates, clientCertificate and privateKey files".into(),
                );
            }
            if mode == "MUTUAL" {
                for (name, v) in [
                    ("clientCertificate", &tls.client_certificate),
                    ("privateKey", &tls.private_key),
                ] {
                    if v.as_deref().unwrap_or_default().is_empty() {
                        err(
                            format!("{f}.tls.{name}"),
                            "MUTUAL needs the client's certificate and key files".into(),
                        );
                    }
                }
            }
        }
    }
    if p.tunnel.is_some() {
        err(".tunnel".into(), "tunnel settings are not supported".into());
    }
    if p.proxy_protocol.is_some() {
        err(
            ".proxyProtocol".into(),
            "PROXY protocol is not supported".into(),
        );
    }
}

fn check_lb(f: &str, lb: &LoadBalancerSettings, err: &mut impl FnMut(String, String)) {
    if let Some(s) = &lb.simple
        && simple(s).is_none()
    {
        err(
            format!("{f}.loadBalancer.simple"),
            format!(
                "{s:?} is not supported; use ROUND_ROBIN, LEAST_REQUEST, RANDOM, PASSTHROUGH or PEAK_EWMA"
            ),
        );
    }
    if lb.simple.is_some() && lb.consistent_hash.is_some() {
        err(
            format!("{f}.loadBalancer"),
            "sets both simple and consistentHash; keep one".into(),
        );
    }
    if let Some(l) = &lb.locality_lb_setting {
        check_locality(&format!("{f}.loadBalancer.localityLbSetting"), l, err);
    }
    if let Some(h) = &lb.consistent_hash {
        let keys = [
            h.http_header_name.is_some(),
            h.http_cookie.is_some(),
            h.use_source_ip.unwrap_or(false),
            h.http_query_parameter_name.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() != 1 {
            err(
                format!("{f}.loadBalancer.consistentHash"),
                "needs exactly one of httpHeaderName, httpCookie, useSourceIp and httpQueryParameterName".into(),
            );
        }
        if let Some(c) = &h.http_cookie
            && let Some(ttl) = &c.ttl
            && let Err(e) = parse_duration(ttl)
        {
            err(format!("{f}.loadBalancer.consistentHash.httpCookie.ttl"), e);
        }
    }
}

/// A locality pattern: `region`, `region/zone`, `region/zone/subzone`,
/// any part `*` (the rest then left out).
fn locality_pattern(p: &str) -> bool {
    let parts: Vec<&str> = p.split('/').collect();
    parts.len() <= 3
        && parts
            .iter()
            .all(|s| !s.is_empty() && !s.contains(char::is_whitespace))
        && parts
            .iter()
            .position(|s| *s == "*")
            .is_none_or(|i| i == parts.len() - 1)
}

fn check_locality(
    f: &str,
    l: &crate::istio::LocalityLbSetting,
    err: &mut impl FnMut(String, String),
) {
    let fails_over = !l.failover.is_empty() || !l.failover_priority.is_empty();
    if !l.distribute.is_empty() && fails_over {
        err(
            f.to_string(),
            "sets distribute together with failover or failoverPriority; keep one".into(),
        );
    }
    for (i, d) in l.distribute.iter().enumerate() {
        if !locality_pattern(&d.from) {
            err(
                format!("{f}.distribute[{i}].from"),
                format!(
                    "{:?} is not a locality (region/zone/subzone, `*` last)",
                    d.from
                ),
            );
        }
        for to in d.to.keys().filter(|t| !locality_pattern(t)) {
            err(
                format!("{f}.distribute[{i}].to"),
                format!("{to:?} is not a locality (region/zone/subzone, `*` last)"),
            );
        }
        let total: u32 = d.to.values().sum();
        if total != 100 {
            err(
                format!("{f}.distribute[{i}].to"),
                format!("weights add up to {total}, not 100"),
            );
        }
    }
    for (i, r) in l.failover.iter().enumerate() {
        for (side, region) in [("from", &r.from), ("to", &r.to)] {
            if region.is_empty() || region.contains('/') || region == "*" {
                err(
                    format!("{f}.failover[{i}].{side}"),
                    format!("{region:?} is not a region"),
                );
            }
        }
        if r.from == r.to {
            err(
                format!("{f}.failover[{i}]"),
                format!("fails region {:?} over to itself", r.from),
            );
        }
    }
}

fn simple(s: &str) -> Option<pb::load_balancer::Simple> {
    use pb::load_balancer::Simple;
    Some(match s {
        "ROUND_ROBIN" | "UNSPECIFIED" => Simple::RoundRobin,
        "LEAST_REQUEST" | "LEAST_CONN" => Simple::LeastRequest,
        "RANDOM" => Simple::Random,
        "PEAK_EWMA" => Simple::PeakEwma,
        "PASSTHROUGH" => Simple::Passthrough,
        _ => return None,
    })
}

use crate::istio::duration_ms as ms;

fn wire_lb(lb: &LoadBalancerSettings) -> pb::LoadBalancer {
    use pb::consistent_hash::Key;
    let hash = lb.consistent_hash.as_ref().map(|h| {
        let key = if let Some(name) = &h.http_header_name {
            Key::Header(name.to_ascii_lowercase())
        } else if let Some(c) = &h.http_cookie {
            Key::Cookie(pb::HashCookie {
                name: c.name.clone(),
                path: c.path.clone().unwrap_or_default(),
                ttl_ms: ms(c.ttl.as_ref()),
            })
        } else if let Some(q) = &h.http_query_parameter_name {
            Key::QueryParameter(q.clone())
        } else {
            Key::SourceIp(true)
        };
        pb::ConsistentHash {
            key: Some(key),
            maglev: h.maglev.is_some(),
            size: h
                .maglev
                .as_ref()
                .and_then(|m| m.table_size)
                .or(h.ring_hash.as_ref().and_then(|r| r.minimum_ring_size))
                .or(h.minimum_ring_size)
                .unwrap_or(0),
        }
    });
    pb::LoadBalancer {
        simple: lb.simple.as_deref().and_then(simple).unwrap_or_default() as i32,
        hash,
        locality: None,
    }
}

fn wire_pool(p: &ConnectionPoolSettings) -> pb::ConnectionPool {
    let tcp = p.tcp.clone().unwrap_or_default();
    let http = p.http.clone().unwrap_or_default();
    pb::ConnectionPool {
        max_connections: tcp.max_connections.unwrap_or(0),
        connect_timeout_ms: ms(tcp.connect_timeout.as_ref()),
        http1_max_pending_requests: http.http1_max_pending_requests.unwrap_or(0),
        http2_max_requests: http.http2_max_requests.unwrap_or(0),
        max_requests_per_connection: http.max_requests_per_connection.unwrap_or(0),
        max_retries: http.max_retries.unwrap_or(0),
        idle_timeout_ms: ms(http.idle_timeout.as_ref().or(tcp.idle_timeout.as_ref())),
        tcp_keepalive: tcp.tcp_keepalive.as_ref().map(|k| pb::TcpKeepalive {
            probes: k.probes.unwrap_or(0),
            time_ms: ms(k.time.as_ref()),
            interval_ms: ms(k.interval.as_ref()),
        }),
        max_connection_duration_ms: ms(tcp.max_connection_duration.as_ref()),
    }
}

/// Istio's defaults for what an `outlierDetection` leaves out.
fn wire_outlier(o: &OutlierDetection) -> pb::OutlierDetection {
    pb::OutlierDetection {
        consecutive_5xx_errors: o.consecutive_5xx_errors.unwrap_or(5),
        consecutive_gateway_errors: o.consecutive_gateway_errors.unwrap_or(0),
        interval_ms: o.interval.as_ref().map_or(10_000, |d| ms(Some(d))),
        base_ejection_time_ms: o
            .base_ejection_time
            .as_ref()
            .map_or(30_000, |d| ms(Some(d))),
        max_ejection_percent: o.max_ejection_percent.unwrap_or(10),
        min_health_percent: o.min_health_percent.unwrap_or(0),
    }
}

fn tls_mode(mode: &str) -> Option<pb::client_tls::Mode> {
    use pb::client_tls::Mode;
    Some(match mode {
        "DISABLE" => Mode::Disable,
        "SIMPLE" => Mode::Simple,
        "MUTUAL" => Mode::Mutual,
        "ISTIO_MUTUAL" => Mode::IstioMutual,
        _ => return None,
    })
}

fn wire_tls(t: &ClientTls) -> pb::ClientTls {
    let file = |f: &Option<String>| f.clone().unwrap_or_default();
    pb::ClientTls {
        mode: tls_mode(t.mode.as_deref().unwrap_or("DISABLE")).unwrap_or_default() as i32,
        sni: file(&t.sni),
        ca_certificates: file(&t.ca_certificates),
        client_certificate: file(&t.client_certificate),
        private_key: file(&t.private_key),
        subject_alt_names: t.subject_alt_names.clone(),
        insecure_skip_verify: t.insecure_skip_verify.unwrap_or(false),
    }
}

/// The settings of one policy for one port: port-level ones first.
type Resolved<'a> = (
    Option<&'a LoadBalancerSettings>,
    Option<&'a ConnectionPoolSettings>,
    Option<&'a OutlierDetection>,
    Option<&'a ClientTls>,
);

fn resolve(p: Option<&TrafficPolicy>, port: u32) -> Resolved<'_> {
    let Some(p) = p else {
        return (None, None, None, None);
    };
    let at_port = p
        .port_level_settings
        .iter()
        .find(|s| s.port.as_ref().is_some_and(|sel| sel.number == port));
    (
        at_port
            .and_then(|s| s.load_balancer.as_ref())
            .or(p.load_balancer.as_ref()),
        at_port
            .and_then(|s| s.connection_pool.as_ref())
            .or(p.connection_pool.as_ref()),
        at_port
            .and_then(|s| s.outlier_detection.as_ref())
            .or(p.outlier_detection.as_ref()),
        at_port.and_then(|s| s.tls.as_ref()).or(p.tls.as_ref()),
    )
}

/// Fills a cluster's policy fields from the rule for its host.
pub fn apply(dr: Option<&DestinationRule>, subset: Option<&str>, port: u32, c: &mut pb::Cluster) {
    let Some(dr) = dr else { return };
    let top = resolve(dr.traffic_policy.as_ref(), port);
    let sub = subset
        .and_then(|name| dr.subsets.iter().find(|s| s.name == name))
        .map(|s| resolve(s.traffic_policy.as_ref(), port))
        .unwrap_or((None, None, None, None));
    let lb = sub.0.or(top.0);
    c.lb = lb.map(wire_lb);
    c.pool = sub.1.or(top.1).map(wire_pool);
    c.outlier = sub.2.or(top.2).map(wire_outlier);
    c.tls = sub.3.or(top.3).map(wire_tls);
    // Locality-aware balancing, on unless the rule turns it off (Istio's
    // mesh default), takes effect with outlier detection only, as in Istio:
    // without it nothing would tell a locality's endpoints are failing.
    let setting = lb.and_then(|l| l.locality_lb_setting.as_ref());
    if c.outlier.is_some() && setting.is_none_or(|s| s.enabled.unwrap_or(true)) {
        c.lb.get_or_insert_with(Default::default).locality = Some(wire_locality(setting));
    }
}

fn wire_locality(s: Option<&crate::istio::LocalityLbSetting>) -> pb::LocalityLb {
    let Some(s) = s else {
        return pb::LocalityLb {
            failover: true,
            ..Default::default()
        };
    };
    pb::LocalityLb {
        failover: s.distribute.is_empty(),
        distribute: s
            .distribute
            .iter()
            .map(|d| pb::LocalityDistribute {
                from: d.from.clone(),
                to: d.to.clone().into_iter().collect(),
            })
            .collect(),
        failover_rules: s
            .failover
            .iter()
            .map(|r| pb::LocalityFailover {
                from: r.from.clone(),
                to: r.to.clone(),
            })
            .collect(),
        failover_priority: s.failover_priority.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dr(yaml: &str) -> DestinationRule {
        serde_saphyr::from_str(yaml).unwrap()
    }

    #[test]
    fn subset_settings_override_port_settings_override_the_rules_own() {
        let rule = dr("
host: reviews
trafficPolicy:
  loadBalancer: {simple: RANDOM}
  connectionPool: {http: {http1MaxPendingRequests: 1}}
  tls: {mode: ISTIO_MUTUAL}
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer: {simple: LEAST_REQUEST}
    tls: {mode: SIMPLE, sni: reviews.example.com}
subsets:
- name: v1
  labels: {version: v1}
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 1, baseEjectionTime: 1s}
- name: v2
  labels: {version: v2}
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: user, ttl: 60s}}
    tls: {mode: DISABLE}
");
        let mut c = pb::Cluster::default();
        apply(Some(&rule), Some("v1"), 9080, &mut c);
        assert_eq!(
            c.lb.as_ref().unwrap().simple,
            pb::load_balancer::Simple::LeastRequest as i32
        );
        assert_eq!(c.pool.as_ref().unwrap().http1_max_pending_requests, 1);
        let tls = c.tls.as_ref().unwrap();
        assert_eq!(
            (tls.mode, tls.sni.as_str()),
            (pb::client_tls::Mode::Simple as i32, "reviews.example.com")
        );
        let od = c.outlier.unwrap();
        assert_eq!(
            (
                od.consecutive_5xx_errors,
                od.base_ejection_time_ms,
                od.max_ejection_percent
            ),
            (1, 1000, 10)
        );
        let mut c = pb::Cluster::default();
        apply(Some(&rule), Some("v2"), 9000, &mut c);
        assert_eq!(
            c.tls.as_ref().unwrap().mode,
            pb::client_tls::Mode::Disable as i32
        );
        let mut c = pb::Cluster::default();
        apply(Some(&rule), None, 9000, &mut c);
        assert_eq!(
            c.tls.as_ref().unwrap().mode,
            pb::client_tls::Mode::IstioMutual as i32
        );
        let mut c = pb::Cluster::default();
        apply(Some(&rule), Some("v2"), 9000, &mut c);
        let hash = c.lb.unwrap().hash.unwrap();
        assert!(
            matches!(hash.key, Some(pb::consistent_hash::Key::Cookie(ref k)) if k.ttl_ms == 60_000)
        );
        assert!(c.outlier.is_none());
    }

    #[test]
    fn locality_settings_are_checked_and_apply_with_outlier_detection() {
        let mut errors = Vec::new();
        check(
            "dr",
            &dr("
host: reviews
trafficPolicy:
  loadBalancer:
    localityLbSetting:
      distribute: [{from: \"us-east/*/x\", to: {\"us-east/*\": 60, \"eu west\": 30}}]
      failover: [{from: us-east, to: us-east}]
"),
            &mut errors,
        );
        let all = errors.join("\n");
        for want in [
            "localityLbSetting: sets distribute together with failover",
            "localityLbSetting.distribute[0].from: \"us-east/*/x\" is not a locality",
            "localityLbSetting.distribute[0].to: \"eu west\" is not a locality",
            "localityLbSetting.distribute[0].to: weights add up to 90, not 100",
            "localityLbSetting.failover[0]: fails region \"us-east\" over to itself",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
        let cluster = |yaml: &str| {
            let mut c = pb::Cluster::default();
            apply(Some(&dr(yaml)), None, 9080, &mut c);
            c.lb.and_then(|lb| lb.locality)
        };
        assert_eq!(
            cluster("host: r\ntrafficPolicy: {loadBalancer: {simple: RANDOM}}"),
            None,
            "without outlier detection, as in Istio"
        );
        let on = cluster("host: r\ntrafficPolicy: {outlierDetection: {consecutive5xxErrors: 1}}");
        assert!(
            on.is_some_and(|l| l.failover),
            "on by default with outlier detection"
        );
        let off = cluster(
            "host: r\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {enabled: false}}}",
        );
        assert_eq!(off, None);
        let weighted = cluster(
            "host: r\ntrafficPolicy: {outlierDetection: {}, loadBalancer: {localityLbSetting: {distribute: [{from: a/*, to: {a/*: 100}}]}}}",
        )
        .unwrap();
        assert!(!weighted.failover);
        assert_eq!(weighted.distribute[0].to["a/*"], 100);
    }

    #[test]
    fn unsupported_and_malformed_settings_are_named() {
        let mut errors = Vec::new();
        check(
            "dr",
            &dr("
host: reviews
trafficPolicy:
  loadBalancer: {simple: ORIGINAL}
  tls: {mode: STRICT, credentialName: shop-cert}
  outlierDetection: {interval: soon, maxEjectionPercent: 150}
  portLevelSettings:
  - port: {number: 9080}
    loadBalancer: {consistentHash: {httpHeaderName: x, useSourceIp: true}}
"),
            &mut errors,
        );
        let all = errors.join("\n");
        for want in [
            "spec.trafficPolicy.loadBalancer.simple: \"ORIGINAL\" is not supported",
            "spec.trafficPolicy.tls.mode: \"STRICT\" is not one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL",
            "spec.trafficPolicy.tls.credentialName: credentials from Kubernetes secrets are not supported",
            "spec.trafficPolicy.outlierDetection.interval: \"soon\" is not a duration",
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150",
            "spec.trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash: needs exactly one",
        ] {
            assert!(all.contains(want), "missing {want:?} in\n{all}");
        }
    }
}
