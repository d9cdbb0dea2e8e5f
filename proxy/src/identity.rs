//! The proxy's own identity: a key made here, certified by citadel, renewed
//! at about half its lifetime. Each renewal publishes a fresh `Tls`;
//! connections in flight keep the config they started with.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use mesh_identity::{Credentials, SpiffeId};
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;

use crate::config::Config;

pub const ALPN_H2: &[u8] = b"h2";

/// Everything mutual TLS needs, built from one set of credentials.
pub struct Tls {
    pub creds: Credentials,
    pub server: Arc<ServerConfig>,
    /// Client configs by the identity the server must present.
    clients: RwLock<HashMap<SpiffeId, Arc<ClientConfig>>>,
}

impl Tls {
    pub fn new(creds: Credentials) -> Result<Self, rustls::Error> {
        let server = mesh_identity::server_config(&creds, true, &[ALPN_H2])?;
        Ok(Self {
            creds,
            server,
            clients: RwLock::default(),
        })
    }

    /// A client config that accepts only a server presenting `expected`.
    pub fn client_for(&self, expected: &SpiffeId) -> Result<Arc<ClientConfig>, rustls::Error> {
        if let Some(c) = self.clients.read().unwrap().get(expected) {
            return Ok(c.clone());
        }
        let c = mesh_identity::client_config(
            Some(&self.creds),
            self.creds.roots.clone(),
            expected.clone(),
            &[ALPN_H2],
        )?;
        self.clients
            .write()
            .unwrap()
            .insert(expected.clone(), c.clone());
        Ok(c)
    }
}

/// Keeps `tx` holding valid credentials for as long as the proxy runs:
/// renewed at about half their life, and rebuilt with the new roots
/// whenever citadel's trust bundle changes.
pub async fn run(cfg: Arc<Config>, tx: watch::Sender<Option<Arc<Tls>>>) {
    let settings = mesh_identity::workload::CaSettings {
        addr: cfg.ca_addr,
        identity: cfg.identity.clone(),
        token: cfg.ca_token.clone(),
        lifetime: cfg.cert_lifetime,
        roots_pem: cfg.roots_pem.clone(),
        socket_mark: cfg.socket_mark,
    };
    let (mut creds, task) = match mesh_identity::workload::start(settings) {
        Ok(started) => started,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the certificate manager");
            return;
        }
    };
    let _task = tokio_util::task::AbortOnDropHandle::new(task);
    while creds.changed().await.is_ok() {
        let next = creds.borrow_and_update().clone();
        let Some(next) = next else { continue };
        match Tls::new(next) {
            Ok(tls) => {
                tx.send_replace(Some(Arc::new(tls)));
            }
            Err(e) => tracing::error!(error = %e, "certificate unusable"),
        }
    }
}
