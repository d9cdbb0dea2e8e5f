//! Transparent mode for real: every bookinfo workload in its own pod
//! (network namespace on a node bridge), its traffic captured by the
//! `mesh-iptables` rules, its sidecar running as UID 1337, its app
//! knowing nothing of the mesh. curl in the client pod is the user.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use meshctl::pods::{self, Node, PodMesh};

const POD: &str = env!("CARGO_BIN_EXE_mesh-pod");

#[test]
fn pods_talk_over_mtls_through_captured_sidecars_with_apps_unaware() {
    if let Some(why) = pods::skip_reason() {
        eprintln!("SKIPPED: {why}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(config_dir.join(name), pods::pod_config(text)).unwrap();
    }
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
            let mesh = PodMesh::start(node, dir.path(), &config_dir, Path::new(POD), None).await.unwrap();
            mesh.wait_ready(Duration::from_secs(20), |_, _, _| {}).await.unwrap();
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
                        assert!(ok == 0 && Instant::now() < deadline, "request failed after the mesh was up: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
            eprintln!("10 requests from curl through captured sidecars, every hop over mTLS; reviews versions {versions:?}");
            // Across nodes too: ratings lives on node 1; make sure a hop to it was taken.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (_, hops) = mesh.request(&[]).expect("request succeeds");
                if hops.iter().any(|h| h.1 == "ratings") {
                    break;
                }
                assert!(Instant::now() < deadline, "no request reached ratings on node 1");
            }
            // HTTP/2 from an app that knows nothing of the mesh either.
            mesh.request(&["--http2-prior-knowledge"]).expect("HTTP/2 request crossed the mesh over mTLS");
            // Port 9080 excluded from the client's capture (re-applying the
            // rules in place): its plaintext connection no longer goes through
            // the client's sidecar, so productpage's pod, which accepts only
            // mutual TLS inbound, refuses it. Were the exclusion ignored, the
            // client's sidecar would carry it over mTLS and it would get 200.
            let out = mesh.node.run("client", &[POD, "capture", "--exclude-outbound-ports=9080"]).unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            let pp = mesh.specs.iter().find(|w| w.name == "productpage-v1").unwrap().address;
            let direct = format!("http://{pp}:9080/health");
            let out = mesh.node.run("client", &["curl", "-sS", "-m", "5", "-o", "/dev/null", "-w", "%{http_code}", &direct]).unwrap();
            assert_ne!(String::from_utf8_lossy(&out.stdout), "200", "plaintext reached a STRICT pod's app");
            mesh.stop().await;
        });
    })
    .join()
    .unwrap();
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
