//! `meshctl install`, `uninstall` and `precheck`: the manifests that run
//! the control plane on a Kubernetes cluster, applied with kube-rs
//! (server-side apply, field manager `meshctl`) or printed for GitOps.
//!
//! The objects are written as JSON in Kubernetes' own shape and each is
//! checked by parsing it as its k8s-openapi type before anything is
//! printed or sent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use base64::Engine;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams,
};
use serde_json::{Value, json};

pub const NAMESPACE: &str = mesh_citadel::CONTROL_PLANE_NAMESPACE;
pub const NAME: &str = mesh_citadel::CONTROL_PLANE_NAME;
// citadel keeps these two current once installed.
pub const WEBHOOK: &str = mesh_citadel::kubernetes::WEBHOOK_CONFIGURATION;
pub const CACERTS: &str = "cacerts";
pub const INJECTOR_TLS: &str = mesh_citadel::kubernetes::INJECTOR_TLS;
/// The Kubernetes release whose native sidecars (restartable init
/// containers) are on by default.
pub const NATIVE_SIDECAR_MINOR: u32 = 29;

#[derive(Clone, Debug)]
pub struct Options {
    /// Image with mesh-citadel, mesh-pilot and mesh-injector.
    pub control_plane_image: String,
    /// Image with mesh-proxy and mesh-iptables (for the injector).
    pub proxy_image: String,
    pub trust_domain: String,
    pub revision: String,
    pub replicas: u32,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            control_plane_image: format!("mesh/control-plane:{}", env!("CARGO_PKG_VERSION")),
            proxy_image: mesh_injector::Config::default().proxy_image,
            trust_domain: mesh_identity::DEFAULT_TRUST_DOMAIN.into(),
            revision: "default".into(),
            replicas: 2,
        }
    }
}

/// The CA the control plane signs with (Istio's plug-in layout, kept in
/// the `cacerts` Secret as Istio keeps it) and the webhook's serving
/// certificate, signed by it.
pub struct Certs {
    /// File name → PEM: ca-cert.pem, ca-key.pem, root-cert.pem, cert-chain.pem.
    pub cacerts: BTreeMap<String, String>,
    pub webhook_chain: String,
    pub webhook_key: String,
}

impl Certs {
    pub fn root_pem(&self) -> &str {
        &self.cacerts[mesh_citadel::material::ROOT_CERT_FILE]
    }

    /// From material in `dir` (plug-in layout); a new self-signed root
    /// when `dir` is None.
    pub fn new(dir: Option<&Path>, trust_domain: &str) -> anyhow::Result<Self> {
        use mesh_citadel::material::{CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, ROOT_CERT_FILE};
        let tmp = tempfile::tempdir()?;
        let dir = match dir {
            Some(d) => d.to_path_buf(),
            None => {
                let d = tmp.path().join("ca");
                mesh_citadel::material::Material::generate(&d, trust_domain)?;
                d
            }
        };
        let authority = mesh_citadel::authority::Authority::open(
            &tmp.path().join("state"),
            trust_domain,
            Some(&dir),
        )
        .with_context(|| format!("loading the CA material in {}", dir.display()))?;
        let (webhook_chain, webhook_key) = authority.issue_dns(
            &mesh_citadel::kubernetes::webhook_dns_names(NAME),
            mesh_citadel::kubernetes::WEBHOOK_CERT_LIFETIME,
        )?;
        let mut cacerts = BTreeMap::new();
        for f in [CA_CERT_FILE, CA_KEY_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
            let path = dir.join(f);
            let pem = std::fs::read_to_string(&path)
                .with_context(|| format!("reading {}", path.display()))?;
            cacerts.insert(f.to_string(), pem);
        }
        Ok(Self {
            cacerts,
            webhook_chain,
            webhook_key,
        })
    }

    /// From a `cacerts` Secret already on the cluster (so that installing
    /// again keeps the mesh's root).
    pub fn from_secret(secret: &Value, trust_domain: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = secret
            .get("data")
            .and_then(Value::as_object)
            .context("the cacerts Secret has no data")?;
        for (file, b64) in data {
            let pem = base64::engine::general_purpose::STANDARD
                .decode(b64.as_str().unwrap_or_default())
                .with_context(|| format!("cacerts key {file} is not base64"))?;
            let path = dir.path().join(file);
            std::fs::write(&path, pem)?;
            // citadel refuses a key others may read.
            std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        }
        Self::new(Some(dir.path()), trust_domain)
    }
}

