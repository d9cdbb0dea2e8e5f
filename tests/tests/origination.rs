//! How a sidecar speaks to endpoints outside the mesh, as Istio's
//! ServiceEntry and DestinationRule `trafficPolicy.tls` say: plaintext to
//! an endpoint without a sidecar (auto mutual TLS), and TLS the sidecar
//! originates (SIMPLE, MUTUAL) to servers this test runs with a CA of its
//! own, on loopback.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_tests::Mesh;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

/// What a server saw of one request.
#[derive(Clone, Debug, Default)]
struct Seen {
    host: String,
    sni: Option<String>,
    client_cert: bool,
    mesh_headers: Vec<String>,
    /// `traceparent` and the `x-b3-*` headers, by name.
    trace: std::collections::BTreeMap<String, String>,
}

/// An HTTP/1.1 server on 127.0.0.1, plaintext or TLS (asking for a client
/// certificate when `clients` is given), answering `name` to everything.
struct Server {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Server {
    async fn start(name: &'static str, tls: Option<Arc<rustls::ServerConfig>>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (tls, log) = (tls.clone(), log.clone());
                tokio::spawn(async move {
                    let (io, sni, client_cert): (Box<dyn Io>, _, _) = match tls {
                        None => (Box::new(tcp), None, false),
                        Some(config) => {
                            let Ok(stream) =
                                tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                            else {
                                return;
                            };
                            let (_, conn) = stream.get_ref();
                            let sni = conn.server_name().map(str::to_string);
                            let cert = conn.peer_certificates().is_some_and(|c| !c.is_empty());
                            (Box::new(stream), sni, cert)
                        }
                    };
                    let svc = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
                        let host = req
                            .headers()
                            .get(hyper::header::HOST)
                            .and_then(|h| h.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        let mesh_headers = req
                            .headers()
                            .keys()
                            .map(|k| k.as_str().to_string())
                            .filter(|k| k.starts_with("x-mesh-"))
                            .collect();
                        let trace = req
                            .headers()
                            .iter()
                            .filter(|(k, _)| {
                                k.as_str() == "traceparent" || k.as_str().starts_with("x-b3-")
                            })
                            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
                            .collect();
                        log.lock().unwrap().push(Seen {
                            host,
                            sni: sni.clone(),
                            client_cert,
                            mesh_headers,
                            trace,
                        });
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from(name),
                            )))
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(io), svc)
                        .await;
                });
            }
        });
        Self { port, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A CA of the test's own, with the files a DestinationRule names.
struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_der: rustls::pki_types::CertificateDer<'static>,
}

impl Pki {
    fn new(dir: &Path, tag: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec![]).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{tag} CA"));
        let ca = params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(params, ca_key);
        let write = |name: &str, text: &str| {
            let p = dir.join(format!("{tag}-{name}"));
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca_path = write("ca.pem", &ca.pem());
        let (cert, key) = leaf(&issuer, "app.example.com");
        Self {
            ca: ca_path,
            client_cert: write("client.pem", &cert.pem()),
            client_key: write("client.key", &key.serialize_pem()),
            issuer,
            ca_der: ca.der().clone(),
        }
    }

    /// A server config for `name`, asking for a client certificate from
    /// this CA when `mutual`.
    fn server(&self, name: &str, mutual: bool) -> Arc<rustls::ServerConfig> {
        let (cert, key) = leaf(&self.issuer, name);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap();
        let builder = if mutual {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(self.ca_der.clone()).unwrap();
            let verifier =
                rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .unwrap();
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let key = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
        Arc::new(
            builder
                .with_single_cert(vec![cert.der().clone()], key)
                .unwrap(),
        )
    }
}

fn leaf(issuer: &Issuer<'static, KeyPair>, name: &str) -> (rcgen::Certificate, KeyPair) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    // Several names, comma-separated.
    p.subject_alt_names = name
        .split(',')
        .map(|n| SanType::DnsName(n.try_into().unwrap()))
        .collect();
    (p.signed_by(&key, issuer).unwrap(), key)
}

/// A ServiceEntry for `host`, port 80 (HTTP), whose one endpoint is
/// 127.0.0.1:`port` without a sidecar.
fn service_entry(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {port}}}}}]
---
"
    )
}

