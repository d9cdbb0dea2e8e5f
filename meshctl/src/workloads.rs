//! The local-mode "pods": one sidecar per WorkloadEntry, each on the
//! entry's loopback address, with the sample app the entry's labels name.
//! They run as child processes (`meshctl demo`) or as tasks (tests).

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use mesh_proxy::cli::ProxyArgs;
use mesh_samples::{AppArgs, Service};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::controlplane::ControlPlane;

#[derive(Clone, Debug)]
pub struct WorkloadSpec {
    pub name: String,
    pub namespace: String,
    pub address: IpAddr,
    pub service_account: String,
    /// The sample service and version this pod runs, if any.
    pub app: Option<(Service, String)>,
}

impl WorkloadSpec {
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::new(self.address, mesh_proto::ports::ADMIN)
    }
    pub fn outbound(&self) -> SocketAddr {
        SocketAddr::new(self.address, mesh_proto::ports::OUTBOUND)
    }
    pub fn app_addr(&self) -> SocketAddr {
        SocketAddr::new(self.address, mesh_samples::PORT)
    }
}

/// The workloads a config directory describes (its WorkloadEntries).
pub fn from_config(dir: &Path) -> anyhow::Result<Vec<WorkloadSpec>> {
    let set = mesh_pilot::store::load_dir(dir)?;
    let model = mesh_pilot::model::Model::build(&set, mesh_identity::DEFAULT_TRUST_DOMAIN)
        .map_err(|errors| anyhow::anyhow!("config is invalid:\n  {}", errors.join("\n  ")))?;
    model
        .workloads
        .values()
        .map(|w| {
            let app = w
                .labels
                .get("app")
                .and_then(|a| a.parse::<Service>().ok())
                .map(|s| {
                    let v = w
                        .labels
                        .get("version")
                        .cloned()
                        .unwrap_or_else(|| "v1".into());
                    (s, v)
                });
            Ok(WorkloadSpec {
                name: w.name.clone(),
                namespace: w.namespace.clone(),
                address: w.address.parse().context("WorkloadEntry address")?,
                service_account: w.service_account.clone(),
                app,
            })
        })
        .collect()
}

pub enum Launcher {
    /// Child processes: apps by re-running `exe` (meshctl itself) as `app`;
    /// sidecars by running `proxy_exe` (a `mesh-proxy` binary) or, without
    /// one, `exe proxy`. Logs go to `log_dir`.
    Processes {
        exe: PathBuf,
        proxy_exe: Option<PathBuf>,
        log_dir: PathBuf,
    },
    InProcess,
}

/// Env var naming the `mesh-proxy` binary to run sidecars with.
pub const PROXY_BIN_ENV: &str = "MESH_PROXY_BIN";

/// The dedicated sidecar binary to use, if there is one: `$MESH_PROXY_BIN`;
/// for a `meshctl` in cargo's `release` directory, the sidecar as deployed
/// ([`deployed_sidecar`]); else `mesh-proxy` beside `exe`.
pub fn find_proxy_exe(exe: &Path) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(PROXY_BIN_ENV) {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    deployed_sidecar(exe)
        .into_iter()
        .chain(exe.parent().map(|d| d.join("mesh-proxy")))
        .find(|p| p.is_file())
}

/// Where `cargo build-sidecar` puts the sidecar as deployed (static, its
/// hot code first), for a `meshctl` cargo built in `<target>/release`:
/// `<target>/sidecar/mesh-proxy`. A release meshctl pairs with it, as a
/// debug one (the tests') pairs with the debug `mesh-proxy` beside it.
pub fn deployed_sidecar(exe: &Path) -> Option<PathBuf> {
    let dir = exe.parent()?;
    (dir.file_name()? == "release").then(|| dir.with_file_name("sidecar").join("mesh-proxy"))
}

/// How to build the sidecar as deployed when `meshctl` was started by
/// `cargo run --release -p meshctl` (cargo names itself and the package in
/// `env`, what it runs gets): `cargo build-sidecar` run in the package's
/// directory. None for an installed `meshctl`, a debug build (the tests'),
/// or when `$MESH_PROXY_BIN` names the sidecar.
pub fn sidecar_build(
    env: &BTreeMap<OsString, OsString>,
    exe: &Path,
) -> Option<std::process::Command> {
    let get = |k: &str| env.get(OsStr::new(k));
    if get(PROXY_BIN_ENV).is_some() || get("CARGO_PKG_NAME")? != "meshctl" {
        return None;
    }
    deployed_sidecar(exe)?;
    let mut cargo = std::process::Command::new(get("CARGO")?);
    cargo
        .arg("build-sidecar")
        .current_dir(get("CARGO_MANIFEST_DIR")?)
        .stdin(Stdio::null());
    // What cargo set for meshctl's own run is not the user's environment.
    // Passed on, it would differ from every other build's: ring's build
    // script watches CARGO_MANIFEST_DIR, and each change rebuilds it and
    // everything above it (minutes), here and again in the next plain build.
    for name in env.keys().filter(|n| set_by_cargo_run(n)) {
        cargo.env_remove(name);
    }
    Some(cargo)
}