/// (group, kind, plural, top-level spec fields) of every Istio resource
/// kind pilot reads. Each field is typed only at the top; pilot and
/// `meshctl analyze` check the rest field by field. Unknown top-level
/// fields are refused by the API server (kubectl's strict validation).
/// (group, kind, plural, [(spec field, schema kind)]).
type IstioKind = (
    &'static str,
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str)],
);

const ISTIO_KINDS: [IstioKind; 9] = [
    (
        "networking.istio.io",
        "VirtualService",
        "virtualservices",
        &[
            ("hosts", "strings"),
            ("gateways", "strings"),
            ("http", "objects"),
            ("tls", "objects"),
            ("tcp", "objects"),
            ("exportTo", "strings"),
        ],
    ),
    (
        "networking.istio.io",
        "DestinationRule",
        "destinationrules",
        &[
            ("host", "string"),
            ("trafficPolicy", "object"),
            ("subsets", "objects"),
            ("exportTo", "strings"),
            ("workloadSelector", "object"),
        ],
    ),
    (
        "networking.istio.io",
        "ServiceEntry",
        "serviceentries",
        &[
            ("hosts", "strings"),
            ("addresses", "strings"),
            ("ports", "objects"),
            ("location", "string"),
            ("resolution", "string"),
            ("endpoints", "objects"),
            ("workloadSelector", "object"),
            ("exportTo", "strings"),
            ("subjectAltNames", "strings"),
        ],
    ),
    (
        "networking.istio.io",
        "WorkloadEntry",
        "workloadentries",
        &[
            ("address", "string"),
            ("ports", "intmap"),
            ("labels", "stringmap"),
            ("network", "string"),
            ("locality", "string"),
            ("weight", "integer"),
            ("serviceAccount", "string"),
        ],
    ),
    (
        "networking.istio.io",
        "Sidecar",
        "sidecars",
        &[
            ("workloadSelector", "object"),
            ("ingress", "objects"),
            ("egress", "objects"),
            ("outboundTrafficPolicy", "object"),
        ],
    ),
    (
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
        &[
            ("selector", "object"),
            ("mtls", "object"),
            ("portLevelMtls", "object"),
        ],
    ),
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
        &[
            ("selector", "object"),
            ("targetRef", "object"),
            ("targetRefs", "objects"),
            ("action", "string"),
            ("provider", "object"),
            ("rules", "objects"),
        ],
    ),
    (
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
        &[
            ("selector", "object"),
            ("targetRef", "object"),
            ("targetRefs", "objects"),
            ("jwtRules", "objects"),
        ],
    ),
    (
        "telemetry.istio.io",
        "Telemetry",
        "telemetries",
        &[
            ("selector", "object"),
            ("targetRef", "object"),
            ("targetRefs", "objects"),
            ("tracing", "objects"),
            ("metrics", "objects"),
            ("accessLogging", "objects"),
        ],
    ),
];

fn schema(kind: &str) -> Value {
    let open = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true});
    match kind {
        "string" => json!({"type": "string"}),
        "strings" => json!({"type": "array", "items": {"type": "string"}}),
        "integer" => json!({"type": "integer"}),
        "object" => open,
        "objects" => json!({"type": "array", "items": open}),
        "stringmap" => json!({"type": "object", "additionalProperties": {"type": "string"}}),
        "intmap" => json!({"type": "object", "additionalProperties": {"type": "integer"}}),
        other => unreachable!("schema kind {other}"),
    }
}

fn versions(group: &str) -> &'static [&'static str] {
    match group {
        "networking.istio.io" => &["v1", "v1beta1", "v1alpha3"],
        "security.istio.io" => &["v1", "v1beta1"],
        _ => &["v1", "v1alpha1"],
    }
}

fn crd(group: &str, kind: &str, plural: &str, fields: &[(&str, &str)]) -> Value {
    let properties: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(f, k)| (f.to_string(), schema(k)))
        .collect();
    let open_api = json!({
        "type": "object",
        "properties": {
            "spec": {"type": "object", "properties": properties},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let versions: Vec<Value> = versions(group)
        .iter()
        .enumerate()
        .map(|(i, v)| {
            json!({
                "name": v, "served": true, "storage": i == 0,
                "schema": {"openAPIV3Schema": open_api},
                "subresources": {"status": {}},
            })
        })
        .collect();
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("{plural}.{group}"), "labels": labels()},
        "spec": {
            "group": group,
            "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(),
                "listKind": format!("{kind}List"), "categories": ["istio-io", "mesh"]},
            "scope": "Namespaced",
            "versions": versions,
        },
    })
}

