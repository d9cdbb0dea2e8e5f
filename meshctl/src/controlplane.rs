//! The control plane run in-process for local mode: citadel and pilot on
//! one address, pilot stoppable and restartable on its own.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use mesh_citadel::Citadel;
use mesh_identity::SpiffeId;
use mesh_pilot::Pilot;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Lifetime of the local-mode tokens meshctl hands to workloads.
pub const TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A pilot replica beside the control plane's own (see
/// [`ControlPlane::start_replica`]).
pub struct Replica {
    pub pilot: Arc<Pilot>,
    _watcher: mesh_pilot::DirWatcher,
    running: Running,
}

impl Replica {
    pub async fn stop(self) {
        self.running.stop().await;
    }
}

pub struct ControlPlane {
    pub citadel: Arc<Citadel>,
    pub ca_addr: SocketAddr,
    pub pilot_addr: SocketAddr,
    /// pilot's debug endpoints (`/debug/syncz`), read by `meshctl proxy-status`.
    pub pilot_debug_addr: SocketAddr,
    /// The trust bundle workloads start with (kept current by citadel).
    pub root_file: PathBuf,
    config_dir: PathBuf,
    pilot: Option<(Arc<Pilot>, mesh_pilot::DirWatcher, Running)>,
    citadel_task: Option<Running>,
}

impl ControlPlane {
    /// Starts citadel (state in `state_dir`) and pilot (config from
    /// `config_dir`) on `ip`.
    pub async fn start(state_dir: &Path, config_dir: &Path, ip: IpAddr) -> anyhow::Result<Self> {
        Self::start_with_lifetime(state_dir, config_dir, ip, mesh_citadel::DEFAULT_LIFETIME).await
    }

    /// As [`ControlPlane::start`], with every certificate (workloads',
    /// pilot's, citadel's own) living `cert_lifetime`.
    pub async fn start_with_lifetime(
        state_dir: &Path,
        config_dir: &Path,
        ip: IpAddr,
        cert_lifetime: Duration,
    ) -> anyhow::Result<Self> {
        let mut config = mesh_citadel::Config::new(state_dir.join("citadel"));
        config.default_lifetime = cert_lifetime;
        let citadel = Arc::new(Citadel::open(config).context("opening citadel's state")?);
        // citadel keeps this file holding the current trust bundle.
        let root_file = citadel.bundle_file();
        let ca_addr = SocketAddr::new(ip, mesh_proto::ports::CA);
        let citadel_task = Some(serve_citadel(&citadel, ca_addr).await?);
        let mut cp = Self {
            citadel,
            ca_addr,
            pilot_addr: SocketAddr::new(ip, mesh_proto::ports::XDS),
            pilot_debug_addr: SocketAddr::new(ip, mesh_proto::ports::CONTROL_PLANE_MONITORING),
            root_file,
            config_dir: config_dir.to_path_buf(),
            pilot: None,
            citadel_task,
        };
        cp.start_pilot().await?;
        Ok(cp)
    }

    /// A token that lets its bearer obtain certificates for `identity`.
    pub fn token_for(&self, identity: &SpiffeId) -> String {
        self.citadel.mint_token(identity, TOKEN_TTL)
    }

    pub fn pilot(&self) -> Option<&Arc<Pilot>> {
        self.pilot.as_ref().map(|(p, _, _)| p)
    }

    /// Starts a fresh pilot (no state carried over, as after a crash).
    pub async fn start_pilot(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.pilot.is_none(), "pilot is already running");
        let launched = self
            .launch_pilot(self.pilot_addr, self.pilot_debug_addr)
            .await?;
        self.pilot = Some(launched);
        Ok(())
    }

    /// Starts another pilot replica on `xds` (its monitoring port on
    /// `debug`) over the same config, with its own certificate: proxies
    /// told of both fail over to it.
    pub async fn start_replica(
        &self,
        xds: SocketAddr,
        debug: SocketAddr,
    ) -> anyhow::Result<Replica> {
        let (pilot, watcher, running) = self.launch_pilot(xds, debug).await?;
        Ok(Replica {
            pilot,
            _watcher: watcher,
            running,
        })
    }

    async fn launch_pilot(
        &self,
        xds: SocketAddr,
        debug: SocketAddr,
    ) -> anyhow::Result<(Arc<Pilot>, mesh_pilot::DirWatcher, Running)> {
        let pilot = Pilot::new(mesh_pilot::Config::new(&self.config_dir));
        // One process, one monitoring port: citadel's metrics beside pilot's.
        let citadel = self.citadel.clone();
        pilot.add_metrics(move || citadel.metrics());
        for e in pilot.errors() {
            eprintln!("config error: {e}");
        }
        let (tls, renewal) = pilot
            .server_tls(
                self.ca_addr,
                self.token_for(&pilot.identity()),
                self.citadel.roots_pem(),
            )
            .await
            .context("pilot's certificate")?;
        let watcher = pilot.watch().context("watching the config directory")?;
        let listener = tokio::net::TcpListener::bind(xds)
            .await
            .with_context(|| format!("pilot cannot listen on {xds}"))?;
        let debug = tokio::net::TcpListener::bind(debug)
            .await
            .with_context(|| format!("pilot's debug server cannot listen on {debug}"))?;
        let (stop, stopped) = oneshot::channel();
        let p = pilot.clone();
        let task = tokio::spawn(async move {
            let (debug_stop, debug_stopped) = oneshot::channel::<()>();
            let debug_task = tokio::spawn(p.clone().serve_debug(debug, async {
                let _ = debug_stopped.await;
            }));
            if let Err(e) = p
                .serve(listener, tls, async {
                    let _ = stopped.await;
                })
                .await
            {
                tracing::error!(error = %e, "pilot stopped");
            }
            // Pilot's certificate renewal and debug server end with pilot.
            renewal.abort();
            let _ = debug_stop.send(());
            let _ = debug_task.await;
        });
        Ok((pilot, watcher, Running { stop, task }))
    }

    /// Stops pilot; proxies keep serving their last config and reconnect.
    pub async fn stop_pilot(&mut self) {
        if let Some((_, watcher, running)) = self.pilot.take() {
            drop(watcher);
            running.stop().await;
        }
    }

    /// Stops citadel; workloads keep their certificates and retry renewal.
    pub async fn stop_citadel(&mut self) {
        if let Some(running) = self.citadel_task.take() {
            running.stop().await;
        }
    }

    /// Serves citadel again (same state, same address).
    pub async fn start_citadel(&mut self) -> anyhow::Result<()> {
        anyhow::ensure!(self.citadel_task.is_none(), "citadel is already running");
        self.citadel_task = Some(serve_citadel(&self.citadel, self.ca_addr).await?);
        Ok(())
    }

    pub async fn stop(mut self) {
        self.stop_pilot().await;
        self.stop_citadel().await;
    }
}

async fn serve_citadel(citadel: &Arc<Citadel>, addr: SocketAddr) -> anyhow::Result<Running> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("citadel cannot listen on {addr}"))?;
    let (stop, stopped) = oneshot::channel();
    let c = citadel.clone();
    let task = tokio::spawn(async move {
        if let Err(e) = c
            .serve(listener, async {
                let _ = stopped.await;
            })
            .await
        {
            tracing::error!(error = %e, "citadel stopped");
        }
    });
    Ok(Running { stop, task })
}
