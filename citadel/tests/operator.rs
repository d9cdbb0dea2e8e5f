//! Citadel as an operator runs it: signing material made with the openssl
//! CLI in Istio's plug-in layout (an intermediate under an offline root),
//! certificates checked by `openssl verify` and `openssl x509`, CSRs made by
//! `openssl req` with keys citadel must accept or refuse, renewal by a
//! workload's current certificate, and the admin service's gate.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use mesh_citadel::{Citadel, Config};
use mesh_identity::SpiffeId;
use mesh_proto::resources::CaStatusRequest;
use mesh_proto::resources::ca_admin_client::CaAdminClient;
use tonic::Code;

const REVIEWS: &str = "spiffe://cluster.local/ns/default/sa/reviews";

fn openssl_missing() -> bool {
    let missing = Command::new("openssl").arg("version").output().is_err();
    if missing {
        eprintln!("SKIPPED: the openssl CLI is not installed (apt-get install openssl)");
    }
    missing
}

fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An operator's offline root and, under it, an intermediate for citadel,
/// laid out as Istio's `cacerts`: ca-cert.pem, ca-key.pem, root-cert.pem,
/// cert-chain.pem (intermediate, then root).
fn operator_material(dir: &Path, name: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign,digitalSignature\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "root-key.pem",
            "-out",
            "root-cert.pem",
            "-days",
            "365",
            "-subj",
            &format!("/O=cluster.local/CN={name} Root"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca-key.pem",
            "-out",
            "ca.csr",
            "-subj",
            &format!("/O=cluster.local/CN={name} Intermediate"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "ca.csr",
            "-CA",
            "root-cert.pem",
            "-CAkey",
            "root-key.pem",
            "-CAcreateserial",
            "-out",
            "ca-cert.pem",
            "-days",
            "100",
            "-extfile",
            "ext.cnf",
        ],
    );
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem")).unwrap()
        + &std::fs::read_to_string(dir.join("root-cert.pem")).unwrap();
    std::fs::write(dir.join("cert-chain.pem"), chain).unwrap();
    std::fs::set_permissions(
        dir.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
}

mod common;
use common::{create, pem_der, serve};

/// A CSR made by `openssl req` over a new key of `newkey` (rsa:1024,
/// ec -pkeyopt ..., ed25519) asking for `san`.
fn openssl_csr(dir: &Path, newkey: &[&str], san: &str) -> String {
    let mut args = vec!["req", "-new", "-newkey"];
    args.extend_from_slice(newkey);
    let ext = format!("subjectAltName={san}");
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        "/dev/null",
        "-subj",
        "/O=test",
        "-addext",
        &ext,
    ]);
    openssl(dir, &args)
}

#[tokio::test]
async fn an_intermediate_from_plugin_files_signs_and_openssl_verifies_the_chain() {
    if openssl_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("cacerts");
    operator_material(&plugin, "Operator");
    let mut config = Config::new(dir.path().join("state"));
    config.plugin_dir = Some(plugin.clone());
    let ca = serve(config).await;
    let token = ca
        .citadel
        .mint_token(&REVIEWS.parse().unwrap(), Duration::from_secs(60));
    let csr = openssl_csr(
        dir.path(),
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        &format!("URI:{REVIEWS}"),
    );
    let chain = create(&ca, None, Some(&token), csr, 3600).await.unwrap();
    assert_eq!(chain.len(), 3, "leaf, intermediate, root");
    std::fs::write(dir.path().join("leaf.pem"), &chain[0]).unwrap();
    std::fs::write(dir.path().join("untrusted.pem"), &chain[1]).unwrap();
    let verified = openssl(
        dir.path(),
        &[
            "verify",
            "-CAfile",
            "cacerts/root-cert.pem",
            "-untrusted",
            "untrusted.pem",
            "leaf.pem",
        ],
    );
    assert_eq!(verified.trim(), "leaf.pem: OK");
    let fields = openssl(
        dir.path(),
        &[
            "x509",
            "-in",
            "leaf.pem",
            "-noout",
            "-ext",
            "subjectAltName,keyUsage,extendedKeyUsage,basicConstraints",
        ],
    );
    assert!(fields.contains(&format!("URI:{REVIEWS}")), "{fields}");
    assert!(fields.contains("Digital Signature"), "{fields}");
    assert!(
        fields.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{fields}"
    );
    assert!(fields.contains("CA:FALSE"), "{fields}");
    // Validity: starts about now, ends within the hour asked for.
    let leaf = pem_der(&chain[0]);
    let end = mesh_identity::not_after(&leaf).unwrap();
    let left = end.duration_since(std::time::SystemTime::now()).unwrap();
    assert!(left <= Duration::from_secs(3600) && left > Duration::from_secs(3500));
    // citadel's status names the operator root as the signing one.
    let status = ca.citadel.authority().bundle();
    assert_eq!(status.roots.len(), 1);
    assert!(status.roots[0].subject.contains("Operator Root"));
}

