//! The decision log: one JSON line per decision, written off the request path.
//!
//! Requests hand a [`Entry`] to a bounded channel and never wait: a dedicated thread formats and
//! writes lines. When the writer falls behind (slow disk, a full disk, a closed stdout) entries are
//! dropped and counted in `meshauthz_decision_log_dropped_total` instead of blocking requests.
//! Tokens, `authorization`, cookies and any header not on the allow-list are never written.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{SyncSender, TrySendError};

use serde::{Deserialize, Serialize};

use crate::config::{self, Ctx};
use crate::telemetry::Metrics;

/// Headers never logged, whatever the allow-list says.
const NEVER_LOGGED: &[&str] = &[
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
];

#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Stdout,
    Stderr,
    File(PathBuf),
}

/// Validated `decision_log:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub enabled: bool,
    pub output: Output,
    /// Log only denials.
    pub only_denied: bool,
    /// Fraction of allowed decisions logged (denials are always logged).
    pub sample_rate: f64,
    /// Request headers copied into log lines (lower-case).
    pub headers: Vec<String>,
    /// Entries buffered before new ones are dropped.
    pub buffer: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: true,
            output: Output::Stdout,
            only_denied: false,
            sample_rate: 1.0,
            headers: Vec::new(),
            buffer: 8192,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    enabled: Option<bool>,
    output: Option<String>,
    only_denied: Option<bool>,
    sample_rate: Option<f64>,
    #[serde(default)]
    headers: Vec<String>,
    buffer: Option<usize>,
}

impl RawConfig {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Config, config::Error> {
        let d = Config::default();
        let sample_rate = self.sample_rate.unwrap_or(1.0);
        if !(0.0..=1.0).contains(&sample_rate) {
            return Err(ctx.err(
                "decision_log.sample_rate",
                format!("expected a number between 0 and 1, got {sample_rate}"),
            ));
        }
        let mut headers = Vec::new();
        for (i, h) in self.headers.iter().enumerate() {
            let h = h.to_ascii_lowercase();
            if NEVER_LOGGED.contains(&h.as_str()) {
                return Err(ctx.err(
                    format!("decision_log.headers[{i}]"),
                    format!("{h:?} carries credentials and is never logged"),
                ));
            }
            headers.push(h);
        }
        Ok(Config {
            enabled: self.enabled.unwrap_or(d.enabled),
            output: match self.output.as_deref() {
                None | Some("stdout") => Output::Stdout,
                Some("stderr") => Output::Stderr,
                Some(path) => Output::File(ctx.resolve(path)),
            },
            only_denied: self.only_denied.unwrap_or(false),
            sample_rate,
            headers,
            buffer: self.buffer.unwrap_or(d.buffer).max(1),
        })
    }
}

/// One decision, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    pub time: String,
    pub decision_id: String,
    pub allowed: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub method: String,
    /// The path without its query string (queries can carry credentials).
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_provider: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_sub: Option<String>,
    /// Short hash of the token, to correlate without logging it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_fingerprint: Option<String>,
    pub policy_revision: String,
    pub eval_us: u64,
    pub duration_us: u64,
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub headers: serde_json::Map<String, serde_json::Value>,
}

/// Cheap to clone; hands entries to the writer thread.
#[derive(Clone)]
pub struct Logger {
    config: Arc<Config>,
    tx: Option<SyncSender<Entry>>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logger")
            .field("config", &self.config)
            .finish()
    }
}

