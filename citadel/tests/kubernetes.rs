//! Kubernetes service-account tokens checked by TokenReview through kube-rs.
//! No API server runs here: kube-rs's client talks to a `tower-test` mock
//! service that checks each request (POST
//! /apis/authentication.k8s.io/v1/tokenreviews with the token and citadel's
//! audience) and answers with a TokenReview from `tests/fixtures/`, in the
//! shape kube-apiserver returns.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use mesh_citadel::Config;
use mesh_citadel::kubernetes::{DEFAULT_AUDIENCE, TokenReviewer};
use tonic::Code;

mod common;
use common::{create, csr_for_sa as csr, pem_der, serve_with};

/// A token shaped like a projected service-account JWT.
const JWT: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.eyJhdWQiOlsiaXN0aW8tY2EiXX0.c2lnbmF0dXJl";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// A kube client whose API server answers every TokenReview with the
/// fixtures named, in order, after checking the request.
fn api_server(answers: Vec<&'static str>) -> (kube::Client, tokio::task::JoinHandle<usize>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let task = tokio::spawn(async move {
        let mut served = 0;
        for name in answers {
            let Some((request, send)) = handle.next_request().await else {
                break;
            };
            assert_eq!(request.method(), http::Method::POST);
            assert_eq!(
                request.uri().path(),
                "/apis/authentication.k8s.io/v1/tokenreviews"
            );
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let review: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(review["kind"], "TokenReview");
            assert_eq!(review["spec"]["token"], JWT);
            assert_eq!(review["spec"]["audiences"][0], DEFAULT_AUDIENCE);
            send.send_response(
                Response::builder()
                    .status(201)
                    .header("content-type", "application/json")
                    .body(Body::from(fixture(name)))
                    .unwrap(),
            );
            served += 1;
        }
        served
    });
    (kube::Client::new(service, "default"), task)
}

#[tokio::test]
async fn a_service_account_token_gets_that_account_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let (client, api) = api_server(vec![
        "tokenreview-authenticated.json",
        "tokenreview-authenticated.json",
        "tokenreview-wrong-audience.json",
        "tokenreview-expired.json",
        "tokenreview-no-audience.json",
        "tokenreview-user.json",
    ]);
    let reviewer = Arc::new(TokenReviewer::new(
        client,
        DEFAULT_AUDIENCE,
        "cluster.local",
    ));
    let ca = serve_with(Config::new(dir.path()), vec![reviewer]).await;

    // The account the API server names is the identity granted.
    let chain = create(&ca, None, Some(JWT), csr("bookinfo-reviews"), 3600)
        .await
        .expect("a reviewed token is accepted");
    assert_eq!(
        mesh_identity::identity_of(&pem_der(&chain[0]))
            .unwrap()
            .to_string(),
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    // The same token cannot buy another account's certificate.
    let e = create(&ca, None, Some(JWT), csr("bookinfo-ratings"), 3600)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(e.message().contains("bookinfo-ratings"), "{}", e.message());

    for (why, says) in [
        ("wrong audience", "is invalid for the target audiences"),
        ("expired", "service account token has expired"),
        ("server not audience-aware", "did not confirm audience"),
        ("not a service account", "is not a service account"),
    ] {
        let e = create(&ca, None, Some(JWT), csr("bookinfo-reviews"), 3600)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{why}");
        assert!(
            e.message().starts_with("Kubernetes token refused") && e.message().contains(says),
            "{why}: {}",
            e.message()
        );
    }
    assert_eq!(api.await.unwrap(), 6, "every answer was asked for");
}

#[tokio::test]
async fn an_unreachable_api_server_is_unavailable_not_a_refusal() {
    let dir = tempfile::tempdir().unwrap();
    // The mock answers nothing: its handle is dropped at once.
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    drop(handle);
    let client = kube::Client::new(service, "default");
    let reviewer = Arc::new(TokenReviewer::new(
        client,
        DEFAULT_AUDIENCE,
        "cluster.local",
    ));
    let ca = serve_with(Config::new(dir.path()), vec![reviewer]).await;
    let e = tokio::time::timeout(
        Duration::from_secs(10),
        create(&ca, None, Some(JWT), csr("bookinfo-reviews"), 3600),
    )
    .await
    .expect("answers promptly")
    .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
    assert!(
        e.message().contains("cannot check the token"),
        "{}",
        e.message()
    );
    // Local tokens keep working beside it.
    let token = ca.citadel.mint_token(
        &"spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
            .parse()
            .unwrap(),
        Duration::from_secs(60),
    );
    create(&ca, None, Some(&token), csr("bookinfo-reviews"), 3600)
        .await
        .expect("local token still accepted");
}

