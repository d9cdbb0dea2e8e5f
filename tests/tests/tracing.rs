//! Distributed tracing end to end: the bookinfo sidecars export spans over
//! OTLP/gRPC to a receiver that is not ours (python grpcio serving the
//! TraceService of the opentelemetry-proto package), named by Istio's mesh
//! config and Telemetry resources.

use std::time::{Duration, Instant};

use mesh_tests::otlp::{self, Receiver};
use mesh_tests::{Mesh, metric_sum, reviews_all_to};
use serde_json::Value;

/// Waits until `trace`'s spans at `receiver` include every (service, kind) in `want`.
async fn spans_of(receiver: &Receiver, trace: &str, want: &[(&str, &str)]) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<Value> = receiver
            .spans()
            .into_iter()
            .filter(|s| s["trace_id"] == trace)
            .collect();
        let has = |(svc, kind): &(&str, &str)| {
            spans
                .iter()
                .any(|s| s["service"] == *svc && s["kind"] == *kind)
        };
        if want.iter().all(has) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "trace {trace} lacks some of {want:?}; it has {:#?}",
            spans
                .iter()
                .map(|s| (&s["service"], &s["kind"], &s["name"]))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn mesh_config(collector_port: u16) -> String {
    format!(
        "apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |-
    defaultProviders:
      tracing: [otel]
    extensionProviders:
    - name: otel
      opentelemetry: {{service: 127.0.0.1, port: {collector_port}}}
---
# New traces are never sampled: only a caller's decision records one.
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing:
  - providers: [{{name: otel}}]
    randomSamplingPercentage: 0
    customTags:
      team: {{literal: {{value: bookinfo}}}}
"
    )
}

