//! Reads a directory of multi-document YAML files in Istio's format into a
//! typed config set. A file that cannot be read or parsed is an error naming
//! the file, the resource and the reason; the caller keeps its last good set.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::istio::{DestinationRule, ServiceEntry, VirtualService, WorkloadEntry};

/// Where a resource came from. Shared, not copied: every load's set holds
/// a Meta per resource, and a large mesh has tens of thousands.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    pub name: Arc<str>,
    pub namespace: Arc<str>,
    pub file: Arc<Path>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    // Every kind is shared, not copied, between the parse cache, the
    // accepted set and each load's set: a large mesh has tens of thousands.
    ServiceEntry(Arc<ServiceEntry>),
    WorkloadEntry(Arc<WorkloadEntry>),
    VirtualService(Arc<VirtualService>),
    DestinationRule(Arc<DestinationRule>),
    PeerAuthentication(Arc<crate::istio::PeerAuthentication>),
    AuthorizationPolicy(Arc<crate::istio::AuthorizationPolicy>),
    RequestAuthentication(Arc<crate::istio::RequestAuthentication>),
    Telemetry(Arc<crate::istio::Telemetry>),
    /// Istio's mesh config: ConfigMap istio-system/istio.
    MeshConfig(Arc<crate::istio::MeshConfig>),
    /// A Kubernetes Service, its endpoints already read from its
    /// EndpointSlices and their pods (see [`crate::kubernetes`]).
    KubeService(Arc<crate::model::Service>),
    /// A Kubernetes pod that runs a sidecar: a proxy that will connect.
    Pod(Arc<crate::model::Workload>),
    Sidecar(Arc<crate::istio::Sidecar>),
}

impl Resource {
    /// The kind, as errors name it.
    pub fn kind(&self) -> &'static str {
        match self {
            Resource::ServiceEntry(_) => "ServiceEntry",
            Resource::WorkloadEntry(_) => "WorkloadEntry",
            Resource::VirtualService(_) => "VirtualService",
            Resource::DestinationRule(_) => "DestinationRule",
            Resource::PeerAuthentication(_) => "PeerAuthentication",
            Resource::AuthorizationPolicy(_) => "AuthorizationPolicy",
            Resource::RequestAuthentication(_) => "RequestAuthentication",
            Resource::Telemetry(_) => "Telemetry",
            Resource::MeshConfig(_) => "ConfigMap",
            Resource::KubeService(_) => "Service",
            Resource::Pod(_) => "Pod",
            Resource::Sidecar(_) => "Sidecar",
        }
    }
}

/// Something a source could not read: a whole file, or (from Kubernetes)
/// one object, named by kind, namespace and name.
#[derive(Clone, Debug, PartialEq)]
pub struct Unread {
    pub file: PathBuf,
    pub object: Option<(String, String, String)>,
    pub error: String,
}

