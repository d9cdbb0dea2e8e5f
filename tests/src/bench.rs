//! Benchmark support: tools, certificates, peer configs, the upstream,
//! process accounting and the load generators' output.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

/// Debian packages the benchmark uses, with a file each provides.
const TOOLS: [(&str, &str); 5] = [
    ("nghttp2-client", "/usr/bin/h2load"),
    ("wrk", "/usr/bin/wrk"),
    ("haproxy", "/usr/sbin/haproxy"),
    ("nginx-light", "/usr/sbin/nginx"),
    (
        "libnginx-mod-stream",
        "/usr/lib/nginx/modules/ngx_stream_module.so",
    ),
];

/// Installs the load generators and peers from Debian's packages if missing.
pub fn ensure_tools() -> anyhow::Result<()> {
    ensure_packages(&TOOLS)
}

/// Installs valgrind (for `--instructions`) from Debian's packages if missing.
pub fn ensure_valgrind() -> anyhow::Result<()> {
    ensure_packages(&[("valgrind", "/usr/bin/callgrind_control")])
}

fn ensure_packages(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .filter(|(_, f)| !Path::new(f).exists())
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()?
        .stdout
        .starts_with(b"0");
    if !root {
        bail!(
            "missing {}: run `sudo apt-get install {}`",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("installing {}", missing.join(" "));
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq {} >/dev/null",
            missing.join(" ")
        ))
        .status()?
        .success();
    anyhow::ensure!(ok, "apt-get install {} failed", missing.join(" "));
    Ok(())
}

/// The name peer servers' certificates carry (nginx verifies names, not IPs).
pub const PEER_NAME: &str = "peer.bench";

/// PEM files for a peer pair's mutual TLS: one CA, a server and a client cert.
pub struct PeerCerts {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// Cert and key in one file, as HAProxy wants them.
    pub server_bundle: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub client_bundle: PathBuf,
}

pub fn peer_certs(dir: &Path, server_ips: &[std::net::IpAddr]) -> anyhow::Result<PeerCerts> {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(vec![])?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench peer CA");
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |sans: Vec<SanType>| -> anyhow::Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut p = CertificateParams::new(vec![])?;
        p.subject_alt_names = sans;
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "bench peer");
        Ok((p.signed_by(&key, &issuer)?.pem(), key.serialize_pem()))
    };
    let mut sans: Vec<SanType> = server_ips
        .iter()
        .map(|ip| SanType::IpAddress(*ip))
        .collect();
    sans.push(SanType::DnsName(PEER_NAME.try_into()?));
    let (sc, sk) = leaf(sans)?;
    let (cc, ck) = leaf(vec![SanType::DnsName("client.bench".try_into()?)])?;
    let w = |name: &str, text: &str| -> anyhow::Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    Ok(PeerCerts {
        ca: w("ca.pem", &ca_cert.pem())?,
        server_cert: w("server.pem", &sc)?,
        server_key: w("server.key", &sk)?,
        server_bundle: w("server.bundle", &format!("{sc}{sk}"))?,
        client_cert: w("client.pem", &cc)?,
        client_key: w("client.key", &ck)?,
        client_bundle: w("client.bundle", &format!("{cc}{ck}"))?,
    })
}

pub fn haproxy_pair(
    front: SocketAddr,
    back: SocketAddr,
    upstream: SocketAddr,
    c: &PeerCerts,
    l4: bool,
) -> (String, String) {
    let mode = if l4 { "tcp" } else { "http" };
    let http_opts = if l4 {
        ""
    } else {
        "    option http-keep-alive\n    http-reuse always\n"
    };
    let global = "global\n    nbthread 1\n    maxconn 4096\ndefaults\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n";
    let a = format!(
        "{global}    mode {mode}\nfrontend f\n    bind {front}\n    default_backend b\nbackend b\n{http_opts}    server s {back} ssl crt {} ca-file {} verify required\n",
        c.client_bundle.display(),
        c.ca.display()
    );
    let b = format!(
        "{global}    mode {mode}\nfrontend f\n    bind {back} ssl crt {} ca-file {} verify required\n    default_backend b\nbackend b\n{http_opts}    server s {upstream}\n",
        c.server_bundle.display(),
        c.ca.display()
    );
    (a, b)
}