#[test]
fn bad_plugin_material_is_refused_naming_the_file() {
    if openssl_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let open = |plugin: &Path| {
        let mut c = Config::new(dir.path().join(format!("state-{}", rand_suffix())));
        c.plugin_dir = Some(plugin.to_path_buf());
        Citadel::open(c).err().map(|e| e.to_string())
    };
    let good = dir.path().join("good");
    operator_material(&good, "Good");
    assert_eq!(open(&good), None, "good material opens");

    // A key the group can read.
    let loose = dir.path().join("loose");
    operator_material(&loose, "Loose");
    std::fs::set_permissions(
        loose.join("ca-key.pem"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    let e = open(&loose).unwrap();
    assert!(
        e.contains("loose/ca-key.pem") && e.contains("chmod 600"),
        "{e}"
    );

    // A Kubernetes Secret mounted under the pod's fsGroup: root's, of the
    // pod's group, mode 0440. Accepted; readable by others too, refused.
    if std::fs::metadata(loose.join("ca-key.pem")).unwrap().uid() == 0 {
        let mounted = dir.path().join("mounted");
        operator_material(&mounted, "Mounted");
        let key = mounted.join("ca-key.pem");
        std::os::unix::fs::chown(&key, Some(0), Some(1337)).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o440)).unwrap();
        assert_eq!(open(&mounted), None, "a Secret under fsGroup opens");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o444)).unwrap();
        let e = open(&mounted).unwrap();
        assert!(
            e.contains("mounted/ca-key.pem") && e.contains("chmod 600"),
            "{e}"
        );
    } else {
        eprintln!("not root: the fsGroup Secret case needs a root-owned key; skipped");
    }

    // ca-cert.pem from one set, ca-key.pem from another.
    let mixed = dir.path().join("mixed");
    operator_material(&mixed, "Mixed");
    std::fs::copy(good.join("ca-key.pem"), mixed.join("ca-key.pem")).unwrap();
    let e = open(&mixed).unwrap();
    assert!(
        e.contains("mixed/ca-cert.pem")
            && e.contains("mixed/ca-key.pem")
            && e.contains("does not belong"),
        "{e}"
    );

    // A chain whose root is not the intermediate's issuer.
    let crossed = dir.path().join("crossed");
    operator_material(&crossed, "Crossed");
    std::fs::copy(good.join("root-cert.pem"), crossed.join("root-cert.pem")).unwrap();
    std::fs::copy(good.join("root-cert.pem"), crossed.join("cert-chain.pem")).unwrap();
    let e = open(&crossed).unwrap();
    assert!(
        e.contains("crossed/ca-cert.pem") && e.contains("is not signed by"),
        "{e}"
    );

    // A key in the legacy SEC1 encoding.
    let legacy = dir.path().join("legacy");
    operator_material(&legacy, "Legacy");
    let sec1 = openssl(&legacy, &["ec", "-in", "ca-key.pem"]);
    std::fs::write(legacy.join("ca-key.pem"), sec1).unwrap();
    let e = open(&legacy).unwrap();
    assert!(
        e.contains("legacy/ca-key.pem") && e.contains("pkcs8"),
        "{e}"
    );

    // Once citadel signs with one set, another given on the command line is
    // refused: new material comes in through a rotation.
    let state = dir.path().join("state-fixed");
    let mut c = Config::new(&state);
    c.plugin_dir = Some(good.clone());
    drop(Citadel::open(c).unwrap());
    let mut c = Config::new(&state);
    c.plugin_dir = Some(mixed.clone());
    let e = Citadel::open(c).err().unwrap().to_string();
    assert!(e.contains("meshctl ca rotate --plugin-certs"), "{e}");
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[tokio::test]
async fn csr_keys_are_checked_and_each_refusal_says_why() {
    if openssl_missing() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let ca = serve(Config::new(dir.path().join("state"))).await;
    let token = ca
        .citadel
        .mint_token(&REVIEWS.parse().unwrap(), Duration::from_secs(60));
    let uri = format!("URI:{REVIEWS}");
    for ok in [
        &["rsa:2048"][..],
        &["ec", "-pkeyopt", "ec_paramgen_curve:P-384"][..],
    ] {
        let csr = openssl_csr(dir.path(), ok, &uri);
        create(&ca, None, Some(&token), csr, 3600)
            .await
            .unwrap_or_else(|e| panic!("{ok:?} refused: {}", e.message()));
    }
    for (weak, says) in [
        (&["rsa:1024"][..], "RSA-1024"),
        (&["ed25519"][..], "of algorithm 1.3.101.112"),
        (
            &["ec", "-pkeyopt", "ec_paramgen_curve:secp256k1"][..],
            "curve",
        ),
    ] {
        let csr = openssl_csr(dir.path(), weak, &uri);
        let e = create(&ca, None, Some(&token), csr, 3600)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{weak:?}");
        assert!(e.message().contains(says), "{weak:?}: {}", e.message());
    }
    // A DNS SAN beside the URI, and a DNS SAN alone.
    let csr = openssl_csr(dir.path(), &["rsa:2048"], &format!("{uri},DNS:reviews"));
    let e = create(&ca, None, Some(&token), csr, 3600)
        .await
        .unwrap_err();
    assert!(
        e.message().contains("2 subject alternative names"),
        "{}",
        e.message()
    );
    let csr = openssl_csr(dir.path(), &["rsa:2048"], "DNS:reviews");
    let e = create(&ca, None, Some(&token), csr, 3600)
        .await
        .unwrap_err();
    assert!(e.message().contains("not a SPIFFE URI"), "{}", e.message());
    // An oversized request.
    let e = create(&ca, None, Some(&token), "A".repeat(100_000), 3600)
        .await
        .unwrap_err();
    assert!(e.message().contains("at most"), "{}", e.message());
    // Still serving, and it counted the refusals.
    let csr = openssl_csr(dir.path(), &["rsa:2048"], &uri);
    create(&ca, None, Some(&token), csr, 3600).await.unwrap();
    assert_eq!(ca.citadel.authority().refused(), 6);
}

