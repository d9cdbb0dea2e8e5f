//! Pilot's Kubernetes source: Istio's custom resources, and the Services,
//! EndpointSlices, Pods and Namespaces that make up the mesh's services and
//! workloads, each kept by a kube-rs watcher and reflector.
//!
//! kube-runtime's watcher lists once, then watches from the list's
//! resourceVersion. When the API server ends a watch with 410 Gone (its
//! history was compacted while pilot was away) the watcher lists again, and
//! the reflector takes that list whole: objects deleted during the gap are
//! gone from the cache, not kept as ghosts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Service as KubeService};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;

use crate::istio::{Labels, ServicePort};
use crate::model::{self, ROOT_NAMESPACE, TLS_MODE_LABEL, Workload};
use crate::store::{Meta, Resource, Unread};

/// What errors about objects from the cluster name where a file would be.
pub const SOURCE: &str = "kubernetes";
/// Kubernetes' default cluster domain: a Service's host is
/// `<name>.<namespace>.svc.cluster.local`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// Istio's annotation for a Service's `exportTo`.
const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";
/// The label an EndpointSlice names its Service by.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Istio's kinds pilot watches: (group, kind, plural), each at `v1`, the
/// version `meshctl install`'s CRDs store.
pub const ISTIO_KINDS: [(&str, &str, &str); 9] = [
    ("networking.istio.io", "VirtualService", "virtualservices"),
    ("networking.istio.io", "DestinationRule", "destinationrules"),
    ("networking.istio.io", "ServiceEntry", "serviceentries"),
    ("networking.istio.io", "WorkloadEntry", "workloadentries"),
    ("networking.istio.io", "Sidecar", "sidecars"),
    (
        "security.istio.io",
        "PeerAuthentication",
        "peerauthentications",
    ),
    (
        "security.istio.io",
        "AuthorizationPolicy",
        "authorizationpolicies",
    ),
    (
        "security.istio.io",
        "RequestAuthentication",
        "requestauthentications",
    ),
    ("telemetry.istio.io", "Telemetry", "telemetries"),
];

/// The watched objects, as the reflectors hold them.
#[derive(Clone)]
pub struct Cache {
    services: Store<KubeService>,
    slices: Store<EndpointSlice>,
    pods: Store<Pod>,
    namespaces: Store<Namespace>,
    /// Istio's mesh config: ConfigMap `istio` in the root namespace.
    mesh_config: Store<ConfigMap>,
    /// Each Istio kind's store, and whether its CRD is missing (the
    /// API server answered its list 404).
    istio: Vec<(
        ApiResource,
        Store<DynamicObject>,
        tokio::sync::watch::Receiver<bool>,
    )>,
}

/// Keeps the watchers running; dropping it stops them.
pub struct Watchers {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Watchers {
    pub(crate) fn push(&mut self, task: JoinHandle<()>) {
        self.tasks.push(task);
    }
}

impl Cache {
    /// Starts a watcher for every kind; `changed` hears of every change to
    /// the cache (the end of a list, an added, modified or deleted object).
    pub fn watch(client: &kube::Client, changed: &UnboundedSender<()>) -> (Self, Watchers) {
        let mut tasks = Vec::new();
        let all = watcher::Config::default();
        let services = reflect(Api::all(client.clone()), (), &all, changed, &mut tasks).0;
        let slices = reflect(Api::all(client.clone()), (), &all, changed, &mut tasks).0;
        let pods = reflect(Api::all(client.clone()), (), &all, changed, &mut tasks).0;
        let namespaces = reflect(Api::all(client.clone()), (), &all, changed, &mut tasks).0;
        let mesh_config = reflect(
            Api::namespaced(client.clone(), ROOT_NAMESPACE),
            (),
            &watcher::Config::default()
                .fields(&format!("metadata.name={}", crate::store::MESH_CONFIG_NAME)),
            changed,
            &mut tasks,
        )
        .0;
        let istio = ISTIO_KINDS
            .iter()
            .map(|(group, kind, plural)| {
                let gvk = GroupVersionKind::gvk(group, "v1", kind);
                let ar = ApiResource::from_gvk_with_plural(&gvk, plural);
                let api = Api::all_with(client.clone(), &ar);
                let (store, missing) = reflect(api, ar.clone(), &all, changed, &mut tasks);
                (ar, store, missing)
            })
            .collect();
        let cache = Self {
            services,
            slices,
            pods,
            namespaces,
            mesh_config,
            istio,
        };
        (cache, Watchers { tasks })
    }