/// MUTUAL with the client's files from `pki`, its key at `key`.
fn mutual_tls(pki: &Pki, extra: &str, key: &Path) -> String {
    format!(
        "{{mode: MUTUAL, {extra}caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
        pki.ca.display(),
        pki.client_cert.display(),
        key.display()
    )
}

fn destination_rule(host: &str, tls: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {}, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    tls: {tls}
---
",
        host.replace('.', "-")
    )
}

async fn get(http: &reqwest::Client, host: &str) -> (u16, String) {
    let resp = http
        .get(format!("http://{host}/hello"))
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_to_endpoints_without_a_sidecar_and_tls_originated_as_destination_rules_say() {
    let mesh = Mesh::start().await;
    let dir = mesh.state_dir().to_path_buf();
    let pki = Pki::new(&dir, "external");
    let other = Pki::new(&dir, "other");
    let plain = Server::start("plain", None).await;
    let simple = Server::start("simple", Some(pki.server("simple.example.com", false))).await;
    let mutual = Server::start("mutual", Some(pki.server("mutual.example.com", true))).await;
    let entries = [
        service_entry("legacy", "legacy.example.com", plain.port),
        service_entry("simple", "simple.example.com", simple.port),
        service_entry("mutual", "mutual.example.com", mutual.port),
    ]
    .concat();
    mesh.write_config("external.yaml", &entries);
    mesh.wait_config_dump("client", "outbound|80||mutual.example.com")
        .await;
    let http = mesh.client();

    // No DestinationRule, no sidecar at the endpoint: plaintext, with the
    // service's Host and none of the mesh's own headers.
    assert_eq!(
        get(&http, "legacy.example.com").await,
        (200, "plain".into())
    );
    let seen = plain.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].host, "legacy.example.com");
    assert!(seen[0].mesh_headers.is_empty(), "{seen:?}");
    // Sidecars carry the trace context between them as `traceparent`; a
    // server without one also gets B3's headers, for the same span.
    let trace = &seen[0].trace;
    let tp: Vec<&str> = trace["traceparent"].split('-').collect();
    assert_eq!(tp.len(), 4, "{trace:?}");
    assert_eq!(
        trace.get("x-b3-traceid").map(String::as_str),
        Some(tp[1]),
        "{trace:?}"
    );
    assert_eq!(
        trace.get("x-b3-spanid").map(String::as_str),
        Some(tp[2]),
        "{trace:?}"
    );
    assert_eq!(
        trace.get("x-b3-sampled").map(String::as_str),
        Some(&tp[3][1..]),
        "{trace:?}"
    );

    // The sidecar originates TLS: SIMPLE checks the server against the CA
    // file and sends the host as SNI; MUTUAL also presents the client's
    // certificate, which that server demands.
    let rules = [
        destination_rule(
            "simple.example.com",
            &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca.display()),
        ),
        destination_rule("mutual.example.com", &mutual_tls(&pki, "", &pki.client_key)),
        // Mutual TLS in so many words to an endpoint without a sidecar.
        destination_rule("legacy.example.com", "{mode: ISTIO_MUTUAL}"),
    ]
    .concat();
    mesh.write_config("tls.yaml", &rules);
    mesh.wait_config_dump("client", "\"mode\":\"ISTIO_MUTUAL\"")
        .await;
    assert_eq!(
        get(&http, "simple.example.com").await,
        (200, "simple".into())
    );
    let s = simple.seen();
    assert_eq!(s[0].sni.as_deref(), Some("simple.example.com"), "{s:?}");
    assert_eq!(s[0].host, "simple.example.com");
    assert!(!s[0].client_cert);
    assert_eq!(
        get(&http, "mutual.example.com").await,
        (200, "mutual".into())
    );
    assert!(mutual.seen()[0].client_cert);
    let (code, body) = get(&http, "legacy.example.com").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("has no sidecar"), "{body}");
    assert_eq!(
        plain.seen().len(),
        1,
        "plaintext went out under ISTIO_MUTUAL"
    );

    // A server the CA file does not vouch for is refused; so is a name
    // other than the certificate's, unless subjectAltNames names it.
    let rules = [
        destination_rule(
            "simple.example.com",
            &format!("{{mode: SIMPLE, caCertificates: {}}}", other.ca.display()),
        ),
        destination_rule(
            "mutual.example.com",
            &mutual_tls(
                &pki,
                "sni: elsewhere.example.com, subjectAltNames: [mutual.example.com], ",
                &pki.client_key,
            ),
        ),
    ]
    .concat();
    mesh.write_config("tls.yaml", &rules);
    mesh.wait_config_dump("client", "elsewhere.example.com")
        .await;
    let (code, body) = get(&http, "simple.example.com").await;
    assert_eq!(code, 503, "{body}");
    assert_eq!(
        simple.seen().len(),
        1,
        "a request reached an unverified server"
    );
    assert_eq!(
        get(&http, "mutual.example.com").await,
        (200, "mutual".into())
    );
    assert_eq!(
        mutual.seen().last().unwrap().sni.as_deref(),
        Some("elsewhere.example.com")
    );

    // Bad input: a key file that is not there. The sidecar refuses the
    // update, says why, and keeps the settings it had.
    let missing = dir.join("no-such.key");
    let rules = destination_rule("mutual.example.com", &mutual_tls(&pki, "", &missing));
    mesh.write_config("tls.yaml", &rules);
    mesh.wait_config_dump("client", "no-such.key").await;
    let dump: serde_json::Value = reqwest::get(format!(
        "http://{}:15000/config_dump",
        mesh.workload("client").address
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let nack = dump["xds"]["last_nack"].as_str().unwrap_or_default();
    assert!(nack.contains("no-such.key"), "{dump:#}");
    assert_eq!(
        get(&http, "mutual.example.com").await,
        (200, "mutual".into())
    );
    mesh.stop().await;
}

/// A TLS echo server on 127.0.0.1 with `config`; records each
/// connection's SNI and client certificate.
async fn tls_echo(config: Arc<rustls::ServerConfig>) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, log) = (config.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(mut stream) = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await
                else {
                    return;
                };
                let (_, conn) = stream.get_ref();
                log.lock().unwrap().push(Seen {
                    sni: conn.server_name().map(str::to_string),
                    client_cert: conn.peer_certificates().is_some_and(|c| !c.is_empty()),
                    ..Default::default()
                });
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen)
}