fn labels() -> Value {
    json!({"app.kubernetes.io/name": NAME, "app.kubernetes.io/part-of": "mesh",
           "app.kubernetes.io/managed-by": "meshctl"})
}

fn meta(name: &str) -> Value {
    json!({"name": name, "namespace": NAMESPACE, "labels": labels()})
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// Every object, in the order they are applied.
pub fn manifests(opts: &Options, certs: &Certs) -> Vec<Value> {
    let mut out = vec![json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": NAMESPACE, "labels": labels()},
    })];
    out.extend(ISTIO_KINDS.iter().map(|(g, k, p, f)| crd(g, k, p, f)));
    let crd_groups = [
        "networking.istio.io",
        "security.istio.io",
        "telemetry.istio.io",
    ];
    let crd_plurals: Vec<&str> = ISTIO_KINDS.iter().map(|k| k.2).collect();
    out.push(json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(NAME)}));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": NAME, "labels": labels()},
        "rules": [
            {"apiGroups": [""], "resources": ["services", "pods", "namespaces"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": crd_groups, "resources": crd_plurals, "verbs": ["get", "list", "watch"]},
            {"apiGroups": crd_groups, "resources": crd_plurals.iter().map(|p| format!("{p}/status")).collect::<Vec<_>>(),
             "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            // The trust bundle each injected namespace mounts.
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list", "watch", "create", "update", "patch"]},
            // Only its own webhook, to keep the CA bundle current.
            {"apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
             "resourceNames": [WEBHOOK], "verbs": ["get", "patch", "update"]},
        ],
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": NAME, "labels": labels()},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(NAME),
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "resourceNames": [CACERTS, INJECTOR_TLS],
                   "verbs": ["get", "watch"]},
                  // citadel issues the injector's certificate again before it expires.
                  {"apiGroups": [""], "resources": ["secrets"], "resourceNames": [INJECTOR_TLS],
                   "verbs": ["patch", "update"]}],
    }));
    out.push(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(NAME),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
        "subjects": [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}],
    }));
    let cacerts: serde_json::Map<String, Value> = certs
        .cacerts
        .iter()
        .map(|(k, v)| (k.clone(), json!(b64(v))))
        .collect();
    out.push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": meta(CACERTS), "type": "Opaque", "data": cacerts}));
    out.push(json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": meta(INJECTOR_TLS), "type": "kubernetes.io/tls",
        "data": {"tls.crt": b64(&certs.webhook_chain), "tls.key": b64(&certs.webhook_key)},
    }));
    let root_cm = mesh_injector::Config::default().root_configmap;
    out.push(json!({
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(&root_cm),
        "data": {"root-cert.pem": certs.root_pem()},
    }));
    out.push(json!({
        "apiVersion": "v1", "kind": "Service", "metadata": meta(NAME),
        "spec": {
            "selector": {"app": NAME},
            "ports": [
                {"name": "tls-ca", "port": 15011, "targetPort": 15011, "protocol": "TCP"},
                {"name": "grpc-xds", "port": 15012, "targetPort": 15012, "protocol": "TCP"},
                {"name": "http-monitoring", "port": 15014, "targetPort": 15014, "protocol": "TCP"},
                {"name": "https-webhook", "port": 443, "targetPort": 15017, "protocol": "TCP"},
            ],
        },
    }));
    out.push(deployment(opts));
    out.push(json!({
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(NAME),
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": NAME}}},
    }));
    out.push(webhook_configuration(opts, certs.root_pem()));
    out
}

