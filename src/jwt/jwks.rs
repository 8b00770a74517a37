//! One provider's signing keys: fetched, cached, refreshed, and re-fetched on an unknown `kid`.
//!
//! The keys in use are an immutable [`KeySet`] behind an `ArcSwap`, so verification never locks.
//! Fetches happen in one background task at a time (single flight): a refresh timer, the first
//! request that needs keys, or a token with an unknown `kid` can each *trigger* a fetch, and
//! every concurrent waiter watches the same attempt counter. Unknown-`kid` fetches are rate
//! limited, so a flood of tokens with random `kid`s costs one fetch per interval. A failed fetch
//! keeps the last good keys, which keep serving until they are older than `max_stale`.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Serialize;
use tokio::sync::watch;

use super::{Failure, JwksConfig, JwksSource};
use crate::telemetry::Metrics;

/// Largest JWKS or discovery document accepted.
const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error("cannot read CA bundle {path}: {message}")]
    Ca { path: String, message: String },
}

/// A usable key.
struct Key {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one: the key is then usable only for that algorithm.
    alg: Option<Algorithm>,
    family: jsonwebtoken::AlgorithmFamily,
    key: DecodingKey,
}

/// The keys from one successful fetch.
struct KeySet {
    keys: Vec<Key>,
    fetched_at: Instant,
    fetched_at_wall: SystemTime,
}

/// For `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct JwksStatus {
    pub provider: String,
    pub keys: usize,
    /// Seconds since the last successful fetch; `None` if never fetched.
    pub age_seconds: Option<u64>,
    /// Keys are present and younger than `max_stale`.
    pub usable: bool,
    pub last_error: Option<String>,
}

pub struct Jwks {
    provider: String,
    issuer: String,
    config: JwksConfig,
    client: reqwest::Client,
    current: ArcSwapOption<KeySet>,
    in_flight: AtomicBool,
    /// Counts finished fetch attempts (successful or not); waiters watch it.
    attempts: watch::Sender<u64>,
    /// When the last fetch triggered by an unknown kid started (the one `min_refetch_interval`
    /// limits; startup and periodic refreshes do not count).
    last_miss_fetch: Mutex<Option<Instant>>,
    /// Requests waiting on a fetch or on the refetch interval right now.
    waiting: AtomicUsize,
    last_error: Mutex<Option<String>>,
    metrics: Arc<Metrics>,
}

impl Jwks {
    pub fn new(
        provider: &str,
        issuer: &str,
        config: JwksConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Jwks, Error> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.fetch_timeout)
            .connect_timeout(config.fetch_timeout)
            .user_agent(concat!("meshauthz/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::limited(3));
        if let Some(ca) = &config.ca_file {
            let pem = std::fs::read(ca).map_err(|e| Error::Ca {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| Error::Ca {
                path: ca.display().to_string(),
                message: e.to_string(),
            })?;
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let client = builder.build().map_err(|e| Error::Client(e.to_string()))?;
        metrics.set_jwks_age(provider, -1);
        Ok(Jwks {
            provider: provider.to_string(),
            issuer: issuer.trim_end_matches('/').to_string(),
            config,
            client,
            current: ArcSwapOption::empty(),
            in_flight: AtomicBool::new(false),
            attempts: watch::channel(0).0,
            last_miss_fetch: Mutex::new(None),
            waiting: AtomicUsize::new(0),
            last_error: Mutex::new(None),
            metrics,
        })
    }

    /// Fetches now and then every `refresh_interval` (sooner after a failure).
    pub fn start(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                let ok = self.fetch_now().await.is_ok();
                let wait = if ok {
                    self.config.refresh_interval
                } else {
                    // Retry sooner while failing, but never hammer the issuer.
                    (self.config.refresh_interval / 10)
                        .clamp(Duration::from_secs(1), Duration::from_secs(30))
                };
                self.publish_age();
                tokio::time::sleep(wait).await;
            }
        });
    }

