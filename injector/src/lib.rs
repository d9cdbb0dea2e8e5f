//! Sidecar injection. [`inject`] is a pure function from a Pod (and what
//! its namespace asks for) to the Pod with the mesh added: the proxy as a
//! native sidecar (or, in legacy mode, a first container that holds the
//! app until it is ready), the init container that loads the pod's traffic
//! capture, the identity token and trust bundle volumes, and kubelet probes
//! rewritten to pass through the proxy's agent port. No I/O happens here:
//! the admission webhook (`webhook`, `server`) and `meshctl kube-inject`
//! (`workloads`) both call it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    ExecAction, HTTPGetAction, Lifecycle, LifecycleHandler, ObjectFieldSelector, Pod, Probe,
    ProjectedVolumeSource, ResourceRequirements, SecurityContext, ServiceAccountTokenProjection,
    Volume, VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub mod mesh;
pub mod probes;
pub mod server;
pub mod webhook;
pub mod workloads;

/// Records what was injected (JSON); its presence makes injection a no-op.
pub const STATUS_ANNOTATION: &str = "sidecar.istio.io/status";
/// Pod label or annotation: `true` / `false`.
pub const INJECT: &str = "sidecar.istio.io/inject";
/// Pod annotation: `false` selects legacy mode (a regular container).
pub const NATIVE_SIDECAR: &str = "sidecar.istio.io/nativeSidecar";
pub const PROXY_IMAGE: &str = "sidecar.istio.io/proxyImage";
pub const INTERCEPTION_MODE: &str = "sidecar.istio.io/interceptionMode";
pub const REWRITE_PROBES: &str = "sidecar.istio.io/rewriteAppHTTPProbers";
pub const PROXY_CPU: &str = "sidecar.istio.io/proxyCPU";
pub const PROXY_MEMORY: &str = "sidecar.istio.io/proxyMemory";
pub const PROXY_CPU_LIMIT: &str = "sidecar.istio.io/proxyCPULimit";
pub const PROXY_MEMORY_LIMIT: &str = "sidecar.istio.io/proxyMemoryLimit";
pub const INCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/includeInboundPorts";
pub const EXCLUDE_INBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND_PORTS: &str = "traffic.sidecar.istio.io/excludeOutboundPorts";
pub const INCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/includeOutboundIPRanges";
pub const EXCLUDE_OUTBOUND_RANGES: &str = "traffic.sidecar.istio.io/excludeOutboundIPRanges";
/// Pod annotation: `false` leaves the pod's prometheus.io annotations alone
/// (no merged metrics on the agent port).
pub const MERGE_METRICS: &str = "prometheus.istio.io/merge-metrics";
pub const PROMETHEUS_SCRAPE: &str = "prometheus.io/scrape";
pub const PROMETHEUS_PORT: &str = "prometheus.io/port";
pub const PROMETHEUS_PATH: &str = "prometheus.io/path";
/// Pod annotation: Istio's per-pod ProxyConfig, YAML or JSON, over the
/// mesh config's `defaultConfig` ([`mesh`]). The injector takes its
/// `concurrency` (serving threads; 0 for one per CPU the container may
/// use), `terminationDrainDuration` and `holdApplicationUntilProxyStarts`;
/// its other fields are not read, and are named ([`warnings`]).
pub const PROXY_CONFIG: &str = "proxy.istio.io/config";
/// Istio annotations this mesh cannot honour: refused by name, not ignored.
const UNSUPPORTED_ANNOTATIONS: [(&str, &str); 3] = [
    (
        "traffic.sidecar.istio.io/includeOutboundPorts",
        "outbound traffic is captured by destination range (includeOutboundIPRanges) and exempted by port (excludeOutboundPorts)",
    ),
    (
        "traffic.sidecar.istio.io/kubevirtInterfaces",
        "capture covers the pod's own interfaces only",
    ),
    (
        "traffic.sidecar.istio.io/excludeInterfaces",
        "capture covers every interface of the pod",
    ),
];
/// Namespace labels.
pub const NAMESPACE_INJECTION: &str = "istio-injection";
pub const REVISION: &str = "istio.io/rev";

pub const PROXY_CONTAINER: &str = "mesh-proxy";
pub const INIT_CONTAINER: &str = "mesh-init";
pub const TOKEN_VOLUME: &str = "mesh-token";
pub const ROOT_VOLUME: &str = "mesh-ca-root";
pub const TOKEN_DIR: &str = "/var/run/secrets/tokens";
pub const ROOT_DIR: &str = "/var/run/secrets/mesh";
/// The proxy's UID, exempt from capture.
pub const PROXY_UID: i64 = 1337;
/// The proxy's agent port: rewritten app probes, `/quitquitquit`.
pub const AGENT_PORT: i32 = 15020;
pub const HEALTH_PORT: i32 = 15021;
const SYSTEM_NAMESPACES: [&str; 2] = ["kube-system", "kube-public"];

/// What the injector puts into pods; one per control plane.
#[derive(Clone, Debug)]
pub struct Config {
    /// Image holding `mesh-proxy` and `mesh-iptables`.
    pub proxy_image: String,
    /// pilot and citadel as the proxy dials them (`host:port`).
    pub pilot_addr: String,
    pub ca_addr: String,
    pub trust_domain: String,
    /// This injector's revision: namespaces labelled `istio.io/rev=<it>`
    /// are injected.
    pub revision: String,
    /// Audience of the projected service-account token citadel checks.
    pub token_audience: String,
    /// ConfigMap (in every injected namespace) holding `root-cert.pem`.
    pub root_configmap: String,
    /// Native sidecars by default; a pod's `sidecar.istio.io/nativeSidecar`
    /// annotation overrides.
    pub native_sidecars: bool,
    /// The mesh config's `defaultConfig`, which a pod's
    /// `proxy.istio.io/config` overrides.
    pub mesh_defaults: mesh::ProxyConfig,
}

