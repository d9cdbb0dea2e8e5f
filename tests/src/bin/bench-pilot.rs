//! bench-pilot: pilot at scale. A generated mesh (by default 1,000
//! services in 50 namespaces, 10,000 endpoints) and 2,000 simulated
//! proxies: real delta-xDS clients over gRPC and mutual TLS, one connection
//! each, all in this process. pilot is the `mesh-pilot` binary, run as its
//! own process so that its memory and CPU are its own; citadel runs in this
//! process and signs pilot's and the proxies' certificates.
//!
//! Each run measures:
//! - the initial sync: from pilot's start until every proxy holds all four
//!   types (listener, clusters, endpoints, routes);
//! - single endpoint changes (a WorkloadEntry's address rewritten on disk):
//!   the time until each proxy that sees the service holds the new address;
//! - a sustained stream of endpoint changes (100/s by default): whether
//!   every change reaches every proxy that sees it, and how late;
//! - pilot's peak RSS (VmHWM) and its CPU while nothing changes.
//!
//! Two runs: `scoped` (a mesh-wide Sidecar limits each proxy to its own
//! namespace plus one shared namespace, as Istio's scale figures assume)
//! and `unscoped` (every proxy sees every service). Prints a table, then
//! one JSON object on its last line.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use mesh_identity::SpiffeId;
use mesh_proto::core::Node;
use mesh_proto::discovery::DeltaDiscoveryRequest;
use mesh_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use mesh_proto::{resources as pb, type_url};
use mesh_tests::bench::{self, Children, percentile};
use prost::Message;

#[derive(Parser, Clone)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    services: usize,
    #[arg(long, default_value_t = 50)]
    namespaces: usize,
    #[arg(long, default_value_t = 10_000)]
    endpoints: usize,
    #[arg(long, default_value_t = 2000)]
    proxies: usize,
    /// Endpoint changes per second in the sustained phase.
    #[arg(long, default_value_t = 100)]
    changes_per_s: usize,
    /// How long the sustained phase lasts.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    sustained: Duration,
    /// Single changes, one at a time.
    #[arg(long, default_value_t = 20)]
    single_changes: usize,
    /// A small mesh (200 services, 2,000 endpoints, 400 proxies) and short
    /// phases, to check the harness.
    #[arg(long)]
    quick: bool,
    /// Only the scoped run.
    #[arg(long)]
    scoped_only: bool,
    /// Keep the generated config, certificates and pilot's logs here
    /// (default: a temporary directory, removed at exit).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

const TRUST_DOMAIN: &str = "cluster.local";
const SHARED_NS: &str = "ns-0";
/// Targets on a 2-core machine (the scoped case).
const TARGET_SYNC_S: f64 = 10.0;
const TARGET_CHANGE_P99_S: f64 = 1.0;
const TARGET_RSS_MB: f64 = 150.0;
const TARGET_IDLE_CORES: f64 = 0.1;

/// The generated mesh: which namespace each endpoint is in and its
/// current address; the first `proxies` endpoints' workloads run proxies.
struct Mesh {
    args: Args,
    dir: PathBuf,
    addresses: Vec<String>,
    /// Changes made so far (each gets a distinct marker address).
    changes: usize,
}

impl Mesh {
    fn services_per_ns(&self) -> usize {
        self.args.services / self.args.namespaces
    }
    fn endpoints_per_ns(&self) -> usize {
        self.args.endpoints / self.args.namespaces
    }
    fn ns_of(&self, endpoint: usize) -> usize {
        endpoint / self.endpoints_per_ns()
    }
    /// Endpoint `n` belongs to this service of its namespace.
    fn service_of(&self, endpoint: usize) -> usize {
        endpoint % self.services_per_ns()
    }
    /// Proxies are spread evenly: the first endpoints of each namespace.
    fn is_proxy(&self, endpoint: usize) -> bool {
        endpoint % self.endpoints_per_ns() < self.args.proxies / self.args.namespaces
    }
    fn proxy_ids(&self) -> Vec<(String, usize)> {
        (0..self.args.endpoints)
            .filter(|n| self.is_proxy(*n))
            .map(|n| (format!("we-{n}.ns-{}", self.ns_of(n)), self.ns_of(n)))
            .collect()
    }

