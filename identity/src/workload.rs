//! A workload's side of the CA: its certificate, renewed at about half its
//! life, and the trust bundle, watched live.
//!
//! - The first certificate is requested with the workload's bearer token;
//!   renewals present the current certificate over mutual TLS instead
//!   (falling back to the token if citadel no longer accepts it).
//! - citadel's `TrustBundleService/Watch` stream sends the roots to trust;
//!   each bundle is applied to the credentials at once (connections in
//!   flight keep the config they started with). When the bundle names a
//!   signing root the current certificate does not chain to, the
//!   certificate is renewed promptly. Every change is reported back, so a
//!   rotation can wait until every workload has caught up.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_proto::resources::trust_bundle_service_client::TrustBundleServiceClient;
use mesh_proto::resources::{BundleReport, TrustBundle};
use rand::Rng;
use rustls::RootCertStore;
use tokio::sync::{Notify, watch};
use tokio_stream::StreamExt;

use crate::grpc::{CaError, channel_marked, citadel_identity, request_certificate};
use crate::{Credentials, SpiffeId};

/// How a workload reaches citadel and who it is.
#[derive(Clone, Debug)]
pub struct CaSettings {
    pub addr: SocketAddr,
    pub identity: SpiffeId,
    /// Bearer token for the first certificate (and when renewal by
    /// certificate is refused). May be empty once a certificate is held.
    pub token: String,
    /// Requested lifetime; zero takes citadel's default.
    pub lifetime: Duration,
    /// The roots trusted before the first bundle arrives.
    pub roots_pem: String,
    /// Mark for the sockets to citadel (see [`crate::grpc::dial`]).
    pub socket_mark: Option<u32>,
}

struct Trust {
    roots: Arc<RootCertStore>,
    roots_pem: String,
    generation: u64,
}

struct Shared {
    settings: CaSettings,
    trust: Mutex<Trust>,
    creds: watch::Sender<Option<Credentials>>,
    renew_now: Arc<Notify>,
}

/// Starts keeping credentials for `settings.identity`; the receiver holds
/// the newest (None until the first certificate is in). The task runs
/// until aborted.
pub fn start(
    settings: CaSettings,
) -> Result<
    (
        watch::Receiver<Option<Credentials>>,
        tokio::task::JoinHandle<()>,
    ),
    crate::CredentialsError,
> {
    let roots = Arc::new(crate::root_store(&settings.roots_pem)?);
    let (tx, rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        trust: Mutex::new(Trust {
            roots,
            roots_pem: settings.roots_pem.clone(),
            generation: 0,
        }),
        settings,
        creds: tx,
        renew_now: Arc::new(Notify::new()),
    });
    let task = tokio::spawn(async move {
        let s = shared.clone();
        let renewal = crate::renew::renew_forever(
            "workload",
            || fetch(s.clone()),
            shared.renew_now.clone(),
            |c: Credentials| {
                // The bundle may have changed while the request was out.
                let roots = shared.trust.lock().unwrap().roots.clone();
                shared.creds.send_replace(Some(c.with_roots(roots)));
            },
        );
        tokio::join!(renewal, watch_bundle(shared.clone()));
    });
    Ok((rx, task))
}

/// One certificate request: by the current certificate if there is a valid
/// one, else (or if that is refused) by the token.
async fn fetch(s: Arc<Shared>) -> Result<Credentials, CaError> {
    let (roots, roots_pem) = {
        let t = s.trust.lock().unwrap();
        (t.roots.clone(), t.roots_pem.clone())
    };
    let current = s
        .creds
        .borrow()
        .clone()
        .filter(|c| !c.remaining().is_zero());
    let expected = citadel_identity(&s.settings.identity.trust_domain);
    let ask = |creds: Option<&Credentials>, token: &str| {
        let tls = crate::client_config(creds, roots.clone(), expected.clone(), &[b"h2"])
            .map_err(|e| CaError::Answer(crate::CredentialsError::Root(e)));
        let token = token.to_string();
        let roots_pem = roots_pem.clone();
        let s = s.clone();
        async move {
            request_certificate(
                channel_marked(s.settings.addr, tls?, s.settings.socket_mark),
                &token,
                &s.settings.identity,
                s.settings.lifetime,
                &roots_pem,
            )
            .await
        }
    };
    if let Some(c) = &current {
        match ask(Some(c), "").await {
            Ok(creds) => return Ok(creds),
            Err(e) if s.settings.token.is_empty() => return Err(e),
            Err(e) => tracing::info!(error = %e, "renewal by certificate refused; using the token"),
        }
    }
    ask(None, &s.settings.token).await
}

