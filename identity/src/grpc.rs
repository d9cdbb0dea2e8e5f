//! gRPC clients of the control plane: a tonic channel over mutual TLS whose
//! verifier checks the server's SPIFFE ID, and the certificate request a
//! workload makes to citadel (the private key never leaves the caller).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::{Credentials, CredentialsError, SpiffeId};

/// Connects to `addr`; with `mark`, the socket carries that mark
/// (`SO_MARK`), which a pod's capture rules use to leave the proxy's own
/// traffic alone where its UID cannot be told apart (rootless pods).
pub async fn dial(addr: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let Some(mark) = mark else {
        return TcpStream::connect(addr).await;
    };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
    };
    socket2::SockRef::from(&socket).set_mark(mark)?;
    socket.connect(addr).await
}

/// A lazily connecting channel to `addr`; every (re)connection does a fresh
/// TLS handshake with `tls`.
pub fn channel(addr: SocketAddr, tls: Arc<ClientConfig>) -> Channel {
    channel_marked(addr, tls, None)
}

/// [`channel`], its connections carrying `mark` (see [`dial`]).
pub fn channel_marked(addr: SocketAddr, tls: Arc<ClientConfig>, mark: Option<u32>) -> Channel {
    let connector = tower::service_fn(move |_: http::Uri| {
        let tls = tls.clone();
        async move {
            let tcp = dial(addr, mark).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::IpAddress(addr.ip().into());
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    Endpoint::from_shared(format!("http://{addr}"))
        .expect("a socket address makes a valid URI")
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector_lazy(connector)
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot build a CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error("citadel refused: {0}")]
    Refused(#[from] tonic::Status),
    #[error("token is not valid metadata")]
    Token,
    #[error("citadel's answer: {0}")]
    Answer(#[from] CredentialsError),
    #[error("citadel issued {got}, but {asked} was asked for")]
    WrongIdentity { asked: SpiffeId, got: SpiffeId },
}

/// Makes a fresh key, asks citadel over `channel` to certify it for
/// `identity`, and returns the resulting credentials trusting `roots_pem`.
pub async fn request_certificate(
    channel: Channel,
    token: &str,
    identity: &SpiffeId,
    lifetime: Duration,
    roots_pem: &str,
) -> Result<Credentials, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
    let csr = params.serialize_request(&key)?.pem()?;
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: lifetime.as_secs() as i64,
        metadata: None,
    });
    if !token.is_empty() {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {token}")
                .parse()
                .map_err(|_| CaError::Token)?,
        );
    }
    let resp = IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await?
        .into_inner();
    let creds = Credentials::from_pem(&resp.cert_chain.concat(), &key.serialize_pem(), roots_pem)?;
    if &creds.identity != identity {
        return Err(CaError::WrongIdentity {
            asked: identity.clone(),
            got: creds.identity,
        });
    }
    Ok(creds)
}

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections on `listener` and yields those that complete a
/// TLS handshake with the newest config in `tls` (so renewed certificates
/// apply to new connections). Handshakes run concurrently; failures are
/// logged with the peer's address and dropped.
pub fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: tokio::sync::watch::Receiver<Arc<rustls::ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<
    Result<tokio_rustls::server::TlsStream<TcpStream>, std::io::Error>,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                _ = tx.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.borrow().clone());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(e)) => tracing::warn!(%peer, error = %e, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// The identity citadel's serving certificate carries.
pub fn citadel_identity(trust_domain: &str) -> SpiffeId {
    SpiffeId::new(trust_domain, "mesh-system", "citadel")
}

/// Obtains credentials for `identity` from citadel at `ca_addr`, trusting
/// `roots_pem`. A zero `lifetime` takes citadel's default.
pub async fn certificate_from(
    ca_addr: SocketAddr,
    token: &str,
    identity: &SpiffeId,
    lifetime: Duration,
    roots_pem: &str,
) -> Result<Credentials, CaError> {
    let roots = Arc::new(crate::cert::root_store(roots_pem)?);
    let tls = crate::client_config(
        None,
        roots,
        citadel_identity(&identity.trust_domain),
        &[b"h2"],
    )
    .map_err(|e| CaError::Answer(CredentialsError::Root(e)))?;
    request_certificate(channel(ca_addr, tls), token, identity, lifetime, roots_pem).await
}
