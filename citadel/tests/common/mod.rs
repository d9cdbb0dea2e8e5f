//! What citadel's test files share: a citadel served on loopback, and a
//! CreateCertificate call made as a workload would.
#![allow(dead_code)]

use std::sync::Arc;

use mesh_citadel::{Citadel, Config};
use mesh_identity::Credentials;
use mesh_proto::ca::IstioCertificateRequest;
use mesh_proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;

pub struct Ca {
    pub citadel: Arc<Citadel>,
    pub addr: std::net::SocketAddr,
    pub _dir: Option<tempfile::TempDir>,
}

/// Opens citadel with `config` and serves it on 127.0.0.1.
pub async fn serve(config: Config) -> Ca {
    serve_with(config, Vec::new()).await
}

/// As [`serve`], with `extra` authenticators after the built-in ones.
pub async fn serve_with(config: Config, extra: Vec<Arc<dyn mesh_citadel::Authenticator>>) -> Ca {
    let citadel = Arc::new(Citadel::open(config).unwrap());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let c = citadel.clone();
    tokio::spawn(async move {
        c.serve_with(listener, extra, std::future::pending())
            .await
            .unwrap()
    });
    Ca {
        citadel,
        addr,
        _dir: None,
    }
}

/// CreateCertificate for `csr` and `secs` of lifetime, authenticated by
/// `creds` over mutual TLS and/or a bearer `token`.
pub async fn create(
    ca: &Ca,
    creds: Option<&Credentials>,
    token: Option<&str>,
    csr: String,
    secs: i64,
) -> Result<Vec<String>, tonic::Status> {
    let roots = Arc::new(mesh_identity::root_store(&ca.citadel.roots_pem()).unwrap());
    let tls = mesh_identity::client_config(creds, roots, ca.citadel.identity(), &[b"h2"]).unwrap();
    let mut client = IstioCertificateServiceClient::new(mesh_identity::grpc::channel(ca.addr, tls));
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: secs,
        metadata: None,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client
        .create_certificate(req)
        .await
        .map(|r| r.into_inner().cert_chain)
}

pub fn pem_der(pem: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

/// A P-256 CSR asking for these URI SANs.
pub fn csr_for(sans: &[&str]) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.subject_alt_names = sans
        .iter()
        .map(|s| rcgen::SanType::URI((*s).try_into().unwrap()))
        .collect();
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// A P-256 CSR for service account `sa` in namespace default.
pub fn csr_for_sa(sa: &str) -> String {
    csr_for(&[&format!("spiffe://cluster.local/ns/default/sa/{sa}")])
}
