//! The proxy's command-line flags (each with an env var), shared by the
//! `mesh-proxy` binary and `meshctl`, which runs sidecars in local mode.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use mesh_identity::SpiffeId;

use crate::{Config, Ports};

#[derive(clap::Args, Clone, Debug)]
pub struct ProxyArgs {
    /// Workload name (the WorkloadEntry's metadata.name).
    #[arg(long, env = "MESH_WORKLOAD")]
    pub workload: String,
    #[arg(long, env = "MESH_NAMESPACE", default_value = "default")]
    pub namespace: String,
    #[arg(long, env = "MESH_SERVICE_ACCOUNT", default_value = "default")]
    pub service_account: String,
    #[arg(long, env = "MESH_TRUST_DOMAIN", default_value = mesh_identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// The pod's address: listeners bind here and the app is reached here.
    #[arg(long, env = "MESH_POD_IP")]
    pub pod_ip: IpAddr,
    /// pilot: `ip:port` or `host:port` (looked up once, at start: a
    /// Kubernetes Service's cluster IP does not move), or several,
    /// comma-separated, for pilot replicas; every address a name resolves
    /// to is a replica (a headless Service).
    #[arg(long, env = "PILOT_ADDR", default_value = "127.0.0.1:15012", value_parser = resolve_all)]
    pub pilot_addr: Replicas,
    /// citadel: `ip:port` or `host:port`, looked up as pilot's is.
    #[arg(long, env = "CA_ADDR", default_value = "127.0.0.1:15011", value_parser = resolve)]
    pub ca_addr: SocketAddr,
    /// PEM file with the mesh's trusted roots.
    #[arg(long, env = "CA_ROOT_FILE")]
    pub ca_root_file: PathBuf,
    /// File holding the token that grants this workload its identity.
    #[arg(long, env = "CA_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Requested certificate lifetime in seconds (0: citadel's default).
    #[arg(long, env = "MESH_CERT_LIFETIME_SECS", default_value_t = 0)]
    pub cert_lifetime_secs: u64,
    /// Seconds in-flight requests get to finish once draining starts
    /// (SIGTERM or POST /drain on the admin port).
    #[arg(long, env = "MESH_DRAIN_GRACE_SECS", default_value_t = crate::drain::DEFAULT_GRACE.as_secs())]
    pub drain_grace_secs: u64,
    /// What captured requests to destinations outside the mesh get.
    #[arg(
        long,
        env = "MESH_OUTBOUND_TRAFFIC_POLICY",
        value_enum,
        default_value = "ALLOW_ANY"
    )]
    pub outbound_traffic_policy: crate::config::OutboundPolicy,
    /// How long a captured outbound connection to a destination of unknown
    /// protocol may stay silent before it is taken for a server-first
    /// protocol and carried as opaque TCP (`0s`: wait for the client); the
    /// same bounds the inbound port's wait for a TLS ClientHello. The mesh
    /// config's `protocolDetectionTimeout` overrides it.
    #[arg(long, env = "MESH_PROTOCOL_DETECTION_TIMEOUT", default_value = "100ms", value_parser = humantime::parse_duration)]
    pub protocol_detection_timeout: Duration,
    /// The pod's traffic is captured by iptables (mesh-iptables): bind every
    /// address and reach the app on 127.0.0.1.
    #[arg(long, env = "MESH_CAPTURE")]
    pub capture: bool,
    /// Mark every socket the proxy opens with this value (SO_MARK; needs
    /// CAP_NET_ADMIN), to match `mesh-iptables --proxy-mark` where the
    /// proxy cannot run as its own UID.
    #[arg(long, env = "MESH_PROXY_MARK")]
    pub proxy_mark: Option<u32>,
    /// Threads serving connections. One (the default) runs everything on a
    /// single thread, with no cross-thread wake-ups: a sidecar serves one
    /// pod. With more, accepted connections are dealt to the threads in
    /// turn, and each thread serves its connections to the end with
    /// connections of its own to other sidecars and to the app: they share
    /// config, certificates and metrics, never a connection. 0: one thread
    /// per CPU the process may use (its affinity and cgroup CPU quota), as
    /// Istio's `concurrency: 0`.
    #[arg(long, env = "MESH_PROXY_THREADS", default_value_t = DEFAULT_THREADS)]
    pub threads: usize,
    /// At most this many I/O events (sockets become readable or writable)
    /// taken from the kernel each time the runtime polls, before it runs
    /// the tasks they woke. Small batches keep a loaded sidecar's stages
    /// overlapping: a response goes out on the connection to the peer
    /// sidecar as soon as a few are ready, not once every ready app
    /// connection has been read.
    #[arg(long, env = "MESH_IO_EVENTS_PER_TICK", default_value_t = DEFAULT_IO_EVENTS_PER_TICK,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub io_events_per_tick: u16,
    /// Retries to a destination may add at most this percentage of its
    /// requests (over a 10 s window), beyond the floor below.
    #[arg(long, env = "MESH_RETRY_BUDGET_PERCENT", default_value_t = 20.0)]
    pub retry_budget_percent: f64,
    /// Retries to a destination always allowed per second.
    #[arg(long, env = "MESH_RETRY_BUDGET_MIN_PER_SEC", default_value_t = 10)]
    pub retry_budget_min_per_sec: u32,
    /// Request bodies up to this size are kept for retries and mirrors;
    /// larger ones stream once and are not retried.
    #[arg(long, env = "MESH_RETRY_BUFFER_BYTES", default_value_t = crate::replay::DEFAULT_LIMIT)]
    pub retry_buffer_bytes: usize,
    /// The app's probes the injector moved onto the agent port (JSON, as
    /// `mesh_proto::probers` describes).
    #[arg(long, env = mesh_proto::probers::ENV, value_parser = parse_probers)]
    pub app_probers: Option<mesh_proto::probers::Probers>,
    /// Where access logs go, when a Telemetry resource turns them on
    /// (default: stdout).
    #[arg(long, env = "MESH_ACCESS_LOG_FILE")]
    pub access_log_file: Option<PathBuf>,
    /// Where the app serves its own Prometheus metrics (JSON
    /// `{"port":..,"path":..}`, written by the injector from the pod's
    /// prometheus.io annotations): merged into the agent port's
    /// `/stats/prometheus`.
    #[arg(long, env = mesh_proto::app_metrics::ENV, value_parser = parse_app_metrics)]
    pub app_metrics: Option<mesh_proto::app_metrics::AppMetrics>,
}

