//! `meshctl install`, `uninstall` and `precheck`. The manifests must parse
//! as the Kubernetes types (CRDs as apiextensions v1 with structural
//! schemas that accept the Istio YAML the sample ships), and the
//! webhook's certificate must verify against the caBundle for its Service
//! name. No API server runs here: kube-rs's client talks to a `tower-test`
//! mock service answering as kube-apiserver does (bodies in its shape,
//! written by hand since no cluster was available to record from),
//! and the test checks every request it makes.

use std::sync::{Arc, Mutex};

use base64::Engine;
use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use meshctl::install::{self, Certs, Options};
use serde_json::{Value, json};

fn b64d(s: &Value) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(s.as_str().unwrap())
            .unwrap(),
    )
    .unwrap()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// Every node of a structural schema says its type (or keeps unknown
/// fields on purpose).
fn assert_structural(schema: &Value, at: &str) {
    assert!(
        schema.get("type").is_some()
            || schema.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)),
        "{at}: no type"
    );
    for (name, sub) in schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        assert_structural(sub, &format!("{at}.{name}"));
    }
    if let Some(items) = schema.get("items") {
        assert_structural(items, &format!("{at}[]"));
    }
    if let Some(extra) = schema.get("additionalProperties").filter(|v| v.is_object()) {
        assert_structural(extra, &format!("{at}{{}}"));
    }
}

/// Whether `value` has the JSON type `schema` names.
fn fits(value: &Value, schema: &Value) -> bool {
    match schema["type"].as_str() {
        Some("string") => value.is_string(),
        Some("integer") => value.is_i64() || value.is_u64(),
        Some("array") => value
            .as_array()
            .is_some_and(|a| a.iter().all(|v| fits(v, &schema["items"]))),
        Some("object") => {
            value.is_object()
                && match schema.get("additionalProperties") {
                    Some(extra) => value.as_object().unwrap().values().all(|v| fits(v, extra)),
                    None => true,
                }
        }
        _ => true,
    }
}

