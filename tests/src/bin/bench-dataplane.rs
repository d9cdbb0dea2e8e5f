//! Data-plane benchmark: the same 1 KiB HTTP traffic through `direct`,
//! `mesh` (outbound sidecar -> mTLS -> inbound sidecar), and HAProxy and
//! nginx pairs with mutual TLS in HTTP and TCP mode, interleaved over rounds;
//! and for the mesh also HTTP/2 and gRPC (with gRPC straight to its upstream
//! as that load's baseline). Prints a table per round, then one JSON object
//! on the last line.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mesh_tests::bench::{self, Children, Load};
use meshctl::workloads::{self, Launcher};
use serde_json::json;

#[derive(Parser)]
struct Cli {
    /// Short rounds, one unless `--rounds` says more (under 3 minutes),
    /// instead of three full ones.
    #[arg(long)]
    quick: bool,
    /// How many timed rounds (default 3, or 1 with `--quick`): the medians
    /// steady as rounds are added, 7-8 minutes each at full length.
    /// `--instructions` counts its own three.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: Option<u32>,
    /// Measure only these paths (comma-separated, e.g. `direct,mesh`); the
    /// others are not started, and figures that need them are null.
    #[arg(long, value_delimiter = ',')]
    paths: Vec<String>,
    /// Start everything, print the addresses and wait for Ctrl-C instead of
    /// measuring (for profiling by hand).
    #[arg(long)]
    hold: bool,
    /// Count each sidecar's instructions per request under valgrind's
    /// callgrind instead of timing anything: repeatable where timings on a
    /// shared machine are not. The mesh paths only (`mesh` unless `--paths`
    /// names others); three rounds of 3,000 requests at 100 req/s after as
    /// many to warm up.
    #[arg(long)]
    instructions: bool,
    /// Write `proxy/sidecar.order`, the functions the linker puts first in
    /// the sidecar (`proxy/build.rs`), instead of measuring: the mesh
    /// paths' sidecars run under callgrind through start-up, each path's
    /// load and a metrics scrape, and every function either of them ran is
    /// listed. Run it again after a toolchain or dependency update.
    #[arg(long, conflicts_with_all = ["instructions", "hold"])]
    layout: bool,
    /// Record `proxy/sidecar.profdata`, the profile every crate of the
    /// deployed sidecar is optimised with (`proxy/pgo-rustc`), instead of
    /// measuring: an instrumented build of the sidecar serves the mesh
    /// paths' loads (1,000 req/s over 16 connections and flat out over 64)
    /// and a metrics scrape, and the counts its processes write as they exit
    /// are merged. Then `target/sidecar` is removed, since cargo cannot tell
    /// that its crates were compiled with the old profile. Run `--layout`
    /// after it: the new build lays its functions out differently.
    #[arg(long, conflicts_with_all = ["instructions", "hold", "layout"])]
    pgo: bool,
    /// Also measure `mesh_routes`: the mesh path through a VirtualService of
    /// this many routes (the matching one last) and a DestinationRule with
    /// outlier detection and a connection pool.
    #[arg(long, default_value_t = 0)]
    routes: usize,
    /// Also measure `mesh_telemetry_on` (Istio's metrics, 1 % of traces
    /// exported over OTLP to a live receiver, access log off) against
    /// `mesh_telemetry_off` (metrics switched off, no tracing provider):
    /// two more client/upstream sidecar pairs, each under its own Telemetry.
    #[arg(long)]
    telemetry: bool,
}

impl Cli {
    /// Rounds, then the seconds of each round's fixed-rate and maximum-rate
    /// runs.
    fn schedule(&self) -> (u32, u64, u64) {
        let (rounds, fixed_secs, max_secs) = if self.quick { (1, 10, 5) } else { (3, 30, 15) };
        (self.rounds.unwrap_or(rounds), fixed_secs, max_secs)
    }
}

