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
    /// The input document the policy saw, when the context asked for it (`eval --print-input`).
    pub input: Option<regorus::Value>,
}

/// Shared, immutable wiring of the pipeline.
pub struct Authorizer {
    pub policy: Arc<Store>,
    pub jwt: Arc<Verifier>,
    pub log: decision_log::Logger,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    pub dry_run: bool,
    /// URI SANs of the peer certificates seen.
    pub peer_certs: crate::identity::cert::UriSans,
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
    /// The input document, when the context asked to keep it.
    input: Option<regorus::Value>,
    /// The verified token, for the identity headers.
    verified: Option<Arc<jwt::Verified>>,
    /// The header the verified token came in (removed when its provider does not forward it).
    token_header: Option<String>,
    eval_us: u64,
}

/// Which transport brought a Check: each can enforce a different part of a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// `envoy.service.auth.v3.Authorization/Check`: every part of a decision is enforceable.
    #[default]
    Grpc,
    /// Envoy's `http_service`: there is no way to rewrite the query string.
    Http,
}

/// What a transport knows about a Check beyond its attributes.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub transport: Transport,
    /// When Envoy stops waiting for the answer (its `grpc-timeout`), if it said.
    pub deadline: Option<tokio::time::Instant>,
    /// The transport could not read the request (e.g. a malformed `x-forwarded-client-cert`):
    /// the Check is a 400, decided, logged and counted like any other denial.
    pub malformed: Option<String>,
    /// Keep the input document in [`Checked::input`].
    pub capture_input: bool,
}

/// How much earlier than Envoy's deadline meshauthz answers: a fifth of the time Envoy gave,
/// at most 50 ms, so the answer is written before Envoy's timer fires.
pub fn answer_by(timeout: std::time::Duration) -> tokio::time::Instant {
    let margin = (timeout / 5).min(std::time::Duration::from_millis(50));
    tokio::time::Instant::now() + timeout.saturating_sub(margin)
}

impl Authorizer {
    /// Decides one request that came over gRPC without a deadline.
    pub async fn check(&self, attrs: Attributes) -> Checked {
        self.check_with(attrs, Context::default()).await
    }