fn deployment(opts: &Options) -> Value {
    let secure = json!({
        "runAsNonRoot": true, "runAsUser": 1337, "runAsGroup": 1337, "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
    });
    let tcp_probe =
        |port: u16| json!({"tcpSocket": {"port": port}, "periodSeconds": 5, "failureThreshold": 3});
    let svc = format!("{NAME}.{NAMESPACE}.svc");
    let container = |name: &str, command: Vec<String>, port: u16, mounts: Value, probe: Value| {
        json!({
            "name": name, "image": opts.control_plane_image, "command": command,
            "ports": [{"containerPort": port, "protocol": "TCP"}],
            "readinessProbe": probe.clone(), "livenessProbe": probe,
            "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"cpu": "1", "memory": "512Mi"}},
            "securityContext": secure, "volumeMounts": mounts,
        })
    };
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(NAME),
        "spec": {
            "replicas": opts.replicas,
            "selector": {"matchLabels": {"app": NAME}},
            "template": {
                "metadata": {"labels": {"app": NAME, "sidecar.istio.io/inject": "false"}},
                "spec": {
                    "serviceAccountName": NAME,
                    // The containers run as 1337 and read their Secrets
                    // (mode 0400, root's) through this group, as kubelet
                    // gives it them.
                    "securityContext": {"fsGroup": 1337},
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                            "labelSelector": {"matchLabels": {"app": NAME}}},
                    }]}},
                    "containers": [
                        container("citadel", s(&["mesh-citadel", "--state-dir", "/var/run/mesh/citadel",
                            "--plugin-certs", "/etc/cacerts", "--kubernetes", "serve", "--listen", "0.0.0.0:15011",
                            "--monitoring-listen", "0.0.0.0:15015"]),
                            15011,
                            json!([{"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": true},
                                   {"name": "state", "mountPath": "/var/run/mesh"}]),
                            tcp_probe(15011)),
                        container("pilot", s(&["mesh-pilot", "--kubernetes", "--config-dir", "/etc/mesh/config",
                            "--listen", "0.0.0.0:15012", "--monitoring-listen", "0.0.0.0:15014",
                            "--ca-addr", "127.0.0.1:15011",
                            "--ca-root-file", "/etc/cacerts/root-cert.pem",
                            "--token-file", "/var/run/secrets/tokens/mesh-token"]),
                            15012,
                            json!([{"name": "cacerts", "mountPath": "/etc/cacerts", "readOnly": true},
                                   {"name": "config", "mountPath": "/etc/mesh/config", "readOnly": true},
                                   {"name": "token", "mountPath": "/var/run/secrets/tokens", "readOnly": true}]),
                            tcp_probe(15012)),
                        container("injector", vec!["mesh-injector".into(), "--kubernetes".into(),
                            "--tls-cert".into(), "/etc/injector-tls/tls.crt".into(),
                            "--tls-key".into(), "/etc/injector-tls/tls.key".into(),
                            "--proxy-image".into(), opts.proxy_image.clone(),
                            "--pilot-addr".into(), format!("{svc}:15012"),
                            "--ca-addr".into(), format!("{svc}:15011"),
                            "--trust-domain".into(), opts.trust_domain.clone(),
                            "--revision".into(), opts.revision.clone()],
                            15017,
                            json!([{"name": "injector-tls", "mountPath": "/etc/injector-tls", "readOnly": true}]),
                            json!({"httpGet": {"path": "/healthz/ready", "port": 15017, "scheme": "HTTPS"},
                                   "periodSeconds": 5, "failureThreshold": 3})),
                    ],
                    "volumes": [
                        {"name": "cacerts", "secret": {"secretName": CACERTS, "defaultMode": 0o400}},
                        {"name": "injector-tls", "secret": {"secretName": INJECTOR_TLS, "defaultMode": 0o400}},
                        {"name": "state", "emptyDir": {}},
                        {"name": "config", "configMap": {"name": "mesh-config", "optional": true}},
                        {"name": "token", "projected": {"sources": [{"serviceAccountToken": {
                            "audience": mesh_citadel::kubernetes::DEFAULT_AUDIENCE,
                            "expirationSeconds": 43200, "path": "mesh-token"}}]}},
                    ],
                },
            },
        },
    })
}