    /// Waits until every kind has been listed once: before that, the
    /// cluster would look empty and proxies would lose their endpoints. An
    /// Istio kind whose CRD is not installed counts as listed, with
    /// nothing in it; its watcher keeps trying, and once the CRD is
    /// installed its objects arrive as any change does.
    pub async fn synced(&self) {
        // A store's writer lives as long as its watcher task; the tasks
        // run until dropped, so waiting cannot fail while they run.
        let _ = self.services.wait_until_ready().await;
        let _ = self.slices.wait_until_ready().await;
        let _ = self.pods.wait_until_ready().await;
        let _ = self.namespaces.wait_until_ready().await;
        let _ = self.mesh_config.wait_until_ready().await;
        for (_, store, missing) in &self.istio {
            let mut missing = missing.clone();
            tokio::select! {
                _ = store.wait_until_ready() => {}
                _ = missing.wait_for(|m| *m) => {}
            }
        }
    }

    /// The cluster's objects as pilot's resources, only from namespaces
    /// that `selectors` (Istio's `discoverySelectors`) select; all of them
    /// when there are none. The root namespace is always read, since the
    /// mesh's own config lives there. Objects that do not parse are
    /// returned apart, each with its error.
    pub fn resources(&self, selectors: &[LabelSelector]) -> (Vec<(Meta, Resource)>, Vec<Unread>) {
        let discovered: Option<BTreeSet<String>> = (!selectors.is_empty()).then(|| {
            self.namespaces
                .state()
                .iter()
                .filter(|ns| {
                    let labels = Labels::from(ns.metadata.labels.clone().unwrap_or_default());
                    selectors.iter().any(|s| selector_matches(s, &labels))
                })
                .filter_map(|ns| ns.metadata.name.clone())
                .collect()
        });
        let in_scope =
            |ns: &str| ns == ROOT_NAMESPACE || discovered.as_ref().is_none_or(|d| d.contains(ns));
        let source: Arc<Path> = Path::new(SOURCE).into();
        let meta = |namespace: &str, name: &str| Meta {
            name: name.into(),
            namespace: namespace.into(),
            file: source.clone(),
        };
        let mut out = Vec::new();

        let pods: HashMap<(String, String), Arc<Pod>> = self
            .pods
            .state()
            .into_iter()
            .filter_map(|p| Some(((p.metadata.namespace.clone()?, p.metadata.name.clone()?), p)))
            .collect();
        let mut proxies: Vec<Workload> = pods
            .values()
            .filter_map(|p| pod_workload(p))
            .filter(|w| w.sidecar && in_scope(&w.namespace))
            .collect();
        proxies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        out.extend(
            proxies
                .into_iter()
                .map(|w| (meta(&w.namespace, &w.name), Resource::Pod(Arc::new(w)))),
        );

        let mut slices: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in self.slices.state() {
            let service = slice
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL));
            if let (Some(ns), Some(service)) = (&slice.metadata.namespace, service) {
                slices
                    .entry((ns.clone(), service.clone()))
                    .or_default()
                    .push(slice.clone());
            }
        }
        let mut services: Vec<(Meta, model::Service)> = self
            .services
            .state()
            .iter()
            .filter_map(|svc| {
                let key = (svc.metadata.namespace.clone()?, svc.metadata.name.clone()?);
                if !in_scope(&key.0) {
                    return None;
                }
                let slices = slices.get(&key).map(Vec::as_slice).unwrap_or_default();
                Some((meta(&key.0, &key.1), service(svc, slices, &pods)?))
            })
            .collect();
        services.sort_by(|a, b| a.1.host.cmp(&b.1.host));
        out.extend(
            services
                .into_iter()
                .map(|(m, s)| (m, Resource::KubeService(Arc::new(s)))),
        );

