//! The signing authority: the material citadel signs with, the trust
//! bundle it hands out, and the three steps of a root rotation.
//!
//! A rotation goes `steady → prepared → switched → steady`:
//! - **prepare**: new material is loaded (or generated); its root joins the
//!   bundle while the old material still signs;
//! - **switch**: the new material signs; the old root stays in the bundle
//!   so that certificates issued under it keep working until renewed;
//! - **commit**: the old root leaves the bundle.
//!
//! Which material signs, and where a rotation stands, is kept in
//! `ca-state.json` in the state directory, so a restart resumes it. The
//! current bundle is also written to `trust-bundle.pem` there, for
//! workloads that start later.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use mesh_identity::SpiffeId;
use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, PublicKeyData,
    SanType, SerialNumber,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::sync::watch;

use crate::material::{BACKDATE, Material, Root};

pub const STATE_FILE: &str = "ca-state.json";
pub const BUNDLE_FILE: &str = "trust-bundle.pem";
/// Where citadel generates its first root when no plug-in material is given.
pub const GENERATED_DIR: &str = "ca";

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
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{cert} does not belong to the key in {key}")]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("cannot issue certificate: {0}")]
    Sign(#[from] rcgen::Error),
    #[error("{0}")]
    Rotation(String),
}

impl AuthorityError {
    pub(crate) fn invalid(path: &Path, reason: &str) -> Self {
        Self::Invalid {
            path: path.to_path_buf(),
            reason: reason.to_string(),
        }
    }
}

/// Where a root rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Steady,
    Prepared,
    Switched,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Prepared => "prepared",
            Phase::Switched => "switched",
        }
    }
}

/// The roots workloads must trust, and the one new certificates chain to.
#[derive(Clone, Debug)]
pub struct Bundle {
    pub generation: u64,
    pub roots: Vec<Root>,
    pub signing_root: String,
    pub phase: Phase,
}

impl Bundle {
    pub fn roots_pem(&self) -> String {
        self.roots.iter().map(|r| r.pem.as_str()).collect()
    }
}

struct Inner {
    signing: Arc<Material>,
    /// Prepared: the material that will sign after the switch.
    next: Option<Arc<Material>>,
    /// Switched: the material that signed before, whose root stays trusted.
    previous: Option<Arc<Material>>,
}