pub fn nginx_pair(
    front: SocketAddr,
    back: SocketAddr,
    upstream: SocketAddr,
    c: &PeerCerts,
    dir: &Path,
    l4: bool,
) -> (String, String) {
    let head = |name: &str| {
        let d = dir.display();
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/{name}.pid;\nerror_log stderr error;\n{}events {{ worker_connections 4096; }}\n",
            if l4 {
                "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n"
            } else {
                ""
            }
        )
    };
    let temp = |name: &str| {
        let d = dir.display();
        format!(
            "client_body_temp_path {d}/{name}-body; proxy_temp_path {d}/{name}-proxy; fastcgi_temp_path {d}/{name}-fcgi; uwsgi_temp_path {d}/{name}-uwsgi; scgi_temp_path {d}/{name}-scgi;"
        )
    };
    if l4 {
        let a = format!(
            "{}stream {{ server {{ listen {front}; proxy_pass {back}; proxy_ssl on; proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; proxy_ssl_trusted_certificate {}; proxy_ssl_verify on; proxy_ssl_name {PEER_NAME}; proxy_ssl_session_reuse on; }} }}\n",
            head("nginx-l4-a"),
            c.client_cert.display(),
            c.client_key.display(),
            c.ca.display()
        );
        let b = format!(
            "{}stream {{ server {{ listen {back} ssl; ssl_certificate {}; ssl_certificate_key {}; ssl_client_certificate {}; ssl_verify_client on; proxy_pass {upstream}; }} }}\n",
            head("nginx-l4-b"),
            c.server_cert.display(),
            c.server_key.display(),
            c.ca.display()
        );
        return (a, b);
    }
    let a = format!(
        "{}http {{ access_log off; {} upstream b {{ server {back}; keepalive 64; }} server {{ listen {front}; location / {{ proxy_pass https://b; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_ssl_certificate {}; proxy_ssl_certificate_key {}; proxy_ssl_trusted_certificate {}; proxy_ssl_verify on; proxy_ssl_name {PEER_NAME}; proxy_ssl_session_reuse on; }} }} }}\n",
        head("nginx-a"),
        temp("a"),
        c.client_cert.display(),
        c.client_key.display(),
        c.ca.display()
    );
    let b = format!(
        "{}http {{ access_log off; {} upstream u {{ server {upstream}; keepalive 64; }} server {{ listen {back} ssl; ssl_certificate {}; ssl_certificate_key {}; ssl_client_certificate {}; ssl_verify_client on; location / {{ proxy_pass http://u; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }} }}\n",
        head("nginx-b"),
        temp("b"),
        c.server_cert.display(),
        c.server_key.display(),
        c.ca.display()
    );
    (a, b)
}

/// Starts a peer process; it is killed when the returned child drops.
pub fn spawn(program: &str, args: &[&str], log: &Path) -> anyhow::Result<std::process::Child> {
    let out = std::fs::File::create(log)?;
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {program}"))
}

/// Kills children by PID on drop.
pub struct Children(pub Vec<std::process::Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU seconds (user + system) a process has used.
pub fn cpu_seconds(pid: u32) -> f64 {
    let f = proc_stat(pid).unwrap_or_default();
    // utime and stime, the 14th and 15th fields overall.
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

/// The fields of `/proc/PID/stat` after the command name, which is in
/// parentheses and may itself hold spaces and parentheses: the state (the
/// 3rd field overall) first, then the parent's PID, and so on. None once
/// the process is gone.
fn proc_stat(pid: u32) -> Option<Vec<String>> {
    stat_fields(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn stat_fields(stat: &str) -> Option<Vec<String>> {
    let (_, rest) = stat.rsplit_once(") ")?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// A /proc/PID/status field in MiB (VmRSS, VmHWM).
pub fn mem_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':').map(str::to_string))
        })
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

/// Resets process `pid`'s peak RSS (VmHWM) to its current RSS
/// (`/proc/PID/clear_refs`, Linux 4.0 and later), so that VmHWM read later
/// is the peak since now.
pub fn reset_peak_rss(pid: u32) -> anyhow::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// Latency percentiles from h2load's per-request log (µs in the last column).
pub struct FixedRate {
    pub requests: usize,
    pub failed: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
}

pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i]
}

/// What a path's requests are: HTTP/1.1 or HTTP/2 GETs, or gRPC unary
/// calls (`grpc.health.v1.Health/Check`, as h2load sends them: a POST of
/// an empty request message with gRPC's headers).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Load {
    H1,
    H2,
    Grpc,
}

impl Load {
    /// h2load's arguments for this kind of request; `scratch` is a path
    /// this run may write (the gRPC request body goes there).
    fn h2load_args(self, host: &str, scratch: &Path) -> anyhow::Result<Vec<String>> {
        let mut args = vec!["-H".to_string(), format!(":authority: {host}")];
        match self {
            Load::H1 => args.insert(0, "--h1".into()),
            Load::H2 => {}
            Load::Grpc => {
                // One length-prefixed message: uncompressed, 0 bytes (an
                // empty HealthCheckRequest asks about the whole server).
                let body = scratch.with_extension("grpc-request");
                std::fs::write(&body, [0u8; 5])?;
                args.extend([
                    "-d".into(),
                    body.display().to_string(),
                    "-H".into(),
                    "content-type: application/grpc".into(),
                    "-H".into(),
                    "te: trailers".into(),
                ]);
            }
        }
        Ok(args)
    }
}