/// What an app connected through `pod`'s captured sidecar hears back
/// after saying `ping`: `None` when the connection is closed first.
async fn ping_through(pod: std::net::IpAddr) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect((pod, 15001)).await.unwrap();
    tcp.write_all(b"ping").await.ok()?;
    let mut echoed = [0u8; 4];
    match tokio::time::timeout(Duration::from_secs(3), tcp.read_exact(&mut echoed)).await {
        Ok(Ok(_)) => Some(echoed.to_vec()),
        _ => None,
    }
}

/// A DestinationRule's SIMPLE or MUTUAL tls on an opaque TCP service: the
/// sidecar wraps the app's plaintext connection in TLS to the server, and
/// when the server cannot be verified the app's connection is closed,
/// never sent in plaintext.
#[tokio::test(flavor = "multi_thread")]
async fn tls_is_originated_for_tcp_services_too() {
    let mesh = Mesh::start().await;
    let dir = mesh.state_dir().to_path_buf();
    let pki = Pki::new(&dir, "db");
    let other = Pki::new(&dir, "other");
    let (port, seen) = tls_echo(pki.server("db.example.com", true)).await;
    let entry = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: default}}
spec:
  hosts: [db.example.com]
  addresses: [240.240.2.1]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 5432, name: tcp-db, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp-db: {port}}}}}]