/// The injector's settings as flags (the webhook server and `meshctl
/// kube-inject` share them).
#[derive(clap::Args, Clone, Debug)]
pub struct ConfigArgs {
    /// Image holding `mesh-proxy` and `mesh-iptables`.
    #[arg(long, env = "MESH_PROXY_IMAGE", default_value_t = Config::default().proxy_image)]
    pub proxy_image: String,
    /// pilot as the sidecars dial it (host:port).
    #[arg(long, env = "MESH_INJECT_PILOT_ADDR", default_value_t = Config::default().pilot_addr)]
    pub pilot_addr: String,
    /// citadel as the sidecars dial it (host:port).
    #[arg(long, env = "MESH_INJECT_CA_ADDR", default_value_t = Config::default().ca_addr)]
    pub ca_addr: String,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value_t = Config::default().trust_domain)]
    pub trust_domain: String,
    /// Namespaces labelled istio.io/rev=<this> are injected.
    #[arg(long, env = "MESH_REVISION", default_value_t = Config::default().revision)]
    pub revision: String,
    /// Audience of the projected token citadel checks.
    #[arg(long, default_value_t = Config::default().token_audience)]
    pub token_audience: String,
    /// ConfigMap holding the mesh's root-cert.pem in each namespace.
    #[arg(long, default_value_t = Config::default().root_configmap)]
    pub root_configmap: String,
    /// Inject the proxy as a regular container that holds the app until
    /// it is ready, instead of a native sidecar (Kubernetes before 1.29).
    #[arg(long)]
    pub legacy_sidecar: bool,
    /// Istio's mesh config (the YAML under the `mesh` key of ConfigMap
    /// istio-system/istio): its defaultConfig's concurrency,
    /// terminationDrainDuration and holdApplicationUntilProxyStarts apply to
    /// pods that do not set their own.
    #[arg(long, value_name = "FILE")]
    pub mesh_config: Option<std::path::PathBuf>,
}

impl TryFrom<ConfigArgs> for Config {
    type Error = mesh::MeshConfigError;

    fn try_from(a: ConfigArgs) -> Result<Self, Self::Error> {
        Ok(Self {
            mesh_defaults: match &a.mesh_config {
                Some(path) => mesh::from_file(path)?,
                None => mesh::ProxyConfig::default(),
            },
            proxy_image: a.proxy_image,
            pilot_addr: a.pilot_addr,
            ca_addr: a.ca_addr,
            trust_domain: a.trust_domain,
            revision: a.revision,
            token_audience: a.token_audience,
            root_configmap: a.root_configmap,
            native_sidecars: !a.legacy_sidecar,
        })
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            proxy_image: format!("mesh/proxy:{}", env!("CARGO_PKG_VERSION")),
            pilot_addr: "mesh-control-plane.mesh-system.svc:15012".into(),
            ca_addr: "mesh-control-plane.mesh-system.svc:15011".into(),
            trust_domain: "cluster.local".into(),
            revision: "default".into(),
            token_audience: "istio-ca".into(),
            root_configmap: "mesh-ca-root-cert".into(),
            native_sidecars: true,
            mesh_defaults: mesh::ProxyConfig::default(),
        }
    }
}

/// What a pod's namespace asks for, from its labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NamespacePolicy {
    /// `istio-injection=enabled`, or `istio.io/rev` naming this revision.
    Enabled,
    /// `istio-injection` set to anything but `enabled`.
    Disabled,
    /// `istio.io/rev` naming another revision.
    OtherRevision(String),
    /// Neither label.
    Unset,
}

impl NamespacePolicy {
    /// `istio-injection` wins over `istio.io/rev`, as in Istio.
    pub fn from_labels(labels: &BTreeMap<String, String>, revision: &str) -> Self {
        match (
            labels.get(NAMESPACE_INJECTION).map(String::as_str),
            labels.get(REVISION),
        ) {
            (Some("enabled"), _) => Self::Enabled,
            (Some(_), _) => Self::Disabled,
            (None, Some(rev)) if rev == revision => Self::Enabled,
            (None, Some(rev)) => Self::OtherRevision(rev.clone()),
            (None, None) => Self::Unset,
        }
    }
}

/// Why a pod was left alone.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Skip {
    #[error("already injected ({STATUS_ANNOTATION} is set)")]
    AlreadyInjected,
    #[error("the pod uses the host's network")]
    HostNetwork,
    #[error("namespace {0} is never injected")]
    SystemNamespace(String),
    #[error("the pod's {0} {INJECT} is false")]
    PodOptedOut(&'static str),
    #[error("the pod's {REVISION} label names revision {0:?}, not this injector's")]
    PodOtherRevision(String),
    #[error("the namespace has injection disabled")]
    NamespaceDisabled,
    #[error("the namespace's {REVISION} label names revision {0:?}, not this injector's")]
    NamespaceOtherRevision(String),
    #[error("neither the pod nor its namespace asks for injection")]
    NotSelected,
    #[error("only pod creation is mutated, not {0}")]
    NotACreate(String),
}

/// A pod the injector refuses, naming what is wrong; nothing is injected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the pod has no spec")]
    NoSpec,
    #[error("spec.containers is empty")]
    NoContainers,
    #[error(
        "the pod already has a container named {0}; rename it or opt the pod out with {INJECT}: \"false\""
    )]
    NameTaken(String),
    #[error("{key}: {value:?} is not {expected}")]
    BadAnnotation {
        key: String,
        value: String,
        expected: std::borrow::Cow<'static, str>,
    },
    #[error("{key} is not supported: {why}")]
    Unsupported { key: String, why: &'static str },
    #[error("{0}")]
    Probe(String),
}

#[derive(Debug)]
pub enum Outcome {
    Injected(Box<Pod>),
    Skipped(Skip),
}

