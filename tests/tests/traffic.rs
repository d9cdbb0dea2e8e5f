//! Traffic management end to end, following Istio's task guides (request
//! routing, traffic shifting, fault injection, timeouts, retries, mirroring)
//! on the bookinfo mesh: the config is Istio's YAML, the user is an HTTP
//! client behind the `client` workload's sidecar.

use std::time::{Duration, Instant};

use mesh_tests::Mesh;
use serde_json::Value;

const SUBSETS: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-subsets, namespace: default}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
---
";

/// A client through `client`'s sidecar that does not follow redirects.
fn client(mesh: &Mesh) -> reqwest::Client {
    let proxy = format!("http://{}", mesh.workload("client").outbound());
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(proxy).unwrap())
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

async fn get(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut req = http.get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The version of the first hop in a sample app's answer.
fn version(body: &str) -> String {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("not JSON: {body}"));
    v["hops"][0]["version"].as_str().unwrap_or("?").to_string()
}

use mesh_tests::metric_sum as counter;

#[tokio::test(flavor = "multi_thread")]
async fn routes_by_end_user_header_and_shifts_traffic_by_weight() {
    let mesh = Mesh::start().await;
    let vs = format!(
        "{SUBSETS}
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: jason-to-v2
    match:
    - headers:
        end-user: {{exact: jason}}
    route:
    - destination: {{host: reviews, subset: v2}}
  - name: half-v1-half-v3
    route:
    - destination: {{host: reviews, subset: v1}}
      weight: 50
    - destination: {{host: reviews, subset: v3}}
      weight: 50
"
    );
    mesh.apply("reviews-routing.yaml", &vs, "client", "half-v1-half-v3")
        .await;
    let http = client(&mesh);
    for _ in 0..20 {
        let (code, body) = get(
            &http,
            "http://reviews:9080/delay/0",
            &[("end-user", "jason")],
        )
        .await;
        assert_eq!(code, 200, "{body}");
        assert_eq!(version(&body), "v2", "jason always sees v2");
    }
    let mut v1 = 0;
    for _ in 0..1000 {
        let (code, body) = get(&http, "http://reviews:9080/delay/0", &[]).await;
        assert_eq!(code, 200, "{body}");
        match version(&body).as_str() {
            "v1" => v1 += 1,
            "v3" => {}
            other => panic!("{other} is in neither half of the split"),
        }
    }
    // 50/50 over 1,000 requests: the standard deviation is about 16.
    assert!((430..=570).contains(&v1), "{v1} of 1000 went to v1");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn injects_a_delay_and_an_abort_for_one_user_and_aborts_by_percentage() {
    let mesh = Mesh::start().await;
    let vs = "
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - name: jason-delayed
    match:
    - headers:
        end-user: {exact: jason}
    fault:
      delay:
        percentage: {value: 100.0}
        fixedDelay: 7s
    route:
    - destination: {host: ratings}
  - name: ann-aborted
    match:
    - headers:
        end-user: {exact: ann}
    fault:
      abort:
        percentage: {value: 100.0}
        httpStatus: 500
    route:
    - destination: {host: ratings}
  - name: half-aborted
    match:
    - headers:
        x-test: {exact: half}
    fault:
      abort:
        percentage: {value: 50}
        httpStatus: 503
    route:
    - destination: {host: ratings}
  - name: everyone-else
    route:
    - destination: {host: ratings}
";
    mesh.apply("ratings-faults.yaml", vs, "client", "everyone-else")
        .await;
    let http = client(&mesh);
    let url = "http://ratings:9080/ratings/0";

    let start = Instant::now();
    let (code, body) = get(&http, url, &[]).await;
    assert_eq!(code, 200, "{body}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "others are not delayed"
    );

    let start = Instant::now();
    let (code, _) = get(&http, url, &[("end-user", "jason")]).await;
    let took = start.elapsed();
    assert_eq!(code, 200);
    assert!(
        took >= Duration::from_secs(7) && took < Duration::from_secs(10),
        "jason's request took {took:?}"
    );

    let (code, body) = get(&http, url, &[("end-user", "ann")]).await;
    assert_eq!((code, body.trim()), (500, "fault filter abort"));

    let mut aborted = 0;
    for _ in 0..1000 {
        match get(&http, url, &[("x-test", "half")]).await.0 {
            503 => aborted += 1,
            200 => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        (430..=570).contains(&aborted),
        "{aborted} of 1000 aborted at 50 %"
    );

    // The client's sidecar recorded why, as Istio's response flags.
    let stats = mesh.stats("client").await;
    let with = |flag: &str, code: &str| {
        counter(
            &stats,
            "istio_requests_total",
            &[
                "reporter=\"source\"",
                &format!("response_flags=\"{flag}\""),
                &format!("response_code=\"{code}\""),
            ],
        )
    };
    assert_eq!(with("DI", "200"), 1.0, "{stats}");
    assert_eq!(with("FI", "500"), 1.0);
    assert_eq!(with("FI", "503"), aborted as f64);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn times_out_slow_upstreams_and_retries_failed_attempts() {
    let mesh = Mesh::start().await;
    let vs = format!(
        "{SUBSETS}
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: half-second-timeout
    match: [{{uri: {{prefix: /delay/}}}}]
    timeout: 0.5s
    route:
    - destination: {{host: reviews, subset: v1}}
  - name: three-retries
    match: [{{uri: {{prefix: /flaky/}}}}]
    retries: {{attempts: 3, retryOn: 5xx, perTryTimeout: 2s}}
    route:
    - destination: {{host: reviews, subset: v1}}
  - name: no-retries
    match: [{{uri: {{prefix: /once/}}}}]
    rewrite: {{uri: /flaky/}}
    retries: {{attempts: 0}}
    route:
    - destination: {{host: reviews, subset: v1}}
  - name: istio-default-retries
    match: [{{uri: {{prefix: /default/}}}}]
    rewrite: {{uri: /flaky/}}
    route:
    - destination: {{host: reviews, subset: v1}}
"
    );
    mesh.apply(
        "reviews-routing.yaml",
        &vs,
        "client",
        "istio-default-retries",
    )
    .await;
    let http = client(&mesh);

    let start = Instant::now();
    let (code, body) = get(&http, "http://reviews:9080/delay/2000", &[]).await;
    let took = start.elapsed();
    assert_eq!((code, body.trim()), (504, "upstream request timeout"));
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1500),
        "the timeout fired after {took:?}"
    );
    let (code, _) = get(&http, "http://reviews:9080/delay/100", &[]).await;
    assert_eq!(code, 200, "a fast answer is within the timeout");

    // Fails twice, answers on the third attempt: the user sees only the success.
    let (code, body) = get(&http, "http://reviews:9080/flaky/2/a", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["calls"], 3);
    // No retries: the first 503 is the answer.
    let (code, body) = get(&http, "http://reviews:9080/once/1/b", &[]).await;
    assert_eq!(code, 503, "{body}");
    // Istio's default policy retries a 503 (twice at most).
    let (code, body) = get(&http, "http://reviews:9080/default/1/c", &[]).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["calls"], 2);
    let (code, _) = get(&http, "http://reviews:9080/default/5/d", &[]).await;
    assert_eq!(code, 503, "three attempts, all failing");

    let stats = mesh.stats("client").await;
    let flags = |flag: &str| {
        counter(
            &stats,
            "istio_requests_total",
            &[&format!("response_flags=\"{flag}\"")],
        )
    };
    assert_eq!(flags("UT"), 1.0, "{stats}");
    assert_eq!(flags("URX"), 1.0, "retries exhausted on the last one");
    assert_eq!(counter(&stats, "mesh_retries_total", &[]), 2.0 + 1.0 + 2.0);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_retry_budget_keeps_retries_from_multiplying_an_outage() {
    let mesh = Mesh::start().await;
    let vs = format!(
        "{SUBSETS}
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: five-retries
    retries: {{attempts: 5, retryOn: 5xx}}
    route:
    - destination: {{host: reviews, subset: v1}}
"
    );
    mesh.apply("reviews-routing.yaml", &vs, "client", "five-retries")
        .await;
    let http = client(&mesh);
    let requests = 300;
    for _ in 0..requests {
        let (code, _) = get(&http, "http://reviews:9080/status/503", &[]).await;
        assert_eq!(code, 503);
    }
    let stats = mesh.stats("client").await;
    let retries = counter(&stats, "mesh_retries_total", &[]);
    let refused = counter(&stats, "mesh_retries_over_budget_total", &[]);
    // Budget: 20 % of requests plus 10 a second over a 10 s window. The
    // run may straddle two windows' worth of the floor at most.
    let cap = 0.2 * requests as f64 + 200.0;
    assert!(
        retries <= cap,
        "{retries} retries for {requests} requests (cap {cap})"
    );
    assert!(
        retries >= 100.0,
        "the floor of 10/s still allowed retries: {retries}"
    );
    assert!(
        refused >= 200.0,
        "budget refused only {refused} requests' retries"
    );
    // What reviews saw: well short of the 6x a bare attempts: 5 would send.
    let upstream = counter(
        &mesh.stats("reviews-v1").await,
        "istio_requests_total",
        &["reporter=\"destination\"", "response_code=\"503\""],
    );
    assert!(
        upstream <= requests as f64 + cap,
        "reviews-v1 got {upstream} requests for {requests}"
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mirrors_rewrites_edits_headers_redirects_and_answers_directly() {
    let mesh = Mesh::start().await;
    let vs = format!(
        r#"{SUBSETS}
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: moved
    match: [{{uri: {{prefix: /moved}}}}]
    redirect: {{uri: /new, redirectCode: 302}}
  - name: teapot
    match: [{{uri: {{exact: /teapot}}, method: {{exact: GET}}}}]
    directResponse:
      status: 418
      body: {{string: "short and stout"}}
  - name: debug-to-v3
    match:
    - uri: {{regex: "/echo[0-9]*"}}
      queryParams: {{debug: {{exact: "1"}}}}
    route:
    - destination: {{host: reviews, subset: v3}}
  - name: rewritten
    match: [{{uri: {{prefix: /OLD/}}, ignoreUriCase: true}}]
    rewrite: {{uri: /echo}}
    headers:
      request:
        set: {{x-added: "yes"}}
        remove: [x-drop]
      response:
        set: {{x-route: rewritten}}
    route:
    - destination: {{host: reviews, subset: v1}}
  - name: mirrored
    route:
    - destination: {{host: reviews, subset: v1}}
    mirror: {{host: reviews, subset: v2}}
    mirrorPercentage: {{value: 100.0}}
"#
    );
    mesh.apply("reviews-routing.yaml", &vs, "client", "mirrored")
        .await;
    let http = client(&mesh);

    let resp = http
        .get("http://reviews:9080/moved/x?a=1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 302);
    assert_eq!(resp.headers()["location"], "http://reviews:9080/new?a=1");

    let (code, body) = get(&http, "http://reviews:9080/teapot", &[]).await;
    assert_eq!((code, body.as_str()), (418, "short and stout"));

    let (code, body) = get(&http, "http://reviews:9080/echo?debug=1", &[]).await;
    assert_eq!((code, version(&body)), (200, "v3".to_string()), "{body}");
    let (_, body) = get(&http, "http://reviews:9080/echo?debug=10", &[]).await;
    assert_eq!(version(&body), "v1", "debug=10 is not debug=1");

    let resp = http
        .get("http://reviews:9080/old/?q=2")
        .header("x-drop", "secret")
        .header("x-forwarded-for", "203.0.113.9")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.headers()["x-route"], "rewritten");
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/echo?q=2", "{echo}");
    assert_eq!(echo["headers"]["x-added"], "yes");
    assert!(echo["headers"].get("x-drop").is_none(), "{echo}");
    // The caller's x-forwarded-for is kept and the calling sidecar's address
    // appended; the protocol is the one the client spoke.
    let xff = echo["headers"]["x-forwarded-for"].as_str().unwrap_or("");
    let appended = xff.strip_prefix("203.0.113.9, ").unwrap_or_default();
    assert!(appended.parse::<std::net::IpAddr>().is_ok(), "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "http", "{echo}");

    // Mirrored to v2 while v1 answers.
    for _ in 0..30 {
        let (code, body) = get(&http, "http://reviews:9080/delay/0", &[]).await;
        assert_eq!((code, version(&body)), (200, "v1".to_string()));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let seen = counter(
            &mesh.stats("reviews-v2").await,
            "istio_requests_total",
            &["reporter=\"destination\"", "source_workload=\"client\""],
        );
        if seen >= 30.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "v2 saw {seen} of 30 mirrored requests"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

/// Istio's circuit-breaking task's rule: one request in flight to reviews
/// v1 and one waiting, each on a connection of its own.
const BREAKER: &str = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 1}
      http: {http1MaxPendingRequests: 1, maxRequestsPerConnection: 1}
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: breaker
    route:
    - destination: {host: reviews, subset: v1}
";

#[tokio::test(flavor = "multi_thread")]
async fn a_burst_trips_the_circuit_breaker() {
    let mesh = Mesh::start().await;
    // Istio's circuit-breaking task: one connection, one pending request.
    mesh.apply("reviews-routing.yaml", BREAKER, "client", "breaker")
        .await;
    let http = client(&mesh);
    let burst: Vec<_> = (0..20)
        .map(|_| {
            let http = http.clone();
            tokio::spawn(async move { get(&http, "http://reviews:9080/delay/300", &[]).await })
        })
        .collect();
    let mut codes = Vec::new();
    for b in burst {
        codes.push(b.await.unwrap());
    }
    let ok = codes.iter().filter(|(c, _)| *c == 200).count();
    let overflow: Vec<_> = codes.iter().filter(|(c, _)| *c == 503).collect();
    assert!(
        ok >= 2,
        "the active and the pending request are served: {codes:?}"
    );
    assert!(overflow.len() >= 10, "{codes:?}");
    assert!(overflow[0].1.contains("overflow"), "{}", overflow[0].1);
    let stats = mesh.stats("client").await;
    assert_eq!(
        counter(&stats, "istio_requests_total", &["response_flags=\"UO\""]),
        overflow.len() as f64
    );
    // Once the burst is over, requests flow again.
    assert_eq!(get(&http, "http://reviews:9080/delay/0", &[]).await.0, 200);
    mesh.stop().await;
}

/// Istio's circuit-breaking task with a real load generator: h2load's ten
/// concurrent clients against a destination allowed one request in flight
/// and one waiting. Most are turned away at once (503, flag UO), the rest
/// served; nothing else happens to them.
#[tokio::test(flavor = "multi_thread")]
async fn h2load_concurrency_trips_the_circuit_breaker() {
    if std::process::Command::new("h2load")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: h2load is not installed (Debian's nghttp2-client; CI installs it)");
        return;
    }
    let mesh = Mesh::start().await;
    mesh.apply("reviews-routing.yaml", BREAKER, "client", "breaker")
        .await;
    let url = format!("http://{}/delay/200", mesh.workload("client").outbound());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("h2load")
            .args([
                "--h1",
                "-n",
                "40",
                "-c",
                "10",
                "-H",
                ":authority: reviews:9080",
                &url,
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    // "status codes: 4 2xx, 0 3xx, 0 4xx, 36 5xx"
    let codes: Vec<u64> = report
        .lines()
        .find_map(|l| l.strip_prefix("status codes: "))
        .unwrap_or_else(|| panic!("no status codes in h2load's report:\n{report}"))
        .split(", ")
        .map(|c| c.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    let (ok, turned_away) = (codes[0], codes[3]);
    assert_eq!(ok + turned_away, 40, "{report}");
    assert!(
        ok >= 2,
        "the request in flight and the one waiting are served:\n{report}"
    );
    assert!(
        turned_away >= 20,
        "ten at once against a limit of two:\n{report}"
    );
    let stats = mesh.stats("client").await;
    assert_eq!(
        counter(&stats, "istio_requests_total", &["response_flags=\"UO\""]),
        turned_away as f64
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failing_endpoint_is_ejected_and_comes_back() {
    let mesh = Mesh::start().await;
    let config = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection:
      consecutive5xxErrors: 2
      interval: 1s
      baseEjectionTime: 2s
      maxEjectionPercent: 50
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: all-versions-no-retries
    retries: {attempts: 0}
    route:
    - destination: {host: reviews}
";
    mesh.apply(
        "reviews-routing.yaml",
        config,
        "client",
        "all-versions-no-retries",
    )
    .await;
    let http = client(&mesh);
    let mut failed = 0;
    for _ in 0..30 {
        if get(&http, "http://reviews:9080/fail-on/v2", &[]).await.0 == 503 {
            failed += 1;
        }
    }
    assert_eq!(failed, 2, "v2 is ejected after two consecutive 5xx");
    let ejected_at = Instant::now();
    for _ in 0..10 {
        let (_, body) = get(&http, "http://reviews:9080/delay/0", &[]).await;
        assert_ne!(version(&body), "v2", "v2 is out while ejected");
    }
    // Back after the ejection time.
    tokio::time::sleep(Duration::from_secs(2).saturating_sub(ejected_at.elapsed())).await;
    let mut back = false;
    for _ in 0..10 {
        let (_, body) = get(&http, "http://reviews:9080/delay/0", &[]).await;
        back |= version(&body) == "v2";
    }
    assert!(back, "v2 serves again after its ejection");
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn consistent_hashing_keeps_a_user_on_one_endpoint() {
    let mesh = Mesh::start().await;
    let config = "
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpHeaderName: x-user}
  subsets:
  - name: by-cookie
    labels: {app: reviews}
    trafficPolicy:
      loadBalancer:
        consistentHash:
          httpCookie: {name: session, ttl: 60s, path: /}
          maglev: {}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: default}
spec:
  hosts: [reviews]
  http:
  - name: cookie-sticky
    match: [{uri: {prefix: /cookie/}}]
    rewrite: {uri: /delay/}
    route:
    - destination: {host: reviews, subset: by-cookie}
  - name: header-sticky
    route:
    - destination: {host: reviews}
";
    mesh.apply("reviews-routing.yaml", config, "client", "header-sticky")
        .await;
    let http = client(&mesh);
    let mut seen = std::collections::BTreeSet::new();
    for user in [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
    ] {
        let first = version(
            &get(&http, "http://reviews:9080/delay/0", &[("x-user", user)])
                .await
                .1,
        );
        for _ in 0..10 {
            let (_, body) = get(&http, "http://reviews:9080/delay/0", &[("x-user", user)]).await;
            assert_eq!(version(&body), first, "{user} moved");
        }
        seen.insert(first);
    }
    assert!(seen.len() >= 2, "eight users all hashed to {seen:?}");

    // Without the cookie the sidecar sets one; with it the client sticks.
    let resp = http
        .get("http://reviews:9080/cookie/0")
        .send()
        .await
        .unwrap();
    let cookie = resp.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        cookie.starts_with("session=") && cookie.contains("Max-Age=60"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    let first = version(&resp.text().await.unwrap());
    for _ in 0..10 {
        let (_, body) = get(&http, "http://reviews:9080/cookie/0", &[("cookie", &pair)]).await;
        assert_eq!(version(&body), first);
    }
    mesh.stop().await;
}

/// WebSockets through the sidecars, as Istio carries them: the handshake
/// is routed like any request (here by the `end-user` header), travels
/// between the sidecars as HTTP/2 extended CONNECT over mutual TLS, and
/// once the app switches, messages flow both ways on the one connection.
#[tokio::test(flavor = "multi_thread")]
async fn websockets_are_routed_and_carried_both_ways() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let mesh = Mesh::start().await;
    let vs = format!(
        "{SUBSETS}
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: jason-to-v2
    match: [{{headers: {{end-user: {{exact: jason}}}}}}]
    route: [{{destination: {{host: reviews, subset: v2}}}}]
  - name: everyone-else-to-v1
    route: [{{destination: {{host: reviews, subset: v1}}}}]
"
    );
    mesh.apply("reviews-routing.yaml", &vs, "client", "everyone-else-to-v1")
        .await;
    let outbound = mesh.workload("client").outbound();
    for (user, version) in [("jason", "v2"), ("someone", "v1")] {
        let mut req = "ws://reviews:9080/ws".into_client_request().unwrap();
        req.headers_mut().insert("end-user", user.parse().unwrap());
        // The app talks to its sidecar, as an HTTP proxy, in plain HTTP/1.1.
        let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let (mut ws, resp) = tokio_tungstenite::client_async(req, tcp)
            .await
            .unwrap_or_else(|e| panic!("WebSocket handshake as {user}: {e}"));
        assert_eq!(resp.status().as_u16(), 101);
        for i in 0..3 {
            ws.send(Message::text(format!("hello {i}"))).await.unwrap();
            let answer = tokio::time::timeout(Duration::from_secs(5), ws.next())
                .await
                .expect("no answer within 5 s")
                .expect("the WebSocket closed")
                .unwrap();
            assert_eq!(
                answer.into_text().unwrap().as_str(),
                format!("reviews {version}: hello {i}")
            );
        }
        ws.close(None).await.unwrap();
    }
    // A handshake the route answers itself never switches.
    let mut req = "ws://reviews:9080/nowhere".into_client_request().unwrap();
    req.headers_mut()
        .insert("end-user", "jason".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(outbound).await.unwrap();
    let refused = tokio_tungstenite::client_async(req, tcp).await;
    assert!(refused.is_err(), "switched on a page that is no WebSocket");
    mesh.stop().await;
}

/// HTTP/2 frames in `bytes`: (type, payload).
fn frames(mut bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        if bytes.len() < 9 {
            return None;
        }
        let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
        let kind = bytes[3];
        let payload = bytes.get(9..9 + len)?;
        bytes = &bytes[9 + len..];
        Some((kind, payload))
    })
}

/// Sends `bytes` on a fresh connection to `addr` and returns what comes
/// back until the peer closes or goes quiet for a second.
async fn raw_exchange(addr: std::net::SocketAddr, bytes: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    // The peer may answer and close before it reads everything.
    let _ = tcp.write_all(bytes).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

/// Malformed HTTP from an app gets the status HTTP says (or, for HTTP/2,
/// a GOAWAY) and never takes the sidecar down: it serves the next request.
#[tokio::test(flavor = "multi_thread")]
async fn malformed_http_is_answered_and_the_sidecar_keeps_serving() {
    let mesh = Mesh::start().await;
    let outbound = mesh.workload("client").outbound();
    let status = |answer: &[u8]| {
        String::from_utf8_lossy(answer)
            .lines()
            .next()
            .unwrap_or_default()
            .to_string()
    };

    // Header section far beyond any limit.
    let big = format!(
        "GET http://reviews:9080/health HTTP/1.1\r\nHost: reviews:9080\r\nx-big: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    let answer = raw_exchange(outbound, big.as_bytes()).await;
    assert_eq!(
        status(&answer),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    // Too many header fields.
    let many: String = (0..200).map(|i| format!("x-h{i}: v\r\n")).collect();
    let req =
        format!("GET http://reviews:9080/health HTTP/1.1\r\nHost: reviews:9080\r\n{many}\r\n");
    let answer = raw_exchange(outbound, req.as_bytes()).await;
    assert_eq!(
        status(&answer),
        "HTTP/1.1 431 Request Header Fields Too Large"
    );

    // A chunked body whose chunk size is not hex: the client's fault,
    // answered 400 and flagged DPE, not blamed on the upstream.
    let req = "POST http://reviews:9080/echo HTTP/1.1\r\nHost: reviews:9080\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    let answer = raw_exchange(outbound, req.as_bytes()).await;
    assert_eq!(status(&answer), "HTTP/1.1 400 Bad Request");

    // Two different Content-Lengths.
    let req = "POST http://reviews:9080/echo HTTP/1.1\r\nHost: reviews:9080\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello";
    let answer = raw_exchange(outbound, req.as_bytes()).await;
    assert_eq!(status(&answer), "HTTP/1.1 400 Bad Request");

    // A request line that is not HTTP.
    let answer = raw_exchange(outbound, b"GET /\x01\x02 HTTP/9.9\r\n\r\n").await;
    assert_eq!(status(&answer), "HTTP/1.1 400 Bad Request");

    // HTTP/2 (prior knowledge): a SETTINGS frame 5 bytes long, which
    // must be a multiple of 6: a connection error, answered with GOAWAY.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 5, 0x4, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5]);
    let answer = raw_exchange(outbound, &h2).await;
    let goaway = frames(&answer).find(|(kind, _)| *kind == 0x7);
    let code = goaway.map(|(_, p)| u32::from_be_bytes(p[4..8].try_into().unwrap()));
    assert!(
        code.is_some_and(|c| c != 0),
        "no GOAWAY with an error: {answer:?}"
    );

    // Still serving, and the malformed body was counted as the client's.
    let (code, body) = get(&client(&mesh), "http://reviews:9080/health", &[]).await;
    assert_eq!(code, 200, "{body}");
    let dpe = counter(
        &mesh.stats("client").await,
        "istio_requests_total",
        &["response_flags=\"DPE\"", "response_code=\"400\""],
    );
    assert_eq!(dpe, 1.0);
    mesh.stop().await;
}

/// A DestinationRule's connectionPool shapes the connections between the
/// sidecars: `maxRequestsPerConnection` retires a connection after so
/// many requests, `idleTimeout` closes one left unused; without either,
/// one HTTP/2 connection carries every request, from the first burst on.
#[tokio::test(flavor = "multi_thread")]
async fn the_connection_pool_retires_and_closes_connections_between_sidecars() {
    let mesh = Mesh::start().await;
    let http = client(&mesh);
    let opened = || async {
        counter(
            &mesh.stats("client").await,
            "mesh_sidecar_connections_opened_total",
            &[],
        )
    };
    let ratings = |n: usize| {
        let http = http.clone();
        async move {
            for _ in 0..n {
                let (code, body) = get(&http, "http://ratings:9080/ratings/0", &[]).await;
                assert_eq!(code, 200, "{body}");
            }
        }
    };
    // Sixteen first requests at once: they wait on one handshake.
    let before = opened().await;
    futures::future::join_all((0..16).map(|_| ratings(1))).await;
    assert_eq!(
        opened().await - before,
        1.0,
        "a burst of first requests opened a connection each"
    );
    let before = opened().await;
    ratings(5).await;
    assert_eq!(opened().await, before, "one connection carries them all");

    let rule = |pool: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: ratings-pool, namespace: default}}
spec:
  host: ratings
  trafficPolicy:
    connectionPool: {pool}
"
        )
    };
    mesh.write_config(
        "ratings-pool.yaml",
        &rule("{http: {maxRequestsPerConnection: 1}}"),
    );
    // Applied once a request opens a connection of its own.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = opened().await;
        ratings(2).await;
        if opened().await >= before + 2.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "maxRequestsPerConnection never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = opened().await;
    ratings(5).await;
    assert_eq!(opened().await, before + 5.0, "one request per connection");
    let before = opened().await;
    futures::future::join_all((0..4).map(|_| ratings(1))).await;
    assert_eq!(
        opened().await,
        before + 4.0,
        "a burst too: one request per connection"
    );

    mesh.write_config(
        "ratings-pool.yaml",
        &rule("{http: {idleTimeout: 300ms}, tcp: {tcpKeepalive: {time: 60s, interval: 10s, probes: 3}}}"),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = opened().await;
        ratings(3).await;
        if opened().await <= before + 1.0 {
            break;
        }
        assert!(Instant::now() < deadline, "the new rule never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = opened().await;
    ratings(3).await;
    assert_eq!(opened().await, before, "busy: the connection stays");
    tokio::time::sleep(Duration::from_millis(800)).await;
    ratings(1).await;
    assert_eq!(
        opened().await,
        before + 1.0,
        "idle past 300 ms: closed, and opened anew"
    );
    mesh.stop().await;
}

/// Starts a sidecar for the client's identity on two serving threads, at
/// `mesh.beside_client(last)`, and returns that address.
async fn two_thread_sidecar(
    mesh: &Mesh,
    last: u8,
    edit: impl FnOnce(&mut mesh_proxy::Config),
) -> std::net::IpAddr {
    let pod = mesh.beside_client(last);
    mesh.client_sidecar(pod, std::sync::Arc::default(), |cfg| {
        cfg.threads = 2;
        edit(cfg);
    })
    .await;
    pod
}

/// An HTTP client whose requests go through the sidecar on `pod`, over
/// a connection of its own.
fn via(pod: std::net::IpAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{pod}:15001")).unwrap())
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// A sidecar told to serve on two threads (`--threads 2`) deals the app's
/// connections to both; each thread has its own connection to a peer
/// sidecar, so two threads open two where one opens one, and every
/// request on either is served.
#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_on_two_threads_serves_connections_on_both() {
    let mesh = Mesh::start().await;
    let pod = two_thread_sidecar(&mesh, 105, |_| {}).await;
    // Four clients, a connection each: dealt to the two threads in turn.
    let clients: Vec<_> = (0..4).map(|_| via(pod)).collect();
    for round in 0..3 {
        for (i, http) in clients.iter().enumerate() {
            let (code, body) = get(http, "http://ratings:9080/ratings/0", &[]).await;
            assert_eq!(code, 200, "client {i}, round {round}: {body}");
        }
    }
    let stats = reqwest::get(format!("http://{pod}:15090/stats/prometheus"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(
        counter(&stats, "mesh_sidecar_connections_opened_total", &[]),
        2.0,
        "one connection to ratings' sidecar a serving thread: {stats}"
    );
    let served = counter(
        &stats,
        "istio_requests_total",
        &["reporter=\"source\"", "response_code=\"200\""],
    );
    assert_eq!(served, 12.0, "{stats}");
    mesh.stop().await;
}

/// Draining a sidecar on two threads lets the requests in flight on
/// either thread finish: a thread keeps serving what it holds until the
/// drain is over, though its listeners stopped dealing it connections.
#[tokio::test(flavor = "multi_thread")]
async fn draining_a_sidecar_on_two_threads_finishes_requests_on_both() {
    let mesh = Mesh::start().await;
    let pod = two_thread_sidecar(&mesh, 106, |cfg| {
        cfg.drain_grace = mesh_proxy::drain::DEFAULT_GRACE;
    })
    .await;
    // Two clients, a connection each: one on each thread.
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let http = via(pod);
            tokio::spawn(async move {
                let started = Instant::now();
                let r = http.get("http://productpage:9080/delay/800").send().await;
                (r.map(|r| r.status().as_u16()), started.elapsed())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = admin
        .post(format!("http://{pod}:15000/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    for (i, s) in slow.into_iter().enumerate() {
        let (status, took) = s.await.unwrap();
        assert_eq!(
            status.unwrap_or_else(|e| panic!("request {i} cut by the drain: {e:?}")),
            200
        );
        assert!(took >= Duration::from_millis(800), "request {i}: {took:?}");
    }
    // Then the proxy stops, well before the 5 s grace.
    let deadline = Instant::now() + Duration::from_secs(3);
    while tokio::net::TcpStream::connect((pod, 15000)).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "proxy still running after its connections finished"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    mesh.stop().await;
}

/// A child process killed (by PID) when dropped.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const PY_APPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/py/pod_apps.py");

fn python_grpc_missing() -> Option<&'static str> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then_some("needs python3 with grpcio (python3 -m pip install grpcio; CI installs it)")
}

/// gRPC from an unmodified grpcio client through its sidecar (h2c to the
/// outbound port, `:authority` naming the service), as Istio's fault and
/// retry guides do it for gRPC: a fault aborts with a gRPC status the
/// client sees as such, and `retryOn: unavailable` absorbs a server's
/// UNAVAILABLE answers.
#[tokio::test(flavor = "multi_thread")]
async fn grpc_calls_get_grpc_faults_and_retries_on_grpc_status() {
    if let Some(why) = python_grpc_missing() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let mesh = Mesh::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = Child(
        std::process::Command::new("python3")
            .args([PY_APPS, "grpc-server", &port.to_string()])
            .spawn()
            .unwrap(),
    );
    mesh.write_config(
        "echo.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.grpc.test]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 50051, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: default}}
spec:
  hosts: [echo.grpc.test]
  http:
  - name: abort-for-testers
    match: [{{headers: {{x-fault: {{exact: abort}}}}}}]
    fault: {{abort: {{grpcStatus: UNAVAILABLE, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: echo.grpc.test}}}}]
  - name: no-retries
    match: [{{headers: {{x-retries: {{exact: \"off\"}}}}}}]
    retries: {{attempts: 0}}
    route: [{{destination: {{host: echo.grpc.test}}}}]
  - name: retried
    retries: {{attempts: 3, retryOn: unavailable}}
    route: [{{destination: {{host: echo.grpc.test}}}}]
"
        ),
    );
    let outbound = mesh.workload("client").outbound().to_string();
    let probe = |method: &str, payload: &str, metadata: &[&str]| {
        let out = std::process::Command::new("python3")
            .args([
                PY_APPS,
                "grpc-probe",
                &outbound,
                "echo.grpc.test:50051",
                method,
                payload,
            ])
            .args(metadata)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let answer = probe("Say", "hello", &[]);
        if answer == "OK echo: hello" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "gRPC through the sidecar: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        probe("Say", "hello", &["x-fault=abort"]),
        "UNAVAILABLE fault filter abort"
    );
    // Two UNAVAILABLE answers, then OK: retried within one call.
    assert_eq!(probe("Flaky", "a:2", &[]), "OK ok after 2");
    // The same server without retries: the client sees the status.
    assert_eq!(
        probe("Flaky", "b:1", &["x-retries=off"]),
        "UNAVAILABLE flaky call 1 of b"
    );
    let stats = mesh.stats("client").await;
    let unavailable = counter(
        &stats,
        "istio_requests_total",
        &[
            "request_protocol=\"grpc\"",
            "grpc_response_status=\"14\"",
            "response_flags=\"FI\"",
        ],
    );
    assert_eq!(unavailable, 1.0, "the abort counted with its gRPC status");
    mesh.stop().await;
}

/// Istio's locality load balancing: with outlier detection on, a client
/// prefers endpoints in its own zone, then its region, then elsewhere,
/// spilling over as the nearer ones are ejected; `distribute` instead
/// shares traffic between localities by weight.
#[tokio::test(flavor = "multi_thread")]
async fn locality_failover_and_weighted_distribution() {
    let mesh = Mesh::start().await;
    // client and reviews-v1 in us-east/zone-a, v2 in us-east/zone-b, v3 in
    // eu-west/zone-c.
    let workloads = mesh.config_dir.join("workloads.yaml");
    let mut text = std::fs::read_to_string(&workloads).unwrap();
    for (name, locality) in [
        ("client", "us-east/zone-a"),
        ("reviews-v1", "us-east/zone-a"),
        ("reviews-v2", "us-east/zone-b"),
        ("reviews-v3", "eu-west/zone-c"),
    ] {
        let head = format!("metadata: {{name: {name}, namespace: default}}\nspec:\n");
        assert!(text.contains(&head), "{name} in workloads.yaml");
        text = text.replace(&head, &format!("{head}  locality: {locality}\n"));
    }
    mesh.write_config("workloads.yaml", &text);
    let rule = |locality: &str| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: reviews, namespace: default}}
spec:
  host: reviews
  trafficPolicy:
    outlierDetection: {{consecutive5xxErrors: 1, interval: 1s, baseEjectionTime: 30s, maxEjectionPercent: 100}}
    loadBalancer: {{simple: ROUND_ROBIN{locality}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: reviews, namespace: default}}
spec:
  hosts: [reviews]
  http:
  - name: by-locality{}
    retries: {{attempts: 0}}
    route: [{{destination: {{host: reviews}}}}]
",
            if locality.is_empty() { "" } else { "-weighted" }
        )
    };
    let http = client(&mesh);
    let versions = |n: usize| {
        let http = http.clone();
        async move {
            let mut seen = std::collections::BTreeMap::new();
            for _ in 0..n {
                let (code, body) = get(&http, "http://reviews:9080/delay/0", &[]).await;
                assert_eq!(code, 200, "{body}");
                *seen.entry(version(&body)).or_insert(0) += 1;
            }
            seen
        }
    };

    // distribute: from zone-a, 80 % to zone-a and 20 % to eu-west; zone-b
    // none.
    let weighted = ", localityLbSetting: {distribute: [{from: \"us-east/zone-a/*\", to: {\"us-east/zone-a/*\": 80, \"eu-west/*\": 20}}]}";
    mesh.apply(
        "reviews-routing.yaml",
        &rule(weighted),
        "client",
        "by-locality-weighted",
    )
    .await;
    // The localities reach the client's sidecar with a push of their own.
    let deadline = Instant::now() + Duration::from_secs(10);
    while versions(20).await.contains_key("v2") {
        assert!(Instant::now() < deadline, "zone-b still served");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let seen = versions(500).await;
    assert!(!seen.contains_key("v2"), "{seen:?}");
    let v1 = seen.get("v1").copied().unwrap_or(0);
    // 80 % of 500: the standard deviation is about 9.
    assert!((355..=445).contains(&v1), "{seen:?}");

    // Failover (the default with outlier detection): the client's own
    // zone only, while it is healthy.
    mesh.apply("reviews-routing.yaml", &rule(""), "client", "by-locality")
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while versions(20).await.keys().collect::<Vec<_>>() != ["v1"] {
        assert!(
            Instant::now() < deadline,
            "the client never kept to its own zone"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // v1 fails once and is ejected: its region's other zone takes over.
    assert_eq!(
        get(&http, "http://reviews:9080/fail-on/v1", &[]).await.0,
        503
    );
    assert_eq!(versions(20).await, [("v2".to_string(), 20)].into());
    // v2 too: then the other region.
    assert_eq!(
        get(&http, "http://reviews:9080/fail-on/v2", &[]).await.0,
        503
    );
    assert_eq!(versions(20).await, [("v3".to_string(), 20)].into());
    mesh.stop().await;
}

/// `loadBalancer: {simple: PASSTHROUGH}`: a captured request goes to the
/// very endpoint the app dialled (a pod address, as a headless service's
/// clients dial), not one the balancer chooses.
#[tokio::test(flavor = "multi_thread")]
async fn passthrough_balancing_keeps_to_the_endpoint_the_app_dialled() {
    let mesh = Mesh::start().await;
    let pod = mesh.beside_client(106);
    let v2 = mesh.workload("reviews-v2").address;
    let dst = std::sync::Arc::new(std::sync::Mutex::new(Some(std::net::SocketAddr::new(
        v2, 9080,
    ))));
    mesh.captured_sidecar(pod, mesh_proxy::OutboundPolicy::AllowAny, dst)
        .await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let versions = || {
        let http = http.clone();
        async move {
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..12 {
                let body = http
                    .get(format!("http://{pod}:15001/delay/0"))
                    .header("host", "reviews:9080")
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                seen.insert(version(&body));
            }
            seen
        }
    };
    assert!(
        versions().await.len() > 1,
        "round robin spreads the requests"
    );
    // The sample's split across subsets gives way to the service itself,
    // balanced by where the app was going.
    mesh.write_config(
        "reviews-routing.yaml",
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: default}
spec:
  host: reviews
  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while versions().await != ["v2".to_string()].into() {
        assert!(Instant::now() < deadline, "PASSTHROUGH never kept to v2");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    mesh.stop().await;
}
