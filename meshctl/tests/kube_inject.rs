//! `meshctl kube-inject` as a user runs it: a file or stdin in, injected
//! YAML out (the injector's golden files), notes on stderr, exit 1 and
//! nothing on stdout when a document cannot be injected.

use std::io::Write;
use std::process::{Command, Stdio};

const MESHCTL: &str = env!("CARGO_BIN_EXE_meshctl");

fn golden(name: &str) -> String {
    format!(
        "{}/../injector/tests/golden/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn run(args: &[&str], stdin: &str) -> (i32, String, String) {
    let mut child = Command::new(MESHCTL)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn a_file_and_stdin_give_the_golden_output() {
    let want = std::fs::read_to_string(golden("deployment.injected.yaml")).unwrap();
    let (code, out, _) = run(&["kube-inject", "-f", &golden("deployment.yaml")], "");
    assert_eq!((code, out.as_str()), (0, want.as_str()));

    let input = std::fs::read_to_string(golden("skipped.yaml")).unwrap();
    let (code, _, err) = run(&["kube-inject", "-f", "-"], &input);
    assert_eq!(code, 0);
    assert_eq!(
        err,
        "DaemonSet monitoring/node-exporter: not injected: the pod uses the host's network\n\
         Pod bookinfo/debug: not injected: the pod's label sidecar.istio.io/inject is false\n"
    );

    // Flags reach the sidecar.
    let (_, out, _) = run(
        &[
            "kube-inject",
            "-f",
            &golden("legacy-job.yaml"),
            "--proxy-image",
            "registry.local/proxy:1",
            "--pilot-addr",
            "10.96.0.20:15012",
        ],
        "",
    );
    assert!(out.contains("image: registry.local/proxy:1"), "{out}");
    assert!(out.contains("value: 10.96.0.20:15012"), "{out}");
}

#[test]
fn a_bad_document_fails_the_run_and_prints_nothing() {
    let input = "kind: Service\nmetadata: {name: s}\n---\nkind: Job\nmetadata: {name: j}\nspec: {template: {spec: {containers: [{name: a, ports: [{containerPort: http}]}]}}}\n";
    let (code, out, err) = run(&["kube-inject", "-f", "-"], input);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err.trim(),
        "error: document 2 (Job j): spec.template is not a valid pod: at spec.containers[0].ports[0].containerPort: invalid type: string \"http\", expected i32"
    );
}

#[test]
fn a_mesh_config_file_sets_the_default_concurrency_and_a_bad_one_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    let inject = |mesh: &std::path::Path| {
        run(
            &[
                "kube-inject",
                "-f",
                &golden("deployment.yaml"),
                "--mesh-config",
                mesh.to_str().unwrap(),
            ],
            "",
        )
    };
    // As `kubectl get cm istio -n istio-system -o jsonpath={.data.mesh}` prints it.
    std::fs::write(
        &mesh,
        "defaultConfig:\n  concurrency: 2\n  discoveryAddress: istiod.istio-system.svc:15012\naccessLogFile: /dev/stdout\n",
    )
    .unwrap();
    let (code, out, err) = inject(&mesh);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err,
        "mesh config: defaultConfig fields not read: discoveryAddress\n"
    );
    assert!(
        out.contains("- name: MESH_PROXY_THREADS\n          value: \"2\"\n"),
        "{out}"
    );

    std::fs::write(&mesh, "defaultConfig:\n  concurrency: two\n").unwrap();
    let (code, out, err) = inject(&mesh);
    assert_eq!((code, out.as_str()), (1, ""));
    assert_eq!(
        err.trim(),
        format!(
            "error: {}: defaultConfig.concurrency: not a whole number of threads (0 for one per CPU)",
            mesh.display()
        )
    );
}

#[test]
fn proxy_config_fields_the_sidecar_does_not_read_are_named_on_stderr() {
    let pod = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  namespace: shop\n  annotations:\n    proxy.istio.io/config: |\n      concurrency: 2\n      holdApplicationUntilProxyStarts: true\n      terminationDrainDuration: 10s\n      proxyMetadata: {DNS_CAPTURE: \"true\"}\nspec:\n  containers:\n  - name: web\n    image: web:1\n";
    let (code, out, err) = run(&["kube-inject", "-f", "-"], pod);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("- name: MESH_PROXY_THREADS\n"), "{out}");
    assert!(
        out.contains("- name: MESH_DRAIN_GRACE_SECS\n      value: \"10\"\n"),
        "{out}"
    );
    assert_eq!(
        err,
        "Pod shop/web: proxy.istio.io/config fields not read: proxyMetadata\n"
    );
}
