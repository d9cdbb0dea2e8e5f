//! AuthorizationPolicy enforced by the sidecars of the sample mesh: ratings
//! takes only reviews' identity, a DENY closes one path, a broken update
//! leaves the last good policy enforcing, and removing a policy reopens.

use std::time::{Duration, Instant};

use mesh_tests::Mesh;

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