impl Inner {
    fn phase(&self) -> Phase {
        match (&self.next, &self.previous) {
            (Some(_), _) => Phase::Prepared,
            (None, Some(_)) => Phase::Switched,
            (None, None) => Phase::Steady,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Persisted {
    signing: PathBuf,
    next: Option<PathBuf>,
    previous: Option<PathBuf>,
}

pub struct Authority {
    state_dir: PathBuf,
    trust_domain: String,
    inner: RwLock<Inner>,
    bundle: watch::Sender<Arc<Bundle>>,
    /// Certificates issued, by the SHA-256 of the root they chain to.
    issued: Mutex<HashMap<String, u64>>,
    refused: AtomicU64,
    /// How long signing takes, seconds (`citadel_server_csr_sign_seconds`).
    pub sign_seconds: prometheus_client::metrics::histogram::Histogram,
}

impl Authority {
    /// Opens the authority kept in `state_dir`. On first start it signs with
    /// the plug-in material in `plugin` if given, or generates a self-signed
    /// root in `state_dir/ca`. Later starts resume what `ca-state.json` says,
    /// including a rotation under way.
    pub fn open(
        state_dir: &Path,
        trust_domain: &str,
        plugin: Option<&Path>,
    ) -> Result<Self, AuthorityError> {
        fs::create_dir_all(state_dir).map_err(io(state_dir))?;
        let state_path = state_dir.join(STATE_FILE);
        let inner = if state_path.exists() {
            let text = fs::read_to_string(&state_path).map_err(io(&state_path))?;
            let p: Persisted = serde_json::from_str(&text)
                .map_err(|e| AuthorityError::invalid(&state_path, &e.to_string()))?;
            if let Some(dir) = plugin
                && dir != p.signing
                && Some(dir) != p.next.as_deref()
            {
                return Err(AuthorityError::Rotation(format!(
                    "{} says citadel signs with {}, not {}: bring new material in with \
                     `meshctl ca rotate --plugin-certs {}` so that workloads trust it first",
                    state_path.display(),
                    p.signing.display(),
                    dir.display(),
                    dir.display()
                )));
            }
            let load = |d: &Option<PathBuf>| d.as_deref().map(Material::load).transpose();
            Inner {
                signing: Arc::new(Material::load(&p.signing)?),
                next: load(&p.next)?.map(Arc::new),
                previous: load(&p.previous)?.map(Arc::new),
            }
        } else {
            let signing = match plugin {
                Some(dir) => Material::load(dir)?,
                None => {
                    let dir = state_dir.join(GENERATED_DIR);
                    if dir.join(crate::material::CA_KEY_FILE).exists() {
                        Material::load(&dir)?
                    } else {
                        Material::generate(&dir, trust_domain)?
                    }
                }
            };
            Inner {
                signing: Arc::new(signing),
                next: None,
                previous: None,
            }
        };
        let first = Arc::new(bundle_of(&inner, initial_generation()));
        let authority = Self {
            state_dir: state_dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            inner: RwLock::new(inner),
            bundle: watch::channel(first).0,
            issued: Mutex::default(),
            refused: AtomicU64::new(0),
            sign_seconds: prometheus_client::metrics::histogram::Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
        };
        authority.persist(&authority.inner.read().unwrap())?;
        Ok(authority)
    }

    /// The current bundle; changes are published on [`Authority::watch`].
    pub fn bundle(&self) -> Arc<Bundle> {
        self.bundle.borrow().clone()
    }

    pub fn watch(&self) -> watch::Receiver<Arc<Bundle>> {
        self.bundle.subscribe()
    }

    pub fn phase(&self) -> Phase {
        self.inner.read().unwrap().phase()
    }

    /// Certificates issued since start, by root SHA-256.
    pub fn issued(&self) -> HashMap<String, u64> {
        self.issued.lock().unwrap().clone()
    }

    pub fn note_refused(&self) {
        self.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Issues a workload certificate for `identity` over `public_key`.
    /// Returns the chain, leaf first, root last.
    pub fn issue(
        &self,
        public_key: &impl PublicKeyData,
        identity: &SpiffeId,
        lifetime: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        let started = std::time::Instant::now();
        let sans = vec![SanType::URI(identity.to_string().try_into()?)];
        let chain = self.sign(public_key, sans, lifetime);
        self.sign_seconds.observe(started.elapsed().as_secs_f64());
        chain
    }

    /// A key and certificate for a server that Kubernetes' API server calls
    /// by DNS name (the admission webhook). Returns (chain PEM, key PEM).
    pub fn issue_dns(
        &self,
        dns_names: &[String],
        lifetime: Duration,
    ) -> Result<(String, String), AuthorityError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let sans = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName(n.clone().try_into()?)))
            .collect::<Result<Vec<_>, rcgen::Error>>()?;
        let chain = self.sign(&key, sans, lifetime)?;
        Ok((chain.concat(), key.serialize_pem()))
    }

    fn sign(
        &self,
        public_key: &impl PublicKeyData,
        sans: Vec<SanType>,
        lifetime: Duration,
    ) -> Result<Vec<String>, AuthorityError> {
        let signing = self.inner.read().unwrap().signing.clone();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
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
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        // Never past the end of the CA certificate that signs it.
        let ca_end = OffsetDateTime::from_unix_timestamp(signing.ca_not_after)
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        params.not_after = (now + lifetime).min(ca_end);
        params.serial_number = Some(random_serial());
        let leaf = params.signed_by(public_key, &signing.issuer)?;
        *self
            .issued
            .lock()
            .unwrap()
            .entry(signing.root.sha256.clone())
            .or_default() += 1;
        let mut chain = Vec::with_capacity(1 + signing.chain_pem.len());
        chain.push(leaf.pem());
        chain.extend(signing.chain_pem.iter().cloned());
        Ok(chain)
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

    /// Rotation, step 1: trusts the root of new material (loaded from
    /// `plugin`, or generated) beside the current one.
    pub fn prepare(&self, plugin: Option<&Path>) -> Result<Arc<Bundle>, AuthorityError> {
        let mut inner = self.inner.write().unwrap();
        if inner.phase() != Phase::Steady {
            return Err(AuthorityError::Rotation(format!(
                "a rotation is already {}; finish it (switch, then commit) first",
                inner.phase().as_str()
            )));
        }
        let next = match plugin {
            Some(dir) => Material::load(dir)?,
            None => {
                let stamp = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_millis();
                Material::generate(
                    &self.state_dir.join("roots").join(stamp.to_string()),
                    &self.trust_domain,
                )?
            }
        };
        if next.dir == inner.signing.dir {
            return Err(AuthorityError::Rotation(format!(
                "{} is the material citadel already signs with",
                next.dir.display()
            )));
        }
        inner.next = Some(Arc::new(next));
        self.publish(&inner)
    }

    /// Rotation, step 2: the new material signs; the old root stays trusted.
    pub fn switch(&self) -> Result<Arc<Bundle>, AuthorityError> {
        let mut inner = self.inner.write().unwrap();
        let Some(next) = inner.next.take() else {
            return Err(AuthorityError::Rotation(format!(
                "nothing to switch to: the rotation is {}, not prepared",
                inner.phase().as_str()
            )));
        };
        inner.previous = Some(std::mem::replace(&mut inner.signing, next));
        self.publish(&inner)
    }

    /// Rotation, step 3: the old root leaves the bundle.
    pub fn commit(&self) -> Result<Arc<Bundle>, AuthorityError> {
        let mut inner = self.inner.write().unwrap();
        if inner.phase() != Phase::Switched {
            return Err(AuthorityError::Rotation(format!(
                "nothing to commit: the rotation is {}, not switched",
                inner.phase().as_str()
            )));
        }
        inner.previous = None;
        self.publish(&inner)
    }

    fn publish(&self, inner: &Inner) -> Result<Arc<Bundle>, AuthorityError> {
        self.persist(inner)?;
        let generation = self.bundle.borrow().generation + 1;
        let bundle = Arc::new(bundle_of(inner, generation));
        tracing::info!(
            generation,
            phase = bundle.phase.as_str(),
            roots = bundle.roots.len(),
            signing = %bundle.signing_root,
            "trust bundle changed"
        );
        self.bundle.send_replace(bundle.clone());
        Ok(bundle)
    }

    fn persist(&self, inner: &Inner) -> Result<(), AuthorityError> {
        let p = Persisted {
            signing: inner.signing.dir.clone(),
            next: inner.next.as_ref().map(|m| m.dir.clone()),
            previous: inner.previous.as_ref().map(|m| m.dir.clone()),
        };
        let json = serde_json::to_string_pretty(&p).expect("state serializes");
        replace_file(&self.state_dir.join(STATE_FILE), &json)?;
        replace_file(
            &self.state_dir.join(BUNDLE_FILE),
            &bundle_of(inner, 0).roots_pem(),
        )
    }
}

fn bundle_of(inner: &Inner, generation: u64) -> Bundle {
    let mut roots: Vec<Root> = Vec::new();
    for m in [
        Some(&inner.signing),
        inner.next.as_ref(),
        inner.previous.as_ref(),
    ]
    .into_iter()
    .flatten()
    {
        if !roots.iter().any(|r| r.sha256 == m.root.sha256) {
            roots.push(m.root.clone());
        }
    }
    Bundle {
        generation,
        roots,
        signing_root: inner.signing.root.sha256.clone(),
        phase: inner.phase(),
    }
}

/// Generations only grow, across restarts too (they start at the clock).
fn initial_generation() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

pub(crate) fn random_serial() -> SerialNumber {
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

/// Replaces `path` atomically (write beside it, then rename). The file
/// beside it is this writer's own: `citadel serve` and a `mint-token` run
/// may open one state directory at once, and a shared name let one rename
/// the other's file away before it could.
fn replace_file(path: &Path, contents: &str) -> Result<(), AuthorityError> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, contents).map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(|e| {
        let _ = fs::remove_file(&tmp);
        io(path)(e)
    })
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthorityError + '_ {
    move |source| AuthorityError::Io {
        path: path.to_path_buf(),
        source,
    }
}
