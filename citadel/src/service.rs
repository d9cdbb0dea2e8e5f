//! citadel's gRPC services: Istio's `CreateCertificate`, the trust bundle
//! workloads watch, and the operator's status and rotation controls.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{Stream, StreamExt};
use mesh_identity::SpiffeId;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use mesh_proto::resources as pb;
use mesh_proto::resources::ca_admin_server::CaAdmin;
use mesh_proto::resources::trust_bundle_service_server::TrustBundleService;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::{AuthError, Authenticator, Caller};
use crate::authority::{Authority, AuthorityError, Bundle};
use crate::csr;

pub struct Shared {
    pub(crate) authority: Arc<Authority>,
    pub(crate) authenticators: Vec<Arc<dyn Authenticator>>,
    pub(crate) default_lifetime: Duration,
    pub(crate) max_lifetime: Duration,
    /// Who may call [`CaAdmin`].
    pub(crate) admin: SpiffeId,
    watchers: Mutex<BTreeMap<u64, pb::WorkloadStatus>>,
    next_watcher: AtomicU64,
    /// Becomes true when citadel shuts down: bundle streams end then, so
    /// that the server's graceful shutdown does not wait on them.
    closing: tokio::sync::watch::Receiver<bool>,
}

impl Shared {
    pub(crate) fn new(
        authority: Arc<Authority>,
        authenticators: Vec<Arc<dyn Authenticator>>,
        default_lifetime: Duration,
        max_lifetime: Duration,
        admin: SpiffeId,
        closing: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            authority,
            authenticators,
            default_lifetime,
            max_lifetime,
            admin,
            watchers: Mutex::default(),
            next_watcher: AtomicU64::new(0),
            closing,
        }
    }

    async fn caller_identity<T>(&self, req: &Request<T>) -> Result<SpiffeId, Status> {
        let bearer = match req.metadata().get("authorization") {
            None => None,
            Some(v) => {
                let v = v.to_str().map_err(|_| {
                    Status::unauthenticated("authorization metadata is not valid text")
                })?;
                Some(v.strip_prefix("Bearer ").ok_or_else(|| {
                    Status::unauthenticated("authorization metadata must be 'Bearer <token>'")
                })?)
            }
        };
        let peer_chain = req.peer_certs();
        let caller = Caller {
            bearer,
            peer_chain: peer_chain.as_deref().map(|c| c.as_slice()),
        };
        for a in &self.authenticators {
            match a.authenticate(&caller).await {
                Ok(Some(id)) => return Ok(id),
                Ok(None) => continue,
                Err(e @ AuthError::Unavailable(_)) => {
                    return Err(Status::unavailable(e.to_string()));
                }
                Err(e) => return Err(Status::unauthenticated(e.to_string())),
            }
        }
        Err(Status::unauthenticated(
            "no credentials: present your mesh certificate, or send 'authorization: Bearer <token>' metadata",
        ))
    }

    fn lifetime(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            return self.default_lifetime;
        }
        Duration::from_secs(requested_secs as u64).min(self.max_lifetime)
    }

    fn sign(
        &self,
        granted: &SpiffeId,
        body: &IstioCertificateRequest,
    ) -> Result<Vec<String>, Status> {
        let csr = csr::check(&body.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if csr.identity != *granted {
            tracing::warn!(asked = %csr.identity, %granted, "refused a CSR for another identity");
            return Err(Status::permission_denied(format!(
                "csr asks for {}, but the caller is authorised only for {granted}",
                csr.identity
            )));
        }
        let lifetime = self.lifetime(body.validity_duration);
        let chain = self
            .authority
            .issue(&csr.params.public_key, granted, lifetime)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::debug!(identity = %granted, lifetime_s = lifetime.as_secs(), "issued certificate");
        Ok(chain)
    }

    pub(crate) fn status(&self) -> pb::CaStatus {
        let bundle = self.authority.bundle();
        let issued = self.authority.issued();
        let roots = bundle
            .roots
            .iter()
            .map(|r| pb::RootStatus {
                sha256: r.sha256.clone(),
                subject: r.subject.clone(),
                not_before: r.not_before,
                not_after: r.not_after,
                role: role(&bundle, &r.sha256).to_string(),
                issued: issued.get(&r.sha256).copied().unwrap_or(0),
            })
            .collect();
        pb::CaStatus {
            generation: bundle.generation,
            phase: bundle.phase.as_str().to_string(),
            roots,
            workloads: self.watchers.lock().unwrap().values().cloned().collect(),
            issued_total: issued.values().sum(),
            refused_total: self.authority.refused(),
        }
    }
}