pub const DEFAULT_THREADS: usize = 1;

/// `--threads`: as given, or for 0 one per CPU the process may use
/// (`available_parallelism` reads its affinity mask and cgroup quota).
fn serving_threads(asked: usize) -> usize {
    match asked {
        0 => std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
        n => n,
    }
}

/// See [`ProxyArgs::io_events_per_tick`]. Held sidecar pair, wrk over 64
/// connections, 5 s runs alternating with nginx_l4's pair: the mesh served
/// ~0.80 of nginx_l4's rate with tokio's default (1,024), ~0.85 with 16,
/// ~0.97 with 8, ~0.91 with 4 and ~0.90 with 2 (the two cores idle ~24 %
/// with 1,024, ~15 % with 8).
pub const DEFAULT_IO_EVENTS_PER_TICK: u16 = 8;

fn parse_app_metrics(s: &str) -> Result<mesh_proto::app_metrics::AppMetrics, String> {
    serde_json::from_str(s).map_err(|e| format!("not the injector's app-metrics JSON: {e}"))
}

fn parse_probers(s: &str) -> Result<mesh_proto::probers::Probers, String> {
    serde_json::from_str(s).map_err(|e| format!("not the injector's probe JSON: {e}"))
}

/// Addresses of pilot's replicas, in the order to try them.
#[derive(Clone, Debug)]
pub struct Replicas(pub Vec<SocketAddr>);

impl From<SocketAddr> for Replicas {
    fn from(a: SocketAddr) -> Self {
        Self(vec![a])
    }
}

