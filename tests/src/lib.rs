//! The end-to-end test harness: the bookinfo mesh run in-process on a
//! loopback block of its own (127.A.B.0/24, picked at random), so tests
//! can run side by side.
#![forbid(unsafe_code)]

pub mod bench;
pub mod otlp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshctl::controlplane::ControlPlane;
use meshctl::workloads::{self, Launcher, Pods, WorkloadSpec};
use rand::Rng;

pub struct Mesh {
    pub cp: ControlPlane,
    pub specs: Vec<WorkloadSpec>,
    pub config_dir: PathBuf,
    pods: Option<Pods>,
    _dir: tempfile::TempDir,
}

/// The sample's addresses, moved to 127.A.B.*.
fn relocate(text: &str, block: &str) -> String {
    text.replace("127.0.10.", block)
}

/// Reports whatever original destination the test sets.
struct Redirected(Arc<Mutex<Option<SocketAddr>>>);

impl mesh_proxy::platform::Sockets for Redirected {
    fn original_dst(&self, _: &tokio::net::TcpStream) -> Option<SocketAddr> {
        *self.0.lock().unwrap()
    }
}

/// A loopback block for one test, 127.A.B.0/24, picked at random so that
/// tests running at once do not share addresses.
pub fn loopback_block() -> (u8, u8) {
    let mut rng = rand::rng();
    (rng.random_range(20..250u8), rng.random_range(1..250u8))
}

impl Mesh {
    /// Starts citadel, pilot and every bookinfo workload; waits until ready.
    pub async fn start() -> Self {
        Self::start_with_cert_lifetime(mesh_citadel::DEFAULT_LIFETIME).await
    }

    /// As [`Mesh::start`], with every certificate living `lifetime`.
    pub async fn start_with_cert_lifetime(lifetime: Duration) -> Self {
        let (a, b) = loopback_block();
        let block = format!("127.{a}.{b}.");
        let dir = tempfile::tempdir().expect("temp dir");
        let config_dir = dir.path().join("config");
        std::fs::create_dir_all(&config_dir).unwrap();
        for (name, text) in mesh_samples::CONFIG {
            std::fs::write(config_dir.join(name), relocate(text, &block)).unwrap();
        }
        let specs = workloads::from_config(&config_dir).expect("sample config loads");
        let cp_ip = IpAddr::V4(Ipv4Addr::new(127, a, b, 254));
        let cp = ControlPlane::start_with_lifetime(dir.path(), &config_dir, cp_ip, lifetime)
            .await
            .expect("control plane starts");
        let pods = workloads::launch(&cp, &specs, &Launcher::InProcess, dir.path())
            .await
            .expect("workloads start");
        workloads::wait_ready(&specs, Duration::from_secs(30), |_, _, _| {})
            .await
            .expect("mesh becomes ready");
        Self {
            cp,
            specs,
            config_dir,
            pods: Some(pods),
            _dir: dir,
        }
    }

    /// Credentials for `identity` from the mesh's citadel.
    pub async fn creds_for(
        &self,
        identity: &mesh_identity::SpiffeId,
    ) -> mesh_identity::Credentials {
        mesh_identity::grpc::certificate_from(
            self.cp.ca_addr,
            &self.cp.token_for(identity),
            identity,
            Duration::ZERO,
            &self.cp.citadel.roots_pem(),
        )
        .await
        .expect("citadel issues")
    }

    /// Starts a sidecar for the client's identity on `ip`, as if
    /// interception sent the app's connections to it: each connection's
    /// original destination is whatever `dst` holds when it arrives.
    pub async fn captured_sidecar(
        &self,
        ip: IpAddr,
        policy: mesh_proxy::OutboundPolicy,
        dst: Arc<Mutex<Option<SocketAddr>>>,
    ) {
        self.client_sidecar(ip, dst, |cfg| cfg.outbound_policy = policy)
            .await;
    }

