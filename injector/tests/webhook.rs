//! The admission webhook over real HTTPS: curl posts AdmissionReviews as
//! the API server would, and the returned JSON Patch, applied to the pod
//! that was sent, must give exactly the injected pod. Bad requests get a
//! clear answer and the server keeps serving.

use std::convert::Infallible;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use base64::Engine;
use mesh_injector::server::{Counts, serve, tls_from_files};
use mesh_injector::{Config, NamespacePolicy, Outcome};
use serde_json::{Value, json};

struct Webhook {
    url: String,
    ca: tempfile::NamedTempFile,
    counts: Arc<Counts>,
    _dir: tempfile::TempDir,
}

/// A CA and a serving certificate for the webhook's Service name and
/// 127.0.0.1, as the control plane issues them.
async fn start() -> Webhook {
    start_with(tokio::sync::watch::channel(Arc::new(Config::default())).1).await
}

/// The webhook serving each review with the newest of `cfg`.
async fn start_with(cfg: tokio::sync::watch::Receiver<Arc<Config>>) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![
        "mesh-control-plane.mesh-system.svc".into(),
        "127.0.0.1".into(),
    ])
    .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mesh-control-plane");
    let leaf = params.signed_by(&key, &issuer).unwrap();
    let (cert_path, key_path) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
    std::fs::write(&cert_path, leaf.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    let ca = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(ca.path(), ca_cert.pem()).unwrap();

    let tls = tls_from_files(&cert_path, &key_path).unwrap();
    let (_tx, rx) = tokio::sync::watch::channel(tls);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!(
        "https://127.0.0.1:{}",
        listener.local_addr().unwrap().port()
    );
    let counts = Arc::new(Counts::default());
    tokio::spawn({
        let counts = counts.clone();
        async move {
            let _tx = _tx;
            serve(listener, rx, cfg, counts, std::future::pending()).await
        }
    });
    Webhook {
        url,
        ca,
        counts,
        _dir: dir,
    }
}

impl Webhook {
    /// curl's answer: (HTTP status, body).
    async fn post(&self, body: &[u8]) -> (u16, String) {
        let body_file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(body_file.path(), body).unwrap();
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--http1.1",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(self.ca.path())
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(format!("@{}", body_file.path().display()))
        .arg(format!("{}/inject", self.url));
        let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let (body, code) = text.rsplit_once('\n').unwrap();
        (code.parse().unwrap(), body.to_string())
    }
}

fn review(uid: &str, object: Value, dry_run: bool) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "bookinfo",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "oldObject": null,
            "dryRun": dry_run,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

/// A pod as the ReplicaSet controller creates it.
fn pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "reviews-v1-5f8b9c7d4-",
            "namespace": "bookinfo",
            "labels": {"app": "reviews", "version": "v1", "pod-template-hash": "5f8b9c7d4"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "reviews-v1-5f8b9c7d4", "uid": "0d9c1c7e-5c1e-4a57-9d1c-2f4f3f0e6a11",
                "controller": true, "blockOwnerDeletion": true}]
        },
        "spec": {
            "serviceAccountName": "bookinfo-reviews",
            "containers": [{
                "name": "reviews",
                "image": "bookinfo/reviews:1.0",
                "ports": [{"name": "http", "containerPort": 9080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/health", "port": "http", "scheme": "HTTP"},
                    "periodSeconds": 5, "timeoutSeconds": 1, "successThreshold": 1, "failureThreshold": 3},
                "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File",
                "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always",
            "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst",
            "securityContext": {},
            "schedulerName": "default-scheduler"
        }
    })
}

fn response(body: &str) -> Value {
    let review: Value = serde_json::from_str(body).unwrap();
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    review["response"].clone()
}

fn patched(original: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut doc = original.clone();
    json_patch::patch(&mut doc, &patch).unwrap();
    doc
}

fn have_curl() -> bool {
    if Command::new("curl").arg("--version").output().is_err() {
        println!("SKIPPED: curl is not installed (the test posts AdmissionReviews with it)");
        return false;
    }
    true
}