/// The telemetry comparison's workloads (each pair with its own upstream
/// server), its collector and the two Telemetry resources.
fn telemetry_config(collector_port: u16) -> String {
    let mut out = String::new();
    for (side, client, upstream) in [("on", 11, 12), ("off", 13, 14)] {
        out.push_str(&format!(
            r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: bench-{side}, namespace: default}}
spec:
  hosts: [bench-{side}.default.svc.cluster.local]
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  workloadSelector: {{labels: {{app: bench-upstream-{side}}}}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: bench-client-{side}, namespace: default}}
spec: {{address: 127.0.30.{client}, labels: {{app: bench-client-{side}, telemetry: "{side}"}}, serviceAccount: bench-client}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {{name: bench-upstream-{side}, namespace: default}}
spec: {{address: 127.0.30.{upstream}, labels: {{app: bench-upstream-{side}, telemetry: "{side}"}}, serviceAccount: bench-upstream}}
"#
        ));
    }
    out.push_str(&format!(
        r#"
---
apiVersion: v1
kind: ConfigMap
metadata: {{name: istio, namespace: istio-system}}
data:
  mesh: |-
    extensionProviders:
    - name: otel
      opentelemetry: {{service: 127.0.0.1, port: {collector_port}}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: telemetry-on, namespace: default}}
spec:
  selector: {{matchLabels: {{telemetry: "on"}}}}
  tracing: [{{providers: [{{name: otel}}], randomSamplingPercentage: 1}}]
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: telemetry-off, namespace: default}}
spec:
  selector: {{matchLabels: {{telemetry: "off"}}}}
  metrics: [{{overrides: [{{disabled: true}}]}}]
"#
    ));
    out
}

/// A second service on the same upstream, behind `n` routes of which only
/// the last matches the benchmark's requests.
fn routes_config(n: usize) -> String {
    let mut out = String::from(
        r#"
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench-routes, namespace: default}
spec:
  hosts: [bench-routes.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: bench-upstream}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: bench-routes, namespace: default}
spec:
  host: bench-routes
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 10000, connectTimeout: 1s}
      http: {http1MaxPendingRequests: 10000, http2MaxRequests: 10000}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bench-routes, namespace: default}
spec:
  hosts: [bench-routes]
  http:
"#,
    );
    for i in 0..n.saturating_sub(1) {
        out.push_str(&format!(
            "  - name: r{i}\n    match:\n    - uri: {{prefix: /r{i}/}}\n      headers: {{x-route: {{exact: r{i}}}}}\n    route: [{{destination: {{host: bench-routes}}}}]\n"
        ));
    }
    out.push_str("  - name: last\n    route: [{destination: {host: bench-routes}}]\n");
    out
}

const FIXED_RPS: u32 = 1000;
const FIXED_CONNS: u32 = 16;
const MAX_CONNS: u32 = 64;

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 30, last))
}

const MESH_CONFIG: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench-upstream, namespace: default}
spec:
  hosts: [bench-upstream.default.svc.cluster.local]
  ports: [{number: 8080, name: http, protocol: HTTP}]
  workloadSelector: {labels: {app: bench-upstream}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: bench-client, namespace: default}
spec: {address: 127.0.30.1, labels: {app: bench-client}, serviceAccount: bench-client}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: bench-upstream, namespace: default}
spec: {address: 127.0.30.2, labels: {app: bench-upstream, version: v1}, serviceAccount: bench-upstream}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bench-grpc, namespace: default}
spec:
  hosts: [bench-grpc.default.svc.cluster.local]
  ports: [{number: 9090, name: grpc, protocol: GRPC}]
  workloadSelector: {labels: {app: bench-upstream}}
"#;

struct Path {
    name: &'static str,
    url: String,
    host: String,
    pids: Vec<u32>,
    load: Load,
}

#[derive(Default, Clone)]
struct Round {
    p50: f64,
    p90: f64,
    p99: f64,
    max_rps: f64,
    cpu_per_1k: f64,
    rss_mb: f64,
    failed: usize,
}

