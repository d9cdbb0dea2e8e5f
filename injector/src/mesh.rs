//! What the injector takes from Istio's mesh config (the `mesh` key of
//! ConfigMap istio-system/istio, or a file holding that YAML): the
//! `defaultConfig` every sidecar starts from, of which `concurrency`,
//! `terminationDrainDuration` and `holdApplicationUntilProxyStarts` are
//! read. A pod's `proxy.istio.io/config` overrides it field by field, as
//! in Istio. `meshctl kube-inject --mesh-config FILE` reads a file once;
//! the webhook (`mesh-injector --kubernetes`) follows the cluster's
//! ConfigMap, and a mesh config it cannot read leaves the last good one in
//! force.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ConfigMap;
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use tokio::sync::watch;

use crate::Config;

/// Where Istio keeps the mesh config, and under which key.
pub const NAMESPACE: &str = "istio-system";
pub const CONFIGMAP: &str = "istio";
pub const KEY: &str = "mesh";

/// Istio's ProxyConfig, as far as the mesh reads it (the pod annotation and
/// the mesh config's `defaultConfig` alike).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Serving threads; 0 for one per CPU the container may use.
    pub concurrency: Option<u32>,
    /// How long in-flight requests get to finish once the sidecar is told
    /// to stop (Istio's default, and the sidecar's, 5s).
    #[serde(
        rename = "terminationDrainDuration",
        default,
        deserialize_with = "duration"
    )]
    pub termination_drain_duration: Option<Duration>,
    /// Whether the app's containers wait for the sidecar to be ready. The
    /// mesh holds them unless this says `false` (Istio's default is not
    /// to): a native sidecar always holds them, a legacy one through its
    /// postStart hook, which `false` leaves out.
    #[serde(rename = "holdApplicationUntilProxyStarts", default)]
    pub hold_application_until_proxy_starts: Option<bool>,
    /// The fields set that the mesh does not read, by name: said, not
    /// silently dropped.
    #[serde(flatten)]
    pub unread: std::collections::BTreeMap<String, Value>,
}

impl ProxyConfig {
    /// These defaults with each field `pod` sets taken from it instead:
    /// Istio merges a pod's ProxyConfig over the mesh's field by field.
    /// The fields not read are the pod's alone: the mesh's are named once,
    /// where its config is read.
    pub fn under(&self, pod: ProxyConfig) -> ProxyConfig {
        ProxyConfig {
            concurrency: pod.concurrency.or(self.concurrency),
            termination_drain_duration: pod
                .termination_drain_duration
                .or(self.termination_drain_duration),
            hold_application_until_proxy_starts: pod
                .hold_application_until_proxy_starts
                .or(self.hold_application_until_proxy_starts),
            unread: pod.unread,
        }
    }

    /// What the field at `path` (as serde_path_to_error names it) should
    /// have been, for the error.
    pub fn expected(path: &str) -> Option<&'static str> {
        if path.ends_with("concurrency") {
            Some("a whole number of threads (0 for one per CPU)")
        } else if path.ends_with("terminationDrainDuration") {
            Some("a duration such as 30s, 1m30s or 500ms")
        } else if path.ends_with("holdApplicationUntilProxyStarts") {
            Some("true or false")
        } else {
            None
        }
    }

    /// `WHAT not read: a, b`, if any field is set that the mesh does not read.
    pub fn unread_note(&self, what: &str) -> Option<String> {
        let names: Vec<&str> = self.unread.keys().map(String::as_str).collect();
        (!names.is_empty()).then(|| format!("{what} not read: {}", names.join(", ")))
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct MeshConfig {
    /// Absent, or written as `defaultConfig:` with nothing under it.
    #[serde(default)]
    default_config: Option<ProxyConfig>,
}

/// A mesh config that does not parse, naming the field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{at}: {why}")]
pub struct MeshConfigError {
    pub at: String,
    pub why: String,
}

/// The mesh config's `defaultConfig`, from its YAML (or JSON) text. `at`
/// names where the text came from, for the error.
pub fn parse(at: &str, text: &str) -> Result<ProxyConfig, MeshConfigError> {
    let err = |field: String, why: String| MeshConfigError {
        at: match field.as_str() {
            "" | "." => at.to_string(),
            f => format!("{at}: {f}"),
        },
        why,
    };
    if text.trim().is_empty() {
        return Ok(ProxyConfig::default());
    }
    let value: Value =
        serde_saphyr::from_str(text).map_err(|e| err(String::new(), e.to_string()))?;
    if value.is_null() {
        return Ok(ProxyConfig::default());
    }
    let mesh: MeshConfig = serde_path_to_error::deserialize(&value).map_err(|e| {
        let path = e.path().to_string();
        let why = match ProxyConfig::expected(&path) {
            Some(expected) => format!("not {expected}"),
            None => e.inner().to_string(),
        };
        err(path, why)
    })?;
    Ok(mesh.default_config.unwrap_or_default())
}

/// A ProxyConfig duration as Istio's users write it: protobuf's JSON form
/// (`30s`, `1.5s`) or Go's (`1m30s`, `500ms`).
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(text.trim())
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// The mesh config's `defaultConfig` from a file holding its YAML.
pub fn from_file(path: &Path) -> Result<ProxyConfig, MeshConfigError> {
    let at = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| MeshConfigError {
        at: at.clone(),
        why: e.to_string(),
    })?;
    parse(&at, &text)
}

/// The `defaultConfig` of ConfigMap istio-system/istio (its `mesh` key);
/// a ConfigMap without the key means Istio's defaults.
pub fn from_configmap(cm: &ConfigMap) -> Result<ProxyConfig, MeshConfigError> {
    let at = format!("ConfigMap {NAMESPACE}/{CONFIGMAP} data.{KEY}");
    match cm.data.as_ref().and_then(|d| d.get(KEY)) {
        Some(text) => parse(&at, text),
        None => Ok(ProxyConfig::default()),
    }
}

