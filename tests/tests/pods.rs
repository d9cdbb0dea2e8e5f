//! Transparent mode for real: every bookinfo workload in its own pod
//! (network namespace on a node bridge), its traffic captured by the
//! `mesh-iptables` rules, its sidecar running as UID 1337, its app
//! knowing nothing of the mesh. curl in the client pod is the user.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use meshctl::pods::{self, Node, PodMesh};

const POD: &str = env!("CARGO_BIN_EXE_mesh-pod");

/// Runs `test` against the bookinfo pod mesh (plus `extra` config files)
/// once every sidecar is ready, on a thread in the node's namespace, where
/// the control plane lives; stops the mesh afterwards. `test` gets the
/// config directory too, to change the config while it runs.
fn with_pod_mesh<F>(extra: &[(&str, &str)], test: F)
where
    F: AsyncFnOnce(&mut PodMesh, std::path::PathBuf) + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(config_dir.join(name), pods::pod_config(text)).unwrap();
    }
    for (name, text) in extra {
        std::fs::write(config_dir.join(name), text).unwrap();
    }
    let node = Node::new().unwrap();
    let node_ns = node.namespace();
    std::thread::spawn(move || {
        pods::enter(&node_ns).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let mut mesh = PodMesh::start(node, dir.path(), &config_dir, Path::new(POD), None)
                .await
                .unwrap();
            mesh.wait_ready(Duration::from_secs(20), |_, _, _| {})
                .await
                .unwrap();
            test(&mut mesh, config_dir).await;
            mesh.stop().await;
        });
    })
    .join()
    .unwrap();
}

#[test]
fn pods_talk_over_mtls_through_captured_sidecars_with_apps_unaware() {
    if let Some(why) = pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    with_pod_mesh(&[], async move |mesh, _| {
        // The cost of one pod, made and deleted.
        let t = Instant::now();
        mesh.node
            .add_pod("probe", Ipv4Addr::new(10, 244, 0, 99))
            .unwrap();
        let made = t.elapsed();
        let t = Instant::now();
        mesh.node.delete_pod("probe").unwrap();
        eprintln!("one pod: created in {made:?}, deleted in {:?}", t.elapsed());
        assert!(
            made + t.elapsed() < Duration::from_millis(500),
            "pod set-up is too slow"
        );
        // The user: plain curl in the client pod, by service name.
        let mut versions = std::collections::BTreeMap::new();
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut ok = 0;
        while ok < 10 {
            match mesh.request(&[]) {
                Ok((version, hops)) => {
                    assert!(hops.len() >= 3, "{hops:?}");
                    *versions.entry(version).or_insert(0) += 1;
                    ok += 1;
                }
                Err(e) => {
                    assert!(
                        ok == 0 && Instant::now() < deadline,
                        "request failed after the mesh was up: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        eprintln!(
            "10 requests from curl through captured sidecars, every hop over mTLS; reviews versions {versions:?}"
        );
        // Across nodes too: ratings lives on node 1; make sure a hop to it was taken.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (_, hops) = mesh.request(&[]).expect("request succeeds");
            if hops.iter().any(|h| h.1 == "ratings") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no request reached ratings on node 1"
            );
        }
        // HTTP/2 from an app that knows nothing of the mesh either.
        mesh.request(&["--http2-prior-knowledge"])
            .expect("HTTP/2 request crossed the mesh over mTLS");
        // Port 9080 excluded from the client's capture (re-applying the
        // rules in place): its plaintext connection no longer goes through
        // the client's sidecar, so productpage's pod, which accepts only
        // mutual TLS inbound, refuses it. Were the exclusion ignored, the
        // client's sidecar would carry it over mTLS and it would get 200.
        let out = mesh
            .node
            .run("client", &[POD, "capture", "--exclude-outbound-ports=9080"])
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pp = mesh
            .specs
            .iter()
            .find(|w| w.name == "productpage-v1")
            .unwrap()
            .address;
        let direct = format!("http://{pp}:9080/health");
        let out = mesh
            .node
            .run(
                "client",
                &[
                    "curl",
                    "-sS",
                    "-m",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &direct,
                ],
            )
            .unwrap();
        assert_ne!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "plaintext reached a STRICT pod's app"
        );
    });
}