/// `--instructions`: each mesh path's sidecars, already running under
/// callgrind, counted over three rounds of the same requests. Prints a
/// table per round and the medians as JSON on the last line.
fn count_instructions(
    paths: &[Path],
    sidecars: &[(String, u32)],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    const REQUESTS: u32 = 3000;
    const ROUNDS: u32 = 3;
    let shape = (FIXED_CONNS, 100, REQUESTS);
    let scratch = dir.join("instructions");
    // The client workload's sidecar sends the path's requests out; the
    // other one takes them in.
    let role = |pid: u32| match sidecars.iter().find(|(_, p)| *p == pid) {
        Some((n, _)) if n.starts_with("bench-client") => "outbound",
        _ => "inbound",
    };
    let mut out = serde_json::Map::new();
    for p in paths.iter().filter(|p| !p.pids.is_empty()) {
        bench::h2load_count(&p.url, &p.host, p.load, shape, &scratch)
            .with_context(|| format!("warming up {}", p.name))?;
        let mut counts: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        println!(
            "\n{}: instructions per request, {REQUESTS} requests a round at 100 req/s",
            p.name
        );
        for round in 1..=ROUNDS {
            bench::callgrind_control("-z", &p.pids)?;
            bench::h2load_count(&p.url, &p.host, p.load, shape, &scratch)?;
            bench::callgrind_control("-d", &p.pids)?;
            let mut line = format!("round {round}:");
            for &pid in &p.pids {
                let n = bench::callgrind_instructions(dir, pid, round)? as f64 / REQUESTS as f64;
                line.push_str(&format!("  {} {n:.0}", role(pid)));
                counts.entry(pid).or_default().push(n);
            }
            println!("{line}");
        }
        let mut sidecar = serde_json::Map::new();
        let mut pair = 0.0;
        for (pid, mut v) in counts {
            v.sort_by(|a, b| a.total_cmp(b));
            let median = v[v.len() / 2];
            pair += median;
            sidecar.insert(role(pid).to_string(), json!(median.round()));
        }
        sidecar.insert("pair".into(), json!(pair.round()));
        out.insert(p.name.to_string(), serde_json::Value::Object(sidecar));
    }
    println!("{}", json!({ "instructions_per_request": out }));
    Ok(())
}

/// `--layout`: the functions the mesh paths' sidecars (already running
/// under callgrind) run, written to `proxy/sidecar.order`: those that
/// serve first, then those that only start-up ran between the sidecar's
/// two markers (which it unmaps once settled; `proxy/src/main.rs`), each
/// group by name.
fn write_layout(
    paths: &[Path],
    pids: &[u32],
    admins: &[SocketAddr],
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let scratch = dir.join("layout");
    // Dump 1: start-up (and the gRPC paths' end-to-end checks).
    bench::callgrind_control("-d", pids)?;
    // Dump 2: idle, long enough for the sidecars to settle and unmap the
    // start-up code: what runs then (timers, the unmapping's own way back
    // to waiting) would map it again, so it counts as serving.
    std::thread::sleep(mesh_proxy::SETTLE + Duration::from_secs(3));
    bench::callgrind_control("-d", pids)?;
    for p in paths.iter().filter(|p| !p.pids.is_empty()) {
        eprintln!("layout: {} under load", p.name);
        // Steady, then on as many connections as the maximum-rate runs
        // use (faster than the sidecars under valgrind can serve).
        for shape in [(FIXED_CONNS, 100, 2000), (MAX_CONNS, 1000, 4000)] {
            bench::h2load_count(&p.url, &p.host, p.load, shape, &scratch)
                .with_context(|| format!("loading {}", p.name))?;
        }
    }
    scrape(admins)?;
    // Dump 3: serving.
    bench::callgrind_control("-d", pids)?;
    let (mut serving, mut startup) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    for &pid in pids {
        startup.extend(bench::callgrind_functions(dir, pid, 1)?);
        serving.extend(bench::callgrind_functions(dir, pid, 2)?);
        serving.extend(bench::callgrind_functions(dir, pid, 3)?);
    }
    let rustc = std::process::Command::new(std::env::var("RUSTC").unwrap_or("rustc".into()))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let only_startup: Vec<&String> = startup.difference(&serving).collect();
    let (served, started) = (serving.len(), only_startup.len());
    let mut out = format!(
        "# The functions the linker puts first in the sidecar (proxy/build.rs): the ones\n\
         # its mesh paths ran under callgrind, written by `cargo run --release -p\n\
         # mesh-tests --bin bench-dataplane -- --layout` ({rustc}).\n\
         # {} that serve (idle, HTTP/1.1, HTTP/2 and gRPC load, a metrics scrape), then {}\n\
         # that only start-up ran, between the markers of the code the sidecar\n\
         # unmaps once settled; each group by name.\n",
        served, started
    );
    let (begin, end) = bench::LAYOUT_MARKERS;
    let serving = serving.iter().map(String::as_str);
    let only_startup = only_startup.into_iter().map(String::as_str);
    for f in serving.chain([begin]).chain(only_startup).chain([end]) {
        out.push_str(f);
        out.push('\n');
    }
    let file = bench::layout_file();
    std::fs::write(&file, out)?;
    println!(
        "wrote {}: {served} functions that serve, {started} more that start-up runs",
        file.display()
    );
    Ok(())
}

