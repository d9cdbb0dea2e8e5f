//! Pilot's Kubernetes source against a fake API server.
//!
//! No API server runs here. kube-rs's client talks to a `tower-test` mock
//! that answers lists and watches as kube-apiserver does: a list carries the
//! store's resourceVersion, a watch streams newline-delimited events and
//! stays open, and a watch from a compacted resourceVersion gets an `ERROR`
//! event with `410 Gone` (`reason: Expired`). The objects are the fixtures in
//! `fixtures/kubernetes/`, written by hand in the shape kube-apiserver
//! returns them (no cluster was available to record from).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::StreamBody;
use hyper::body::Frame;
use kube::client::Body;
use mesh_pilot::model::Model;
use mesh_pilot::{Config, Pilot};
use mesh_proto::{resources as pb, type_url};
use prost::Message;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

type Chunk = Result<Frame<Bytes>, Infallible>;
type Streamed = StreamBody<UnboundedReceiverStream<Chunk>>;

const REVIEWS: &str = "reviews.default.svc.cluster.local";
const V1_POD: &str = "reviews-v1-5b8f8c8d9f-x7k2p";
const V2_POD: &str = "reviews-v2-7d6c9f5b8c-q9w3e";

fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes")
        .join(name);
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// The collections pilot watches: path, apiVersion and kind.
fn collections() -> Vec<(String, String, String)> {
    let mut c: Vec<(String, String, String)> = [
        ("/api/v1/services", "v1", "Service"),
        ("/api/v1/pods", "v1", "Pod"),
        ("/api/v1/namespaces", "v1", "Namespace"),
        // Istio's mesh config: pilot watches this one namespace's.
        (
            "/api/v1/namespaces/istio-system/configmaps",
            "v1",
            "ConfigMap",
        ),
        (
            "/apis/discovery.k8s.io/v1/endpointslices",
            "discovery.k8s.io/v1",
            "EndpointSlice",
        ),
    ]
    .iter()
    .map(|(p, a, k)| (p.to_string(), a.to_string(), k.to_string()))
    .collect();
    for (group, kind, plural) in mesh_pilot::kubernetes::ISTIO_KINDS {
        c.push((
            format!("/apis/{group}/v1/{plural}"),
            format!("{group}/v1"),
            kind.to_string(),
        ));
    }
    c
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resourceVersion, event type, object).
    history: Vec<(u64, &'static str, Value)>,
    watches: Vec<mpsc::UnboundedSender<Chunk>>,
    lists: usize,
}

#[derive(Default)]
struct State {
    revision: u64,
    /// Watches from before this resourceVersion are answered 410 Gone.
    compacted: u64,
    collections: HashMap<String, Collection>,
    /// Collections whose CRD is not installed: answered 404.
    uninstalled: std::collections::HashSet<String>,
}

#[derive(Clone, Default)]
struct FakeApi(Arc<Mutex<State>>);

fn line(kind: &str, object: &Value) -> Chunk {
    let mut text = serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap();
    text.push(b'\n');
    Ok(Frame::data(Bytes::from(text)))
}

fn key(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    let s = |v: &Value| v.as_str().unwrap_or_default().to_string();
    (s(&m["namespace"]), s(&m["name"]))
}

fn path_of(object: &Value) -> String {
    let (api, kind) = (&object["apiVersion"], &object["kind"]);
    collections()
        .into_iter()
        .find(|(_, a, k)| api == a.as_str() && kind == k.as_str())
        .map(|(p, _, _)| p)
        .unwrap_or_else(|| panic!("no collection for {api} {kind}"))
}

impl FakeApi {
    fn new(objects: &[Value]) -> Self {
        let api = Self::default();
        for o in objects {
            api.apply(o.clone());
        }
        api
    }

