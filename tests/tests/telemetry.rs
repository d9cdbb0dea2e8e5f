//! Telemetry end to end on the bookinfo mesh: Istio's Telemetry resource
//! turns access logs on and filters them; the sidecars write Istio's
//! default text format.

use std::time::{Duration, Instant};

use mesh_tests::Mesh;

const ACCESS_LOG_MESH_WIDE: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: mesh-default, namespace: istio-system}
spec:
  accessLogging:
  - providers: [{name: envoy}]
";

/// Errors only, for productpage's sidecar, on the side that serves.
const PRODUCTPAGE_ERRORS_ONLY: &str = "apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: productpage-errors, namespace: default}
spec:
  selector: {matchLabels: {app: productpage}}
  accessLogging:
  - providers: [{name: envoy}]
    match: {mode: SERVER}
    filter: {expression: 'response.code >= 400'}
";

fn access_log(mesh: &Mesh, workload: &str) -> String {
    std::fs::read_to_string(mesh.state_dir().join(format!("{workload}.access.log")))
        .unwrap_or_default()
}

/// Waits until `workload`'s sidecar holds Telemetry whose dump contains `marker`.
async fn wait_telemetry(mesh: &Mesh, workload: &str, marker: &str) {
    let url = format!(
        "http://{}:15000/config_dump",
        mesh.workload(workload).address
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let dump: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
        let telemetry = dump["listener"]["telemetry"].to_string();
        if telemetry.contains(marker) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{workload} never got telemetry with {marker}: {telemetry}; pilot says {:?}",
            mesh.cp.pilot().unwrap().errors()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `workload`'s access log has a line containing every one of `parts`.
async fn logged(mesh: &Mesh, workload: &str, parts: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = access_log(mesh, workload);
        if let Some(line) = log.lines().find(|l| parts.iter().all(|p| l.contains(p))) {
            return line.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "no line with {parts:?} in {workload}'s access log:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn telemetry_turns_access_logs_on_and_filters_them() {
    let mesh = Mesh::start().await;
    let http = mesh.client();
    // No Telemetry: no access logs.
    mesh.request(&http).await.unwrap();
    assert_eq!(access_log(&mesh, "client"), "");

    mesh.write_config("telemetry.yaml", ACCESS_LOG_MESH_WIDE);
    for w in ["client", "productpage-v1"] {
        wait_telemetry(&mesh, w, "istio-system/mesh-default").await;
    }
    let resp = http
        .get("http://productpage:9080/productpage")
        .header("x-request-id", "trace-me-1")
        .header("user-agent", "telemetry-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    // The client's sidecar logs the request it sent, in Istio's format:
    // [time] "GET /productpage HTTP/1.1" 200 - via_upstream - "-" 0 <sent> ...
    let line = logged(&mesh, "client", &["\"trace-me-1\""]).await;
    let sent = format!(" 200 - via_upstream - \"-\" 0 {} ", body.len());
    assert!(line.starts_with('['), "{line}");
    assert!(line.contains("\"GET /productpage HTTP/1.1\""), "{line}");
    assert!(line.contains(&sent), "expected {sent:?} in {line}");
    assert!(line.contains("\"telemetry-test/1.0\""), "{line}");
    assert!(line.contains("\"productpage:9080\""), "{line}");
    assert!(
        line.contains("outbound|9080||productpage.default.svc.cluster.local"),
        "{line}"
    );
    // productpage's sidecar logs it as served, and so do the hops after it.
    let served = logged(
        &mesh,
        "productpage-v1",
        &["\"trace-me-1\"", "inbound|9080||"],
    )
    .await;
    assert!(served.contains(" 200 - via_upstream "), "{served}");

    // Errors only on productpage's serving side: a 200 is no longer logged
    // there, a 404 is; the client side still logs everything.
    mesh.write_config("productpage-telemetry.yaml", PRODUCTPAGE_ERRORS_ONLY);
    wait_telemetry(&mesh, "productpage-v1", "response.code >= 400").await;
    let ok = http
        .get("http://productpage:9080/productpage")
        .header("x-request-id", "fine-2")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let missing = http
        .get("http://productpage:9080/no-such-page")
        .header("x-request-id", "missing-3")
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    let line = logged(&mesh, "productpage-v1", &["\"missing-3\""]).await;
    assert!(
        line.contains("\"GET /no-such-page HTTP/1.1\" 404 "),
        "{line}"
    );
    logged(&mesh, "client", &["\"fine-2\""]).await;
    assert!(
        !access_log(&mesh, "productpage-v1").contains("fine-2"),
        "a 200 was logged under the errors-only filter"
    );
    mesh.stop().await;
}
