//! How a cluster's endpoints are spoken to, from its DestinationRule's
//! `trafficPolicy.tls`: mutual TLS to each endpoint's sidecar (Istio's
//! ISTIO_MUTUAL, and auto mutual TLS when the rule says nothing), plaintext
//! to the endpoint's own address (DISABLE, and endpoints without a sidecar
//! under auto mutual TLS), or TLS that this sidecar originates (SIMPLE,
//! MUTUAL) to a server outside the mesh.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::TokioExecutor;
use mesh_proto::resources as pb;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::platform::Dialer;
use crate::pool::Body;
use crate::state::Endpoint;
use crate::wire;

/// A cluster's way to its endpoints.
pub enum Transport {
    /// Mutual TLS to each endpoint's sidecar. Endpoints without one get
    /// plaintext (auto mutual TLS) unless ISTIO_MUTUAL was asked for in
    /// so many words (`explicit`), when they are refused.
    Mesh { explicit: bool },
    /// Plaintext to each endpoint's own address and port.
    Plain,
    /// TLS this sidecar originates.
    Tls(Box<Originate>),
    /// Settings that could not be loaded now (a file gone since pilot's
    /// push was accepted): requests fail, saying why.
    Broken(String),
}

impl std::fmt::Debug for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Transport::Mesh { explicit } => write!(f, "Mesh {{ explicit: {explicit} }}"),
            Transport::Plain => f.write_str("Plain"),
            Transport::Tls(o) => write!(f, "Tls({:?})", o.server_name),
            Transport::Broken(why) => write!(f, "Broken({why:?})"),
        }
    }
}

/// How one request reaches one endpoint.
pub enum Via<'a> {
    /// Mutual TLS to the sidecar, which must present this identity.
    Sidecar(&'a mesh_identity::SpiffeId),
    Plain,
    Tls(&'a Originate),
    Refused(String),
}

impl Transport {
    /// `service` is the cluster's host: the server name when the rule
    /// gives no `sni`; `h2`: the cluster speaks HTTP/2 (or gRPC);
    /// `connect`: its connectTimeout, for originated TLS.
    pub fn compile(
        tls: Option<&pb::ClientTls>,
        service: &str,
        h2: bool,
        connect: Option<Duration>,
    ) -> Result<Self, String> {
        use pb::client_tls::Mode;
        let Some(tls) = tls else {
            return Ok(Transport::Mesh { explicit: false });
        };
        Ok(match Mode::try_from(tls.mode).unwrap_or_default() {
            Mode::IstioMutual => Transport::Mesh { explicit: true },
            Mode::Disable => Transport::Plain,
            Mode::Simple | Mode::Mutual => {
                Transport::Tls(Box::new(Originate::new(tls, service, h2, connect)?))
            }
        })
    }

    /// Like `compile`, keeping a failure for requests to report.
    pub fn load(
        tls: Option<&pb::ClientTls>,
        service: &str,
        h2: bool,
        connect: Option<Duration>,
    ) -> Self {
        Self::compile(tls, service, h2, connect).unwrap_or_else(Transport::Broken)
    }

    pub fn via<'a>(&'a self, endpoint: &'a Endpoint) -> Via<'a> {
        match (self, &endpoint.identity) {
            (Transport::Mesh { .. }, Some(id)) => Via::Sidecar(id),
            (Transport::Mesh { explicit: false }, None) => Via::Plain,
            (Transport::Mesh { explicit: true }, None) => Via::Refused(format!(
                "{} has no sidecar to speak mutual TLS with (DestinationRule tls.mode ISTIO_MUTUAL)",
                endpoint.tunnel
            )),
            (Transport::Plain, _) => Via::Plain,
            (Transport::Tls(o), _) => Via::Tls(o),
            (Transport::Broken(why), _) => Via::Refused(why.clone()),
        }
    }

    /// Whether requests go over the mesh's mutual TLS (for metrics'
    /// connection_security_policy).
    pub fn is_mesh(&self, endpoint: &Endpoint) -> bool {
        matches!(self, Transport::Mesh { .. }) && endpoint.identity.is_some()
    }
}

/// Plaintext clients for a cluster's endpoints without a sidecar (or all
/// of them, under DISABLE), when its DestinationRule sets a connectTimeout:
/// their connects give up after it. Without one, the sidecar's shared
/// clients are used (10 s, Istio's default).
#[derive(Debug)]
pub struct Direct {
    pub connect: Option<Duration>,
    h1: OnceLock<Client<Dialer, Body>>,
    h2: OnceLock<Client<Dialer, Body>>,
}

impl Direct {
    pub fn new(connect: Option<Duration>) -> Self {
        Self {
            connect,
            h1: OnceLock::new(),
            h2: OnceLock::new(),
        }
    }

    /// The client for HTTP/2 (`h2`) or HTTP/1.1, made on first use.
    pub fn client<'a>(&'a self, shared: &'a crate::Shared, h2: bool) -> &'a Client<Dialer, Body> {
        let Some(connect) = self.connect else {
            return if h2 { &shared.app_h2 } else { &shared.app_h1 };
        };
        let cell = if h2 { &self.h2 } else { &self.h1 };
        cell.get_or_init(|| Dialer::new(shared.cfg.socket_mark, Some(connect)).client(h2))
    }
}

/// TLS to a server: its config, the name sent and checked, and a client
/// (with its pooled connections) made on first use.
pub struct Originate {
    config: Arc<ClientConfig>,
    server_name: ServerName<'static>,
    h2: bool,
    connect: Option<Duration>,
    client: OnceLock<Client<HttpsConnector<Dialer>, Body>>,
}

impl Originate {
    fn new(
        tls: &pb::ClientTls,
        service: &str,
        h2: bool,
        connect: Option<Duration>,
    ) -> Result<Self, String> {
        let provider = mesh_identity::provider();
        let sni = if tls.sni.is_empty() {
            service
        } else {
            &tls.sni
        };
        let server_name = ServerName::try_from(sni.to_string())
            .map_err(|e| format!("tls server name {sni:?}: {e}"))?;
        let verifier: Arc<dyn ServerCertVerifier> = if tls.insecure_skip_verify {
            Arc::new(Unverified(provider.clone()))
        } else {
            let roots = Arc::new(roots(&tls.ca_certificates)?);
            let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                .build()
                .map_err(|e| format!("tls verifier: {e}"))?;
            if tls.subject_alt_names.is_empty() {
                webpki
            } else {
                let names = tls
                    .subject_alt_names
                    .iter()
                    .map(|n| {
                        ServerName::try_from(n.clone()).map_err(|e| {
                            format!("tls subjectAltNames {n:?}: {e} (DNS names and IPs only)")
                        })
                    })
                    .collect::<Result<_, _>>()?;
                Arc::new(AltNames {
                    inner: webpki,
                    names,
                })
            }
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("tls: {e}"))?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let config = if tls.mode == pb::client_tls::Mode::Mutual as i32 {
            let chain = certs(&tls.client_certificate, "clientCertificate")?;
            let key = key(&tls.private_key)?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| format!("tls clientCertificate and privateKey: {e}"))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(Self {
            config: Arc::new(config),
            server_name,
            h2,
            connect,
            client: OnceLock::new(),
        })
    }

    /// TLS over `tcp`, for an opaque TCP cluster: no ALPN, the same name
    /// sent and checked, the same client certificate.
    pub async fn handshake(
        &self,
        tcp: tokio::net::TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(self.server_name.clone(), tcp)
            .await
    }

    /// The client, made on first use; its sockets carry `mark`.
    pub fn client(&self, mark: Option<u32>) -> &Client<HttpsConnector<Dialer>, Body> {
        self.client.get_or_init(|| {
            let dialer = Dialer::new(mark, self.connect);
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*self.config).clone())
                .https_only()
                .with_server_name_resolver(FixedServerNameResolver::new(self.server_name.clone()));
            // One protocol, offered by ALPN: the one the cluster speaks.
            if self.h2 {
                let https = builder.enable_http2().wrap_connector(dialer);
                Client::builder(TokioExecutor::new())
                    .http2_only(true)
                    .build(https)
            } else {
                let https = builder.enable_http1().wrap_connector(dialer);
                Client::builder(TokioExecutor::new()).build(https)
            }
        })
    }
}