/// One metrics scrape from each of the sidecars' agents at `admins`.
fn scrape(admins: &[SocketAddr]) -> anyhow::Result<()> {
    for admin in admins {
        let url = format!(
            "http://{}:{}/stats/prometheus",
            admin.ip(),
            mesh_proto::ports::AGENT
        );
        bench::http_get(&url).with_context(|| format!("scraping {url}"))?;
    }
    Ok(())
}

/// `--pgo`: each mesh path's load through the instrumented sidecars and a
/// scrape of the pair's metrics; then every sidecar is stopped with SIGTERM
/// (each writes its counts to `raw` as it exits) and the counts are merged
/// into `proxy/sidecar.profdata`.
fn record_profile(
    paths: &[Path],
    sidecars: &[u32],
    admins: &[SocketAddr],
    raw: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    let scratch = dir.join("pgo");
    for p in paths.iter().filter(|p| !p.pids.is_empty()) {
        eprintln!("pgo: {} under load", p.name);
        // 15 s at the measured rate, then as fast as the pair serves.
        for shape in [
            (FIXED_CONNS, FIXED_RPS, FIXED_RPS * 15),
            (MAX_CONNS, MAX_CONNS * 1000, 100_000),
        ] {
            bench::h2load_count(&p.url, &p.host, p.load, shape, &scratch)
                .with_context(|| format!("loading {}", p.name))?;
        }
    }
    scrape(admins)?;
    bench::terminate(sidecars, Duration::from_secs(30))?;
    let counts: Vec<std::path::PathBuf> = std::fs::read_dir(raw)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "profraw"))
        .collect();
    anyhow::ensure!(
        !counts.is_empty(),
        "the sidecars wrote no counts to {}",
        raw.display()
    );
    let out = bench::pgo_file();
    let merged = std::process::Command::new(bench::llvm_profdata()?)
        .args(["merge", "--sparse", "-o"])
        .arg(&out)
        .args(&counts)
        .status()
        .context("running llvm-profdata")?
        .success();
    anyhow::ensure!(merged, "llvm-profdata merge failed");
    let stale = bench::target_dir().join("sidecar");
    if stale.exists() {
        std::fs::remove_dir_all(&stale).with_context(|| format!("removing {}", stale.display()))?;
    }
    let size = std::fs::metadata(&out)?.len();
    println!(
        "wrote {} ({:.1} MB, the counts of {} sidecar processes) and removed {}: the \
         next `cargo build-sidecar` compiles every crate with the new profile. Now \
         `bench-dataplane --layout` writes proxy/sidecar.order for that build.",
        out.display(),
        size as f64 / 1e6,
        sidecars.len(),
        stale.display()
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new()?;
    bench::ensure_tools()?;
    if cli.instructions || cli.layout {
        bench::ensure_valgrind()?;
    }
    let (rounds, fixed_secs, max_secs) = cli.schedule();
    let dir = tempfile::tempdir()?;
    // Every process the benchmark starts, ended (and the directory removed)
    // on Ctrl-C or SIGTERM from here on: building the sidecar, starting the
    // mesh and waiting for it to be ready take minutes in some modes.
    let started = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    bench::kill_on_signal(&rt, started.clone(), dir.path().to_path_buf());
    let upstream = SocketAddr::new(ip(2), 8080);
    rt.block_on(bench::upstream(upstream))?;
    let grpc_upstream = SocketAddr::new(ip(2), 9090);
    rt.block_on(bench::grpc_upstream(grpc_upstream))?;

    // The mesh as the demo runs it (control plane in-process, sidecars as
    // processes), with the sidecar binary as deployed.
    let config_dir = dir.path().join("config");
    std::fs::create_dir_all(&config_dir)?;
    let mut config = MESH_CONFIG.to_string();
    if cli.routes > 0 {
        config.push_str(&routes_config(cli.routes));
    }
    let receiver = if cli.telemetry {
        mesh_tests::otlp::ensure()?;
        for side in [12, 14] {
            rt.block_on(bench::upstream(SocketAddr::new(ip(side), 8080)))?;
        }
        let r = mesh_tests::otlp::Receiver::start(dir.path())?;
        started.lock().unwrap().push(r.pid());
        config.push_str(&telemetry_config(r.port));
        Some(r)
    } else {
        None
    };
    std::fs::write(config_dir.join("bench.yaml"), config)?;
    let specs = workloads::from_config(&config_dir)?;
    let cp = rt.block_on(meshctl::controlplane::ControlPlane::start(
        dir.path(),
        &config_dir,
        ip(254),
    ))?;
    // Where the instrumented sidecars write their counts (`--pgo`): a
    // fixed path, since it is part of the build's flags.
    let raw = bench::target_dir().join("pgo-generate/counts");
    let mut proxy_exe = match cli.pgo {
        true => bench::build_instrumented_sidecar(&raw)?,
        false => bench::build_sidecar()?,
    };
    if cli.instructions {
        proxy_exe = bench::callgrind_wrapper(&proxy_exe, dir.path(), &[])?;
    }
    if cli.layout {
        // Symbols as the linker knows them, and no per-line costs.
        let args = ["--demangle=no", "--dump-instr=no", "--dump-line=no"];
        proxy_exe = bench::callgrind_wrapper(&proxy_exe, dir.path(), &args)?;
    }
    let launcher = Launcher::Processes {
        exe: std::env::current_exe()?,
        proxy_exe: Some(proxy_exe),
        log_dir: dir.path().to_path_buf(),
    };
    let pods = rt.block_on(workloads::launch(&cp, &specs, &launcher, dir.path()))?;
    let sidecars = pods.sidecar_pids();
    started
        .lock()
        .unwrap()
        .extend(sidecars.iter().map(|(_, p)| *p));
    rt.block_on(workloads::wait_ready(
        &specs,
        Duration::from_secs(30),
        |_, _, _| {},
    ))?;
    // A path's processes: the sidecars of its client and upstream workloads.
    let pair = |suffix: &str| -> Vec<u32> {
        sidecars
            .iter()
            .filter(|(n, _)| {
                *n == format!("bench-client{suffix}") || *n == format!("bench-upstream{suffix}")
            })
            .map(|(_, p)| *p)
            .collect()
    };
    let mesh_pids = pair("");
    // Idle: the mesh pair ready and settled (`mesh_proxy::SETTLE` after
    // its last certificate or config), before any traffic.
    let idle_rss_mb = (!cli.instructions && !cli.layout && !cli.pgo).then(|| {
        std::thread::sleep(mesh_proxy::SETTLE + Duration::from_secs(2));
        mesh_pids
            .iter()
            .map(|&pid| bench::mem_mb(pid, "VmRSS"))
            .fold(0.0, f64::max)
    });
    if let Some(mb) = idle_rss_mb {
        println!("mesh sidecars idle, before any traffic: {mb:.1} MB RSS (the larger of the pair)");
    }

    // The peers.
    let certs = bench::peer_certs(dir.path(), &[ip(4), ip(6), ip(8), ip(10)])?;
    let mut peers = Children(Vec::new());
    let mut paths = vec![
        Path {
            name: "direct",
            url: format!("http://{upstream}/"),
            host: upstream.to_string(),
            pids: vec![],
            load: Load::H1,
        },
        Path {
            name: "mesh",
            url: format!("http://{}:15001/", ip(1)),
            host: "bench-upstream:8080".into(),
            pids: mesh_pids.clone(),
            load: Load::H1,
        },
    ];
    if cli.telemetry {
        for (name, side, client) in [
            ("mesh_telemetry_off", "off", 13),
            ("mesh_telemetry_on", "on", 11),
        ] {
            paths.push(Path {
                name,
                url: format!("http://{}:15001/", ip(client)),
                host: format!("bench-{side}:8080"),
                pids: pair(&format!("-{side}")),
                load: Load::H1,
            });
        }
    }
    if cli.routes > 0 {
        paths.push(Path {
            name: "mesh_routes",
            url: format!("http://{}:15001/", ip(1)),
            host: "bench-routes:8080".into(),
            pids: mesh_pids.clone(),
            load: Load::H1,
        });
    }
    let wanted = |name: &str| match cli.paths.is_empty() {
        true if cli.layout || cli.pgo => name.starts_with("mesh"),
        true => !cli.instructions || name == "mesh",
        false => cli.paths.iter().any(|p| p == name),
    };
    for (name, front, back, l4) in [
        ("haproxy", 3, 4, false),
        ("haproxy_l4", 5, 6, true),
        ("nginx", 7, 8, false),
        ("nginx_l4", 9, 10, true),
    ] {
        if !wanted(name) {
            continue;
        }
        let (front, back) = (
            SocketAddr::new(ip(front), 8080),
            SocketAddr::new(ip(back), 8443),
        );
        let haproxy = name.starts_with("haproxy");
        let (a, b) = if haproxy {
            bench::haproxy_pair(front, back, upstream, &certs, l4)
        } else {
            bench::nginx_pair(front, back, upstream, &certs, dir.path(), l4)
        };
        let mut pids = vec![];
        for (role, cfg) in [("a", a), ("b", b)] {
            let f = dir.path().join(format!("{name}-{role}.conf"));
            std::fs::write(&f, cfg)?;
            let (f, d) = (f.to_str().unwrap(), dir.path().to_str().unwrap());
            let (program, args) = if haproxy {
                ("haproxy", vec!["-db", "-f", f])
            } else {
                ("nginx", vec!["-c", f, "-p", d])
            };
            let child = bench::spawn(
                program,
                &args,
                &dir.path().join(format!("{name}-{role}.log")),
            )?;
            pids.push(child.id());
            started.lock().unwrap().push(child.id());
            peers.0.push(child);
        }
        bench::wait_listening(front, Duration::from_secs(10))
            .with_context(|| format!("{name} did not start"))?;
        paths.push(Path {
            name,
            url: format!("http://{front}/"),
            host: front.to_string(),
            pids,
            load: Load::H1,
        });
    }
    // HTTP/2 from the client into the mesh (h2c to the outbound sidecar).
    paths.push(Path {
        name: "mesh_h2",
        url: format!("http://{}:15001/", ip(1)),
        host: "bench-upstream:8080".into(),
        pids: mesh_pids.clone(),
        load: Load::H2,
    });
    // gRPC unary calls, straight to the gRPC upstream and through the mesh.
    paths.push(Path {
        name: "grpc_direct",
        url: format!("http://{grpc_upstream}/grpc.health.v1.Health/Check"),
        host: grpc_upstream.to_string(),
        pids: vec![],
        load: Load::Grpc,
    });
    paths.push(Path {
        name: "mesh_grpc",
        url: format!("http://{}:15001/grpc.health.v1.Health/Check", ip(1)),
        host: "bench-grpc:9090".into(),
        pids: mesh_pids.clone(),
        load: Load::Grpc,
    });

    paths.retain(|p| wanted(p.name));
    // h2load counts a gRPC call that fails with HTTP 200 as a success:
    // check each gRPC path end to end first.
    for p in paths.iter().filter(|p| p.load == Load::Grpc) {
        let base = p.url.trim_end_matches("/grpc.health.v1.Health/Check");
        rt.block_on(bench::grpc_check(base, &p.host))
            .with_context(|| format!("the {} path does not carry gRPC", p.name))?;
    }
    if cli.instructions {
        return count_instructions(&paths, &sidecars, dir.path());
    }
    // The mesh pair's own metrics endpoints.
    let admins: Vec<SocketAddr> = specs
        .iter()
        .filter(|s| ["bench-client", "bench-upstream"].contains(&s.name.as_str()))
        .map(|s| s.admin())
        .collect();
    if cli.layout {
        return write_layout(&paths, &mesh_pids, &admins, dir.path());
    }
    if cli.pgo {
        let all: Vec<u32> = sidecars.iter().map(|(_, p)| *p).collect();
        return record_profile(&paths, &all, &admins, &raw, dir.path());
    }
    if cli.hold {
        for p in &paths {
            println!(
                "{:<18} {} (host {}) pids {:?}",
                p.name, p.url, p.host, p.pids
            );
        }
        println!("holding; Ctrl-C to stop");
        // Until the signal task (`kill_on_signal`) stops the processes,
        // removes the scratch directory and exits.
        rt.block_on(std::future::pending::<()>());
        return Ok(());
    }
    let mut results: BTreeMap<&str, Vec<Round>> = BTreeMap::new();
    for round in 1..=rounds {
        println!(
            "\nround {round}/{rounds}: {FIXED_RPS} req/s over {FIXED_CONNS} connections for {fixed_secs}s; max over {MAX_CONNS} connections for {max_secs}s"
        );
        println!(
            "{:<18} {:>8} {:>8} {:>8} {:>10} {:>12} {:>8} {:>7}",
            "path", "p50 ms", "p90 ms", "p99 ms", "max rps", "cpu s/1k", "rss MB", "failed"
        );
        for p in &paths {
            let r = measure(p, dir.path(), fixed_secs, max_secs)?;
            println!(
                "{:<18} {:>8.3} {:>8.3} {:>8.3} {:>10.0} {:>12.4} {:>8.1} {:>7}",
                p.name, r.p50, r.p90, r.p99, r.max_rps, r.cpu_per_1k, r.rss_mb, r.failed
            );
            results.entry(p.name).or_default().push(r);
        }
    }
    // What the telemetry-on sidecars did with their spans.
    let spans = receiver.as_ref().map(|r| {
        let stats: String = [11, 12]
            .iter()
            .map(|&last| {
                let url = format!("http://{}:15090/stats/prometheus", ip(last));
                rt.block_on(async { reqwest::get(url).await?.text().await })
                    .unwrap_or_default()
            })
            .collect();
        let sum = |name: &str, with: &[&str]| mesh_tests::metric_sum(&stats, name, with);
        (
            r.spans().len(),
            sum("mesh_proxy_trace_spans_exported_total", &[]),
            sum("mesh_proxy_trace_spans_dropped_total", &[]),
        )
    });
    drop(peers);
    drop(receiver);
    rt.block_on(async {
        pods.stop().await;
        cp.stop().await;
    });
    if let Some((received, exported, dropped)) = spans {
        println!(
            "\ntelemetry on: the receiver got {received} spans; the sidecars count {exported} exported, {dropped} dropped"
        );
    }
    report(&results, idle_rss_mb);
    Ok(())
}