#[test]
fn namespaces_left_by_a_crashed_run_are_removed_and_live_ones_kept() {
    if let Some(why) = pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let tag = format!("{:06x}", rand::random::<u32>() & 0xff_ffff);
    let (dead, live) = (format!("mt-{tag}-dead"), format!("mt-{tag}-live"));
    for ns in [&dead, &live] {
        assert!(
            std::process::Command::new("ip")
                .args(["netns", "add", ns])
                .status()
                .unwrap()
                .success()
        );
    }
    // A process still uses the live one.
    let mut sleeper = std::process::Command::new("ip")
        .args(["netns", "exec", &live, "sleep", "30"])
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // Only this test's own namespaces: others may be a parallel run's, mid-set-up.
    let removed = pods::remove_stale(&format!("mt-{tag}-"), Duration::ZERO).unwrap();
    let listed = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .to_string();
    let _ = sleeper.kill();
    let _ = sleeper.wait();
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", &live])
        .status();
    assert!(removed.contains(&dead), "{removed:?}");
    assert!(!removed.contains(&live), "a namespace in use was removed");
    assert!(
        !listed.contains(&dead) && listed.contains(&live),
        "{listed}"
    );
}

/// A gRPC service and a TCP service whose server speaks first, both on one
/// pod on node 1 behind the VIP 240.240.0.9.
const ECHO: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo.default.svc.cluster.local]
  addresses: [240.240.0.9]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {number: 50051, name: grpc, protocol: GRPC}
  - {number: 7000, name: tcp-greeter, protocol: TCP}
  workloadSelector: {labels: {app: echo}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: echo-v1, namespace: default}
spec:
  address: 10.244.1.18
  labels: {app: echo, version: v1}
  serviceAccount: echo
";