fn read(path: &str, what: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("tls {what} {path:?}: {e}"))
}

fn certs(path: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let pem = read(path, what)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls {what} {path:?}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("tls {what} {path:?}: no PEM certificate in it"));
    }
    Ok(certs)
}

fn key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let pem = read(path, "privateKey")?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|e| format!("tls privateKey {path:?}: {e}"))?
        .ok_or_else(|| format!("tls privateKey {path:?}: no PEM private key in it"))
}

/// The CA file's certificates, or the system's roots without one.
fn roots(ca_file: &str) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    if ca_file.is_empty() {
        let found = rustls_native_certs::load_native_certs();
        let (added, _) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            return Err(
                "tls: no caCertificates given and no system root certificates found".into(),
            );
        }
        return Ok(roots);
    }
    for c in certs(ca_file, "caCertificates")? {
        roots
            .add(c)
            .map_err(|e| format!("tls caCertificates {ca_file:?}: {e}"))?;
    }
    Ok(roots)
}

/// Checks the chain as usual, and the certificate's names against
/// `subjectAltNames` instead of the server name sent.
#[derive(Debug)]
struct AltNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AltNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _sent: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut last = None;
        for name in &self.names {
            match self
                .inner
                .verify_server_cert(end_entity, intermediates, name, ocsp, now)
            {
                Ok(v) => return Ok(v),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(rustls::Error::General("no subjectAltNames".into())))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// A client config that takes any server certificate (kubelet's HTTPS
/// probes do not check it either).
pub fn unverified_client() -> Arc<ClientConfig> {
    let provider = mesh_identity::provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the default provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Unverified(provider)))
        .with_no_client_auth();
    Arc::new(config)
}

/// `insecureSkipVerify`: any certificate is taken; the handshake's
/// signatures are still checked.
#[derive(Debug)]
struct Unverified(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Sends `req`, in the form sidecars exchange (HTTP/2, the service's
/// authority, the mesh's own headers), straight to `addr` over `client`:
/// HTTP/1.1 with the service's Host unless the cluster speaks HTTP/2.
pub async fn send<C>(
    client: &Client<C, Body>,
    scheme: Scheme,
    addr: SocketAddr,
    h2: bool,
    req: Request<Body>,
) -> Result<Response<Incoming>, hyper_util::client::legacy::Error>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    let (mut parts, body) = req.into_parts();
    let host = parts.uri.authority().cloned();
    let mut uri = std::mem::take(&mut parts.uri).into_parts();
    uri.scheme = Some(scheme);
    uri.authority = Authority::try_from(addr.to_string()).ok();
    parts.uri = Uri::from_parts(uri).unwrap_or_default();
    parts.headers.remove(wire::TARGET_PORT);
    parts.headers.remove(wire::SOURCE);
    if !h2 {
        parts.version = http::Version::HTTP_11;
        if let Some(h) = host.and_then(|h| HeaderValue::from_str(h.as_str()).ok()) {
            parts.headers.insert(http::header::HOST, h);
        }
    }
    client.request(Request::from_parts(parts, body)).await
}
