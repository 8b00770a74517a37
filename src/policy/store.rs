//! The current policy snapshot and how it is replaced.
//!
//! A new revision replaces the serving one only after three gates: it compiles (with the static
//! call checks), its own `test_*` rules pass (`policy.test_on_reload`), and it decides without
//! error every recent real input the serving revision decided without error (the canary). A
//! decision that merely changes is what a reload is for; a new error is an outage.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use regorus::Value;

use super::{Config, Error, Policy, collect, testing};
use crate::telemetry::Metrics;

/// What a reload attempt did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The files hash to the revision already serving: nothing swapped.
    Unchanged,
    /// A new revision compiled, passed the gates and is now serving.
    Reloaded { revision: String },
    /// The new files did not compile or failed a gate; the previous revision keeps serving.
    Failed { error: Error },
}

/// The last reload that did not go live, for `/readyz`.
#[derive(Debug, Clone)]
pub struct ReloadError {
    /// RFC 3339.
    pub time: String,
    /// `compile`, `tests` or `gate`.
    pub stage: &'static str,
    /// `file:line:col` when the error names one.
    pub location: Option<String>,
    pub message: String,
}

/// Lock-free holder of the serving [`Policy`].
///
/// Readers take a snapshot with [`Store::current`] and keep it for the whole request, so a swap
/// in the middle of a request cannot mix revisions. Reloads are serialised by a mutex so two
/// triggers (a file event and SIGHUP) never compile concurrently.
pub struct Store {
    config: Config,
    current: ArcSwap<Policy>,
    reload_lock: Mutex<()>,
    metrics: Arc<Metrics>,
    /// The last `config.reload_gate_samples` inputs, for the canary. In memory only.
    samples: Mutex<VecDeque<Value>>,
    last_error: Mutex<Option<ReloadError>>,
}

/// What the canary costs and found, for the log.
struct GateReport {
    samples: usize,
    took: Duration,
}

impl Store {
    /// Loads the initial policy; fails if it does not compile (the server must not start on it).
    pub fn load(config: Config, metrics: Arc<Metrics>) -> Result<Store, Error> {
        let policy = Policy::load(&config)?;
        if let Some(reason) = policy.fallback() {
            metrics.policy_engine_fallback();
            tracing::warn!(reason = %reason, revision = %policy.revision(),
                "engine auto: the policy does not compile for the RVM; running it on the interpreter");
        }
        metrics.set_policy_revision(policy.revision());
        Ok(Store {
            samples: Mutex::new(VecDeque::with_capacity(config.reload_gate_samples)),
            config,
            current: ArcSwap::from_pointee(policy),
            reload_lock: Mutex::new(()),
            metrics,
            last_error: Mutex::new(None),
        })
    }

    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The last reload that was refused, if any since start.
    pub fn last_error(&self) -> Option<ReloadError> {
        lock(&self.last_error).clone()
    }

    /// Keeps `input` among the recent inputs the canary replays. Skipped, never waited for,
    /// when another request holds the ring: the sample is best-effort, the request path is not.
    pub fn record(&self, input: &Value) {
        let cap = self.config.reload_gate_samples;
        if cap == 0 {
            return;
        }
        if let Ok(mut ring) = self.samples.try_lock() {
            if ring.len() >= cap {
                ring.pop_front();
            }
            ring.push_back(input.clone());
        }
    }

    /// Re-reads the files and swaps in the new revision if it compiles and passes the gates.
    pub fn reload(&self) -> ReloadOutcome {
        let _guard = lock(&self.reload_lock);
        let serving = self.current.load_full();
        let outcome = match collect(&self.config.paths, false) {
            Err(error) => ReloadOutcome::Failed { error },
            Ok(sources) if sources.revision == serving.revision() => ReloadOutcome::Unchanged,
            Ok(sources) => match self.admit(&serving, sources) {
                Ok((policy, gate)) => {
                    let revision = policy.revision().to_string();
                    if let Some(reason) = policy.fallback() {
                        self.metrics.policy_engine_fallback();
                        tracing::warn!(reason = %reason, revision = %revision,
                            previous_engine = serving.engine(),
                            "engine auto: the new revision does not compile for the RVM; running it on the interpreter");
                    }
                    self.metrics.set_policy_revision(&revision);
                    self.current.store(Arc::new(policy));
                    tracing::info!(revision = %revision, gate_samples = gate.samples,
                        gate_us = u64::try_from(gate.took.as_micros()).unwrap_or(u64::MAX),
                        "policy reloaded");
                    ReloadOutcome::Reloaded { revision }
                }
                Err(error) => ReloadOutcome::Failed { error },
            },
        };
        match &outcome {
            ReloadOutcome::Unchanged => {}
            ReloadOutcome::Reloaded { .. } => self.metrics.policy_reload("ok"),
            ReloadOutcome::Failed { error } => {
                let stage = match error {
                    Error::Tests(_) | Error::Gate(_) => "rejected",
                    _ => "error",
                };
                self.metrics.policy_reload(stage);
                tracing::error!(
                    error = %error,
                    serving = %serving.revision(),
                    "policy reload refused; the last good policy keeps serving"
                );
                *lock(&self.last_error) = Some(ReloadError::of(error));
            }
        }
        outcome
    }

