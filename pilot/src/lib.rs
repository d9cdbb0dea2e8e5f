//! Pilot: reads Istio config, builds the mesh model, and pushes each proxy
//! its view over delta xDS.
#![forbid(unsafe_code)]

pub mod accept;
mod debug;
pub mod dr;
mod framing;
pub mod generate;
pub mod istio;
pub mod jwks;
pub mod kubernetes;
pub mod metrics;
pub mod model;
pub mod status;
pub mod store;
pub mod vs;
mod watch;
pub mod xds;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_identity::SpiffeId;
use tokio::net::TcpListener;
use tokio::sync::watch as tokio_watch;

use crate::generate::Snapshot;
use crate::model::Model;

pub use watch::DirWatcher;

/// What pilot would serve from one file's text: parsed, accepted as a
/// reload accepts (a bad resource rejected alone), and every known proxy's
/// view of every type worked out and decoded again. `Ok` holds the
/// snapshot and what was rejected; `Err` what rejected the whole load.
/// The fuzz target (`pilot/fuzz/`) and its seed test drive the YAML → model
/// path through this, so both exercise exactly what a reload does.
pub fn serve_text(text: &str) -> Result<(Snapshot, Vec<String>), Vec<String>> {
    let path = std::path::Path::new("config.yaml");
    let resources = store::parse_file(path, text).map_err(|e| vec![e.to_string()])?;
    let accepted = accept::accept(resources, &[], &[], |set| {
        Model::build(set, mesh_identity::DEFAULT_TRUST_DOMAIN)
    })?;
    let snapshot = Snapshot::build(Arc::new(accepted.model), 1);
    for proxy in snapshot.model.workloads.keys() {
        for type_url in mesh_proto::type_url::ALL {
            for resource in snapshot.for_proxy(type_url, proxy).values() {
                generate::decode_check(type_url, &resource.any)
                    .map_err(|e| vec![format!("{proxy}: {type_url}: {e}")])?;
            }
        }
    }
    Ok((snapshot, accepted.errors))
}

/// Default address of the xDS server.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15012";
/// The service account pilot's identity names.
pub const SERVICE_ACCOUNT: &str = "pilot";
pub const NAMESPACE: &str = "mesh-system";

#[derive(Clone, Debug)]
pub struct Config {
    pub config_dir: PathBuf,
    pub trust_domain: String,
    /// The cluster this pilot serves (Istio's cluster ID), stamped on
    /// workloads and endpoints for metrics.
    pub cluster_id: String,
    /// Access logs as JSON rather than Istio's text format.
    pub access_log_json: bool,
}

impl Config {
    pub fn new(config_dir: impl Into<PathBuf>) -> Self {
        Self {
            config_dir: config_dir.into(),
            trust_domain: mesh_identity::DEFAULT_TRUST_DOMAIN.to_string(),
            cluster_id: model::DEFAULT_CLUSTER_ID.to_string(),
            access_log_json: false,
        }
    }
}

pub fn identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, NAMESPACE, SERVICE_ACCOUNT)
}

pub struct Pilot {
    config: Config,
    snapshots: tokio_watch::Sender<Arc<Snapshot>>,
    errors: tokio_watch::Sender<Vec<String>>,
    version: AtomicU64,
    status: Arc<status::Tracker>,
    pub metrics: Arc<metrics::Metrics>,
    /// More metrics served on the monitoring port beside pilot's (citadel's,
    /// when it runs in the same process).
    extra_metrics: std::sync::OnceLock<Box<dyn Fn() -> String + Send + Sync>>,
    /// The Kubernetes source, once [`Pilot::watch_kubernetes`] has synced it.
    cluster: std::sync::OnceLock<kubernetes::Cache>,
    /// Held for the length of a load.
    loading: std::sync::Mutex<()>,
    /// The resources the model in force was built from.
    /// Shared, so a load reads it without copying every resource.
    accepted: std::sync::Mutex<Arc<Vec<(store::Meta, store::Resource)>>>,
    /// Each config file's last parse, by the hash of its text.
    #[allow(clippy::type_complexity)]
    parsed: std::sync::Mutex<
        std::collections::HashMap<PathBuf, (u64, Vec<(store::Meta, store::Resource)>)>,
    >,
}

impl Pilot {
    /// Creates pilot and loads the config directory once. A bad initial
    /// config leaves an empty model in place; the errors are kept for
    /// [`Pilot::errors`].
    pub fn new(config: Config) -> Arc<Self> {
        let empty = Arc::new(Snapshot::build(Arc::new(Model::default()), 0));
        let pilot = Arc::new(Self {
            config,
            snapshots: tokio_watch::channel(empty).0,
            errors: tokio_watch::channel(Vec::new()).0,
            version: AtomicU64::new(0),
            status: Arc::default(),
            metrics: Arc::default(),
            extra_metrics: std::sync::OnceLock::new(),
            cluster: std::sync::OnceLock::new(),
            loading: std::sync::Mutex::default(),
            accepted: std::sync::Mutex::default(),
            parsed: std::sync::Mutex::default(),
        });
        pilot.reload();
        pilot
    }