/// As `--pilot-addr` takes them: comma-separated.
impl std::fmt::Display for Replicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let all: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&all.join(","))
    }
}

/// Comma-separated addresses or names, each name standing for every
/// address it resolves to.
fn resolve_all(s: &str) -> Result<Replicas, String> {
    let mut all = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Ok(addr) = part.parse() {
            all.push(addr);
            continue;
        }
        use std::net::ToSocketAddrs;
        let found: Vec<SocketAddr> = part
            .to_socket_addrs()
            .map_err(|e| format!("{part} is not ip:port, and looking it up failed: {e}"))?
            .collect();
        if found.is_empty() {
            return Err(format!("{part} resolves to no address"));
        }
        all.extend(found);
    }
    if all.is_empty() {
        return Err("no pilot address given".into());
    }
    Ok(Replicas(all))
}

/// A socket address, or a name and port looked up through the system's
/// resolver (the first address it gives).
fn resolve(s: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = s.parse() {
        return Ok(addr);
    }
    use std::net::ToSocketAddrs;
    match s.to_socket_addrs() {
        Ok(mut addrs) => addrs
            .next()
            .ok_or_else(|| format!("{s} resolves to no address")),
        Err(e) => Err(format!("{s} is not ip:port, and looking it up failed: {e}")),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("reading {flag} {}: {source}", path.display())]
pub struct ArgsError {
    flag: &'static str,
    path: PathBuf,
    source: std::io::Error,
}

impl ProxyArgs {
    pub fn into_config(self) -> Result<Config, ArgsError> {
        let read = |path: &PathBuf, flag| {
            std::fs::read_to_string(path).map_err(|source| ArgsError {
                flag,
                path: path.clone(),
                source,
            })
        };
        Ok(Config {
            proxy_id: format!("{}.{}", self.workload, self.namespace),
            identity: SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account),
            pod_ip: self.pod_ip,
            pilot_addr: self.pilot_addr.0[0],
            pilot_replicas: self.pilot_addr.0[1..].to_vec(),
            ca_addr: self.ca_addr,
            ca_token: read(&self.token_file, "--token-file")?.trim().to_string(),
            roots_pem: read(&self.ca_root_file, "--ca-root-file")?,
            cert_lifetime: Duration::from_secs(self.cert_lifetime_secs),
            drain_grace: Duration::from_secs(self.drain_grace_secs),
            outbound_policy: self.outbound_traffic_policy,
            protocol_detection_timeout: self.protocol_detection_timeout,
            capture: self.capture,
            socket_mark: self.proxy_mark,
            ports: Ports::default(),
            retry_budget: crate::budget::BudgetConfig {
                ratio: (self.retry_budget_percent / 100.0).max(0.0),
                min_per_sec: self.retry_budget_min_per_sec,
            },
            retry_buffer_bytes: self.retry_buffer_bytes,
            app_probers: self.app_probers.unwrap_or_default(),
            access_log_file: self.access_log_file,
            app_metrics: self.app_metrics,
            threads: serving_threads(self.threads),
            io_events_per_tick: self.io_events_per_tick,
        })
    }
}

/// Runs a proxy process to completion, stopping on SIGTERM or Ctrl-C: on a
/// single-threaded runtime, with `args.threads - 1` more serving threads. Every binary that runs a
/// sidecar calls this. `settled` is called each time the proxy has been
/// ready for [`crate::SETTLE`] with no new certificate or config.
pub fn run_process(args: ProxyArgs, settled: fn()) -> Result<(), Box<dyn std::error::Error>> {
    let cfg = args.into_config()?;
    let rt = crate::server::runtime(&cfg)?;
    rt.block_on(crate::run_settled(cfg, shutdown_signal(), settled))?;
    Ok(())
}