/// A steady `rps` over `clients` connections for `secs` (h2load's
/// `--rps`), per-request times from its log.
pub fn h2load_fixed(
    url: &str,
    host: &str,
    load: Load,
    clients: u32,
    rps: u32,
    secs: u64,
    log: &Path,
) -> anyhow::Result<FixedRate> {
    // h2load appends to its log: start each run with an empty one, or a
    // run would count the requests of the runs before it.
    let _ = std::fs::remove_file(log);
    let per_client = rps as f64 / clients as f64;
    let out = Command::new("h2load")
        .args(load.h2load_args(host, log)?)
        .args([
            "-c",
            &clients.to_string(),
            &format!("--rps={per_client}"),
            "-D",
            &secs.to_string(),
            "--warm-up-time=1",
        ])
        .arg(format!("--log-file={}", log.display()))
        .arg(url)
        .output()
        .context("running h2load")?;
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut times = Vec::new();
    let mut failed = 0;
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 3 {
            continue;
        }
        if f[1] != "200" {
            failed += 1;
        }
        if let Ok(us) = f[2].parse::<f64>() {
            times.push(us / 1000.0);
        }
    }
    if times.is_empty() {
        bail!(
            "h2load recorded no requests to {url}:\n{}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(FixedRate {
        requests: times.len(),
        failed,
        p50_ms: percentile(&times, 0.50),
        p90_ms: percentile(&times, 0.90),
        p99_ms: percentile(&times, 0.99),
    })
}

/// Exactly `n` requests at a steady `rps` over `clients` connections;
/// fails unless every one succeeded.
pub fn h2load_count(
    url: &str,
    host: &str,
    load: Load,
    (clients, rps, n): (u32, u32, u32),
    scratch: &Path,
) -> anyhow::Result<()> {
    let out = Command::new("h2load")
        .args(load.h2load_args(host, scratch)?)
        .args([
            "-c",
            &clients.to_string(),
            &format!("--rps={}", rps as f64 / clients as f64),
            "-n",
            &n.to_string(),
        ])
        .arg(url)
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let done = format!("{n} succeeded, 0 failed, 0 errored");
    anyhow::ensure!(
        text.lines().any(|l| l.contains(&done)),
        "h2load to {url}: not all {n} requests succeeded:\n{text}"
    );
    Ok(())
}

/// A script that runs `exe` under valgrind's callgrind, which writes each
/// process's counts to `dir/callgrind.PID.N` whenever they are dumped.
pub fn callgrind_wrapper(exe: &Path, dir: &Path, args: &[&str]) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("callgrind-sidecar");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec valgrind --tool=callgrind --quiet {} --callgrind-out-file={}/callgrind.%p {} \"$@\"\n",
            args.join(" "),
            dir.display(),
            exe.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok(script)
}