    /// Serves `source`'s metrics beside pilot's on the monitoring port;
    /// only the first call counts.
    pub fn add_metrics(&self, source: impl Fn() -> String + Send + Sync + 'static) {
        let _ = self.extra_metrics.set(Box::new(source));
    }

    /// Everything the monitoring port's `/metrics` serves.
    pub fn metrics_text(&self) -> String {
        let connected = self.status.all().iter().filter(|p| p.connected).count();
        let services = self.snapshots.borrow().model.services.len();
        let mut text = self.metrics.encode(connected, services);
        if let Some(extra) = self.extra_metrics.get() {
            // One exposition: a single `# EOF`, at the end.
            text = text.trim_end().trim_end_matches("# EOF").to_string();
            text.push_str(&extra());
        }
        text
    }

    pub fn identity(&self) -> SpiffeId {
        identity(&self.config.trust_domain)
    }

    /// Obtains pilot's serving certificate from citadel and keeps renewing
    /// it; returns the newest server config and the renewal task.
    pub async fn server_tls(
        &self,
        ca_addr: std::net::SocketAddr,
        token: String,
        roots_pem: String,
    ) -> Result<
        (
            tokio_watch::Receiver<Arc<rustls::ServerConfig>>,
            tokio::task::JoinHandle<()>,
        ),
        mesh_identity::CredentialsError,
    > {
        let settings = mesh_identity::workload::CaSettings {
            addr: ca_addr,
            identity: self.identity(),
            token,
            lifetime: std::time::Duration::ZERO,
            roots_pem,
            socket_mark: None,
        };
        let (creds, task) = mesh_identity::workload::start(settings)?;
        let tls = mesh_identity::renew::server_configs("pilot", creds, true, &[b"h2"]).await;
        Ok((tls, task))
    }

    /// Re-reads the config directory (and the Kubernetes cache, when
    /// watched). A bad resource is reported and rejected alone, its last
    /// good version standing in (see [`accept`]); what cannot be
    /// attributed to one resource rejects the whole load, and the last
    /// good config keeps serving. Returns whether the model changed.
    pub fn reload(&self) -> bool {
        // One load at a time: the directory's and the cluster's watchers
        // both reload, and a slower, older load must not publish last.
        let _one = self.loading.lock().expect("load lock");
        let started = std::time::Instant::now();
        let last = self.accepted.lock().expect("accepted set").clone();
        let mut read_ms = 0;
        let result = self.gather(&last).and_then(|(set, unread)| {
            read_ms = started.elapsed().as_millis();
            accept::accept(set, &unread, &last, |set| {
                Model::build_with(set, &self.config.trust_domain, |m| {
                    m.cluster_id.clone_from(&self.config.cluster_id);
                    m.access_log_json = self.config.access_log_json;
                })
            })
        });
        self.metrics
            .config_load(matches!(&result, Ok(a) if a.errors.is_empty()));
        let accepted = match result {
            Err(errors) => {
                for e in &errors {
                    tracing::error!("config rejected, last good config keeps serving: {e}");
                }
                self.errors.send_replace(errors);
                return false;
            }
            Ok(accepted) => accepted,
        };
        for e in &accepted.errors {
            tracing::error!("resource rejected, its last good version (if any) keeps serving: {e}");
        }
        self.errors.send_replace(accepted.errors);
        *self.accepted.lock().expect("accepted set") = Arc::new(accepted.resources);
        let model = accepted.model;
        if *self.snapshots.borrow().model == model {
            return false;
        }
        let version = self.version.fetch_add(1, Ordering::Relaxed) + 1;
        let model_ms = started.elapsed().as_millis();
        let previous = self.snapshots.borrow().clone();
        let snapshot = Snapshot::build_after(Arc::new(model), version, Some(&previous));
        drop(previous);
        tracing::info!(
            version,
            services = snapshot.model.services.len(),
            workloads = snapshot.model.workloads.len(),
            read_ms,
            model_ms,
            total_ms = started.elapsed().as_millis(),
            "config loaded"
        );
        self.snapshots.send_replace(Arc::new(snapshot));
        true
    }