        // Istio resolves conflicts between its resources oldest first.
        let mut objects: Vec<(&ApiResource, Arc<DynamicObject>)> = self
            .istio
            .iter()
            .flat_map(|(ar, store, _)| store.state().into_iter().map(move |o| (ar, o)))
            .filter(|(_, o)| in_scope(o.metadata.namespace.as_deref().unwrap_or_default()))
            .collect();
        objects.sort_by(|(_, a), (_, b)| {
            let key = |o: &DynamicObject| {
                (
                    o.metadata.creation_timestamp.as_ref().map(|t| t.0),
                    o.metadata.namespace.clone(),
                    o.metadata.name.clone(),
                )
            };
            key(a).cmp(&key(b))
        });
        let mut unread = Vec::new();
        for (ar, object) in objects {
            let parsed = serde_json::to_value(&*object)
                .map_err(|e| e.to_string())
                .and_then(|mut value| {
                    // Items of a list may leave out their type; the watch knows it.
                    value["apiVersion"] = ar.api_version.clone().into();
                    value["kind"] = ar.kind.clone().into();
                    crate::store::parse_json(Path::new(SOURCE), value).map_err(|e| e.to_string())
                });
            match parsed {
                Ok(r) => out.extend(r),
                Err(error) => unread.push(Unread {
                    file: PathBuf::from(SOURCE),
                    object: Some((
                        ar.kind.clone(),
                        object.metadata.namespace.clone().unwrap_or_default(),
                        object.metadata.name.clone().unwrap_or_default(),
                    )),
                    error,
                }),
            }
        }
        match self.mesh_config() {
            Some(Ok(r)) => out.push(r),
            Some(Err(error)) => unread.push(Unread {
                file: PathBuf::from(SOURCE),
                object: Some((
                    "ConfigMap".into(),
                    ROOT_NAMESPACE.into(),
                    crate::store::MESH_CONFIG_NAME.into(),
                )),
                error,
            }),
            None => {}
        }
        (out, unread)
    }

    /// Istio's mesh config from the cluster (ConfigMap `istio` in the root
    /// namespace), if there is one, parsed as a file's would be.
    pub fn mesh_config(&self) -> Option<Result<(Meta, Resource), String>> {
        let cm = self
            .mesh_config
            .state()
            .into_iter()
            .find(|cm| cm.metadata.name.as_deref() == Some(crate::store::MESH_CONFIG_NAME))?;
        Some(
            serde_json::to_value(&*cm)
                .map_err(|e| e.to_string())
                .and_then(|mut value| {
                    value["apiVersion"] = "v1".into();
                    value["kind"] = "ConfigMap".into();
                    crate::store::parse_json(Path::new(SOURCE), value).map_err(|e| e.to_string())
                })
                .and_then(|r| r.ok_or_else(|| "not Istio's mesh config".to_string())),
        )
    }
}

/// Runs a watcher and reflector for `api`, telling `changed` of each change.
/// The receiver turns true when the API server does not know the kind (its
/// list answered 404: a CRD not installed).
fn reflect<K>(
    api: Api<K>,
    dyntype: K::DynamicType,
    config: &watcher::Config,
    changed: &UnboundedSender<()>,
    tasks: &mut Vec<JoinHandle<()>>,
) -> (Store<K>, tokio::sync::watch::Receiver<bool>)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Clone + Eq + std::hash::Hash + Send + Sync,
{
    let kind = K::kind(&dyntype).to_string();
    let writer = reflector::store::Writer::new(dyntype);
    let store = writer.as_reader();
    let changed = changed.clone();
    let (missing_tx, missing) = tokio::sync::watch::channel(false);
    let config = config.clone();
    tasks.push(tokio::spawn(async move {
        let events = reflector::reflector(writer, watcher(api, config))
            .default_backoff();
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => {
                    if missing_tx.send_replace(false) {
                        tracing::info!(%kind, "kubernetes: the kind is installed now");
                    }
                    let _ = changed.send(());
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(e))) if e.code == 404 => {
                    if !missing_tx.send_replace(true) {
                        tracing::warn!(%kind, "kubernetes: the API server does not know this kind (its CRD is not installed: `meshctl install` installs it); taken as none until it is");
                    }
                }
                // A 410 Gone is among these: the watcher lists again.
                Err(e) => tracing::warn!(%kind, "kubernetes watch: {e}"),
            }
        }
    }));
    (store, missing)
}

/// A pod as a workload: its name, namespace, address, labels and service
/// account, and whether it runs a sidecar (Istio's
/// `security.istio.io/tlsMode: istio` label, which injection sets). `None`
/// for a pod without an address or one that has finished.
fn pod_workload(pod: &Pod) -> Option<Workload> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    let address = status.pod_ip.clone().filter(|ip| !ip.is_empty())?;
    let labels: Labels = pod.metadata.labels.clone().unwrap_or_default().into();
    Some(Workload {
        name: pod.metadata.name.clone()?,
        namespace: pod.metadata.namespace.clone()?,
        address,
        sidecar: labels.get(TLS_MODE_LABEL).is_some_and(|m| m == "istio"),
        locality: crate::model::locality_of(None, &labels),
        labels: Arc::new(labels),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_string()),
        ports: BTreeMap::new(),
    })
}