/// Watches the trust bundle for as long as the workload runs, reconnecting
/// with backoff.
async fn watch_bundle(s: Arc<Shared>) {
    let mut backoff =
        crate::backoff::Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
    loop {
        let ended = watch_once(&s).await;
        if ended.is_ok() {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        if let Err(e) = ended {
            tracing::warn!(error = %e, retry_in = ?wait, "trust bundle stream ended; the current roots stay trusted")
        }
        tokio::time::sleep(wait).await;
    }
}

async fn watch_once(s: &Arc<Shared>) -> Result<(), CaError> {
    let mut creds_rx = s.creds.subscribe();
    // Authenticate like a renewal: certificate if held, else token.
    let current = creds_rx
        .borrow_and_update()
        .clone()
        .filter(|c| !c.remaining().is_zero());
    let roots = s.trust.lock().unwrap().roots.clone();
    let tls = crate::client_config(
        current.as_ref(),
        roots,
        citadel_identity(&s.settings.identity.trust_domain),
        &[b"h2"],
    )
    .map_err(|e| CaError::Answer(crate::CredentialsError::Root(e)))?;
    let (report_tx, report_rx) = tokio::sync::mpsc::channel::<BundleReport>(8);
    let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(report_rx));
    if current.is_none() {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {}", s.settings.token)
                .parse()
                .map_err(|_| CaError::Token)?,
        );
    }
    let mut bundles =
        TrustBundleServiceClient::new(channel_marked(s.settings.addr, tls, s.settings.socket_mark))
            .watch(req)
            .await?
            .into_inner();
    let report = |s: &Shared| {
        let generation = s.trust.lock().unwrap().generation;
        BundleReport {
            applied_generation: generation,
            leaf_root_sha256: s
                .creds
                .borrow()
                .as_ref()
                .map(Credentials::chain_root_sha256)
                .unwrap_or_default(),
        }
    };
    loop {
        tokio::select! {
            next = bundles.next() => match next {
                Some(Ok(bundle)) => {
                    apply(s, bundle);
                    let _ = report_tx.send(report(s)).await;
                }
                Some(Err(status)) => return Err(status.into()),
                None => return Ok(()),
            },
            changed = creds_rx.changed() => {
                if changed.is_err() {
                    return Ok(());
                }
                creds_rx.borrow_and_update();
                let _ = report_tx.send(report(s)).await;
            }
        }
    }
}

/// Trusts a new bundle from now on: republishes the current credentials
/// with its roots, and renews promptly if the certificate does not chain to
/// the signing root.
fn apply(s: &Shared, bundle: TrustBundle) {
    let pem: String = bundle.roots_pem.concat();
    let roots = match crate::root_store(&pem) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!(error = %e, generation = bundle.generation, "trust bundle refused; the current roots stay trusted");
            return;
        }
    };
    {
        let mut t = s.trust.lock().unwrap();
        if t.generation == bundle.generation && t.roots_pem == pem {
            return;
        }
        *t = Trust {
            roots: roots.clone(),
            roots_pem: pem,
            generation: bundle.generation,
        };
    }
    let stale = s.creds.borrow().as_ref().map(|c| {
        let fresh = c.with_roots(roots.clone());
        let stale = c.chain_root_sha256() != bundle.signing_root_sha256;
        (fresh, stale)
    });
    tracing::info!(
        generation = bundle.generation,
        roots = bundle.roots_pem.len(),
        "trust bundle applied"
    );
    if let Some((fresh, stale)) = stale {
        s.creds.send_replace(Some(fresh));
        if stale {
            // Spread a fleet's renewals over a moment rather than all at once.
            let wait = Duration::from_millis(rand::rng().random_range(0..500));
            let notify = s.renew_now.clone();
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                notify.notify_one();
            });
        }
    }
}
