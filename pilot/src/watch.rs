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

/// Reloads `pilot` after each burst of changes sent on `changes` has
/// settled, until every sender is gone.
pub(crate) fn reload_on(
    pilot: Arc<Pilot>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while changes.recv().await.is_some() {
            // Settle: drain the burst of events one save (or one rollout) makes.
            loop {
                match tokio::time::timeout(SETTLE, changes.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            pilot.reload();
        }
    })
}
