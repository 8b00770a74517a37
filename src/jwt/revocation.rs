//! The `jti` revocation list: a file of revoked token ids, one per line, reloaded when it changes.
//!
//! The file is polled (size and mtime) rather than watched so it also works on volumes where
//! inotify events do not arrive (some network and projected volumes). A file that cannot be read
//! keeps the last good list, so a botched edit never un-revokes a token.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;

const POLL: Duration = Duration::from_secs(2);

pub struct Revocations {
    path: PathBuf,
    ids: ArcSwap<HashSet<String>>,
    stamp: std::sync::Mutex<Option<(SystemTime, u64)>>,
}

impl Revocations {
    /// Loads the file now (a missing file is an empty list, logged).
    pub fn new(path: PathBuf) -> Revocations {
        let r = Revocations {
            path,
            ids: ArcSwap::from_pointee(HashSet::new()),
            stamp: std::sync::Mutex::new(None),
        };
        r.reload_if_changed();
        r
    }

    pub fn is_revoked(&self, jti: &str) -> bool {
        self.ids.load().contains(jti)
    }

    pub fn len(&self) -> usize {
        self.ids.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn start(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL).await;
                self.reload_if_changed();
            }
        });
    }

    /// Re-reads the file when its size or mtime changed. Returns whether it reloaded.
    pub fn reload_if_changed(&self) -> bool {
        let meta = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot stat revocation list; keeping the last one");
                return false;
            }
        };
        let stamp = (
            meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            meta.len(),
        );
        let mut last = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == Some(stamp) {
            return false;
        }
        match std::fs::read_to_string(&self.path) {
            Ok(text) => {
                let ids: HashSet<String> = text
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(str::to_owned)
                    .collect();
                tracing::info!(path = %self.path.display(), revoked = ids.len(), "revocation list loaded");
                self.ids.store(Arc::new(ids));
                *last = Some(stamp);
                true
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot read revocation list; keeping the last one");
                false
            }
        }
    }
}
