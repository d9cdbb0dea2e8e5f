//! `meshctl demo`: the whole mesh on this machine in one command.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::controlplane::ControlPlane;
use crate::traffic;
use crate::workloads::{self, Launcher, WorkloadSpec};

/// The workload requests are sent from (it has a sidecar but no service).
pub const CLIENT_WORKLOAD: &str = "client";
pub const DEFAULT_CONTROL_PLANE_IP: &str = "127.0.10.254";
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Options {
    pub requests: Option<usize>,
    pub config_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub control_plane_ip: IpAddr,
    /// Pods as network namespaces with iptables capture (root).
    pub transparent: bool,
    /// Lifetime of every certificate (default: citadel's 24 h).
    pub cert_ttl: Option<Duration>,
    /// Send requests continuously for this long, then exit as with
    /// `requests`.
    pub duration: Option<Duration>,
    /// Start Debian's Prometheus with the run directory's prometheus.yml.
    pub prometheus: bool,
}

/// Where `--prometheus` serves, on the control plane's address.
pub const PROMETHEUS_PORT: u16 = 9090;

/// Loops sending requests at once in `--duration` mode.
const DURATION_CONCURRENCY: usize = 4;

/// Writes the sample's embedded config to `dir`, each file through `place`
/// (which may move its workloads' addresses).
pub fn write_sample_config(dir: &std::path::Path, place: fn(&str) -> String) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in mesh_samples::CONFIG {
        std::fs::write(dir.join(name), place(text))?;
    }
    Ok(())
}

/// The demo's state directory (`--state-dir`, or a fresh temporary one
/// removed when the returned guard drops) and config directory
/// (`--config`, or the sample written through `place`).
fn directories(
    opts: &Options,
    place: fn(&str) -> String,
) -> anyhow::Result<(Option<tempfile::TempDir>, PathBuf, PathBuf)> {
    let temp = match &opts.state_dir {
        Some(_) => None,
        None => Some(tempfile::Builder::new().prefix("mesh-demo-").tempdir()?),
    };
    let state_dir = match (&opts.state_dir, &temp) {
        (Some(d), _) => d.clone(),
        (None, Some(t)) => t.path().to_path_buf(),
        (None, None) => unreachable!("a temporary directory is made when none is given"),
    };
    let config_dir = match &opts.config_dir {
        Some(d) => d.clone(),
        None => {
            let d = state_dir.join("config");
            write_sample_config(&d, place)?;
            d
        }
    };
    // `meshctl apply`, `delete` and `exec` find the running mesh from here.
    let config_dir = std::path::absolute(&config_dir)?;
    std::fs::write(
        state_dir.join(crate::apply::CONFIG_POINTER),
        config_dir.to_string_lossy().as_bytes(),
    )?;
    Ok((temp, state_dir, config_dir))
}

/// Resident memory of a process, from /proc.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Under `cargo run --release`, builds the sidecar as deployed (a no-op
/// when it is current), so that the demo runs the binary the mesh ships
/// rather than a stale one or `meshctl` itself. A failed build is reported
/// and the demo goes on with what there is. Blocks until cargo is done.
fn build_sidecar() {
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let env = std::env::vars_os().collect();
    let Some(mut cargo) = workloads::sidecar_build(&env, &exe) else {
        return;
    };
    println!("building the sidecar as deployed: cargo build-sidecar (minutes the first time)");
    match cargo.status() {
        Ok(s) if s.success() => {}
        Ok(s) => eprintln!("cargo build-sidecar failed ({s}); going on without it"),
        Err(e) => eprintln!("cannot run cargo build-sidecar ({e}); going on without it"),
    }
}

