//! The sidecar binary as deployed (`cargo build-sidecar`, which CI runs
//! before the tests): linked statically, with the functions it runs laid
//! out first, so a sidecar maps little code it does not use; and, once
//! settled, without the code only start-up runs.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use mesh_tests::bench::{self, Layout};
use meshctl::controlplane::ControlPlane;
use meshctl::workloads::{self, Launcher};

/// The deployed sidecar, or `None` (having said why) where it is not built.
fn deployed() -> Option<PathBuf> {
    let exe = bench::target_dir().join("sidecar/mesh-proxy");
    if !exe.is_file() {
        eprintln!(
            "SKIPPED: {} is not built; `cargo build-sidecar` builds it (CI does)",
            exe.display()
        );
        return None;
    }
    Some(exe)
}

#[test]
fn the_deployed_sidecar_is_static_with_the_code_it_runs_first() {
    let Some(exe) = deployed() else { return };
    let headers = Command::new("readelf")
        .args(["--program-headers", "--wide"])
        .arg(&exe)
        .output()
        .expect("readelf (binutils) runs");
    assert!(
        headers.status.success(),
        "readelf failed on {}",
        exe.display()
    );
    let headers = String::from_utf8_lossy(&headers.stdout);
    assert!(
        !headers.contains("INTERP"),
        "the deployed sidecar is linked dynamically (it names a program interpreter):\n{headers}"
    );

    let layout = Layout::of(&exe).expect("the sidecar's symbols and proxy/sidecar.order read");
    assert!(
        !layout.stale(),
        "only {} of the {} functions in proxy/sidecar.order are in the sidecar: the list is \
         stale; `cargo run --release -p mesh-tests --bin bench-dataplane -- --layout` writes \
         it afresh",
        layout.found,
        layout.listed
    );
    assert!(
        layout.span * 2 < layout.text,
        "the functions proxy/sidecar.order lists are spread over {} of the sidecar's {} bytes \
         of code, not laid out first",
        layout.span,
        layout.text
    );

    let help = Command::new(&exe)
        .arg("--help")
        .output()
        .expect("the sidecar runs");
    assert!(
        help.status.success(),
        "mesh-proxy --help failed: {}",
        String::from_utf8_lossy(&help.stderr)
    );
}

const WORKLOAD: &str = r#"
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: settle-client, namespace: default}
spec: {address: 127.0.43.1, labels: {app: settle-client}, serviceAccount: settle-client}
"#;

const LATER_SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: settle-later, namespace: default}
spec:
  hosts: [settle-later.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.43.9}]
"#;

/// Polls `check` until it returns `Some` or `within` passes.
async fn eventually<T>(within: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Once ready and settled, the sidecar unmaps the code only start-up runs
/// (what a user sees as idle RSS); a config update then runs some of that
/// code again, is applied, and the sidecar unmaps it again once settled.
#[tokio::test]
async fn the_deployed_sidecar_unmaps_its_start_up_code_once_settled() {
    let Some(exe) = deployed() else { return };
    if !cfg!(target_arch = "x86_64") {
        eprintln!("SKIPPED: the sidecar is laid out (and unmaps start-up code) on x86-64 only");
        return;
    }
    let layout = Layout::of(&exe).expect("the sidecar's symbols read");
    assert!(
        !layout.cold.is_empty(),
        "the sidecar has no markers around its start-up code: {layout:?}"
    );
    let dir = tempfile::tempdir().unwrap();
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir).unwrap();
    std::fs::write(config_dir.join("workload.yaml"), WORKLOAD).unwrap();
    let cp = ControlPlane::start(
        dir.path(),
        &config_dir,
        IpAddr::V4(Ipv4Addr::new(127, 0, 43, 254)),
    )
    .await
    .expect("the control plane starts");
    let specs = workloads::from_config(&config_dir).unwrap();
    let launcher = Launcher::Processes {
        // Runs the apps; this workload has none.
        exe: PathBuf::from(env!("CARGO_BIN_EXE_mesh-pod")),
        proxy_exe: Some(exe.clone()),
        log_dir: dir.path().to_path_buf(),
    };
    let pods = workloads::launch(&cp, &specs, &launcher, dir.path())
        .await
        .expect("the sidecar starts");
    workloads::wait_ready(&specs, Duration::from_secs(30), |_, _, _| {})
        .await
        .expect("the sidecar gets ready");
    let pid = pods.sidecar_pids()[0].1;
    // At most one fault-around window (64 KiB) of the stretch mapped again.
    let unmapped = async || {
        let (resident, stretch) = layout.cold_resident(pid, &exe).expect("pagemap reads");
        (resident <= 64 << 10).then_some(stretch)
    };
    let settle = mesh_proxy::SETTLE + Duration::from_secs(8);
    let stretch = eventually(settle, unmapped).await.unwrap_or_else(|| {
        panic!(
            "the sidecar kept its start-up code mapped: {:?} (resident, stretch bytes) \
             {settle:?} after it was ready",
            layout.cold_resident(pid, &exe)
        )
    });
    assert!(
        stretch >= 256 << 10,
        "only {stretch} bytes of start-up code laid out between the markers"
    );

    // A config update after the unmapping: applied all the same.
    std::fs::write(config_dir.join("later.yaml"), LATER_SERVICE).unwrap();
    let http = reqwest::Client::new();
    let dump = "http://127.0.43.1:15000/config_dump";
    let applied = eventually(Duration::from_secs(15), async || {
        let body = http.get(dump).send().await.ok()?.text().await.ok()?;
        body.contains("settle-later.default.svc.cluster.local")
            .then_some(())
    })
    .await;
    assert!(
        applied.is_some(),
        "the sidecar never applied the config update"
    );
    let again = eventually(settle, unmapped).await;
    assert!(
        again.is_some(),
        "the sidecar kept the code the update ran mapped: {:?} (resident, stretch bytes)",
        layout.cold_resident(pid, &exe)
    );
    let ready = http
        .get("http://127.0.43.1:15021/healthz/ready")
        .send()
        .await
        .expect("the sidecar answers");
    assert_eq!(ready.status(), 200, "the sidecar is no longer ready");
    pods.stop().await;
    cp.stop().await;
}