/// A Service as the mesh's service: `<name>.<namespace>.svc.cluster.local`,
/// its cluster IPs, its TCP ports (named or with an appProtocol, as Istio
/// reads protocols), and as endpoints the ready addresses of its
/// EndpointSlices, each with its pod's labels, service account and sidecar.
/// An endpoint whose pod is not yet known waits for it; one that names no
/// pod (a hand-made slice) is a plain address without a sidecar.
/// ExternalName Services are left out: they only alias a DNS name.
fn service(
    svc: &KubeService,
    slices: &[Arc<EndpointSlice>],
    pods: &HashMap<(String, String), Arc<Pod>>,
) -> Option<model::Service> {
    let spec = svc.spec.as_ref()?;
    let (name, namespace) = (
        svc.metadata.name.as_ref()?,
        svc.metadata.namespace.as_ref()?,
    );
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let slice_ports = || slices.iter().flat_map(|s| s.ports.iter().flatten());
    let ports: Vec<ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().is_none_or(|p| p == "TCP"))
        .map(|p| {
            let resolved = slice_ports()
                .find(|sp| {
                    sp.name.as_deref().unwrap_or_default() == p.name.as_deref().unwrap_or_default()
                })
                .and_then(|sp| sp.port);
            let declared = match &p.target_port {
                Some(IntOrString::Int(n)) => Some(*n),
                _ => None,
            };
            ServicePort {
                number: p.port as u32,
                protocol: p.app_protocol.as_deref().map(app_protocol),
                name: p.name.clone().filter(|n| !n.is_empty()),
                target_port: resolved.or(declared).map(|n| n as u32),
            }
        })
        .collect();
    if ports.is_empty() {
        return None;
    }
    let vips = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(&spec.cluster_ip)
        .filter_map(|ip| ip.parse().ok())
        .collect::<BTreeSet<std::net::IpAddr>>()
        .into_iter()
        .collect();
    let mut inline = Vec::new();
    for slice in slices.iter().filter(|s| s.address_type != "FQDN") {
        for ep in &slice.endpoints {
            // Kubernetes: an unknown readiness is to be read as ready.
            if ep.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
                continue;
            }
            let pod = ep
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"));
            for address in &ep.addresses {
                let workload = match pod {
                    Some(r) => {
                        let key = (
                            r.namespace.clone().unwrap_or_else(|| namespace.clone()),
                            r.name.clone().unwrap_or_default(),
                        );
                        let Some(mut w) = pods.get(&key).and_then(|p| pod_workload(p)) else {
                            continue;
                        };
                        w.address.clone_from(address);
                        w
                    }
                    None => Workload {
                        name: ep
                            .hostname
                            .clone()
                            .or_else(|| slice.metadata.name.clone())
                            .unwrap_or_default(),
                        namespace: namespace.clone(),
                        address: address.clone(),
                        labels: Default::default(),
                        service_account: "default".to_string(),
                        ports: BTreeMap::new(),
                        sidecar: false,
                        locality: String::new(),
                    },
                };
                inline.push(workload);
            }
        }
    }
    inline.sort_by(|a, b| a.address.cmp(&b.address));
    inline.dedup_by(|a, b| a.address == b.address);
    Some(model::Service {
        host: format!("{name}.{namespace}.svc.{CLUSTER_DOMAIN}"),
        namespace: namespace.clone(),
        ports,
        selector: Labels::new(),
        vips,
        inline,
        // Istio's annotation for a Service's exportTo, comma-separated.
        export_to: svc
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(EXPORT_TO_ANNOTATION))
            .map(|v| {
                v.split(',')
                    .map(|e| e.trim().to_string())
                    .filter(|e| !e.is_empty())
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// A Service port's `appProtocol` as Istio's protocol names
/// (`kubernetes.io/h2c` is HTTP/2 in the clear, `kubernetes.io/ws` HTTP).
fn app_protocol(p: &str) -> String {
    match p.strip_prefix("kubernetes.io/").unwrap_or(p) {
        "h2c" => "HTTP2".to_string(),
        "ws" => "HTTP".to_string(),
        "wss" => "TLS".to_string(),
        other => other.to_ascii_uppercase(),
    }
}

/// Whether a Kubernetes label selector selects `labels`: every
/// matchLabels pair and every matchExpressions requirement (In, NotIn,
/// Exists, DoesNotExist) holds. An unknown operator selects nothing.
pub fn selector_matches(selector: &LabelSelector, labels: &Labels) -> bool {
    let pairs = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs = selector.match_expressions.iter().flatten().all(|r| {
        let value = labels.get(&r.key);
        let listed = || value.is_some_and(|v| r.values.iter().flatten().any(|x| x == v));
        match r.operator.as_str() {
            "In" => listed(),
            "NotIn" => !listed(),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs && exprs
}