/// Runs the demo; returns whether it succeeded (always true without --requests).
pub async fn run(opts: Options) -> anyhow::Result<bool> {
    if opts.transparent && (opts.cert_ttl.is_some() || opts.duration.is_some()) {
        anyhow::bail!("--cert-ttl and --duration do not work with --transparent yet");
    }
    if opts.transparent {
        return tokio::task::spawn_blocking(move || transparent(opts)).await?;
    }
    tokio::task::spawn_blocking(build_sidecar).await?;
    let started = Instant::now();
    let (_temp, state_dir, config_dir) = directories(&opts, str::to_string)?;
    let log_dir = state_dir.join("logs");
    std::fs::create_dir_all(&log_dir)?;
    println!(
        "run directory (logs, state, config, prometheus.yml; `meshctl ca --state-dir`): {}",
        state_dir.display()
    );
    let specs = workloads::from_config(&config_dir)
        .with_context(|| format!("reading workloads from {}", config_dir.display()))?;
    println!(
        "starting the control plane on {} (citadel :{}, pilot :{})",
        opts.control_plane_ip,
        mesh_proto::ports::CA,
        mesh_proto::ports::XDS
    );
    let lifetime = opts.cert_ttl.unwrap_or(mesh_citadel::DEFAULT_LIFETIME);
    let cp =
        ControlPlane::start_with_lifetime(&state_dir, &config_dir, opts.control_plane_ip, lifetime)
            .await?;
    let prometheus = prometheus(
        &opts,
        &specs,
        cp.pilot_debug_addr,
        &state_dir,
        &log_dir,
        opts.control_plane_ip,
    )
    .await?;
    if opts.cert_ttl.is_some() {
        println!("certificates live {lifetime:?}; each workload renews at about half that");
    }
    println!("starting {} workloads, each with its sidecar", specs.len());
    let exe = std::env::current_exe().context("finding meshctl's own path")?;
    let proxy_exe = workloads::find_proxy_exe(&exe);
    if let Some(p) = &proxy_exe {
        println!("sidecars run {}", p.display());
    }
    let launcher = Launcher::Processes {
        exe,
        proxy_exe,
        log_dir: log_dir.clone(),
    };
    let pods = workloads::launch(&cp, &specs, &launcher, &state_dir).await?;
    let ready = workloads::wait_ready(&specs, READY_TIMEOUT, |w, done, total| {
        println!("  [{done}/{total}] {:<16} ready on {}", w.name, w.address);
    })
    .await;
    let result = match ready {
        Ok(()) => {
            println!("mesh ready in {:.2}s", started.elapsed().as_secs_f64());
            print_endpoints(&cp, &specs, &config_dir, &log_dir);
            print_workflow(&state_dir);
            for (name, pid) in pods
                .sidecar_pids()
                .iter()
                .filter(|(n, _)| n == "productpage-v1")
            {
                // Idle means settled: ready for `SETTLE` with nothing new,
                // a sidecar hands back the code that start-up ran.
                tokio::time::sleep(mesh_proxy::SETTLE + Duration::from_secs(1)).await;
                if let Some(kib) = rss_kib(*pid) {
                    println!(
                        "idle sidecar RSS ({name}, pid {pid}): {:.1} MiB",
                        kib as f64 / 1024.0
                    );
                }
            }
            match (opts.requests, opts.duration) {
                (Some(n), _) => send(&cp, &specs, Load::Requests(n)).await,
                (None, Some(d)) => send(&cp, &specs, Load::For(d)).await,
                (None, None) => {
                    println!("\nrunning; press Ctrl-C to stop");
                    let _ = tokio::signal::ctrl_c().await;
                    Ok(true)
                }
            }
        }
        Err(e) => Err(e.context(format!("see the logs in {}", log_dir.display()))),
    };
    println!("stopping the mesh");
    if let Some(p) = prometheus {
        p.stop().await;
    }
    pods.stop().await;
    cp.stop().await;
    result
}

/// Writes `state_dir/prometheus.yml`, naming every sidecar's merged
/// metrics and pilot's; with `--prometheus`, starts Debian's Prometheus
/// with it on `ip`, when that is installed.
async fn prometheus(
    opts: &Options,
    specs: &[WorkloadSpec],
    pilot: std::net::SocketAddr,
    state_dir: &std::path::Path,
    log_dir: &std::path::Path,
    ip: IpAddr,
) -> anyhow::Result<Option<crate::prometheus::Prometheus>> {
    let scrape = crate::prometheus::scrape_config(specs, pilot, Duration::from_secs(5));
    let scrape_file = state_dir.join("prometheus.yml");
    std::fs::write(&scrape_file, scrape)
        .with_context(|| format!("writing {}", scrape_file.display()))?;
    let bin = match (opts.prometheus, crate::prometheus::find()) {
        (false, _) => return Ok(None),
        (true, None) => {
            println!(
                "Prometheus is not installed (apt-get install prometheus); {} is written for one you run yourself",
                scrape_file.display()
            );
            return Ok(None);
        }
        (true, Some(bin)) => bin,
    };
    let listen = std::net::SocketAddr::new(ip, PROMETHEUS_PORT);
    let p = crate::prometheus::Prometheus::start(
        &bin,
        &scrape_file,
        &state_dir.join("prometheus"),
        listen,
        &log_dir.join("prometheus.log"),
    )
    .await?;
    println!("Prometheus: http://{listen} (scraping every sidecar and pilot every 5s)");
    Ok(Some(p))
}