    /// Creates or replaces `object`; open watches see it unless `unseen`
    /// (as if it changed while pilot's watch was down).
    fn change(&self, object: Value, delete: bool, unseen: bool) {
        let mut state = self.0.lock().unwrap();
        state.revision += 1;
        let revision = state.revision;
        let coll = state.collections.entry(path_of(&object)).or_default();
        let k = key(&object);
        let (kind, mut object) = if delete {
            (
                "DELETED",
                coll.objects
                    .remove(&k)
                    .expect("deleting an object that is not there"),
            )
        } else if coll.objects.contains_key(&k) {
            ("MODIFIED", object)
        } else {
            ("ADDED", object)
        };
        object["metadata"]["resourceVersion"] = revision.to_string().into();
        if !delete {
            coll.objects.insert(k, object.clone());
        }
        if unseen {
            return;
        }
        coll.watches.retain(|w| w.send(line(kind, &object)).is_ok());
        coll.history.push((revision, kind, object));
    }

    fn apply(&self, object: Value) {
        self.change(object, false, false);
    }

    fn delete(&self, object: &Value) {
        self.change(object.clone(), true, false);
    }

    /// Compacts the store's history: every open watch ends with 410 Gone,
    /// and none may resume from before now.
    fn compact(&self) {
        let mut state = self.0.lock().unwrap();
        state.compacted = state.revision;
        let revision = state.revision;
        for coll in state.collections.values_mut() {
            for w in coll.watches.drain(..) {
                let _ = w.send(line("ERROR", &gone(0, revision)));
            }
            coll.history.clear();
        }
    }

    /// Takes a kind's CRD away: its lists and watches get 404.
    fn uninstall(&self, path: &str) {
        self.0.lock().unwrap().uninstalled.insert(path.to_string());
    }

    fn install(&self, path: &str) {
        self.0.lock().unwrap().uninstalled.remove(path);
    }

    fn lists(&self, path: &str) -> usize {
        self.0
            .lock()
            .unwrap()
            .collections
            .get(path)
            .map_or(0, |c| c.lists)
    }

    fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Streamed>>();
        let api = self.clone();
        tokio::spawn(async move {
            while let Some((request, send)) = handle.next_request().await {
                send.send_response(api.answer(&request));
            }
        });
        kube::Client::new(service, "default")
    }

    fn answer(&self, request: &Request<Body>) -> Response<Streamed> {
        let path = request.uri().path().to_string();
        let query: HashMap<&str, &str> = request
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let (tx, rx) = mpsc::unbounded_channel();
        let respond = |status: u16| {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(StreamBody::new(UnboundedReceiverStream::new(rx)))
                .unwrap()
        };
        let known = collections().into_iter().find(|(p, _, _)| *p == path);
        let Some((_, api_version, kind)) =
            known.filter(|_| !self.0.lock().unwrap().uninstalled.contains(&path))
        else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": "the server could not find the requested resource",
                "reason": "NotFound", "details": {}, "code": 404});
            let _ = tx.send(Ok(Frame::data(Bytes::from(status.to_string()))));
            return respond(404);
        };
        let mut state = self.0.lock().unwrap();
        let (revision, compacted) = (state.revision, state.compacted);
        let coll = state.collections.entry(path).or_default();
        if query.get("watch") == Some(&"true") {
            let from: u64 = query
                .get("resourceVersion")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if from < compacted {
                let _ = tx.send(line("ERROR", &gone(from, revision)));
            } else {
                for (_, kind, object) in coll.history.iter().filter(|(rv, _, _)| *rv > from) {
                    let _ = tx.send(line(kind, object));
                }
                coll.watches.push(tx);
            }
        } else {
            coll.lists += 1;
            let list = json!({
                "kind": format!("{kind}List"), "apiVersion": api_version,
                "metadata": {"resourceVersion": revision.to_string()},
                "items": coll.objects.values().collect::<Vec<_>>(),
            });
            let _ = tx.send(Ok(Frame::data(Bytes::from(list.to_string()))));
        }
        respond(200)
    }
}

/// kube-apiserver's answer to a watch from a compacted resourceVersion.
fn gone(from: u64, now: u64) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("too old resource version: {from} ({now})"),
        "reason": "Expired", "code": 410})
}

