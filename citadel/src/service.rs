//! `istio.v1.auth.IstioCertificateService/CreateCertificate`.

use std::sync::Arc;
use std::time::Duration;

use mesh_identity::SpiffeId;
use mesh_proto::ca::istio_certificate_service_server::IstioCertificateService;
use mesh_proto::ca::{IstioCertificateRequest, IstioCertificateResponse};
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};

use crate::auth::{Authenticator, Caller};
use crate::authority::Authority;

pub struct CertificateService {
    pub(crate) authority: Arc<Authority>,
    pub(crate) authenticators: Vec<Arc<dyn Authenticator>>,
    pub(crate) default_lifetime: Duration,
    pub(crate) max_lifetime: Duration,
}

impl CertificateService {
    async fn caller_identity(
        &self,
        req: &Request<IstioCertificateRequest>,
    ) -> Result<SpiffeId, Status> {
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
        let peer = req.peer_certs().and_then(|certs| {
            certs
                .first()
                .and_then(|c| mesh_identity::identity_of(c).ok())
        });
        let caller = Caller {
            bearer,
            peer: peer.as_ref(),
        };
        for a in &self.authenticators {
            match a.authenticate(&caller).await {
                Ok(Some(id)) => return Ok(id),
                Ok(None) => continue,
                Err(e) => return Err(Status::unauthenticated(e.to_string())),
            }
        }
        Err(Status::unauthenticated(
            "no credentials: send 'authorization: Bearer <token>' metadata",
        ))
    }

    fn lifetime(&self, requested_secs: i64) -> Duration {
        if requested_secs <= 0 {
            return self.default_lifetime;
        }
        Duration::from_secs(requested_secs as u64).min(self.max_lifetime)
    }
}

/// The one identity a CSR asks for; it must be a single SPIFFE URI SAN.
fn requested_identity(csr: &CertificateSigningRequestParams) -> Result<SpiffeId, Status> {
    let sans = &csr.params.subject_alt_names;
    match sans.as_slice() {
        [SanType::URI(uri)] => uri
            .as_str()
            .parse()
            .map_err(|e: mesh_identity::ParseError| Status::invalid_argument(format!("csr: {e}"))),
        [] => Err(Status::invalid_argument(
            "csr: no subject alternative name; put the workload's SPIFFE ID in a URI SAN",
        )),
        _ => Err(Status::invalid_argument(format!(
            "csr: {} subject alternative names; exactly one SPIFFE URI SAN is allowed",
            sans.len()
        ))),
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CertificateService {
    async fn create_certificate(
        &self,
        req: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let granted = self.caller_identity(&req).await?;
        let body = req.get_ref();
        let csr = CertificateSigningRequestParams::from_pem(&body.csr).map_err(|e| {
            Status::invalid_argument(format!("csr: not a valid PEM PKCS#10 request: {e}"))
        })?;
        let asked = requested_identity(&csr)?;
        if asked != granted {
            tracing::warn!(%asked, %granted, "refused a CSR for another identity");
            return Err(Status::permission_denied(format!(
                "csr asks for {asked}, but the caller is authorised only for {granted}"
            )));
        }
        let lifetime = self.lifetime(body.validity_duration);
        let chain = self
            .authority
            .issue_for_csr(&csr, &granted, lifetime)
            .map_err(|e| Status::internal(e.to_string()))?;
        tracing::info!(identity = %granted, lifetime_s = lifetime.as_secs(), "issued certificate");
        Ok(Response::new(IstioCertificateResponse {
            cert_chain: chain,
        }))
    }
}
