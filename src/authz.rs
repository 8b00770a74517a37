//! The decision pipeline every Check goes through, whatever transport brought it.
//!
//! `Attributes` in, `Checked` out: limits → path parsing → bearer token → input document →
//! policy → decision → identity headers → dry-run → decision log and metrics. Every failure on the
//! way is an explicit denial with a reason; nothing here returns an error to the transport.

use std::sync::Arc;
use std::time::Instant;

use crate::decision::{Decision, Header, Reason};
use crate::decision_log::{self, Entry};
use crate::identity::SpiffeId;
use crate::input::{self, Extras};
use crate::jwt::{self, Verifier};
use crate::limits::Limits;
use crate::path;
use crate::policy::Store;
use crate::request::Attributes;
use crate::telemetry::Metrics;

/// What the transport sends back.
#[derive(Debug, Clone)]
pub struct Checked {
    /// The decision to enforce (in dry-run: always an allow).
    pub decision: Decision,
    pub decision_id: String,
    /// The decision the policy actually made (differs from `decision` only in dry-run).
    pub computed_allowed: bool,
}

/// Shared, immutable wiring of the pipeline.
pub struct Authorizer {
    pub policy: Arc<Store>,
    pub jwt: Arc<Verifier>,
    pub log: decision_log::Logger,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub dry_run: bool,
    /// Checks being decided right now (shutdown waits for them, not for idle connections).
    pub in_flight: std::sync::atomic::AtomicUsize,
}

/// Counts a check as in flight for as long as it lives.
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(counter: &'a std::sync::atomic::AtomicUsize) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        InFlight(counter)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("limits", &self.limits)
            .field("dry_run", &self.dry_run)
            .finish_non_exhaustive()
    }
}

/// What the pipeline learned about the caller, for the log.
#[derive(Default)]
struct Facts {
    peer: Option<SpiffeId>,
    jwt_provider: Option<String>,
    jwt_sub: Option<String>,
    jwt_fingerprint: Option<jwt::TokenDigest>,
    eval_us: u64,
}

impl Authorizer {
    /// Decides one request.
    pub async fn check(&self, attrs: Attributes) -> Checked {
        let _in_flight = InFlight::enter(&self.in_flight);
        let start = Instant::now();
        let policy = self.policy.current();
        let mut facts = Facts::default();
        let decision = self.decide(&attrs, &policy, &mut facts).await;
        let computed_allowed = decision.allowed;
        let decision_id = new_decision_id();
        let (status, category) = (decision.status, decision.reason.category);
        let wants_log = self.log.wants(computed_allowed);
        let detail = if wants_log {
            decision.reason.detail.clone()
        } else {
            Default::default()
        };

        let mut enforced = if self.dry_run && !decision.allowed {
            let mut allow = Decision::allow(decision.reason.clone());
            // Identity headers still flow, so upstreams behave as they will once enforced.
            allow.request_headers_to_remove = decision.request_headers_to_remove.clone();
            allow
        } else {
            decision
        };
        add_decision_id(&mut enforced, &decision_id);

        let elapsed = start.elapsed();
        self.metrics
            .check(computed_allowed, category, elapsed.as_secs_f64());
        if wants_log {
            let http = attrs.http();
            self.log.log(Entry {
                time: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                decision_id: decision_id.clone(),
                allowed: computed_allowed,
                dry_run: self.dry_run,
                status: if computed_allowed { 200 } else { status },
                reason: category,
                detail,
                peer: facts
                    .peer
                    .as_ref()
                    .map(ToString::to_string)
                    .or_else(|| attrs.source_principal().map(str::to_owned)),
                method: http.map(|h| h.method.clone()).unwrap_or_default(),
                path: http
                    .map(|h| h.path.split('?').next().unwrap_or("").to_string())
                    .unwrap_or_default(),
                jwt_provider: facts.jwt_provider,
                jwt_sub: facts.jwt_sub,
                jwt_fingerprint: facts.jwt_fingerprint.map(|d| d.fingerprint()),
                policy_revision: policy.revision().to_string(),
                eval_us: facts.eval_us,
                duration_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
                headers: http
                    .map(|h| self.log.headers(&h.headers))
                    .unwrap_or_default(),
            });
        }
        Checked {
            decision: enforced,
            decision_id,
            computed_allowed,
        }
    }

