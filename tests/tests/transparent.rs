//! Captured traffic as the outbound sidecar sees it: the original
//! destination (stood in for, as STYLE.md intends for socket facts) decides
//! between a service VIP, passthrough, the black hole and a loop.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_proxy::OutboundPolicy;
use mesh_tests::Mesh;

/// A plain HTTP server standing for something outside the mesh.
async fn outside_server(addr: SocketAddr) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    |req: hyper::Request<hyper::body::Incoming>| async move {
                        let host = req
                            .headers()
                            .get("host")
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or("")
                            .to_string();
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(hyper::body::Bytes::from(format!(
                                "outside, host {host}"
                            ))),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
}

async fn get(pod: IpAddr, host: &str, path: &str) -> (u16, String) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let r = http
        .get(format!("http://{pod}:15001{path}"))
        .header("host", host)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn captured_requests_go_to_vips_through_to_the_outside_or_nowhere() {
    let mesh = Mesh::start().await;
    let block = match mesh.workload("client").address {
        IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let ip = |last: u8| IpAddr::from([block[0], block[1], block[2], last]);
    let outside = SocketAddr::new(ip(50), 8080);
    outside_server(outside).await;
    let dst = Arc::new(Mutex::new(None));
    let (allow, registry_only) = (ip(100), ip(101));
    mesh.captured_sidecar(allow, OutboundPolicy::AllowAny, dst.clone())
        .await;
    mesh.captured_sidecar(registry_only, OutboundPolicy::RegistryOnly, dst.clone())
        .await;

    // The app dialled reviews' VIP; its Host names nothing the mesh knows.
    *dst.lock().unwrap() = Some("240.240.0.4:9080".parse().unwrap());
    let (code, body) = get(allow, "an-alias", "/reviews/0").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        body.contains("\"version\""),
        "reviews did not answer: {body}"
    );

    // Outside the mesh: passed through under ALLOW_ANY, Host kept.
    *dst.lock().unwrap() = Some(outside);
    let (code, body) = get(allow, "example.test", "/").await;
    assert_eq!((code, body.as_str()), (200, "outside, host example.test"));
    // ... and refused under REGISTRY_ONLY.
    let (code, body) = get(registry_only, "example.test", "/").await;
    assert_eq!(code, 502);
    assert!(body.contains("REGISTRY_ONLY"), "{body}");

    // A connection redirected back to the sidecar's own listener is a loop.
    *dst.lock().unwrap() = Some(SocketAddr::new(allow, 15001));
    let (code, body) = get(allow, "example.test", "/").await;
    assert_eq!(code, 508, "{body}");

    // Both show up in the metrics under Istio's names.
    let stats = |ip: IpAddr| async move {
        reqwest::get(format!("http://{ip}:15090/stats/prometheus"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(
        stats(allow)
            .await
            .contains("destination_service=\"PassthroughCluster\"")
    );
    assert!(
        stats(registry_only)
            .await
            .contains("destination_service=\"BlackHoleCluster\"")
    );
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sidecar_resource_limits_what_a_proxy_is_told_of_and_sets_its_outbound_policy() {
    let mesh = Mesh::start().await;
    let block = match mesh.workload("client").address {
        IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let pod = IpAddr::from([block[0], block[1], block[2], 102]);
    let outside = SocketAddr::new(IpAddr::from([block[0], block[1], block[2], 51]), 8080);
    outside_server(outside).await;
    // A workload of the mesh's (so pilot scopes it), labelled for the Sidecar below.
    mesh.write_config(
        "scoped.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: captured-{pod}, namespace: default}}\nspec: {{address: \"{pod}\", labels: {{app: scoped}}, serviceAccount: client}}\n"
        ),
    );
    let dst = Arc::new(Mutex::new(None));
    // The proxy's own flag says ALLOW_ANY.
    mesh.captured_sidecar(pod, OutboundPolicy::AllowAny, dst.clone())
        .await;
    let (reviews, ratings) = ("240.240.0.4:9080", "240.240.0.5:9080");
    let call = |to: &str| {
        *dst.lock().unwrap() = Some(to.parse().unwrap());
        get(pod, "an-alias", "/ratings/0")
    };
    assert_eq!(call(ratings).await.0, 200, "ratings before the Sidecar");
    assert_eq!(
        call(&outside.to_string()).await.0,
        200,
        "passthrough before the Sidecar"
    );

    // Only reviews is imported, and anything else is refused.
    mesh.write_config(
        "sidecar.yaml",
        "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {name: scoped, namespace: default}\nspec:\n  workloadSelector: {labels: {app: scoped}}\n  egress:\n  - hosts: [\"./reviews.default.svc.cluster.local\"]\n  outboundTrafficPolicy: {mode: REGISTRY_ONLY}\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let (code, body) = loop {
        let (code, body) = call(ratings).await;
        if code != 200 || Instant::now() > deadline {
            break (code, body);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 502, "ratings is not imported: {body}");
    assert!(body.contains("REGISTRY_ONLY"), "{body}");
    let (code, body) = call(&outside.to_string()).await;
    assert_eq!(
        code, 502,
        "pilot's REGISTRY_ONLY overrides the flag: {body}"
    );
    *dst.lock().unwrap() = Some(reviews.parse().unwrap());
    let (code, body) = get(pod, "an-alias", "/reviews/0").await;
    assert_eq!(code, 200, "reviews is imported: {body}");
    assert_eq!(
        mesh.cp.pilot().expect("pilot runs").errors(),
        Vec::<String>::new()
    );

    // Without the Sidecar, everything is back.
    std::fs::remove_file(mesh.config_dir.join("sidecar.yaml")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(ratings).await.0 != 200 {
        assert!(Instant::now() < deadline, "ratings never came back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(call(&outside.to_string()).await.0, 200);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_app_may_call_a_service_by_its_vip() {
    let mesh = Mesh::start().await;
    let r = mesh
        .client()
        .get("http://240.240.0.5:9080/ratings/0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["ratings"]["Reviewer1"], 5);
    mesh.stop().await;
}

/// A TCP service that speaks first (like SMTP or MySQL), then echoes.
async fn greeting_echo_server(addr: SocketAddr) {
    greeting_server(addr, b"220 hello from echo\n").await;
}

/// An app's connection through `pod`'s captured sidecar, and the first
/// `len` bytes the server sends on it, if they come within `wait`.
async fn first_bytes(
    pod: IpAddr,
    len: usize,
    wait: Duration,
) -> (tokio::net::TcpStream, Option<Vec<u8>>) {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(SocketAddr::new(pod, 15001))
        .await
        .unwrap();
    let mut buf = vec![0u8; len];
    let read = tokio::time::timeout(wait, tcp.read_exact(&mut buf)).await;
    let got = matches!(read, Ok(Ok(_))).then_some(buf);
    (tcp, got)
}

/// A TCP server that sends `greeting` first, then echoes.
async fn greeting_server(addr: SocketAddr, greeting: &'static [u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut tcp, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                tcp.write_all(greeting).await.unwrap();
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
}

const ECHO_SERVICE: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  addresses: [240.240.1.1]
  ports: [{number: 7000, name: tcp-echo, protocol: TCP}]
  workloadSelector: {labels: {app: ratings}}
";

/// Starts the greeting echo server on ratings' pod behind the echo VIP, a
/// captured sidecar for the client on 127.A.B.`octet`, and returns the
/// pod and an app connection through it that has heard the greeting.
async fn echo_tunnel(mesh: &Mesh, octet: u8) -> (IpAddr, tokio::net::TcpStream) {
    let ratings = mesh.workload("ratings-v1").address;
    greeting_echo_server(SocketAddr::new(ratings, 7000)).await;
    mesh.write_config("echo.yaml", ECHO_SERVICE);
    let block = match ratings {
        IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let pod = IpAddr::from([block[0], block[1], block[2], octet]);
    let dst = Arc::new(Mutex::new(Some("240.240.1.1:7000".parse().unwrap())));
    mesh.captured_sidecar(pod, OutboundPolicy::RegistryOnly, dst)
        .await;
    // The app connects and, without sending anything, hears the server first.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (tcp, greeting) = first_bytes(pod, 20, Duration::from_secs(1)).await;
        if let Some(greeting) = greeting {
            assert_eq!(&greeting, b"220 hello from echo\n");
            return (pod, tcp);
        }
        // The echo service may not have reached the sidecar yet.
        assert!(Instant::now() < deadline, "no greeting through the mesh");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_tcp_to_a_server_that_speaks_first_crosses_the_mesh() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::start().await;
    let (_, mut tcp) = echo_tunnel(&mesh, 100).await;
    tcp.write_all(b"ping over mTLS\n").await.unwrap();
    let mut echoed = [0u8; 15];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping over mTLS\n");
    // An open tunnel would hold the drain for its grace period.
    drop(tcp);
    mesh.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_policy_change_closes_an_open_tcp_connection_it_no_longer_allows() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = Mesh::start().await;
    let (pod, mut tcp) = echo_tunnel(&mesh, 101).await;
    tcp.write_all(b"before policy\n").await.unwrap();
    let mut echoed = [0u8; 14];
    tcp.read_exact(&mut echoed).await.unwrap();
    // Now only reviews may reach ratings: the client's open connection goes.
    mesh.write_config(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-only-reviews, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}
",
    );
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "the connection stayed open after the policy denied it"
    );
    // And a new one is refused.
    let mut again = tokio::net::TcpStream::connect(SocketAddr::new(pod, 15001))
        .await
        .unwrap();
    let mut greeting = [0u8; 20];
    let read = tokio::time::timeout(Duration::from_secs(2), again.read_exact(&mut greeting)).await;
    assert!(
        !matches!(read, Ok(Ok(_))),
        "a denied TCP connection was greeted"
    );
    drop(again);
    drop(tcp);
    mesh.stop().await;
}

/// Istio's TCP traffic-shifting task: a VirtualService's tcp route splits
/// connections to tcp-echo's port 9000 80/20 between subsets v1 and v3
/// (none to v2), then moves them all to v2.
#[tokio::test(flavor = "multi_thread")]
async fn tcp_routes_shift_connections_between_subsets_by_weight() {
    let mesh = Mesh::start().await;
    for (w, greeting) in [
        ("reviews-v1", b"one\n" as &'static [u8]),
        ("reviews-v2", b"two\n"),
        ("reviews-v3", b"six\n"),
    ] {
        greeting_server(SocketAddr::new(mesh.workload(w).address, 9000), greeting).await;
    }
    let service = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: tcp-echo, namespace: default}
spec:
  hosts: [tcp-echo.default.svc.cluster.local]
  addresses: [240.240.1.2]
  ports: [{number: 9000, name: tcp, protocol: TCP}]
  workloadSelector: {labels: {app: reviews}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: tcp-echo, namespace: default}
spec:
  host: tcp-echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: v3, labels: {version: v3}}
";
    let routes = |v1: u32, v2: u32, v3: u32| {
        format!(
            "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: tcp-echo, namespace: default}}
spec:
  hosts: [tcp-echo]
  tcp:
  - match:
    - port: 9000
    route:
    - {{destination: {{host: tcp-echo, port: {{number: 9000}}, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: tcp-echo, port: {{number: 9000}}, subset: v2}}, weight: {v2}}}
    - {{destination: {{host: tcp-echo, port: {{number: 9000}}, subset: v3}}, weight: {v3}}}
"
        )
    };
    mesh.write_config(
        "tcp-echo.yaml",
        &format!("{service}---\n{}", routes(80, 0, 20)),
    );
    let block = match mesh.workload("client").address {
        IpAddr::V4(v4) => v4.octets(),
        _ => unreachable!(),
    };
    let pod = IpAddr::from([block[0], block[1], block[2], 103]);
    let dst = Arc::new(Mutex::new(Some("240.240.1.2:9000".parse().unwrap())));
    mesh.captured_sidecar(pod, OutboundPolicy::RegistryOnly, dst)
        .await;
    // Which version greets one new connection (None: none did).
    let greeted_by = async || {
        let greeting = first_bytes(pod, 4, Duration::from_secs(2)).await.1?;
        Some(String::from_utf8_lossy(&greeting[..3]).into_owned())
    };
    let tally = async |n: usize| {
        let mut seen = std::collections::BTreeMap::<String, usize>::new();
        for _ in 0..n {
            let who = greeted_by().await.unwrap_or_else(|| "none".into());
            *seen.entry(who).or_default() += 1;
        }
        seen
    };
    // The route reaches the captured sidecar: v3 shows up.
    let deadline = Instant::now() + Duration::from_secs(10);
    while greeted_by().await.as_deref() != Some("six") {
        assert!(Instant::now() < deadline, "the tcp route never took effect");
    }
    let seen = tally(200).await;
    let (one, six) = (
        seen.get("one").copied().unwrap_or(0),
        seen.get("six").copied().unwrap_or(0),
    );
    assert_eq!(one + six, 200, "{seen:?}");
    // 80/20 of 200: 160 +- 5.7 (one standard deviation); 5 sigma either way.
    assert!((130..=190).contains(&one), "{seen:?}");

    mesh.write_config(
        "tcp-echo.yaml",
        &format!("{service}---\n{}", routes(0, 100, 0)),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while greeted_by().await.as_deref() != Some("two") {
        assert!(
            Instant::now() < deadline,
            "the new weights never took effect"
        );
    }
    let seen = tally(50).await;
    assert_eq!(seen.get("two"), Some(&50), "{seen:?}");
    mesh.stop().await;
}