enum Load {
    Requests(usize),
    For(Duration),
}

async fn send(cp: &ControlPlane, specs: &[WorkloadSpec], load: Load) -> anyhow::Result<bool> {
    let client = specs
        .iter()
        .find(|w| w.name == CLIENT_WORKLOAD)
        .with_context(|| {
            format!("the config has no '{CLIENT_WORKLOAD}' WorkloadEntry to send requests from")
        })?;
    let identity = mesh_identity::SpiffeId::new(
        cp.citadel.trust_domain(),
        &client.namespace,
        &client.service_account,
    );
    let issued_before: u64 = cp.citadel.authority().issued().values().sum();
    let summary = match load {
        Load::Requests(n) => {
            println!(
                "\nsending {n} requests to productpage through {}'s sidecar",
                client.name
            );
            traffic::run(client.outbound(), &identity.to_string(), n).await?
        }
        Load::For(d) => {
            println!(
                "\nsending requests to productpage through {}'s sidecar for {d:?} ({DURATION_CONCURRENCY} at a time)",
                client.name
            );
            traffic::run_for(
                client.outbound(),
                &identity.to_string(),
                d,
                DURATION_CONCURRENCY,
            )
            .await?
        }
    };
    summary.print();
    let issued: u64 = cp.citadel.authority().issued().values().sum::<u64>() - issued_before;
    println!(
        "certificates issued while requests ran: {issued} ({:.1} per workload and control-plane server)",
        issued as f64 / (specs.len() + 2) as f64
    );
    Ok(summary.failed == 0 && summary.ok > 0)
}

/// How to change the running mesh and run commands in it, Istio's task
/// guides' `kubectl apply` and `kubectl exec` in local form.
fn print_workflow(state_dir: &std::path::Path) {
    println!(
        "\nIstio's task guides on this mesh (in another shell):\n  export MESH_STATE_DIR={}\n  meshctl apply -f virtual-service-reviews-v3.yaml\n  meshctl exec sleep -- curl -s http://reviews:9080/reviews/0",
        state_dir.display()
    );
}

fn print_endpoints(
    cp: &ControlPlane,
    specs: &[WorkloadSpec],
    config_dir: &std::path::Path,
    log_dir: &std::path::Path,
) {
    println!();
    if let Some(client) = specs.iter().find(|w| w.name == CLIENT_WORKLOAD) {
        println!("productpage, through the mesh:");
        println!(
            "  curl -x http://{} http://productpage:{}/productpage",
            client.outbound(),
            mesh_samples::PORT
        );
    }
    println!(
        "config (edit it; pilot pushes changes within a second): {}",
        config_dir.display()
    );
    println!("logs: {}", log_dir.display());
    println!("citadel {}  pilot {}", cp.ca_addr, cp.pilot_addr);
    println!(
        "{:<16} {:<12} {:<30} identity",
        "workload", "address", "admin"
    );
    for w in specs {
        println!(
            "{:<16} {:<12} http://{:<23} spiffe://{}/ns/{}/sa/{}",
            w.name,
            w.address.to_string(),
            w.admin(),
            cp.citadel.trust_domain(),
            w.namespace,
            w.service_account
        );
    }
}

