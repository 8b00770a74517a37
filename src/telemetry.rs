//! Prometheus metrics and log set-up.
//!
//! Label values are bounded enums or configuration names (decision, reason category, provider,
//! reload result), never request data, so cardinality stays fixed however hostile the traffic.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CheckLabels {
    decision: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderResultLabels {
    provider: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProviderLabels {
    provider: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RevisionLabels {
    revision: String,
}

/// Every metric meshauthz exports.
pub struct Metrics {
    registry: Registry,
    checks: Family<CheckLabels, Counter>,
    check_duration: Histogram,
    policy_reloads: Family<ResultLabels, Counter>,
    policy_revision: Family<RevisionLabels, Gauge>,
    current_revision: Mutex<String>,
    jwt_validations: Family<ProviderResultLabels, Counter>,
    jwks_fetches: Family<ProviderResultLabels, Counter>,
    jwks_age: Family<ProviderLabels, Gauge>,
    policy_engine_fallbacks: Counter,
    jwt_cache_entries: Gauge,
    decision_log_dropped: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("meshauthz");
        let checks = Family::<CheckLabels, Counter>::default();
        registry.register(
            "check_requests",
            "Check requests answered, by decision and reason category",
            checks.clone(),
        );
        // 10 µs .. ~80 ms: the handler is expected to sit in the first few buckets.
        let check_duration = Histogram::new([
            0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
            0.08,
        ]);
        registry.register(
            "check_duration_seconds",
            "Time to decide one Check, excluding gRPC transport",
            check_duration.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy reload attempts that changed something, by result (ok, error)",
            policy_reloads.clone(),
        );
        let policy_revision = Family::<RevisionLabels, Gauge>::default();
        registry.register(
            "policy_revision",
            "1 for the policy revision currently serving",
            policy_revision.clone(),
        );
        let jwt_validations = Family::<ProviderResultLabels, Counter>::default();
        registry.register(
            "jwt_validations",
            "Bearer token validations, by provider and result (ok or a failure category)",
            jwt_validations.clone(),
        );
        let jwks_fetches = Family::<ProviderResultLabels, Counter>::default();
        registry.register(
            "jwks_fetches",
            "JWKS fetch attempts, by provider and result",
            jwks_fetches.clone(),
        );
        let jwks_age = Family::<ProviderLabels, Gauge>::default();
        registry.register(
            "jwks_age_seconds",
            "Age of the keys in use, by provider (-1 when none were ever fetched)",
            jwks_age.clone(),
        );
        let jwt_cache_entries = Gauge::default();
        registry.register(
            "jwt_cache_entries",
            "Verified tokens held in the cache (bounded by jwt.cache_capacity), as of the scrape",
            jwt_cache_entries.clone(),
        );
        let policy_engine_fallbacks = Counter::default();
        registry.register(
            "policy_engine_fallbacks",
            "Policy revisions that engine auto runs on the interpreter because the RVM cannot compile them",
            policy_engine_fallbacks.clone(),
        );
        let decision_log_dropped = Counter::default();
        registry.register(
            "decision_log_dropped",
            "Decision log lines dropped because the writer could not keep up",
            decision_log_dropped.clone(),
        );
        Metrics {
            registry,
            checks,
            check_duration,
            policy_reloads,
            policy_revision,
            current_revision: Mutex::new(String::new()),
            jwt_validations,
            jwks_fetches,
            jwks_age,
            jwt_cache_entries,
            decision_log_dropped,
            policy_engine_fallbacks,
        }
    }

    pub fn policy_engine_fallback(&self) {
        self.policy_engine_fallbacks.inc();
    }

    pub fn check(&self, allowed: bool, reason: &'static str, seconds: f64) {
        let decision = if allowed { "allow" } else { "deny" };
        self.checks
            .get_or_create(&CheckLabels { decision, reason })
            .inc();
        self.check_duration.observe(seconds);
    }

    pub fn policy_reload(&self, result: &'static str) {
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Moves the revision gauge to `revision` (the old revision's series drops to 0).
    pub fn set_policy_revision(&self, revision: &str) {
        let mut current = self
            .current_revision
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !current.is_empty() {
            self.policy_revision.remove(&RevisionLabels {
                revision: current.clone(),
            });
        }
        self.policy_revision
            .get_or_create(&RevisionLabels {
                revision: revision.to_string(),
            })
            .set(1);
        *current = revision.to_string();
    }

    pub fn jwt_validation(&self, provider: &str, result: &'static str) {
        self.jwt_validations
            .get_or_create(&ProviderResultLabels {
                provider: provider.to_string(),
                result,
            })
            .inc();
    }

    pub fn jwks_fetch(&self, provider: &str, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&ProviderResultLabels {
                provider: provider.to_string(),
                result,
            })
            .inc();
    }

    pub fn set_jwks_age(&self, provider: &str, seconds: i64) {
        self.jwks_age
            .get_or_create(&ProviderLabels {
                provider: provider.to_string(),
            })
            .set(seconds);
    }

    pub fn set_jwt_cache_entries(&self, entries: u64) {
        self.jwt_cache_entries
            .set(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    pub fn decision_log_dropped(&self) {
        self.decision_log_dropped.inc();
    }

    pub fn decision_log_dropped_by(&self, n: u64) {
        self.decision_log_dropped.inc_by(n);
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Installs the global tracing subscriber: JSON lines on stderr, level from `RUST_LOG`
/// (default `info`). Decision logs are separate (see `decision_log`).
pub fn init_tracing(json: bool) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