#[tokio::test]
async fn a_pod_comes_back_injected_as_a_json_patch() {
    if !have_curl() {
        return;
    }
    let hook = start().await;
    let original = pod();
    let (status, body) = hook
        .post(
            review(
                "705ab4f5-6393-11e8-b7cc-42010a800002",
                original.clone(),
                false,
            )
            .to_string()
            .as_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let resp = response(&body);
    assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(resp["allowed"], true);
    let after = patched(&original, &resp);

    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(original.clone()).unwrap();
    let Outcome::Injected(want) = mesh_injector::inject(
        &typed,
        "bookinfo",
        &NamespacePolicy::Enabled,
        &Config::default(),
    )
    .unwrap() else {
        panic!("not injected")
    };
    assert_eq!(after, serde_json::to_value(&*want).unwrap());
    let inits: Vec<_> = after["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(inits, ["mesh-init", "mesh-proxy"]);
    assert_eq!(
        after["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"],
        "/app-health/reviews/readyz"
    );
    // Fields the pod had and the injection does not touch are kept.
    assert_eq!(after["spec"]["schedulerName"], "default-scheduler");
    assert_eq!(
        after["metadata"]["labels"]["pod-template-hash"],
        "5f8b9c7d4"
    );

    // A dry run gets the same patch and is not counted as an injection.
    let (status, body) = hook
        .post(review("dry", original.clone(), true).to_string().as_bytes())
        .await;
    assert_eq!(status, 200);
    assert_eq!(patched(&original, &response(&body)), after);
    assert_eq!(hook.counts.injected.load(Ordering::Relaxed), 1);
    assert_eq!(hook.counts.dry_runs.load(Ordering::Relaxed), 1);

    // The injected pod sent again (the webhook called twice) is left alone.
    let (_, body) = hook
        .post(review("again", after, false).to_string().as_bytes())
        .await;
    let resp = response(&body);
    assert_eq!(
        (resp["allowed"].clone(), resp.get("patch")),
        (json!(true), None)
    );

    // An update is not mutated.
    let mut update = review("upd", original.clone(), false);
    update["request"]["operation"] = json!("UPDATE");
    let (_, body) = hook.post(update.to_string().as_bytes()).await;
    let resp = response(&body);
    assert_eq!(
        (resp["allowed"].clone(), resp.get("patch")),
        (json!(true), None)
    );

    // A pod that opts out is allowed without a patch.
    let mut out = original.clone();
    out["metadata"]["annotations"] = json!({"sidecar.istio.io/inject": "false"});
    let (_, body) = hook
        .post(review("out", out, false).to_string().as_bytes())
        .await;
    let resp = response(&body);
    assert_eq!(
        (resp["allowed"].clone(), resp.get("patch")),
        (json!(true), None)
    );
}

#[tokio::test]
async fn bad_requests_are_named_and_the_server_keeps_serving() {
    if !have_curl() {
        return;
    }
    let hook = start().await;
    let good = review("u1", pod(), false).to_string();

    // Truncated.
    let (status, body) = hook.post(&good.as_bytes()[..good.len() / 2]).await;
    assert_eq!(status, 400);
    assert!(
        body.starts_with("the body is not JSON: EOF while parsing"),
        "{body}"
    );

    // The wrong version.
    let mut old = review("u2", pod(), false);
    old["apiVersion"] = json!("admission.k8s.io/v1beta1");
    let (status, body) = hook.post(old.to_string().as_bytes()).await;
    assert_eq!(status, 400);
    assert_eq!(
        body.trim(),
        "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion admission.k8s.io/v1beta1 kind AdmissionReview; \
         the webhook configuration must list admissionReviewVersions: [v1]"
    );

    // Not a pod: refused with a reason the API server shows.
    let mut deployment = review("u3", json!({"kind": "Deployment"}), false);
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let (status, body) = hook.post(deployment.to_string().as_bytes()).await;
    assert_eq!(status, 200);
    let resp = response(&body);
    assert_eq!(resp["uid"], "u3");
    assert_eq!(resp["allowed"], false);
    assert_eq!(resp["status"]["code"], 400);
    assert_eq!(
        resp["status"]["message"],
        "the sidecar injector only mutates v1 Pods, not apps/v1 Deployment; the webhook's rules should select pods only"
    );

    // A pod spec that does not parse: refused, nothing half-injected.
    let mut broken = pod();
    broken["spec"]["containers"][0]["ports"] = json!("http");
    let (_, body) = hook
        .post(review("u4", broken, false).to_string().as_bytes())
        .await;
    let resp = response(&body);
    assert_eq!(resp["allowed"], false);
    assert_eq!(resp.get("patch"), None);
    assert_eq!(
        resp["status"]["message"],
        "request.object is not a valid Pod: at spec.containers[0].ports: invalid type: string \"http\", expected a sequence"
    );

    // An annotation the injector cannot honour: refused, naming it.
    let mut tproxy = pod();
    tproxy["metadata"]["annotations"] = json!({"sidecar.istio.io/interceptionMode": "TPROXY"});
    let (_, body) = hook
        .post(review("u5", tproxy, false).to_string().as_bytes())
        .await;
    let message = response(&body)["status"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(message.starts_with("sidecar injection refused pod bookinfo/reviews-v1-5f8b9c7d4-: sidecar.istio.io/interceptionMode is not supported"), "{message}");

    // Still serving.
    let (status, body) = hook.post(good.as_bytes()).await;
    assert_eq!(status, 200);
    assert_eq!(response(&body)["allowed"], true);
    assert_eq!(hook.counts.bad_requests.load(Ordering::Relaxed), 2);
    assert_eq!(hook.counts.denied.load(Ordering::Relaxed), 3);
    assert_eq!(hook.counts.injected.load(Ordering::Relaxed), 1);
}

/// kube-apiserver as far as the injector asks it: ConfigMaps in
/// istio-system, listed by field selector and then watched. A list answers
/// with `configmap` (if any) at resourceVersion 1; a watch stays open and
/// streams the events the test sends. No API server runs here: the
/// objects are written by hand in the shape kube-apiserver returns them.
struct FakeApi {
    /// The newest watch's stream, once the injector has asked for one.
    watch: Arc<std::sync::Mutex<Option<Sender>>>,
    /// Each request's path and query, in order.
    asked: Arc<std::sync::Mutex<Vec<String>>>,
}

type Chunk = Result<hyper::body::Frame<bytes::Bytes>, Infallible>;
type Sender = tokio::sync::mpsc::UnboundedSender<Chunk>;
type Streamed = http_body_util::StreamBody<tokio_stream::wrappers::UnboundedReceiverStream<Chunk>>;

impl FakeApi {
    fn start(configmap: Option<Value>) -> (kube::Client, Self) {
        use http::{Request, Response};
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<Streamed>>();
        let api = Self {
            watch: Arc::default(),
            asked: Arc::default(),
        };
        let (watch, asked) = (api.watch.clone(), api.asked.clone());
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                let uri = request.uri().clone();
                asked.lock().unwrap().push(uri.to_string());
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                let status = match (uri.path(), uri.query().unwrap_or_default()) {
                    ("/api/v1/namespaces/istio-system/configmaps", q)
                        if q.contains("watch=true") =>
                    {
                        *watch.lock().unwrap() = Some(tx);
                        200
                    }
                    ("/api/v1/namespaces/istio-system/configmaps", _) => {
                        let list = json!({
                            "kind": "ConfigMapList", "apiVersion": "v1",
                            "metadata": {"resourceVersion": "1"},
                            "items": configmap.iter().collect::<Vec<_>>(),
                        });
                        let _ = tx.send(Ok(hyper::body::Frame::data(list.to_string().into())));
                        200
                    }
                    _ => 404,
                };
                send.send_response(
                    Response::builder()
                        .status(status)
                        .header("content-type", "application/json")
                        .body(http_body_util::StreamBody::new(
                            tokio_stream::wrappers::UnboundedReceiverStream::new(rx),
                        ))
                        .unwrap(),
                );
            }
        });
        (kube::Client::new(service, "default"), api)
    }

    /// Sends `kind` (MODIFIED, DELETED) of `object` on the open watch.
    async fn event(&self, kind: &str, object: &Value) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let watch = loop {
            if let Some(w) = self.watch.lock().unwrap().clone() {
                break w;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the injector never watched the mesh config"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
        line.push(b'\n');
        watch
            .send(Ok(hyper::body::Frame::data(line.into())))
            .unwrap();
    }
}

/// Istio's mesh config as kube-apiserver returns it.
fn mesh_configmap(mesh: &str, resource_version: u32) -> Value {
    json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "istio", "namespace": "istio-system",
            "uid": "5f0d2c8e-8a4b-4c55-9a0e-1f3b6f6f2d10",
            "resourceVersion": resource_version.to_string(),
            "creationTimestamp": "2026-11-20T09:12:44Z",
            "labels": {"install.operator.istio.io/owning-resource": "unknown", "istio.io/rev": "default"}},
        "data": {"mesh": mesh, "meshNetworks": "networks: {}"},
    })
}

