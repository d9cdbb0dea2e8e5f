//! bench-ca: how fast citadel signs workload CSRs over gRPC.
//!
//! 64 clients (by default), each with its own TLS connection and token,
//! send CreateCertificate requests back to back for a fixed time; every
//! request carries a real P-256 CSR (made before the clock starts, a pool
//! per client) and citadel does everything it does in production: TLS,
//! token check, CSR parse and signature check, key and SAN checks, signing.
//! The baseline, measured in the same run, is citadel's signing alone
//! (parse, check and sign in-process, one thread, no gRPC or TLS).
//!
//! Prints a table, then one JSON object on the last line with
//! `signs_per_s` and `p99_ms`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use mesh_citadel::{Citadel, Config};
use mesh_identity::SpiffeId;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_tests::bench::percentile;

#[derive(Parser)]
struct Args {
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How long to measure, after a warm-up of a second.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Distinct CSRs each client cycles through.
    #[arg(long, default_value_t = 8)]
    csrs_per_client: usize,
    /// A short run (3 s) to check the harness.
    #[arg(long)]
    quick: bool,
}

const TARGET_SIGNS_PER_S: f64 = 2000.0;
const TARGET_P99_MS: f64 = 20.0;

fn csr(identity: &SpiffeId) -> String {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(
        identity.to_string().try_into().unwrap(),
    )];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

struct Row {
    name: &'static str,
    count: usize,
    secs: f64,
    lat_ms: Vec<f64>,
}

impl Row {
    fn rate(&self) -> f64 {
        self.count as f64 / self.secs
    }
    fn print(&self) {
        let p = |q| percentile(&self.lat_ms, q);
        println!(
            "{:<22} {:>10.0} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            self.name,
            self.rate(),
            p(0.50),
            p(0.90),
            p(0.99),
            self.lat_ms.last().copied().unwrap_or(0.0),
            self.count
        );
    }
}

/// Citadel's signing path alone: parse and check the CSR, sign, one thread.
fn sign_only(citadel: &Citadel, csrs: &[(SpiffeId, String)], secs: Duration) -> Row {
    let start = Instant::now();
    let mut lat = Vec::new();
    let mut i = 0;
    while start.elapsed() < secs {
        let (id, pem) = &csrs[i % csrs.len()];
        let t = Instant::now();
        let checked = mesh_citadel::csr::check(pem).expect("valid CSR");
        citadel
            .authority()
            .issue(&checked.params.public_key, id, Duration::from_secs(3600))
            .expect("signs");
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        i += 1;
    }
    let secs = start.elapsed().as_secs_f64();
    lat.sort_by(f64::total_cmp);
    Row {
        name: "sign_only (baseline)",
        count: lat.len(),
        secs,
        lat_ms: lat,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.quick {
        args.duration = Duration::from_secs(3);
    }
    let dir = tempfile::tempdir()?;
    let citadel = Arc::new(Citadel::open(Config::new(dir.path()))?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let c = citadel.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        c.serve(listener, async {
            let _ = stop_rx.await;
        })
        .await
    });

    println!(
        "preparing {} clients x {} CSRs (P-256)...",
        args.clients, args.csrs_per_client
    );
    let clients: Vec<(SpiffeId, String, Vec<String>)> = (0..args.clients)
        .map(|n| {
            let id = SpiffeId::new("cluster.local", "bench", &format!("client-{n}"));
            let token = citadel.mint_token(&id, Duration::from_secs(3600));
            let csrs = (0..args.csrs_per_client).map(|_| csr(&id)).collect();
            (id, token, csrs)
        })
        .collect();
    let pool: Vec<(SpiffeId, String)> = clients
        .iter()
        .flat_map(|(id, _, csrs)| csrs.iter().map(|c| (id.clone(), c.clone())))
        .collect();

    let roots = Arc::new(mesh_identity::root_store(&citadel.roots_pem())?);
    let tls = mesh_identity::client_config(None, roots, citadel.identity(), &[b"h2"])?;
    let warmup = Duration::from_secs(1);
    let start = Instant::now() + warmup;
    let end = start + args.duration;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|(_, token, csrs)| {
            let channel = mesh_identity::grpc::channel(addr, tls.clone());
            tokio::spawn(async move {
                let mut client = IstioCertificateServiceClient::new(channel);
                let (mut lat, mut errors, mut i) = (Vec::new(), 0usize, 0usize);
                loop {
                    let t = Instant::now();
                    if t >= end {
                        break;
                    }
                    let mut req = tonic::Request::new(IstioCertificateRequest {
                        csr: csrs[i % csrs.len()].clone(),
                        validity_duration: 3600,
                        metadata: None,
                    });
                    req.metadata_mut()
                        .insert("authorization", format!("Bearer {token}").parse().unwrap());
                    let ok = client.create_certificate(req).await.is_ok();
                    let done = Instant::now();
                    if t >= start {
                        if ok {
                            lat.push((done - t).as_secs_f64() * 1e3);
                        } else {
                            errors += 1;
                        }
                    }
                    i += 1;
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    lat.sort_by(f64::total_cmp);
    let grpc = Row {
        name: "grpc_mtls_64_clients",
        count: lat.len(),
        secs: args.duration.as_secs_f64(),
        lat_ms: lat,
    };
    let _ = stop_tx.send(());
    let _ = server.await;

    // The baseline runs alone, after the server has stopped.
    let base = tokio::task::spawn_blocking({
        let citadel = citadel.clone();
        let secs = args.duration.min(Duration::from_secs(5));
        move || sign_only(&citadel, &pool, secs)
    })
    .await?;

    println!();
    println!(
        "{:<22} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "path", "signs/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "signed"
    );
    grpc.print();
    base.print();
    println!("errors: {errors}");
    let p99 = percentile(&grpc.lat_ms, 0.99);
    let met = grpc.rate() >= TARGET_SIGNS_PER_S && p99 <= TARGET_P99_MS && errors == 0;
    println!(
        "target: >= {TARGET_SIGNS_PER_S:.0} signs/s with p99 <= {TARGET_P99_MS} ms: {}",
        if met { "met" } else { "NOT met" }
    );
    println!(
        "{}",
        serde_json::json!({
            "signs_per_s": (grpc.rate() * 10.0).round() / 10.0,
            "p50_ms": percentile(&grpc.lat_ms, 0.50),
            "p90_ms": percentile(&grpc.lat_ms, 0.90),
            "p99_ms": p99,
            "errors": errors,
            "clients": args.clients,
            "duration_s": args.duration.as_secs_f64(),
            "baseline_sign_only_per_s": (base.rate() * 10.0).round() / 10.0,
            "baseline_sign_only_p99_ms": percentile(&base.lat_ms, 0.99),
            "target_met": met,
        })
    );
    Ok(())
}