/// Whether `pod` (in `namespace`, whose labels say `ns`) gets a sidecar.
/// The pod's own label or annotation wins over its namespace's; pods on the
/// host's network and in kube-system / kube-public never do.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    ns: &NamespacePolicy,
    cfg: &Config,
) -> Result<Option<Skip>, InjectError> {
    let meta = &pod.metadata;
    if annotation(pod, STATUS_ANNOTATION).is_some() {
        return Ok(Some(Skip::AlreadyInjected));
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        return Ok(Some(Skip::HostNetwork));
    }
    if SYSTEM_NAMESPACES.contains(&namespace) {
        return Ok(Some(Skip::SystemNamespace(namespace.into())));
    }
    // The label is the newer form and wins over the annotation.
    let choice = match meta.labels.as_ref().and_then(|l| l.get(INJECT)) {
        Some(v) => Some(("label", parse_bool(INJECT, v)?)),
        None => match annotation(pod, INJECT) {
            Some(v) => Some(("annotation", parse_bool(INJECT, v)?)),
            None => None,
        },
    };
    if let Some((source, false)) = choice {
        return Ok(Some(Skip::PodOptedOut(source)));
    }
    if let Some(rev) = meta.labels.as_ref().and_then(|l| l.get(REVISION))
        && *rev != cfg.revision
    {
        return Ok(Some(Skip::PodOtherRevision(rev.clone())));
    }
    if choice.is_some() {
        return Ok(None);
    }
    Ok(match ns {
        NamespacePolicy::Enabled => None,
        NamespacePolicy::Disabled => Some(Skip::NamespaceDisabled),
        NamespacePolicy::OtherRevision(r) => Some(Skip::NamespaceOtherRevision(r.clone())),
        NamespacePolicy::Unset => Some(Skip::NotSelected),
    })
}

/// What the user should hear about an injected pod (the webhook sends it
/// as the AdmissionReview's warnings, which kubectl prints; kube-inject
/// prints it on stderr): the fields of its `proxy.istio.io/config` the
/// sidecar does not read, and a drain the pod's grace period cuts short.
pub fn warnings(pod: &Pod, cfg: &Config) -> Vec<String> {
    let (Ok(own), Ok(native)) = (own_proxy_config(pod), native(pod, cfg)) else {
        return Vec::new();
    };
    let own = own.unwrap_or_default();
    let mut out: Vec<String> = own
        .unread_note(&format!("{PROXY_CONFIG} fields"))
        .into_iter()
        .collect();
    if native && own.hold_application_until_proxy_starts == Some(false) {
        out.push(
            "holdApplicationUntilProxyStarts: false does not apply to a native sidecar: Kubernetes starts the app's containers only once it is ready".into(),
        );
    }
    let proxy = cfg.mesh_defaults.under(own);
    // Kubernetes' default grace period is 30 s.
    let grace = pod
        .spec
        .as_ref()
        .and_then(|s| s.termination_grace_period_seconds)
        .unwrap_or(30);
    if let Some(drain) = proxy.termination_drain_duration
        && drain >= Duration::from_secs(grace.max(0) as u64)
    {
        out.push(format!(
            "terminationDrainDuration {} is not shorter than the pod's terminationGracePeriodSeconds ({grace}): the kubelet stops the sidecar before it has drained",
            humantime::format_duration(drain)
        ));
    }
    out
}