/// Runs `callgrind_control FLAG` (`-z` zeroes the counts, `-d` dumps them)
/// on each of `pids`.
pub fn callgrind_control(flag: &str, pids: &[u32]) -> anyhow::Result<()> {
    for pid in pids {
        let out = Command::new("callgrind_control")
            .args([flag, &pid.to_string()])
            .output()
            .context("running callgrind_control")?;
        anyhow::ensure!(
            out.status.success(),
            "callgrind_control {flag} {pid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The instructions `pid` ran between its last zeroing and its `dump`th
/// dump (the `summary:` line of `dir/callgrind.PID.DUMP`), waiting a few
/// seconds for valgrind to write it.
pub fn callgrind_instructions(dir: &Path, pid: u32, dump: u32) -> anyhow::Result<u64> {
    let file = dir.join(format!("callgrind.{pid}.{dump}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        if let Some(n) = text
            .lines()
            .find_map(|l| l.strip_prefix("summary: "))
            .and_then(|v| v.trim().parse().ok())
        {
            return Ok(n);
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "no callgrind summary in {}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The functions `pid` ran between its last zeroing and its `dump`th dump,
/// by the names in `dir/callgrind.PID.DUMP` (mangled under
/// `--demangle=no`), waiting a few seconds for valgrind to write it.
/// Recursion levels (`name'2`) count as their function; code without a
/// symbol (`0x...`) and valgrind's `(below main)` are left out.
pub fn callgrind_functions(
    dir: &Path,
    pid: u32,
    dump: u32,
) -> anyhow::Result<std::collections::BTreeSet<String>> {
    callgrind_instructions(dir, pid, dump)?;
    let text = std::fs::read_to_string(dir.join(format!("callgrind.{pid}.{dump}")))?;
    Ok(text
        .lines()
        .filter_map(|l| l.strip_prefix("fn=").or_else(|| l.strip_prefix("cfn=")))
        // `(ID) NAME` the first time an ID appears, `(ID)` after.
        .filter_map(|l| l.split_once(") ").map(|(_, name)| name.trim()))
        .map(|name| match name.rsplit_once('\'') {
            Some((f, n)) if n.bytes().all(|b| b.is_ascii_digit()) => f,
            _ => name,
        })
        .filter(|name| !name.starts_with("0x") && !name.starts_with('('))
        .map(str::to_string)
        .collect())
}

/// A GET of `url` (`http://ADDR/PATH`) on HTTP/1.0; fails unless it
/// answers 200.
pub fn http_get(url: &str) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").context("not an http:// URL")?;
    let (addr, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let mut tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(tcp, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut answer = String::new();
    tcp.read_to_string(&mut answer)?;
    let status = answer.lines().next().unwrap_or_default();
    anyhow::ensure!(status.contains(" 200 "), "answered {status:?}");
    Ok(())
}

/// h2load at maximum throughput over `conns` HTTP/2 connections, one
/// stream each at a time (wrk's HTTP/1.1 model); returns requests per
/// second. Refuses a run where any request failed.
pub fn h2load_max(
    url: &str,
    host: &str,
    load: Load,
    conns: u32,
    secs: u64,
    scratch: &Path,
) -> anyhow::Result<f64> {
    let out = Command::new("h2load")
        .args(load.h2load_args(host, scratch)?)
        .args(["-c", &conns.to_string(), "-m", "1", "-D", &secs.to_string()])
        .arg(url)
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "requests: 10 total, 10 started, 10 done, 10 succeeded, 0 failed, ..."
    let counts = text
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .with_context(|| format!("h2load printed no request counts for {url}:\n{text}"))?;
    let count = |what: &str| -> Option<u64> {
        counts
            .split(", ")
            .find_map(|c| c.strip_suffix(what)?.trim().parse().ok())
    };
    let (done, succeeded) = (count(" done"), count(" succeeded"));
    if done.is_none() || done != succeeded {
        bail!("h2load to {url}: not every request succeeded: {counts}");
    }
    // "finished in 15.00s, 30381.73 req/s, 33.37MB/s"
    text.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1)?.strip_suffix(" req/s")?.parse().ok())
        .with_context(|| format!("h2load printed no rate for {url}:\n{text}"))
}

/// wrk at maximum throughput; returns requests per second.
pub fn wrk_max(url: &str, host: &str, conns: u32, secs: u64) -> anyhow::Result<f64> {
    let out = Command::new("wrk")
        .args([
            "-t1",
            "-c",
            &conns.to_string(),
            "-d",
            &format!("{secs}s"),
            "-H",
            &format!("Host: {host}"),
        ])
        .arg(url)
        .output()
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(errors) = text.lines().find(|l| l.contains("Non-2xx")) {
        bail!("wrk to {url}: {}", errors.trim());
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("wrk printed no rate for {url}:\n{text}"))
}

/// The upstream every path ends at: 1 KiB bodies over HTTP/1.1 and h2c.
pub async fn upstream(addr: SocketAddr) -> anyhow::Result<()> {
    use hyper::body::Bytes;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    static BODY: [u8; 1024] = [b'x'; 1024];
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(Bytes::from_static(&BODY)),
                    ))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(
                    hyper_util::rt::TokioExecutor::new(),
                )
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                .await;
            });
        }
    });
    Ok(())
}

/// The gRPC upstream: `grpc.health.v1.Health` answering SERVING, over h2c,
/// with TCP_NODELAY as gRPC servers set it (without it, Nagle holds each
/// response on a multiplexed connection until the last one is ACKed).
pub async fn grpc_upstream(addr: SocketAddr) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(incoming),
    );
    Ok(())
}

/// One `grpc.health.v1.Health/Check` to `url` with `authority` as its
/// :authority: whether a gRPC call through there succeeds end to end
/// (h2load counts an HTTP 200 whatever its grpc-status says).
pub async fn grpc_check(url: &str, authority: &str) -> anyhow::Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())?
        .origin(format!("http://{authority}").parse()?)
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let status = tonic_health::pb::health_client::HealthClient::new(channel)
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .with_context(|| format!("Health/Check through {url} (authority {authority})"))?
        .into_inner()
        .status;
    anyhow::ensure!(
        status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
        "Health/Check through {url} answered status {status}, not SERVING"
    );
    Ok(())
}

pub fn wait_listening(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    while std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{addr} is not listening"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// On SIGINT or SIGTERM, stops `pids` (the benchmark's own children) and
/// any build running (`stop_builds`), and removes `dir` (its scratch
/// directory) before it exits, so an interrupted run leaves nothing behind:
/// `std::process::exit` runs no destructors, so the directory's `TempDir`
/// would never remove it.
pub fn kill_on_signal(
    rt: &tokio::runtime::Runtime,
    pids: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
    dir: PathBuf,
) {
    rt.spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let pids = pids.lock().unwrap().clone();
        let built = stop_builds(Duration::from_secs(5));
        match both(built, stop_and_clean(&pids, &dir, Duration::from_secs(5))) {
            Ok(()) => eprintln!(
                "interrupted; stopped the processes the benchmark started and removed {}",
                dir.display()
            ),
            Err(e) => eprintln!("interrupted; {e:#}"),
        }
        std::process::exit(130);
    });
}