/// The variables `cargo run` sets to describe the package it runs.
fn set_by_cargo_run(name: &OsStr) -> bool {
    name.to_str().is_some_and(|n| {
        n.starts_with("CARGO_PKG_")
            || n.starts_with("CARGO_MANIFEST_")
            || matches!(
                n,
                "CARGO_CRATE_NAME" | "CARGO_BIN_NAME" | "CARGO_PRIMARY_PACKAGE"
            )
    })
}

enum Running {
    Child(tokio::process::Child),
    Task(oneshot::Sender<()>, JoinHandle<()>),
}

/// Everything launched; dropping it kills the children.
#[derive(Default)]
pub struct Pods {
    running: Vec<(String, Running)>,
}

impl Pods {
    /// PIDs of the sidecar processes by workload name (process launcher only).
    pub fn sidecar_pids(&self) -> Vec<(String, u32)> {
        self.running
            .iter()
            .filter_map(|(n, r)| match r {
                Running::Child(c) => n.strip_suffix("/proxy").zip(c.id()),
                Running::Task(..) => None,
            })
            .map(|(n, pid)| (n.to_string(), pid))
            .collect()
    }

    /// Stops every pod: SIGKILL to children (by PID, via tokio), tasks signalled.
    pub async fn stop(mut self) {
        for (_, r) in self.running.drain(..) {
            match r {
                Running::Child(mut c) => {
                    let _ = c.kill().await;
                }
                Running::Task(stop, task) => {
                    let _ = stop.send(());
                    let _ = task.await;
                }
            }
        }
    }
}

fn proxy_args(cp: &ControlPlane, w: &WorkloadSpec, token_file: PathBuf) -> ProxyArgs {
    ProxyArgs {
        workload: w.name.clone(),
        namespace: w.namespace.clone(),
        service_account: w.service_account.clone(),
        trust_domain: cp.citadel.trust_domain().to_string(),
        pod_ip: w.address,
        pilot_addr: cp.pilot_addr.into(),
        ca_addr: cp.ca_addr,
        ca_root_file: cp.root_file.clone(),
        token_file,
        cert_lifetime_secs: 0,
        threads: mesh_proxy::cli::DEFAULT_THREADS,
        io_events_per_tick: mesh_proxy::cli::DEFAULT_IO_EVENTS_PER_TICK,
        drain_grace_secs: mesh_proxy::drain::DEFAULT_GRACE.as_secs(),
        outbound_traffic_policy: Default::default(),
        protocol_detection_timeout: mesh_proxy::config::DEFAULT_DETECTION_TIMEOUT,
        capture: false,
        proxy_mark: None,
        retry_budget_percent: 20.0,
        retry_budget_min_per_sec: 10,
        retry_buffer_bytes: mesh_proxy::replay::DEFAULT_LIMIT,
        app_probers: Some(app_probers(w)).filter(|p| !p.is_empty()),
        access_log_file: None,
        // The sample apps serve their own metrics, merged on the agent port
        // as the injector arranges for an annotated pod.
        app_metrics: w.app.as_ref().map(|_| mesh_proto::app_metrics::AppMetrics {
            port: mesh_samples::PORT,
            path: "/metrics".into(),
        }),
    }
}

/// The probes kubelet would run on the sample app, moved onto the
/// sidecar's agent port as the injector moves them: readiness is
/// `GET /health`, liveness a TCP connect.
fn app_probers(w: &WorkloadSpec) -> mesh_proto::probers::Probers {
    use mesh_proto::probers::{HttpGet, Prober, TcpSocket};
    if w.app.is_none() {
        return Default::default();
    }
    let prober = |http_get, tcp_socket| Prober {
        http_get,
        tcp_socket,
        grpc: None,
        timeout_seconds: 1,
    };
    let get = HttpGet {
        path: "/health".into(),
        port: mesh_samples::PORT,
        host: None,
        http_headers: vec![],
        https: false,
    };
    let tcp = TcpSocket {
        port: mesh_samples::PORT,
    };
    [
        (
            format!("/app-health/{}/readyz", w.name),
            prober(Some(get), None),
        ),
        (
            format!("/app-health/{}/livez", w.name),
            prober(None, Some(tcp)),
        ),
    ]
    .into()
}