/// Three webhooks, so that the API server calls the injector once per pod
/// that should be looked at: pods in namespaces labelled for injection
/// (`istio-injection=enabled`, or `istio.io/rev` naming this revision)
/// that do not decide for themselves, and pods that ask for it anywhere
/// but kube-system and kube-public.
fn webhook_configuration(opts: &Options, root_pem: &str) -> Value {
    let hook = |name: &str, namespace_selector: Value, object_selector: Value| {
        json!({
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "reinvocationPolicy": "Never",
            "timeoutSeconds": 10,
            "clientConfig": {
                "service": {"name": NAME, "namespace": NAMESPACE, "path": "/inject", "port": 443},
                "caBundle": b64(root_pem),
            },
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                       "resources": ["pods"], "scope": "Namespaced"}],
            "namespaceSelector": namespace_selector,
            "objectSelector": object_selector,
        })
    };
    let undecided = json!({"matchExpressions": [
        {"key": mesh_injector::INJECT, "operator": "NotIn", "values": ["true", "false"]}]});
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK, "labels": labels()},
        "webhooks": [
            hook("namespace.sidecar-injector.mesh.io",
                json!({"matchLabels": {mesh_injector::NAMESPACE_INJECTION: "enabled"}}),
                undecided.clone()),
            hook("rev.namespace.sidecar-injector.mesh.io",
                json!({"matchExpressions": [
                    {"key": mesh_injector::NAMESPACE_INJECTION, "operator": "DoesNotExist"},
                    {"key": mesh_injector::REVISION, "operator": "In", "values": [opts.revision]}]}),
                undecided),
            hook("object.sidecar-injector.mesh.io",
                json!({"matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                    "values": ["kube-system", "kube-public"]}]}),
                json!({"matchLabels": {mesh_injector::INJECT: "true"}})),
        ],
    })
}

/// Parses `obj` as the k8s-openapi type of its kind: the shape is right
/// before anything is printed or sent.
pub fn check_typed(obj: &Value) -> anyhow::Result<()> {
    use k8s_openapi::api::{
        admissionregistration::v1 as adm, apps::v1 as apps, core::v1 as core, policy::v1 as policy,
        rbac::v1 as rbac,
    };
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
    fn parse<T: serde::de::DeserializeOwned + serde::Serialize>(obj: &Value) -> anyhow::Result<()> {
        let typed: T = serde_path_to_error::deserialize(obj)
            .map_err(|e| anyhow::anyhow!("at {}: {}", e.path(), e.inner()))?;
        anyhow::ensure!(
            &serde_json::to_value(typed)? == obj,
            "fields the type does not know"
        );
        Ok(())
    }
    let kind = obj["kind"].as_str().unwrap_or_default();
    match kind {
        "Namespace" => parse::<core::Namespace>(obj),
        "ServiceAccount" => parse::<core::ServiceAccount>(obj),
        "Secret" => parse::<core::Secret>(obj),
        "ConfigMap" => parse::<core::ConfigMap>(obj),
        "Service" => parse::<core::Service>(obj),
        "CustomResourceDefinition" => parse::<ext::CustomResourceDefinition>(obj),
        "ClusterRole" => parse::<rbac::ClusterRole>(obj),
        "ClusterRoleBinding" => parse::<rbac::ClusterRoleBinding>(obj),
        "Role" => parse::<rbac::Role>(obj),
        "RoleBinding" => parse::<rbac::RoleBinding>(obj),
        "Deployment" => parse::<apps::Deployment>(obj),
        "PodDisruptionBudget" => parse::<policy::PodDisruptionBudget>(obj),
        "MutatingWebhookConfiguration" => parse::<adm::MutatingWebhookConfiguration>(obj),
        other => bail!("no type for kind {other}"),
    }
    .with_context(|| format!("{kind} {} is not a valid {kind}", obj["metadata"]["name"]))
}

/// The resource name of one of our kinds.
fn plural(kind: &str) -> String {
    format!("{}s", kind.to_lowercase())
}

/// The API resource of one of our objects.
fn api_for(client: &kube::Client, obj: &Value) -> anyhow::Result<Api<DynamicObject>> {
    let (api_version, kind) = (
        obj["apiVersion"].as_str().unwrap_or_default(),
        obj["kind"].as_str().unwrap_or_default(),
    );
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let ar = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(group, version, kind),
        &plural(kind),
    );
    Ok(match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    })
}

fn describe(obj: &Value) -> String {
    let kind = obj["kind"].as_str().unwrap_or_default();
    let name = obj["metadata"]["name"].as_str().unwrap_or_default();
    match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

fn api_error(e: kube::Error) -> anyhow::Error {
    match e {
        kube::Error::Api(s) => anyhow::anyhow!("{} ({} {})", s.message, s.code, s.reason),
        other => anyhow::Error::from(other),
    }
}

/// The CA already on the cluster, if `cacerts` exists.
pub async fn existing_certs(
    client: &kube::Client,
    trust_domain: &str,
) -> anyhow::Result<Option<Certs>> {
    let secrets: Api<DynamicObject> = api_for(
        client,
        &json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"namespace": NAMESPACE}}),
    )?;
    match secrets.get_opt(CACERTS).await.map_err(api_error)? {
        Some(s) => Ok(Some(Certs::from_secret(
            &serde_json::to_value(s)?,
            trust_domain,
        )?)),
        None => Ok(None),
    }
}