fn role(bundle: &Bundle, sha: &str) -> &'static str {
    use crate::authority::Phase;
    match (sha == bundle.signing_root, bundle.phase) {
        (true, _) => "signing",
        (false, Phase::Prepared) => "next",
        (false, _) => "trusted",
    }
}

/// The services, sharing one [`Shared`].
#[derive(Clone)]
pub struct Services(pub(crate) Arc<Shared>);

#[tonic::async_trait]
impl IstioCertificateService for Services {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let result = match self.0.caller_identity(&req).await {
            Ok(granted) => self.0.sign(&granted, req.get_ref()),
            Err(e) => Err(e),
        };
        match result {
            Ok(cert_chain) => Ok(Response::new(IstioCertificateResponse { cert_chain })),
            Err(status) => {
                self.0.authority.note_refused();
                tracing::info!(code = ?status.code(), reason = status.message(), "refused a certificate request");
                Err(status)
            }
        }
    }
}

type BundleStream = Pin<Box<dyn Stream<Item = Result<pb::TrustBundle, Status>> + Send>>;

/// Removes a watcher from the table when its stream ends.
struct WatcherGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        self.shared.watchers.lock().unwrap().remove(&self.id);
    }
}

fn to_proto(b: &Bundle) -> pb::TrustBundle {
    pb::TrustBundle {
        generation: b.generation,
        roots_pem: b.roots.iter().map(|r| r.pem.clone()).collect(),
        signing_root_sha256: b.signing_root.clone(),
    }
}

#[tonic::async_trait]
impl TrustBundleService for Services {
    type WatchStream = BundleStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::BundleReport>>,
    ) -> Result<Response<BundleStream>, Status> {
        let identity = self.0.caller_identity(&req).await?;
        let peer = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let shared = self.0.clone();
        let id = shared.next_watcher.fetch_add(1, Ordering::Relaxed);
        shared.watchers.lock().unwrap().insert(
            id,
            pb::WorkloadStatus {
                identity: identity.to_string(),
                peer,
                applied_generation: 0,
                leaf_root_sha256: String::new(),
            },
        );
        let guard = Arc::new(WatcherGuard {
            shared: shared.clone(),
            id,
        });
        let mut reports = req.into_inner();
        let reader_guard = guard.clone();
        let reader = tokio::spawn(async move {
            while let Some(Ok(r)) = reports.next().await {
                let shared = &reader_guard.shared;
                if let Some(w) = shared.watchers.lock().unwrap().get_mut(&reader_guard.id) {
                    w.applied_generation = r.applied_generation;
                    w.leaf_root_sha256 = r.leaf_root_sha256;
                }
            }
        });
        let bundles = tokio_stream::wrappers::WatchStream::new(shared.authority.watch());
        // The guard lives as long as the outbound stream: when the workload
        // goes, its row goes, and the report reader stops with it.
        let abort = tokio_util::task::AbortOnDropHandle::new(reader);
        let mut closing = shared.closing.clone();
        let out = bundles
            .map(move |b| {
                let _keep = (&guard, &abort);
                Ok(to_proto(&b))
            })
            .take_until(async move {
                let _ = closing.wait_for(|c| *c).await;
            });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl CaAdmin for Services {
    async fn status(
        &self,
        req: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.admin_only(&req).await?;
        Ok(Response::new(self.0.status()))
    }

    async fn rotate(
        &self,
        req: Request<pb::RotateRequest>,
    ) -> Result<Response<pb::CaStatus>, Status> {
        self.admin_only(&req).await?;
        let body = req.into_inner();
        let authority = &self.0.authority;
        let done = match pb::rotate_request::Step::try_from(body.step) {
            Ok(pb::rotate_request::Step::Prepare) => {
                let dir = (!body.plugin_dir.is_empty())
                    .then(|| std::path::PathBuf::from(&body.plugin_dir));
                authority.prepare(dir.as_deref())
            }
            Ok(pb::rotate_request::Step::Switch) => authority.switch(),
            Ok(pb::rotate_request::Step::Commit) => authority.commit(),
            _ => {
                return Err(Status::invalid_argument(
                    "step must be PREPARE, SWITCH or COMMIT",
                ));
            }
        };
        done.map_err(|e| match e {
            AuthorityError::Rotation(_) => Status::failed_precondition(e.to_string()),
            _ => Status::invalid_argument(e.to_string()),
        })?;
        Ok(Response::new(self.0.status()))
    }
}

impl Services {
    async fn admin_only<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let caller = self.0.caller_identity(req).await?;
        if caller != self.0.admin {
            return Err(Status::permission_denied(format!(
                "{caller} may not administer the CA; only {} may",
                self.0.admin
            )));
        }
        Ok(())
    }
}