/// Ends `pids` and, once they have exited (a process still writing its
/// logs would put files back) or `within` has passed, removes `dir`. An
/// error names whichever of the two failed, or both.
pub fn stop_and_clean(pids: &[u32], dir: &Path, within: Duration) -> anyhow::Result<()> {
    let stopped = terminate(pids, within);
    // Gone already is clean: the run's own error path (an ended build fails
    // it) may have dropped the directory first.
    let removed = match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.with_context(|| format!("removing {}", dir.display())),
    };
    both(stopped, removed)
}

/// Two outcomes as one: an error names whichever failed, or both.
fn both(first: anyhow::Result<()>, second: anyhow::Result<()>) -> anyhow::Result<()> {
    match (first, second) {
        (Err(f), Err(s)) => Err(s.context(format!("{f:#}"))),
        (f, s) => f.and(s),
    }
}

/// Builds the sidecar as deployed (`cargo build-sidecar`, an alias in
/// `.cargo/config.toml`) and returns the binary's path; or, when
/// `MESH_BENCH_SIDECAR` names a binary, that one (to compare two builds in
/// the same way).
pub fn build_sidecar() -> anyhow::Result<PathBuf> {
    if let Some(exe) = std::env::var_os("MESH_BENCH_SIDECAR") {
        let exe = PathBuf::from(exe);
        anyhow::ensure!(
            exe.is_file(),
            "MESH_BENCH_SIDECAR: {} is not a file",
            exe.display()
        );
        eprintln!("sidecar: {} (MESH_BENCH_SIDECAR)", exe.display());
        return Ok(exe);
    }
    let exe = cargo(&["build-sidecar"], "sidecar", "mesh-proxy")?;
    let layout = Layout::of(&exe)?;
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "sidecar layout: {} of the {} functions in proxy/sidecar.order are in the binary, \
         within its first {:.1} of {:.1} MiB of code",
        layout.found,
        layout.listed,
        mb(layout.span),
        mb(layout.text)
    );
    if layout.stale() {
        eprintln!(
            "  the list is stale (another toolchain or dependency versions?): \
             `bench-dataplane --layout` writes it afresh"
        );
    }
    Ok(exe)
}

/// Builds `package` with `profile` (`cargo build --profile P -p PKG`) and
/// returns the path of its binary `bin`.
pub fn build(profile: &str, package: &str, bin: &str) -> anyhow::Result<PathBuf> {
    cargo(
        &["build", "--profile", profile, "-p", package],
        profile,
        bin,
    )
}

/// Runs `cargo --quiet ARGS` in the workspace and returns where the
/// `profile` build of `bin` is.
fn cargo(args: &[&str], profile: &str, bin: &str) -> anyhow::Result<PathBuf> {
    let workspace = workspace();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building: cargo {}", args.join(" "));
    let ok = run_build(
        Command::new(cargo)
            .arg("--quiet")
            .args(args)
            .current_dir(&workspace),
    )?;
    anyhow::ensure!(ok, "cargo {} failed", args.join(" "));
    Ok(target_dir().join(profile).join(bin))
}

/// The builds running now (the `cargo` processes started by `run_build`),
/// for `stop_builds`.
static BUILDS: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

/// Runs a build (`cargo ...`) to its end and says whether it succeeded;
/// `stop_builds` can end it, and what it started, while it runs.
fn run_build(cargo: &mut Command) -> anyhow::Result<bool> {
    let mut child = cargo.spawn().context("running cargo")?;
    BUILDS.lock().unwrap().push(child.id());
    let status = child.wait();
    BUILDS.lock().unwrap().retain(|&pid| pid != child.id());
    Ok(status.context("waiting for cargo")?.success())
}

/// Ends the builds running now and every process below them (rustc, build
/// scripts): a benchmark stopped by SIGTERM while it builds would otherwise
/// leave them running to their end (a Ctrl-C reaches them directly, as
/// members of the terminal's foreground process group; a SIGTERM to the
/// benchmark alone does not). Waits up to `within` for all of them to exit.
pub fn stop_builds(within: Duration) -> anyhow::Result<()> {
    let builds = BUILDS.lock().unwrap().clone();
    // Found before the build is ended: once it has, its children belong to
    // another parent.
    let mut pids = Vec::new();
    for build in builds {
        pids.push(build);
        pids.extend(descendants(build));
    }
    match pids.is_empty() {
        true => Ok(()),
        false => terminate(&pids, within).context("ending the build (cargo) that was running"),
    }
}