/// The pod with the mesh added, or why it was left alone.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    ns: &NamespacePolicy,
    cfg: &Config,
) -> Result<Outcome, InjectError> {
    if let Some(skip) = decide(pod, namespace, ns, cfg)? {
        return Ok(Outcome::Skipped(skip));
    }
    for (key, why) in UNSUPPORTED_ANNOTATIONS {
        if annotation(pod, key).is_some() {
            return Err(InjectError::Unsupported {
                key: key.into(),
                why,
            });
        }
    }
    let native = native(pod, cfg)?;
    let capture = match annotation(pod, INTERCEPTION_MODE).unwrap_or("REDIRECT") {
        "REDIRECT" => true,
        "NONE" => false,
        "TPROXY" => {
            return Err(InjectError::Unsupported {
                key: INTERCEPTION_MODE.into(),
                why: "the capture redirects (REDIRECT) or is off (NONE); TPROXY is not implemented",
            });
        }
        other => {
            return Err(bad(INTERCEPTION_MODE, other, "REDIRECT, TPROXY or NONE"));
        }
    };
    let rewrite = match annotation(pod, REWRITE_PROBES) {
        Some(v) => parse_bool(REWRITE_PROBES, v)?,
        None => true,
    };
    let merge = match annotation(pod, MERGE_METRICS) {
        Some(v) => parse_bool(MERGE_METRICS, v)?,
        None => true,
    } && annotation(pod, PROMETHEUS_SCRAPE) != Some("false");
    let app_metrics = if merge { app_metrics(pod)? } else { None };

    let mut out = pod.clone();
    let spec = out.spec.as_mut().ok_or(InjectError::NoSpec)?;
    if spec.containers.is_empty() {
        return Err(InjectError::NoContainers);
    }
    let taken = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .find(|n| [PROXY_CONTAINER, INIT_CONTAINER].contains(n));
    if let Some(name) = taken {
        return Err(InjectError::NameTaken(name.into()));
    }
    for v in spec.volumes.iter().flatten() {
        if [TOKEN_VOLUME, ROOT_VOLUME].contains(&v.name.as_str()) {
            return Err(InjectError::NameTaken(format!("volume {}", v.name)));
        }
    }

    let probers = if rewrite {
        probes::rewrite(&mut spec.containers)?
    } else {
        BTreeMap::new()
    };
    let proxy_cfg = proxy_config(pod, cfg)?;
    let mut proxy = proxy_container(
        pod,
        cfg,
        &proxy_cfg,
        capture,
        &probers,
        app_metrics.as_ref(),
    )?;
    let init = capture.then(|| init_container(pod, &proxy)).transpose()?;
    let first_app = spec.containers[0].name.clone();

    let inits = spec.init_containers.get_or_insert_with(Vec::new);
    let mut injected_inits = Vec::new();
    if native {
        // The capture first, then the proxy, then the pod's own init
        // containers, which so already talk through the mesh.
        proxy.restart_policy = Some("Always".into());
        proxy.startup_probe = Some(health_probe(1, 600));
        let mut front = Vec::new();
        if let Some(init) = init {
            injected_inits.push(INIT_CONTAINER);
            front.push(init);
        }
        injected_inits.push(PROXY_CONTAINER);
        front.push(proxy);
        inits.splice(0..0, front);
    } else {
        // Legacy: the pod's init containers run before the capture (a proxy
        // is not running yet to carry their traffic); the proxy is the
        // first container, and kubelet starts the next one only once its
        // postStart hook (`mesh-proxy wait`) saw it ready, unless the
        // ProxyConfig says not to hold the app.
        if let Some(init) = init {
            injected_inits.push(INIT_CONTAINER);
            inits.push(init);
        }
        let hold = proxy_cfg.hold_application_until_proxy_starts != Some(false);
        proxy.lifecycle = hold.then(|| Lifecycle {
            post_start: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["mesh-proxy".into(), "wait".into()]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        spec.containers.insert(0, proxy);
    }
    if inits.is_empty() {
        spec.init_containers = None;
    }
    spec.volumes
        .get_or_insert_with(Vec::new)
        .extend(volumes(cfg));

    let status = serde_json::json!({
        "initContainers": injected_inits,
        "containers": if native { vec![] } else { vec![PROXY_CONTAINER] },
        "volumes": [TOKEN_VOLUME, ROOT_VOLUME],
        "revision": cfg.revision,
        "native": native,
    });
    let annotations = out.metadata.annotations.get_or_insert_with(BTreeMap::new);
    annotations.insert(STATUS_ANNOTATION.into(), status.to_string());
    // `kubectl logs` / `exec` without -c reach the app, not the proxy.
    annotations
        .entry("kubectl.kubernetes.io/default-container".into())
        .or_insert(first_app);
    // Prometheus scrapes the agent port, which serves the app's metrics
    // (from where its annotations said) merged with the proxy's, as
    // Istio's metrics merging does; opted out, the proxy's own port.
    let agent = mesh_proto::ports::AGENT.to_string();
    let (port, replace) = if merge {
        (agent.as_str(), true)
    } else {
        ("15090", false)
    };
    for (k, v) in [
        (PROMETHEUS_SCRAPE, "true"),
        (PROMETHEUS_PORT, port),
        (PROMETHEUS_PATH, "/stats/prometheus"),
    ] {
        if replace {
            annotations.insert(k.into(), v.into());
        } else {
            annotations.entry(k.into()).or_insert_with(|| v.into());
        }
    }
    let (name, revision) = canonical(pod);
    let labels = out.metadata.labels.get_or_insert_with(BTreeMap::new);
    labels
        .entry("security.istio.io/tlsMode".into())
        .or_insert_with(|| "istio".into());
    labels
        .entry("service.istio.io/canonical-name".into())
        .or_insert(name);
    labels
        .entry("service.istio.io/canonical-revision".into())
        .or_insert(revision);
    Ok(Outcome::Injected(Box::new(out)))
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(key))
        .map(String::as_str)
}

fn bad(key: &str, value: &str, expected: impl Into<std::borrow::Cow<'static, str>>) -> InjectError {
    InjectError::BadAnnotation {
        key: key.into(),
        value: value.into(),
        expected: expected.into(),
    }
}

/// Kubernetes' (and Go's) boolean spellings.
fn parse_bool(key: &str, v: &str) -> Result<bool, InjectError> {
    match v {
        "true" | "True" | "TRUE" | "t" | "T" | "1" | "yes" | "y" | "on" => Ok(true),
        "false" | "False" | "FALSE" | "f" | "F" | "0" | "no" | "n" | "off" => Ok(false),
        _ => Err(bad(key, v, "true or false")),
    }
}

/// The service and revision a pod belongs to, as Istio derives them.
fn canonical(pod: &Pod) -> (String, String) {
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    let pick = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    let name = pick(&[
        "service.istio.io/canonical-name",
        "app.kubernetes.io/name",
        "app",
    ])
    .or_else(|| workload_name(pod))
    .unwrap_or_else(|| "unknown".into());
    let revision = pick(&[
        "service.istio.io/canonical-revision",
        "app.kubernetes.io/version",
        "version",
    ])
    .unwrap_or_else(|| "latest".into());
    (name, revision)
}

/// A pod's workload: its name, or its generateName without the
/// ReplicaSet's hash (`reviews-v1-7d9f8c-` → `reviews-v1`).
fn workload_name(pod: &Pod) -> Option<String> {
    if let Some(name) = &pod.metadata.name {
        return Some(name.clone());
    }
    let gen_name = pod.metadata.generate_name.as_deref()?.trim_end_matches('-');
    let owned_by_rs = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "ReplicaSet");
    Some(match gen_name.rsplit_once('-') {
        Some((base, _hash)) if owned_by_rs => base.into(),
        _ => gen_name.into(),
    })
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env(name: &str, value: impl Into<String>) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

fn health_probe(period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz/ready".into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(3),
        ..Default::default()
    }
}

fn quantity(pod: &Pod, key: &str, default: &str) -> Result<Quantity, InjectError> {
    let v = annotation(pod, key).unwrap_or(default);
    if !is_quantity(v) {
        return Err(bad(
            key,
            v,
            "a Kubernetes quantity such as 100m, 0.5 or 128Mi",
        ));
    }
    Ok(Quantity(v.into()))
}

/// Kubernetes' quantity syntax: a decimal number with an optional binary
/// (Ki…Ei), decimal (n, u, m, k, M…E) or exponent (e3) suffix.
fn is_quantity(v: &str) -> bool {
    let num_end = v
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '+' || c == '-'))
        .unwrap_or(v.len());
    let (num, suffix) = v.split_at(num_end);
    let digits = num.trim_start_matches(['+', '-']);
    let number_ok = !digits.is_empty()
        && digits.matches('.').count() <= 1
        && digits.chars().all(|c| c.is_ascii_digit() || c == '.')
        && digits != ".";
    let suffix_ok = matches!(
        suffix,
        "" | "Ki"
            | "Mi"
            | "Gi"
            | "Ti"
            | "Pi"
            | "Ei"
            | "n"
            | "u"
            | "m"
            | "k"
            | "M"
            | "G"
            | "T"
            | "P"
            | "E"
    ) || suffix.strip_prefix(['e', 'E']).is_some_and(|e| {
        let e = e.trim_start_matches(['+', '-']);
        !e.is_empty() && e.chars().all(|c| c.is_ascii_digit())
    });
    number_ok && suffix_ok
}