    /// Everything the sources hold now, and what they could not read.
    #[allow(clippy::type_complexity)]
    fn gather(
        &self,
        last: &[(store::Meta, store::Resource)],
    ) -> Result<(Vec<(store::Meta, store::Resource)>, Vec<store::Unread>), Vec<String>> {
        let mut set = Vec::new();
        let mut unread = Vec::new();
        let files = store::yaml_files(&self.config.config_dir).map_err(|e| vec![e.to_string()])?;
        // Only files whose text changed are parsed again.
        let mut parsed = self.parsed.lock().expect("parse cache");
        parsed.retain(|path, _| files.contains(path));
        for file in files {
            let result = store::read(&file).and_then(|text| {
                let mut h = std::collections::hash_map::DefaultHasher::new();
                std::hash::Hash::hash(&text, &mut h);
                let hash = std::hash::Hasher::finish(&h);
                match parsed.get(&file) {
                    Some((seen, resources)) if *seen == hash => Ok(resources.clone()),
                    _ => {
                        let resources = store::parse_file(&file, &text)?;
                        parsed.insert(file.clone(), (hash, resources.clone()));
                        Ok(resources)
                    }
                }
            });
            match result {
                Ok(resources) => set.extend(resources),
                Err(e) => unread.push(store::Unread {
                    file,
                    object: None,
                    error: e.to_string(),
                }),
            }
        }
        drop(parsed);
        if let Some(cluster) = self.cluster.get() {
            // The mesh config read now, else (its file unreadable) the one in force.
            let selectors = set
                .iter()
                .chain(
                    last.iter()
                        .filter(|(m, r)| unread.iter().any(|u| u.covers(m, r))),
                )
                .map(|(_, r)| r)
                .chain(
                    cluster
                        .mesh_config()
                        .and_then(Result::ok)
                        .map(|(_, r)| r)
                        .as_ref(),
                )
                .find_map(|r| match r {
                    store::Resource::MeshConfig(mc) => Some(mc.discovery_selectors.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            let (objects, bad) = cluster.resources(&selectors);
            set.extend(objects);
            unread.extend(bad);
        }
        set.shrink_to_fit();
        Ok((set, unread))
    }

    /// Adds Kubernetes as a source: Istio's custom resources and the
    /// cluster's Services, EndpointSlices, Pods and Namespaces, beside the
    /// config directory. Returns once every kind has been listed, so that
    /// no proxy is ever sent a half-read cluster; from then on each change
    /// reloads. Only the first call counts.
    pub async fn watch_kubernetes(self: &Arc<Self>, client: kube::Client) -> kubernetes::Watchers {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (cluster, mut watchers) = kubernetes::Cache::watch(&client, &tx);
        tracing::info!("waiting for the Kubernetes caches to sync");
        cluster.synced().await;
        if self.cluster.set(cluster).is_ok() {
            tracing::info!("Kubernetes caches synced");
            self.reload();
            watchers.push(watch::reload_on(self.clone(), rx));
        }
        watchers
    }

    /// Watches the config directory and reloads on every change.
    pub fn watch(self: &Arc<Self>) -> Result<DirWatcher, notify::Error> {
        DirWatcher::start(self.clone(), &self.config.config_dir)
    }

    /// Every new snapshot, as it is made.
    pub fn subscribe(&self) -> tokio_watch::Receiver<Arc<Snapshot>> {
        self.snapshots.subscribe()
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshots.borrow().clone()
    }

    /// The errors of the last rejected config load (empty when it loaded).
    pub fn errors(&self) -> Vec<String> {
        self.errors.borrow().clone()
    }

    pub fn proxies(&self) -> Vec<status::ProxyStatus> {
        self.status.all()
    }

    /// Serves delta ADS over mutual TLS on `listener` until `shutdown`;
    /// each new connection uses the newest config in `tls` (see
    /// [`mesh_identity::renew::rotating_server_config`]).
    pub async fn serve(
        self: &Arc<Self>,
        listener: TcpListener,
        tls: tokio_watch::Receiver<Arc<rustls::ServerConfig>>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), ServeError> {
        let (closing_tx, closing) = tokio_watch::channel(false);
        // JWKS named by jwksUri are fetched for as long as pilot serves.
        let jwks = tokio::spawn(jwks::refresh_forever(self.clone()));
        let ads = xds::Ads {
            snapshots: self.snapshots.subscribe(),
            status: self.status.clone(),
            metrics: self.metrics.clone(),
            closing,
        };
        let shutdown = async move {
            shutdown.await;
            closing_tx.send_replace(true);
        };
        tracing::info!(addr = ?listener.local_addr().ok(), "pilot serving delta xDS over mTLS");
        let served = tonic::transport::Server::builder()
            .add_service(framing::AdsServer::new(ads))
            .serve_with_incoming_shutdown(
                mesh_identity::grpc::tls_incoming(listener, tls),
                shutdown,
            )
            .await;
        jwks.abort();
        served?;
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}