fn measure(
    p: &Path,
    dir: &std::path::Path,
    fixed_secs: u64,
    max_secs: u64,
) -> anyhow::Result<Round> {
    let log = dir.join(format!("{}.h2load.log", p.name));
    // Warm up (connections, TLS sessions, pools), then measure.
    bench::h2load_fixed(&p.url, &p.host, p.load, FIXED_CONNS, FIXED_RPS, 2, &log)?;
    for &pid in &p.pids {
        bench::reset_peak_rss(pid)?;
    }
    let cpu_before: f64 = p.pids.iter().map(|&pid| bench::cpu_seconds(pid)).sum();
    let fixed = bench::h2load_fixed(
        &p.url,
        &p.host,
        p.load,
        FIXED_CONNS,
        FIXED_RPS,
        fixed_secs,
        &log,
    )?;
    let cpu: f64 = p
        .pids
        .iter()
        .map(|&pid| bench::cpu_seconds(pid))
        .sum::<f64>()
        - cpu_before;
    // Peak over the fixed-rate run (reset just before it).
    let rss_mb = p
        .pids
        .iter()
        .map(|&pid| bench::mem_mb(pid, "VmHWM"))
        .fold(0.0, f64::max);
    let max_rps = match p.load {
        Load::H1 => bench::wrk_max(&p.url, &p.host, MAX_CONNS, max_secs)?,
        Load::H2 | Load::Grpc => {
            bench::h2load_max(&p.url, &p.host, p.load, MAX_CONNS, max_secs, &log)?
        }
    };
    Ok(Round {
        p50: fixed.p50_ms,
        p90: fixed.p90_ms,
        p99: fixed.p99_ms,
        max_rps,
        cpu_per_1k: cpu / (fixed.requests as f64 / 1000.0),
        rss_mb,
        failed: fixed.failed,
    })
}

