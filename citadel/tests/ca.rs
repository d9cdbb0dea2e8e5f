//! Citadel over real gRPC and TLS: what a caller gets, and what it is refused.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use mesh_citadel::{Citadel, Config};
use mesh_identity::SpiffeId;
use tonic::Code;

mod common;
use common::{Ca, create, csr_for, pem_der};

async fn start(max_lifetime: Duration) -> Ca {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = Config::new(dir.path());
    cfg.max_lifetime = max_lifetime;
    let mut ca = common::serve(cfg).await;
    ca._dir = Some(dir);
    ca
}

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "default", sa)
}

async fn call(
    ca: &Ca,
    token: Option<&str>,
    csr: String,
    secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    create(ca, None, token, csr, secs).await
}

#[tokio::test]
async fn issues_the_granted_identity_with_a_clamped_lifetime() {
    let ca = start(Duration::from_secs(7200)).await;
    let token = ca
        .citadel
        .mint_token(&id("reviews"), Duration::from_secs(60));
    let chain = call(
        &ca,
        Some(&token),
        csr_for(&["spiffe://cluster.local/ns/default/sa/reviews"]),
        10 * 24 * 3600,
    )
    .await
    .unwrap();
    assert_eq!(chain.len(), 2, "leaf then root");
    assert_eq!(chain[1], ca.citadel.roots_pem());
    let leaf = rustls::pki_types::CertificateDer::from(pem_der(&chain[0]));
    assert_eq!(mesh_identity::identity_of(&leaf).unwrap(), id("reviews"));
    let life = mesh_identity::not_after(&leaf)
        .unwrap()
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        life <= Duration::from_secs(7200) && life > Duration::from_secs(7000),
        "lifetime {life:?} not clamped to 2h"
    );
}

#[tokio::test]
async fn refuses_bad_callers_and_bad_requests_with_reasons() {
    let ca = start(Duration::from_secs(86400)).await;
    let good_csr = || csr_for(&["spiffe://cluster.local/ns/default/sa/reviews"]);
    let token = ca
        .citadel
        .mint_token(&id("reviews"), Duration::from_secs(60));

    let e = call(&ca, None, good_csr(), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("Bearer"), "{}", e.message());

    let e = call(&ca, Some("not-a-token"), good_csr(), 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("token"), "{}", e.message());

    let other = tempfile::tempdir().unwrap();
    let foreign = Citadel::open(Config::new(other.path()))
        .unwrap()
        .mint_token(&id("reviews"), Duration::from_secs(60));
    let e = call(&ca, Some(&foreign), good_csr(), 0).await.unwrap_err();
    assert!(e.message().contains("signature"), "{}", e.message());

    let e = call(
        &ca,
        Some(&token),
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n".into(),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("csr"), "{}", e.message());

    let e = call(
        &ca,
        Some(&token),
        csr_for(&["spiffe://cluster.local/ns/default/sa/admin"]),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message().contains("sa/admin") && e.message().contains("sa/reviews"),
        "{}",
        e.message()
    );

    let e = call(
        &ca,
        Some(&token),
        csr_for(&[
            "spiffe://cluster.local/ns/default/sa/reviews",
            "spiffe://cluster.local/ns/default/sa/x",
        ]),
        0,
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // Citadel still serves after all of that.
    call(&ca, Some(&token), good_csr(), 0).await.unwrap();
}

#[test]
fn refuses_a_root_key_readable_by_others_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    drop(Citadel::open(Config::new(dir.path())).unwrap());
    let key = dir
        .path()
        .join(mesh_citadel::authority::GENERATED_DIR)
        .join(mesh_citadel::material::CA_KEY_FILE);
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = Citadel::open(Config::new(dir.path()))
        .err()
        .expect("must refuse")
        .to_string();
    assert!(
        err.contains(&key.display().to_string()) && err.contains("chmod 600"),
        "{err}"
    );
}

/// `citadel serve` and a `mint-token` run (or two replicas starting) open one
/// state directory at the same time; each must start, and the state stays
/// whole.
#[test]
fn citadels_opening_one_state_directory_at_once_all_start() {
    let dir = tempfile::tempdir().unwrap();
    let first = Citadel::open(Config::new(dir.path())).unwrap();
    let root = first.roots_pem();
    drop(first);
    std::thread::scope(|s| {
        let opened: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    for _ in 0..25 {
                        let c = Citadel::open(Config::new(dir.path()))?;
                        assert_eq!(c.roots_pem(), root);
                    }
                    Ok::<_, mesh_citadel::authority::AuthorityError>(())
                })
            })
            .collect();
        for t in opened {
            t.join().unwrap().expect("every open starts");
        }
    });
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(left.is_empty(), "temporary files left behind: {left:?}");
}