    async fn decide(
        &self,
        attrs: &Attributes,
        policy: &crate::policy::Policy,
        facts: &mut Facts,
    ) -> Decision {
        let Some(http) = attrs.http() else {
            return Decision::bad_request("request has no HTTP attributes");
        };
        if let Err(detail) = self.check_limits(http) {
            return Decision::deny(400, Reason::new("limit_exceeded", detail));
        }
        let target = match path::parse_with(&http.path, self.limits.ambiguous_paths) {
            Ok(t) => t,
            Err(e) => return Decision::deny(400, Reason::new("bad_path", e.to_string())),
        };
        facts.peer = attrs
            .source_principal()
            .and_then(|p| SpiffeId::parse(p).ok());

        // The bearer token, verified before the policy runs.
        let mut verified = None;
        let mut token_header = None;
        if self.jwt.is_enabled() {
            match self.jwt.extract(&http.headers, self.limits.max_token_bytes) {
                Ok(None) => {}
                Ok(Some(found)) => {
                    let digest = jwt::TokenDigest::of(&found.token);
                    facts.jwt_fingerprint = Some(digest);
                    match self.jwt.verify_digested(&found.token, &digest).await {
                        Ok(v) => {
                            facts.jwt_provider = Some(v.provider_name.clone());
                            facts.jwt_sub = v.subject.clone();
                            token_header = Some(found.header);
                            verified = Some(v);
                        }
                        Err(failure) => return jwt_denial(&failure),
                    }
                }
                Err(failure) => return jwt_denial(&failure),
            }
        }

        let (parsed_body, truncated_body) = input::parsed_body(http);
        let doc = input::document(
            attrs,
            Extras {
                target: Some(&target),
                peer: facts.peer.as_ref(),
                jwt: verified.as_ref().map(|v| v.document.clone()),
                parsed_body,
                truncated_body,
            },
        );
        let eval_start = Instant::now();
        let result = policy.evaluate(doc);
        facts.eval_us = u64::try_from(eval_start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let mut decision = match result {
            Ok(value) => Decision::from_policy(&value),
            Err(e) => Decision::policy_error(e.to_string()),
        };

        if decision.allowed {
            // Identity headers overwrite whatever the client sent; configured claim headers the
            // token does not fill are removed, so a forged copy never reaches the upstream.
            let mut set: Vec<&str> = Vec::new();
            if let Some(v) = &verified {
                for (name, value) in &v.claim_headers {
                    decision
                        .headers
                        .retain(|h| !h.name.eq_ignore_ascii_case(name));
                    decision.headers.push(Header {
                        name: name.clone(),
                        value: value.clone(),
                        append: false,
                    });
                    set.push(name);
                }
                if !self.jwt.provider_forwards_token(v.provider)
                    && let Some(h) = &token_header
                {
                    decision.request_headers_to_remove.push(h.clone());
                }
            }
            for name in self.jwt.claim_header_names() {
                if !set.contains(&name) && http.headers.contains_key(name) {
                    decision.request_headers_to_remove.push(name.to_string());
                }
            }
        }
        decision
    }

    fn check_limits(&self, http: &crate::request::HttpRequest) -> Result<(), String> {
        if http.path.len() > self.limits.max_path_bytes {
            return Err(format!(
                "path is longer than {} bytes",
                self.limits.max_path_bytes
            ));
        }
        if http.headers.len() > self.limits.max_headers {
            return Err(format!("more than {} headers", self.limits.max_headers));
        }
        let bytes: usize = http.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.limits.max_header_bytes {
            return Err(format!(
                "headers exceed {} bytes",
                self.limits.max_header_bytes
            ));
        }
        Ok(())
    }
}

/// 401 with the RFC 6750 challenge; the detail names the failure category, never the token.
fn jwt_denial(failure: &jwt::Failure) -> Decision {
    let mut d = Decision::deny(401, Reason::new(failure.category(), failure.to_string()));
    d.headers.push(Header {
        name: "www-authenticate".into(),
        value: "Bearer error=\"invalid_token\"".into(),
        append: false,
    });
    d
}

fn new_decision_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// Every response carries its decision id in dynamic metadata, to join Envoy's access log with
/// ours.
fn add_decision_id(d: &mut Decision, id: &str) {
    let mut meta = d
        .dynamic_metadata
        .take()
        .unwrap_or_else(regorus::Value::new_object);
    if let Ok(m) = meta.as_object_mut() {
        m.insert(
            regorus::Value::from("decision_id"),
            regorus::Value::from(id),
        );
    }
    d.dynamic_metadata = Some(meta);
}