    /// Decides one request.
    pub async fn check_with(&self, attrs: Attributes, ctx: Context) -> Checked {
        let _in_flight = InFlight::enter(&self.in_flight);
        let start = Instant::now();
        let policy = self.policy.current();
        let mut facts = Facts::default();
        let decision = self.decide(&attrs, &ctx, &policy, &mut facts).await;
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
            // The verdict changes, the identity hygiene does not: headers are shaped below
            // exactly as they would be on an enforced allow.
            Decision::allow(decision.reason.clone())
        } else {
            decision
        };
        if enforced.allowed {
            self.shape_identity_headers(&mut enforced, &facts);
        }
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
            input: facts.input,
        }
    }

    /// Decides an OPA-Envoy input document given whole (`meshauthz eval`): the policy sees
    /// exactly that document; nothing is derived and no token is verified.
    pub fn check_document(&self, doc: regorus::Value) -> Checked {
        let policy = self.policy.current();
        let decision = match policy.evaluate(doc.clone()) {
            Ok(value) => Decision::from_policy(&value),
            Err(e) => Decision::policy_error(e.to_string()),
        };
        let decision = enforceable(decision, Transport::Grpc);
        Checked {
            computed_allowed: decision.allowed,
            decision,
            decision_id: new_decision_id(),
            input: Some(doc),
        }
    }

    /// The one place identity headers are shaped, for both transports and for dry-run: each
    /// configured claim header is either set (overwriting the client's copy) from the verified
    /// token or removed, and so are its underscore spellings (`x_jwt_sub`), which CGI/WSGI and
    /// several frameworks read as `x-jwt-sub`. Removal is unconditional: a transport may not
    /// have shown us the client's copy (`allowed_headers`), so its absence here proves nothing.
    fn shape_identity_headers(&self, decision: &mut Decision, facts: &Facts) {
        let mut set: Vec<&str> = Vec::new();
        if let Some(v) = &facts.verified {
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
                && let Some(h) = &facts.token_header
            {
                decision.request_headers_to_remove.push(h.clone());
            }
        }
        let remove = &mut decision.request_headers_to_remove;
        for (name, underscored) in self.jwt.claim_header_names() {
            for n in std::iter::once(name).chain(underscored) {
                let keep = set.contains(&n.as_str()) && n == name;
                if !keep && !remove.contains(n) {
                    remove.push(n.clone());
                }
            }
        }
    }

    async fn decide(
        &self,
        attrs: &Attributes,
        ctx: &Context,
        policy: &crate::policy::Policy,
        facts: &mut Facts,
    ) -> Decision {
        if let Some(detail) = &ctx.malformed {
            return Decision::bad_request(detail.clone());
        }
        let Some(http) = attrs.http() else {
            return Decision::bad_request("request has no HTTP attributes");
        };
        if let Err((status, detail)) = self.check_limits(http) {
            return Decision::deny(status, Reason::new("limit_exceeded", detail));
        }
        let target = match path::parse_with(&http.path, self.limits.ambiguous_paths) {
            Ok(t) => t,
            Err(e) => return Decision::deny(400, Reason::new("bad_path", e.to_string())),
        };
        facts.peer = attrs
            .source_principal()
            .and_then(|p| SpiffeId::parse(p).ok())
            .filter(|id| self.backed_by_certificate(attrs, id));

        // The bearer token, verified before the policy runs.
        if self.jwt.is_enabled() {
            match self.jwt.extract(&http.headers, self.limits.max_token_bytes) {
                Ok(None) => {}
                Ok(Some(found)) => {
                    let digest = jwt::TokenDigest::of(&found.token);
                    facts.jwt_fingerprint = Some(digest);
                    match self
                        .jwt
                        .verify_digested(&found.token, &digest, ctx.deadline)
                        .await
                    {
                        Ok(v) => {
                            facts.jwt_provider = Some(v.provider_name.clone());
                            facts.jwt_sub = v.subject.clone();
                            facts.token_header = Some(found.header);
                            facts.verified = Some(v);
                        }
                        Err(failure) => return jwt_denial(&failure),
                    }
                }
                Err(failure) => return jwt_denial(&failure),
            }
        }

        let body = if policy.reads_parsed_body() {
            input::parsed_body(http, &self.limits)
        } else {
            input::Body::default()
        };
        let doc = input::document(
            attrs,
            Extras {
                target: Some(&target),
                peer: facts.peer.as_ref(),
                jwt: facts.verified.as_ref().map(|v| v.document.clone()),
                parsed_body: body.parsed,
                truncated_body: body.truncated,
            },
        );
        if http.body.len() + http.raw_body.len() <= SAMPLE_BODY_BYTES {
            self.policy.record(&doc);
        }
        if ctx.capture_input {
            facts.input = Some(doc.clone());
        }
        let eval_start = Instant::now();
        let result = policy.evaluate(doc);
        facts.eval_us = u64::try_from(eval_start.elapsed().as_micros()).unwrap_or(u64::MAX);
        let decision = match result {
            Ok(value) => Decision::from_policy(&value),
            Err(e) => Decision::policy_error(e.to_string()),
        };
        enforceable(decision, ctx.transport)
    }

    /// A SPIFFE ID counts only when it is a URI SAN of the peer certificate, if the Check
    /// carries one (Envoy falls back to a DNS SAN for `source.principal`).
    fn backed_by_certificate(&self, attrs: &Attributes, id: &SpiffeId) -> bool {
        match attrs.source.as_ref().map(|s| s.certificate.as_str()) {
            Some(cert) if !cert.is_empty() => self.peer_certs.backs(cert, &id.to_string()),
            _ => true,
        }
    }

    /// The size limits, as (status, detail): 400 for the request's shape, 413 for its body.
    fn check_limits(&self, http: &crate::request::HttpRequest) -> Result<(), (u16, String)> {
        if http.path.len() > self.limits.max_path_bytes {
            return Err((
                400,
                format!("path is longer than {} bytes", self.limits.max_path_bytes),
            ));
        }
        if http.headers.len() > self.limits.max_headers {
            return Err((
                400,
                format!("more than {} headers", self.limits.max_headers),
            ));
        }
        let bytes: usize = http.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        if bytes > self.limits.max_header_bytes {
            return Err((
                400,
                format!("headers exceed {} bytes", self.limits.max_header_bytes),
            ));
        }
        // rawBody arrives base64-encoded here (4/3 of its size).
        let body = http.body.len().max(http.raw_body.len() / 4 * 3);
        if body > self.limits.max_body_bytes {
            return Err((
                413,
                format!("body exceeds {} bytes", self.limits.max_body_bytes),
            ));
        }
        Ok(())
    }
}

/// Checks with a larger body are not kept for the reload gate, which bounds what its samples
/// hold: `policy.reload_gate_samples` × (`limits.max_header_bytes` + this), before parsing.
const SAMPLE_BODY_BYTES: usize = 8 * 1024;

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

/// An allow is only an allow if the transport can carry out all of it: an allow whose query
/// rewrite the HTTP transport would silently drop is a policy bug, denied and explained.
fn enforceable(decision: Decision, transport: Transport) -> Decision {
    let rewrites_query = !decision.query_parameters_to_set.is_empty()
        || !decision.query_parameters_to_remove.is_empty();
    if decision.allowed && transport == Transport::Http && rewrites_query {
        return Decision::deny(
            crate::decision::POLICY_ERROR_STATUS,
            Reason::new(
                "invalid_decision",
                "query_parameters_to_set/query_parameters_to_remove cannot be enforced over the HTTP ext_authz transport (Envoy http_service); use the gRPC transport",
            ),
        );
    }
    decision
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