---
"
    );
    let mutual = destination_rule("db.example.com", &mutual_tls(&pki, "", &pki.client_key));
    mesh.write_config("db.yaml", &format!("{entry}{mutual}"));
    let pod = mesh.beside_client(102);
    let dst = Arc::new(Mutex::new(Some("240.240.2.1:5432".parse().unwrap())));
    mesh.captured_sidecar(pod, mesh_proxy::OutboundPolicy::RegistryOnly, dst)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while ping_through(pod).await.as_deref() != Some(b"ping") {
        assert!(Instant::now() < deadline, "no echo through originated TLS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = seen.lock().unwrap().clone();
    assert_eq!(s[0].sni.as_deref(), Some("db.example.com"), "{s:?}");
    assert!(s[0].client_cert, "MUTUAL presents the client's certificate");

    // A CA that does not vouch for the server: the app's connection closes.
    let wrong_ca = destination_rule(
        "db.example.com",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", other.ca.display()),
    );
    mesh.write_config("db.yaml", &format!("{entry}{wrong_ca}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while ping_through(pod).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "still echoed under an unverifiable server"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let verified = seen.lock().unwrap().len();
    assert_eq!(ping_through(pod).await, None);
    assert_eq!(
        seen.lock().unwrap().len(),
        verified,
        "a connection reached the server unverified"
    );
    mesh.stop().await;
}

/// A listener on 127.0.0.1 that never accepts, its queue full: a connect
/// to it hangs (the kernel drops the SYN) instead of being refused. The
/// connections filling the queue are returned to keep them open.
fn stuck_listener() -> (tokio::net::TcpListener, Vec<std::net::TcpStream>, u16) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut filling = Vec::new();
    for _ in 0..8 {
        match std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            Ok(s) => filling.push(s),
            Err(_) => return (listener, filling, addr.port()),
        }
    }
    panic!("the listener's queue never filled");
}

/// A DestinationRule's connectTimeout bounds connects to endpoints without
/// a sidecar, plaintext or under TLS the sidecar originates: a server that
/// never answers the connect costs that long, not the 10 s default.
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_connects_to_endpoints_without_a_sidecar() {
    let mesh = Mesh::start().await;
    let (_listener, _filling, port) = stuck_listener();
    let rules = ["plain", "tls"]
        .iter()
        .map(|name| {
            let host = format!("{name}-stuck.example.com");
            let tls = if *name == "tls" {
                "\n    tls: {mode: SIMPLE, insecureSkipVerify: true}"
            } else {
                ""
            };
            format!(
                "{}apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {name}-stuck, namespace: default}}
spec:
  host: {host}
  trafficPolicy:
    connectionPool: {{tcp: {{connectTimeout: 200ms}}}}{tls}
---
",
                service_entry(&format!("{name}-stuck"), &host, port)
            )
        })
        .collect::<String>();
    mesh.write_config("stuck.yaml", &rules);
    mesh.wait_config_dump("client", "outbound|80||tls-stuck.example.com")
        .await;
    let http = mesh.client();
    for host in ["plain-stuck.example.com", "tls-stuck.example.com"] {
        let started = Instant::now();
        let (code, body) = get(&http, host).await;
        let took = started.elapsed();
        assert_eq!(code, 503, "{host}: {body}");
        // One try and Istio's two default retries, 200 ms each, and slack.
        assert!(
            took < Duration::from_secs(3),
            "{host} took {took:?}: {body}"
        );
        assert!(body.contains("timed out after 200ms"), "{host}: {body}");
    }
    mesh.stop().await;
}

/// The same bound holds for the mutual-TLS handshake with an endpoint that
/// has a sidecar: one that accepts the connection and never answers costs
/// the connect timeout, not a request left hanging (every request for that
/// sidecar waits on the one handshake).
#[tokio::test(flavor = "multi_thread")]
async fn connect_timeout_bounds_the_handshake_with_a_silent_sidecar() {
    let mesh = Mesh::start().await;
    let (a, b) = mesh_tests::loopback_block();
    let silent = std::net::Ipv4Addr::new(127, a, b, 77);
    let listener = tokio::net::TcpListener::bind((silent, mesh_proto::ports::INBOUND))
        .await
        .unwrap();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let held = accepted.clone();
    let accepting = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            held.lock().unwrap().push(tcp);
        }
    });
    mesh.write_config(
        "silent.yaml",
        &format!(
            "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: silent, namespace: default}}
spec:
  hosts: [silent.example.com]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: {silent}, labels: {{security.istio.io/tlsMode: istio}}, serviceAccount: silent}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: silent, namespace: default}}
