//! rustls configs for the mesh's mutual TLS. The client side checks that the
//! server presents exactly the SPIFFE ID the caller expects, in the verifier;
//! the server side accepts any peer whose chain leads to a mesh root and
//! exposes the peer's identity after the handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, Error, RootCertStore, ServerConfig, SignatureScheme,
};

use crate::{Credentials, SpiffeId, identity_of, provider};

/// A server config that requires a client certificate chaining to the mesh
/// roots (`require_client = true`) or accepts clients without one.
pub fn server_config(
    creds: &Credentials,
    require_client: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let verifier = WebPkiClientVerifier::builder_with_provider(creds.roots.clone(), provider);
    let verifier = if require_client {
        verifier.build()
    } else {
        verifier.allow_unauthenticated().build()
    }
    .map_err(|e| Error::General(e.to_string()))?;
    let mut config = builder
        .with_client_cert_verifier(verifier)
        .with_single_cert(creds.chain.clone(), creds.key.clone_key())?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// A client config that presents `creds` (if any) and accepts only a server
/// presenting `expected`.
pub fn client_config(
    creds: Option<&Credentials>,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots,
        expected,
        provider: provider.clone(),
    });
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match creds {
        Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What the server side learned about its peer after the handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PeerIdentity {
    Mesh(SpiffeId),
    Unauthenticated,
}

/// The peer's SPIFFE ID from the certificates rustls verified.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> PeerIdentity {
    match certs.and_then(|c| c.first()).map(|leaf| identity_of(leaf)) {
        Some(Ok(id)) => PeerIdentity::Mesh(id),
        _ => PeerIdentity::Unauthenticated,
    }
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let actual = identity_of(end_entity).map_err(|e| Error::General(e.to_string()))?;
        if actual != self.expected {
            return Err(Error::General(format!(
                "peer presented identity {actual}, expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Between two sidecars the handshake settles on TLS 1.3 with
    /// AES-128-GCM, and each side learns the other's SPIFFE ID.
    #[test]
    fn sidecars_agree_on_aes_128_gcm_and_each_others_identity() {
        let (a, b) = (
            SpiffeId::new("cluster.local", "default", "client"),
            SpiffeId::new("cluster.local", "default", "server"),
        );
        let [client_creds, server_creds] = crate::testing::credentials([&a, &b]);
        let client_cfg = client_config(
            Some(&client_creds),
            client_creds.roots.clone(),
            b.clone(),
            &[b"h2"],
        )
        .unwrap();
        let server_cfg = server_config(&server_creds, true, &[b"h2"]).unwrap();
        let mut client =
            rustls::ClientConnection::new(client_cfg, ServerName::try_from("server").unwrap())
                .unwrap();
        let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
        while client.is_handshaking() || server.is_handshaking() {
            let mut wire = Vec::new();
            client.write_tls(&mut wire).unwrap();
            server.read_tls(&mut wire.as_slice()).unwrap();
            server.process_new_packets().unwrap();
            let mut wire = Vec::new();
            server.write_tls(&mut wire).unwrap();
            client.read_tls(&mut wire.as_slice()).unwrap();
            client.process_new_packets().unwrap();
        }
        let suite = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(suite, rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(server.negotiated_cipher_suite().unwrap().suite(), suite);
        assert_eq!(
            peer_identity(server.peer_certificates()),
            PeerIdentity::Mesh(a)
        );
        assert_eq!(
            peer_identity(client.peer_certificates()),
            PeerIdentity::Mesh(b)
        );
    }
}
