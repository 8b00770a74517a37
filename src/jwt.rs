//! Bearer token verification against each issuer's JWKS.
//!
//! A request's token goes through, in order: extraction from the configured headers (one token,
//! bounded size), the verified-token cache, header checks (`alg` on the provider's allow-list,
//! never `none`; the key's type must match the algorithm), provider selection by `iss`, key lookup
//! by `kid` (an unknown `kid` triggers one rate-limited, single-flight JWKS re-fetch), signature
//! and claim validation (`exp`, `nbf`, `iss`, `aud` with the configured clock skew), and the
//! `jti` revocation list. Any failure is a [`Failure`] with a fixed category; the caller turns it
//! into a 401 before the policy runs.
//!
//! Tokens never appear in logs or errors; [`TokenDigest::fingerprint`] gives a short hash for correlation.

mod jwks;
mod revocation;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use regorus::Value;
use serde::Deserialize;

use crate::config::{self, Ctx};
use crate::telemetry::Metrics;

pub use jwks::{Jwks, JwksStatus};
pub use revocation::Revocations;

// ---------------------------------------------------------------------------------------------
// Configuration

/// Validated `jwt:` section.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub providers: Vec<ProviderConfig>,
    /// File of revoked `jti` values, one per line (`#` comments allowed).
    pub revocation_file: Option<PathBuf>,
    /// Most verified tokens kept in the cache.
    pub cache_capacity: u64,
    /// Deepest nesting of arrays/objects accepted in a token's header or claims (`limits.
    /// max_claims_depth`): checked before the signature, so a hostile payload costs one parse.
    pub max_claims_depth: usize,
}

/// One trusted issuer.
#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub name: String,
    /// Must equal the token's `iss`.
    pub issuer: String,
    /// When non-empty, the token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    pub jwks: Option<JwksConfig>,
    /// Shared secret for HS256/384/512; HS algorithms are refused without it.
    pub hmac_secret: Option<Vec<u8>>,
    pub algorithms: Vec<Algorithm>,
    pub from_headers: Vec<FromHeader>,
    pub claims_to_headers: Vec<ClaimToHeader>,
    /// `false` removes the token header before the upstream sees the request.
    pub forward_token: bool,
    pub clock_skew: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    Uri(String),
    File(PathBuf),
    /// OIDC discovery: `{issuer}/.well-known/openid-configuration` names the `jwks_uri`.
    Discovery,
}

