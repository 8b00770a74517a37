//! Reloading the policy when its files change.
//!
//! notify reports raw file-system events; a burst of them (an editor's write-rename, a ConfigMap
//! swapping its `..data` symlink, `git checkout` touching many files) is folded into one reload
//! after a quiet period. The reload itself compares content hashes, so spurious events are cheap.

use std::sync::Arc;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use super::Store;

/// Starts watching every configured path. The returned watcher must be kept alive.
pub fn spawn_watcher(store: Arc<Store>) -> notify::Result<notify::RecommendedWatcher> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    for path in &store.config().paths {
        watcher.watch(path, RecursiveMode::Recursive)?;
    }
    let debounce = store.config().debounce;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Wait until the events stop for `debounce`.
            loop {
                match tokio::time::timeout(debounce, rx.recv()).await {
                    Ok(Some(())) => continue,
                    Ok(None) => return,
                    Err(_) => break,
                }
            }
            let store = store.clone();
            let _ = tokio::task::spawn_blocking(move || store.reload()).await;
        }
    });
    Ok(watcher)
}
