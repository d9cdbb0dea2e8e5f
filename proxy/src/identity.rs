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

/// Keeps `tx` holding valid credentials for as long as the proxy runs.
pub async fn run(cfg: Arc<Config>, tx: watch::Sender<Option<Arc<Tls>>>) {
    let fetch = || {
        mesh_identity::grpc::certificate_from(
            cfg.ca_addr,
            &cfg.ca_token,
            &cfg.identity,
            cfg.cert_lifetime,
            &cfg.roots_pem,
        )
    };
    mesh_identity::renew::renew_forever("proxy", fetch, |creds| match Tls::new(creds) {
        Ok(tls) => {
            tx.send_replace(Some(Arc::new(tls)));
        }
        Err(e) => tracing::error!(error = %e, "certificate unusable"),
    })
    .await
}