/// Waits until every sidecar holds a tracing collector and productpage's
/// requests reach reviews v2 (which calls ratings).
async fn ready(mesh: &Mesh, http: &reqwest::Client, port: u16) {
    let marker = format!("\"collector\":\"127.0.0.1:{port}\"");
    for w in &mesh.specs {
        mesh.wait_telemetry(&w.name, &marker).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (version, _) = mesh.request(http).await.unwrap();
        if version == "v2" {
            return;
        }
        assert!(Instant::now() < deadline, "reviews never moved to v2");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The mesh with reviews on v2 and every sidecar tracing to a receiver
/// `start` makes; `None` (having said why) when the receiver cannot run.
async fn traced(
    start: fn(&std::path::Path) -> anyhow::Result<Receiver>,
) -> Option<(Mesh, Receiver, reqwest::Client)> {
    if let Some(why) = otlp::missing() {
        eprintln!("SKIPPED: {why}");
        return None;
    }
    let mesh = Mesh::start().await;
    let receiver = start(mesh.state_dir()).unwrap();
    mesh.write_config("reviews-routing.yaml", &reviews_all_to("v2"));
    mesh.write_config("tracing.yaml", &mesh_config(receiver.port));
    let http = mesh.client();
    ready(&mesh, &http, receiver.port).await;
    Some((mesh, receiver, http))
}

/// Waits (up to 20 s) until productpage's sidecar counts at least `n`
/// spans dropped for failed exports; returns its metrics then.
async fn export_failures_at_least(mesh: &Mesh, n: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stats = mesh.stats("productpage-v1").await;
        let dropped = metric_sum(
            &stats,
            "mesh_proxy_trace_spans_dropped_total",
            &["reason=\"export_failed\""],
        );
        if dropped >= n {
            return stats;
        }
        assert!(
            Instant::now() < deadline,
            "{dropped} spans counted as dropped, not {n}: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn productpage(http: &reqwest::Client, headers: &[(&str, &str)]) -> reqwest::Response {
    let mut req = http.get("http://productpage:9080/productpage");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp
}

fn one<'a>(spans: &'a [Value], service: &str, kind: &str, name_has: &str) -> &'a Value {
    let found: Vec<&Value> = spans
        .iter()
        .filter(|s| {
            s["service"] == service
                && s["kind"] == kind
                && s["name"].as_str().unwrap().contains(name_has)
        })
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{service} {kind} {name_has}: {found:#?} in {spans:#?}"
    );
    found[0]
}

#[tokio::test(flavor = "multi_thread")]
async fn bookinfo_spans_share_one_trace_with_correct_parents_at_an_otlp_receiver() {
    let Some((mesh, receiver, http)) = traced(Receiver::start).await else {
        return;
    };

    // Not sampled (0 %, and the caller decided nothing): no spans, but it
    // is still given an x-request-id and a trace context.
    productpage(&http, &[("x-request-id", "never-traced")]).await;
    // Sampled by the caller (W3C).
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller = "00f067aa0ba902b7";
    let traceparent = format!("00-{trace}-{caller}-01");
    productpage(
        &http,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=kept"),
            ("x-request-id", "traced-w3c"),
        ],
    )
    .await;
    let want = [
        ("client.default", "CLIENT"),
        ("productpage.default", "SERVER"),
        ("productpage.default", "CLIENT"),
        ("details.default", "SERVER"),
        ("reviews.default", "SERVER"),
        ("reviews.default", "CLIENT"),
        ("ratings.default", "SERVER"),
    ];
    let spans = spans_of(&receiver, trace, &want).await;
    // One client span at the edge, one server span per service, and one
    // client span per call: 1 + 4 + 3.
    assert_eq!(spans.len(), 8, "{spans:#?}");
    let id = |s: &Value| s["span_id"].as_str().unwrap().to_string();
    let parent = |s: &Value| s["parent_span_id"].as_str().unwrap().to_string();
    let edge = one(&spans, "client.default", "CLIENT", "productpage");
    let pp = one(&spans, "productpage.default", "SERVER", "productpage");
    let pp_details = one(&spans, "productpage.default", "CLIENT", "details");
    let pp_reviews = one(&spans, "productpage.default", "CLIENT", "reviews");
    let details = one(&spans, "details.default", "SERVER", "details");
    let reviews = one(&spans, "reviews.default", "SERVER", "reviews");
    let reviews_ratings = one(&spans, "reviews.default", "CLIENT", "ratings");
    let ratings = one(&spans, "ratings.default", "SERVER", "ratings");
    assert_eq!(parent(edge), caller);
    for (child, of) in [
        (pp, edge),
        (pp_details, pp),
        (pp_reviews, pp),
        (details, pp_details),
        (reviews, pp_reviews),
        (reviews_ratings, reviews),
        (ratings, reviews_ratings),
    ] {
        assert_eq!(
            parent(child),
            id(of),
            "{} {} should be under {} {}",
            child["service"],
            child["kind"],
            of["service"],
            of["kind"]
        );
    }
    // Istio's names and tags.
    assert_eq!(pp["name"], "productpage.default.svc.cluster.local:9080/*");
    let a = &pp["attributes"];
    assert_eq!(a["http.method"], "GET");
    assert_eq!(a["http.status_code"], "200");
    assert_eq!(a["upstream_cluster"], "inbound|9080||");
    assert_eq!(a["istio.canonical_service"], "productpage");
    assert_eq!(a["istio.namespace"], "default");
    assert_eq!(a["guid:x-request-id"], "traced-w3c");
    assert_eq!(a["team"], "bookinfo", "the Telemetry's custom tag");
    assert_eq!(a["component"], "proxy");
    assert_eq!(
        edge["attributes"]["upstream_cluster"],
        "outbound|9080||productpage.default.svc.cluster.local"
    );
    assert_eq!(
        reviews_ratings["attributes"]["guid:x-request-id"],
        "traced-w3c"
    );
    // The unsampled request left no span anywhere.
    let untraced = receiver
        .spans()
        .into_iter()
        .filter(|s| s["attributes"]["guid:x-request-id"] == "never-traced")
        .count();
    assert_eq!(untraced, 0);

    // Sampled by the caller in B3's multi-header form.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    productpage(
        &http,
        &[
            ("x-b3-traceid", b3_trace),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    let spans = spans_of(&receiver, b3_trace, &want).await;
    assert_eq!(
        parent(one(&spans, "client.default", "CLIENT", "productpage")),
        "e457b5a2e4d86bd1"
    );

    // A malformed traceparent: the request is served, the proxy counts it.
    productpage(&http, &[("traceparent", "00-not-a-trace-01")]).await;
    let stats = mesh.stats("client").await;
    assert_eq!(
        metric_sum(
            &stats,
            "mesh_proxy_trace_context_malformed_total",
            &["header=\"traceparent\""]
        ),
        1.0,
        "{stats}"
    );
    let exported = |stats: &str| metric_sum(stats, "mesh_proxy_trace_spans_exported_total", &[]);
    assert!(exported(&mesh.stats("productpage-v1").await) >= 6.0);

    // The collector goes away: requests are unaffected; the spans are
    // counted as dropped.
    drop(receiver);
    let started = Instant::now();
    for _ in 0..5 {
        productpage(&http, &[("traceparent", &traceparent)]).await;
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests waited on the collector"
    );
    export_failures_at_least(&mesh, 15.0).await;
    mesh.stop().await;
}

/// A collector that takes every export and never answers: requests go on
/// at full speed, and each sidecar gives up on the export after its
/// timeout and counts the spans it dropped.
#[tokio::test(flavor = "multi_thread")]
async fn a_stalled_collector_never_slows_requests() {
    let Some((mesh, receiver, http)) = traced(Receiver::start_stalled).await else {
        return;
    };

    // Each request is sampled by its caller, so every hop makes spans
    // for the wedged collector.
    let started = Instant::now();
    for i in 1..=20 {
        let traceparent = format!("00-{i:032x}-00f067aa0ba902b7-01");
        productpage(&http, &[("traceparent", &traceparent)]).await;
    }
    // An export waits up to 5 s for its answer; requests never do.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "requests waited on the collector: {:?}",
        started.elapsed()
    );
    let stats = export_failures_at_least(&mesh, 1.0).await;
    assert_eq!(
        metric_sum(&stats, "mesh_proxy_trace_spans_exported_total", &[]),
        0.0,
        "{stats}"
    );
    assert!(
        receiver.stalled_exports() >= 1,
        "the collector was never sent an export"
    );
    assert!(receiver.spans().is_empty());
    mesh.stop().await;
}
