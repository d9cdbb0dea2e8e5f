//! Reloads pilot's config when its directory changes.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};

use crate::Pilot;

/// Editors write a file in several steps; wait this long after the last
/// event before reloading.
const SETTLE: Duration = Duration::from_millis(50);

/// Keeps the directory watch alive; dropping it stops reloading.
pub struct DirWatcher {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for DirWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl DirWatcher {
    pub(crate) fn start(pilot: Arc<Pilot>, dir: &Path) -> Result<Self, notify::Error> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        Ok(Self {
            _watcher: watcher,
            task: reload_on(pilot, rx),
        })
    }
}

/// A steady stream of changes (a rollout, endpoints churning) never
/// settles: reload at the latest this long after the first change.
const MAX_DELAY: Duration = Duration::from_millis(200);

/// Reloads `pilot` after each burst of changes sent on `changes` has
/// settled (or after [`MAX_DELAY`]), until every sender is gone. The
/// reload runs off the async workers, which keep serving proxies.
pub(crate) fn reload_on(
    pilot: Arc<Pilot>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Settle: drain the burst of events one save (or one rollout) makes.
            let first = tokio::time::Instant::now();
            loop {
                let left = MAX_DELAY.saturating_sub(first.elapsed());
                if left.is_zero() {
                    break;
                }
                match tokio::time::timeout(SETTLE.min(left), changes.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let pilot = pilot.clone();
            if tokio::task::spawn_blocking(move || pilot.reload())
                .await
                .is_err()
            {
                tracing::error!("a config reload panicked; the last good config keeps serving");
            }
        }
    })
}