/// `demo --transparent`: each workload in its own pod (a network namespace
/// on a node bridge) with real iptables capture; sidecars as UID 1337; apps
/// unaware of the mesh; requests made by curl in the client pod.
fn transparent(opts: Options) -> anyhow::Result<bool> {
    use crate::pods::{self, Node, PodMesh};
    if !nix::unistd::Uid::effective().is_root() && !pods::rootless() {
        // A normal user: the same demo inside user, network and mount
        // namespaces of its own.
        if let Some(why) = pods::rootless_skip_reason() {
            anyhow::bail!("--transparent without root {why}");
        }
        // Built here, once: the run in the user namespace finds it.
        build_sidecar();
        println!("not root: running the pods inside a user namespace of their own");
        return Ok(pods::reexec_rootless(std::env::args_os().skip(1))?.success());
    }
    if let Some(why) = pods::skip_reason() {
        anyhow::bail!(
            "--transparent {why}: run it as root, with iproute2, iptables, setpriv (util-linux) and curl installed"
        );
    }
    if !pods::rootless() {
        build_sidecar();
    }
    let started = Instant::now();
    let (_temp, state_dir, config_dir) = directories(&opts, pods::pod_config)?;
    println!(
        "run directory (logs, state, config, prometheus.yml): {}",
        state_dir.display()
    );
    let exe = std::env::current_exe().context("finding meshctl's own path")?;
    let proxy_exe = workloads::find_proxy_exe(&exe);
    let node = Node::new()?;
    let ns = node.namespace();
    std::thread::spawn(move || -> anyhow::Result<bool> {
        pods::enter(&ns)?;
        tokio::runtime::Runtime::new()?.block_on(async move {
            println!(
                "starting the control plane on {} in the node namespace {ns}",
                pods::NODE_IP
            );
            let mesh =
                PodMesh::start(node, &state_dir, &config_dir, &exe, proxy_exe.as_deref()).await?;
            let prometheus = prometheus(
                &opts,
                &mesh.specs,
                mesh.cp.pilot_debug_addr,
                &state_dir,
                &mesh.logs,
                IpAddr::V4(pods::NODE_IP),
            )
            .await;
            let prometheus = match prometheus {
                Ok(p) => p,
                Err(e) => {
                    mesh.stop().await;
                    return Err(e);
                }
            };
            println!(
                "starting {} pods, each with its traffic captured and its sidecar {}",
                mesh.specs.len(),
                if pods::rootless() {
                    format!("marking its sockets {:#x}", pods::PROXY_MARK)
                } else {
                    "as UID 1337".to_string()
                }
            );
            let ready = mesh
                .wait_ready(READY_TIMEOUT, |w, done, total| {
                    println!(
                        "  [{done}/{total}] {:<16} ready in pod {}",
                        w.name, w.address
                    );
                })
                .await;
            let result = match ready {
                Err(e) => Err(e),
                Ok(()) => {
                    println!("mesh ready in {:.2}s", started.elapsed().as_secs_f64());
                    let client = mesh.node.pod_namespace(CLIENT_WORKLOAD);
                    let entered = if pods::rootless() {
                        crate::workloads::PodNamespaces::rootless(std::process::id())
                    } else {
                        crate::workloads::PodNamespaces::default()
                    };
                    entered
                        .with(mesh.specs.iter().map(|w| (w.name.clone(), mesh.node.pod_namespace(&w.name))))
                        .save(&state_dir)?;
                    println!(
                        "\nproductpage, from the client pod (the app needs no proxy settings):"
                    );
                    let enter = if pods::rootless() {
                        // The pods live in this process's own namespaces.
                        format!(
                            "nsenter --target {} --user --mount --net --preserve-credentials",
                            std::process::id()
                        )
                    } else {
                        "sudo".to_string()
                    };
                    println!(
                        "  {enter} ip netns exec {client} {}",
                        mesh.productpage_curl(&[]).join(" ")
                    );
                    println!(
                        "config: {}\nlogs: {}",
                        config_dir.display(),
                        mesh.logs.display()
                    );
                    print_workflow(&state_dir);
                    if let Some(p) = &prometheus {
                        println!(
                            "Prometheus, in the node namespace:\n  {enter} ip netns exec {} curl -s 'http://{}/api/v1/query?query=istio_requests_total'",
                            mesh.node.namespace(),
                            p.addr
                        );
                    }
                    match opts.requests {
                        Some(n) => Ok(send_from_pod(&mesh, n).await),
                        None => {
                            println!("\nrunning; press Ctrl-C to stop");
                            let _ = tokio::signal::ctrl_c().await;
                            Ok(true)
                        }
                    }
                }
            };
            println!("stopping the mesh");
            if let Some(p) = prometheus {
                p.stop().await;
            }
            mesh.stop().await;
            result
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the transparent demo's thread panicked"))?
}

/// N verified requests by curl in the client pod; prints the summary.
async fn send_from_pod(mesh: &crate::pods::PodMesh, n: usize) -> bool {
    println!("\nsending {n} requests to productpage with curl in the client pod");
    // The apps may still be starting behind their ready sidecars.
    let warm = Instant::now() + Duration::from_secs(10);
    while mesh.request(&[]).is_err() && Instant::now() < warm {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut s = traffic::Summary::default();
    let start = Instant::now();
    for _ in 0..n {
        s.record(mesh.request(&[]));
    }
    s.elapsed = start.elapsed();
    s.print();
    s.failed == 0 && s.ok == n
}