impl Logger {
    /// Starts the writer thread (unless disabled). Fails if the output file cannot be opened.
    pub fn start(config: Config, metrics: Arc<Metrics>) -> std::io::Result<Logger> {
        if !config.enabled {
            return Ok(Logger {
                config: Arc::new(config),
                tx: None,
                metrics,
            });
        }
        let mut out: Box<dyn Write + Send> = match &config.output {
            Output::Stdout => Box::new(std::io::stdout()),
            Output::Stderr => Box::new(std::io::stderr()),
            Output::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)?,
            ),
        };
        let (tx, rx) = std::sync::mpsc::sync_channel::<Entry>(config.buffer);
        let m = metrics.clone();
        std::thread::Builder::new()
            .name("decision-log".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(64 * 1024);
                // Say once when writes start failing (full disk, closed pipe) and once when
                // they recover; the dropped counter carries the volume.
                let mut failing = false;
                while let Ok(first) = rx.recv() {
                    buf.clear();
                    let mut n = 0u64;
                    let mut next = Some(first);
                    // Batch whatever is queued into one write.
                    while let Some(entry) = next {
                        if serde_json::to_writer(&mut buf, &entry).is_ok() {
                            buf.push(b'\n');
                        }
                        n += 1;
                        next = if buf.len() < 60 * 1024 {
                            rx.try_recv().ok()
                        } else {
                            None
                        };
                    }
                    match out.write_all(&buf).and_then(|()| out.flush()) {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!("decision log writes succeed again");
                        }
                        Ok(()) => {}
                        Err(e) => {
                            m.decision_log_dropped_by(n);
                            if !failing {
                                failing = true;
                                tracing::warn!(error = %e, "decision log write failed; lines are dropped and counted (meshauthz_decision_log_dropped_total) until writes succeed");
                            }
                        }
                    }
                }
            })?;
        Ok(Logger {
            config: Arc::new(config),
            tx: Some(tx),
            metrics,
        })
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Whether a decision should be logged at all (before building the entry).
    pub fn wants(&self, allowed: bool) -> bool {
        if self.tx.is_none() {
            return false;
        }
        if !allowed {
            return true;
        }
        if self.config.only_denied {
            return false;
        }
        self.config.sample_rate >= 1.0 || fastrand::f64() < self.config.sample_rate
    }

    /// Copies allow-listed headers.
    pub fn headers(
        &self,
        headers: &std::collections::BTreeMap<String, String>,
    ) -> serde_json::Map<String, serde_json::Value> {
        self.config
            .headers
            .iter()
            .filter_map(|h| {
                headers
                    .get(h)
                    .map(|v| (h.clone(), serde_json::Value::from(v.as_str())))
            })
            .collect()
    }

    /// Queues an entry; never blocks.
    pub fn log(&self, entry: Entry) {
        if let Some(tx) = &self.tx {
            match tx.try_send(entry) {
                Ok(()) => {}
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                    self.metrics.decision_log_dropped();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logger(only_denied: bool, sample_rate: f64) -> Logger {
        let dir = std::env::temp_dir().join(format!("meshauthz-log-{}", fastrand::u64(..)));
        Logger::start(
            Config {
                output: Output::File(dir),
                only_denied,
                sample_rate,
                ..Config::default()
            },
            Arc::new(Metrics::new()),
        )
        .unwrap()
    }

    #[test]
    fn denials_are_always_logged_and_allows_follow_the_mode() {
        let all = logger(false, 1.0);
        assert!(all.wants(true) && all.wants(false));
        let denied = logger(true, 1.0);
        assert!(!denied.wants(true) && denied.wants(false));
        let none = logger(false, 0.0);
        assert!(!none.wants(true) && none.wants(false));
        let half = logger(false, 0.5);
        let logged = (0..10_000).filter(|_| half.wants(true)).count();
        assert!(
            (4_000..6_000).contains(&logged),
            "{logged} of 10000 at rate 0.5"
        );
        let off = Logger::start(
            Config {
                enabled: false,
                ..Config::default()
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        assert!(!off.wants(false));
    }

    #[test]
    fn only_allow_listed_headers_are_copied() {
        let l = Logger::start(
            Config {
                enabled: false,
                headers: vec!["x-request-id".into()],
                ..Config::default()
            },
            Arc::new(Metrics::new()),
        )
        .unwrap();
        let headers: std::collections::BTreeMap<String, String> = [
            ("x-request-id", "r1"),
            ("authorization", "Bearer secret"),
            ("cookie", "s=1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let got = l.headers(&headers);
        assert_eq!(got.len(), 1);
        assert_eq!(got["x-request-id"], "r1");
    }
}
