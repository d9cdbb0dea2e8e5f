//! The authorization decision with 100 AuthorizationPolicies in scope.
//! `cargo bench -p mesh-proxy --bench authz`. Target: ≤ 2 µs per request.
//!
//! The policies look like a busy namespace's: 90 ALLOW policies, each
//! naming a few principals, methods and path prefixes, and 10 DENY
//! policies on paths and headers. The requests are the expensive cases:
//! one allowed by the last ALLOW policy (everything before it is tried),
//! one denied because no ALLOW matches (everything is tried), one denied
//! by the first DENY.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mesh_proto::resources as pb;
use mesh_proxy::authz::{HttpParts, Policies, Request};

fn strs(v: &[String]) -> Vec<String> {
    v.to_vec()
}

fn policies() -> Vec<pb::AuthorizationPolicy> {
    let mut out = Vec::new();
    for i in 0..10 {
        out.push(pb::AuthorizationPolicy {
            name: format!("default/deny-{i}"),
            action: pb::authorization_policy::Action::Deny as i32,
            rules: vec![pb::AuthzRule {
                to: vec![pb::AuthzOperation {
                    paths: strs(&[format!("/internal-{i}/*"), format!("*/debug-{i}")]),
                    ..Default::default()
                }],
                when: vec![pb::AuthzCondition {
                    key: format!("request.headers[x-block-{i}]"),
                    values: vec!["1".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        });
    }
    for i in 0..90 {
        out.push(pb::AuthorizationPolicy {
            name: format!("default/allow-{i}"),
            action: pb::authorization_policy::Action::Allow as i32,
            rules: vec![pb::AuthzRule {
                from: vec![pb::AuthzSource {
                    principals: (0..3)
                        .map(|k| format!("cluster.local/ns/team-{i}/sa/app-{k}"))
                        .collect(),
                    not_ip_blocks: vec!["192.0.2.0/24".into()],
                    ..Default::default()
                }],
                to: vec![pb::AuthzOperation {
                    methods: vec!["GET".into(), "POST".into()],
                    paths: vec![format!("/api/v{i}/*"), "/health".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
        });
    }
    out
}

fn bench(c: &mut Criterion) {
    let compiled = Policies::compile(&policies()).expect("policies compile");
    let headers = http::HeaderMap::new();
    let req = |principal: &'static str, path: &'static str| Request {
        principal: Some(principal),
        namespace: principal.split('/').nth(2),
        source_ip: Some("10.244.0.12".parse().unwrap()),
        port: 9080,
        http: Some(HttpParts {
            host: "ratings:9080",
            method: "GET",
            path,
            headers: &headers,
        }),
        auth: None,
        sni: Some("outbound_.9080_._.ratings.default.svc.cluster.local"),
    };
    let last = req("cluster.local/ns/team-89/sa/app-2", "/api/v89/items");
    assert!(compiled.decide(&last).allowed());
    let nobody = req("cluster.local/ns/elsewhere/sa/x", "/api/v1/items");
    assert!(!compiled.decide(&nobody).allowed());
    let mut blocked = http::HeaderMap::new();
    blocked.insert("x-block-0", http::HeaderValue::from_static("1"));
    let denied = Request {
        http: Some(HttpParts {
            host: "ratings:9080",
            method: "GET",
            path: "/internal-0/x",
            headers: &blocked,
        }),
        ..req("cluster.local/ns/team-0/sa/app-0", "/")
    };
    assert_eq!(
        compiled.decide(&denied).reason(),
        "denied by default/deny-0 rule 0"
    );
    c.bench_function("authz/100 policies/allowed by the last", |b| {
        b.iter(|| black_box(compiled.decide(black_box(&last))))
    });
    c.bench_function("authz/100 policies/no ALLOW matches", |b| {
        b.iter(|| black_box(compiled.decide(black_box(&nobody))))
    });
    c.bench_function("authz/100 policies/first DENY path", |b| {
        b.iter(|| black_box(compiled.decide(black_box(&denied))))
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
