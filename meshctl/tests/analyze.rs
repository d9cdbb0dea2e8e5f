//! `meshctl analyze`, run as a user runs it: exit 0 with warnings only,
//! 1 with errors, each finding naming the file, the resource and the field.

use std::process::Command;

fn analyze(extra: &str, json: bool) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    if !extra.is_empty() {
        std::fs::write(dir.path().join("extra.yaml"), extra).unwrap();
    }
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshctl"));
    cmd.arg("analyze").arg(dir.path());
    if json {
        cmd.args(["-o", "json"]);
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).replace(&format!("{}/", dir.path().display()), "");
    (out.status.code().unwrap_or(-1), text)
}

#[test]
fn analyze_reports_errors_and_warnings_with_file_resource_and_field() {
    let (code, out) = analyze("", false);
    assert_eq!((code, out.as_str()), (0, "0 errors, 0 warnings\n"));

    let warnings_only = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: nobody, namespace: default}
spec:
  selector: {matchLabels: {app: ratingz}}
  mtls: {mode: STRICT}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  http:
  - route: [{destination: {host: details}}]
  - match: [{uri: {prefix: /x}}]
    route: [{destination: {host: details}}]
";
    let (code, out) = analyze(warnings_only, false);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("warning: extra.yaml: PeerAuthentication default/nobody: spec.selector.matchLabels {app: ratingz} selects no workload"), "{out}");
    assert!(
        out.contains(
            "warning: extra.yaml: VirtualService default/details: spec.http[1] can never match"
        ),
        "{out}"
    );
    assert!(out.ends_with("0 errors, 2 warnings\n"), "{out}");

    let errors = "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-cidr, namespace: default}
spec:
  rules:
  - from:
    - source: {ipBlocks: [10.0.0.0/99]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews-typo, namespace: default}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v9}}
";
    let (code, out) = analyze(errors, false);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("error: extra.yaml: AuthorizationPolicy default/bad-cidr: spec.rules[0].from[0].source.ipBlocks: \"10.0.0.0/99\""), "{out}");
    assert!(
        out.contains("VirtualService default/reviews-typo") && out.contains("v9"),
        "{out}"
    );

    let (code, out) = analyze(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: typo}\nspec: {rule: []}\n",
        true,
    );
    assert_eq!(code, 1);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["errors"], 1, "{report}");
    assert_eq!(report["findings"][0]["level"], "error");
    assert!(
        report["findings"][0]["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `rule`"),
        "{report}"
    );
}