/// Polls the readiness endpoint at `health` until it answers 200; an
/// error once `timeout` passed, naming the last answer.
pub fn wait_ready(health: SocketAddr, timeout: Duration) -> Result<(), String> {
    use std::io::{Read, Write};
    let deadline = std::time::Instant::now() + timeout;
    let mut last;
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut tcp = std::net::TcpStream::connect_timeout(&health, Duration::from_secs(1))?;
            tcp.set_read_timeout(Some(Duration::from_secs(2)))?;
            write!(
                tcp,
                "GET /healthz/ready HTTP/1.1\r\nHost: {health}\r\nConnection: close\r\n\r\n"
            )?;
            let mut answer = String::new();
            tcp.read_to_string(&mut answer)?;
            Ok(answer)
        })();
        match attempt {
            Ok(a) if a.starts_with("HTTP/1.1 200") => {
                eprintln!("proxy ready");
                return Ok(());
            }
            Ok(a) => last = a.lines().last().unwrap_or_default().to_string(),
            Err(e) => last = e.to_string(),
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "the proxy was not ready within {}: {last}",
                humantime::format_duration(timeout)
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Resolves on SIGTERM or Ctrl-C: the one drain trigger of a proxy process.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_plane_addresses_may_be_names() {
        assert_eq!(
            super::resolve("10.0.0.7:15012").unwrap().to_string(),
            "10.0.0.7:15012"
        );
        let local = super::resolve("localhost:15011").unwrap();
        assert!(local.ip().is_loopback() && local.port() == 15011, "{local}");
        let err = super::resolve("no-such-host.invalid:15012").unwrap_err();
        assert!(
            err.starts_with("no-such-host.invalid:15012 is not ip:port"),
            "{err}"
        );
    }

    #[test]
    fn io_events_per_tick_defaults_to_a_small_batch_and_is_never_zero() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            proxy: super::ProxyArgs,
        }
        let parse = |extra: &[&str]| {
            let required = [
                "mesh-proxy",
                "--workload=w",
                "--pod-ip=127.0.0.1",
                "--ca-root-file=roots.pem",
                "--token-file=token",
            ];
            Cli::try_parse_from(required.iter().chain(extra))
        };
        let args = parse(&[]).unwrap().proxy;
        assert_eq!(args.io_events_per_tick, 8);
        let args = parse(&["--io-events-per-tick", "64"]).unwrap().proxy;
        assert_eq!(args.io_events_per_tick, 64);
        let err = parse(&["--io-events-per-tick", "0"])
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("--io-events-per-tick"), "{err}");
    }

    #[test]
    fn zero_threads_means_one_per_cpu_the_proxy_may_use() {
        use nix::sched::{CpuSet, sched_setaffinity};
        // Each on a thread of its own, confined as a container pinned to
        // those cores would be: `--threads 0` serves on one thread each.
        let me = nix::unistd::Pid::from_raw(0);
        let allowed = nix::sched::sched_getaffinity(me).unwrap();
        let allowed: Vec<usize> = (0..CpuSet::count())
            .filter(|&c| allowed.is_set(c).unwrap())
            .collect();
        let confined = |cpus: Vec<usize>| {
            std::thread::spawn(move || {
                let mut set = CpuSet::new();
                for cpu in cpus {
                    set.set(cpu).unwrap();
                }
                sched_setaffinity(me, &set).unwrap();
                (super::serving_threads(0), super::serving_threads(3))
            })
            .join()
            .unwrap()
        };
        assert_eq!(confined(allowed[..1].to_vec()), (1, 3));
        // Two, unless a CPU quota (cgroup) allows this process fewer.
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        if cpus >= 2 {
            assert_eq!(confined(allowed[..2].to_vec()), (2, 3));
        } else {
            eprintln!("two-CPU case skipped: this process may use {cpus} CPU");
        }
    }

    #[test]
    fn pilot_replicas_are_listed_with_commas() {
        let r = super::resolve_all("10.0.0.7:15012, 10.0.0.8:15012").unwrap();
        assert_eq!(r.to_string(), "10.0.0.7:15012,10.0.0.8:15012");
        assert!(super::resolve_all(" , ").is_err());
        let err = super::resolve_all("10.0.0.7:15012,no-such-host.invalid:1").unwrap_err();
        assert!(
            err.starts_with("no-such-host.invalid:1 is not ip:port"),
            "{err}"
        );
    }
}