/// A pod's sidecar's Prometheus text (15090 is never captured).
async fn sidecar_stats(pod_ip: &str) -> String {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://{pod_ip}:15090/stats/prometheus"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

fn python_grpc_missing() -> Option<String> {
    let ok = std::process::Command::new("python3")
        .args(["-c", "import grpc"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "needs python3 with grpcio (python3 -m pip install grpcio)".to_string())
}

#[test]
fn grpc_and_a_server_first_protocol_cross_captured_pods() {
    if let Some(why) = pods::skip_reason().or_else(python_grpc_missing) {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/py/pod_apps.py");
    with_pod_mesh(&[("echo.yaml", ECHO)], async move |mesh, _| {
        let logs = mesh.logs.clone();
        mesh.node
            .spawn(
                "echo-v1",
                &["python3", apps, "grpc-server", "50051"],
                &logs.join("grpc.log"),
            )
            .unwrap();
        mesh.node
            .spawn(
                "echo-v1",
                &["python3", apps, "greeter", "7000"],
                &logs.join("greeter.log"),
            )
            .unwrap();

        // gRPC (HTTP/2) from an unmodified grpcio client, to the VIP.
        let deadline = Instant::now() + Duration::from_secs(20);
        let answers = loop {
            let out = mesh
                .node
                .run(
                    "client",
                    &["python3", apps, "grpc-client", "240.240.0.9:50051", "5"],
                )
                .unwrap();
            if out.status.success() {
                break String::from_utf8_lossy(&out.stdout).into_owned();
            }
            assert!(
                Instant::now() < deadline,
                "gRPC through the mesh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        let expected: Vec<String> = (0..5).map(|i| format!("echo: hello {i}")).collect();
        assert_eq!(answers.lines().collect::<Vec<_>>(), expected);
        // It went over mutual TLS between the two sidecars: the echo
        // pod's sidecar counted the calls as gRPC from the client.
        let stats = sidecar_stats("10.244.1.18").await;
        let counted = stats.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_service_name=\"echo\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/default/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains("request_protocol=\"grpc\"")
                && l.contains("grpc_response_status=\"0\"")
        });
        assert!(
            counted,
            "the echo sidecar did not count mTLS gRPC calls:\n{stats}"
        );

        // A protocol whose server speaks first, on a TCP port of the VIP.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = mesh
                .node
                .run(
                    "client",
                    &["python3", apps, "greeter-client", "240.240.0.9:7000"],
                )
                .unwrap();
            if out.status.success() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "server-first TCP through the mesh failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Both sidecars counted the TCP connection, its bytes both ways, and
        // its close (the client has exited, so it is closed by now; the
        // destination side's close follows the source's by a moment).
        let deadline = Instant::now() + Duration::from_secs(5);
        for (pod, reporter) in [("10.244.1.18", "destination"), ("10.244.0.11", "source")] {
            let reporter_label = format!("reporter=\"{reporter}\"");
            let value = |stats: &str, name: &str| -> f64 {
                mesh_tests::metric_sum(
                    stats,
                    name,
                    &[
                        &reporter_label,
                        "destination_service_name=\"echo\"",
                        "request_protocol=\"tcp\"",
                        "connection_security_policy=\"mutual_tls\"",
                    ],
                )
            };
            loop {
                let stats = sidecar_stats(pod).await;
                let closed = value(&stats, "istio_tcp_connections_closed_total");
                if closed >= 1.0 {
                    assert!(value(&stats, "istio_tcp_connections_opened_total") >= closed);
                    assert!(
                        value(&stats, "istio_tcp_sent_bytes_total") > 0.0
                            && value(&stats, "istio_tcp_received_bytes_total") > 0.0,
                        "{reporter} counted no TCP bytes:\n{stats}"
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the {reporter} sidecar counted no closed TCP connection:\n{stats}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
}

/// Lets productpage take plaintext from clients without a sidecar.
const PRODUCTPAGE_PERMISSIVE: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: productpage, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  mtls: {mode: PERMISSIVE}
";

#[test]
fn a_pod_without_a_sidecar_is_refused_under_strict_and_served_under_permissive() {
    if let Some(why) = pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    with_pod_mesh(&[], async move |mesh, config_dir| {
        // A pod with no sidecar and no capture rules.
        mesh.node
            .add_pod("legacy", Ipv4Addr::new(10, 244, 0, 50))
            .unwrap();
        let productpage = "http://10.244.0.12:9080/productpage";
        // Body, a newline, then the status (000: no answer).
        let curl = |mesh: &PodMesh, url: &str| {
            let out = mesh
                .node
                .run(
                    "legacy",
                    &["curl", "-sS", "-m", "3", "-w", "\n%{http_code}", url],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        // The sample's mesh-wide PeerAuthentication is STRICT.
        let refused = curl(mesh, productpage);
        assert!(
            refused.ends_with("000"),
            "plaintext got an answer under STRICT: {refused}"
        );

        // PERMISSIVE for productpage: the same plaintext request is served.
        std::fs::write(
            config_dir.join("productpage-permissive.yaml"),
            PRODUCTPAGE_PERMISSIVE,
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let answer = loop {
            let answer = curl(mesh, productpage);
            if answer.ends_with("200") {
                break answer;
            }
            assert!(
                Instant::now() < deadline,
                "still refused under PERMISSIVE: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        // productpage was told of no client identity; its own calls onward
        // still went over mutual TLS.
        let body: serde_json::Value =
            serde_json::from_str(answer.rsplit_once('\n').unwrap().0).unwrap();
        let hops = body["hops"].as_array().unwrap();
        let pp = hops.iter().find(|h| h["service"] == "productpage").unwrap();
        assert!(pp["xfcc"].is_null(), "{pp}");
        // Both apps learn who called them although their connections come
        // from their own sidecars: the legacy pod, then productpage's pod.
        assert_eq!(
            (pp["xff"].as_str(), pp["xfp"].as_str()),
            (Some("10.244.0.50"), Some("http")),
            "{pp}"
        );
        let reviews = hops.iter().find(|h| h["service"] == "reviews").unwrap();
        assert_eq!(
            (reviews["xff"].as_str(), reviews["xfp"].as_str()),
            (Some("10.244.0.12"), Some("http")),
            "{reviews}"
        );
        assert!(
            reviews["xfcc"]
                .as_str()
                .is_some_and(|x| x.contains("sa/bookinfo-productpage")),
            "{reviews}"
        );
        // Other workloads stay STRICT.
        let details = curl(mesh, "http://10.244.0.13:9080/details/0");
        assert!(
            details.ends_with("000"),
            "details answered plaintext: {details}"
        );
        // productpage's sidecar counted the request as plaintext.
        let stats = sidecar_stats("10.244.0.12").await;
        assert!(
            stats
                .lines()
                .any(|l| l.contains("connection_security_policy=\"none\"")
                    && l.contains("source_principal=\"unknown\"")
                    && l.contains("response_code=\"200\"")),
            "{stats}"
        );

        // Back to STRICT: a plaintext request in flight is cut, not served.
        let log = config_dir.with_file_name("slow-curl.log");
        mesh.node
            .spawn(
                "legacy",
                &[
                    "curl",
                    "-sS",
                    "-m",
                    "10",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code} %{time_total}\n",
                    "http://10.244.0.12:9080/delay/6000",
                ],
                &log,
            )
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        std::fs::remove_file(config_dir.join("productpage-permissive.yaml")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(8);
        let ended = loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(line) = text
                .lines()
                .find(|l| l.chars().next().is_some_and(|c| c.is_ascii_digit()))
            {
                break line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "the slow request never ended: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let (code, secs) = ended.split_once(' ').unwrap();
        let secs: f64 = secs.trim().parse().unwrap();
        assert!(code != "200" && secs < 4.5, "served under STRICT: {ended}");
    });
}