/// Where the app serves its own metrics, from its prometheus.io
/// annotations (`scrape: "true"` and a port; the path defaults to
/// `/metrics`), if it says.
fn app_metrics(pod: &Pod) -> Result<Option<mesh_proto::app_metrics::AppMetrics>, InjectError> {
    if annotation(pod, PROMETHEUS_SCRAPE) != Some("true") {
        return Ok(None);
    }
    let Some(port) = annotation(pod, PROMETHEUS_PORT) else {
        return Ok(None);
    };
    let port = port
        .parse()
        .map_err(|_| bad(PROMETHEUS_PORT, port, "a port number"))?;
    let path = annotation(pod, PROMETHEUS_PATH).unwrap_or("/metrics");
    if !path.starts_with('/') {
        return Err(bad(PROMETHEUS_PATH, path, "a path starting with /"));
    }
    Ok(Some(mesh_proto::app_metrics::AppMetrics {
        port,
        path: path.into(),
    }))
}

/// The sidecar's ProxyConfig: the pod's `proxy.istio.io/config` over the
/// mesh config's `defaultConfig`, field by field as in Istio.
fn proxy_config(pod: &Pod, cfg: &Config) -> Result<mesh::ProxyConfig, InjectError> {
    Ok(cfg
        .mesh_defaults
        .under(own_proxy_config(pod)?.unwrap_or_default()))
}

/// The pod's own `proxy.istio.io/config`, if it has one.
fn own_proxy_config(pod: &Pod) -> Result<Option<mesh::ProxyConfig>, InjectError> {
    let Some(v) = annotation(pod, PROXY_CONFIG).filter(|v| !v.trim().is_empty()) else {
        return Ok(None);
    };
    let not_a_config = || bad(PROXY_CONFIG, v, "a ProxyConfig in YAML or JSON");
    let value: serde_json::Value = serde_saphyr::from_str(v).map_err(|_| not_a_config())?;
    let own: mesh::ProxyConfig = serde_path_to_error::deserialize(&value).map_err(|e| {
        let field = e.path().to_string();
        match mesh::ProxyConfig::expected(&field) {
            Some(what) => bad(
                PROXY_CONFIG,
                v,
                format!("a ProxyConfig in YAML or JSON whose {field}, if set, is {what}"),
            ),
            None => not_a_config(),
        }
    })?;
    Ok(Some(own))
}

/// Whether the proxy goes in as a native sidecar: the pod's annotation,
/// else the injector's setting.
fn native(pod: &Pod, cfg: &Config) -> Result<bool, InjectError> {
    match annotation(pod, NATIVE_SIDECAR) {
        Some(v) => parse_bool(NATIVE_SIDECAR, v),
        None => Ok(cfg.native_sidecars),
    }
}

fn proxy_container(
    pod: &Pod,
    cfg: &Config,
    proxy: &mesh::ProxyConfig,
    capture: bool,
    probers: &mesh_proto::probers::Probers,
    app_metrics: Option<&mesh_proto::app_metrics::AppMetrics>,
) -> Result<Container, InjectError> {
    let mut envs = vec![
        field_env("MESH_WORKLOAD", "metadata.name"),
        field_env("MESH_NAMESPACE", "metadata.namespace"),
        field_env("MESH_SERVICE_ACCOUNT", "spec.serviceAccountName"),
        field_env("MESH_POD_IP", "status.podIP"),
        env("MESH_TRUST_DOMAIN", &cfg.trust_domain),
        env("PILOT_ADDR", &cfg.pilot_addr),
        env("CA_ADDR", &cfg.ca_addr),
        env("CA_ROOT_FILE", format!("{ROOT_DIR}/root-cert.pem")),
        env("CA_TOKEN_FILE", format!("{TOKEN_DIR}/{TOKEN_VOLUME}")),
    ];
    if capture {
        envs.push(env("MESH_CAPTURE", "true"));
    }
    if !probers.is_empty() {
        envs.push(env(
            mesh_proto::probers::ENV,
            serde_json::to_string(probers).expect("probers serialize"),
        ));
    }
    if let Some(m) = app_metrics {
        envs.push(env(
            mesh_proto::app_metrics::ENV,
            serde_json::to_string(m).expect("app metrics serialize"),
        ));
    }
    if let Some(threads) = proxy.concurrency {
        envs.push(env("MESH_PROXY_THREADS", threads.to_string()));
    }
    if let Some(drain) = proxy.termination_drain_duration {
        // The sidecar counts its grace in whole seconds: a part of one
        // rounds up, so the drain is never shorter than asked.
        let secs = drain.as_secs() + u64::from(drain.subsec_nanos() > 0);
        envs.push(env("MESH_DRAIN_GRACE_SECS", secs.to_string()));
    }
    let port = |name: &str, port: i32| ContainerPort {
        name: Some(name.into()),
        container_port: port,
        protocol: Some("TCP".into()),
        ..Default::default()
    };
    let resources = ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".into(), quantity(pod, PROXY_CPU, "100m")?),
            ("memory".into(), quantity(pod, PROXY_MEMORY, "128Mi")?),
        ])),
        limits: Some(BTreeMap::from([
            ("cpu".into(), quantity(pod, PROXY_CPU_LIMIT, "2")?),
            ("memory".into(), quantity(pod, PROXY_MEMORY_LIMIT, "1Gi")?),
        ])),
        ..Default::default()
    };
    Ok(Container {
        name: PROXY_CONTAINER.into(),
        image: Some(
            annotation(pod, PROXY_IMAGE)
                .unwrap_or(&cfg.proxy_image)
                .into(),
        ),
        env: Some(envs),
        ports: Some(vec![
            port("mesh-outbound", 15001),
            port("mesh-inbound", 15006),
            port("mesh-agent", AGENT_PORT),
            port("mesh-health", HEALTH_PORT),
            port("http-envoy-prom", 15090),
        ]),
        readiness_probe: Some(health_probe(15, 4)),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: TOKEN_VOLUME.into(),
                mount_path: TOKEN_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: ROOT_VOLUME.into(),
                mount_path: ROOT_DIR.into(),
                read_only: Some(true),
                ..Default::default()
            },
        ]),
        ..Default::default()
    })
}