/// The middle round's figure; with an even number of rounds (`--rounds`),
/// the mean of the two middle ones.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        n if n > 0 && n % 2 == 0 => (v[n / 2 - 1] + v[n / 2]) / 2.0,
        _ => bench::percentile(&v, 0.5),
    }
}

fn report(results: &BTreeMap<&str, Vec<Round>>, idle_rss_mb: Option<f64>) {
    let med = |name: &str, f: fn(&Round) -> f64| median(results[name].iter().map(f).collect());
    let mut paths = serde_json::Map::new();
    println!("\nmedians over rounds");
    println!(
        "{:<18} {:>8} {:>8} {:>8} {:>10} {:>12} {:>8}",
        "path", "p50 ms", "p90 ms", "p99 ms", "max rps", "cpu s/1k", "rss MB"
    );
    for name in results.keys() {
        let (p50, p90, p99) = (
            med(name, |r| r.p50),
            med(name, |r| r.p90),
            med(name, |r| r.p99),
        );
        let (max_rps, cpu, rss) = (
            med(name, |r| r.max_rps),
            med(name, |r| r.cpu_per_1k),
            med(name, |r| r.rss_mb),
        );
        println!(
            "{name:<18} {p50:>8.3} {p90:>8.3} {p99:>8.3} {max_rps:>10.0} {cpu:>12.4} {rss:>8.1}"
        );
        paths.insert(
            name.to_string(),
            json!({
                "p50_ms": round3(p50), "p90_ms": round3(p90), "p99_ms": round3(p99),
                "max_rps": max_rps.round(), "cpu_s_per_1k": round4(cpu), "rss_mb": round3(rss),
            }),
        );
    }
    // Figures over direct, for what was measured (null otherwise).
    let have = |names: &[&str]| names.iter().all(|n| results.contains_key(n));
    let added = have(&["direct", "mesh"]).then(|| {
        (
            med("mesh", |r| r.p90) - med("direct", |r| r.p90),
            med("mesh", |r| r.p99) - med("direct", |r| r.p99),
        )
    });
    const PEERS: [&str; 4] = ["haproxy", "haproxy_l4", "nginx", "nginx_l4"];
    let best_peer = have(&PEERS).then(|| {
        PEERS
            .iter()
            .map(|n| med(n, |r| r.p90) - med("direct", |r| r.p90))
            .fold(f64::INFINITY, f64::min)
    });
    if let Some((p90, p99)) = added {
        print!("\nmesh adds {p90:.3} ms p90 and {p99:.3} ms p99 over direct");
        match best_peer {
            Some(b) => println!("; the best peer adds {b:.3} ms p90"),
            None => println!(" (peers not measured)"),
        }
    }
    // The routed path against the single-route one, same run.
    let routes_ratio = results.contains_key("mesh_routes").then(|| {
        (
            med("mesh_routes", |r| r.p90) / med("mesh", |r| r.p90),
            med("mesh_routes", |r| r.cpu_per_1k) / med("mesh", |r| r.cpu_per_1k),
        )
    });
    if let Some((p90, cpu)) = routes_ratio {
        println!("mesh_routes / mesh: p90 x{p90:.3}, cpu s/1k x{cpu:.3} (target: within 1.10)");
    }
    // Telemetry on against off, same run.
    let telemetry_ratio = results.contains_key("mesh_telemetry_on").then(|| {
        (
            med("mesh_telemetry_on", |r| r.p90) / med("mesh_telemetry_off", |r| r.p90),
            med("mesh_telemetry_on", |r| r.cpu_per_1k)
                / med("mesh_telemetry_off", |r| r.cpu_per_1k),
        )
    });
    if let Some((p90, cpu)) = telemetry_ratio {
        println!(
            "mesh_telemetry_on / mesh_telemetry_off: p90 x{p90:.3}, cpu s/1k x{cpu:.3} (target: within 1.10)"
        );
    }
    println!(
        "{}",
        json!({
            "routes_p90_ratio": routes_ratio.map(|r| round3(r.0)),
            "routes_cpu_ratio": routes_ratio.map(|r| round3(r.1)),
            "telemetry_p90_ratio": telemetry_ratio.map(|r| round3(r.0)),
            "telemetry_cpu_ratio": telemetry_ratio.map(|r| round3(r.1)),
            "paths": paths,
            "mesh_added_p90_ms": added.map(|a| round3(a.0)),
            "mesh_added_p99_ms": added.map(|a| round3(a.1)),
            "best_peer_added_p90_ms": best_peer.map(round3),
            "mesh_idle_rss_mb": idle_rss_mb.map(round3),
        })
    );
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}
fn round4(v: f64) -> f64 {
    (v * 10000.0).round() / 10000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("bench-dataplane").chain(args.iter().copied()))
    }

    #[test]
    fn rounds_are_three_full_ones_unless_asked() {
        assert_eq!(parse(&[]).unwrap().schedule(), (3, 30, 15));
        assert_eq!(parse(&["--quick"]).unwrap().schedule(), (1, 10, 5));
        assert_eq!(parse(&["--rounds", "7"]).unwrap().schedule(), (7, 30, 15));
        assert_eq!(
            parse(&["--quick", "--rounds", "2"]).unwrap().schedule(),
            (2, 10, 5)
        );
    }

    #[test]
    fn the_median_of_an_even_number_of_rounds_is_their_middle_twos_mean() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 9.0]), 3.0);
        assert_eq!(median(vec![0.533, 0.610]), (0.533 + 0.610) / 2.0);
    }

    #[test]
    fn zero_rounds_is_refused_by_name() {
        let err = parse(&["--rounds", "0"])
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains("--rounds"), "{err}");
    }
}
