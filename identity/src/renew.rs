//! Keeping credentials fresh: fetch at start, renew at about half the
//! lifetime (±10 % jitter so a fleet spreads out) or at once when woken,
//! and on failure back off exponentially while the current credentials
//! keep serving.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::sync::{Notify, watch};

use crate::Credentials;
use crate::backoff::Backoff;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// When to renew credentials that are valid for `remaining`.
pub fn renew_after(remaining: Duration) -> Duration {
    remaining.mul_f64(0.5 * rand::rng().random_range(0.9..1.1))
}

/// Runs forever: `fetch` new credentials, hand each to `publish`, sleep
/// until renewal is due or `wake` is notified. `what` names the holder in
/// logs.
pub async fn renew_forever<F, Fut, E>(
    what: &str,
    mut fetch: F,
    wake: Arc<Notify>,
    mut publish: impl FnMut(Credentials),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credentials, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
    loop {
        match fetch().await {
            Ok(creds) => {
                backoff.reset();
                let due = renew_after(creds.remaining());
                tracing::info!(holder = what, identity = %creds.identity, valid_for = ?creds.remaining(), renew_in = ?due, "certificate installed");
                publish(creds);
                tokio::select! {
                    _ = tokio::time::sleep(due) => {}
                    _ = wake.notified() => tracing::info!(holder = what, "renewing early: the signing root changed"),
                }
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(holder = what, error = %e, retry_in = ?wait, "certificate request failed; the current certificate keeps serving");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A server config built from the newest credentials in `creds`, kept
/// current for as long as `creds` has a sender. Resolves once the first
/// credentials are in.
pub async fn server_configs(
    what: &'static str,
    mut creds: watch::Receiver<Option<Credentials>>,
    require_client: bool,
    alpn: &'static [&'static [u8]],
) -> watch::Receiver<Arc<rustls::ServerConfig>> {
    let build = move |c: &Credentials| match crate::server_config(c, require_client, alpn) {
        Ok(config) => Some(config),
        Err(e) => {
            tracing::error!(holder = what, error = %e, "certificate unusable for a server");
            None
        }
    };
    let first = loop {
        if creds.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
        let built = creds.borrow_and_update().as_ref().and_then(&build);
        if let Some(config) = built {
            break config;
        }
        if creds.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while creds.changed().await.is_ok() {
            let next = creds.borrow_and_update().as_ref().and_then(&build);
            if let Some(config) = next {
                tx.send_replace(config);
            }
        }
    });
    rx
}
