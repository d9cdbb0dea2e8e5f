//! JWKS documents that RequestAuthentication rules name by `jwksUri`:
//! pilot fetches them (as istiod does), keeps the last good copy, and
//! hands it to the proxies inline; a rule whose keys have not been fetched
//! yet goes out without keys, so its tokens are refused rather than
//! trusted.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

fn cache() -> &'static Mutex<HashMap<String, String>> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    CACHE.get_or_init(Mutex::default)
}

/// The last JWKS fetched from `uri`, if any.
pub fn cached(uri: &str) -> Option<String> {
    cache().lock().unwrap().get(uri).cloned()
}

/// Records a fetched JWKS; returns whether it differs from the copy held.
pub fn store(uri: &str, jwks: String) -> bool {
    cache()
        .lock()
        .unwrap()
        .insert(uri.to_string(), jwks.clone())
        != Some(jwks)
}

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;

/// How often fetched JWKS are fetched again (istiod's default is 20 min).
pub const REFRESH: Duration = Duration::from_secs(20 * 60);
/// How soon a JWKS that could not be fetched is tried again.
const RETRY: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_secs(5);
const MAX_BYTES: usize = 1 << 20;

/// The roots JWKS servers are checked against: the PEM bundle named by
/// `MESH_JWKS_CA_FILE`, else the system's (`/etc/ssl/certs/ca-certificates.crt`).
pub fn roots() -> RootCertStore {
    let path = std::env::var_os("MESH_JWKS_CA_FILE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| "/etc/ssl/certs/ca-certificates.crt".into());
    let mut store = RootCertStore::empty();
    match std::fs::read_to_string(&path) {
        Ok(pem) => {
            use rustls::pki_types::CertificateDer;
            use rustls::pki_types::pem::PemObject;
            for cert in CertificateDer::pem_slice_iter(pem.as_bytes()).flatten() {
                let _ = store.add(cert);
            }
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no roots for fetching JWKS over https")
        }
    }
    store
}

/// GETs a JWKS document from `uri` (https, or http), checking it is one.
pub async fn fetch(uri: &str, roots: Arc<RootCertStore>) -> Result<String, String> {
    let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
    let host = parsed
        .host()
        .ok_or_else(|| format!("{uri}: no host"))?
        .to_string();
    let https = parsed.scheme_str() == Some("https");
    let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let work = async {
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connecting: {e}"))?;
        let request = http::Request::get(path)
            .header(http::header::HOST, &host)
            .header(http::header::ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = if https {
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
            let name =
                rustls::pki_types::ServerName::try_from(host.trim_matches(['[', ']']).to_string())
                    .map_err(|e| format!("{host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS: {e}"))?;
            send(TokioIo::new(tls), request).await?
        } else {
            send(TokioIo::new(tcp), request).await?
        };
        if !response.status().is_success() {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_BYTES)
            .collect()
            .await
            .map_err(|e| format!("reading: {e}"))?
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).map_err(|_| "not UTF-8".to_string())?;
        let is_jwks = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .is_some_and(|v| v.get("keys").is_some_and(|k| k.is_array()));
        if !is_jwks {
            return Err("not a JWKS document (JSON with a \"keys\" array)".into());
        }
        Ok(text)
    };
    tokio::time::timeout(TIMEOUT, work)
        .await
        .map_err(|_| format!("{uri}: no answer within {TIMEOUT:?}"))?
        .map_err(|e| format!("{uri}: {e}"))
}

async fn send<T>(
    io: TokioIo<T>,
    request: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    tokio::spawn(conn);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP: {e}"))
}

/// Keeps the JWKS of every `jwksUri` in pilot's config fetched: at once
/// when a new one appears (and every second while it fails), and every
/// [`REFRESH`] after; a change reloads the config so proxies get the keys.
pub async fn refresh_forever(pilot: Arc<crate::Pilot>) {
    let roots = Arc::new(roots());
    let mut snapshots = pilot.subscribe();
    loop {
        let uris: std::collections::BTreeSet<String> = pilot
            .snapshot()
            .model
            .jwt
            .iter()
            .flat_map(|j| j.rules.iter())
            .map(|r| r.jwks_uri.clone())
            .filter(|u| !u.is_empty())
            .collect();
        let mut changed = false;
        let mut missing = false;
        for uri in &uris {
            match fetch(uri, roots.clone()).await {
                Ok(jwks) => changed |= store(uri, jwks),
                Err(e) => {
                    missing |= cached(uri).is_none();
                    tracing::warn!(error = %e, "JWKS fetch failed; the last fetched keys stay in use");
                }
            }
        }
        if changed {
            tracing::info!("JWKS changed; reloading the config");
            pilot.reload();
        }
        let wait = if missing { RETRY } else { REFRESH };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            changed = snapshots.changed() => if changed.is_err() { return },
        }
    }
}