    fn publish_age(&self) {
        let age = self.current.load().as_ref().map_or(-1, |k| {
            i64::try_from(k.fetched_at.elapsed().as_secs()).unwrap_or(i64::MAX)
        });
        self.metrics.set_jwks_age(&self.provider, age);
    }

    pub fn status(&self) -> JwksStatus {
        let current = self.current.load_full();
        let age = current.as_ref().map(|k| k.fetched_at.elapsed());
        JwksStatus {
            provider: self.provider.clone(),
            keys: current.as_ref().map_or(0, |k| k.keys.len()),
            age_seconds: age.map(|a| a.as_secs()),
            usable: age.is_some_and(|a| a <= self.config.max_stale),
            last_error: lock(&self.last_error).clone(),
        }
    }

    /// Keys usable for `alg` (and `kid`, when the token names one).
    /// Any wait for a fetch ends by `deadline` as well as by `max_wait`.
    pub async fn keys_for(
        self: &Arc<Self>,
        kid: Option<&str>,
        alg: Algorithm,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Vec<DecodingKey>, Failure> {
        let mut snapshot = self.current.load_full();
        if snapshot.is_none() {
            snapshot = self.refresh_and_wait(None, false, deadline).await?;
        }
        let set = snapshot.as_ref().ok_or_else(|| {
            Failure::KeysUnavailable(
                lock(&self.last_error)
                    .clone()
                    .unwrap_or_else(|| "no keys fetched yet".into()),
            )
        })?;
        let mut found = matching(set, kid, alg);
        if found.is_empty() && kid.is_some() {
            // A new kid may mean the issuer rotated keys: re-fetch once (rate limited).
            if let Some(fresh) = self.refresh_and_wait(Some(set), true, deadline).await? {
                found = matching(&fresh, kid, alg);
                return self.usable(&fresh, found);
            }
        }
        self.usable(set, found)
    }

    fn usable(&self, set: &KeySet, found: Vec<DecodingKey>) -> Result<Vec<DecodingKey>, Failure> {
        if set.fetched_at.elapsed() > self.config.max_stale {
            return Err(Failure::KeysUnavailable(format!(
                "keys are older than max_stale ({}s)",
                self.config.max_stale.as_secs()
            )));
        }
        if found.is_empty() {
            return Err(Failure::UnknownKey);
        }
        Ok(found)
    }

    /// Triggers a fetch (unless another is in flight, or `seen` is no longer current) and waits
    /// for it up to `max_wait`. Returns whatever keys are current afterwards. `kid_miss`: the
    /// caller holds a kid the current keys lack, so `min_refetch_interval` applies.
    async fn refresh_and_wait(
        self: &Arc<Self>,
        seen: Option<&Arc<KeySet>>,
        kid_miss: bool,
        deadline: Option<tokio::time::Instant>,
    ) -> Result<Option<Arc<KeySet>>, Failure> {
        let current = self.current.load_full();
        let stale_view = match (seen, &current) {
            (Some(s), Some(c)) => Arc::ptr_eq(s, c),
            (None, None) => true,
            _ => false,
        };
        if !stale_view {
            // Someone refreshed since the caller looked.
            return Ok(current);
        }
        let _waiting = self.enter_wait()?;
        let mut rx = self.attempts.subscribe();
        let start = *rx.borrow_and_update();
        let mut budget = match deadline {
            Some(d) => self
                .config
                .max_wait
                .min(d.saturating_duration_since(tokio::time::Instant::now())),
            None => self.config.max_wait,
        };
        if kid_miss && !self.in_flight.load(Ordering::Acquire) {
            let since = lock(&self.last_miss_fetch).map(|t| t.elapsed());
            if let Some(since) = since
                && since < self.config.min_refetch_interval
            {
                // An unknown kid was fetched for moments ago (the issuer rotated twice, or
                // someone sends made-up kids). Rather than refuse this kid for the rest of the
                // interval, wait for it to end when that fits the budget; the fetch rate stays
                // bounded either way.
                let remaining = self.config.min_refetch_interval - since;
                if remaining >= budget {
                    return Ok(current);
                }
                tokio::time::sleep(remaining).await;
                budget -= remaining;
                if *rx.borrow() != start {
                    // Someone fetched while we waited.
                    return Ok(self.current.load_full());
                }
            }
        }
        self.trigger(kid_miss);
        let _ = tokio::time::timeout(budget, rx.wait_for(|n| *n != start)).await;
        Ok(self.current.load_full())
    }

    /// Counts the caller among the waiters, or refuses it when `max_waiters` already wait: a
    /// parked request holds its whole state, so a flood of unknown kids must not park without
    /// bound.
    fn enter_wait(&self) -> Result<Waiting<'_>, Failure> {
        let before = self.waiting.fetch_add(1, Ordering::AcqRel);
        let guard = Waiting(&self.waiting);
        if before >= self.config.max_waiters {
            return Err(Failure::KeysUnavailable(format!(
                "{} requests are already waiting for this issuer's keys (max_waiters)",
                self.config.max_waiters
            )));
        }
        Ok(guard)
    }

