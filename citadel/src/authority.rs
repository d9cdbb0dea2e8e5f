//! The signing authority: a root kept in a state directory, and the leaf
//! certificates it issues to workloads.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_identity::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use time::OffsetDateTime;

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// A root lives ten years; rotating it is the citadel issue's business.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so that peers whose clocks lag still accept them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("cannot read or write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run `chmod 600 {path}`")]
    KeyMode { path: PathBuf, mode: u32 },
    #[error("{path}: {source}")]
    Material { path: PathBuf, source: rcgen::Error },
    #[error("{cert} does not belong to the key in {key}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot issue certificate: {0}")]
    Sign(#[from] rcgen::Error),
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
}

impl Authority {
    /// Loads the root from `dir`, or makes one there on first start.
    pub fn open(dir: &Path, trust_domain: &str) -> Result<Self, AuthorityError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        if cert_path.exists() || key_path.exists() {
            return Self::load(&cert_path, &key_path);
        }
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        params
            .distinguished_name
            .push(DnType::CommonName, "mesh root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = OffsetDateTime::now_utc() - BACKDATE;
        params.not_after = OffsetDateTime::now_utc() + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_private(&key_path, &key.serialize_pem())?;
        fs::write(&cert_path, cert.pem()).map_err(io(&cert_path))?;
        tracing::info!(dir = %dir.display(), "generated a new self-signed mesh root");
        Self::load(&cert_path, &key_path)
    }

    fn load(cert_path: &Path, key_path: &Path) -> Result<Self, AuthorityError> {
        let meta = fs::metadata(key_path).map_err(io(key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(AuthorityError::KeyMode {
                path: key_path.to_path_buf(),
                mode,
            });
        }
        let key_pem = fs::read_to_string(key_path).map_err(io(key_path))?;
        let cert_pem = fs::read_to_string(cert_path).map_err(io(cert_path))?;
        let material = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuthorityError::Material { path, source }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(material(key_path))?;
        let spki = key.subject_public_key_info();
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(material(cert_path))?;
        if !cert_holds_key(&cert_pem, &spki) {
            return Err(AuthorityError::Mismatch {
                cert: cert_path.to_path_buf(),
                key: key_path.to_path_buf(),
            });
        }
        Ok(Self {
            issuer,
            root_pem: cert_pem,
        })
    }

    /// The trust bundle: PEM roots that proxies trust.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a workload certificate for `identity` over `public_key`.
    /// Returns the chain, leaf first, root last.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = OffsetDateTime::now_utc() - BACKDATE;
        params.not_after = OffsetDateTime::now_utc() + lifetime;
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(public_key, &self.issuer)?;
        Ok(vec![leaf.pem(), self.root_pem.clone()])
    }

    /// Signs a parsed CSR's key for `identity` (the caller has checked the CSR).
    pub fn issue_for_csr(
        &self,
        csr: &CertificateSigningRequestParams,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        self.issue(&csr.public_key, identity, lifetime)
    }

    /// Issues a key and certificate for a control-plane server of our own
    /// (citadel itself). Returns (chain PEM, key PEM).
    pub fn issue_own(
        &self,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<(String, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let chain = self.issue(&key, identity, lifetime)?;
        Ok((chain.concat(), key.serialize_pem()))
    }
}

fn cert_holds_key(cert_pem: &str, spki: &[u8]) -> bool {
    use x509_parser::pem::parse_x509_pem;
    parse_x509_pem(cert_pem.as_bytes())
        .ok()
        .and_then(|(_, pem)| pem.parse_x509().ok().map(|c| c.public_key().raw == spki))
        .unwrap_or(false)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the system random source works");
    bytes[0] &= 0x7f; // keep it positive
    SerialNumber::from_slice(&bytes)
}

/// Writes a file only its owner can read.
pub(crate) fn write_private(path: &Path, contents: &str) -> Result<(), AuthorityError> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_path_buf(),
        source,
    }
}
