//! Certificates renew before they expire, for sidecars and for the control
//! plane alike, without a request failing.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use mesh_tests::Mesh;

const LIFETIME: Duration = Duration::from_secs(4);

/// The certificate pilot presents to a new connection, as its expiry.
async fn pilot_cert_expiry(mesh: &Mesh) -> SystemTime {
    let id = mesh.identity_of("client");
    let creds = mesh_identity::grpc::certificate_from(
        mesh.cp.ca_addr,
        &mesh.cp.token_for(&id),
        &id,
        Duration::ZERO,
        &mesh.cp.citadel.roots_pem(),
    )
    .await
    .expect("citadel answers");
    let config = mesh_identity::client_config(
        Some(&creds),
        creds.roots.clone(),
        mesh_pilot::identity("cluster.local"),
        &[b"h2"],
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(mesh.cp.pilot_addr)
        .await
        .unwrap();
    let name = rustls::pki_types::ServerName::IpAddress(mesh.cp.pilot_addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("pilot's certificate verifies (it is current)");
    let leaf = &tls.get_ref().1.peer_certificates().unwrap()[0];
    mesh_identity::not_after(leaf).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn certificates_renew_before_expiry_with_no_request_lost() {
    let mut mesh = Mesh::start_with_cert_lifetime(LIFETIME).await;
    let first = pilot_cert_expiry(&mesh).await;
    let stop = Arc::new(AtomicBool::new(false));
    let http = mesh.client();
    let client_id = mesh.identity_of("client").to_string();
    let s = stop.clone();
    let load = tokio::spawn(async move {
        let (mut ok, mut failures) = (0, Vec::new());
        while !s.load(Ordering::Relaxed) {
            match meshctl::traffic::one(&http, &client_id).await {
                Ok(_) => ok += 1,
                Err(e) => failures.push(e),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (ok, failures)
    });
    // Past the first certificates' expiry.
    tokio::time::sleep(LIFETIME + Duration::from_secs(2)).await;
    let later = pilot_cert_expiry(&mesh).await;
    assert!(
        later > first,
        "pilot still presents the certificate that expired at {first:?}"
    );
    // A sidecar holds a certificate newer than the one it started with.
    let admin = reqwest::Client::builder().no_proxy().build().unwrap();
    let dump: serde_json::Value = admin
        .get(format!(
            "http://{}/config_dump",
            mesh.workload("reviews-v1").admin()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let left = dump["certificate"]["seconds_to_expiry"].as_u64().unwrap();
    assert!(left <= LIFETIME.as_secs(), "{left}");
    // New connections need the renewed certificates on both sides: restart
    // pilot, and every sidecar must reconnect to it.
    mesh.cp.stop_pilot().await;
    mesh.cp.start_pilot().await.expect("pilot restarts");
    mesh.wait_all_proxies_synced(Duration::from_secs(10)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = load.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} requests failed: {failures:?}",
        failures.len(),
        ok + failures.len()
    );
    assert!(ok > 50, "too little traffic ({ok})");
    mesh.stop().await;
}

/// Requests through the mesh from `loops` loops at once until `stop`.
fn steady_load(
    mesh: &Mesh,
    loops: usize,
    stop: Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<(usize, Vec<String>)>> {
    (0..loops)
        .map(|_| {
            let http = mesh.client();
            let client_id = mesh.identity_of("client").to_string();
            let stop = stop.clone();
            tokio::spawn(async move {
                let (mut ok, mut failures) = (0, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    match meshctl::traffic::one(&http, &client_id).await {
                        Ok(_) => ok += 1,
                        Err(e) => failures.push(e),
                    }
                }
                (ok, failures)
            })
        })
        .collect()
}

/// Waits for the load loops; their successes and failures added up.
async fn finish(load: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>) -> (usize, Vec<String>) {
    let (mut ok, mut failures) = (0, Vec::new());
    for l in load {
        let (o, f) = l.await.unwrap();
        ok += o;
        failures.extend(f);
    }
    (ok, failures)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_root_rotates_under_load_with_no_request_failed() {
    let mut mesh = Mesh::start().await;
    let old = mesh.cp.citadel.authority().bundle().signing_root.clone();
    // Credentials from the old root, held back to try after the rotation.
    let held = mesh.creds_for(&mesh.identity_of("client")).await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&mesh, 4, stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;

    let admin =
        meshctl::ca::Admin::local(mesh.cp.ca_addr, &mesh.state_dir().join("citadel")).unwrap();
    let mut said = Vec::new();
    let status = admin
        .rotate(None, Duration::from_secs(30), |l| said.push(l.to_string()))
        .await
        .expect("rotation completes");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = finish(load).await;
    assert!(
        failures.is_empty(),
        "{} of {} requests failed during the rotation: {:?}",
        failures.len(),
        ok + failures.len(),
        &failures[..failures.len().min(5)]
    );
    // About 600 on a quiet machine; far fewer while CI builds beside it.
    assert!(ok > 50, "too little traffic ({ok})");
    let steps: Vec<&str> = said
        .iter()
        .filter_map(|l| l.split(':').next())
        .filter(|s| ["prepare", "switch", "commit"].contains(s))
        .collect();
    assert_eq!(steps, ["prepare", "switch", "commit"], "{said:?}");

    // One root now, a new one, and every watcher (each sidecar and pilot)
    // holds a certificate from it.
    assert_eq!(status.phase, "steady");
    assert_eq!(status.roots.len(), 1);
    let new = &status.roots[0].sha256;
    assert_ne!(new, &old);
    assert_eq!(status.workloads.len(), mesh.specs.len() + 1, "{status:?}");
    for w in &status.workloads {
        assert_eq!(
            &w.leaf_root_sha256, new,
            "{} still on the old root",
            w.identity
        );
    }

    // The old root no longer vouches for anyone: a sidecar refuses a
    // certificate from it, and accepts one from the new root.
    let reviews = std::net::SocketAddr::new(
        mesh.workload("reviews-v1").address,
        mesh_proto::ports::INBOUND,
    );
    let fresh = mesh.creds_for(&mesh.identity_of("client")).await;
    let to_reviews = |c: &mesh_identity::Credentials| {
        mesh_identity::client_config(
            Some(c),
            fresh.roots.clone(),
            mesh.identity_of("reviews-v1"),
            &[b"h2"],
        )
        .unwrap()
    };
    mesh_tests::handshake(to_reviews(&fresh), reviews)
        .await
        .expect("a certificate from the new root is accepted");
    assert!(
        mesh_tests::handshake(to_reviews(&held), reviews)
            .await
            .is_err(),
        "a certificate from the removed root was accepted"
    );
    // New connections to pilot use the new certificates on both sides.
    mesh.cp.stop_pilot().await;
    mesh.cp.start_pilot().await.expect("pilot restarts");
    mesh.wait_all_proxies_synced(Duration::from_secs(10)).await;
    mesh.stop().await;
}

/// `GET /healthz/ready` on a workload's admin port: (status, body).
async fn readiness(mesh: &Mesh, workload: &str) -> (u16, String) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .get(format!(
            "http://{}/healthz/ready",
            mesh.workload(workload).admin()
        ))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// Seconds until each sidecar's certificate expires, from its config dump.
async fn seconds_to_expiry(mesh: &Mesh) -> Vec<u64> {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut out = Vec::new();
    for w in &mesh.specs {
        let dump: serde_json::Value = http
            .get(format!("http://{}/config_dump", w.admin()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        out.push(dump["certificate"]["seconds_to_expiry"].as_u64().unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn with_citadel_away_sidecars_serve_until_expiry_then_recover() {
    let mut mesh = Mesh::start_with_cert_lifetime(Duration::from_secs(8)).await;
    mesh.cp.stop_citadel().await;
    // Timings from the certificates the sidecars hold (a busy machine may
    // have taken a while to start the mesh).
    let left = seconds_to_expiry(&mesh).await;
    let (first, last) = (*left.iter().min().unwrap(), *left.iter().max().unwrap());
    assert!(first >= 2, "certificates already about to expire: {left:?}");
    let started = std::time::Instant::now();
    // Renewal falls due at about half the lifetime and fails; the current
    // certificates keep serving, and the sidecars stay ready.
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(&mesh, 2, stop.clone());
    tokio::time::sleep(Duration::from_secs(first - 1)).await;
    assert_eq!(readiness(&mesh, "reviews-v1").await.0, 200);
    stop.store(true, Ordering::Relaxed);
    let (ok, failures) = finish(load).await;
    assert!(
        failures.is_empty(),
        "requests failed while the certificates were still valid: {:?}",
        &failures[..failures.len().min(5)]
    );
    assert!(ok > 20, "too little traffic ({ok})");
    // Once a certificate has actually expired, its sidecar says so.
    let deadline = started + Duration::from_secs(last + 5);
    loop {
        let (code, body) = readiness(&mesh, "reviews-v1").await;
        if code == 503 {
            assert!(body.contains("certificate expired"), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "still ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // citadel returns: every sidecar renews (its backoff is capped) and is
    // ready again, and requests flow.
    mesh.cp.start_citadel().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    for w in mesh.specs.clone() {
        while readiness(&mesh, &w.name).await.0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} not ready again",
                w.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let http = mesh.client();
    mesh.request(&http).await.expect("requests flow again");
    mesh.stop().await;
}