    /// Compiles `sources` and runs the gates against the serving revision.
    fn admit(
        &self,
        serving: &Policy,
        sources: super::Sources,
    ) -> Result<(Policy, GateReport), Error> {
        let candidate = Policy::compile(&self.config, sources)?;
        if self.config.test_on_reload {
            run_tests(&self.config)?;
        }
        let samples: Vec<Value> = lock(&self.samples).iter().cloned().collect();
        let gate = canary(serving, &candidate, &samples)?;
        Ok((candidate, gate))
    }
}

/// Refuses `candidate` if it fails on an input `serving` decided without failing.
fn canary(serving: &Policy, candidate: &Policy, samples: &[Value]) -> Result<GateReport, Error> {
    let start = Instant::now();
    for input in samples {
        if failure(serving, input).is_some() {
            continue;
        }
        if let Some(why) = failure(candidate, input) {
            return Err(Error::Gate(format!(
                "revision {} fails on a recent input that revision {} decided ({}): {why}",
                candidate.revision(),
                serving.revision(),
                example(input),
            )));
        }
    }
    Ok(GateReport {
        samples: samples.len(),
        took: start.elapsed(),
    })
}

/// Why `policy` cannot decide `input` (what would be a 500), or `None`.
fn failure(policy: &Policy, input: &Value) -> Option<String> {
    match policy.evaluate(input.clone()) {
        Err(e) => Some(e.to_string()),
        Ok(v) => {
            let d = crate::decision::Decision::from_policy(&v);
            (d.reason.category == "invalid_decision").then_some(d.reason.detail)
        }
    }
}

/// Names a sample without logging it: method and path without the query.
fn example(input: &Value) -> String {
    let http = &input["attributes"]["request"]["http"];
    let method = http["method"].as_string().map(|s| s.to_string());
    let path = http["path"].as_string().map(|s| s.to_string());
    match (method, path) {
        (Ok(m), Ok(p)) => format!("{m} {}", p.split('?').next().unwrap_or("")),
        _ => "an input without a request".into(),
    }
}

/// `policy.test_on_reload`: the tree's `test_*` rules (test files included) must all pass.
fn run_tests(cfg: &Config) -> Result<(), Error> {
    let results = testing::run(&cfg.paths, cfg.rego_version)?;
    let failed: Vec<String> = results
        .iter()
        .filter(|r| r.outcome != testing::Outcome::Pass)
        .map(|r| format!("{} ({}): {:?}", r.rule, r.file.display(), r.outcome))
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(Error::Tests(format!(
            "{} of {} policy tests fail: {}",
            failed.len(),
            results.len(),
            failed.join("; ")
        )))
    }
}

impl ReloadError {
    fn of(error: &Error) -> ReloadError {
        let message = error.to_string();
        ReloadError {
            time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            stage: match error {
                Error::Tests(_) => "tests",
                Error::Gate(_) => "gate",
                _ => "compile",
            },
            location: location_in(&message),
            message,
        }
    }
}

/// The first `file.rego:line:col` (or `file.rego:line`) the message starts with.
fn location_in(message: &str) -> Option<String> {
    let first = message.split_whitespace().next()?.trim_end_matches(':');
    let (file, rest) = first.split_once(".rego:")?;
    rest.split(':')
        .next()
        .filter(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))?;
    Some(format!("{file}.rego:{rest}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::location_in;

    #[test]
    fn locations() {
        for (message, want) in [
            ("p/a.rego:3:10: unknown function x", Some("p/a.rego:3:10")),
            ("p/a.rego:3: oops", Some("p/a.rego:3")),
            ("no modules", None),
            ("p/a.rego: invalid", None),
        ] {
            assert_eq!(location_in(message).as_deref(), want, "{message}");
        }
    }
}