    fn new(args: &Args, dir: &Path, scoped: bool) -> anyhow::Result<Self> {
        let addresses = (0..args.endpoints)
            .map(|n| format!("127.1.{}.{}", n / 250, n % 250 + 1))
            .collect();
        let mesh = Self {
            args: args.clone(),
            dir: dir.to_path_buf(),
            addresses,
            changes: 0,
        };
        std::fs::create_dir_all(dir)?;
        for ns in 0..args.namespaces {
            let mut text = String::new();
            for s in 0..mesh.services_per_ns() {
                text.push_str(&format!(
                    "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc-{s}, namespace: ns-{ns}}}\nspec:\n  hosts: [svc-{s}.ns-{ns}.svc.cluster.local]\n  ports: [{{number: 80, name: http}}]\n  workloadSelector: {{labels: {{app: svc-{s}}}}}\n"
                ));
            }
            std::fs::write(dir.join(format!("ns-{ns}-services.yaml")), text)?;
            mesh.write_workloads(ns)?;
        }
        if scoped {
            std::fs::write(
                dir.join("sidecar.yaml"),
                format!(
                    "apiVersion: networking.istio.io/v1\nkind: Sidecar\nmetadata: {{name: default, namespace: istio-system}}\nspec:\n  egress:\n  - hosts: [\"./*\", \"{SHARED_NS}/*\"]\n"
                ),
            )?;
        }
        Ok(mesh)
    }

    fn write_workloads(&self, ns: usize) -> anyhow::Result<()> {
        let per = self.endpoints_per_ns();
        let mut text = String::new();
        for n in ns * per..(ns + 1) * per {
            text.push_str(&format!(
                "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata: {{name: we-{n}, namespace: ns-{ns}}}\nspec: {{address: \"{}\", labels: {{app: svc-{}}}, serviceAccount: sa-{ns}}}\n",
                self.addresses[n],
                self.service_of(n)
            ));
        }
        bench_write(&self.dir.join(format!("ns-{ns}-workloads.yaml")), &text)
    }

    /// Moves one endpoint (not a proxy's) outside the shared namespace to
    /// a new address, distinct from every earlier one; returns the
    /// address and the namespace.
    fn change(&mut self) -> anyhow::Result<(String, usize)> {
        let per = self.endpoints_per_ns();
        let candidates: Vec<usize> = (per..self.args.endpoints)
            .filter(|n| !self.is_proxy(*n))
            .collect();
        let n = candidates[(self.changes * 7919) % candidates.len()];
        let c = self.changes;
        self.changes += 1;
        let marker = format!("127.251.{}.{}", c / 250, c % 250 + 1);
        self.addresses[n] = marker.clone();
        let ns = self.ns_of(n);
        self.write_workloads(ns)?;
        Ok((marker, ns))
    }
}