spec:
  host: silent.example.com
  trafficPolicy:
    connectionPool: {{tcp: {{connectTimeout: 200ms}}}}
"
        ),
    );
    mesh.wait_config_dump("client", "outbound|80||silent.example.com")
        .await;
    let started = Instant::now();
    let (code, body) = get(&mesh.client(), "silent.example.com").await;
    let took = started.elapsed();
    assert_eq!(code, 503, "{body}");
    assert!(
        body.contains("mTLS handshake") && body.contains("timed out"),
        "{body}"
    );
    // One try and Istio's two default retries, 200 ms each, and slack.
    assert!(took < Duration::from_secs(3), "took {took:?}: {body}");
    assert!(
        !accepted.lock().unwrap().is_empty(),
        "the sidecar never connected to the silent endpoint"
    );
    accepting.abort();
    mesh.stop().await;
}

/// What an app hears back after saying `ping` over TLS (server name `sni`,
/// trusting `pki`'s CA) through `pod`'s captured sidecar: `None` when the
/// connection is closed or the handshake fails.
async fn tls_ping_through(pod: std::net::IpAddr, sni: &str, pki: &Pki) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((pod, 15001)).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
    let talk = async {
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .ok()?;
        tls.write_all(b"ping").await.ok()?;
        let mut echoed = [0u8; 4];
        tls.read_exact(&mut echoed).await.ok()?;
        Some(echoed.to_vec())
    };
    tokio::time::timeout(Duration::from_secs(3), talk)
        .await
        .ok()
        .flatten()
}

/// A ServiceEntry for TLS to `host` on port 8443, known by name only (no
/// addresses), its one endpoint 127.0.0.1:`port` without a sidecar.
fn tls_entry(name: &str, host: &str, port: u16) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: default}}
spec:
  hosts: [{host}]
  location: MESH_EXTERNAL
  resolution: STATIC
  ports: [{{number: 8443, name: tls, protocol: TLS}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tls: {port}}}}}]
---
"
    )
}

fn last_sni(seen: &Mutex<Vec<Seen>>) -> Option<String> {
    seen.lock().unwrap().last().and_then(|s| s.sni.clone())
}

