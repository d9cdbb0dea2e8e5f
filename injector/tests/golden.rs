//! Golden files: real-world workload manifests in `tests/golden/*.yaml`,
//! injected as `meshctl kube-inject` does, must equal
//! `tests/golden/*.injected.yaml` (regenerate with `UPDATE_GOLDEN=1` and
//! review the diff). Beyond the text: every output parses as the
//! Kubernetes types with nothing lost, injecting the output again changes
//! nothing, and the parts a user relies on are where they belong.

use std::path::PathBuf;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Pod, PodSpec, Service};
use mesh_injector::workloads::{Note, inject_yaml};
use mesh_injector::{Config, Skip};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// Injects `name`.yaml, checks it against the golden file, and returns
/// the documents and notes.
fn golden(name: &str) -> (Vec<Value>, Vec<Note>) {
    let input = std::fs::read_to_string(dir().join(format!("{name}.yaml"))).unwrap();
    let (out, notes) = inject_yaml(&input, &Config::default()).unwrap();
    let path = dir().join(format!("{name}.injected.yaml"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &out).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        out == want,
        "{name}: output differs from {} (UPDATE_GOLDEN=1 to regenerate):\n{out}",
        path.display()
    );

    // Injecting again is a no-op.
    let (again, notes_again) = inject_yaml(&out, &Config::default()).unwrap();
    assert_eq!(again, out, "{name}: injecting twice differs from once");
    for n in notes_again {
        assert!(
            n.skipped.is_some(),
            "{name}: {} injected a second time",
            n.workload
        );
    }

    let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
    for doc in &docs {
        typed_round_trip(doc);
    }
    (docs, notes)
}

/// The document parses as its Kubernetes type and serializes back to
/// itself: the output is well-formed and nothing was dropped.
fn typed_round_trip(doc: &Value) {
    fn check<T: serde::de::DeserializeOwned + serde::Serialize>(doc: &Value) {
        let typed: T =
            serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc:#}"));
        assert_eq!(&serde_json::to_value(typed).unwrap(), doc);
    }
    match doc["kind"].as_str().unwrap() {
        "Deployment" => check::<Deployment>(doc),
        "StatefulSet" => check::<StatefulSet>(doc),
        "DaemonSet" => check::<DaemonSet>(doc),
        "ReplicaSet" => check::<ReplicaSet>(doc),
        "Job" => check::<Job>(doc),
        "CronJob" => check::<CronJob>(doc),
        "Pod" => check::<Pod>(doc),
        "Service" => check::<Service>(doc),
        "List" => doc["items"]
            .as_array()
            .unwrap()
            .iter()
            .for_each(typed_round_trip),
        other => panic!("unexpected kind {other}"),
    }
}

fn spec(doc: &Value, pointer: &str) -> PodSpec {
    serde_json::from_value(doc.pointer(pointer).unwrap().clone()).unwrap()
}

fn names(cs: &Option<Vec<k8s_openapi::api::core::v1::Container>>) -> Vec<&str> {
    cs.iter().flatten().map(|c| c.name.as_str()).collect()
}

