//! Telemetry end to end on the bookinfo mesh: Istio's Telemetry resource
//! turns access logs on and filters them (Istio's default text format) and
//! switches metrics off per side; tap; the control plane's metrics; a real
//! Prometheus; the agent port's merged metrics. Traces are in `tracing.rs`.

use std::time::{Duration, Instant};

use mesh_tests::{Mesh, metric_sum};

const ACCESS_LOG_MESH_WIDE: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
";

/// Errors only, for productpage's sidecar, on the side that serves.
const PRODUCTPAGE_ERRORS_ONLY: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: productpage-errors, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  accessLogging:
  - providers: [{name: envoy}]
    match: {mode: SERVER}
    filter: {expression: 'response.code >= 400'}
";

fn access_log(mesh: &Mesh, workload: &str) -> String {
    std::fs::read_to_string(mesh.state_dir().join(format!("{workload}.access.log")))
        .unwrap_or_default()
}

/// Waits until `workload`'s access log has a line containing every one of `parts`.
async fn logged(mesh: &Mesh, workload: &str, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = access_log(mesh, workload);
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in {workload}'s access log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_turns_access_logs_on_and_filters_them() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    // No Telemetry: no access logs.
    mesh.request(&http).await.unwrap();
    assert_eq!(access_log(&mesh, "client"), "");

    mesh.write_config("telemetry.yaml", ACCESS_LOG_MESH_WIDE);
    for w in ["client", "productpage-v1"] {
        mesh.wait_telemetry(w, "istio-system/mesh-default").await;
    }
    let resp = http
        .get("http://productpage:9080/productpage")
        .header("x-request-id", "trace-me-1")
        .header("user-agent", "telemetry-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    // The client's sidecar logs the request it sent, in Istio's format:
    // [time] "GET /productpage HTTP/1.1" 200 - via_upstream - "-" 0 <sent> ...
    let line = logged(&mesh, "client", &["\"trace-me-1\""]).await;
    let sent = format!(" 200 - via_upstream - \"-\" 0 {} ", body.len());
    assert!(line.starts_with('['), "{line}");
    assert!(line.contains("\"GET /productpage HTTP/1.1\""), "{line}");
    assert!(line.contains(&sent), "expected {sent:?} in {line}");
    // Then the duration and the upstream service time, which took part of it.
    let times: Vec<u64> = line
        .split_once(&sent)
        .unwrap()
        .1
        .split(' ')
        .take(2)
        .map(|t| t.parse().unwrap_or_else(|_| panic!("{t:?} in {line}")))
        .collect();
    assert!(
        times[1] <= times[0],
        "upstream time above the total: {line}"
    );
    // The route that took it: no VirtualService, so Istio's `default`.
    assert!(line.ends_with(" default"), "{line}");
    assert!(line.contains("\"telemetry-test/1.0\""), "{line}");
    assert!(line.contains("\"productpage:9080\""), "{line}");
    assert!(
        line.contains("outbound|9080||productpage.default.svc.cluster.local"),
        "{line}"
    );
    // productpage's sidecar logs it as served, and so do the hops after it.
    let served = logged(
        &mesh,
        "productpage-v1",
        &["\"trace-me-1\"", "inbound|9080||"],
    )
    .await;
    assert!(served.contains(" 200 - via_upstream "), "{served}");
    assert!(served.ends_with(" default"), "{served}");

    // Errors only on productpage's serving side: a 200 is no longer logged
    // there, a 404 is; the client side still logs everything.
    mesh.write_config("productpage-telemetry.yaml", PRODUCTPAGE_ERRORS_ONLY);
    mesh.wait_telemetry("productpage-v1", "response.code >= 400")
        .await;
    let ok = http
        .get("http://productpage:9080/productpage")
        .header("x-request-id", "fine-2")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let missing = http
        .get("http://productpage:9080/no-such-page")
        .header("x-request-id", "missing-3")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let line = logged(&mesh, "productpage-v1", &["\"missing-3\""]).await;
    assert!(
        line.contains("\"GET /no-such-page HTTP/1.1\" 404 "),
        "{line}"
    );
    logged(&mesh, "client", &["\"fine-2\""]).await;
    assert!(
        !access_log(&mesh, "productpage-v1").contains("fine-2"),
        "a 200 was logged under the errors-only filter"
    );
    mesh.stop().await;
}

/// Taps `workload` until `want` events arrived; sends requests meanwhile.
async fn tap_while(
    mesh: &Mesh,
    workload: &str,
    opts: meshctl::tap::Options,
    want: usize,
    send: impl std::future::Future<Output = ()> + Send + 'static,
) -> Vec<serde_json::Value> {
    let admin = std::net::SocketAddr::new(mesh.workload(workload).address, 15000);
    let mut events = Vec::new();
    let reader = meshctl::tap::stream(admin, &opts, |e| {
        events.push(e);
        events.len() < want
    });
    let sender = tokio::spawn(async move {
        // The tap must be listening before the traffic it should see.
        tokio::time::sleep(Duration::from_millis(300)).await;
        send.await;
    });
    tokio::time::timeout(Duration::from_secs(20), reader)
        .await
        .expect("tap saw the requests in time")
        .unwrap();
    sender.await.unwrap();
    events
}

#[tokio::test(flavor = "multi_thread")]
async fn tap_streams_live_requests_with_sensitive_headers_redacted() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    let send = |http: reqwest::Client| async move {
        for i in 0..3 {
            let resp = http
                .get(format!("http://productpage:9080/productpage?i={i}"))
                .header("authorization", "Bearer s3cret")
                .header("x-request-id", format!("tap-{i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 200);
        }
    };
    let opts = meshctl::tap::Options {
        path: Some("/productpage".into()),
        ..Default::default()
    };
    let events = tap_while(&mesh, "productpage-v1", opts, 3, send(http.clone())).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["direction"], "inbound", "{e}");
        assert_eq!(e["method"], "GET");
        assert_eq!(e["authority"], "productpage:9080");
        assert_eq!(e["path"], format!("/productpage?i={i}"));
        assert_eq!(e["status"], 200);
        assert!(e["latency_ms"].as_f64().unwrap() > 0.0);
        assert_eq!(e["source"], mesh.identity_of("client").to_string());
        assert_eq!(
            e["destination"],
            mesh.identity_of("productpage-v1").to_string()
        );
        assert_eq!(e["request_headers"]["authorization"], "[redacted]");
        assert_eq!(e["request_headers"]["x-request-id"], format!("tap-{i}"));
    }
    // Asked for, the sensitive header is shown; the client side's view
    // carries the outbound direction.
    let opts = meshctl::tap::Options {
        show_sensitive: true,
        ..Default::default()
    };
    let events = tap_while(&mesh, "client", opts, 1, send(http.clone())).await;
    assert_eq!(events[0]["direction"], "outbound");
    assert_eq!(
        events[0]["request_headers"]["authorization"],
        "Bearer s3cret"
    );
    assert_eq!(
        events[0]["upstream"].as_str().map(|u| u.ends_with(":9080")),
        Some(true)
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tap_that_stops_reading_never_holds_requests_back() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    // A reader that asks for the tap, reads the answer's head, then stops
    // reading (with a small receive buffer, so the kernel holds little).
    let admin = std::net::SocketAddr::new(mesh.workload("details-v1").address, 15000);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(admin).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stalled
        .write_all(b"GET /tap HTTP/1.1\r\nhost: details\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stalled.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Far more requests than the tap keeps for a reader (1,024), each
    // event 4 KiB larger than the kernel's and hyper's buffers absorb:
    // every request is answered; the reader's backlog overflows instead.
    let padding = std::sync::Arc::new("p".repeat(4096));
    let n = 4000;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..8 {
        let http = http.clone();
        let padding = padding.clone();
        tasks.spawn(async move {
            for i in 0..n / 8 {
                let r = http
                    .get(format!("http://details:9080/details/{}", c * 1000 + i))
                    .header("x-padding", padding.as_str())
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    eprintln!(
        "{n} requests with a stalled tap reader: {:?}",
        started.elapsed()
    );
    // Reading now, the tap says how much it missed; the sidecar counted it.
    let mut buf = vec![0u8; 1 << 20];
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains("\"dropped\"") {
        let read = tokio::time::timeout(Duration::from_secs(5), stalled.read(&mut buf)).await;
        let Ok(Ok(k)) = read else { break };
        seen.push_str(&String::from_utf8_lossy(&buf[..k]));
        assert!(Instant::now() < deadline);
    }
    assert!(
        seen.contains("\"dropped\""),
        "the tap never said it fell behind: {} events read, {} bytes",
        seen.matches("\"direction\"").count(),
        seen.len()
    );
    let stats = mesh.stats("details-v1").await;
    let dropped: f64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("mesh_proxy_tap_events_dropped_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(dropped > 0.0, "{stats}");
    mesh.stop().await;
}

/// The value of the first Prometheus sample named exactly `series` (name and labels).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread")]
async fn the_control_plane_reports_pushes_convergence_and_certificates_on_15014() {
    let mesh = Mesh::start().await;
    mesh.wait_all_proxies_synced(Duration::from_secs(10)).await;
    let url = format!("http://{}/metrics", mesh.cp.pilot_debug_addr);
    let metrics = || async { reqwest::get(&url).await.unwrap().text().await.unwrap() };
    let before = metrics().await;
    let proxies = mesh.specs.len() as f64;
    assert_eq!(sample(&before, "pilot_xds"), Some(proxies), "{before}");
    for t in ["cds", "eds", "lds", "rds"] {
        let pushes = sample(&before, &format!("pilot_xds_pushes_total{{type=\"{t}\"}}"));
        assert!(pushes >= Some(proxies), "{t}: {pushes:?}\n{before}");
    }
    let issued = sample(&before, "citadel_server_success_cert_issuance_total").unwrap();
    assert!(
        issued >= proxies + 1.0,
        "every sidecar and pilot got a certificate: {before}"
    );
    assert!(sample(&before, "citadel_server_csr_sign_seconds_count").unwrap() >= issued);
    assert!(
        before.contains("citadel_server_root_cert_expiry_timestamp "),
        "{before}"
    );
    assert_eq!(before.matches("# EOF").count(), 1, "one exposition");

    // A config change reaches every proxy: each one's convergence is timed.
    let converged = sample(&before, "pilot_proxy_convergence_time_count").unwrap_or(0.0);
    mesh.apply(
        "reviews-routing.yaml",
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: all-to-v1
    route:
    - destination: {host: reviews, subset: v1}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
",
        "productpage-v1",
        "all-to-v1",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let after = metrics().await;
        let now = sample(&after, "pilot_proxy_convergence_time_count").unwrap_or(0.0);
        if now >= converged + 1.0 {
            assert_eq!(
                sample(&after, "mesh_pilot_config_loads_total{result=\"rejected\"}"),
                None,
                "{after}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no convergence timed:\n{after}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_sidecars_and_promql_sees_the_traffic() {
    let Some(bin) = meshctl::prometheus::find() else {
        eprintln!("SKIPPED: needs Debian's prometheus (apt-get install prometheus)");
        return;
    };
    let mesh = Mesh::start().await;
    let dir = mesh.state_dir();
    let config = dir.join("prometheus.yml");
    let scrape = meshctl::prometheus::scrape_config(
        &mesh.specs,
        mesh.cp.pilot_debug_addr,
        Duration::from_secs(1),
    );
    std::fs::write(&config, scrape).unwrap();
    // Prometheus on the mesh's own loopback block, on a port free there.
    let ip = mesh.cp.pilot_debug_addr.ip();
    let port = std::net::TcpListener::bind((ip, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let prom = meshctl::prometheus::Prometheus::start(
        &bin,
        &config,
        &dir.join("prometheus-data"),
        std::net::SocketAddr::new(ip, port),
        &dir.join("prometheus.log"),
    )
    .await
    .unwrap();
    let http = mesh.client();
    let n = 20;
    for _ in 0..n {
        mesh.request(&http).await.unwrap();
    }
    // Every productpage request was counted once by productpage's sidecar.
    let deadline = Instant::now() + Duration::from_secs(30);
    let total = "sum(istio_requests_total{reporter=\"destination\",destination_workload=\"productpage-v1\",response_code=\"200\"})";
    loop {
        let r = prom.query(total).await.unwrap();
        let v: Option<f64> = r.first().and_then(|s| s["value"][1].as_str()?.parse().ok());
        if v == Some(n as f64) {
            break;
        }
        assert!(Instant::now() < deadline, "{total} = {v:?}, expected {n}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The query from Istio's dashboards: a rate per destination and code,
    // for every hop of the bookinfo chain, while traffic flows.
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let traffic = {
        let http = http.clone();
        let client = mesh.identity_of("client").to_string();
        tokio::spawn(async move {
            loop {
                meshctl::traffic::one(&http, &client).await.unwrap();
                tokio::select! {
                    _ = &mut stopped => return,
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
            }
        })
    };
    let rate = "sum by (destination_workload, response_code) (rate(istio_requests_total{reporter=\"destination\"}[1m]))";
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = prom.query(rate).await.unwrap();
        let seen: Vec<String> = r
            .iter()
            .filter(|s| {
                s["metric"]["response_code"] == "200"
                    && s["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()) > Some(0.0)
            })
            .filter_map(|s| {
                s["metric"]["destination_workload"]
                    .as_str()
                    .map(str::to_string)
            })
            .collect();
        if seen.iter().any(|w| w == "productpage-v1")
            && seen.iter().any(|w| w.starts_with("reviews-"))
            && seen.iter().any(|w| w == "details-v1")
        {
            assert!(
                r.iter().all(|s| s["metric"]["response_code"] == "200"),
                "{r:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{rate} gave {r:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Latency histograms work with histogram_quantile; pilot is scraped too.
    let p90 = "histogram_quantile(0.9, sum by (le) (rate(istio_request_duration_milliseconds_bucket{reporter=\"source\",destination_workload=\"productpage-v1\"}[1m])))";
    // (The client's sidecar may have been scraped once so far: wait for two.)
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = prom.query(p90).await.unwrap();
        let v = r
            .first()
            .and_then(|s| s["value"][1].as_str()?.parse::<f64>().ok());
        if let Some(v) = v.filter(|v| v.is_finite()) {
            assert!(v > 0.0 && v < 10_000.0, "p90 {v} ms");
            break;
        }
        assert!(Instant::now() < deadline, "{p90} gave {r:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let _ = stop.send(());
    traffic.await.unwrap();
    // The apps' own metrics arrive merged with their sidecars' (agent port).
    let app = "sum(bookinfo_requests_total{job=\"kubernetes-pods\",service=\"productpage\"})";
    let r = prom.query(app).await.unwrap();
    let v: Option<f64> = r.first().and_then(|s| s["value"][1].as_str()?.parse().ok());
    assert!(v >= Some(n as f64), "{app} gave {r:?}");
    let r = prom.query("pilot_xds{job=\"pilot\"}").await.unwrap();
    assert_eq!(
        r[0]["value"][1].as_str(),
        Some(mesh.specs.len().to_string().as_str())
    );
    prom.stop().await;
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_switches_metrics_off_on_one_side() {
    let mesh = Mesh::start().await;
    mesh.write_config(
        "metrics-off.yaml",
        "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: quiet-client, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  metrics:
  - providers: [{name: prometheus}]
    overrides: [{match: {metric: ALL_METRICS, mode: CLIENT}, disabled: true}]
",
    );
    mesh.wait_telemetry("productpage-v1", "\"client_metrics_off\":true")
        .await;
    let http = mesh.client();
    for _ in 0..3 {
        mesh.request(&http).await.unwrap();
    }
    let count = |stats: &str, reporter: &str| {
        metric_sum(
            stats,
            "istio_requests_total",
            &[&format!("reporter=\"{reporter}\"")],
        )
    };
    let pp = mesh.stats("productpage-v1").await;
    assert_eq!(count(&pp, "source"), 0.0, "the calling side is off:\n{pp}");
    assert!(
        count(&pp, "destination") >= 3.0,
        "the called side is on:\n{pp}"
    );
    // Its callees still count what productpage sent them.
    let details = mesh.stats("details-v1").await;
    assert!(count(&details, "destination") >= 3.0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_agent_port_serves_the_apps_metrics_merged_with_the_proxys() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    for _ in 0..3 {
        mesh.request(&http).await.unwrap();
    }
    let merged = |w: &str| {
        let url = format!("http://{}:15020/stats/prometheus", mesh.workload(w).address);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let text = merged("productpage-v1").await;
    assert!(
        metric_sum(
            &text,
            "bookinfo_requests_total",
            &["service=\"productpage\""]
        ) >= 3.0,
        "the app's own:\n{text}"
    );
    assert!(
        metric_sum(&text, "istio_requests_total", &["reporter=\"destination\""]) >= 3.0,
        "the proxy's:\n{text}"
    );
    assert_eq!(text.matches("# EOF").count(), 1, "one end marker:\n{text}");
    assert!(text.trim_end().ends_with("# EOF"));
    // The client workload has no app: the proxy's metrics alone, and no failure counted.
    let text = merged("client").await;
    assert!(text.contains("istio_requests_total"));
    assert_eq!(
        metric_sum(&text, "istio_agent_scrape_failures_total", &[]),
        0.0
    );
    mesh.stop().await;
}
