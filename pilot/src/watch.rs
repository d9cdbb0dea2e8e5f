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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                if event.is_ok_and(|e| !e.kind.is_access()) {
                    let _ = tx.send(());
                }
            })?;
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
        let task = tokio::spawn(async move {
            while rx.recv().await.is_some() {
                // Settle: drain the burst of events one save makes.
                loop {
                    match tokio::time::timeout(SETTLE, rx.recv()).await {
                        Ok(Some(())) => continue,
                        Ok(None) => return,
                        Err(_) => break,
                    }
                }
                pilot.reload();
            }
        });
        Ok(Self {
            _watcher: watcher,
            task,
        })
    }
}