fn proxy_cmdline(a: &ProxyArgs) -> Vec<String> {
    let mut args = vec![
        format!("--workload={}", a.workload),
        format!("--namespace={}", a.namespace),
        format!("--service-account={}", a.service_account),
        format!("--trust-domain={}", a.trust_domain),
        format!("--pod-ip={}", a.pod_ip),
        format!("--pilot-addr={}", a.pilot_addr),
        format!("--ca-addr={}", a.ca_addr),
        format!("--ca-root-file={}", a.ca_root_file.display()),
        format!("--token-file={}", a.token_file.display()),
    ];
    if let Some(probers) = a.app_probers.as_ref().filter(|p| !p.is_empty()) {
        let json = serde_json::to_string(probers).expect("probers serialize");
        args.push(format!("--app-probers={json}"));
    }
    if let Some(m) = &a.app_metrics {
        let json = serde_json::to_string(m).expect("app metrics serialize");
        args.push(format!("--app-metrics={json}"));
    }
    args
}

fn spawn_child(exe: &Path, args: &[String], log: &Path) -> anyhow::Result<tokio::process::Child> {
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    tokio::process::Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", exe.display()))
}

/// Starts every workload's sidecar and app.
pub async fn launch(
    cp: &ControlPlane,
    specs: &[WorkloadSpec],
    launcher: &Launcher,
    state_dir: &Path,
) -> anyhow::Result<Pods> {
    let token_dir = state_dir.join("tokens");
    std::fs::create_dir_all(&token_dir)?;
    let mut pods = Pods::default();
    for w in specs {
        let identity = mesh_identity::SpiffeId::new(
            cp.citadel.trust_domain(),
            &w.namespace,
            &w.service_account,
        );
        let token_file = token_dir.join(format!("{}.{}.token", w.name, w.namespace));
        write_private(&token_file, &cp.token_for(&identity))?;
        let pa = proxy_args(cp, w, token_file);
        let app = w.app.as_ref().map(|(svc, version)| AppArgs {
            service: *svc,
            version: version.clone(),
            listen: w.app_addr(),
            proxy: Some(format!("http://{}", w.outbound())),
            resolve: vec![],
        });
        match launcher {
            Launcher::Processes {
                exe,
                proxy_exe,
                log_dir,
            } => {
                let log = log_dir.join(format!("{}-proxy.log", w.name));
                let child = match proxy_exe {
                    Some(bin) => spawn_child(bin, &proxy_cmdline(&pa), &log)?,
                    None => {
                        let mut args = vec!["proxy".to_string()];
                        args.extend(proxy_cmdline(&pa));
                        spawn_child(exe, &args, &log)?
                    }
                };
                pods.running
                    .push((format!("{}/proxy", w.name), Running::Child(child)));
                if let Some(app) = app {
                    let args = vec![
                        "app".to_string(),
                        format!("--service={}", format!("{:?}", app.service).to_lowercase()),
                        format!("--version={}", app.version),
                        format!("--listen={}", app.listen),
                        format!("--proxy={}", app.proxy.unwrap_or_default()),
                    ];
                    let child =
                        spawn_child(exe, &args, &log_dir.join(format!("{}-app.log", w.name)))?;
                    pods.running
                        .push((format!("{}/app", w.name), Running::Child(child)));
                }
            }
            Launcher::InProcess => {
                let mut cfg = pa.into_config()?;
                // Sidecars in this process share its stdout: each logs to its own file.
                cfg.access_log_file = Some(state_dir.join(format!("{}.access.log", w.name)));
                let (stop, stopped) = oneshot::channel::<()>();
                let name = w.name.clone();
                let task = tokio::spawn(async move {
                    let shutdown = async {
                        let _ = stopped.await;
                    };
                    if let Err(e) = mesh_proxy::run(cfg, shutdown).await {
                        tracing::error!(workload = %name, error = %e, "sidecar failed");
                    }
                });
                pods.running
                    .push((format!("{}/proxy", w.name), Running::Task(stop, task)));
                if let Some(app) = app {
                    let (stop, stopped) = oneshot::channel::<()>();
                    let task = tokio::spawn(async move {
                        let _ = app
                            .run(async {
                                let _ = stopped.await;
                            })
                            .await;
                    });
                    pods.running
                        .push((format!("{}/app", w.name), Running::Task(stop, task)));
                }
            }
        }
    }
    Ok(pods)
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(contents.as_bytes())?;
    Ok(())
}