/// Writes aside and renames, as an editor or a ConfigMap update does.
fn bench_write(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// What the simulated proxies report.
#[derive(Default)]
struct Seen {
    synced: AtomicUsize,
    sync_done: Mutex<Option<Instant>>,
    /// Marker address -> (namespace of each proxy that got it, when).
    markers: Mutex<HashMap<String, Vec<Instant>>>,
    bytes: AtomicUsize,
    /// Streams that failed (and were opened again).
    errors: AtomicUsize,
}

/// One simulated proxy: subscribes to the four types, ACKs every
/// response, and notes when all four first arrived and when each marker
/// address first appears among its endpoints.
async fn proxy(id: String, channel: tonic::transport::Channel, seen: Arc<Seen>, total: usize) {
    let mut types = std::collections::HashSet::new();
    let mut markers = std::collections::HashSet::new();
    let mut backoff =
        mesh_identity::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    // As a real proxy does: when the stream fails, reconnect with jittered backoff.
    loop {
        if let Err(e) = subscribe(&id, &channel, &seen, total, &mut types, &mut markers).await {
            seen.errors.fetch_add(1, Ordering::Relaxed);
            note_failure(&id, &e);
        }
        tokio::time::sleep(backoff.next_wait()).await;
    }
}

/// Only the first few failures are printed; the count is in the table.
fn note_failure(id: &str, e: &tonic::Status) {
    static PRINTED: AtomicUsize = AtomicUsize::new(0);
    if PRINTED.fetch_add(1, Ordering::Relaxed) < 3 {
        eprintln!("{id}: {e} (reconnecting)");
    }
}

/// One xDS stream: subscribe to every type, note what arrives, ACK it.
async fn subscribe(
    id: &str,
    channel: &tonic::transport::Channel,
    seen: &Seen,
    total: usize,
    types: &mut std::collections::HashSet<String>,
    markers: &mut std::collections::HashSet<String>,
) -> Result<(), tonic::Status> {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for (i, t) in type_url::ALL.iter().enumerate() {
        let req = DeltaDiscoveryRequest {
            node: (i == 0).then(|| Node {
                id: id.to_string(),
                ..Default::default()
            }),
            type_url: t.to_string(),
            ..Default::default()
        };
        tx.send(req).await.expect("the stream's receiver is alive");
    }
    let mut stream = client
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    while let Some(resp) = stream.message().await? {
        let now = Instant::now();
        seen.bytes.fetch_add(resp.encoded_len(), Ordering::Relaxed);
        if resp.type_url == type_url::ENDPOINTS {
            for r in &resp.resources {
                let Some(any) = &r.resource else { continue };
                let Ok(eps) = pb::ClusterEndpoints::decode(any.value.as_slice()) else {
                    continue;
                };
                for e in eps.endpoints {
                    if e.address.starts_with("127.251.") && markers.insert(e.address.clone()) {
                        seen.markers
                            .lock()
                            .unwrap()
                            .entry(e.address)
                            .or_default()
                            .push(now);
                    }
                }
            }
        }
        if types.insert(resp.type_url.clone()) && types.len() == type_url::ALL.len() {
            let done = seen.synced.fetch_add(1, Ordering::Relaxed) + 1;
            if done == total {
                *seen.sync_done.lock().unwrap() = Some(now);
            }
        }
        let ack = DeltaDiscoveryRequest {
            type_url: resp.type_url,
            response_nonce: resp.nonce,
            ..Default::default()
        };
        if tx.send(ack).await.is_err() {
            return Ok(());
        }
    }
    Ok(())
}

#[derive(Default, serde::Serialize)]
struct Run {
    initial_sync_s: f64,
    endpoint_change_p50_s: f64,
    endpoint_change_p99_s: f64,
    sustained_changes_per_s: f64,
    sustained_p99_s: f64,
    sustained_delivered: f64,
    rss_mb: f64,
    idle_cpu_cores: f64,
    resources_mb_sent: f64,
    /// Proxy streams that failed and were opened again.
    reconnects: usize,
}

/// Waits until every proxy that sees namespace `ns` (all of them when
/// unscoped or shared) holds `marker`, up to `limit`; returns each
/// delivery's latency from `at`.
async fn deliveries(
    seen: &Seen,
    marker: &str,
    expected: usize,
    at: Instant,
    limit: Duration,
) -> Vec<f64> {
    let deadline = at + limit;
    loop {
        let got: Vec<f64> = seen
            .markers
            .lock()
            .unwrap()
            .get(marker)
            .map(|v| {
                v.iter()
                    .map(|t| t.duration_since(at).as_secs_f64())
                    .collect()
            })
            .unwrap_or_default();
        if got.len() >= expected || Instant::now() > deadline {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn run(
    args: &Args,
    scoped: bool,
    pilot_bin: &Path,
    citadel: &mesh_citadel::Citadel,
    ca_addr: SocketAddr,
    work: &Path,
) -> anyhow::Result<Run> {
    let name = if scoped { "scoped" } else { "unscoped" };
    let dir = work.join(name);
    let config = dir.join("config");
    let mut mesh = Mesh::new(args, &config, scoped)?;
    let token = dir.join("token");
    std::fs::write(
        &token,
        citadel.mint_token(
            &mesh_pilot::identity(TRUST_DOMAIN),
            Duration::from_secs(3600),
        ),
    )?;
    let roots = dir.join("roots.pem");
    std::fs::write(&roots, citadel.roots_pem())?;
    let listen: SocketAddr = "127.0.0.1:0".parse()?;
    let port = std::net::TcpListener::bind(listen)?.local_addr()?.port();
    let xds: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let monitoring_port = std::net::TcpListener::bind(listen)?.local_addr()?.port();

    // Credentials per namespace's service account, before the clock starts.
    let mut creds = Vec::new();
    for ns in 0..args.namespaces {
        let id = SpiffeId::new(TRUST_DOMAIN, &format!("ns-{ns}"), &format!("sa-{ns}"));
        let c = mesh_identity::grpc::certificate_from(
            ca_addr,
            &citadel.mint_token(&id, Duration::from_secs(3600)),
            &id,
            Duration::ZERO,
            &citadel.roots_pem(),
        )
        .await?;
        let tls = mesh_identity::client_config(
            Some(&c),
            c.roots.clone(),
            mesh_pilot::identity(TRUST_DOMAIN),
            &[b"h2"],
        )?;
        creds.push(tls);
    }

    let started = Instant::now();
    let child = bench::spawn(
        pilot_bin.to_str().context("pilot's path")?,
        &[
            "--config-dir",
            config.to_str().context("config path")?,
            "--listen",
            &xds.to_string(),
            "--monitoring-listen",
            &format!("127.0.0.1:{monitoring_port}"),
            "--ca-addr",
            &ca_addr.to_string(),
            "--ca-root-file",
            roots.to_str().context("roots path")?,
            "--token-file",
            token.to_str().context("token path")?,
        ],
        &dir.join("pilot.log"),
    )?;
    let pid = child.id();
    let _children = Children(vec![child]);
    bench::wait_listening(xds, Duration::from_secs(60))?;

    let seen = Arc::new(Seen::default());
    let proxies = mesh.proxy_ids();
    let total = proxies.len();
    let mut tasks = Vec::new();
    for (id, ns) in &proxies {
        let channel = mesh_identity::grpc::channel(xds, creds[*ns].clone());
        tasks.push(tokio::spawn(proxy(
            id.clone(),
            channel,
            seen.clone(),
            total,
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.sync_done.lock().unwrap().is_none() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "{name}: only {} of {total} proxies synced in 120 s (see {})",
            seen.synced.load(Ordering::Relaxed),
            dir.join("pilot.log").display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let initial_sync_s = seen
        .sync_done
        .lock()
        .unwrap()
        .unwrap()
        .duration_since(started)
        .as_secs_f64();
    let proxies_per_ns = total / args.namespaces;
    let affected = |ns: usize| {
        if scoped && ns != 0 {
            proxies_per_ns
        } else {
            total
        }
    };

    // Single changes, one at a time.
    let mut single = Vec::new();
    for _ in 0..args.single_changes {
        let at = Instant::now();
        let (marker, ns) = mesh.change()?;
        let got = deliveries(&seen, &marker, affected(ns), at, Duration::from_secs(10)).await;
        anyhow::ensure!(
            got.len() >= affected(ns),
            "{name}: a change reached {} of {} proxies in 10 s",
            got.len(),
            affected(ns)
        );
        single.extend(got);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    single.sort_by(f64::total_cmp);

    // Sustained changes at a fixed rate.
    let interval = Duration::from_secs_f64(1.0 / args.changes_per_s as f64);
    let mut made = Vec::new();
    let begin = Instant::now();
    let mut next = begin;
    while begin.elapsed() < args.sustained {
        let at = Instant::now();
        made.push((mesh.change()?, at));
        next += interval;
        tokio::time::sleep_until(next.into()).await;
    }
    let window = begin.elapsed().as_secs_f64();
    let mut lags = Vec::new();
    let mut delivered = 0;
    for ((marker, ns), at) in &made {
        let got = deliveries(&seen, marker, affected(*ns), *at, Duration::from_secs(10)).await;
        if got.len() >= affected(*ns) {
            delivered += 1;
        }
        lags.extend(got);
    }
    lags.sort_by(f64::total_cmp);
    let sustained_p99_s = percentile(&lags, 0.99);
    let sustained_delivered = delivered as f64 / made.len().max(1) as f64;
    let sustained_changes_per_s =
        if sustained_delivered == 1.0 && sustained_p99_s <= TARGET_CHANGE_P99_S {
            made.len() as f64 / window
        } else {
            0.0
        };

    // Idle: nothing changes for a while.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu0 = bench::cpu_seconds(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle_cpu_cores = (bench::cpu_seconds(pid) - cpu0) / t0.elapsed().as_secs_f64();
    let rss_mb = bench::mem_mb(pid, "VmHWM");
    for t in tasks {
        t.abort();
    }
    Ok(Run {
        initial_sync_s,
        endpoint_change_p50_s: percentile(&single, 0.50),
        endpoint_change_p99_s: percentile(&single, 0.99),
        sustained_changes_per_s,
        sustained_p99_s,
        sustained_delivered,
        rss_mb,
        idle_cpu_cores,
        resources_mb_sent: seen.bytes.load(Ordering::Relaxed) as f64 / 1e6,
        reconnects: seen.errors.load(Ordering::Relaxed),
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.services = 200;
        args.namespaces = 10;
        args.endpoints = 2000;
        args.proxies = 400;
        args.sustained = Duration::from_secs(2);
        args.single_changes = 5;
    }
    anyhow::ensure!(
        args.services % args.namespaces == 0
            && args.endpoints % args.namespaces == 0
            && args.proxies % args.namespaces == 0
            && args.endpoints / args.namespaces >= args.services / args.namespaces,
        "services, endpoints and proxies must divide evenly among namespaces"
    );
    // MESH_BENCH_PILOT names another pilot to run (or a wrapper around
    // one, for profiling); else the release build.
    let pilot_bin = match std::env::var_os("MESH_BENCH_PILOT") {
        Some(p) => PathBuf::from(p),
        None => bench::build("release", "mesh-pilot", "mesh-pilot")?,
    };
    let temp = tempfile::tempdir()?;
    let work = args
        .work_dir
        .clone()
        .unwrap_or_else(|| temp.path().to_path_buf());
    let citadel = Arc::new(mesh_citadel::Citadel::open(mesh_citadel::Config::new(
        work.join("ca"),
    ))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ca_addr = listener.local_addr()?;
    let c = citadel.clone();
    tokio::spawn(async move { c.serve(listener, std::future::pending()).await });

    let scoped = run(&args, true, &pilot_bin, &citadel, ca_addr, &work).await?;
    let unscoped = if args.scoped_only {
        None
    } else {
        Some(run(&args, false, &pilot_bin, &citadel, ca_addr, &work).await?)
    };

    println!(
        "bench-pilot: {} services in {} namespaces, {} endpoints, {} proxies; {} changes/s for {:?}",
        args.services,
        args.namespaces,
        args.endpoints,
        args.proxies,
        args.changes_per_s,
        args.sustained
    );
    println!(
        "{:<10} {:>9} {:>11} {:>11} {:>12} {:>11} {:>10} {:>8} {:>9} {:>8} {:>10}",
        "run",
        "sync s",
        "change p50",
        "change p99",
        "sustained/s",
        "sust. p99",
        "delivered",
        "rss MB",
        "idle cpu",
        "sent MB",
        "reconnects"
    );
    for (name, r) in
        std::iter::once(("scoped", &scoped)).chain(unscoped.iter().map(|u| ("unscoped", u)))
    {
        println!(
            "{:<10} {:>9.2} {:>11.3} {:>11.3} {:>12.0} {:>11.3} {:>9.0}% {:>8.1} {:>9.3} {:>8.1} {:>10}",
            name,
            r.initial_sync_s,
            r.endpoint_change_p50_s,
            r.endpoint_change_p99_s,
            r.sustained_changes_per_s,
            r.sustained_p99_s,
            r.sustained_delivered * 100.0,
            r.rss_mb,
            r.idle_cpu_cores,
            r.resources_mb_sent,
            r.reconnects
        );
    }
    println!(
        "targets (scoped): sync <= {TARGET_SYNC_S} s, change p99 <= {TARGET_CHANGE_P99_S} s, {} changes/s, rss <= {TARGET_RSS_MB} MB, idle <= {TARGET_IDLE_CORES} cores",
        args.changes_per_s
    );
    let mut out = serde_json::to_value(&scoped)?;
    out["unscoped"] = serde_json::to_value(&unscoped)?;
    println!("{out}");
    Ok(())
}