#[test]
fn manifests_parse_as_kubernetes_types_and_accept_the_samples_istio_yaml() {
    let certs = Certs::new(None, "cluster.local").unwrap();
    let objects = install::manifests(&Options::default(), &certs);
    for obj in &objects {
        install::check_typed(obj).unwrap();
    }

    // Every Istio resource the sample ships fits its CRD.
    let samples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../samples/config");
    let mut checked = 0;
    for entry in std::fs::read_dir(samples).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for doc in serde_saphyr::from_multiple::<Value>(&text).unwrap() {
            let (api_version, kind) = (
                doc["apiVersion"].as_str().unwrap(),
                doc["kind"].as_str().unwrap(),
            );
            let (group, version) = api_version.split_once('/').unwrap();
            let crd = objects
                .iter()
                .find(|o| {
                    o["kind"] == "CustomResourceDefinition"
                        && o["spec"]["group"] == group
                        && o["spec"]["names"]["kind"] == kind
                })
                .unwrap_or_else(|| panic!("no CRD for {api_version} {kind}"));
            let served = crd["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| v["name"] == version);
            let served = served.unwrap_or_else(|| panic!("{kind}: version {version} not served"));
            let schema = &served["schema"]["openAPIV3Schema"];
            assert_structural(schema, kind);
            let spec_schema = &schema["properties"]["spec"]["properties"];
            for (field, value) in doc["spec"].as_object().unwrap() {
                let field_schema = spec_schema
                    .get(field)
                    .unwrap_or_else(|| panic!("{kind}: spec.{field} not in the CRD"));
                assert!(
                    fits(value, field_schema),
                    "{kind}: spec.{field} = {value} does not fit {field_schema}"
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 10, "only {checked} sample resources");

    // Every kind pilot watches (`--kubernetes`) has a CRD serving v1 under
    // the plural pilot asks for, and pilot's role may list and watch it.
    let role = find(&objects, "ClusterRole", install::NAME);
    let may_watch = |group: &str, plural: &str| {
        role["rules"].as_array().unwrap().iter().any(|r| {
            let has = |field: &str, v: &str| r[field].as_array().unwrap().iter().any(|x| x == v);
            has("apiGroups", group)
                && has("resources", plural)
                && has("verbs", "watch")
                && has("verbs", "list")
        })
    };
    for (group, kind, plural) in mesh_pilot::kubernetes::ISTIO_KINDS {
        let crd = find(
            &objects,
            "CustomResourceDefinition",
            &format!("{plural}.{group}"),
        );
        assert_eq!(crd["spec"]["names"]["kind"], kind);
        assert!(
            crd["spec"]["versions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|v| v["name"] == "v1" && v["served"] == true)
        );
        assert!(
            may_watch(group, plural),
            "pilot may not watch {plural}.{group}"
        );
    }
    for (group, plural) in [
        ("", "services"),
        ("", "pods"),
        ("", "namespaces"),
        ("discovery.k8s.io", "endpointslices"),
    ] {
        assert!(may_watch(group, plural), "pilot may not watch {plural}");
    }
    // The injector follows Istio's mesh config (ConfigMap istio-system/istio).
    let control_plane = find(&objects, "Deployment", "mesh-control-plane");
    let containers = control_plane["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let injector = containers.iter().find(|c| c["name"] == "injector").unwrap();
    assert!(
        injector["command"]
            .as_array()
            .into_iter()
            .chain(injector["args"].as_array())
            .flatten()
            .any(|a| a == "--kubernetes"),
        "{injector}"
    );
    assert!(
        may_watch("", "configmaps"),
        "the injector may not watch configmaps"
    );

    // The webhook: its caBundle is the mesh's root, and its serving
    // certificate verifies against it for the Service's DNS name.
    let mwc = find(
        &objects,
        "MutatingWebhookConfiguration",
        "mesh-sidecar-injector",
    );
    let ca_bundle = b64d(&mwc["webhooks"][0]["clientConfig"]["caBundle"]);
    assert_eq!(ca_bundle, certs.root_pem());
    let tls = find(&objects, "Secret", "mesh-injector-tls");
    let chain: Vec<_> = rustls_pemfile::certs(&mut b64d(&tls["data"]["tls.crt"]).as_bytes())
        .map(Result::unwrap)
        .collect();
    let mut roots = rustls::RootCertStore::empty();
    for root in rustls_pemfile::certs(&mut ca_bundle.as_bytes()) {
        roots.add(root.unwrap()).unwrap();
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .unwrap();
    let name =
        rustls::pki_types::ServerName::try_from("mesh-control-plane.mesh-system.svc").unwrap();
    rustls::client::danger::ServerCertVerifier::verify_server_cert(
        &*verifier,
        &chain[0],
        &chain[1..],
        &name,
        &[],
        rustls::pki_types::UnixTime::now(),
    )
    .expect("the webhook certificate verifies for its Service name");
    let webhooks: Vec<_> = mwc["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        webhooks,
        [
            "namespace.sidecar-injector.mesh.io",
            "rev.namespace.sidecar-injector.mesh.io",
            "object.sidecar-injector.mesh.io"
        ]
    );
}

/// One request the mock API server saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

type Handler = Box<dyn FnMut(&Seen) -> (u16, Value) + Send>;

/// A kube client whose API server answers with `handler` and records
/// every request.
fn api_server(mut handler: Handler) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            let content_type = request
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            let s = Seen {
                method: request.method().to_string(),
                path: request.uri().path().to_string(),
                query: request.uri().query().unwrap_or_default().to_string(),
                content_type,
                body: {
                    let bytes = request.into_body().collect().await.unwrap().to_bytes();
                    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
                },
            };
            let (status, body) = handler(&s);
            log.lock().unwrap().push(s);
            send.send_response(
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        }
    });
    (kube::Client::new(service, "default"), seen)
}

fn not_found(what: &str, name: &str) -> (u16, Value) {
    let (resource, group) = what.split_once('.').unwrap_or((what, ""));
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{what} \"{name}\" not found"), "reason": "NotFound",
        "details": {"name": name, "group": group, "kind": resource}, "code": 404}),
    )
}