/// Follows ConfigMap istio-system/istio through `client` and publishes
/// `base` with the mesh's `defaultConfig` on `tx` each time it changes.
/// No ConfigMap means Istio's defaults; one that does not parse is logged,
/// naming the field, and the last good one stays in force. Runs until `tx`
/// has no receivers.
pub async fn follow(client: kube::Client, base: Config, tx: watch::Sender<Arc<Config>>) {
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};

    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, NAMESPACE);
    let config = watcher::Config::default().fields(&format!("metadata.name={CONFIGMAP}"));
    let events = watcher(api, config).default_backoff();
    let mut events = std::pin::pin!(events);
    // During a (re-)list: the ConfigMap it has seen so far.
    let mut listed: Option<ConfigMap> = None;
    let publish = |cm: Option<&ConfigMap>| {
        let defaults = match cm.map(from_configmap) {
            None => ProxyConfig::default(),
            Some(Ok(d)) => d,
            Some(Err(e)) => {
                tracing::error!(error = %e, "mesh config not applied; the last good one stays in force");
                return;
            }
        };
        tx.send_if_modified(|cfg| {
            if cfg.mesh_defaults == defaults {
                return false;
            }
            tracing::info!(
                concurrency = ?defaults.concurrency,
                termination_drain_duration = ?defaults.termination_drain_duration,
                "mesh config: defaultConfig applied"
            );
            if let Some(note) = defaults.unread_note("mesh config: defaultConfig fields") {
                tracing::info!("{note}");
            }
            *cfg = Arc::new(Config {
                mesh_defaults: defaults,
                ..base.clone()
            });
            true
        });
    };
    loop {
        let event = tokio::select! {
            _ = tx.closed() => return,
            e = events.next() => e,
        };
        match event {
            None => return,
            Some(Ok(watcher::Event::Init)) => listed = None,
            Some(Ok(watcher::Event::InitApply(cm))) => listed = Some(cm),
            Some(Ok(watcher::Event::InitDone)) => publish(listed.take().as_ref()),
            Some(Ok(watcher::Event::Apply(cm))) => publish(Some(&cm)),
            Some(Ok(watcher::Event::Delete(_))) => publish(None),
            Some(Err(e)) => tracing::warn!("kubernetes watch of the mesh config: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_default_config_concurrency_and_names_a_bad_one() {
        let threads = |text: &str| parse("mesh", text).map(|d| d.concurrency);
        assert_eq!(
            threads("defaultConfig:\n  concurrency: 2\n  holdApplicationUntilProxyStarts: true\n"),
            Ok(Some(2))
        );
        assert_eq!(
            threads(r#"{"defaultConfig": {"concurrency": 0}}"#),
            Ok(Some(0))
        );
        // Other mesh settings (pilot's), and no defaultConfig at all.
        assert_eq!(
            threads("outboundTrafficPolicy:\n  mode: REGISTRY_ONLY\n"),
            Ok(None)
        );
        assert_eq!(threads(""), Ok(None));
        assert_eq!(threads("defaultConfig:\n"), Ok(None));
        let read = parse(
            "mesh",
            "defaultConfig: {concurrency: 2, tracing: {sampling: 10}}",
        )
        .unwrap();
        assert_eq!(read.unread.keys().collect::<Vec<_>>(), ["tracing"]);
        for bad in [
            "defaultConfig:\n  concurrency: two\n",
            "defaultConfig:\n  concurrency: -1\n",
        ] {
            let e = threads(bad).unwrap_err();
            assert_eq!(e.at, "mesh: defaultConfig.concurrency", "{bad}");
            assert!(e.why.contains("whole number"), "{e}");
        }
        let e = threads("defaultConfig: [1\n").unwrap_err();
        assert_eq!(e.at, "mesh", "{e}");
    }

    #[test]
    fn reads_the_termination_drain_duration_in_istios_spellings() {
        let drain = |text: &str| {
            parse(
                "mesh",
                &format!("defaultConfig: {{terminationDrainDuration: {text}}}"),
            )
            .map(|d| d.termination_drain_duration)
        };
        for (text, secs) in [
            ("30s", 30.0),
            ("1.5s", 1.5),
            ("1m30s", 90.0),
            ("500ms", 0.5),
        ] {
            assert_eq!(
                drain(text),
                Ok(Some(Duration::from_secs_f64(secs))),
                "{text}"
            );
        }
        for bad in ["thirty", "30", "-5s"] {
            let e = drain(bad).unwrap_err();
            assert_eq!(
                e.at, "mesh: defaultConfig.terminationDrainDuration",
                "{bad}"
            );
            assert!(e.why.contains("a duration such as 30s"), "{e}");
        }
        // A pod's fields win where it sets them; the rest come from the mesh.
        let mesh = parse(
            "mesh",
            "defaultConfig: {concurrency: 2, terminationDrainDuration: 20s}",
        )
        .unwrap();
        let pod = ProxyConfig {
            termination_drain_duration: Some(Duration::from_secs(3)),
            ..Default::default()
        };
        let merged = mesh.under(pod);
        assert_eq!(merged.concurrency, Some(2));
        assert_eq!(
            merged.termination_drain_duration,
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn a_configmap_without_the_mesh_key_means_istios_defaults() {
        let cm: ConfigMap = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "istio", "namespace": "istio-system"},
            "data": {"meshNetworks": "networks: {}"},
        }))
        .unwrap();
        assert_eq!(from_configmap(&cm), Ok(ProxyConfig::default()));
    }
}