#[derive(Debug, Clone)]
pub struct JwksConfig {
    pub source: JwksSource,
    pub refresh_interval: Duration,
    /// Keep serving cached keys while the issuer is unreachable, up to this age.
    pub max_stale: Duration,
    /// Timeout for one HTTP fetch.
    pub fetch_timeout: Duration,
    /// How long a request may wait for an in-flight fetch (startup or unknown `kid`).
    pub max_wait: Duration,
    /// Minimum time between re-fetches triggered by unknown `kid`s. Periodic refreshes do not
    /// count against it: a new kid right after one is fetched at once.
    pub min_refetch_interval: Duration,
    /// Requests that may wait on this issuer's keys at once (a fetch in flight, or the rest of
    /// `min_refetch_interval`); further ones are refused at once. Bounds what a flood of
    /// unknown kids can hold in memory.
    pub max_waiters: usize,
    /// PEM bundle of CAs trusted for the JWKS endpoint, beyond the system roots.
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FromHeader {
    /// Lower-case header name.
    pub name: String,
    /// Prefix before the token, matched case-insensitively ("Bearer ").
    pub prefix: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimToHeader {
    /// Claim name; dots select nested claims (`realm.role`).
    pub claim: String,
    /// Lower-case header name set on the upstream request.
    pub header: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    providers: Vec<RawProvider>,
    revocation_file: Option<String>,
    cache_capacity: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvider {
    name: String,
    issuer: String,
    #[serde(default)]
    audiences: Vec<String>,
    jwks: Option<RawJwks>,
    hmac_secret_file: Option<String>,
    algorithms: Option<Vec<String>>,
    from_headers: Option<Vec<RawFromHeader>>,
    #[serde(default)]
    claims_to_headers: Vec<RawClaimToHeader>,
    #[serde(default = "default_true")]
    forward_token: bool,
    #[serde(default = "default_skew")]
    clock_skew: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJwks {
    uri: Option<String>,
    file: Option<String>,
    #[serde(default)]
    discovery: bool,
    #[serde(default = "default_refresh")]
    refresh_interval: String,
    #[serde(default = "default_max_stale")]
    max_stale: String,
    #[serde(default = "default_fetch_timeout")]
    fetch_timeout: String,
    #[serde(default = "default_max_wait")]
    max_wait: String,
    #[serde(default = "default_min_refetch")]
    min_refetch_interval: String,
    max_waiters: Option<usize>,
    ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFromHeader {
    name: String,
    #[serde(default)]
    prefix: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClaimToHeader {
    claim: String,
    header: String,
}

fn default_true() -> bool {
    true
}
fn default_skew() -> String {
    "30s".into()
}
fn default_refresh() -> String {
    "5m".into()
}
fn default_max_stale() -> String {
    "1h".into()
}
fn default_fetch_timeout() -> String {
    "3s".into()
}
fn default_max_wait() -> String {
    "1s".into()
}
fn default_min_refetch() -> String {
    "10s".into()
}
/// ~5 KiB of request state each: at most ~5 MiB parked per provider.
const DEFAULT_MAX_WAITERS: usize = 1024;

/// The asymmetric algorithms, allowed by default.
pub const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

fn is_hmac(alg: Algorithm) -> bool {
    matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512)
}

impl RawConfig {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Config, config::Error> {
        let mut providers: Vec<ProviderConfig> = Vec::new();
        for (i, raw) in self.providers.into_iter().enumerate() {
            let p = raw.validate(ctx, &format!("jwt.providers[{i}]"))?;
            if providers.iter().any(|q| q.name == p.name) {
                return Err(ctx.err(
                    format!("jwt.providers[{i}].name"),
                    format!("duplicate provider name {:?}", p.name),
                ));
            }
            if providers.iter().any(|q| q.issuer == p.issuer) {
                return Err(ctx.err(
                    format!("jwt.providers[{i}].issuer"),
                    format!(
                        "issuer {:?} is already used by another provider; the issuer selects the provider",
                        p.issuer
                    ),
                ));
            }
            providers.push(p);
        }
        Ok(Config {
            providers,
            revocation_file: self.revocation_file.map(|f| ctx.resolve(&f)),
            // ~1–1.5 KiB per entry (claims as policy values, headers, key): 2,000 entries bound
            // the cache near 3 MiB of a ~30 MiB footprint.
            cache_capacity: self.cache_capacity.unwrap_or(2_000),
            max_claims_depth: crate::limits::Limits::default().max_claims_depth,
        })
    }
}

impl RawProvider {
    fn validate(self, ctx: &Ctx<'_>, key: &str) -> Result<ProviderConfig, config::Error> {
        if self.name.is_empty() {
            return Err(ctx.err(format!("{key}.name"), "expected a non-empty name"));
        }
        if self.issuer.is_empty() {
            return Err(ctx.err(
                format!("{key}.issuer"),
                "expected the issuer (the tokens' iss)",
            ));
        }
        let algorithms = match self.algorithms {
            None => ASYMMETRIC.to_vec(),
            Some(names) => {
                let mut algs = Vec::new();
                for (j, name) in names.iter().enumerate() {
                    let alg: Algorithm = name.parse().map_err(|_| {
                        ctx.err(
                            format!("{key}.algorithms[{j}]"),
                            format!(
                                "expected one of RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256 HS384 HS512, got {name:?}"
                            ),
                        )
                    })?;
                    algs.push(alg);
                }
                if algs.is_empty() {
                    return Err(ctx.err(
                        format!("{key}.algorithms"),
                        "expected at least one algorithm",
                    ));
                }
                algs
            }
        };
        let hmac_secret = match &self.hmac_secret_file {
            None => None,
            Some(f) => {
                let path = ctx.resolve(f);
                let bytes = std::fs::read(&path).map_err(|e| {
                    ctx.err(
                        format!("{key}.hmac_secret_file"),
                        format!("cannot read {}: {e}", path.display()),
                    )
                })?;
                let trimmed = bytes.trim_ascii_end().to_vec();
                if trimmed.len() < 32 {
                    return Err(ctx.err(
                        format!("{key}.hmac_secret_file"),
                        "expected a secret of at least 32 bytes",
                    ));
                }
                Some(trimmed)
            }
        };
        if algorithms.iter().any(|a| is_hmac(*a)) && hmac_secret.is_none() {
            return Err(ctx.err(
                format!("{key}.algorithms"),
                "HS256/HS384/HS512 need an explicit hmac_secret_file",
            ));
        }
        let jwks = match self.jwks {
            None => None,
            Some(j) => Some(j.validate(ctx, &format!("{key}.jwks"))?),
        };
        if jwks.is_none() && hmac_secret.is_none() {
            return Err(ctx.err(
                format!("{key}.jwks"),
                "expected a jwks section (uri, file or discovery) or an hmac_secret_file",
            ));
        }
        let from_headers = match self.from_headers {
            None => vec![FromHeader {
                name: "authorization".into(),
                prefix: "Bearer ".into(),
            }],
            Some(list) if list.is_empty() => {
                return Err(ctx.err(
                    format!("{key}.from_headers"),
                    "expected at least one header",
                ));
            }
            Some(list) => list
                .into_iter()
                .map(|h| FromHeader {
                    name: h.name.to_ascii_lowercase(),
                    prefix: h.prefix,
                })
                .collect(),
        };
        let claims_to_headers = self
            .claims_to_headers
            .into_iter()
            .map(|c| ClaimToHeader {
                claim: c.claim,
                header: c.header.to_ascii_lowercase(),
            })
            .collect();
        Ok(ProviderConfig {
            name: self.name,
            issuer: self.issuer,
            audiences: self.audiences,
            jwks,
            hmac_secret,
            algorithms,
            from_headers,
            claims_to_headers,
            forward_token: self.forward_token,
            clock_skew: ctx.duration(&format!("{key}.clock_skew"), &self.clock_skew)?,
        })
    }
}

impl RawJwks {
    fn validate(self, ctx: &Ctx<'_>, key: &str) -> Result<JwksConfig, config::Error> {
        let source = match (self.uri, self.file, self.discovery) {
            (Some(uri), None, false) => {
                if !(uri.starts_with("https://") || uri.starts_with("http://")) {
                    return Err(ctx.err(
                        format!("{key}.uri"),
                        format!("expected an http(s) URL, got {:?}", jwks::redact_url(&uri)),
                    ));
                }
                JwksSource::Uri(uri)
            }
            (None, Some(file), false) => JwksSource::File(ctx.resolve(&file)),
            (None, None, true) => JwksSource::Discovery,
            _ => {
                return Err(ctx.err(key, "expected exactly one of uri, file or discovery: true"));
            }
        };
        Ok(JwksConfig {
            source,
            refresh_interval: ctx
                .duration(&format!("{key}.refresh_interval"), &self.refresh_interval)?,
            max_stale: ctx.duration(&format!("{key}.max_stale"), &self.max_stale)?,
            fetch_timeout: ctx.duration(&format!("{key}.fetch_timeout"), &self.fetch_timeout)?,
            max_wait: ctx.duration(&format!("{key}.max_wait"), &self.max_wait)?,
            min_refetch_interval: ctx.duration(
                &format!("{key}.min_refetch_interval"),
                &self.min_refetch_interval,
            )?,
            max_waiters: ctx.nonzero(
                format!("{key}.max_waiters"),
                self.max_waiters.unwrap_or(DEFAULT_MAX_WAITERS),
                "0 would refuse every request that needs a fetch",
            )?,
            ca_file: self.ca_file.map(|f| ctx.resolve(&f)),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Verification

/// Why a present token was refused. Each variant is one reason category in logs and metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Failure {
    #[error("token is malformed: {0}")]
    Malformed(String),
    #[error("more than one token in the request")]
    MultipleTokens,
    #[error("token is larger than {0} bytes")]
    TooLarge(usize),
    #[error("token JSON nests deeper than {0} levels")]
    TooDeep(usize),
    #[error("algorithm {0} is not allowed")]
    DisallowedAlgorithm(String),
    #[error("no provider is configured for this issuer")]
    UnknownIssuer,
    #[error("no key matches the token's kid")]
    UnknownKey,
    #[error("signing keys are unavailable: {0}")]
    KeysUnavailable(String),
    #[error("signature does not verify")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token issuer does not match")]
    WrongIssuer,
    #[error("token audience does not match")]
    WrongAudience,
    #[error("token has been revoked")]
    Revoked,
}

impl Failure {
    /// Fixed label for metrics and the decision log.
    pub fn category(&self) -> &'static str {
        match self {
            Failure::Malformed(_) => "jwt_malformed",
            Failure::MultipleTokens => "jwt_multiple_tokens",
            Failure::TooLarge(_) => "jwt_too_large",
            Failure::TooDeep(_) => "jwt_too_deep",
            Failure::DisallowedAlgorithm(_) => "jwt_disallowed_algorithm",
            Failure::UnknownIssuer => "jwt_unknown_issuer",
            Failure::UnknownKey => "jwt_unknown_key",
            Failure::KeysUnavailable(_) => "jwt_keys_unavailable",
            Failure::BadSignature => "jwt_bad_signature",
            Failure::Expired => "jwt_expired",
            Failure::NotYetValid => "jwt_not_yet_valid",
            Failure::WrongIssuer => "jwt_wrong_issuer",
            Failure::WrongAudience => "jwt_wrong_audience",
            Failure::Revoked => "jwt_revoked",
        }
    }
}

/// A verified token, cached by the whole token string.
#[derive(Debug)]
pub struct Verified {
    /// Index of the provider in the config.
    pub provider: usize,
    pub provider_name: String,
    /// `input.jwt`: `{"provider", "header", "claims"}`.
    pub document: Value,
    /// Headers for the upstream derived from `claims_to_headers` (only claims present).
    pub claim_headers: Vec<(String, String)>,
    pub subject: Option<String>,
    pub jti: Option<String>,
    /// `exp` as a Unix time, if the token has one.
    pub expires_at: Option<u64>,
}

/// The token header a token was found in, for `forward_token: false`.
#[derive(Debug, Clone)]
pub struct Found {
    pub header: String,
    pub token: String,
}

struct Provider {
    config: ProviderConfig,
    jwks: Option<Arc<Jwks>>,
    hmac_key: Option<DecodingKey>,
}

/// Keeps verified tokens no longer than their own `exp` nor `max_ttl`.
struct TokenExpiry {
    max_ttl: Duration,
}

impl moka::Expiry<TokenDigest, Arc<Verified>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &TokenDigest,
        value: &Arc<Verified>,
        _now: std::time::Instant,
    ) -> Option<Duration> {
        let ttl = match value.expires_at {
            Some(exp) => Duration::from_secs(exp.saturating_sub(unix_now())),
            None => self.max_ttl,
        };
        Some(ttl.min(self.max_ttl))
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verifies bearer tokens for every configured provider.
pub struct Verifier {
    providers: Vec<Provider>,
    /// Distinct (header, prefix) pairs across providers, in config order.
    sources: Vec<FromHeader>,
    cache: moka::sync::Cache<TokenDigest, Arc<Verified>>,
    revocations: Option<Arc<Revocations>>,
    max_claims_depth: usize,
    metrics: Arc<Metrics>,
    /// See [`Verifier::claim_header_names`].
    claim_headers: Vec<(String, Option<String>)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("providers", &self.providers.len())
            .finish_non_exhaustive()
    }
}

/// SHA-256 of a token: the verified-token cache's key (32 bytes instead of the whole token,
/// hashed once per request) and the source of its log [`TokenDigest::fingerprint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenDigest([u8; 32]);

impl TokenDigest {
    pub fn of(token: &str) -> TokenDigest {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        TokenDigest(out)
    }

    /// A short, non-reversible fingerprint for log correlation (12 hex digits).
    pub fn fingerprint(&self) -> String {
        self.0.iter().take(6).map(|b| format!("{b:02x}")).collect()
    }
}

impl Verifier {
    /// Builds the verifier. JWKS fetching starts in the background (call [`Verifier::start`]);
    /// an unreachable issuer never stops the server from starting.
    pub fn new(config: &Config, metrics: Arc<Metrics>) -> Result<Verifier, jwks::Error> {
        let mut providers = Vec::new();
        let mut sources: Vec<FromHeader> = Vec::new();
        for p in &config.providers {
            let jwks = match &p.jwks {
                Some(j) => Some(Arc::new(Jwks::new(
                    &p.name,
                    &p.issuer,
                    j.clone(),
                    metrics.clone(),
                )?)),
                None => None,
            };
            let hmac_key = p.hmac_secret.as_deref().map(DecodingKey::from_secret);
            for h in &p.from_headers {
                if !sources.contains(h) {
                    sources.push(h.clone());
                }
            }
            providers.push(Provider {
                config: p.clone(),
                jwks,
                hmac_key,
            });
        }
        let revocations = config
            .revocation_file
            .as_ref()
            .map(|f| Arc::new(Revocations::new(f.clone())));
        let mut claim_headers: Vec<(String, Option<String>)> = Vec::new();
        for c in config.providers.iter().flat_map(|p| &p.claims_to_headers) {
            if !claim_headers.iter().any(|(n, _)| *n == c.header) {
                let underscored = c.header.contains('-').then(|| c.header.replace('-', "_"));
                claim_headers.push((c.header.clone(), underscored));
            }
        }
        Ok(Verifier {
            claim_headers,
            providers,
            sources,
            cache: moka::sync::Cache::builder()
                .max_capacity(config.cache_capacity)
                .expire_after(TokenExpiry {
                    max_ttl: Duration::from_secs(300),
                })
                .build(),
            revocations,
            max_claims_depth: config.max_claims_depth,
            metrics,
        })
    }

    /// Starts background JWKS refresh and revocation-list reloads. Needs a Tokio runtime.
    pub fn start(&self) {
        for p in &self.providers {
            if let Some(j) = &p.jwks {
                j.clone().start();
            }
        }
        if let Some(r) = &self.revocations {
            r.clone().start();
        }
    }

    pub fn is_enabled(&self) -> bool {
        !self.providers.is_empty()
    }

    /// Verified tokens in the cache, after applying moka's pending inserts and evictions (for
    /// the scrape-time gauge; not for the request path).
    pub fn cache_entries(&self) -> u64 {
        self.cache.run_pending_tasks();
        self.cache.entry_count()
    }

    /// Per-provider JWKS state for `/readyz`.
    pub fn jwks_status(&self) -> Vec<JwksStatus> {
        self.providers
            .iter()
            .filter_map(|p| p.jwks.as_ref().map(|j| j.status()))
            .collect()
    }

    /// Fetches every provider's keys once, for `validate --check-jwks`.
    pub async fn check_all_jwks(&self) -> Vec<(String, Result<usize, String>)> {
        let mut out = Vec::new();
        for p in &self.providers {
            if let Some(j) = &p.jwks {
                out.push((p.config.name.clone(), j.fetch_now().await));
            }
        }
        out
    }

    /// Every header a provider may inject from claims, once each, with its underscore
    /// spelling (`x_jwt_sub`) when it has one: made once here, not per Check.
    pub fn claim_header_names(&self) -> &[(String, Option<String>)] {
        &self.claim_headers
    }

    pub fn provider_forwards_token(&self, provider: usize) -> bool {
        self.providers
            .get(provider)
            .is_none_or(|p| p.config.forward_token)
    }

    /// Finds the bearer token in the request headers. `Ok(None)`: no token at all.
    pub fn extract(
        &self,
        headers: &BTreeMap<String, String>,
        max_bytes: usize,
    ) -> Result<Option<Found>, Failure> {
        let mut found: Option<Found> = None;
        for src in &self.sources {
            let Some(value) = headers.get(&src.name) else {
                continue;
            };
            let Some(token) = strip_prefix_ci(value, &src.prefix) else {
                continue;
            };
            let token = token.trim();
            if token.len() > max_bytes {
                return Err(Failure::TooLarge(max_bytes));
            }
            // Envoy joins a repeated header with ','; a token never contains one.
            if token.contains(',') || token.contains(' ') {
                return Err(Failure::MultipleTokens);
            }
            if token.is_empty() {
                return Err(Failure::Malformed("empty token".into()));
            }
            match &found {
                Some(f) if f.token != token => return Err(Failure::MultipleTokens),
                Some(_) => {}
                None => {
                    found = Some(Found {
                        header: src.name.clone(),
                        token: token.to_string(),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Verifies a token, from the cache when it was verified before.
    pub async fn verify(&self, token: &str) -> Result<Arc<Verified>, Failure> {
        self.verify_digested(token, &TokenDigest::of(token), None)
            .await
    }

    /// [`Verifier::verify`] with the token's digest already computed (the pipeline also logs
    /// its fingerprint, so it hashes the token once). A wait for keys ends by `deadline` (the
    /// Check's own, less a margin), so the answer reaches Envoy before Envoy gives up.
    pub async fn verify_digested(
        &self,
        token: &str,
        digest: &TokenDigest,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Verified>, Failure> {
        if let Some(v) = self.cache.get(digest) {
            if let Some(exp) = v.expires_at {
                // The cache entry expires at `exp`, but be exact at the boundary.
                let skew = self
                    .providers
                    .get(v.provider)
                    .map_or(0, |p| p.config.clock_skew.as_secs());
                if exp.saturating_add(skew) <= unix_now() {
                    return Err(Failure::Expired);
                }
            }
            self.check_revoked(&v)?;
            return Ok(v);
        }
        let result = self.verify_at(token, deadline).await;
        match &result {
            Ok(v) => {
                self.metrics.jwt_validation(&v.provider_name, "ok");
                self.cache.insert(*digest, v.clone());
            }
            Err(f) => {
                let provider = self.provider_name_for(token);
                self.metrics.jwt_validation(&provider, f.category());
            }
        }
        result
    }

    fn check_revoked(&self, v: &Verified) -> Result<(), Failure> {
        match (&self.revocations, &v.jti) {
            (Some(r), Some(jti)) if r.is_revoked(jti) => Err(Failure::Revoked),
            _ => Ok(()),
        }
    }

    fn provider_name_for(&self, token: &str) -> String {
        match self.select_provider(token) {
            Ok(i) => self
                .providers
                .get(i)
                .map_or_else(|| "unknown".into(), |p| p.config.name.clone()),
            Err(_) => "unknown".into(),
        }
    }

    fn select_provider(&self, token: &str) -> Result<usize, Failure> {
        if self.providers.len() == 1 {
            return Ok(0);
        }
        let claims = decode_json_segment(segment(token, 1)?, self.max_claims_depth)?;
        self.provider_for_claims(&claims)
    }

    /// The provider whose issuer is the (not yet verified) payload's `iss`.
    fn provider_for_claims(&self, claims: &serde_json::Value) -> Result<usize, Failure> {
        if self.providers.len() == 1 {
            return Ok(0);
        }
        let iss = claims
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or(Failure::UnknownIssuer)?;
        self.providers
            .iter()
            .position(|p| p.config.issuer == iss)
            .ok_or(Failure::UnknownIssuer)
    }

    /// Verifies without the verified-token cache (benchmarks measure the cold path with it).
    pub async fn verify_uncached(&self, token: &str) -> Result<Arc<Verified>, Failure> {
        self.verify_at(token, None).await
    }

    async fn verify_at(
        &self,
        token: &str,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Arc<Verified>, Failure> {
        if token.split('.').count() != 3 {
            return Err(Failure::Malformed(
                "expected three dot-separated parts".into(),
            ));
        }
        // Read `alg` ourselves first: jsonwebtoken cannot even represent `none`.
        let raw_header = decode_json_segment(segment(token, 0)?, self.max_claims_depth)?;
        let unverified = decode_json_segment(segment(token, 1)?, self.max_claims_depth)?;
        let alg_name = raw_header
            .get("alg")
            .and_then(|a| a.as_str())
            .ok_or_else(|| Failure::Malformed("header has no alg".into()))?;
        let alg: Algorithm = alg_name
            .parse()
            .map_err(|_| Failure::DisallowedAlgorithm(alg_name.chars().take(16).collect()))?;
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| Failure::Malformed(format!("header: {e}")))?;
        if raw_header.get("crit").is_some() {
            // RFC 7515 4.1.11: a critical extension the recipient does not understand makes
            // the token invalid, and meshauthz understands none.
            return Err(Failure::Malformed(
                "header has a crit parameter (no extension is supported)".into(),
            ));
        }

        let index = self.provider_for_claims(&unverified)?;
        let provider = self.providers.get(index).ok_or(Failure::UnknownIssuer)?;
        let cfg = &provider.config;
        if !cfg.algorithms.contains(&alg) {
            return Err(Failure::DisallowedAlgorithm(alg_name.to_string()));
        }
        check_claim_types(&unverified, !cfg.audiences.is_empty())?;

        let mut validation = Validation::new(alg);
        validation.leeway = cfg.clock_skew.as_secs();
        validation.set_issuer(&[cfg.issuer.as_str()]);
        validation.validate_nbf = true;
        if cfg.audiences.is_empty() {
            validation.set_required_spec_claims(&["exp", "iss"]);
            validation.validate_aud = false;
        } else {
            validation.set_required_spec_claims(&["exp", "iss", "aud"]);
            validation.set_audience(&cfg.audiences);
        }

        let claims = if is_hmac(alg) {
            let key = provider
                .hmac_key
                .as_ref()
                .ok_or_else(|| Failure::DisallowedAlgorithm(alg_name.to_string()))?;
            decode(token, key, &validation)?
        } else {
            let jwks = provider
                .jwks
                .as_ref()
                .ok_or_else(|| Failure::DisallowedAlgorithm(alg_name.to_string()))?;
            let keys = jwks.keys_for(header.kid.as_deref(), alg, deadline).await?;
            let mut last = Failure::UnknownKey;
            let mut verified = None;
            for key in keys.iter() {
                match decode(token, key, &validation) {
                    Ok(c) => {
                        verified = Some(c);
                        break;
                    }
                    Err(f @ Failure::BadSignature) => last = f,
                    Err(f) => return Err(f),
                }
            }
            verified.ok_or(last)?
        };
        check_times(&claims, cfg.clock_skew)?;

        let jti = claims
            .get("jti")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let subject = claims
            .get("sub")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        // `exp` may be fractional (a NumericDate); the entry must still die at it.
        let expires_at = claims
            .get("exp")
            .and_then(serde_json::Value::as_f64)
            .map(|e| if e <= 0.0 { 0 } else { e.floor() as u64 });
        // A claim no header can carry (CR, LF, NUL, DEL…) sets no header: the pipeline then
        // removes any client copy, exactly as for a token without that claim.
        let claim_headers = cfg
            .claims_to_headers
            .iter()
            .filter_map(|c| claim_value(&claims, &c.claim).map(|v| (c.header.clone(), v)))
            .filter(|(_, v)| crate::decision::is_header_value(v))
            .collect();
        let mut document = Value::new_object();
        if let Ok(m) = document.as_object_mut() {
            m.insert(Value::from("provider"), Value::from(cfg.name.as_str()));
            m.insert(Value::from("header"), Value::from(raw_header));
            m.insert(Value::from("claims"), Value::from(claims));
        }
        let verified = Verified {
            provider: index,
            provider_name: cfg.name.clone(),
            document,
            claim_headers,
            subject,
            jti,
            expires_at,
        };
        self.check_revoked(&verified)?;
        Ok(Arc::new(verified))
    }
}

/// Registered claims must have their registered types (RFC 7519 4.1): a parser that skips a
/// claim of the wrong type would skip its check too (an object `aud` once passed the audience
/// check). With audiences configured, `aud` is required.
fn check_claim_types(claims: &serde_json::Value, audience_required: bool) -> Result<(), Failure> {
    use serde_json::Value as J;
    let bad = |what: &str| Err(Failure::Malformed(format!("claim {what}")));
    match claims.get("iss") {
        None | Some(J::String(_)) => {}
        Some(_) => return bad("iss must be a string"),
    }
    for name in ["exp", "nbf", "iat"] {
        match claims.get(name) {
            None | Some(J::Number(_)) => {}
            Some(_) => return bad(&format!("{name} must be a number")),
        }
    }
    match claims.get("aud") {
        Some(J::String(_)) => {}
        Some(J::Array(items)) if !items.is_empty() && items.iter().all(J::is_string) => {}
        None if !audience_required => {}
        None => return Err(Failure::WrongAudience),
        Some(_) => return bad("aud must be a string or a non-empty array of strings"),
    }
    match claims.get("jti") {
        // Revocation compares strings: a numeric jti would never match the list.
        None | Some(J::String(_)) => {}
        Some(_) => return bad("jti must be a string"),
    }
    Ok(())
}

/// `exp` and `nbf` as NumericDates, fractions included: jsonwebtoken reads them as integers
/// and skips a fractional one, which left such tokens valid past their `exp`.
fn check_times(claims: &serde_json::Value, skew: Duration) -> Result<(), Failure> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let skew = skew.as_secs_f64();
    if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_f64)
        && exp + skew <= now
    {
        return Err(Failure::Expired);
    }
    if let Some(nbf) = claims.get("nbf").and_then(serde_json::Value::as_f64)
        && nbf - skew > now
    {
        return Err(Failure::NotYetValid);
    }
    Ok(())
}

fn strip_prefix_ci<'a>(value: &'a str, prefix: &str) -> Option<&'a str> {
    let head = value.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| value.get(prefix.len()..))
        .flatten()
}

fn segment(token: &str, i: usize) -> Result<&str, Failure> {
    token
        .split('.')
        .nth(i)
        .ok_or_else(|| Failure::Malformed("missing part".into()))
}

/// Decodes a header or payload segment into a JSON object no deeper than `max_depth`.
fn decode_json_segment(seg: &str, max_depth: usize) -> Result<serde_json::Value, Failure> {
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(seg.trim_end_matches('='))
        .map_err(|_| Failure::Malformed("invalid base64url".into()))?;
    // Cheap pre-scan: serde_json would stop at 128 levels, but our limit is usually lower and a
    // deep document should cost nothing beyond one pass over its bytes.
    if bracket_depth(&bytes) > max_depth {
        return Err(Failure::TooDeep(max_depth));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| Failure::Malformed("invalid JSON".into()))?;
    if !v.is_object() {
        return Err(Failure::Malformed("expected a JSON object".into()));
    }
    Ok(v)
}

/// Deepest `[`/`{` nesting in JSON text, ignoring brackets inside strings. The top-level object
/// counts as depth 1. Never under-counts a valid document; garbage is caught by the parser.
pub fn bracket_depth(json: &[u8]) -> usize {
    let (mut depth, mut deepest) = (0usize, 0usize);
    let (mut in_string, mut escaped) = (false, false);
    for &b in json {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    deepest
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<serde_json::Value, Failure> {
    use jsonwebtoken::errors::ErrorKind as K;
    jsonwebtoken::decode::<serde_json::Value>(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            K::InvalidSignature => Failure::BadSignature,
            K::ExpiredSignature => Failure::Expired,
            K::ImmatureSignature => Failure::NotYetValid,
            K::InvalidIssuer => Failure::WrongIssuer,
            K::InvalidAudience => Failure::WrongAudience,
            K::InvalidAlgorithm | K::InvalidAlgorithmName | K::UnsupportedAlgorithm => {
                Failure::DisallowedAlgorithm(validation_alg(validation))
            }
            K::MissingRequiredClaim(c) => Failure::Malformed(format!("missing claim {c}")),
            // A key of the wrong type for the algorithm (HS/RS confusion and friends).
            K::InvalidKeyFormat | K::InvalidRsaKey(_) | K::InvalidEcdsaKey | K::InvalidEddsaKey => {
                Failure::BadSignature
            }
            other => Failure::Malformed(format!("{other:?}").chars().take(80).collect()),
        })
}

fn validation_alg(v: &Validation) -> String {
    v.algorithms
        .first()
        .map_or_else(String::new, |a| format!("{a:?}"))
}

/// A claim rendered as a header value: strings as is, anything else as JSON.
fn claim_value(claims: &serde_json::Value, path: &str) -> Option<String> {
    let mut v = claims;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    }
}

#[cfg(test)]
mod tests;