/// The processes below `pid` in the process tree, from each one's parent in
/// `/proc/PID/stat`.
fn descendants(pid: u32) -> Vec<u32> {
    let parent_of = |p: u32| proc_stat(p)?.get(1)?.parse().ok();
    let links: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let p: u32 = entry.file_name().to_str()?.parse().ok()?;
            Some((p, parent_of(p)?))
        })
        .collect();
    let (mut found, mut next) = (Vec::new(), vec![pid]);
    while let Some(parent) = next.pop() {
        for &(child, _) in links.iter().filter(|(_, p)| *p == parent) {
            found.push(child);
            next.push(child);
        }
    }
    found
}

/// The arguments `cargo build-sidecar` stands for (an alias in
/// `.cargo/config.toml`; a test keeps the two the same).
const BUILD_SIDECAR: [&str; 10] = [
    "rustc",
    "--profile",
    "sidecar",
    "-p",
    "mesh-proxy",
    "--bin",
    "mesh-proxy",
    "--",
    "-C",
    "target-feature=+crt-static",
];

/// Builds the sidecar as `cargo build-sidecar` does, but instrumented to
/// count what it runs (`-Cprofile-generate`; for `bench-dataplane --pgo`):
/// each process adds its counts to a file in `raw` as it exits. Its own
/// target directory (`<target>/pgo-generate`) keeps the deployed build's
/// apart, and an empty `RUSTC_WRAPPER` leaves out the workspace's wrapper,
/// so the instrumented build is not also optimised with the old profile.
/// `raw` is emptied once the build is done: instrumented build scripts write
/// their counts there too.
pub fn build_instrumented_sidecar(raw: &Path) -> anyhow::Result<PathBuf> {
    let target = target_dir().join("pgo-generate");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The alias's own arguments: any after an alias would go to rustc.
    let rustc_from = BUILD_SIDECAR.iter().position(|&a| a == "--").unwrap();
    let (cargo_args, rustc_args) = BUILD_SIDECAR.split_at(rustc_from);
    eprintln!("building the instrumented sidecar in {}", target.display());
    let ok = run_build(
        Command::new(cargo)
            .arg("--quiet")
            .args(cargo_args)
            .arg("--target-dir")
            .arg(&target)
            .args(rustc_args)
            .env("RUSTC_WRAPPER", "")
            .env("RUSTFLAGS", format!("-Cprofile-generate={}", raw.display()))
            .current_dir(workspace()),
    )?;
    anyhow::ensure!(ok, "building the instrumented sidecar failed");
    if raw.exists() {
        std::fs::remove_dir_all(raw).with_context(|| format!("emptying {}", raw.display()))?;
    }
    std::fs::create_dir_all(raw)?;
    Ok(target.join("sidecar/mesh-proxy"))
}

/// The profile the deployed sidecar is optimised with (`proxy/pgo-rustc`).
pub fn pgo_file() -> PathBuf {
    workspace().join("proxy/sidecar.profdata")
}

/// `llvm-profdata` of the toolchain's own LLVM (rustup's `llvm-tools`
/// component, added if it is missing): raw counts are only read by the LLVM
/// version that wrote them.
pub fn llvm_profdata() -> anyhow::Result<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let ask = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&rustc)
            .args(args)
            .output()
            .context("running rustc")?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let sysroot = ask(&["--print", "sysroot"])?;
    let verbose = ask(&["-vV"])?;
    let host = verbose
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` names no host")?;
    let tool = Path::new(sysroot.trim()).join(format!("lib/rustlib/{host}/bin/llvm-profdata"));
    if !tool.exists() {
        eprintln!("installing rustup's llvm-tools component");
        let ok = Command::new("rustup")
            .args(["component", "add", "llvm-tools"])
            .status()
            .is_ok_and(|s| s.success());
        anyhow::ensure!(
            ok && tool.exists(),
            "{} is missing: `rustup component add llvm-tools` installs it",
            tool.display()
        );
    }
    Ok(tool)
}

/// Sends SIGTERM to each of `pids` and waits until every one has exited
/// (gone, or a zombie its parent has not yet reaped), for at most `within`.
pub fn terminate(pids: &[u32], within: Duration) -> anyhow::Result<()> {
    for pid in pids {
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill")?;
    }
    // Gone, or a zombie its parent has yet to reap.
    let exited = |&pid: &u32| proc_stat(pid).is_none_or(|f| f.first().is_some_and(|s| s == "Z"));
    let deadline = std::time::Instant::now() + within;
    while !pids.iter().all(exited) {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "processes {pids:?} had not all exited {within:?} after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The workspace's root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Cargo's target directory for the workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target"))
}

/// The sidecar's markers around the code only start-up runs, which it
/// unmaps once settled (`proxy/src/main.rs`): `sidecar.order` names them
/// around that group.
pub const LAYOUT_MARKERS: (&str, &str) = ("mesh_layout_cold_begin", "mesh_layout_cold_end");

/// The list of functions the sidecar is linked with first
/// (`proxy/sidecar.order`, one symbol a line, `#` for comments).
pub fn layout_file() -> PathBuf {
    workspace().join("proxy/sidecar.order")
}