/// The server-side apply answer: the object as applied.
fn echo(s: &Seen) -> (u16, Value) {
    let mut obj = s.body.clone();
    obj["metadata"]["uid"] = json!("7b5e3f0c-2d1a-4c3e-9f7e-1a2b3c4d5e6f");
    obj["metadata"]["resourceVersion"] = json!("1042");
    (200, obj)
}

#[tokio::test]
async fn install_applies_everything_in_order_with_server_side_apply() {
    let (client, seen) = api_server(Box::new(|s| match s.method.as_str() {
        "GET" => not_found("secrets", "cacerts"),
        _ => echo(s),
    }));
    let certs = install::existing_certs(&client, "cluster.local")
        .await
        .unwrap();
    assert!(certs.is_none());
    let certs = Certs::new(None, "cluster.local").unwrap();
    let objects = install::manifests(&Options::default(), &certs);
    let mut out = Vec::new();
    install::apply(&client, &objects, &mut out).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen[0].path,
        "/api/v1/namespaces/mesh-system/secrets/cacerts"
    );
    let patches = &seen[1..];
    assert_eq!(patches.len(), objects.len());
    for p in patches {
        assert_eq!(p.method, "PATCH");
        assert_eq!(p.content_type, "application/apply-patch+yaml");
        assert!(
            p.query.contains("fieldManager=meshctl") && p.query.contains("force=true"),
            "{}",
            p.query
        );
    }
    let paths: Vec<&str> = patches.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(paths[0], "/api/v1/namespaces/mesh-system");
    assert_eq!(
        paths[1],
        "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/virtualservices.networking.istio.io"
    );
    assert!(paths.contains(&"/apis/rbac.authorization.k8s.io/v1/clusterroles/mesh-control-plane"));
    assert!(paths.contains(&"/apis/apps/v1/namespaces/mesh-system/deployments/mesh-control-plane"));
    assert!(paths.contains(
        &"/apis/policy/v1/namespaces/mesh-system/poddisruptionbudgets/mesh-control-plane"
    ));
    // The webhook last: it must not be called before its server runs.
    assert_eq!(
        paths.last().unwrap(),
        &"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector"
    );
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("applied Namespace mesh-system\napplied CustomResourceDefinition virtualservices.networking.istio.io\n"), "{text}");
}

#[tokio::test]
async fn installing_again_keeps_the_mesh_ca() {
    let first = Certs::new(None, "cluster.local").unwrap();
    let first_objects = install::manifests(&Options::default(), &first);
    let secret = find(&first_objects, "Secret", "cacerts").clone();
    let (client, _) = api_server(Box::new(move |s| match s.method.as_str() {
        "GET" => (200, {
            let mut v = secret.clone();
            v["metadata"]["uid"] = json!("1");
            v
        }),
        _ => echo(s),
    }));
    let again = install::existing_certs(&client, "cluster.local")
        .await
        .unwrap()
        .expect("found");
    assert_eq!(again.cacerts, first.cacerts);
    let objects = install::manifests(&Options::default(), &again);
    let mwc = find(
        &objects,
        "MutatingWebhookConfiguration",
        "mesh-sidecar-injector",
    );
    assert_eq!(
        b64d(&mwc["webhooks"][0]["clientConfig"]["caBundle"]),
        first.root_pem()
    );
}