    /// Starts a background fetch unless one is already running.
    fn trigger(self: &Arc<Self>, kid_miss: bool) {
        if self.in_flight.swap(true, Ordering::AcqRel) {
            return;
        }
        if kid_miss {
            *lock(&self.last_miss_fetch) = Some(Instant::now());
        }
        // The fetch runs detached so a request that stops waiting does not cancel it.
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this.fetch_inner().await;
            this.in_flight.store(false, Ordering::Release);
        });
    }

    /// Fetches once, now, regardless of rate limits (startup, refresh timer, `validate`).
    pub async fn fetch_now(&self) -> Result<usize, String> {
        self.fetch_inner().await
    }

    async fn fetch_inner(&self) -> Result<usize, String> {
        let result = self.fetch_keys().await;
        let outcome = result.as_ref().map(Vec::len).map_err(Clone::clone);
        match result {
            Ok(keys) => {
                let n = keys.len();
                self.current.store(Some(Arc::new(KeySet {
                    keys,
                    fetched_at: Instant::now(),
                    fetched_at_wall: SystemTime::now(),
                })));
                *lock(&self.last_error) = None;
                self.metrics.jwks_fetch(&self.provider, "ok");
                tracing::debug!(provider = %self.provider, keys = n, "JWKS fetched");
            }
            Err(e) => {
                tracing::warn!(provider = %self.provider, error = %e, "JWKS fetch failed; keeping cached keys");
                *lock(&self.last_error) = Some(e);
                self.metrics.jwks_fetch(&self.provider, "error");
            }
        }
        self.publish_age();
        self.attempts.send_modify(|n| *n = n.wrapping_add(1));
        outcome
    }

    async fn fetch_keys(&self) -> Result<Vec<Key>, String> {
        let body = match &self.config.source {
            JwksSource::File(path) => tokio::fs::read(path)
                .await
                .map_err(|e| format!("cannot read {}: {e}", path.display()))?,
            JwksSource::Uri(uri) => self.get(uri).await?,
            JwksSource::Discovery => {
                let url = format!("{}/.well-known/openid-configuration", self.issuer);
                let doc: serde_json::Value = serde_json::from_slice(&self.get(&url).await?)
                    .map_err(|e| format!("discovery document is not JSON: {e}"))?;
                let jwks_uri = doc
                    .get("jwks_uri")
                    .and_then(|v| v.as_str())
                    .ok_or("discovery document has no jwks_uri")?;
                self.get(jwks_uri).await?
            }
        };
        parse_jwks(&body)
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, String> {
        // Errors end up in logs, /readyz and decision-log details: never with credentials.
        let shown = redact_url(url);
        let mut resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("GET {shown}: {}", error_chain(&e.without_url())))?;
        if !resp.status().is_success() {
            return Err(format!("GET {shown}: HTTP {}", resp.status().as_u16()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("GET {shown}: {}", error_chain(&e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_BODY_BYTES {
                return Err(format!(
                    "GET {shown}: body larger than {MAX_BODY_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    /// Wall-clock time of the last successful fetch.
    pub fn fetched_at(&self) -> Option<SystemTime> {
        self.current.load().as_ref().map(|k| k.fetched_at_wall)
    }
}

fn matching(set: &KeySet, kid: Option<&str>, alg: Algorithm) -> Vec<DecodingKey> {
    set.keys
        .iter()
        .filter(|k| k.family == alg.family())
        .filter(|k| k.alg.is_none_or(|a| a == alg))
        .filter(|k| match kid {
            Some(kid) => k.kid.as_deref() == Some(kid),
            None => true,
        })
        .map(|k| k.key.clone())
        .collect()
}

/// Parses a JWKS, keeping every usable asymmetric key and skipping the rest (unknown `kty`,
/// `use: enc`, symmetric `oct` keys: HMAC secrets never come from a JWKS).
fn parse_jwks(body: &[u8]) -> Result<Vec<Key>, String> {
    let doc: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = doc
        .get("keys")
        .and_then(|k| k.as_array())
        .ok_or("JWKS has no \"keys\" array")?;
    let mut keys = Vec::new();
    for raw in list {
        let Ok(jwk) = serde_json::from_value::<Jwk>(raw.clone()) else {
            continue;
        };
        if matches!(
            jwk.common.public_key_use,
            Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
        ) {
            continue;
        }
        let family = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => jsonwebtoken::AlgorithmFamily::Rsa,
            AlgorithmParameters::EllipticCurve(_) => jsonwebtoken::AlgorithmFamily::Ec,
            AlgorithmParameters::OctetKeyPair(_) => jsonwebtoken::AlgorithmFamily::Ed,
            _ => continue,
        };
        let Ok(key) = DecodingKey::from_jwk(&jwk) else {
            continue;
        };
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| a.to_string().parse::<Algorithm>().ok());
        keys.push(Key {
            kid: jwk.common.key_id.clone(),
            alg,
            family,
            key,
        });
    }
    if keys.is_empty() {
        return Err("JWKS holds no usable signing key".into());
    }
    Ok(keys)
}

/// One request counted in [`Jwks::enter_wait`]; uncounted when dropped (also when the request
/// is cancelled mid-wait).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A URL as it may be shown: user info replaced by `***`, every query value by `***` (keys
/// such as `api_key` stay, so the shape is still recognisable), the fragment dropped.
pub fn redact_url(url: &str) -> String {
    let url = url.split('#').next().unwrap_or("");
    let (before_query, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match before_query.split_once("://") {
        Some((scheme, rest)) => {
            let (authority, path) = match rest.find('/') {
                Some(i) => rest.split_at(i),
                None => (rest, ""),
            };
            let host = match authority.rsplit_once('@') {
                Some((_, host)) => format!("***@{host}"),
                None => authority.to_string(),
            };
            format!("{scheme}://{host}{path}")
        }
        None => before_query.to_string(),
    };
    if let Some(q) = query {
        let redacted: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) => format!("{k}=***"),
                None => pair.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&redacted.join("&"));
    }
    out
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_url_table() {
        let cases = [
            ("https://issuer/jwks", "https://issuer/jwks"),
            (
                "https://user:pw@issuer:8443/jwks",
                "https://***@issuer:8443/jwks",
            ),
            (
                "https://issuer/jwks?api_key=s3cret&v=2",
                "https://issuer/jwks?api_key=***&v=***",
            ),
            (
                "https://u@issuer?token=x#frag",
                "https://***@issuer?token=***",
            ),
            ("http://a@b@issuer/x", "http://***@issuer/x"),
        ];
        for (url, want) in cases {
            assert_eq!(super::redact_url(url), want, "{url}");
        }
    }
}
