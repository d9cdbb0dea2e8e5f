//! `meshctl authz check`, run as a user runs it, offline against config
//! files: the policies in scope, `yes`/`no` with the deciding rule, and
//! exit 0 for allow, 1 for deny, 2 when it cannot decide.

use std::process::Command;

const POLICIES: &str = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ratings-viewer, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/bookinfo-reviews]}
    to:
    - operation: {methods: [GET], paths: [/ratings/*]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: istio-system}
spec:
  action: DENY
  rules:
  - when:
    - key: request.headers[x-debug]
      values: [\"1\"]
";

fn check(args: &[&str]) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    std::fs::write(dir.path().join("authz.yaml"), POLICIES).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(["authz", "check"])
        .args(args)
        .arg("--config")
        .arg(dir.path())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn authz_check_answers_like_kubectl_auth_can_i() {
    let reviews = "cluster.local/ns/default/sa/bookinfo-reviews";
    let (code, out, _) = check(&["ratings-v1", "--from", reviews, "--path", "/ratings/0"]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("yes\nallowed by default/ratings-viewer rule 0\n"),
        "{out}"
    );
    // The mesh-wide DENY (root namespace) applies to ratings too, first.
    let (code, out, _) = check(&[
        "ratings-v1",
        "--from",
        reviews,
        "--path",
        "/ratings/0",
        "--header",
        "x-debug=1",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.starts_with("no\ndenied by istio-system/deny-debug rule 0\n"),
        "{out}"
    );
    let (code, out, _) = check(&[
        "ratings-v1",
        "--from",
        "spiffe://cluster.local/ns/default/sa/client",
        "--path",
        "/ratings/0",
    ]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("denied: ALLOW policies apply and none matches"),
        "{out}"
    );
    // Listing only: both policies in scope for ratings, one for details.
    let (code, out, _) = check(&["ratings-v1"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("default/ratings-viewer") && out.contains("istio-system/deny-debug"),
        "{out}"
    );
    let (_, out, _) = check(&["details-v1"]);
    assert!(
        !out.contains("ratings-viewer") && out.contains("istio-system/deny-debug"),
        "{out}"
    );
    // Cannot decide: exit 2 and why.
    let (code, _, err) = check(&["nope", "--path", "/"]);
    assert_eq!(code, 2);
    assert!(err.contains("no workload \"nope\""), "{err}");
    let (code, _, err) = check(&["ratings-v1", "--from", "reviews"]);
    assert_eq!(code, 2);
    assert!(err.contains("--from must look like"), "{err}");
}