impl Unread {
    /// Whether `meta`/`resource` came from what could not be read now (so
    /// its last accepted version stands in for it).
    pub fn covers(&self, meta: &Meta, resource: &Resource) -> bool {
        *meta.file == *self.file
            && self.object.as_ref().is_none_or(|(kind, namespace, name)| {
                resource.kind() == kind && *meta.namespace == **namespace && *meta.name == **name
            })
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigSet {
    pub resources: Vec<(Meta, Resource)>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not valid YAML: {reason}", path.display())]
    Yaml { path: PathBuf, reason: String },
    #[error("{}: document {index}: {reason}", path.display())]
    Document {
        path: PathBuf,
        index: usize,
        reason: String,
    },
    #[error("{}: {kind} {namespace}/{name}: {reason}", path.display())]
    Spec {
        path: PathBuf,
        kind: String,
        namespace: String,
        name: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawObject {
    api_version: Option<String>,
    kind: Option<String>,
    metadata: Option<RawMeta>,
    spec: Option<serde_json::Value>,
    data: Option<std::collections::BTreeMap<String, String>>,
}

#[derive(Deserialize)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
}

pub const DEFAULT_NAMESPACE: &str = "default";

/// The ConfigMap (in the root namespace) holding Istio's mesh config.
pub const MESH_CONFIG_NAME: &str = "istio";

/// Loads every `.yaml`/`.yml` file directly in `dir`, in name order.
pub fn load_dir(dir: &Path) -> Result<ConfigSet, ConfigError> {
    let mut set = ConfigSet::default();
    for (_, file) in load_dir_each(dir)? {
        set.resources.extend(file?);
    }
    Ok(set)
}

/// As [`load_dir`], each file on its own: one that cannot be read or
/// parsed does not hide the others.
#[allow(clippy::type_complexity)]
pub fn load_dir_each(
    dir: &Path,
) -> Result<Vec<(PathBuf, Result<Vec<(Meta, Resource)>, ConfigError>)>, ConfigError> {
    Ok(yaml_files(dir)?
        .into_iter()
        .map(|file| {
            let parsed = read(&file).and_then(|text| parse_file(&file, &text));
            (file, parsed)
        })
        .collect())
}

/// A file's text, or an error naming it.
pub fn read(file: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(file).map_err(|source| ConfigError::Read {
        path: file.to_path_buf(),
        source,
    })
}

/// The `.yaml`/`.yml` files directly in `dir`, in name order.
pub fn yaml_files(dir: &Path) -> Result<Vec<PathBuf>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read_err)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    Ok(files)
}

/// Parses one file's documents. Kinds the mesh does not know yet are skipped
/// with a log line naming them.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<(Meta, Resource)>, ConfigError> {
    // The parser's default budget stops at 1,024 documents and 250,000
    // nodes: a generated file of a few thousand ServiceEntries (a few MB)
    // would be refused whole. The stack-protecting limits (nesting depth
    // 64, flow nesting) stay; the counts scale to files of tens of MB.
    let options = serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_documents: 1_000_000,
            max_nodes: 50_000_000,
            max_events: 100_000_000,
        },
    };
    let docs: Vec<Option<RawObject>> = serde_saphyr::from_multiple_with_options(text, options)
        .map_err(|e| ConfigError::Yaml {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let mut out = Vec::with_capacity(docs.len());
    for (index, doc) in docs.into_iter().enumerate() {
        let Some(doc) = doc else { continue };
        out.extend(parse_object(path, index + 1, doc)?);
    }
    // One file name, and one copy of each namespace, for the whole file.
    let file: Arc<Path> = path.into();
    let mut namespaces: std::collections::HashSet<Arc<str>> = Default::default();
    for (meta, _) in &mut out {
        meta.file = file.clone();
        match namespaces.get(&*meta.namespace) {
            Some(n) => meta.namespace = n.clone(),
            None => {
                namespaces.insert(meta.namespace.clone());
            }
        }
    }
    out.shrink_to_fit();
    Ok(out)
}

/// Parses one object as the API server stores it (Kubernetes' JSON);
/// `source` stands where a file name would in errors. `None` for a kind
/// pilot does not handle.
pub fn parse_json(
    source: &Path,
    object: serde_json::Value,
) -> Result<Option<(Meta, Resource)>, ConfigError> {
    let raw = serde_json::from_value(object).map_err(|e| ConfigError::Document {
        path: source.to_path_buf(),
        index: 1,
        reason: e.to_string(),
    })?;
    parse_object(source, 1, raw)
}

fn parse_object(
    path: &Path,
    index: usize,
    doc: RawObject,
) -> Result<Option<(Meta, Resource)>, ConfigError> {
    let doc_err = |reason: &str| ConfigError::Document {
        path: path.to_path_buf(),
        index,
        reason: reason.to_string(),
    };
    let kind = doc.kind.ok_or_else(|| doc_err("missing 'kind'"))?;
    let api = doc
        .api_version
        .ok_or_else(|| doc_err("missing 'apiVersion'"))?;
    let meta = doc.metadata.ok_or_else(|| doc_err("missing 'metadata'"))?;
    let name = meta
        .name
        .ok_or_else(|| doc_err("missing 'metadata.name'"))?;
    let meta = Meta {
        name: name.into(),
        namespace: meta
            .namespace
            .as_deref()
            .unwrap_or(DEFAULT_NAMESPACE)
            .into(),
        file: path.into(),
    };
    let group = api.split('/').next().unwrap_or_default();
    let handled = match group {
        "networking.istio.io" => true,
        "security.istio.io" => matches!(
            kind.as_str(),
            "PeerAuthentication" | "AuthorizationPolicy" | "RequestAuthentication"
        ),
        "telemetry.istio.io" => kind == "Telemetry",
        // Istio's mesh config; other ConfigMaps are not the mesh's.
        "v1" => {
            kind == "ConfigMap"
                && *meta.namespace == *crate::model::ROOT_NAMESPACE
                && *meta.name == *MESH_CONFIG_NAME
        }
        _ => false,
    };
    if !handled {
        tracing::info!(file = %path.display(), %api, %kind, "skipping a kind pilot does not handle yet");
        return Ok(None);
    }
    if kind == "ConfigMap" {
        let mesh = doc.data.as_ref().and_then(|d| d.get("mesh")).map_or(
            Ok(Default::default()),
            |text| {
                serde_saphyr::from_str(text).map_err(|e| ConfigError::Spec {
                    path: path.to_path_buf(),
                    kind: kind.clone(),
                    namespace: meta.namespace.to_string(),
                    name: meta.name.to_string(),
                    reason: format!("data.mesh: {e}"),
                })
            },
        )?;
        return Ok(Some((meta, Resource::MeshConfig(Arc::new(mesh)))));
    }
    let spec = doc.spec.unwrap_or(serde_json::Value::Null);
    let spec_err = |reason: String| ConfigError::Spec {
        path: path.to_path_buf(),
        kind: kind.clone(),
        namespace: meta.namespace.to_string(),
        name: meta.name.to_string(),
        reason,
    };
    let typed = |spec| -> Result<Resource, ConfigError> {
        fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
            serde_json::from_value(v).map_err(|e| format!("spec: {e}"))
        }
        match kind.as_str() {
            "ServiceEntry" => de(spec).map(|s| Resource::ServiceEntry(Arc::new(s))),
            "WorkloadEntry" => de(spec).map(|w| Resource::WorkloadEntry(Arc::new(w))),
            "VirtualService" => de(spec).map(|r| Resource::VirtualService(Arc::new(r))),
            "DestinationRule" => de(spec).map(|d| Resource::DestinationRule(Arc::new(d))),
            "PeerAuthentication" => de(spec).map(|r| Resource::PeerAuthentication(Arc::new(r))),
            "AuthorizationPolicy" => de(spec).map(|r| Resource::AuthorizationPolicy(Arc::new(r))),
            "RequestAuthentication" => {
                de(spec).map(|r| Resource::RequestAuthentication(Arc::new(r)))
            }
            "Telemetry" => de(spec).map(|r| Resource::Telemetry(Arc::new(r))),
            "Sidecar" => de(spec).map(|r| Resource::Sidecar(Arc::new(r))),
            other => Err(format!("kind {other} is not supported yet")),
        }
        .map_err(spec_err)
    };
    Ok(Some((meta.clone(), typed(spec)?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_documents() {
        let text = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: default
spec:
  hosts: [reviews]
  http:
  - match:
    - uri:
        prefix: /reviews
    route:
    - destination: {host: reviews, subset: v1}
      weight: 100
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - name: v1
    labels: {version: v1}
"#;
        let res = parse_file(Path::new("x.yaml"), text).unwrap();
        assert_eq!(res.len(), 2);
        let Resource::VirtualService(vs) = &res[0].1 else {
            panic!()
        };
        assert_eq!(
            vs.http[0].matches[0].uri,
            Some(crate::istio::StringMatch {
                prefix: Some("/reviews".into()),
                ..Default::default()
            })
        );
        assert_eq!(&*res[1].0.namespace, "default");
    }

    #[test]
    fn errors_name_file_resource_and_field() {
        let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\nspec:\n  http:\n  - route:\n    - weight: 10\n";
        let err = parse_file(Path::new("dir/bad.yaml"), text)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dir/bad.yaml"), "{err}");
        assert!(err.contains("VirtualService default/bad"), "{err}");
        assert!(err.contains("destination"), "{err}");
        let err = parse_file(Path::new("y.yaml"), "kind: [unclosed")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("y.yaml: not valid YAML"), "{err}");
    }
}

#[cfg(test)]
mod hostile_input {
    use super::*;

    /// Parses `text` on a thread with the stack of tokio's blocking pool,
    /// where pilot's reloads run.
    fn parse_on_a_reload_thread(text: String) -> Result<usize, String> {
        std::thread::Builder::new()
            .stack_size(2 * 1024 * 1024)
            .spawn(move || {
                parse_file(Path::new("hostile.yaml"), &text)
                    .map(|v| v.len())
                    .map_err(|e| e.to_string())
            })
            .unwrap()
            .join()
            .expect("the parser must not crash the thread")
    }

    const HEAD: &str = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: x, namespace: y}\n";

    /// Nesting 100,000 deep, flow or block style, is refused with an error
    /// naming the file, never a stack overflow (which would take pilot
    /// down with every proxy's stream).
    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let depth = 100_000;
        let flow = format!(
            "{HEAD}spec: {{x: {}{}}}\n",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let block = format!("{HEAD}spec:\n  x:\n")
            + &(0..20_000)
                .map(|i| format!("  {}-\n", "  ".repeat(i)))
                .collect::<String>();
        for (style, text) in [("flow", flow), ("block", block)] {
            let err = parse_on_a_reload_thread(text).unwrap_err();
            assert!(
                err.starts_with("hostile.yaml: not valid YAML") && err.contains("line"),
                "{style}: {err}"
            );
        }
    }

    /// A 10 MB file of valid resources parses whole; 10 MB of junk is an
    /// error naming the file.
    #[test]
    fn a_ten_megabyte_file_is_read_or_refused_whole() {
        let one = |i: usize| {
            format!(
                "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{i}, namespace: big}}\nspec:\n  hosts: [svc-{i}.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n  resolution: STATIC\n  endpoints: [{{address: 10.0.{}.{}}}]\n  # {}\n",
                i / 250 % 250,
                i % 250,
                "padding ".repeat(30)
            )
        };
        let mut text = String::new();
        let mut n = 0;
        while text.len() < 10 * 1024 * 1024 {
            text.push_str(&one(n));
            n += 1;
        }
        assert_eq!(parse_on_a_reload_thread(text), Ok(n));
        let junk = "{[:".repeat(10 * 1024 * 1024 / 3);
        let err = parse_on_a_reload_thread(junk).unwrap_err();
        assert!(
            err.starts_with("hostile.yaml: not valid YAML"),
            "{}",
            &err[..err.len().min(300)]
        );
    }
}
