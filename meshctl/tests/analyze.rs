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

/// What pilot accepts but the mesh does not act on, and PeerAuthentications
/// that fight over a workload, are warnings that say so.
#[test]
fn settings_not_acted_on_and_overlapping_peer_authentications_are_warned_of() {
    let extra = "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: ratings, namespace: default}
spec:
  host: ratings
  exportTo: [\".\"]
  trafficPolicy:
    connectionPool: {http: {h2UpgradePolicy: UPGRADE, maxConcurrentStreams: 10}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details, namespace: default}
spec:
  hosts: [details]
  exportTo: [\".\"]
  http:
  - route: [{destination: {host: details}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details-for-team, namespace: team}
spec:
  hosts: [details.default.svc.cluster.local]
  exportTo: [\"team\"]
  http:
  - route: [{destination: {host: details.default.svc.cluster.local}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: details-everywhere, namespace: team}
spec:
  hosts: [details.default.svc.cluster.local]
  http:
  - route: [{destination: {host: details.default.svc.cluster.local}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-strict, namespace: default}
spec:
  selector: {matchLabels: {app: ratings}}
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: ratings-v1-permissive, namespace: default}
spec:
  selector: {matchLabels: {app: ratings, version: v1}}
  mtls: {mode: PERMISSIVE}
";
    let (code, out) = analyze(extra, false);
    assert_eq!(code, 0, "warnings only: {out}");
    for want in [
        "warning: extra.yaml: DestinationRule default/ratings: connectionPool.http.h2UpgradePolicy is not acted on",
        "warning: extra.yaml: DestinationRule default/ratings: connectionPool.http.maxConcurrentStreams is not acted on",
        "warning: PeerAuthentication default/ratings-strict and default/ratings-v1-permissive all select workload default/ratings-v1: only default/ratings-strict applies",
        "warning: VirtualService default/details and team/details-everywhere both route details.default.svc.cluster.local for the same namespaces: only default/details applies there",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
    // exportTo on a VirtualService or DestinationRule is acted on; and
    // default/details (for default) and team/details-for-team (for team)
    // never meet.
    for kind in [
        "VirtualService default/details",
        "DestinationRule default/ratings",
    ] {
        assert!(!out.contains(&format!("{kind}: spec.exportTo")), "{out}");
    }
    assert!(!out.contains("details-for-team"), "{out}");
    assert!(out.ends_with("0 errors, 4 warnings\n"), "{out}");
}