/// The injected proxy container's `MESH_PROXY_THREADS`, from the webhook's
/// answer for `pod()`.
async fn threads_injected(hook: &Webhook, uid: &str) -> Option<String> {
    let original = pod();
    let (code, body) = hook
        .post(review(uid, original.clone(), false).to_string().as_bytes())
        .await;
    assert_eq!(code, 200, "{body}");
    proxy_env(&patched(&original, &response(&body)), "MESH_PROXY_THREADS")
}

/// The value of `name` in an injected pod's proxy container, if set.
fn proxy_env(injected: &Value, name: &str) -> Option<String> {
    let containers = injected["spec"]["initContainers"].as_array().unwrap();
    let proxy = containers
        .iter()
        .find(|c| c["name"] == "mesh-proxy")
        .unwrap();
    proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == name)
        .map(|e| e["value"].as_str().unwrap().to_string())
}

#[tokio::test]
async fn the_webhook_follows_the_mesh_configs_default_concurrency_and_keeps_the_last_good_one() {
    if !have_curl() {
        return;
    }
    let (client, api) = FakeApi::start(Some(mesh_configmap(
        "defaultConfig:\n  concurrency: 2\n",
        1,
    )));
    let (tx, rx) = tokio::sync::watch::channel(Arc::new(Config::default()));
    let seen = rx.clone();
    tokio::spawn(mesh_injector::mesh::follow(client, Config::default(), tx));
    let hook = start_with(rx).await;
    let settled = |want: Option<u32>| {
        let mut seen = seen.clone();
        async move {
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                seen.wait_for(|c| c.mesh_defaults.concurrency == want),
            )
            .await
            .unwrap_or_else(|_| panic!("the mesh config's concurrency never became {want:?}"))
            .unwrap();
        }
    };

    // The ConfigMap as listed at start.
    settled(Some(2)).await;
    assert_eq!(threads_injected(&hook, "a").await.as_deref(), Some("2"));
    let list = api.asked.lock().unwrap()[0].clone();
    assert!(
        list.contains("fieldSelector=metadata.name%3Distio"),
        "the injector reads only ConfigMap istio: {list}"
    );

    // Edited in the cluster: the next pod gets the new value.
    api.event(
        "MODIFIED",
        &mesh_configmap("defaultConfig:\n  concurrency: 4\n", 2),
    )
    .await;
    settled(Some(4)).await;
    assert_eq!(threads_injected(&hook, "b").await.as_deref(), Some("4"));

    // A value that does not parse is not applied: the last good one serves.
    api.event(
        "MODIFIED",
        &mesh_configmap("defaultConfig:\n  concurrency: two\n", 3),
    )
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(seen.borrow().mesh_defaults.concurrency, Some(4));
    assert_eq!(threads_injected(&hook, "c").await.as_deref(), Some("4"));

    // Deleted: Istio's defaults, so the sidecar's own (no variable).
    api.event(
        "DELETED",
        &mesh_configmap("defaultConfig:\n  concurrency: two\n", 4),
    )
    .await;
    settled(None).await;
    assert_eq!(threads_injected(&hook, "d").await, None);
}