#[tokio::test]
async fn a_refusal_names_the_object_and_stops() {
    let (client, seen) = api_server(Box::new(|s| {
        if s.path.contains("/clusterroles/") {
            (
                403,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": "clusterroles.rbac.authorization.k8s.io \"mesh-control-plane\" is forbidden: User \"dev\" cannot patch resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope",
                "reason": "Forbidden", "details": {"name": "mesh-control-plane", "group": "rbac.authorization.k8s.io", "kind": "clusterroles"}, "code": 403}),
            )
        } else {
            echo(s)
        }
    }));
    let objects = install::manifests(
        &Options::default(),
        &Certs::new(None, "cluster.local").unwrap(),
    );
    let err = install::apply(&client, &objects, &mut Vec::new())
        .await
        .unwrap_err();
    assert_eq!(
        format!("{err:#}"),
        "applying ClusterRole mesh-control-plane: clusterroles.rbac.authorization.k8s.io \"mesh-control-plane\" is forbidden: \
         User \"dev\" cannot patch resource \"clusterroles\" in API group \"rbac.authorization.k8s.io\" at the cluster scope (403 Forbidden)"
    );
    let seen = seen.lock().unwrap();
    assert!(
        seen.last()
            .unwrap()
            .path
            .ends_with("/clusterroles/mesh-control-plane"),
        "nothing after the refusal"
    );
}

#[tokio::test]
async fn uninstall_goes_newest_first_and_keeps_the_crds() {
    let (client, seen) = api_server(Box::new(|s| {
        if s.path.ends_with("/poddisruptionbudgets/mesh-control-plane") {
            not_found("poddisruptionbudgets.policy", "mesh-control-plane")
        } else {
            (
                200,
                json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            )
        }
    }));
    let objects = install::manifests(
        &Options::default(),
        &Certs::new(None, "cluster.local").unwrap(),
    );
    let mut out = Vec::new();
    install::uninstall(&client, &objects, false, &mut out)
        .await
        .unwrap();
    let seen = seen.lock().unwrap();
    assert!(seen.iter().all(|s| s.method == "DELETE"));
    assert_eq!(
        seen[0].path,
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/mesh-sidecar-injector"
    );
    assert_eq!(seen.last().unwrap().path, "/api/v1/namespaces/mesh-system");
    assert!(
        !seen
            .iter()
            .any(|s| s.path.contains("customresourcedefinitions"))
    );
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("PodDisruptionBudget mesh-system/mesh-control-plane was not there\n"),
        "{text}"
    );
    assert!(
        text.ends_with(
            "kept the Istio CRDs and the resources made from them (--purge removes them)\n"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn precheck_names_what_the_cluster_lacks() {
    let (client, _) = api_server(Box::new(|s| {
        if s.path == "/version" {
            return (
                200,
                json!({"major": "1", "minor": "28", "gitVersion": "v1.28.9", "gitCommit": "587f5fe8a69b0d15b578eaf478f009247d1c5d47",
                "gitTreeState": "clean", "buildDate": "2024-04-16T15:00:00Z", "goVersion": "go1.21.9", "compiler": "gc", "platform": "linux/amd64"}),
            );
        }
        assert_eq!(
            s.path,
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
        );
        let attrs = &s.body["spec"]["resourceAttributes"];
        let denied = attrs["resource"] == "clusterroles"
            || attrs["resource"] == "mutatingwebhookconfigurations";
        let mut review = s.body.clone();
        review["status"] = if denied {
            json!({"allowed": false})
        } else {
            json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding \"admin\""})
        };
        (201, review)
    }));
    let objects = install::manifests(
        &Options::default(),
        &Certs::new(None, "cluster.local").unwrap(),
    );
    let problems = install::precheck(&client, &objects).await.unwrap();
    assert_eq!(
        problems,
        [
            "Kubernetes 1.28 has no native sidecars (1.29 or later); inject with --legacy-sidecar",
            "you may not create clusterroles.rbac.authorization.k8s.io",
            "you may not create mutatingwebhookconfigurations.admissionregistration.k8s.io",
        ]
    );
}
