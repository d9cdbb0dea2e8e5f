//! Transparent mode for real: every bookinfo workload in its own pod
//! (network namespace on a node bridge), its traffic captured by the
//! `mesh-iptables` rules, its sidecar running as UID 1337, its app
//! knowing nothing of the mesh. curl in the client pod is the user.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

use mesh_tests::pods::{self, NODE_IP, Node};

const POD: &str = env!("CARGO_BIN_EXE_mesh-pod");

/// What the sample's service names resolve to inside pods (their VIPs).
const RESOLVE: [&str; 4] = [
    "productpage=240.240.0.2",
    "details=240.240.0.3",
    "reviews=240.240.0.4",
    "ratings=240.240.0.5",
];

/// The sample's 127.0.10.N addresses, as pod addresses 10.244.0.1N.
fn pod_config(text: &str) -> String {
    text.replace("127.0.10.", "10.244.0.1")
}

#[test]
fn pods_talk_over_mtls_through_captured_sidecars_with_apps_unaware() {
    if let Some(why) = pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(config_dir.join(name), pod_config(text)).unwrap();
    }
    let specs = meshctl::workloads::from_config(&config_dir).unwrap();
    let mut node = Node::new().unwrap();

    // The cost of one pod, made and deleted.
    let t = Instant::now();
    node.add_pod("probe", Ipv4Addr::new(10, 244, 0, 99))
        .unwrap();
    let made = t.elapsed();
    let t = Instant::now();
    node.delete_pod("probe").unwrap();
    eprintln!("one pod: created in {made:?}, deleted in {:?}", t.elapsed());
    assert!(
        made + t.elapsed() < Duration::from_millis(500),
        "pod set-up is too slow"
    );

    let node_ns = node.namespace();
    std::thread::spawn(move || {
        // This thread, and the control plane it runs, live in the node's namespace.
        pods::enter(&node_ns).unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async move {
            let cp = meshctl::controlplane::ControlPlane::start(dir.path(), &config_dir, IpAddr::V4(NODE_IP))
                .await
                .unwrap();
            let logs = dir.path().join("logs");
            std::fs::create_dir_all(&logs).unwrap();
            for w in &specs {
                let IpAddr::V4(ip) = w.address else { unreachable!() };
                node.add_pod(&w.name, ip).unwrap();
                let out = node.run(&w.name, &[POD, "capture"]).unwrap();
                assert!(out.status.success(), "capture in {}: {}", w.name, String::from_utf8_lossy(&out.stderr));
                let id = mesh_identity::SpiffeId::new("cluster.local", &w.namespace, &w.service_account);
                let token = dir.path().join(format!("{}.token", w.name));
                std::fs::write(&token, cp.token_for(&id)).unwrap();
                std::os::unix::fs::chown(&token, Some(1337), Some(1337)).unwrap();
                let args = [
                    "setpriv", "--reuid=1337", "--regid=1337", "--clear-groups", POD, "proxy",
                    &format!("--workload={}", w.name),
                    &format!("--namespace={}", w.namespace),
                    &format!("--service-account={}", w.service_account),
                    &format!("--pod-ip={ip}"),
                    &format!("--pilot-addr={}", cp.pilot_addr),
                    &format!("--ca-addr={}", cp.ca_addr),
                    &format!("--ca-root-file={}", cp.root_file.display()),
                    &format!("--token-file={}", token.display()),
                    "--capture",
                ];
                node.spawn(&w.name, &args, &logs.join(format!("{}-proxy.log", w.name))).unwrap();
                if let Some((svc, version)) = &w.app {
                    let mut app = vec![
                        POD.to_string(), "app".into(),
                        format!("--service={}", format!("{svc:?}").to_lowercase()),
                        format!("--version={version}"),
                        "--listen=0.0.0.0:9080".into(),
                    ];
                    app.extend(RESOLVE.iter().map(|r| format!("--resolve={r}")));
                    let app: Vec<&str> = app.iter().map(String::as_str).collect();
                    node.spawn(&w.name, &app, &logs.join(format!("{}-app.log", w.name))).unwrap();
                }
            }
            // Sidecars ready (15021 is never captured).
            let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(1)).build().unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            for w in &specs {
                let url = format!("http://{}/healthz/ready", SocketAddr::new(w.address, 15021));
                while !http.get(&url).send().await.is_ok_and(|r| r.status() == 200) {
                    assert!(Instant::now() < deadline, "{} not ready; see {}", w.name, logs.display());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            // The user: plain curl in the client pod, by service name.
            let client_id = mesh_identity::SpiffeId::new("cluster.local", "default", "client").to_string();
            let curl = ["curl", "-sS", "-m", "5", "--resolve", "productpage:9080:240.240.0.2", "http://productpage:9080/productpage"];
            let mut versions = std::collections::BTreeMap::new();
            let deadline = Instant::now() + Duration::from_secs(15);
            let mut ok = 0;
            while ok < 10 {
                let out = node.run("client", &curl).unwrap();
                let body = String::from_utf8_lossy(&out.stdout).to_string();
                let verified = serde_json::from_str(&body).map_err(|e| e.to_string())
                    .and_then(|v: serde_json::Value| meshctl::traffic::verify(&v, &client_id));
                match verified {
                    Ok((version, hops)) => {
                        assert!(hops.len() >= 3, "{hops:?}");
                        *versions.entry(version).or_insert(0) += 1;
                        ok += 1;
                    }
                    Err(e) => {
                        assert!(ok == 0 && Instant::now() < deadline, "request failed after the mesh was up: {e}: {body} {}", String::from_utf8_lossy(&out.stderr));
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            eprintln!("10 requests from curl through captured sidecars, every hop over mTLS; reviews versions {versions:?}");
            // HTTP/2 from an app that knows nothing of the mesh either.
            let h2 = ["curl", "-sS", "-m", "5", "--http2-prior-knowledge", "--resolve", "productpage:9080:240.240.0.2", "http://productpage:9080/productpage"];
            let out = node.run("client", &h2).unwrap();
            let body: serde_json::Value = serde_json::from_slice(&out.stdout)
                .unwrap_or_else(|e| panic!("HTTP/2 through the mesh: {e}: {}", String::from_utf8_lossy(&out.stderr)));
            meshctl::traffic::verify(&body, &client_id).expect("HTTP/2 request crossed the mesh over mTLS");
            // Port 9080 excluded from the client's capture (re-applying the
            // rules in place): its plaintext connection no longer goes through
            // the client's sidecar, so productpage's pod, which accepts only
            // mutual TLS inbound, refuses it. Were the exclusion ignored, the
            // client's sidecar would carry it over mTLS and it would get 200.
            let out = node.run("client", &[POD, "capture", "--exclude-outbound-ports=9080"]).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let pp = specs.iter().find(|w| w.name == "productpage-v1").unwrap().address;
            let direct = format!("http://{pp}:9080/health");
            let out = node.run("client", &["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &direct]).unwrap();
            assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "plaintext reached a STRICT pod's app");
            drop(node);
            cp.stop().await;
        });
    })
    .join()
    .unwrap();
}
