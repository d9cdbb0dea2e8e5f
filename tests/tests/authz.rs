//! AuthorizationPolicy enforced by the sidecars of the sample mesh: ratings
//! takes only reviews' identity, a DENY closes one path, a broken update
//! leaves the last good policy enforcing, and removing a policy reopens.

use std::time::{Duration, Instant};

use mesh_tests::Mesh;
use meshctl::authz::Described;

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}
    to:
    - operation: {methods: [GET]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-health, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  action: DENY
  rules:
  - to:
    - operation: {paths: [/health*]}
";

/// (status, body) of a GET through the client's sidecar.
async fn get(http: &reqwest::Client, url: &str) -> (u16, String) {
    let resp = http
        .get(url)
        .send()
        .await
        .expect("the client's sidecar answers");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn wait_for(http: &reqwest::Client, url: &str, status: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (got, body) = get(http, url).await;
        if got == status {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{url}: still {got} {body}, waited for {status}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn policies_allow_deny_survive_a_bad_update_and_lift() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    let ratings = "http://ratings:9080/ratings/0";
    let health = "http://productpage:9080/health";
    assert_eq!(get(&http, ratings).await.0, 200, "open before any policy");

    mesh.write_config("authz.yaml", POLICIES);
    // The client's identity is not reviews': denied, as Istio says it.
    let body = wait_for(&http, ratings, 403).await;
    assert_eq!(body.trim(), "RBAC: access denied");
    wait_for(&http, health, 403).await;
    // Reviews still reaches ratings, and productpage's page still works.
    let mut reached_ratings = 0;
    for _ in 0..20 {
        let (_, hops) = mesh.request(&http).await.expect("productpage answers");
        reached_ratings += hops.iter().filter(|h| h.1 == "ratings").count();
    }
    assert!(reached_ratings > 0, "no request reached ratings");

    // A broken update is rejected and the last good policy keeps enforcing.
    let broken = POLICIES.replace(
        "principals: [cluster.local/ns/default/sa/bookinfo-reviews]",
        "ipBlocks: [10.0.0.0/40]",
    );
    mesh.write_config("authz.yaml", &broken);
    let pilot = mesh.cp.pilot().unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    let errors = loop {
        let e = pilot.errors();
        if !e.is_empty() {
            break e.join("\n");
        }
        assert!(
            Instant::now() < deadline,
            "pilot accepted the broken policy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        errors.contains("authz.yaml")
            && errors.contains("AuthorizationPolicy default/ratings-viewer")
            && errors.contains("spec.rules[0].from[0].source.ipBlocks")
            && errors.contains("10.0.0.0/40"),
        "{errors}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        get(&http, ratings).await.0,
        403,
        "a broken update opened access"
    );
    // `meshctl authz check` live asks the sidecar, which still enforces
    // the last good policies (the files on disk no longer load).
    assert!(meshctl::authz::load(std::slice::from_ref(&mesh.config_dir)).is_err());
    let live = async |from: &str, method: &str| {
        let req = Described {
            from: Some(from.into()),
            method: method.into(),
            path: "/ratings/0".into(),
            ..Default::default()
        };
        meshctl::authz::check_live(mesh.cp.pilot_debug_addr, "ratings-v1", Some(&req))
            .await
            .expect("the sidecar answers")
    };
    let reviews = "cluster.local/ns/default/sa/bookinfo-reviews";
    let checked = live(reviews, "GET").await;
    assert_eq!(
        checked.render().lines().take(2).collect::<Vec<_>>(),
        ["yes", "allowed by default/ratings-viewer rule 0"],
        "{checked:?}"
    );
    assert_eq!(checked.workload, "ratings-v1.default");
    assert!(!live(reviews, "POST").await.decision.unwrap().allowed());
    let client = mesh.identity_of("client").to_string();
    assert!(!live(&client, "GET").await.decision.unwrap().allowed());
    // By hand: a POST without a body lists what the sidecar enforces.
    let admin = format!(
        "http://{}:15000/authz/check",
        mesh.workload("ratings-v1").address
    );
    let listed: serde_json::Value = reqwest::Client::new()
        .post(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        listed["policies"][0]["name"], "default/ratings-viewer",
        "{listed}"
    );
    assert!(listed["decision"].is_null(), "{listed}");
    let bad = Described {
        from: Some("reviews".into()),
        ..Default::default()
    };
    let err = meshctl::authz::check_live(mesh.cp.pilot_debug_addr, "ratings-v1", Some(&bad))
        .await
        .unwrap_err();
    assert!(
        format!("{err:#}").contains("400 Bad Request: --from must look like"),
        "{err:#}"
    );

    // A misspelt field is refused too, not dropped.
    mesh.write_config("authz.yaml", &POLICIES.replace("principals:", "principal:"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        pilot.errors().join("\n").contains("principal"),
        "{:?}",
        pilot.errors()
    );
    assert_eq!(get(&http, ratings).await.0, 403);

    // Policies gone: open again.
    std::fs::remove_file(mesh.config_dir.join("authz.yaml")).unwrap();
    wait_for(&http, ratings, 200).await;
    wait_for(&http, health, 200).await;
    mesh.stop().await;
}

/// (status or error, time taken) of a GET of `url`, run in the background.
fn in_background(
    http: &reqwest::Client,
    url: &'static str,
) -> tokio::task::JoinHandle<(Option<u16>, Duration)> {
    let http = http.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let status = http.get(url).send().await.ok().map(|r| r.status().as_u16());
        (status, started.elapsed())
    })
}

/// A policy that denies a caller everything closes the connections it
/// already has: a long request in flight from it is cut within the grace
/// instead of being served. One that denies only some requests (a path)
/// leaves connections open.
#[tokio::test(flavor = "multi_thread")]
async fn a_new_policy_closes_connections_it_no_longer_allows() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    assert_eq!(get(&http, "http://ratings:9080/ratings/0").await.0, 200);
    assert_eq!(get(&http, "http://productpage:9080/health").await.0, 200);
    let to_ratings = in_background(&http, "http://ratings:9080/delay/6000");
    let to_productpage = in_background(&http, "http://productpage:9080/delay/3000");
    tokio::time::sleep(Duration::from_millis(500)).await;
    mesh.write_config("authz.yaml", POLICIES);

    let (status, took) = to_ratings.await.unwrap();
    assert!(
        took < Duration::from_secs(4),
        "the request outlived the policy that denies it: {status:?} after {took:?}"
    );
    assert_ne!(status, Some(200), "served after {took:?}");
    // The client may still ask productpage for what is not /health.
    let (status, took) = to_productpage.await.unwrap();
    assert_eq!(status, Some(200), "cut after {took:?}");
    assert!(took >= Duration::from_secs(3));
    mesh.stop().await;
}

/// A calling sidecar sends the destination's cluster as its TLS server
/// name (`outbound_.<port>_.<subset>_.<host>`, as Istio's do), so a
/// `connection.sni` condition tells apart connections meant for different
/// subsets of the same service.
#[tokio::test(flavor = "multi_thread")]
async fn connection_sni_names_the_service_and_subset_called() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    let ratings = "http://ratings:9080/ratings/0";
    let only_unsubsetted = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: by-sni, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - when:
    - key: connection.sni
      values: [outbound_.9080_._.ratings.default.svc.cluster.local]
";
    mesh.write_config("authz.yaml", only_unsubsetted);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        get(&http, ratings).await.0,
        200,
        "the SNI names ratings:9080"
    );
    // Routed to subset v1, the connection names the subset: no longer allowed.
    let subset = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  subsets:
  - {name: v1, labels: {version: v1}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: default}
spec:
  hosts: [ratings]
  http:
  - route:
    - destination: {host: ratings, subset: v1}
";
    mesh.write_config("routes.yaml", subset);
    let body = wait_for(&http, ratings, 403).await;
    assert_eq!(body.trim(), "RBAC: access denied");
    mesh.write_config(
        "authz.yaml",
        &only_unsubsetted.replace("_._.ratings", "_.v1_.ratings"),
    );
    wait_for(&http, ratings, 200).await;
    mesh.stop().await;
}

