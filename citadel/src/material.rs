//! Signing material in Istio's plug-in layout: a directory holding
//! `ca-cert.pem` (the certificate citadel signs with), `ca-key.pem` (its
//! key), `root-cert.pem` (the root everything chains to) and
//! `cert-chain.pem` (from `ca-cert.pem` up to the root). The CA may be the
//! root itself (a self-signed root, as citadel generates when it has no
//! material) or an intermediate under an operator's root.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    PublicKeyData,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::authority::{AuthorityError, io, random_serial, write_private};

pub const CA_CERT_FILE: &str = "ca-cert.pem";
pub const CA_KEY_FILE: &str = "ca-key.pem";
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// A generated root lives ten years; rotating it is `meshctl ca rotate`.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so that peers whose clocks lag still accept them.
pub(crate) const BACKDATE: Duration = Duration::from_secs(60);

/// A root certificate and what people need to know about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub pem: String,
    pub der: Vec<u8>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
    pub subject: String,
    /// Seconds since the Unix epoch.
    pub not_before: i64,
    pub not_after: i64,
}

impl Root {
    fn from_der(der: &[u8], path: &Path) -> Result<Self, AuthorityError> {
        let cert = parse(der, path)?;
        let v = cert.validity();
        Ok(Self {
            pem: to_pem(der),
            der: der.to_vec(),
            sha256: mesh_identity::sha256_hex(der),
            subject: cert.subject().to_string(),
            not_before: v.not_before.timestamp(),
            not_after: v.not_after.timestamp(),
        })
    }
}

/// What citadel signs with.
pub struct Material {
    pub dir: PathBuf,
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// PEM certificates from `ca-cert.pem` up to and including the root:
    /// what follows the leaf in every chain citadel hands out.
    pub(crate) chain_pem: Vec<String>,
    /// When `ca-cert.pem` expires (seconds since the Unix epoch): no leaf outlives it.
    pub ca_not_after: i64,
    pub root: Root,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("dir", &self.dir)
            .field("root", &self.root.sha256)
            .finish()
    }
}

impl Material {
    /// Loads and checks the plug-in layout in `dir`: the key readable only
    /// by its owner, the key belonging to `ca-cert.pem`, `ca-cert.pem` a CA,
    /// each certificate of the chain signed by the next, ending at
    /// `root-cert.pem`, which signs itself. Errors name the file.
    pub fn load(dir: &Path) -> Result<Self, AuthorityError> {
        let key_path = dir.join(CA_KEY_FILE);
        let cert_path = dir.join(CA_CERT_FILE);
        let root_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);

        let meta = fs::metadata(&key_path).map_err(io(&key_path))?;
        let mode = meta.permissions().mode() & 0o777;
        // A Kubernetes Secret mounted under the pod's fsGroup is root's,
        // its group the pod's, mode 0440: read through the group. That is
        // accepted; any other access by group or others is not.
        let fs_group_secret = meta.uid() == 0 && meta.gid() != 0 && mode & 0o077 == 0o040;
        if mode & 0o077 != 0 && !fs_group_secret {
            return Err(AuthorityError::KeyMode {
                path: key_path,
                mode,
            });
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io(&key_path))?;
        if key_pem.contains("BEGIN EC PRIVATE KEY") || key_pem.contains("BEGIN RSA PRIVATE KEY") {
            return Err(AuthorityError::invalid(
                &key_path,
                "the key is in a legacy (SEC1/PKCS#1) encoding; convert it with \
                 `openssl pkcs8 -topk8 -nocrypt -in ca-key.pem -out ca-key.pk8.pem`",
            ));
        }
        let key = KeyPair::from_pem(&key_pem).map_err(|source| AuthorityError::Material {
            path: key_path.clone(),
            source,
        })?;