fn env<'a>(c: &'a k8s_openapi::api::core::v1::Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[test]
fn deployment_gets_a_native_sidecar_before_its_own_init_containers() {
    let (docs, notes) = golden("deployment");
    assert_eq!(
        notes,
        [Note {
            workload: "Deployment bookinfo/reviews-v2".into(),
            skipped: None,
            warnings: vec![]
        }]
    );
    let spec = spec(&docs[0], "/spec/template/spec");
    assert_eq!(
        names(&spec.init_containers),
        ["mesh-init", "mesh-proxy", "migrate"]
    );
    assert_eq!(
        names(&Some(spec.containers.clone())),
        ["reviews", "log-shipper"]
    );
    let inits = spec.init_containers.as_ref().unwrap();
    let proxy = &inits[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    let startup = proxy
        .startup_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(startup.path.as_deref(), Some("/healthz/ready"));
    let sc = proxy.security_context.as_ref().unwrap();
    assert_eq!(
        (
            sc.run_as_user,
            sc.run_as_non_root,
            sc.read_only_root_filesystem
        ),
        (Some(1337), Some(true), Some(true))
    );
    let resources = proxy.resources.as_ref().unwrap();
    assert_eq!(resources.requests.as_ref().unwrap()["cpu"].0, "50m");
    assert_eq!(resources.limits.as_ref().unwrap()["memory"].0, "256Mi");

    // The capture honours the pod's annotations.
    let args = inits[0].args.clone().unwrap().join(" ");
    assert!(
        args.contains("--exclude-outbound-cidrs 10.96.0.1/32,169.254.169.254/32"),
        "{args}"
    );
    assert!(args.contains("--exclude-inbound-ports 9443"), "{args}");
    let caps = inits[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .as_ref()
        .unwrap();
    assert_eq!(
        caps.add.as_deref(),
        Some(&["NET_ADMIN".to_string(), "NET_RAW".into()][..])
    );

    // HTTP and TCP probes go through the agent port; gRPC and exec stay.
    let app = &spec.containers[0];
    let live = app
        .liveness_probe
        .as_ref()
        .unwrap()
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!(live.path.as_deref(), Some("/app-health/reviews/livez"));
    let ready = app.readiness_probe.as_ref().unwrap();
    assert!(ready.tcp_socket.is_none());
    // gRPC probes go through the agent port too; exec probes stay.
    let startup = app.startup_probe.as_ref().unwrap();
    assert!(startup.grpc.is_none());
    assert_eq!(
        startup.http_get.as_ref().unwrap().path.as_deref(),
        Some("/app-health/reviews/startupz")
    );
    assert!(
        spec.containers[1]
            .liveness_probe
            .as_ref()
            .unwrap()
            .exec
            .is_some()
    );
    let probers: mesh_proto::probers::Probers =
        serde_json::from_str(env(proxy, "MESH_APP_PROBERS").unwrap()).unwrap();
    let live = probers["/app-health/reviews/livez"]
        .http_get
        .as_ref()
        .unwrap();
    assert_eq!((live.path.as_str(), live.port), ("/health", 9080));
    assert_eq!(
        probers["/app-health/reviews/readyz"]
            .tcp_socket
            .as_ref()
            .unwrap()
            .port,
        9080
    );

    let volumes: Vec<_> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    assert_eq!(volumes, ["logs", "mesh-token", "mesh-ca-root"]);
    let labels = docs[0].pointer("/spec/template/metadata/labels").unwrap();
    assert_eq!(labels["service.istio.io/canonical-name"], "reviews");
    assert_eq!(labels["service.istio.io/canonical-revision"], "v2");
}

#[test]
fn legacy_job_holds_the_app_until_the_proxy_is_ready() {
    let (docs, _) = golden("legacy-job");
    let spec = spec(&docs[0], "/spec/template/spec");
    assert_eq!(names(&spec.init_containers), ["fetch", "mesh-init"]);
    assert_eq!(
        names(&Some(spec.containers.clone())),
        ["mesh-proxy", "import"]
    );
    let proxy = &spec.containers[0];
    assert_eq!(proxy.restart_policy, None);
    let hook = proxy
        .lifecycle
        .as_ref()
        .unwrap()
        .post_start
        .as_ref()
        .unwrap();
    assert_eq!(
        hook.exec.as_ref().unwrap().command.as_deref(),
        Some(&["mesh-proxy".to_string(), "wait".into()][..])
    );
    let annotations = docs[0]
        .pointer("/spec/template/metadata/annotations")
        .unwrap();
    assert_eq!(
        annotations["kubectl.kubernetes.io/default-container"],
        "import"
    );
}

#[test]
fn host_network_opted_out_and_podless_objects_are_untouched() {
    let input = std::fs::read_to_string(dir().join("skipped.yaml")).unwrap();
    let (docs, notes) = golden("skipped");
    let before: Vec<Value> = serde_saphyr::from_multiple(&input).unwrap();
    assert_eq!(docs, before);
    assert_eq!(
        notes,
        [
            Note {
                workload: "DaemonSet monitoring/node-exporter".into(),
                skipped: Some(Skip::HostNetwork),
                warnings: vec![]
            },
            Note {
                workload: "Pod bookinfo/debug".into(),
                skipped: Some(Skip::PodOptedOut("label")),
                warnings: vec![]
            },
        ]
    );
}

#[test]
fn every_kind_with_a_pod_template_and_lists() {
    let (docs, notes) = golden("kinds");
    let injected: Vec<_> = notes
        .iter()
        .filter(|n| n.skipped.is_none())
        .map(|n| n.workload.as_str())
        .collect();
    assert_eq!(
        injected,
        [
            "StatefulSet bookinfo/mongodb",
            "CronJob bookinfo/report",
            "ReplicaSet bookinfo/details-v1",
            "Pod bookinfo/probe-only"
        ]
    );
    let cron = spec(&docs[0]["items"][1], "/spec/jobTemplate/spec/template/spec");
    assert_eq!(names(&cron.init_containers), ["mesh-init", "mesh-proxy"]);
    // interceptionMode NONE: no capture container, no capture flag.
    let pod: Pod = serde_json::from_value(docs[1].clone()).unwrap();
    let spec = pod.spec.unwrap();
    assert_eq!(names(&spec.init_containers), ["mesh-proxy"]);
    let proxy = &spec.init_containers.as_ref().unwrap()[0];
    assert_eq!(env(proxy, "MESH_CAPTURE"), None);
    assert_eq!(
        proxy.image.as_deref(),
        Some("registry.local/mesh/proxy:dev")
    );
}

#[test]
fn bad_input_names_the_document_and_the_problem() {
    let cfg = Config::default();
    let err = |yaml: &str| inject_yaml(yaml, &cfg).unwrap_err().to_string();
    assert_eq!(
        err(
            "kind: Service\nmetadata: {name: a}\n---\nkind: Deployment\nmetadata: {name: web}\nspec:\n  template:\n    spec:\n      containers: oops\n"
        ),
        "document 2 (Deployment web): spec.template is not a valid pod: at spec.containers: invalid type: string \"oops\", expected a sequence"
    );
    assert_eq!(
        err(
            "kind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.istio.io/proxyMemory: lots}\nspec: {containers: [{name: a}]}\n"
        ),
        "document 1 (Pod p): sidecar.istio.io/proxyMemory: \"lots\" is not a Kubernetes quantity such as 100m, 0.5 or 128Mi"
    );
    assert_eq!(
        err(
            "kind: Pod\nmetadata:\n  name: p\n  annotations: {traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/33\"}\nspec: {containers: [{name: a}]}\n"
        ),
        "document 1 (Pod p): traffic.sidecar.istio.io/excludeOutboundIPRanges: \"10.0.0.0/33\" is not a comma-separated list of CIDRs"
    );
    assert_eq!(
        err(
            "kind: Pod\nmetadata:\n  name: p\n  annotations: {sidecar.istio.io/interceptionMode: TPROXY}\nspec: {containers: [{name: a}]}\n"
        ),
        "document 1 (Pod p): sidecar.istio.io/interceptionMode is not supported: the capture redirects (REDIRECT) or is off (NONE); TPROXY is not implemented"
    );
    assert_eq!(
        err("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: mesh-proxy}]}\n"),
        "document 1 (Pod p): the pod already has a container named mesh-proxy; rename it or opt the pod out with sidecar.istio.io/inject: \"false\""
    );
    assert!(err("kind: [unclosed\n").starts_with("the input is not YAML"));
}