/// RequestAuthentication for ratings with `jwks`, and a policy requiring a
/// token from the issuer on /ratings/*.
fn jwt_config(jwks: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: ratings-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  jwtRules:
  - issuer: https://issuer.test
    audiences: [ratings]
    jwks: '{jwks}'
    outputClaimToHeaders:
    - {{header: x-jwt-group, claim: group}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: ratings-require-jwt, namespace: default}}
spec:
  selector: {{matchLabels: {{app: ratings}}}}
  rules:
  - from:
    - source: {{requestPrincipals: [https://issuer.test/*]}}
    to:
    - operation: {{paths: [/ratings/*]}}
    when:
    - key: request.auth.claims[group]
      values: [reviewers]
"
    )
}

async fn get_with(http: &reqwest::Client, url: &str, token: &str) -> (u16, String) {
    let resp = http
        .get(url)
        .bearer_auth(token)
        .send()
        .await
        .expect("the client's sidecar answers");
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwt_required_path_takes_valid_tokens_only() {
    use mesh_tests::Issuer;
    use serde_json::json;
    let mesh = Mesh::start().await;
    let http = mesh.client();
    let ratings = "http://ratings:9080/ratings/0";
    let issuer = Issuer::new("https://issuer.test", "k1");
    mesh.write_config("jwt.yaml", &jwt_config(&issuer.jwks()));
    let good = issuer.token(
        "alice",
        300,
        json!({"aud": "ratings", "group": "reviewers"}),
    );
    // No token: allowed past authentication, then denied by the policy.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (code, body) = get(&http, ratings).await;
        if code == 403 {
            assert_eq!(body.trim(), "RBAC: access denied");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the policy never applied ({code}); pilot says {:?}",
            mesh.cp.pilot().unwrap().errors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A valid token from the issuer, in the accepted group.
    let (code, body) = get_with(&http, ratings, &good).await;
    assert_eq!(code, 200, "{body}");
    // A claim the policy does not accept.
    let outsider = issuer.token("bob", 300, json!({"aud": "ratings", "group": "guests"}));
    assert_eq!(get_with(&http, ratings, &outsider).await.0, 403);
    // Expired, for another audience, forged (same kid, another key), from
    // an unknown issuer: 401, the token refused.
    let expired = issuer.token(
        "alice",
        -120,
        json!({"aud": "ratings", "group": "reviewers"}),
    );
    let other_aud = issuer.token(
        "alice",
        300,
        json!({"aud": "details", "group": "reviewers"}),
    );
    let forger = Issuer::new("https://issuer.test", "k1");
    let forged = forger.token(
        "alice",
        300,
        json!({"aud": "ratings", "group": "reviewers"}),
    );
    let stranger = Issuer::new("https://elsewhere.test", "k1");
    let foreign = stranger.token(
        "alice",
        300,
        json!({"aud": "ratings", "group": "reviewers"}),
    );
    for (what, token) in [
        ("expired", &expired),
        ("other audience", &other_aud),
        ("forged", &forged),
        ("unknown issuer", &foreign),
        ("garbage", &"not.a.jwt".to_string()),
    ] {
        let (code, body) = get_with(&http, ratings, token).await;
        assert_eq!(
            (code, body.trim()),
            (401, "Jwt verification fails"),
            "{what}"
        );
    }
    mesh.stop().await;
}

/// Serves `jwks` at https://127.0.0.1:PORT/keys with a certificate from a
/// CA of its own; returns the URL and the CA's PEM.
async fn jwks_server(jwks: String) -> (String, String) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_der(ca_cert.der(), ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::default();
    leaf.subject_alt_names = vec![rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap())];
    let cert = leaf.signed_by(&key, &issuer).unwrap();
    let acceptor = mesh_tests::tls_acceptor(&cert, &key);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}/keys",
        listener.local_addr().unwrap().port()
    );
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let jwks = jwks.clone();
                        async move {
                            let body = if req.uri().path() == "/keys" {
                                jwks
                            } else {
                                String::new()
                            };
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(hyper::body::Bytes::from(body)),
                            ))
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (url, ca_cert.pem())
}

#[test]
fn jwks_from_a_jwks_uri_over_https() {
    use mesh_tests::Issuer;
    use serde_json::json;
    let rt = tokio::runtime::Runtime::new().unwrap();
    let issuer = Issuer::new("https://issuer.test", "k1");
    let (url, ca_pem) = rt.block_on(jwks_server(issuer.jwks()));
    let ca_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca_file.path(), ca_pem).unwrap();
    // pilot trusts the JWKS server through this CA bundle (the env knob
    // users have too); set while no other thread reads the environment.
    // SAFETY: nextest runs each test in its own process, and the runtime's
    // threads do not read the environment until pilot starts below.
    unsafe { std::env::set_var("MESH_JWKS_CA_FILE", ca_file.path()) };
    rt.block_on(async {
        let mesh = Mesh::start().await;
        let http = mesh.client();
        let ratings = "http://ratings:9080/ratings/0";
        let config = jwt_config(&issuer.jwks()).replace(
            &format!("    jwks: '{}'\n", issuer.jwks()),
            &format!("    jwksUri: {url}\n"),
        );
        assert!(config.contains("jwksUri"), "{config}");
        mesh.write_config("jwt.yaml", &config);
        let good = issuer.token(
            "alice",
            300,
            json!({"aud": "ratings", "group": "reviewers"}),
        );
        // The policy is in force once a request without a token is denied.
        let deadline = Instant::now() + Duration::from_secs(10);
        while get(&http, ratings).await.0 != 403 {
            assert!(Instant::now() < deadline, "the policy never applied");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Once pilot has fetched the keys, a valid token passes.
        loop {
            let (code, body) = get_with(&http, ratings, &good).await;
            if code == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "a valid token is still refused ({code} {body}); pilot says {:?}",
                mesh.cp.pilot().unwrap().errors()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let forged = Issuer::new("https://issuer.test", "k1").token(
            "alice",
            300,
            json!({"aud": "ratings", "group": "reviewers"}),
        );
        assert_eq!(get_with(&http, ratings, &forged).await.0, 401);
        mesh.stop().await;
    });
}