        let ca_der = read_certs(&cert_path)?.remove(0);
        let ca = parse(&ca_der, &cert_path)?;
        if ca.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(AuthorityError::Mismatch {
                cert: cert_path,
                key: key_path,
            });
        }
        if !ca.is_ca() {
            return Err(AuthorityError::invalid(
                &cert_path,
                "is not a CA certificate (basicConstraints CA:TRUE is missing)",
            ));
        }
        check_current(&ca, &cert_path)?;

        let root_der = read_certs(&root_path)?.remove(0);
        let root_cert = parse(&root_der, &root_path)?;
        if root_cert.subject() != root_cert.issuer() || root_cert.verify_signature(None).is_err() {
            return Err(AuthorityError::invalid(
                &root_path,
                "is not a self-signed root certificate",
            ));
        }
        check_current(&root_cert, &root_path)?;

        // ca-cert, then cert-chain.pem (which often repeats ca-cert first),
        // then the root if the chain file leaves it out.
        let mut chain: Vec<(Vec<u8>, &Path)> = vec![(ca_der.to_vec(), &cert_path)];
        if chain_path.exists() {
            for der in read_certs_allow_empty(&chain_path)? {
                if chain.last().is_some_and(|(last, _)| *last == der.as_ref()) {
                    continue;
                }
                chain.push((der.to_vec(), &chain_path));
            }
        }
        if chain.last().map(|(d, _)| d.as_slice()) != Some(root_der.as_ref()) {
            chain.push((root_der.to_vec(), &root_path));
        }
        for pair in chain.windows(2) {
            let (child_der, child_path) = &pair[0];
            let (parent_der, parent_path) = &pair[1];
            let child = parse(child_der, child_path)?;
            let parent = parse(parent_der, parent_path)?;
            if child.verify_signature(Some(parent.public_key())).is_err() {
                return Err(AuthorityError::invalid(
                    child_path,
                    &format!(
                        "{} is not signed by {} (from {}); the chain must run from ca-cert.pem up to root-cert.pem",
                        child.subject(),
                        parent.subject(),
                        parent_path.display()
                    ),
                ));
            }
        }

        let issuer =
            Issuer::from_ca_cert_der(&ca_der, key).map_err(|source| AuthorityError::Material {
                path: cert_path.clone(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
            chain_pem: chain.iter().map(|(d, _)| to_pem(d)).collect(),
            ca_not_after: ca.validity().not_after.timestamp(),
            root: Root::from_der(&root_der, &root_path)?,
        })
    }

    /// Writes a new self-signed root into `dir` (which must not hold one)
    /// in the plug-in layout, and loads it.
    pub fn generate(dir: &Path, trust_domain: &str) -> Result<Self, AuthorityError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::OrganizationName, trust_domain);
        let now = OffsetDateTime::now_utc();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("mesh root CA {}", now.unix_timestamp()),
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = now - BACKDATE;
        params.not_after = now + ROOT_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        write_private(&dir.join(CA_KEY_FILE), &key.serialize_pem())?;
        for name in [CA_CERT_FILE, ROOT_CERT_FILE, CERT_CHAIN_FILE] {
            let path = dir.join(name);
            fs::write(&path, cert.pem()).map_err(io(&path))?;
        }
        tracing::info!(dir = %dir.display(), "generated a new self-signed mesh root");
        Self::load(dir)
    }
}

fn read_certs_allow_empty(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let text = fs::read(path).map_err(io(path))?;
    CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| AuthorityError::invalid(path, &format!("bad PEM: {e}")))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, AuthorityError> {
    let certs = read_certs_allow_empty(path)?;
    if certs.is_empty() {
        return Err(AuthorityError::invalid(path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn parse<'a>(der: &'a [u8], path: &Path) -> Result<X509Certificate<'a>, AuthorityError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| AuthorityError::invalid(path, &format!("not a valid certificate: {e}")))
}

fn check_current(cert: &X509Certificate<'_>, path: &Path) -> Result<(), AuthorityError> {
    if !cert.validity().is_valid() {
        return Err(AuthorityError::invalid(
            path,
            &format!(
                "is not valid now (valid {} to {})",
                cert.validity().not_before,
                cert.validity().not_after
            ),
        ));
    }
    Ok(())
}

pub(crate) fn to_pem(der: &[u8]) -> String {
    pem_block("CERTIFICATE", der)
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}