/// Why one workload is not ready yet, or `None` when it is.
async fn not_ready(http: &reqwest::Client, w: &WorkloadSpec) -> Option<String> {
    let url = format!("http://{}/healthz/ready", w.admin());
    match http.get(&url).send().await {
        Ok(r) if r.status().is_success() => {}
        Ok(r) => {
            return Some(format!(
                "sidecar: {}",
                r.text().await.unwrap_or_default().trim()
            ));
        }
        Err(_) => return Some("sidecar not listening yet".into()),
    }
    if w.app.is_some() {
        let url = format!("http://{}/health", w.app_addr());
        if !http
            .get(&url)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            return Some("app not answering yet".into());
        }
    }
    None
}

/// Waits until every workload is ready, reporting each as it becomes so.
pub async fn wait_ready(
    specs: &[WorkloadSpec],
    timeout: Duration,
    mut progress: impl FnMut(&WorkloadSpec, usize, usize),
) -> anyhow::Result<()> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + timeout;
    let mut pending: Vec<&WorkloadSpec> = specs.iter().collect();
    let mut done = 0;
    while !pending.is_empty() {
        let mut still = Vec::new();
        for w in pending {
            match not_ready(&http, w).await {
                None => {
                    done += 1;
                    progress(w, done, specs.len());
                }
                Some(why) if Instant::now() > deadline => {
                    anyhow::bail!(
                        "{} ({}) not ready after {timeout:?}: {why}",
                        w.name,
                        w.address
                    )
                }
                Some(_) => still.push(w),
            }
        }
        pending = still;
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// How to run a command inside each pod of a `demo --transparent` mesh,
/// recorded in its state directory for `meshctl exec`.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct PodNamespaces {
    /// What enters the namespaces the pods' network namespaces live in
    /// (empty when they are the host's).
    pub enter: Vec<String>,
    /// Network namespace (`ip netns`) by workload.
    pub pods: std::collections::BTreeMap<String, String>,
}

impl PodNamespaces {
    const FILE: &str = "pods.json";

    /// Pods kept in the user, mount and network namespaces of process `pid`
    /// (a demo run without root).
    pub fn rootless(pid: u32) -> Self {
        Self {
            enter: [
                "nsenter",
                "--target",
                &pid.to_string(),
                "--user",
                "--mount",
                "--net",
                "--preserve-credentials",
            ]
            .map(str::to_string)
            .to_vec(),
            pods: Default::default(),
        }
    }

    pub fn with(mut self, pods: impl IntoIterator<Item = (String, String)>) -> Self {
        self.pods.extend(pods);
        self
    }

    pub fn save(&self, state_dir: &Path) -> anyhow::Result<()> {
        std::fs::write(state_dir.join(Self::FILE), serde_json::to_vec_pretty(self)?)
            .context("recording the pods for `meshctl exec`")
    }

    fn load(state_dir: &Path) -> Option<Self> {
        serde_json::from_slice(&std::fs::read(state_dir.join(Self::FILE)).ok()?).ok()
    }
}