/// The trust bundle reaches every namespace (but kube-system and
/// kube-public) as the ConfigMap injected pods mount; a steady mesh costs
/// one namespace list per period, and a root rotation republishes.
#[tokio::test]
async fn the_trust_bundle_is_published_into_every_namespace() {
    use std::sync::Mutex;
    let dir = tempfile::tempdir().unwrap();
    let authority = Arc::new(
        mesh_citadel::authority::Authority::open(dir.path(), "cluster.local", None).unwrap(),
    );
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen: Arc<Mutex<Vec<(String, String, serde_json::Value)>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (
                request.method().to_string(),
                request.uri().path().to_string(),
            );
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let answer = if path == "/api/v1/namespaces" {
                let items: Vec<_> = ["default", "bookinfo", "kube-system"]
                    .iter()
                    .map(|n| {
                        serde_json::json!({
                        "metadata": {"name": n, "uid": format!("uid-{n}"), "resourceVersion": "1",
                            "labels": {"kubernetes.io/metadata.name": n}},
                        "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}})
                    })
                    .collect();
                serde_json::json!({"kind": "NamespaceList", "apiVersion": "v1",
                    "metadata": {"resourceVersion": "5012"}, "items": items})
            } else {
                body.clone()
            };
            log.lock().unwrap().push((method, path, body));
            send.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    let client = kube::Client::new(service, "default");
    tokio::spawn(mesh_citadel::kubernetes::publish_roots(
        client,
        authority.watch(),
        Duration::from_millis(100),
    ));
    let patches = |seen: &[(String, String, serde_json::Value)]| {
        seen.iter()
            .filter(|(m, _, _)| m == "PATCH")
            .map(|(_, p, b)| {
                (
                    p.clone(),
                    b["data"]["root-cert.pem"].as_str().unwrap().to_string(),
                )
            })
            .collect::<Vec<_>>()
    };
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            for _ in 0..100 {
                if seen.lock().unwrap().len() >= n {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            panic!("only {} requests", seen.lock().unwrap().len());
        }
    };
    // list, two patches, then at least two more lists with no patches.
    wait_for(5).await;
    let roots = authority.bundle().roots_pem();
    {
        let seen = seen.lock().unwrap();
        assert_eq!(
            patches(&seen),
            [
                (
                    "/api/v1/namespaces/default/configmaps/mesh-ca-root-cert".to_string(),
                    roots.clone()
                ),
                (
                    "/api/v1/namespaces/bookinfo/configmaps/mesh-ca-root-cert".to_string(),
                    roots.clone()
                ),
            ]
        );
        assert!(
            seen[3..5]
                .iter()
                .all(|(m, p, _)| m == "GET" && p == "/api/v1/namespaces")
        );
    }
    // A rotation's first step trusts a second root: every namespace hears.
    authority.prepare(None).unwrap();
    let both = authority.bundle().roots_pem();
    assert_ne!(both, roots);
    for _ in 0..100 {
        if patches(&seen.lock().unwrap()).len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = patches(&seen.lock().unwrap());
    assert_eq!(after.len(), 4, "{after:?}");
    assert!(after[2..].iter().all(|(_, r)| *r == both));
}

/// What the mock API server of the webhook test holds.
#[derive(Default)]
struct Cluster {
    secret: Option<serde_json::Value>,
    webhooks: serde_json::Value,
    secret_patches: usize,
    webhook_patches: usize,
}

async fn until(cluster: &std::sync::Mutex<Cluster>, what: &str, done: impl Fn(&Cluster) -> bool) {
    for _ in 0..200 {
        if done(&cluster.lock().unwrap()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what}: never happened");
}

/// The sidecar injector stays trusted by the API server: citadel issues its
/// serving certificate when the Secret lacks one, keeps it while it is
/// fresh, issues it again when a rotation switches the signing root, and
/// sets every webhook's CA bundle to the trust bundle (both roots during a
/// rotation). The mock API server keeps the Secret and the webhook
/// configuration (`tests/fixtures`, in kube-apiserver's shape) and applies
/// citadel's server-side-apply patches to them.
#[tokio::test]
async fn the_injectors_certificate_and_the_webhooks_ca_bundle_are_kept_current() {
    use base64::Engine;
    use std::sync::Mutex;
    let unb64 = |s: &str| {
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(s).unwrap()).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let authority = Arc::new(
        mesh_citadel::authority::Authority::open(dir.path(), "cluster.local", None).unwrap(),
    );
    let cluster = Arc::new(Mutex::new(Cluster {
        webhooks: serde_json::from_slice(&fixture("mutatingwebhookconfiguration.json")).unwrap(),
        ..Default::default()
    }));
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let state = cluster.clone();
    tokio::spawn(async move {
        const SECRET: &str = "/api/v1/namespaces/mesh-system/secrets/mesh-injector-tls";
        const HOOKS: &str = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector";
        while let Some((request, send)) = handle.next_request().await {
            let (method, path) = (request.method().clone(), request.uri().path().to_string());
            let body = request.into_body().collect().await.unwrap().to_bytes();
            let body: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let mut c = state.lock().unwrap();
            let (status, answer) = match (method.as_str(), path.as_str()) {
                ("GET", SECRET) => match &c.secret {
                    Some(s) => (200, s.clone()),
                    None => (
                        404,
                        serde_json::from_slice(&fixture("secret-not-found.json")).unwrap(),
                    ),
                },
                ("PATCH", SECRET) => {
                    assert_eq!(body["type"], "kubernetes.io/tls");
                    c.secret_patches += 1;
                    let mut stored = body.clone();
                    stored["metadata"]["uid"] = "7d1c".into();
                    stored["metadata"]["resourceVersion"] = c.secret_patches.to_string().into();
                    c.secret = Some(stored.clone());
                    (200, stored)
                }
                ("GET", HOOKS) => (200, c.webhooks.clone()),
                ("PATCH", HOOKS) => {
                    c.webhook_patches += 1;
                    // Server-side apply: each webhook by name, only what is given.
                    for given in body["webhooks"].as_array().unwrap() {
                        let hooks = c.webhooks["webhooks"].as_array_mut().unwrap();
                        let hook = hooks
                            .iter_mut()
                            .find(|h| h["name"] == given["name"])
                            .unwrap();
                        hook["clientConfig"]["caBundle"] =
                            given["clientConfig"]["caBundle"].clone();
                    }
                    (200, c.webhooks.clone())
                }
                other => panic!("unexpected request {other:?}"),
            };
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer).unwrap()))
                    .unwrap(),
            );
        }
    });
    tokio::spawn(mesh_citadel::kubernetes::keep_webhook_current(
        kube::Client::new(service, "default"),
        authority.clone(),
        "mesh-control-plane".into(),
        Duration::from_millis(50),
    ));
    let cert_of = |c: &Cluster| {
        unb64(
            c.secret.as_ref().unwrap()["data"]["tls.crt"]
                .as_str()
                .unwrap(),
        )
    };
    let ca_bundles = |c: &Cluster| -> Vec<String> {
        c.webhooks["webhooks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| unb64(h["clientConfig"]["caBundle"].as_str().unwrap()))
            .collect()
    };

    // No certificate: one is issued for the Service's DNS names, and both
    // webhooks trust the mesh's root instead of the old bundle.
    let roots = authority.bundle().roots_pem();
    until(&cluster, "the first certificate and CA bundle", |c| {
        c.secret.is_some() && c.webhook_patches == 1
    })
    .await;
    let first = cert_of(&cluster.lock().unwrap());
    let (_, leaf) = x509_parser::pem::parse_x509_pem(first.as_bytes()).unwrap();
    let leaf = leaf.parse_x509().unwrap();
    let names: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(
        names,
        [
            "DNSName(mesh-control-plane.mesh-system.svc)",
            "DNSName(mesh-control-plane.mesh-system.svc.cluster.local)"
        ]
    );
    assert_eq!(
        ca_bundles(&cluster.lock().unwrap()),
        [roots.clone(), roots.clone()]
    );

    // A fresh certificate is kept: several periods pass with no new one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    {
        let c = cluster.lock().unwrap();
        assert_eq!((c.secret_patches, c.webhook_patches), (1, 1));
    }

    // A rotation trusts a second root: the CA bundles follow, the
    // certificate (still signed by the first root) stays.
    authority.prepare(None).unwrap();
    let both = authority.bundle().roots_pem();
    until(&cluster, "both roots in the CA bundle", |c| {
        c.webhook_patches == 2
    })
    .await;
    assert_eq!(ca_bundles(&cluster.lock().unwrap()), [both.clone(), both]);
    assert_eq!(cluster.lock().unwrap().secret_patches, 1);

    // The switch: the new root signs, so the injector gets a certificate from it.
    authority.switch().unwrap();
    until(&cluster, "a certificate from the new root", |c| {
        c.secret_patches == 2
    })
    .await;
    assert_ne!(cert_of(&cluster.lock().unwrap()), first);
}
