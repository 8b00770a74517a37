//! The current policy snapshot and how it is replaced.

use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{Config, Error, Policy, collect};
use crate::telemetry::Metrics;

/// What a reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The files hash to the revision already serving: nothing swapped.
    Unchanged,
    /// A new revision compiled and is now serving.
    Reloaded { revision: String },
    /// The new files did not compile; the previous revision keeps serving.
    Failed { error: Error },
}

/// Lock-free holder of the serving [`Policy`].
///
/// Readers take a snapshot with [`Store::current`] and keep it for the whole request, so a swap
/// in the middle of a request cannot mix revisions. Reloads are serialised by a mutex so two
/// triggers (a file event and SIGHUP) never compile concurrently.
pub struct Store {
    config: Config,
    current: ArcSwap<Policy>,
    reload_lock: std::sync::Mutex<()>,
    metrics: Arc<Metrics>,
}

impl Store {
    /// Loads the initial policy; fails if it does not compile (the server must not start on it).
    pub fn load(config: Config, metrics: Arc<Metrics>) -> Result<Store, Error> {
        let policy = Policy::load(&config)?;
        metrics.set_policy_revision(policy.revision());
        Ok(Store {
            config,
            current: ArcSwap::from_pointee(policy),
            reload_lock: std::sync::Mutex::new(()),
            metrics,
        })
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Re-reads the files and swaps in the new revision if it compiles.
    pub fn reload(&self) -> ReloadOutcome {
        let _guard = self
            .reload_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let outcome = match collect(&self.config.paths, false) {
            Err(error) => ReloadOutcome::Failed { error },
            Ok(sources) if sources.revision == self.current.load().revision() => {
                ReloadOutcome::Unchanged
            }
            Ok(sources) => match Policy::compile(&self.config, sources) {
                Ok(policy) => {
                    let revision = policy.revision().to_string();
                    self.metrics.set_policy_revision(&revision);
                    self.current.store(Arc::new(policy));
                    ReloadOutcome::Reloaded { revision }
                }
                Err(error) => ReloadOutcome::Failed { error },
            },
        };
        match &outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Reloaded { revision } => {
                self.metrics.policy_reload("ok");
                tracing::info!(revision = %revision, "policy reloaded");
            }
            ReloadOutcome::Failed { error } => {
                self.metrics.policy_reload("error");
                tracing::error!(
                    error = %error,
                    serving = %self.current.load().revision(),
                    "policy reload failed; the last good policy keeps serving"
                );
            }
        }
        outcome
    }
}