/// TLS the apps speak themselves, to services the mesh knows by host name
/// only: the calling sidecar reads the ClientHello's server name (never
/// terminating the TLS) to find the service, whatever address the app
/// dialled, and a VirtualService's `tls` routes choose by that name.
#[tokio::test(flavor = "multi_thread")]
async fn tls_routes_choose_a_destination_by_server_name() {
    let mesh = Mesh::start().await;
    let pki = Pki::new(mesh.state_dir(), "sni");
    let names = "*.example.test,*.wild.test";
    let (a_port, a_seen) = tls_echo(pki.server(names, false)).await;
    let (b_port, b_seen) = tls_echo(pki.server(names, false)).await;
    let entries = format!(
        "{}{}",
        tls_entry("a", "a.example.test", a_port),
        tls_entry("b", "b.example.test", b_port)
    );
    mesh.write_config("sni.yaml", &entries);
    let pod = mesh.beside_client(103);
    // Whatever the app's resolver gave it: no address the mesh knows.
    let dst = Arc::new(Mutex::new(Some("240.240.3.9:8443".parse().unwrap())));
    mesh.captured_sidecar(pod, mesh_proxy::OutboundPolicy::RegistryOnly, dst)
        .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_ping_through(pod, "a.example.test", &pki)
        .await
        .is_none()
    {
        assert!(Instant::now() < deadline, "a.example.test never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last_sni(&a_seen).as_deref(), Some("a.example.test"));
    assert_eq!(
        tls_ping_through(pod, "b.example.test", &pki)
            .await
            .as_deref(),
        Some(&b"ping"[..])
    );
    assert_eq!(last_sni(&b_seen).as_deref(), Some("b.example.test"));
    // A name no service has, under REGISTRY_ONLY: closed.
    assert_eq!(tls_ping_through(pod, "c.example.test", &pki).await, None);

    // Istio's tls route: b.example.test's connections go to a's server.
    let routes = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b-to-a, namespace: default}
spec:
  hosts: [b.example.test]
  tls:
  - match: [{sniHosts: [b.example.test], port: 8443}]
    route: [{destination: {host: a.example.test}}]
";
    mesh.write_config("sni.yaml", &format!("{entries}{routes}"));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = a_seen.lock().unwrap().len();
        let echoed = tls_ping_through(pod, "b.example.test", &pki).await;
        if echoed.is_some() && a_seen.lock().unwrap().len() > before {
            break;
        }
        assert!(Instant::now() < deadline, "the tls route never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last_sni(&a_seen).as_deref(), Some("b.example.test"));
    let on_b = b_seen.lock().unwrap().len();
    for _ in 0..5 {
        assert!(
            tls_ping_through(pod, "b.example.test", &pki)
                .await
                .is_some()
        );
    }
    assert_eq!(
        b_seen.lock().unwrap().len(),
        on_b,
        "b's server got a connection"
    );

    // A wildcard host served by b's server, whose route takes one name
    // under it to a's: the other names stay with the service itself.
    let wild = format!(
        "{}apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: wild, namespace: default}}
spec:
  hosts: [\"*.wild.test\"]
  tls:
  - match: [{{sniHosts: [x.wild.test]}}]
    route: [{{destination: {{host: a.example.test}}}}]
",
        tls_entry("wild", "\"*.wild.test\"", b_port)
    );
    mesh.write_config("wild.yaml", &wild);
    let deadline = Instant::now() + Duration::from_secs(10);
    while tls_ping_through(pod, "y.wild.test", &pki).await.is_none() {
        assert!(Instant::now() < deadline, "*.wild.test never answered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(last_sni(&b_seen).as_deref(), Some("y.wild.test"));
    assert!(tls_ping_through(pod, "x.wild.test", &pki).await.is_some());
    assert_eq!(last_sni(&a_seen).as_deref(), Some("x.wild.test"));
    assert!(tls_ping_through(pod, "z.wild.test", &pki).await.is_some());
    assert_eq!(last_sni(&b_seen).as_deref(), Some("z.wild.test"));
    mesh.stop().await;
}

/// A server on 127.0.0.1 that greets each client first, then echoes.
async fn greeting_server() -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                if tcp.write_all(b"220 ready\r\n").await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tcp.read(&mut buf).await {
                    if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

/// How long a silent client waits for the greeting through `pod`'s
/// captured sidecar, and that its bytes then flow both ways.
async fn greeted_after(pod: std::net::IpAddr) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = Instant::now();
    let mut tcp = tokio::net::TcpStream::connect((pod, 15001)).await.unwrap();
    let mut greeting = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut greeting))
        .await
        .expect("no greeting within 10 s")
        .expect("closed before the greeting");
    let waited = started.elapsed();
    assert_eq!(&greeting, b"220 ready\r\n");
    tcp.write_all(b"ping").await.unwrap();
    let mut echoed = [0u8; 4];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping");
    waited
}

/// Captured connections to destinations nobody declared a protocol for:
/// a server that speaks first is heard after the detection timeout (short
/// by default, and configurable), never
/// stalled waiting for the client; TLS passes through unterminated.
#[tokio::test(flavor = "multi_thread")]
async fn server_first_protocols_and_tls_pass_through_undeclared_ports() {
    let mesh = Mesh::start().await;
    let greeting_port = greeting_server().await;
    let pod = mesh.beside_client(104);
    let dst = Arc::new(Mutex::new(Some(
        format!("127.0.0.1:{greeting_port}").parse().unwrap(),
    )));
    mesh.captured_sidecar(pod, mesh_proxy::OutboundPolicy::AllowAny, dst.clone())
        .await;
    let waited = greeted_after(pod).await;
    assert!(
        waited < Duration::from_secs(1),
        "the greeting took {waited:?} (default detection timeout: 100 ms)"
    );

    // TLS to a server the mesh does not know: through, unterminated.
    let pki = Pki::new(mesh.state_dir(), "passthrough");
    let (tls_port, seen) = tls_echo(pki.server("db.example.org", false)).await;
    *dst.lock().unwrap() = Some(format!("127.0.0.1:{tls_port}").parse().unwrap());
    assert_eq!(
        tls_ping_through(pod, "db.example.org", &pki)
            .await
            .as_deref(),
        Some(&b"ping"[..])
    );
    assert_eq!(last_sni(&seen).as_deref(), Some("db.example.org"));

    // A longer detection timeout (`--protocol-detection-timeout`, or the
    // mesh config's protocolDetectionTimeout through pilot) is waited out.
    let slower = mesh.beside_client(105);
    mesh.client_sidecar(slower, dst.clone(), |cfg| {
        cfg.protocol_detection_timeout = Duration::from_millis(1500);
    })
    .await;
    *dst.lock().unwrap() = Some(format!("127.0.0.1:{greeting_port}").parse().unwrap());
    let waited = greeted_after(slower).await;
    assert!(
        waited >= Duration::from_millis(1500) && waited < Duration::from_secs(5),
        "the greeting took {waited:?} under a 1.5 s detection timeout"
    );
    mesh.stop().await;
}

/// curl with `args`: its stdout, and stderr when it fails. `None` when
/// there is no curl.
fn curl(args: &[&str]) -> Option<Result<String, String>> {
    let out = std::process::Command::new("curl")
        .args(["-sS", "-m", "5"])
        .args(args)
        .output()
        .ok()?;
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Some(match out.status.success() {
        true => Ok(text(&out.stdout)),
        false => Err(text(&out.stderr)),
    })
}

/// CONNECT tunnels an app opens through its sidecar as an HTTP proxy, as
/// `https_proxy` clients do (curl here): to a mesh TLS service by name,
/// and through to an HTTPS server outside the mesh; an HTTP service's
/// requests must come as HTTP, so a tunnel to one is refused.
#[tokio::test(flavor = "multi_thread")]
async fn connect_tunnels_reach_tls_services_and_servers_outside_the_mesh() {
    if curl(&["--version"]).is_none() {
        eprintln!("SKIPPED: curl is not installed (CI installs it)");
        return;
    }
    let mesh = Mesh::start().await;
    let pki = Pki::new(mesh.state_dir(), "tunnel");
    let inside = Server::start("secure", Some(pki.server("secure.example.com", false))).await;
    let outside = Server::start("outside", Some(pki.server("localhost", false))).await;
    mesh.write_config(
        "secure.yaml",
        &tls_entry("secure", "secure.example.com", inside.port),
    );
    let proxy = format!("http://{}", mesh.workload("client").outbound());
    let ca = pki.ca.display().to_string();
    let via = |url: &str| {
        let (proxy, ca, url) = (proxy.clone(), ca.clone(), url.to_string());
        async move {
            tokio::task::spawn_blocking(move || {
                curl(&["--proxy", &proxy, "--cacert", &ca, &url]).unwrap()
            })
            .await
            .unwrap()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match via("https://secure.example.com:8443/").await {
            Ok(body) => {
                assert_eq!(body, "secure");
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "no tunnel to the service: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // TLS end to end: the server saw the name curl asked for.
    assert_eq!(
        inside.seen().last().and_then(|s| s.sni.clone()).as_deref(),
        Some("secure.example.com")
    );
    let url = format!("https://localhost:{}/", outside.port);
    assert_eq!(via(&url).await.as_deref(), Ok("outside"));
    let plain = via("http://reviews:9080/").await;
    assert!(plain.is_ok(), "plain HTTP through the proxy: {plain:?}");
    let tunnelled = tokio::task::spawn_blocking(move || {
        curl(&["--proxytunnel", "--proxy", &proxy, "http://reviews:9080/"]).unwrap()
    })
    .await
    .unwrap();
    assert!(
        tunnelled.as_ref().is_err_and(|e| e.contains("405")),
        "a CONNECT tunnel to an HTTP service: {tunnelled:?}"
    );
    mesh.stop().await;
}