/// Runs `argv` as `workload` of the mesh whose state directory is
/// `state_dir`, behind its sidecar: in a `--transparent` demo, inside the
/// workload's pod, where capture sends its traffic through the sidecar;
/// otherwise with `http_proxy` naming the workload's outbound sidecar (the
/// explicit mode), so `curl http://reviews:9080/` works as in a pod.
pub fn exec(
    state_dir: &Path,
    workload: &str,
    argv: &[std::ffi::OsString],
) -> anyhow::Result<std::process::ExitStatus> {
    let (program, args) = argv.split_first().context("no command given after --")?;
    let mut cmd = if let Some(pods) = PodNamespaces::load(state_dir) {
        let Some(ns) = pods.pods.get(workload) else {
            anyhow::bail!(
                "no pod {workload:?} in this mesh; its pods: {}",
                pods.pods.keys().cloned().collect::<Vec<_>>().join(", ")
            );
        };
        let mut words = pods
            .enter
            .iter()
            .map(std::ffi::OsString::from)
            .collect::<Vec<_>>();
        words.extend(["ip", "netns", "exec", ns].map(std::ffi::OsString::from));
        words.push(program.clone());
        let mut cmd = std::process::Command::new(&words[0]);
        cmd.args(&words[1..]).args(args);
        cmd
    } else {
        let config = crate::apply::config_dir(state_dir);
        let specs = from_config(&config)?;
        let Some(spec) = specs.iter().find(|w| w.name == workload) else {
            anyhow::bail!(
                "no workload {workload:?} in {}; its workloads: {}",
                config.display(),
                specs
                    .iter()
                    .map(|w| w.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        };
        let proxy = format!("http://{}", spec.outbound());
        let mut cmd = std::process::Command::new(program);
        cmd.args(args)
            .env("http_proxy", &proxy)
            .env("HTTP_PROXY", &proxy)
            .env_remove("no_proxy")
            .env_remove("NO_PROXY");
        cmd
    };
    cmd.status()
        .with_context(|| format!("running {}", program.to_string_lossy()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment `cargo run --release -p meshctl` gives meshctl (some
    /// of it), with `extra` set (or, given as "", unset).
    fn cargo_run(extra: &[(&str, &str)]) -> BTreeMap<OsString, OsString> {
        let mut vars: BTreeMap<OsString, OsString> = [
            ("CARGO", "/opt/rust/bin/cargo"),
            ("CARGO_PKG_NAME", "meshctl"),
            ("CARGO_PKG_VERSION", "0.1.0"),
            ("CARGO_MANIFEST_DIR", "/src/mesh/meshctl"),
            ("CARGO_TARGET_DIR", "/build"),
            ("PATH", "/usr/bin"),
        ]
        .iter()
        .chain(extra)
        .map(|(k, v)| (k.into(), v.into()))
        .collect();
        vars.retain(|_, v| !v.is_empty());
        vars
    }

    #[test]
    fn cargo_run_release_builds_the_deployed_sidecar_and_nothing_else_does() {
        let release = Path::new("/src/mesh/target/release/meshctl");
        let cmd = sidecar_build(&cargo_run(&[]), release).expect("cargo run --release builds it");
        assert_eq!(cmd.get_program(), "/opt/rust/bin/cargo");
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["build-sidecar"]);
        assert_eq!(cmd.get_current_dir(), Some(Path::new("/src/mesh/meshctl")));
        // What cargo said of meshctl's package is not passed on (a build
        // script watching it would rebuild the sidecar from scratch); the
        // user's own settings, CARGO_TARGET_DIR among them, are.
        let removed: Vec<_> = cmd.get_envs().filter(|(_, v)| v.is_none()).collect();
        assert_eq!(
            removed,
            [
                (OsStr::new("CARGO_MANIFEST_DIR"), None),
                (OsStr::new("CARGO_PKG_NAME"), None),
                (OsStr::new("CARGO_PKG_VERSION"), None)
            ]
        );
        assert_eq!(
            deployed_sidecar(release).unwrap(),
            Path::new("/src/mesh/target/sidecar/mesh-proxy")
        );
        // The tests' debug meshctl, an installed one, one told which
        // sidecar to run, and a release meshctl another package's cargo
        // process started: none of them builds.
        let debug = Path::new("/src/mesh/target/debug/meshctl");
        assert!(sidecar_build(&cargo_run(&[]), debug).is_none());
        assert!(sidecar_build(&cargo_run(&[("CARGO", "")]), release).is_none());
        assert!(sidecar_build(&cargo_run(&[(PROXY_BIN_ENV, "/bin/p")]), release).is_none());
        let other = cargo_run(&[("CARGO_PKG_NAME", "mesh-tests")]);
        assert!(sidecar_build(&other, release).is_none());
        assert!(deployed_sidecar(debug).is_none());
    }

    #[test]
    fn a_release_meshctl_runs_the_deployed_sidecar_before_the_one_beside_it() {
        let target = tempfile::tempdir().unwrap();
        let (release, sidecar) = (target.path().join("release"), target.path().join("sidecar"));
        std::fs::create_dir_all(&release).unwrap();
        std::fs::create_dir_all(&sidecar).unwrap();
        let exe = release.join("meshctl");
        assert_eq!(
            find_proxy_exe(&exe),
            None,
            "no sidecar binary: meshctl runs them"
        );
        std::fs::write(release.join("mesh-proxy"), "").unwrap();
        assert_eq!(find_proxy_exe(&exe), Some(release.join("mesh-proxy")));
        std::fs::write(sidecar.join("mesh-proxy"), "").unwrap();
        assert_eq!(find_proxy_exe(&exe), Some(sidecar.join("mesh-proxy")));
    }
}