/// Server-side applies every object in order; stops at the first the API
/// server refuses, naming it.
pub async fn apply(
    client: &kube::Client,
    objects: &[Value],
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    let params = PatchParams::apply("meshctl").force();
    for obj in objects {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        api_for(client, obj)?
            .patch(name, &params, &Patch::Apply(obj))
            .await
            .map_err(api_error)
            .with_context(|| format!("applying {}", describe(obj)))?;
        writeln!(out, "applied {}", describe(obj))?;
    }
    Ok(())
}

/// Deletes what `install` applied, newest first. The CRDs (and with them
/// every Istio resource on the cluster) only with `purge`.
pub async fn uninstall(
    client: &kube::Client,
    objects: &[Value],
    purge: bool,
    out: &mut impl std::io::Write,
) -> anyhow::Result<()> {
    for obj in objects.iter().rev() {
        if obj["kind"] == "CustomResourceDefinition" && !purge {
            continue;
        }
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        match api_for(client, obj)?
            .delete(name, &DeleteParams::default())
            .await
        {
            Ok(_) => writeln!(out, "deleted {}", describe(obj))?,
            Err(kube::Error::Api(s)) if s.code == 404 => {
                writeln!(out, "{} was not there", describe(obj))?
            }
            Err(e) => {
                return Err(api_error(e)).with_context(|| format!("deleting {}", describe(obj)));
            }
        }
    }
    if !purge {
        writeln!(
            out,
            "kept the Istio CRDs and the resources made from them (--purge removes them)"
        )?;
    }
    Ok(())
}

/// What the cluster lacks for `install` and for injected pods: a
/// Kubernetes with native sidecars, and permission to create each object.
pub async fn precheck(client: &kube::Client, objects: &[Value]) -> anyhow::Result<Vec<String>> {
    let mut problems = Vec::new();
    let version = client
        .apiserver_version()
        .await
        .map_err(api_error)
        .context("asking the API server its version")?;
    let minor: u32 = version.minor.trim_end_matches('+').parse().unwrap_or(0);
    if version.major != "1" || minor < NATIVE_SIDECAR_MINOR {
        problems.push(format!(
            "Kubernetes {}.{} has no native sidecars (1.{NATIVE_SIDECAR_MINOR} or later); inject with --legacy-sidecar",
            version.major, version.minor
        ));
    }
    let reviews: Api<DynamicObject> = Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("authorization.k8s.io", "v1", "SelfSubjectAccessReview"),
            "selfsubjectaccessreviews",
        ),
    );
    // One question per resource type and namespace (nine CRDs, one answer).
    let mut asked = std::collections::BTreeSet::new();
    for obj in objects {
        let (api_version, kind) = (
            obj["apiVersion"].as_str().unwrap_or_default(),
            obj["kind"].as_str().unwrap_or_default(),
        );
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let plural = plural(kind);
        if !asked.insert((group, plural.clone(), obj["metadata"]["namespace"].as_str())) {
            continue;
        }
        let mut attrs = json!({"verb": "create", "group": group, "resource": plural});
        if let Some(ns) = obj["metadata"]["namespace"].as_str() {
            attrs["namespace"] = json!(ns);
        }
        let review: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
            "metadata": {}, "spec": {"resourceAttributes": attrs},
        }))?;
        let answer = reviews
            .create(&Default::default(), &review)
            .await
            .map_err(api_error)
            .with_context(|| format!("asking whether you may create {plural}"))?;
        if answer.data["status"]["allowed"] != json!(true) {
            let why = answer.data["status"]["reason"].as_str().unwrap_or("");
            let problem = format!(
                "you may not create {plural}{}{}",
                if group.is_empty() {
                    String::new()
                } else {
                    format!(".{group}")
                },
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" ({why})")
                }
            );
            problems.push(problem);
        }
    }
    Ok(problems)
}

/// A client from `kubeconfig`, or the usual places (KUBECONFIG,
/// ~/.kube/config, in-cluster).
pub async fn client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("finding a kubeconfig")?,
    };
    Ok(kube::Client::try_from(config)?)
}