    /// Starts another sidecar for the client's identity on `ip`, its
    /// config as `edit` leaves it, and waits until it is ready. Its
    /// captured connections' original destination is what `dst` holds.
    pub async fn client_sidecar(
        &self,
        ip: IpAddr,
        dst: Arc<Mutex<Option<SocketAddr>>>,
        edit: impl FnOnce(&mut mesh_proxy::Config),
    ) {
        let identity = self.identity_of("client");
        let mut cfg = mesh_proxy::Config {
            ca_token: self.cp.token_for(&identity),
            roots_pem: self.cp.citadel.roots_pem().to_string(),
            ..mesh_proxy::Config::new(
                format!("captured-{ip}.default"),
                identity,
                ip,
                self.cp.pilot_addr,
                self.cp.ca_addr,
            )
        };
        edit(&mut cfg);
        tokio::spawn(mesh_proxy::run_with_sockets(
            cfg,
            Box::new(Redirected(dst)),
            std::future::pending(),
        ));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        while !http
            .get(format!("http://{ip}:15021/healthz/ready"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "captured sidecar on {ip} not ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The address with last octet `last` in the client's loopback block:
    /// where a test starts another sidecar of its own.
    pub fn beside_client(&self, last: u8) -> IpAddr {
        let IpAddr::V4(client) = self.workload("client").address else {
            unreachable!("the mesh runs on IPv4 loopback")
        };
        let [a, b, c, _] = client.octets();
        IpAddr::from([a, b, c, last])
    }

    /// Where citadel's state, tokens and config live (`meshctl --state-dir`).
    pub fn state_dir(&self) -> &Path {
        self._dir.path()
    }

    pub fn workload(&self, name: &str) -> &WorkloadSpec {
        self.specs
            .iter()
            .find(|w| w.name == name)
            .unwrap_or_else(|| panic!("no workload {name}"))
    }

    pub fn identity_of(&self, name: &str) -> mesh_identity::SpiffeId {
        let w = self.workload(name);
        mesh_identity::SpiffeId::new(
            mesh_identity::DEFAULT_TRUST_DOMAIN,
            &w.namespace,
            &w.service_account,
        )
    }

    /// An HTTP client whose requests enter the mesh through `client`'s sidecar.
    pub fn client(&self) -> reqwest::Client {
        let proxy = format!("http://{}", self.workload("client").outbound());
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(proxy).unwrap())
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap()
    }

    /// One verified request to productpage: reviews version and hops.
    pub async fn request(
        &self,
        http: &reqwest::Client,
    ) -> Result<(String, Vec<meshctl::traffic::Hop>), String> {
        meshctl::traffic::one(http, &self.identity_of("client").to_string()).await
    }

    /// Waits until every sidecar is connected to the current pilot and has
    /// acknowledged a push.
    pub async fn wait_all_proxies_synced(&self, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let synced = self
                .cp
                .pilot()
                .expect("pilot runs")
                .proxies()
                .iter()
                .filter(|p| p.connected && p.acked_version > 0)
                .count();
            if synced == self.specs.len() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "only {synced} of {} sidecars synced with pilot",
                self.specs.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces a config file the way an editor does (write aside, rename).
    pub fn write_config(&self, name: &str, text: &str) {
        write_atomically(&self.config_dir.join(name), text);
    }

    /// Writes a config file and waits until `workload`'s sidecar holds a
    /// route named `route`; panics with pilot's errors if it never does.
    pub async fn apply(&self, file: &str, yaml: &str, workload: &str, route: &str) {
        self.write_config(file, yaml);
        let url = format!(
            "http://{}:15000/config_dump",
            self.workload(workload).address
        );
        let marker = format!("\"{route}\"");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let dump = match reqwest::get(&url).await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(_) => String::new(),
            };
            if dump.contains(&marker) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{workload} never got route {route}; pilot says: {:?}",
                self.cp.pilot().expect("pilot runs").errors()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `workload`'s sidecar holds Telemetry whose
    /// `/config_dump` (as compact JSON) contains `marker`; panics with
    /// pilot's errors if it never does.
    pub async fn wait_telemetry(&self, workload: &str, marker: &str) {
        self.wait_dump(workload, marker, |d| d["listener"]["telemetry"].to_string())
            .await
    }

    /// Waits until `workload`'s sidecar's `/config_dump` (as compact
    /// JSON) contains `marker`; panics with pilot's errors if it never does.
    pub async fn wait_config_dump(&self, workload: &str, marker: &str) {
        self.wait_dump(workload, marker, |d| d.to_string()).await
    }

    /// Waits until the part of `workload`'s `/config_dump` that `part`
    /// picks contains `marker`.
    async fn wait_dump(
        &self,
        workload: &str,
        marker: &str,
        part: impl Fn(&serde_json::Value) -> String,
    ) {
        let url = format!(
            "http://{}:15000/config_dump",
            self.workload(workload).address
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let dump: serde_json::Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
            let text = part(&dump);
            if text.contains(marker) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{workload} never got config with {marker}: {text}; pilot says {:?}",
                self.cp.pilot().expect("pilot runs").errors()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Prometheus text of `workload`'s sidecar.
    pub async fn stats(&self, workload: &str) -> String {
        let url = format!(
            "http://{}:15090/stats/prometheus",
            self.workload(workload).address
        );
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }

    pub async fn stop(mut self) {
        if let Some(p) = self.pods.take() {
            p.stop().await;
        }
        self.cp.stop().await;
    }
}

/// Sum of metric `name` (a counter's full name, `_total` included) over the
/// series in Prometheus text `stats` whose lines contain all of `with`.
/// A TLS acceptor serving `cert` with `key`, for a test's own HTTPS
/// server (no client certificate asked for).
pub fn tls_acceptor(cert: &rcgen::Certificate, key: &rcgen::KeyPair) -> tokio_rustls::TlsAcceptor {
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("a DER key"),
    )
    .expect("a matching certificate and key");
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config))
}

pub fn metric_sum(stats: &str, name: &str, with: &[&str]) -> f64 {
    stats
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
                && with.iter().all(|w| l.contains(w))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp~");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The reviews VirtualService sending everything to one subset.
pub fn reviews_all_to(subset: &str) -> String {
    let dr = mesh_samples::CONFIG
        .iter()
        .find(|(n, _)| *n == "reviews-routing.yaml")
        .unwrap()
        .1
        .split("\n---\n")
        .next()
        .unwrap()
        .to_string();
    format!(
        "{dr}\n---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: reviews, namespace: default}}\nspec:\n  hosts: [reviews]\n  http:\n  - route:\n    - destination: {{host: reviews, subset: {subset}}}\n"
    )
}

/// A mutual-TLS handshake with `addr` that succeeds only if the server
/// accepts us too (TLS 1.3 judges the client's certificate after the
/// client finishes; a refusal shows on the first read).
pub async fn handshake(
    config: std::sync::Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
    let mut b = [0u8; 1];
    match tokio::time::timeout(Duration::from_secs(5), tls.read(&mut b)).await {
        Ok(Ok(n)) if n > 0 => Ok(()),
        Ok(Ok(_)) => Err(std::io::Error::other("closed")),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(std::io::Error::other("no answer")),
    }
}

/// A JWT issuer for tests: a P-256 key, its JWKS, and tokens it signs.
pub struct Issuer {
    pub iss: String,
    pub kid: String,
    key: jsonwebtoken::EncodingKey,
    public: Vec<u8>,
}

impl Issuer {
    pub fn new(iss: &str, kid: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        Self {
            iss: iss.to_string(),
            kid: kid.to_string(),
            key: jsonwebtoken::EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            public: rcgen::PublicKeyData::der_bytes(&pair).to_vec(),
        }
    }

    /// The JWKS document with this issuer's public key.
    pub fn jwks(&self) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        // An uncompressed P-256 point: 0x04, x (32 bytes), y (32 bytes).
        let point = &self.public[self.public.len() - 65..];
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
            "x": b64.encode(&point[1..33]), "y": b64.encode(&point[33..]),
        }]})
        .to_string()
    }

    /// A token for `sub` with extra `claims`, expiring `exp_in` seconds from
    /// now (negative: already expired).
    pub fn token(&self, sub: &str, exp_in: i64, claims: serde_json::Value) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let mut body =
            serde_json::json!({"iss": self.iss, "sub": sub, "iat": now, "exp": now + exp_in});
        if let (Some(b), Some(extra)) = (body.as_object_mut(), claims.as_object()) {
            b.extend(extra.clone());
        }
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &body, &self.key).unwrap()
    }
}