#[tokio::test]
async fn proxy_config_fields_the_sidecar_does_not_read_come_back_as_warnings() {
    if !have_curl() {
        return;
    }
    let hook = start().await;
    let mut annotated = pod();
    annotated["metadata"]["annotations"] = json!({
        "proxy.istio.io/config": "{\"concurrency\": 2, \"holdApplicationUntilProxyStarts\": true, \"proxyMetadata\": {\"ISTIO_META_DNS_CAPTURE\": \"true\"}}"
    });
    let (code, body) = hook
        .post(review("w", annotated, false).to_string().as_bytes())
        .await;
    assert_eq!(code, 200, "{body}");
    let answer = response(&body);
    assert_eq!(answer["allowed"], true);
    assert_eq!(
        answer["warnings"],
        json!(["proxy.istio.io/config fields not read: proxyMetadata"])
    );
    // A drain longer than the pod's grace period: admitted, with a warning,
    // and the sidecar told to drain for that long.
    let mut long_drain = pod();
    long_drain["metadata"]["annotations"] =
        json!({"proxy.istio.io/config": "terminationDrainDuration: 45s"});
    let (_, body) = hook
        .post(
            review("d", long_drain.clone(), false)
                .to_string()
                .as_bytes(),
        )
        .await;
    let answer = response(&body);
    assert_eq!(answer["allowed"], true);
    assert_eq!(
        answer["warnings"],
        json!([
            "terminationDrainDuration 45s is not shorter than the pod's terminationGracePeriodSeconds (30): the kubelet stops the sidecar before it has drained"
        ])
    );
    assert_eq!(
        proxy_env(&patched(&long_drain, &answer), "MESH_DRAIN_GRACE_SECS").as_deref(),
        Some("45")
    );
    // A pod without the annotation gets none.
    let (_, body) = hook
        .post(review("p", pod(), false).to_string().as_bytes())
        .await;
    assert!(response(&body).get("warnings").is_none(), "{body}");
}