/// `mesh-iptables` with the pod's capture annotations; the proxy's own
/// ports (15000, 15020, 15021, 15090) are always left alone by it.
fn init_container(pod: &Pod, proxy: &Container) -> Result<Container, InjectError> {
    let mut args = vec!["--proxy-uid".to_string(), PROXY_UID.to_string()];
    let mut flag = |key: &str, flag: &str, star: bool, check: fn(&str) -> bool, what| {
        if let Some(v) = annotation(pod, key) {
            let v: String = v.chars().filter(|c| !c.is_whitespace()).collect();
            let ok = (star && v == "*") || v.is_empty() || v.split(',').all(check);
            if !ok {
                return Err(bad(key, &v, what));
            }
            if !v.is_empty() {
                args.extend([flag.to_string(), v]);
            }
        }
        Ok(())
    };
    let port = |p: &str| p.parse::<u16>().is_ok_and(|p| p > 0);
    let cidr = |c: &str| {
        let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
        match ip.parse::<std::net::IpAddr>() {
            Ok(ip) => len
                .parse::<u8>()
                .is_ok_and(|l| l <= if ip.is_ipv4() { 32 } else { 128 }),
            Err(_) => false,
        }
    };
    const PORTS: &str = "a comma-separated list of ports";
    const PORTS_OR_STAR: &str = "* or a comma-separated list of ports";
    const CIDRS: &str = "a comma-separated list of CIDRs";
    const CIDRS_OR_STAR: &str = "* or a comma-separated list of CIDRs";
    flag(
        INCLUDE_INBOUND_PORTS,
        "--include-inbound-ports",
        true,
        port,
        PORTS_OR_STAR,
    )?;
    flag(
        EXCLUDE_INBOUND_PORTS,
        "--exclude-inbound-ports",
        false,
        port,
        PORTS,
    )?;
    flag(
        EXCLUDE_OUTBOUND_PORTS,
        "--exclude-outbound-ports",
        false,
        port,
        PORTS,
    )?;
    flag(
        INCLUDE_OUTBOUND_RANGES,
        "--include-outbound-cidrs",
        true,
        cidr,
        CIDRS_OR_STAR,
    )?;
    flag(
        EXCLUDE_OUTBOUND_RANGES,
        "--exclude-outbound-cidrs",
        false,
        cidr,
        CIDRS,
    )?;
    Ok(Container {
        name: INIT_CONTAINER.into(),
        image: proxy.image.clone(),
        command: Some(vec!["mesh-iptables".into()]),
        args: Some(args),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".into(), Quantity("10m".into())),
                ("memory".into(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([
                ("cpu".into(), Quantity("100m".into())),
                ("memory".into(), Quantity("64Mi".into())),
            ])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            // iptables-restore takes its lock under /run.
            read_only_root_filesystem: Some(false),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// The identity token (audience citadel checks, rotated by kubelet) and
/// the mesh's trust bundle.
fn volumes(cfg: &Config) -> [Volume; 2] {
    [
        Volume {
            name: TOKEN_VOLUME.into(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(cfg.token_audience.clone()),
                        expiration_seconds: Some(43200),
                        path: TOKEN_VOLUME.into(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
        Volume {
            name: ROOT_VOLUME.into(),
            config_map: Some(ConfigMapVolumeSource {
                name: cfg.root_configmap.clone(),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(yaml: &str) -> Pod {
        serde_saphyr::from_str(yaml).unwrap()
    }

    const PLAIN: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  containers: [{name: web, image: nginx}]
";

    fn decided(p: &Pod, ns: &str, policy: NamespacePolicy) -> Option<Skip> {
        decide(p, ns, &policy, &Config::default()).unwrap()
    }

    #[test]
    fn namespace_labels() {
        let l = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        use NamespacePolicy::*;
        let from = |kv| NamespacePolicy::from_labels(&l(kv), "default");
        assert_eq!(from(&[("istio-injection", "enabled")]), Enabled);
        assert_eq!(from(&[("istio-injection", "disabled")]), Disabled);
        assert_eq!(from(&[("istio.io/rev", "default")]), Enabled);
        assert_eq!(
            from(&[("istio.io/rev", "canary")]),
            OtherRevision("canary".into())
        );
        // istio-injection wins.
        assert_eq!(
            from(&[("istio-injection", "disabled"), ("istio.io/rev", "default")]),
            Disabled
        );
        assert_eq!(from(&[]), Unset);
    }

    #[test]
    fn the_pod_wins_over_its_namespace() {
        let base = pod(PLAIN);
        assert_eq!(decided(&base, "shop", NamespacePolicy::Enabled), None);
        assert_eq!(
            decided(&base, "shop", NamespacePolicy::Unset),
            Some(Skip::NotSelected)
        );
        assert_eq!(
            decided(&base, "shop", NamespacePolicy::Disabled),
            Some(Skip::NamespaceDisabled)
        );

        let mut opted_in = base.clone();
        opted_in.metadata.labels = Some(BTreeMap::from([(INJECT.into(), "true".into())]));
        assert_eq!(decided(&opted_in, "shop", NamespacePolicy::Disabled), None);
        assert_eq!(decided(&opted_in, "shop", NamespacePolicy::Unset), None);

        let mut opted_out = base.clone();
        opted_out.metadata.annotations = Some(BTreeMap::from([(INJECT.into(), "false".into())]));
        assert_eq!(
            decided(&opted_out, "shop", NamespacePolicy::Enabled),
            Some(Skip::PodOptedOut("annotation"))
        );
        // The label wins over the annotation.
        opted_out.metadata.labels = Some(BTreeMap::from([(INJECT.into(), "true".into())]));
        assert_eq!(decided(&opted_out, "shop", NamespacePolicy::Enabled), None);

        assert_eq!(
            decided(&opted_in, "kube-system", NamespacePolicy::Enabled),
            Some(Skip::SystemNamespace("kube-system".into()))
        );
        let mut host = opted_in.clone();
        host.spec.as_mut().unwrap().host_network = Some(true);
        assert_eq!(
            decided(&host, "shop", NamespacePolicy::Enabled),
            Some(Skip::HostNetwork)
        );
        let mut canary = base.clone();
        canary.metadata.labels = Some(BTreeMap::from([(REVISION.into(), "canary".into())]));
        assert_eq!(
            decided(&canary, "shop", NamespacePolicy::Enabled),
            Some(Skip::PodOtherRevision("canary".into()))
        );
        let mut typo = base;
        typo.metadata.labels = Some(BTreeMap::from([(INJECT.into(), "enabled".into())]));
        let err = decide(&typo, "shop", &NamespacePolicy::Enabled, &Config::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "sidecar.istio.io/inject: \"enabled\" is not true or false"
        );
    }

    fn injected(yaml: &str) -> Result<Pod, InjectError> {
        match inject(
            &pod(yaml),
            "shop",
            &NamespacePolicy::Enabled,
            &Config::default(),
        )? {
            Outcome::Injected(p) => Ok(*p),
            Outcome::Skipped(s) => panic!("skipped: {s:?}"),
        }
    }

    /// The value the injected pod's containers give env var `name`.
    fn env_value(p: &Pod, name: &str) -> Option<String> {
        let spec = p.spec.as_ref().unwrap();
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .flat_map(|c| c.env.iter().flatten())
            .find(|e| e.name == name)
            .and_then(|e| e.value.clone())
    }

    fn app_metrics_env(p: &Pod) -> Option<String> {
        env_value(p, mesh_proto::app_metrics::ENV)
    }

    #[test]
    fn prometheus_scrapes_the_agent_port_which_merges_the_apps_metrics() {
        let annotated = |extra: &str| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  annotations: {{{extra}}}\nspec:\n  containers: [{{name: web, image: nginx}}]\n"
            )
        };
        let a = |p: &Pod, k: &str| p.metadata.annotations.as_ref().unwrap()[k].clone();
        // The app's own annotations move into the sidecar; Prometheus is
        // sent to the agent port.
        let p = injected(&annotated(
            "prometheus.io/scrape: 'true', prometheus.io/port: '8080', prometheus.io/path: /metrics/app",
        ))
        .unwrap();
        assert_eq!(a(&p, PROMETHEUS_PORT), "15020");
        assert_eq!(a(&p, PROMETHEUS_PATH), "/stats/prometheus");
        assert_eq!(
            app_metrics_env(&p).as_deref(),
            Some(r#"{"port":8080,"path":"/metrics/app"}"#)
        );
        // No app metrics: the agent port serves the proxy's alone.
        let p = injected(PLAIN).unwrap();
        assert_eq!(a(&p, PROMETHEUS_PORT), "15020");
        assert_eq!(app_metrics_env(&p), None);
        // Scraping switched off, or merging opted out: left as the pod says.
        let p = injected(&annotated("prometheus.io/scrape: 'false'")).unwrap();
        assert_eq!(a(&p, PROMETHEUS_SCRAPE), "false");
        let p = injected(&annotated(
            "prometheus.istio.io/merge-metrics: 'false', prometheus.io/scrape: 'true', prometheus.io/port: '8080'",
        ))
        .unwrap();
        assert_eq!(a(&p, PROMETHEUS_PORT), "8080");
        assert_eq!(app_metrics_env(&p), None);
        // A port that is not one is named.
        let err = injected(&annotated(
            "prometheus.io/scrape: 'true', prometheus.io/port: http",
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("prometheus.io/port: \"http\" is not a port number"),
            "{err}"
        );
    }

    #[test]
    fn proxy_config_concurrency_sets_the_sidecars_serving_threads() {
        let annotated = |config: &str| {
            let mut p = pod(PLAIN);
            p.metadata.annotations = Some(BTreeMap::from([(PROXY_CONFIG.into(), config.into())]));
            inject(&p, "shop", &NamespacePolicy::Enabled, &Config::default())
        };
        let env_of = |p: Pod| env_value(&p, "MESH_PROXY_THREADS");
        let threads = |config: &str| match annotated(config).unwrap() {
            Outcome::Injected(p) => env_of(*p),
            Outcome::Skipped(s) => panic!("skipped: {s:?}"),
        };
        // Istio's own spellings: YAML, as in a manifest, or JSON.
        assert_eq!(
            threads("concurrency: 2\nholdApplicationUntilProxyStarts: true\n").as_deref(),
            Some("2")
        );
        assert_eq!(threads(r#"{"concurrency": 0}"#).as_deref(), Some("0"));
        // Other fields alone, or nothing: the sidecar's default.
        assert_eq!(threads("holdApplicationUntilProxyStarts: true"), None);
        assert_eq!(threads(""), None);
        assert_eq!(env_of(injected(PLAIN).unwrap()), None);
        for wrong in [
            "concurrency: two",
            "concurrency: -1",
            "concurrency: 1.5",
            "concurrency 2",
        ] {
            let err = match annotated(wrong) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{wrong:?} was accepted"),
            };
            assert!(
                err.starts_with(&format!(
                    "proxy.istio.io/config: {wrong:?} is not a ProxyConfig"
                )),
                "{err}"
            );
        }
    }

    #[test]
    fn the_mesh_configs_default_concurrency_applies_unless_the_pod_sets_its_own() {
        let cfg = Config {
            mesh_defaults: mesh::ProxyConfig {
                concurrency: Some(4),
                ..Default::default()
            },
            ..Config::default()
        };
        let threads = |config: Option<&str>| {
            let mut p = pod(PLAIN);
            p.metadata.annotations =
                config.map(|c| BTreeMap::from([(PROXY_CONFIG.into(), c.into())]));
            match inject(&p, "shop", &NamespacePolicy::Enabled, &cfg).unwrap() {
                Outcome::Injected(p) => env_value(&p, "MESH_PROXY_THREADS"),
                Outcome::Skipped(s) => panic!("skipped: {s:?}"),
            }
        };
        assert_eq!(threads(None).as_deref(), Some("4"));
        // The pod's ProxyConfig overrides field by field, as in Istio.
        assert_eq!(
            threads(Some("holdApplicationUntilProxyStarts: true")).as_deref(),
            Some("4")
        );
        assert_eq!(threads(Some("concurrency: 2")).as_deref(), Some("2"));
        assert_eq!(threads(Some("concurrency: 0")).as_deref(), Some("0"));
    }

    #[test]
    fn termination_drain_duration_sets_the_sidecars_drain_grace_and_a_grace_period_too_short_is_named()
     {
        let cfg = Config {
            mesh_defaults: mesh::ProxyConfig {
                termination_drain_duration: Some(Duration::from_secs(20)),
                ..Default::default()
            },
            ..Config::default()
        };
        let annotated = |config: Option<&str>, grace: Option<i64>| {
            let mut p = pod(PLAIN);
            p.metadata.annotations =
                config.map(|c| BTreeMap::from([(PROXY_CONFIG.into(), c.into())]));
            p.spec.as_mut().unwrap().termination_grace_period_seconds = grace;
            p
        };
        let grace_secs =
            |p: &Pod, cfg: &Config| match inject(p, "shop", &NamespacePolicy::Enabled, cfg) {
                Ok(Outcome::Injected(p)) => env_value(&p, "MESH_DRAIN_GRACE_SECS"),
                other => panic!("not injected: {:?}", other.map(|_| ())),
            };
        // Unset everywhere: the sidecar's own default (5 s, as Istio's).
        assert_eq!(grace_secs(&annotated(None, None), &Config::default()), None);
        // The mesh's default, then the pod's own, which wins.
        assert_eq!(
            grace_secs(&annotated(None, None), &cfg).as_deref(),
            Some("20")
        );
        let own = annotated(Some("terminationDrainDuration: 45s"), None);
        assert_eq!(grace_secs(&own, &cfg).as_deref(), Some("45"));
        // Whole seconds, rounded up: never a shorter drain than asked.
        let part = annotated(Some(r#"{"terminationDrainDuration": "1.5s"}"#), None);
        assert_eq!(grace_secs(&part, &cfg).as_deref(), Some("2"));
        // The kubelet would stop the sidecar first: said, not refused.
        let short = "terminationDrainDuration 45s is not shorter than the pod's terminationGracePeriodSeconds (30): the kubelet stops the sidecar before it has drained";
        assert_eq!(warnings(&own, &cfg), [short]);
        assert_eq!(warnings(&annotated(None, None), &cfg), Vec::<String>::new());
        let longer = annotated(Some("terminationDrainDuration: 45s"), Some(60));
        assert_eq!(warnings(&longer, &cfg), Vec::<String>::new());
        assert_eq!(
            warnings(&annotated(None, Some(10)), &cfg),
            [
                "terminationDrainDuration 20s is not shorter than the pod's terminationGracePeriodSeconds (10): the kubelet stops the sidecar before it has drained"
            ]
        );
        for wrong in [
            "terminationDrainDuration: soon",
            "terminationDrainDuration: 30",
        ] {
            let err = match inject(
                &annotated(Some(wrong), None),
                "shop",
                &NamespacePolicy::Enabled,
                &cfg,
            ) {
                Err(e) => e.to_string(),
                Ok(_) => panic!("{wrong:?} was accepted"),
            };
            assert_eq!(
                err,
                format!(
                    "proxy.istio.io/config: {wrong:?} is not a ProxyConfig in YAML or JSON whose terminationDrainDuration, if set, is a duration such as 30s, 1m30s or 500ms"
                ),
            );
        }
    }

    #[test]
    fn hold_application_until_proxy_starts_false_leaves_a_legacy_sidecars_hook_out() {
        let legacy = |config: Option<&str>, mesh_hold: Option<bool>| {
            let mut p = pod(PLAIN);
            p.metadata.annotations =
                config.map(|c| BTreeMap::from([(PROXY_CONFIG.into(), c.into())]));
            let cfg = Config {
                native_sidecars: false,
                mesh_defaults: mesh::ProxyConfig {
                    hold_application_until_proxy_starts: mesh_hold,
                    ..Default::default()
                },
                ..Config::default()
            };
            match inject(&p, "shop", &NamespacePolicy::Enabled, &cfg).unwrap() {
                Outcome::Injected(p) => {
                    let proxy = &p.spec.as_ref().unwrap().containers[0];
                    assert_eq!(proxy.name, PROXY_CONTAINER);
                    proxy
                        .lifecycle
                        .as_ref()
                        .and_then(|l| l.post_start.as_ref())
                        .and_then(|h| h.exec.as_ref())
                        .and_then(|e| e.command.clone())
                }
                Outcome::Skipped(s) => panic!("skipped: {s:?}"),
            }
        };
        let wait = Some(vec!["mesh-proxy".to_string(), "wait".to_string()]);
        // Held unless told otherwise (Istio's default is not to hold).
        assert_eq!(legacy(None, None), wait);
        assert_eq!(
            legacy(Some("holdApplicationUntilProxyStarts: true"), None),
            wait
        );
        assert_eq!(
            legacy(Some("holdApplicationUntilProxyStarts: false"), None),
            None
        );
        assert_eq!(legacy(None, Some(false)), None);
        assert_eq!(
            legacy(
                Some(r#"{"holdApplicationUntilProxyStarts": true}"#),
                Some(false)
            ),
            wait
        );
        // A native sidecar always holds the app: false is said not to apply.
        let mut native = pod(PLAIN);
        native.metadata.annotations = Some(BTreeMap::from([(
            PROXY_CONFIG.into(),
            "holdApplicationUntilProxyStarts: false".into(),
        )]));
        assert_eq!(
            warnings(&native, &Config::default()),
            [
                "holdApplicationUntilProxyStarts: false does not apply to a native sidecar: Kubernetes starts the app's containers only once it is ready"
            ]
        );
        let err = inject(
            &{
                let mut p = pod(PLAIN);
                p.metadata.annotations = Some(BTreeMap::from([(
                    PROXY_CONFIG.into(),
                    "holdApplicationUntilProxyStarts: maybe".into(),
                )]));
                p
            },
            "shop",
            &NamespacePolicy::Enabled,
            &Config::default(),
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "proxy.istio.io/config: \"holdApplicationUntilProxyStarts: maybe\" is not a ProxyConfig in YAML or JSON whose holdApplicationUntilProxyStarts, if set, is true or false"
        );
    }

    #[test]
    fn quantities() {
        for ok in ["100m", "0.5", "2", "128Mi", "1Gi", "1e3", "1.5G", "+1"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "100 m", "1.2.3", "12MB", "lots", "1e", "."] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn workload_names_drop_the_replicaset_hash() {
        let p = pod("
metadata:
  generateName: reviews-v1-7d9f8c-
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: reviews-v1-7d9f8c, uid: u1}]
spec: {containers: [{name: r}]}
");
        assert_eq!(canonical(&p), ("reviews-v1".into(), "latest".into()));
    }
}