#[tokio::test]
async fn a_workload_renews_with_its_current_certificate_and_only_for_itself() {
    let dir = tempfile::tempdir().unwrap();
    let ca = serve(Config::new(dir.path().join("state"))).await;
    let id: SpiffeId = REVIEWS.parse().unwrap();
    let token = ca.citadel.mint_token(&id, Duration::from_secs(60));
    let first = mesh_identity::grpc::certificate_from(
        ca.addr,
        &token,
        &id,
        Duration::ZERO,
        &ca.citadel.roots_pem(),
    )
    .await
    .unwrap();
    // No token at all: the certificate is the credential.
    let csr = common::csr_for_sa;
    let chain = create(&ca, Some(&first), None, csr("reviews"), 3600)
        .await
        .unwrap();
    assert_eq!(mesh_identity::identity_of(&pem_der(&chain[0])).unwrap(), id);
    let e = create(&ca, Some(&first), None, csr("ratings"), 3600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("sa/ratings"), "{}", e.message());
    // An expired token alone is refused, and says so.
    let stale = ca.citadel.mint_token(&id, Duration::ZERO);
    let e = create(&ca, None, Some(&stale), csr("reviews"), 3600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("expired"), "{}", e.message());
}

#[tokio::test]
async fn only_the_mesh_admin_may_see_or_rotate_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = serve(Config::new(dir.path().join("state"))).await;
    let roots = Arc::new(mesh_identity::root_store(&ca.citadel.roots_pem()).unwrap());
    let tls = mesh_identity::client_config(None, roots, ca.citadel.identity(), &[b"h2"]).unwrap();
    let mut admin = CaAdminClient::new(mesh_identity::grpc::channel(ca.addr, tls));
    let status_as = |token: String| {
        let mut req = tonic::Request::new(CaStatusRequest {});
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        req
    };
    let workload = ca
        .citadel
        .mint_token(&REVIEWS.parse().unwrap(), Duration::from_secs(60));
    let e = admin.status(status_as(workload)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("mesh-admin"), "{}", e.message());
    let token = ca
        .citadel
        .mint_token(&ca.citadel.admin_identity(), Duration::from_secs(60));
    let status = admin.status(status_as(token)).await.unwrap().into_inner();
    assert_eq!(status.phase, "steady");
    assert_eq!(status.roots.len(), 1);
    assert_eq!(status.roots[0].role, "signing");
}