/// How a sidecar binary was laid out, by its symbol table (`nm`).
#[derive(Debug)]
pub struct Layout {
    /// Functions the list names.
    pub listed: usize,
    /// Of those, the ones the binary has.
    pub found: usize,
    /// Bytes from the first function in the binary to the end of the last
    /// one listed and found: about their total size when they come first,
    /// nearly `text` when they lie among the rest.
    pub span: u64,
    /// Bytes from the first function to the end of the last.
    pub text: u64,
    /// Where the sidecar's markers ([`LAYOUT_MARKERS`]) are: around the
    /// code it unmaps once settled. Empty if it lacks them.
    pub cold: std::ops::Range<u64>,
}

impl Layout {
    /// Whether fewer than 90 % of the names listed are in the binary: the
    /// list was written for another toolchain or other dependency versions.
    pub fn stale(&self) -> bool {
        self.found * 10 < self.listed * 9
    }

    pub fn of(exe: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(layout_file()).context("reading proxy/sidecar.order")?;
        let listed: std::collections::HashSet<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        let out = Command::new("nm")
            .args(["--defined-only", "--print-size"])
            .arg(exe)
            .output()
            .context("running nm (binutils)")?;
        anyhow::ensure!(
            out.status.success(),
            "nm {}: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut found = std::collections::HashSet::new();
        let (mut first, mut end, mut listed_end) = (u64::MAX, 0, 0);
        let mut cold = 0..0;
        let symbols = String::from_utf8_lossy(&out.stdout);
        for line in symbols.lines() {
            // `ADDRESS [SIZE] TYPE NAME`; functions are t/T (w/W: weak).
            let f: Vec<&str> = line.split_whitespace().collect();
            let (addr, size, kind, name) = match f[..] {
                [a, s, k, n] => (a, u64::from_str_radix(s, 16).unwrap_or(0), k, n),
                [a, k, n] => (a, 0, k, n),
                _ => continue,
            };
            if !matches!(kind, "t" | "T" | "W" | "w") {
                continue;
            }
            let Ok(addr) = u64::from_str_radix(addr, 16) else {
                continue;
            };
            first = first.min(addr);
            end = end.max(addr + size);
            if name == LAYOUT_MARKERS.0 {
                cold.start = addr;
            } else if name == LAYOUT_MARKERS.1 {
                cold.end = addr;
            }
            if listed.contains(name) {
                found.insert(name);
                listed_end = listed_end.max(addr + size);
            }
        }
        anyhow::ensure!(
            first < end,
            "{} has no functions in its symbol table",
            exe.display()
        );
        Ok(Self {
            listed: listed.len(),
            found: found.len(),
            span: listed_end.saturating_sub(first),
            text: end - first,
            cold,
        })
    }

    /// How many bytes of the stretch between the markers process `pid`
    /// (running `exe`) has resident, and how many whole pages' worth the
    /// stretch covers (what the sidecar unmaps).
    pub fn cold_resident(&self, pid: u32, exe: &Path) -> anyhow::Result<(u64, u64)> {
        use std::io::{Read, Seek, SeekFrom};
        const PAGE: u64 = 4096;
        let exe = std::fs::canonicalize(exe)?;
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
        // `START-END PERMS OFFSET DEV INODE PATH`: the binary's mapping at
        // file offset 0 is where it was loaded (it is position-independent).
        let base = maps
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 6 && f[2] == "00000000" && Path::new(f[5]) == exe)
                    .then(|| u64::from_str_radix(f[0].split('-').next()?, 16).ok())
                    .flatten()
            })
            .next()
            .with_context(|| format!("process {pid} has not mapped {}", exe.display()))?;
        let (first, last) = (
            self.cold.start.next_multiple_of(PAGE),
            self.cold.end / PAGE * PAGE,
        );
        if last <= first {
            return Ok((0, 0));
        }
        // One 64-bit entry a page; bit 63: present in memory.
        let mut file = std::fs::File::open(format!("/proc/{pid}/pagemap"))?;
        let pages = ((last - first) / PAGE) as usize;
        let mut entries = vec![0u8; pages * 8];
        file.seek(SeekFrom::Start((base + first) / PAGE * 8))?;
        file.read_exact(&mut entries)?;
        let resident = entries
            .chunks_exact(8)
            .filter(|e| u64::from_le_bytes((*e).try_into().expect("8 bytes")) >> 63 == 1)
            .count() as u64;
        Ok((resident * PAGE, last - first))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminate_waits_for_the_process_to_exit() {
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        let started = std::time::Instant::now();
        terminate(&[child.id()], Duration::from_secs(10)).unwrap();
        assert!(started.elapsed() < Duration::from_secs(5));
        // Exited by the signal, not by running out its time.
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(15));
    }

    #[test]
    fn stat_fields_start_after_the_whole_command_name() {
        // A command name may hold a space and a `) `.
        let line = "4242 (odd) S name) S 1 4242 4242 0 -1 4194560 120 0 0 0 731 268 0 0";
        let f = stat_fields(line).unwrap();
        assert_eq!((f[0].as_str(), f[1].as_str()), ("S", "1"));
        assert_eq!((f[11].as_str(), f[12].as_str()), ("731", "268"));
    }

    #[test]
    fn cpu_seconds_counts_what_a_process_uses() {
        let me = std::process::id();
        let before = cpu_seconds(me);
        let spin = std::time::Instant::now();
        while cpu_seconds(me) == before && spin.elapsed() < Duration::from_secs(5) {}
        assert!(
            cpu_seconds(me) > before,
            "no CPU time seen in 5 s of spinning"
        );
        assert_eq!(cpu_seconds(u32::MAX), 0.0, "a process that is not there");
    }

    #[test]
    fn an_interrupted_build_ends_with_what_it_started() {
        // A stand-in for cargo: a shell that starts a child (as cargo starts
        // rustc) and waits for it.
        let dir = tempfile::tempdir().unwrap();
        let child_pid = dir.path().join("child.pid");
        let script = format!("sleep 60 & echo $! > {}; wait", child_pid.display());
        let build = std::thread::spawn(move || run_build(Command::new("sh").args(["-c", &script])));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let child: u32 = loop {
            if let Some(pid) = std::fs::read_to_string(&child_pid)
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the build never started its child"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let started = std::time::Instant::now();
        stop_builds(Duration::from_secs(5)).unwrap();
        assert!(
            !build.join().unwrap().unwrap(),
            "an ended build is not a success"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        // The build's own child is gone too (or a zombie its new parent has
        // yet to reap), not left sleeping.
        let left = proc_stat(child);
        assert!(
            left.as_ref().is_none_or(|f| f[0] == "Z"),
            "the build's child is still running: {left:?}"
        );
        assert!(BUILDS.lock().unwrap().is_empty());
        // Nothing running: nothing to do.
        stop_builds(Duration::from_secs(1)).unwrap();
    }

    /// A process that ignores SIGTERM, once it does.
    fn deaf_to_sigterm() -> std::process::Child {
        // Ignored stays ignored across exec.
        let child = Command::new("sh")
            .args(["-c", "trap '' TERM; exec sleep 60"])
            .spawn()
            .unwrap();
        // Until it ignores SIGTERM (bit 15 of SigIgn, 0x4000).
        let ignores = || {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .is_some_and(|m| m & 0x4000 != 0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !ignores() {
            assert!(
                std::time::Instant::now() < deadline,
                "the trap was never set"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    }

    #[test]
    fn terminate_says_so_when_a_process_outlives_its_time() {
        let mut child = deaf_to_sigterm();
        let outcome = terminate(&[child.id()], Duration::from_millis(500));
        child.kill().unwrap();
        child.wait().unwrap();
        let err = outcome.unwrap_err();
        assert!(err.to_string().contains("had not all exited"), "{err}");
    }

    #[test]
    fn an_interrupted_run_leaves_no_process_and_no_scratch_directory() {
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir(dir.join("citadel")).unwrap();
        std::fs::write(dir.join("citadel/root.pem"), "x").unwrap();
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        stop_and_clean(&[child.id()], &dir, Duration::from_secs(5)).unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(child.wait().unwrap().signal(), Some(15));
        assert!(!dir.exists(), "{} is still there", dir.display());
    }

    #[test]
    fn an_interrupted_run_that_cannot_clean_up_says_what_was_left() {
        let mut child = deaf_to_sigterm();
        // A directory that cannot be removed: its path runs through a file.
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), "").unwrap();
        let stuck = dir.path().join("file/scratch");
        let outcome = stop_and_clean(&[child.id()], &stuck, Duration::from_millis(300));
        child.kill().unwrap();
        child.wait().unwrap();
        let err = format!("{:#}", outcome.unwrap_err());
        assert!(err.contains("had not all exited"), "{err}");
        assert!(
            err.contains(&format!("removing {}", stuck.display())),
            "{err}"
        );
    }

    #[test]
    fn a_scratch_directory_already_gone_is_clean() {
        // As when the run's own error path removed it first.
        let gone = tempfile::tempdir().unwrap().path().join("scratch");
        stop_and_clean(&[], &gone, Duration::from_secs(1)).unwrap();
    }

    #[test]
    fn build_sidecar_matches_the_alias() {
        let config = std::fs::read_to_string(workspace().join(".cargo/config.toml")).unwrap();
        let quoted: Vec<String> = BUILD_SIDECAR.iter().map(|a| format!("\"{a}\"")).collect();
        let line = format!("build-sidecar = [{}]", quoted.join(", "));
        assert!(
            config.lines().any(|l| l == line),
            "`.cargo/config.toml` has no line `{line}`"
        );
    }
}