fn v2_pod() -> Value {
    let mut pod = fixture("pod.json");
    pod["metadata"]["name"] = V2_POD.into();
    pod["metadata"]["labels"]["version"] = "v2".into();
    pod["status"]["podIP"] = "10.244.2.23".into();
    pod["status"]["podIPs"] = json!([{"ip": "10.244.2.23"}]);
    pod
}

fn bookinfo() -> Vec<Value> {
    [
        "namespace.json",
        "service.json",
        "endpointslice.json",
        "pod.json",
        "virtualservice.json",
        "destinationrule.json",
    ]
    .iter()
    .map(|f| fixture(f))
    .chain([v2_pod()])
    .collect()
}

async fn start(api: &FakeApi, dir: &Path) -> (Arc<Pilot>, mesh_pilot::kubernetes::Watchers) {
    let pilot = Pilot::new(Config::new(dir));
    let watchers = tokio::time::timeout(
        Duration::from_secs(10),
        pilot.watch_kubernetes(api.client()),
    )
    .await
    .expect("pilot synced with the fake API server");
    (pilot, watchers)
}

/// Waits up to 10 s for `check` to hold of pilot's newest model.
async fn until(pilot: &Pilot, what: &str, check: impl Fn(&Model) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snapshot = pilot.snapshot();
        if check(&snapshot.model) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in 10 s; errors {:?}; services {:?}",
            pilot.errors(),
            snapshot.model.services.keys().collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits up to 10 s for `check` to hold of pilot's config errors, joined.
async fn until_errors(pilot: &Pilot, what: &str, check: impl Fn(&str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check(&pilot.errors().join("\n")) {
        assert!(
            Instant::now() < deadline,
            "{what}: not seen in 10 s; errors {:?}",
            pilot.errors()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn endpoint_addresses(model: &Model, host: &str) -> Vec<String> {
    model.services.get(host).map_or(vec![], |s| {
        s.inline.iter().map(|w| w.address.clone()).collect()
    })
}

/// The endpoints a proxy is sent for `cluster`.
fn sent_endpoints(pilot: &Pilot, cluster: &str) -> Vec<pb::Endpoint> {
    let snapshot = pilot.snapshot();
    let resources = snapshot.for_proxy(type_url::ENDPOINTS, &format!("{V1_POD}.default"));
    let any = &resources
        .get(cluster)
        .unwrap_or_else(|| panic!("no {cluster} sent"))
        .any;
    pb::ClusterEndpoints::decode(any.value.as_slice())
        .unwrap()
        .endpoints
}

#[tokio::test]
async fn services_endpoint_slices_and_pods_become_what_proxies_are_sent() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new(&bookinfo());
    let (pilot, _watchers) = start(&api, dir.path()).await;

    // Synced before it returned: the first model already has the cluster.
    let model = pilot.snapshot().model.clone();
    let reviews = model.services.get(REVIEWS).expect("the reviews Service");
    assert_eq!(
        reviews.vips,
        ["10.96.142.7".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(reviews.ports[0].number, 9080);
    assert_eq!(reviews.ports[0].target_port, Some(9080));
    // Only the ready endpoint; v2's pod is not ready yet.
    assert_eq!(endpoint_addresses(&model, REVIEWS), ["10.244.1.17"]);
    assert!(
        model.workloads.contains_key(&format!("{V1_POD}.default")),
        "{:?}",
        model.workloads.keys()
    );
    assert!(
        model.routes.contains_key(REVIEWS),
        "the VirtualService from the cluster routes reviews"
    );

    let sent = sent_endpoints(&pilot, &format!("outbound|9080|v1|{REVIEWS}"));
    assert_eq!(sent.len(), 1, "{sent:?}");
    assert_eq!(sent[0].address, "10.244.1.17");
    assert_eq!(sent[0].port, 9080);
    assert_eq!(
        sent[0].identity,
        "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"
    );
    // The pod's own sidecar is sent its inbound listener for reviews.
    let snapshot = pilot.snapshot();
    let listeners = snapshot.for_proxy(type_url::LISTENER, &format!("{V1_POD}.default"));
    let listener = pb::Listener::decode(
        listeners
            .values()
            .next()
            .expect("a listener")
            .any
            .value
            .as_slice(),
    )
    .unwrap();
    assert_eq!(listener.ports.len(), 1);
    assert_eq!(listener.ports[0].port, 9080);
    assert_eq!(listener.ports[0].services, [REVIEWS]);

    // v2's pod turns ready: its endpoint is added, in subset v2 only.
    let mut slice = fixture("endpointslice.json");
    slice["endpoints"][1]["conditions"] =
        json!({"ready": true, "serving": true, "terminating": false});
    api.apply(slice.clone());
    until(&pilot, "v2 ready", |m| {
        endpoint_addresses(m, REVIEWS).len() == 2
    })
    .await;
    assert_eq!(
        sent_endpoints(&pilot, &format!("outbound|9080|v2|{REVIEWS}"))[0].address,
        "10.244.2.23"
    );
    assert_eq!(
        sent_endpoints(&pilot, &format!("outbound|9080|v1|{REVIEWS}")).len(),
        1
    );

    // v1's pod goes away: its endpoint and its proxy's listener with it.
    slice["endpoints"].as_array_mut().unwrap().remove(0);
    api.apply(slice);
    api.delete(&fixture("pod.json"));
    until(&pilot, "v1 gone", |m| {
        endpoint_addresses(m, REVIEWS) == ["10.244.2.23"]
            && !m.workloads.contains_key(&format!("{V1_POD}.default"))
    })
    .await;

    // The Service is deleted: the host goes, and with it the route to it.
    api.delete(&fixture("virtualservice.json"));
    api.delete(&fixture("service.json"));
    until(&pilot, "reviews gone", |m| {
        !m.services.contains_key(REVIEWS)
    })
    .await;
    assert!(pilot.errors().is_empty(), "{:?}", pilot.errors());
}

#[tokio::test]
async fn a_watch_ended_by_410_gone_lists_again_and_forgets_what_was_deleted_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new(&bookinfo());
    let (pilot, _watchers) = start(&api, dir.path()).await;
    assert_eq!(api.lists("/api/v1/services"), 1);

    // While the watch is down, reviews (and its route) is deleted and
    // ratings created;
    // then the API server compacts its history past both.
    let mut ratings = fixture("service.json");
    ratings["metadata"]["name"] = "ratings".into();
    ratings["spec"]["clusterIP"] = "10.96.7.7".into();
    ratings["spec"]["clusterIPs"] = json!(["10.96.7.7"]);
    api.change(fixture("virtualservice.json"), true, true);
    api.change(fixture("service.json"), true, true);
    api.change(ratings, false, true);
    api.compact();

    until(&pilot, "the re-list", |m| {
        m.services.contains_key("ratings.default.svc.cluster.local")
            && !m.services.contains_key(REVIEWS)
    })
    .await;
    assert!(
        api.lists("/api/v1/services") >= 2,
        "a second list after 410 Gone"
    );

    // Watching resumes from the new list: later changes arrive as events.
    let mut details = fixture("service.json");
    details["metadata"]["name"] = "details".into();
    api.apply(details);
    until(&pilot, "an event after the re-list", |m| {
        m.services.contains_key("details.default.svc.cluster.local")
    })
    .await;
}

#[tokio::test]
async fn a_bad_istio_resource_in_the_cluster_is_rejected_alone_while_the_rest_applies() {
    let dir = tempfile::tempdir().unwrap();
    let api = FakeApi::new(&bookinfo());
    let (pilot, _watchers) = start(&api, dir.path()).await;
    let good = pilot.snapshot().version;

    let mut bad = fixture("virtualservice.json");
    bad["metadata"]["name"] = "reviews-broken".into();
    bad["spec"]["http"][0]["match"] = json!([{"uri": {"regex": "(unclosed"}}]);
    api.apply(bad.clone());
    until_errors(&pilot, "the broken VirtualService reported", |e| {
        !e.is_empty()
    })
    .await;
    let errors = pilot.errors().join("\n");
    assert!(
        errors.contains("kubernetes: VirtualService default/reviews-broken"),
        "{errors}"
    );
    assert!(errors.contains("regex"), "{errors}");
    assert_eq!(
        pilot.snapshot().version,
        good,
        "the last good config keeps serving"
    );
    assert!(pilot.snapshot().model.routes.contains_key(REVIEWS));

    // It is rejected alone: other changes still apply meanwhile.
    let mut slice = fixture("endpointslice.json");
    slice["endpoints"][1]["conditions"]["ready"] = true.into();
    api.apply(slice);
    until(&pilot, "v2 ready beside the rejected resource", |m| {
        endpoint_addresses(m, REVIEWS).len() == 2
    })
    .await;
    assert!(pilot.errors().join("\n").contains("reviews-broken"));

    // A field the mesh does not act on is reported, not silently ignored.
    api.delete(&bad);
    let sidecar = json!({"apiVersion": "networking.istio.io/v1", "kind": "Sidecar",
        "metadata": {"name": "default", "namespace": "default", "creationTimestamp": "2026-11-20T10:00:00Z"},
        "spec": {"egress": [{"hosts": ["./*"]}], "ingress": [{"port": {"number": 9080}}]}});
    api.apply(sidecar.clone());
    until_errors(&pilot, "the Sidecar's ingress reported", |e| {
        e.contains("kubernetes: Sidecar default/default: spec.ingress is not supported yet")
    })
    .await;
    api.delete(&sidecar);
    until_errors(&pilot, "accepted again", str::is_empty).await;
}

/// Istio's mesh config, as its ConfigMap: discovery selects namespaces
/// labelled `istio-discovery: enabled` or `team: payments`.
const SELECTING_MESH_CONFIG: &str = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata:\n  mesh: |\n    discoverySelectors:\n    - matchLabels: {istio-discovery: enabled}\n    - matchExpressions:\n      - {key: team, operator: In, values: [payments]}\n";

#[tokio::test]
async fn discovery_selectors_limit_the_namespaces_pilot_reads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("mesh.yaml"), SELECTING_MESH_CONFIG).unwrap();
    let mut legacy_ns = fixture("namespace.json");
    legacy_ns["metadata"]["name"] = "legacy".into();
    legacy_ns["metadata"]["labels"] = json!({"kubernetes.io/metadata.name": "legacy"});
    let mut legacy = fixture("service.json");
    legacy["metadata"]["namespace"] = "legacy".into();
    let mut default_ns = fixture("namespace.json");
    default_ns["metadata"]["labels"]["istio-discovery"] = "enabled".into();
    let mut objects = bookinfo();
    objects.extend([default_ns, legacy_ns.clone(), legacy]);
    let api = FakeApi::new(&objects);
    let (pilot, _watchers) = start(&api, dir.path()).await;

    let model = pilot.snapshot().model.clone();
    assert!(model.services.contains_key(REVIEWS));
    assert!(
        !model
            .services
            .contains_key("reviews.legacy.svc.cluster.local"),
        "legacy is not selected"
    );

    // Labelling the namespace brings it in.
    legacy_ns["metadata"]["labels"]["team"] = "payments".into();
    api.apply(legacy_ns);
    until(&pilot, "legacy selected", |m| {
        m.services.contains_key("reviews.legacy.svc.cluster.local")
    })
    .await;
}

#[tokio::test]
async fn port_protocols_come_from_app_protocol_then_the_port_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut svc = fixture("service.json");
    svc["spec"]["ports"] = json!([
        {"name": "https", "protocol": "TCP", "port": 443, "targetPort": 8443},
        {"name": "web", "appProtocol": "kubernetes.io/h2c", "protocol": "TCP", "port": 8080, "targetPort": 8080},
        {"name": "grpc-api", "protocol": "TCP", "port": 9090, "targetPort": 9090},
        {"name": "tcp-db", "protocol": "TCP", "port": 5432, "targetPort": 5432},
        {"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 53},
    ]);
    let api = FakeApi::new(&[fixture("namespace.json"), svc]);
    let (pilot, _watchers) = start(&api, dir.path()).await;
    let snapshot = pilot.snapshot();
    let clusters = snapshot.for_proxy(type_url::CLUSTER, "any.default");
    let protocol = |port: u32| {
        let any = &clusters
            .get(format!("outbound|{port}||{REVIEWS}").as_str())
            .unwrap_or_else(|| panic!("no cluster for {port}: {:?}", clusters.keys()))
            .any;
        pb::Cluster::decode(any.value.as_slice())
            .unwrap()
            .protocol()
    };
    assert_eq!(
        protocol(443),
        pb::Protocol::Tls,
        "HTTPS is the app's own TLS, routed by server name"
    );
    assert_eq!(protocol(8080), pb::Protocol::Http2);
    assert_eq!(protocol(9090), pb::Protocol::Grpc);
    assert_eq!(protocol(5432), pb::Protocol::Tcp);
    assert!(
        !clusters.keys().any(|k| k.contains("|53|")),
        "UDP is not proxied"
    );
}

/// A cluster without one of Istio's CRDs (an older install, or none yet):
/// pilot starts and serves everything else, and picks the kind up once its
/// CRD is installed, without a restart.
#[tokio::test]
async fn a_kind_whose_crd_is_not_installed_is_waited_for_without_blocking_the_rest() {
    let api = FakeApi::new(&bookinfo());
    let virtual_services = "/apis/networking.istio.io/v1/virtualservices";
    api.uninstall(virtual_services);
    let dir = tempfile::tempdir().unwrap();
    let (pilot, _watchers) = start(&api, dir.path()).await;
    until(&pilot, "reviews, without its routes", |m| {
        m.services.contains_key(REVIEWS) && !m.routes.contains_key(REVIEWS)
    })
    .await;
    assert!(pilot.errors().is_empty(), "{:?}", pilot.errors());
    api.install(virtual_services);
    until(&pilot, "the VirtualService, once its CRD is there", |m| {
        m.routes.contains_key(REVIEWS)
    })
    .await;
}

/// The mesh config may live in the cluster, as Istio keeps it (ConfigMap
/// `istio-system/istio`): pilot reads it there, and a change to it applies
/// without a restart.
#[tokio::test]
async fn the_mesh_config_is_read_from_the_clusters_configmap() {
    let mut mesh_config: Value = serde_saphyr::from_str(SELECTING_MESH_CONFIG).unwrap();
    let mut legacy_ns = fixture("namespace.json");
    legacy_ns["metadata"]["name"] = "legacy".into();
    let mut legacy = fixture("service.json");
    legacy["metadata"]["namespace"] = "legacy".into();
    let mut objects = bookinfo();
    objects.extend([mesh_config.clone(), legacy_ns, legacy]);
    let api = FakeApi::new(&objects);
    let dir = tempfile::tempdir().unwrap();
    let (pilot, _watchers) = start(&api, dir.path()).await;
    let legacy_reviews = "reviews.legacy.svc.cluster.local";
    let model = pilot.snapshot().model.clone();
    assert!(
        !model.services.contains_key(legacy_reviews) && !model.services.contains_key(REVIEWS),
        "neither namespace is selected: {:?}",
        model.services.keys().collect::<Vec<_>>()
    );
    // The selectors edited away: every namespace is read again.
    mesh_config["data"]["mesh"] = "discoverySelectors: []\n".into();
    api.apply(mesh_config);
    until(&pilot, "both namespaces read", |m| {
        m.services.contains_key(legacy_reviews) && m.services.contains_key(REVIEWS)
    })
    .await;
}
