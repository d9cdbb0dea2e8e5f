//! A workload's credentials: its key, its certificate chain and the roots it trusts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("bad PEM in {what}: {source}")]
    Pem {
        what: &'static str,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what} holds no certificate")]
    Empty { what: &'static str },
    #[error("certificate cannot be parsed: {0}")]
    Parse(String),
    #[error("certificate carries no SPIFFE URI SAN")]
    NoIdentity,
    #[error("certificate carries more than one URI SAN")]
    ManyIdentities,
    #[error(transparent)]
    Identity(#[from] crate::ParseError),
    #[error("root certificate rejected: {0}")]
    Root(rustls::Error),
}

/// What a workload holds to speak mutual TLS: everything is immutable; a
/// renewal makes a new `Credentials`.
#[derive(Clone, Debug)]
pub struct Credentials {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: std::sync::Arc<PrivateKeyDer<'static>>,
    pub roots: std::sync::Arc<RootCertStore>,
    pub not_after: SystemTime,
}

impl Credentials {
    /// Builds credentials from a PEM chain (leaf first), a PEM PKCS#8 key and
    /// PEM roots. The identity is read from the leaf.
    pub fn from_pem(chain: &str, key: &str, roots: &str) -> Result<Self, CredentialsError> {
        let chain = parse_certs(chain, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|source| {
            CredentialsError::Pem {
                what: "private key",
                source,
            }
        })?;
        let roots = root_store(roots)?;
        let identity = identity_of(&chain[0])?;
        let not_after = not_after(&chain[0])?;
        Ok(Self {
            identity,
            chain,
            key: std::sync::Arc::new(key),
            roots: std::sync::Arc::new(roots),
            not_after,
        })
    }

    /// The same certificate and key, trusting `roots` instead.
    pub fn with_roots(&self, roots: std::sync::Arc<RootCertStore>) -> Self {
        Self {
            roots,
            ..self.clone()
        }
    }

    /// SHA-256 (hex) of the last certificate of the chain: the root the
    /// leaf chains to, as citadel hands chains out (leaf → root).
    pub fn chain_root_sha256(&self) -> String {
        sha256_hex(self.chain[self.chain.len() - 1].as_ref())
    }

    /// Time left before the leaf expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }
}

pub fn parse_certs(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, CredentialsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CredentialsError::Pem { what, source })?;
    if certs.is_empty() {
        return Err(CredentialsError::Empty { what });
    }
    Ok(certs)
}

pub fn root_store(pem: &str) -> Result<RootCertStore, CredentialsError> {
    let mut store = RootCertStore::empty();
    for cert in parse_certs(pem, "trust bundle")? {
        store.add(cert).map_err(CredentialsError::Root)?;
    }
    Ok(store)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, CredentialsError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| CredentialsError::Parse(e.to_string()))
}

/// The SPIFFE ID in a certificate's URI SAN. Exactly one URI SAN is allowed.
pub fn identity_of(der: &[u8]) -> Result<SpiffeId, CredentialsError> {
    let cert = parse(der)?;
    let mut uris = cert
        .extensions()
        .iter()
        .filter_map(|e| match e.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => Some(san),
            _ => None,
        })
        .flat_map(|san| san.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    let first = uris.next().ok_or(CredentialsError::NoIdentity)?;
    if uris.next().is_some() {
        return Err(CredentialsError::ManyIdentities);
    }
    Ok(first.parse()?)
}

pub fn not_after(der: &[u8]) -> Result<SystemTime, CredentialsError> {
    let cert = parse(der)?;
    let secs = cert.validity().not_after.timestamp();
    Ok(UNIX_EPOCH + Duration::from_secs(secs.max(0) as u64))
}

/// SHA-256 of `bytes`, lowercase hex: how roots are named in bundles and status.
pub fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
