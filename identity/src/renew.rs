//! Keeping credentials fresh: fetch at start, renew at about half the
//! lifetime (±10 % jitter so a fleet spreads out), and on failure back off
//! exponentially while the current credentials keep serving.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::Credentials;

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// When to renew credentials that are valid for `remaining`.
pub fn renew_after(remaining: Duration) -> Duration {
    remaining.mul_f64(0.5 * rand::rng().random_range(0.9..1.1))
}

/// Runs forever: `fetch` new credentials, hand each to `publish`, sleep
/// until renewal is due. `what` names the holder in logs.
pub async fn renew_forever<F, Fut, E>(
    what: &str,
    mut fetch: F,
    mut publish: impl FnMut(Credentials),
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Credentials, E>>,
    E: std::fmt::Display,
{
    let mut backoff = MIN_BACKOFF;
    loop {
        match fetch().await {
            Ok(creds) => {
                backoff = MIN_BACKOFF;
                let due = renew_after(creds.remaining());
                tracing::info!(holder = what, identity = %creds.identity, valid_for = ?creds.remaining(), renew_in = ?due, "certificate installed");
                publish(creds);
                tokio::time::sleep(due).await;
            }
            Err(e) => {
                tracing::warn!(holder = what, error = %e, retry_in = ?backoff, "certificate request failed; the current certificate keeps serving");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Renews credentials with `fetch` for as long as the returned task runs,
/// and keeps the receiver holding a server config built from the newest
/// ones. Resolves once the first credentials are in.
pub async fn rotating_server_config<F, Fut, E>(
    what: &'static str,
    fetch: F,
    require_client: bool,
    alpn: &'static [&'static [u8]],
) -> (
    tokio::sync::watch::Receiver<std::sync::Arc<rustls::ServerConfig>>,
    tokio::task::JoinHandle<()>,
)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = Result<Credentials, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first_tx = Some(first_tx);
    let mut sender: Option<tokio::sync::watch::Sender<_>> = None;
    let task = tokio::spawn(renew_forever(what, fetch, move |creds| {
        let config = match crate::server_config(&creds, require_client, alpn) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(holder = what, error = %e, "certificate unusable for a server");
                return;
            }
        };
        match &sender {
            Some(s) => {
                s.send_replace(config);
            }
            None => {
                let (s, r) = tokio::sync::watch::channel(config);
                sender = Some(s);
                if let Some(tx) = first_tx.take() {
                    let _ = tx.send(r);
                }
            }
        }
    }));
    let rx = first_rx
        .await
        .expect("the renewal task publishes before it ends");
    (rx, task)
}
