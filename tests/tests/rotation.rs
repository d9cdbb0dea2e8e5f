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
