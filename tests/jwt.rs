//! Bearer tokens through the real server, against a real JWKS HTTP server, with tokens minted
//! from real keys of every supported algorithm.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::*;
use jsonwebtoken::Algorithm;
use serde_json::json;

/// A policy that allows any request carrying a verified token and exposes its claims.
const TOKEN_POLICY: &str = r#"
package envoy.authz
import rego.v1

allow := {"allowed": true, "headers": {"x-claims-sub": input.jwt.claims.sub, "x-provider": input.jwt.provider}} if input.jwt
allow := {"allowed": false, "http_status": 403} if not input.jwt
"#;

async fn token_server(provider_yaml: &str) -> (TestServer, tempfile::TempDir) {
    token_server_with("", provider_yaml).await
}

/// As [`token_server`], with a `server:` section (`server_yaml` is its indented body).
async fn token_server_with(
    server_yaml: &str,
    provider_yaml: &str,
) -> (TestServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let pdir = dir.path().join("policies");
    std::fs::create_dir(&pdir).unwrap();
    std::fs::write(pdir.join("policy.rego"), TOKEN_POLICY).unwrap();
    let file = write_config(
        dir.path(),
        &format!(
            "{server}policy:\n  paths: [policies]\njwt:\n{provider_yaml}\ndecision_log: {{ enabled: false }}\n",
            server = if server_yaml.is_empty() {
                String::new()
            } else {
                format!("server:\n{server_yaml}\n")
            }
        ),
    );
    (TestServer::start(&file).await, dir)
}

fn provider(jwks_uri: &str, extra: &str) -> String {
    let wait = if extra.contains("max_wait") {
        ""
    } else {
        r#", max_wait: "2s""#
    };
    let interval = if extra.contains("min_refetch_interval") {
        ""
    } else {
        r#", min_refetch_interval: "0s""#
    };
    format!(
        r#"  providers:
    - name: corp
      issuer: "{ISSUER}"
      audiences: ["{AUDIENCE}"]
      jwks: {{ uri: "{jwks_uri}" {interval} {wait} {extra} }}
      claims_to_headers: [{{ claim: sub, header: x-jwt-sub }}]
"#
    )
}

fn with_token(token: &str) -> envoy_types::ext_authz::v3::pb::CheckRequest {
    Req {
        method: "GET",
        path: "/",
        ..Default::default()
    }
    .bearer(token)
    .build()
}

#[tokio::test]
async fn every_supported_algorithm_verifies() {
    let algs = meshauthz::jwt::ASYMMETRIC;
    let keys: Vec<Keys> = algs
        .iter()
        .map(|a| Keys::generate(*a, &format!("{a:?}")))
        .collect();
    let jwks = JwksServer::start(&keys.iter().collect::<Vec<_>>()).await;
    let (server, _dir) = token_server(&provider(&jwks.uri(), "")).await;
    for k in &keys {
        let got = server
            .check(with_token(&k.sign(&claims("alice", ""))))
            .await;
        assert!(got.allowed, "{:?}: {got:?}", k.alg);
        assert_eq!(got.header("x-claims-sub"), Some("alice"), "{:?}", k.alg);
        assert_eq!(got.header("x-jwt-sub"), Some("alice"), "{:?}", k.alg);
        assert_eq!(got.header("x-provider"), Some("corp"));
    }
    // No token: the policy decides (here: 403), not a 401.
    let none = server.check(request(None, "GET", "/")).await;
    assert_eq!((none.allowed, none.status), (false, 403));
    server.stop().await;
}

#[tokio::test]
async fn attack_tokens_are_denied_with_the_right_reason() {
    let rsa = Keys::generate(Algorithm::RS256, "rsa-1");
    let ec = Keys::generate(Algorithm::ES256, "ec-1");
    let other = Keys::generate(Algorithm::RS256, "rsa-1"); // same kid, different key
    let jwks = JwksServer::start(&[&rsa, &ec]).await;
    let (server, _dir) = token_server(&provider(&jwks.uri(), "")).await;

    let good = claims("alice", "");
    let valid = rsa.sign(&good);
    let mut parts: Vec<String> = valid.split('.').map(str::to_owned).collect();

    // Tampered payload: same header and signature, different claims.
    let mut evil = good.clone();
    evil["sub"] = json!("admin");
    use base64::Engine as _;
    parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(evil.to_string());
    let tampered = parts.join(".");

    // HS256 "signed" with the RSA public key (the classic key-confusion attack).
    let hs_with_public = {
        let secret = rsa.jwk.to_string();
        let mut h = jsonwebtoken::Header::new(Algorithm::HS256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(
            &h,
            &good,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    // An ES256 token naming the RSA key's kid (key type must match the algorithm).
    let es_with_rsa_kid = {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some("rsa-1".into());
        jsonwebtoken::encode(&h, &good, &ec.encoding).unwrap()
    };
    let at = |k: &Keys, f: &dyn Fn(&mut serde_json::Value)| {
        let mut c = claims("alice", "");
        f(&mut c);
        k.sign(&c)
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "alg none",
            raw_token(&json!({"alg": "none", "typ": "JWT"}), &good, b""),
            "jwt_disallowed_algorithm",
        ),
        (
            "alg None",
            raw_token(&json!({"alg": "None"}), &good, b""),
            "jwt_disallowed_algorithm",
        ),
        (
            "HS256 with the RSA public key",
            hs_with_public,
            "jwt_disallowed_algorithm",
        ),
        (
            "ES256 naming an RSA kid",
            es_with_rsa_kid,
            "jwt_unknown_key",
        ),
        ("tampered payload", tampered, "jwt_bad_signature"),
        (
            "signed by another key with a known kid",
            other.sign(&good),
            "jwt_bad_signature",
        ),
        (
            "expired",
            at(&rsa, &|c| c["exp"] = json!(now() - 3600)),
            "jwt_expired",
        ),
        (
            "nbf in the future",
            at(&rsa, &|c| c["nbf"] = json!(now() + 3600)),
            "jwt_not_yet_valid",
        ),
        (
            "wrong aud",
            at(&rsa, &|c| c["aud"] = json!("someone-else")),
            "jwt_wrong_audience",
        ),
        (
            "wrong iss",
            at(&rsa, &|c| c["iss"] = json!("https://evil.test")),
            "jwt_wrong_issuer",
        ),
        (
            "no exp",
            at(&rsa, &|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            "jwt_malformed",
        ),
        (
            "unknown kid",
            Keys::generate(Algorithm::RS256, "nobody").sign(&good),
            "jwt_unknown_key",
        ),
        (
            "oversized",
            format!("{}.{}.{}", "a".repeat(5000), "b".repeat(5000), "c"),
            "jwt_too_large",
        ),
        ("garbage base64", "!!!.@@@.###".to_string(), "jwt_malformed"),
        ("two parts", "abc.def".to_string(), "jwt_malformed"),
        (
            "header not JSON",
            format!(
                "{}.e30.sig",
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode("nope")
            ),
            "jwt_malformed",
        ),
        (
            "two tokens (a duplicated authorization header)",
            format!("{valid},Bearer {valid}"),
            "jwt_multiple_tokens",
        ),
    ];
    let fetches_before = jwks.fetches();
    for (note, token, reason) in &cases {
        let got = server.check(with_token(token)).await;
        assert_eq!((got.allowed, got.status), (false, 401), "{note}");
        assert_eq!(got.reason, *reason, "{note}");
        assert_eq!(
            got.header("www-authenticate"),
            Some("Bearer error=\"invalid_token\""),
            "{note}"
        );
    }
    // Unknown kids each triggered at most one refetch (interval 0 here), never a storm.
    assert!(
        jwks.fetches() - fetches_before <= 3,
        "fetches: {}",
        jwks.fetches() - fetches_before
    );

    // And the valid token still works.
    assert!(server.check(with_token(&valid)).await.allowed);
    server.stop().await;
}

/// A server that has verified a token of the issuer's old key, after which the issuer starts
/// publishing a new key too. Returns the new key and the fetch count at that point.
/// `extra` is added to the provider's `jwks` settings.
async fn rotated_issuer(extra: &str) -> (Keys, JwksServer, TestServer, tempfile::TempDir, usize) {
    rotated_issuer_with("", extra).await
}

/// As [`rotated_issuer`], with a `server:` section.
async fn rotated_issuer_with(
    server_yaml: &str,
    extra: &str,
) -> (Keys, JwksServer, TestServer, tempfile::TempDir, usize) {
    let old = Keys::generate(Algorithm::ES256, "2026-01");
    let new = Keys::generate(Algorithm::ES256, "2026-02");
    let jwks = JwksServer::start(&[&old]).await;
    let (server, dir) = token_server_with(server_yaml, &provider(&jwks.uri(), extra)).await;
    let warm = server.check(with_token(&old.sign(&claims("a", "")))).await;
    assert!(warm.allowed, "{warm:?}");
    let before = jwks.fetches();
    jwks.set_keys(&[&old, &new]);
    (new, jwks, server, dir, before)
}

#[tokio::test]
async fn key_rotation_is_picked_up_after_one_refetch() {
    let (new, jwks, server, _dir, before) = rotated_issuer("").await;
    let got = server.check(with_token(&new.sign(&claims("b", "")))).await;
    assert!(got.allowed, "{got:?}");
    assert_eq!(
        jwks.fetches(),
        before + 1,
        "exactly one re-fetch for the new kid"
    );
    server.stop().await;
}

/// `min_refetch_interval` limits fetches caused by unknown kids, not periodic refreshes: a new
/// kid moments after the startup fetch is fetched at once, however long the interval. A second
/// new kid moments after a kid-miss fetch waits out the interval when that fits `max_wait` (and
/// then re-fetches), and is refused at once, with nothing fetched, when it does not.
#[tokio::test]
async fn min_refetch_interval_limits_kid_miss_fetches_only() {
    for (interval, max_wait, allowed, refetched) in
        [("700ms", "2s", true, 1), ("30s", "1s", false, 0)]
    {
        let (new, jwks, server, _dir, before) = rotated_issuer(&format!(
            r#", min_refetch_interval: "{interval}", max_wait: "{max_wait}""#
        ))
        .await;
        let started = std::time::Instant::now();
        let got = server.check(with_token(&new.sign(&claims("b", "")))).await;
        assert!(
            got.allowed,
            "interval {interval}, right after startup: {got:?}"
        );
        assert_eq!(jwks.fetches() - before, 1, "interval {interval}");
        let took = started.elapsed();
        assert!(
            took < Duration::from_millis(500),
            "fetched at once, took {took:?}"
        );

        // The issuer rotates again, moments after that kid-miss fetch.
        let newer = Keys::generate(Algorithm::ES256, "2026-03");
        jwks.set_keys(&[&new, &newer]);
        let before = jwks.fetches();
        let started = std::time::Instant::now();
        let got = server
            .check(with_token(&newer.sign(&claims("c", ""))))
            .await;
        let took = started.elapsed();
        assert_eq!(got.allowed, allowed, "interval {interval}: {got:?}");
        assert_eq!(jwks.fetches() - before, refetched, "interval {interval}");
        if allowed {
            assert!(
                took >= Duration::from_millis(300),
                "waited out the interval: {took:?}"
            );
            assert!(took < Duration::from_millis(1500), "waited {took:?}");
        } else {
            assert_eq!(got.reason, "jwt_unknown_key");
            assert!(
                took < Duration::from_millis(200),
                "refused at once, took {took:?}"
            );
        }
        server.stop().await;
    }
}

/// Sends `n` checks at once, each with its own token signed by `key` (distinct tokens, so the
/// verified-token cache cannot absorb them); returns each outcome with how long it took.
async fn concurrent_checks(server: TestServer, key: &Keys, n: usize) -> Vec<(Outcome, Duration)> {
    let server = std::sync::Arc::new(server);
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let token = key.sign(&claims(&format!("user{i}"), ""));
            let s = server.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                let got = s.check(with_token(&token)).await;
                (got, started.elapsed())
            })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

/// A flood of new-kid requests while the fetch is slow: `max_waiters` of them wait and are
/// allowed, the rest are refused at once (keys unavailable), so a burst of unknown kids cannot
/// park requests without bound.
#[tokio::test]
async fn requests_beyond_max_waiters_are_refused_at_once() {
    let (new, jwks, server, _dir, before) =
        rotated_issuer(r#", max_waiters: 10, max_wait: "5s""#).await;
    jwks.set_delay(Duration::from_millis(1500));
    let (mut allowed, mut refused) = (0, 0);
    for (got, took) in concurrent_checks(server, &new, 40).await {
        if got.allowed {
            allowed += 1;
            assert!(
                took >= Duration::from_millis(1000),
                "waited for the fetch: {took:?}"
            );
        } else {
            refused += 1;
            assert_eq!(got.reason, "jwt_keys_unavailable", "{got:?}");
            assert!(
                took < Duration::from_millis(1000),
                "refused at once: {took:?}"
            );
        }
    }
    assert_eq!((allowed, refused), (10, 30));
    assert_eq!(jwks.fetches(), before + 1, "single flight");
}

/// The same flood on one connection to a server that allows 4 concurrent streams: the client
/// holds the rest back (HTTP/2 flow), so at most 4 Checks wait on the fetch, none is refused by
/// `max_waiters`, and all 40 are allowed once the keys arrive. Without the cap (tonic's default is
/// "unlimited") this is the 10-allowed/30-refused case above.
#[tokio::test]
async fn max_concurrent_streams_bounds_checks_in_flight_per_connection() {
    let (new, jwks, server, _dir, before) = rotated_issuer_with(
        "  max_concurrent_streams: 4",
        r#", max_waiters: 10, max_wait: "5s""#,
    )
    .await;
    jwks.set_delay(Duration::from_millis(1500));
    let outcomes = concurrent_checks(server, &new, 40).await;
    let refused: Vec<_> = outcomes.iter().filter(|(got, _)| !got.allowed).collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(jwks.fetches(), before + 1, "single flight");
}

#[tokio::test]
async fn a_thousand_concurrent_requests_with_a_new_kid_cause_one_fetch() {
    let (new, jwks, server, _dir, before) = rotated_issuer("").await;
    // Slow the JWKS down so every request arrives while the fetch is in flight.
    jwks.set_delay(Duration::from_millis(300));
    let outcomes = concurrent_checks(server, &new, 1000).await;
    let allowed = outcomes.iter().filter(|(got, _)| got.allowed).count();
    assert_eq!(allowed, 1000);
    assert_eq!(jwks.fetches(), before + 1, "single flight");
}

#[tokio::test]
async fn issuer_outage_serves_cached_keys_until_max_stale() {
    let k = Keys::generate(Algorithm::RS256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let (server, _dir) = token_server(&provider(
        &jwks.uri(),
        r#", refresh_interval: "1s", max_stale: "3s""#,
    ))
    .await;
    assert!(
        server
            .check(with_token(&k.sign(&claims("a", ""))))
            .await
            .allowed
    );

    jwks.set_status(500);
    // Still within max_stale: new tokens verify with the cached key.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        server
            .check(with_token(&k.sign(&claims("b", ""))))
            .await
            .allowed
    );
    let (_, ready) = server.get("/readyz").await;
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert!(
        ready["jwks"][0]["last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{ready}"
    );

    // Past max_stale: keys are no longer trusted.
    let stale = eventually(Duration::from_secs(6), async || {
        let got = server.check(with_token(&k.sign(&claims("c", "")))).await;
        !got.allowed && got.reason == "jwt_keys_unavailable"
    })
    .await;
    assert!(stale, "keys must stop being used after max_stale");
    let (_, metrics) = server.get("/metrics").await;
    assert!(metrics.contains(r#"meshauthz_jwks_fetches_total{provider="corp",result="error"}"#));

    // The issuer comes back: keys are fetched again and tokens verify.
    jwks.set_status(200);
    let back = eventually(Duration::from_secs(5), async || {
        server
            .check(with_token(&k.sign(&claims("d", ""))))
            .await
            .allowed
    })
    .await;
    assert!(back);
    server.stop().await;
}

#[tokio::test]
async fn unreachable_issuer_at_startup_does_not_stop_the_server() {
    // A port nothing listens on.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    let (server, _dir) = token_server(&provider(
        &format!("http://{addr}/keys"),
        r#", max_wait: "200ms""#,
    ))
    .await;
    let k = Keys::generate(Algorithm::RS256, "k");
    let got = server.check(with_token(&k.sign(&claims("a", "")))).await;
    assert_eq!(
        (got.allowed, got.status, got.reason.as_str()),
        (false, 401, "jwt_keys_unavailable")
    );
    // Requests without a token are still decided by the policy.
    assert_eq!(server.check(request(None, "GET", "/")).await.status, 403);
    let (status, ready) = server.get("/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["jwks"][0]["usable"], false);
    assert!(ready["jwks"][0]["last_error"].is_string());
    server.stop().await;
}

#[tokio::test]
async fn revoked_jti_is_refused_and_the_list_reloads() {
    let k = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let dir = tempfile::tempdir().unwrap();
    let revoked = dir.path().join("revoked.txt");
    std::fs::write(&revoked, "# revoked tokens\njti-one\n").unwrap();
    let yaml = format!(
        "  revocation_file: \"{}\"\n{}",
        revoked.display(),
        provider(&jwks.uri(), "")
    );
    let (server, _dir2) = token_server(&yaml).await;

    let mut c1 = claims("a", "");
    c1["jti"] = json!("jti-one");
    let got = server.check(with_token(&k.sign(&c1))).await;
    assert_eq!((got.status, got.reason.as_str()), (401, "jwt_revoked"));

    let mut c2 = claims("b", "");
    c2["jti"] = json!("jti-two");
    let t2 = k.sign(&c2);
    assert!(server.check(with_token(&t2)).await.allowed);
    // Revoke the second token after it was verified (and cached).
    std::fs::write(&revoked, "jti-one\njti-two\n").unwrap();
    let refused = eventually(Duration::from_secs(6), async || {
        server.check(with_token(&t2)).await.reason == "jwt_revoked"
    })
    .await;
    assert!(refused, "a cached token is refused once its jti is revoked");
    server.stop().await;
}

#[tokio::test]
async fn issuer_selects_the_provider_and_hmac_needs_a_secret() {
    let k = Keys::generate(Algorithm::RS256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hs.key");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef-secret").unwrap();
    let yaml = format!(
        r#"{}    - name: internal
      issuer: "https://internal.test"
      hmac_secret_file: "{}"
      algorithms: ["HS256"]
"#,
        provider(&jwks.uri(), ""),
        secret.display()
    );
    let (server, _dir2) = token_server(&yaml).await;

    let corp = server.check(with_token(&k.sign(&claims("a", "")))).await;
    assert_eq!(corp.header("x-provider"), Some("corp"));

    let mut c = claims("svc", "");
    c["iss"] = json!("https://internal.test");
    let hs = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &c,
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef-secret"),
    )
    .unwrap();
    let internal = server.check(with_token(&hs)).await;
    assert_eq!(
        internal.header("x-provider"),
        Some("internal"),
        "{internal:?}"
    );

    // An HS256 token for the corp issuer: corp does not allow HS256.
    let hs_corp = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims("x", ""),
        &jsonwebtoken::EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef-secret"),
    )
    .unwrap();
    assert_eq!(
        server.check(with_token(&hs_corp)).await.reason,
        "jwt_disallowed_algorithm"
    );

    // An RS256 token for an issuer nobody configured.
    let mut c = claims("x", "");
    c["iss"] = json!("https://stranger.test");
    assert_eq!(
        server.check(with_token(&k.sign(&c))).await.reason,
        "jwt_unknown_issuer"
    );
    server.stop().await;
}

#[tokio::test]
async fn the_same_token_is_verified_once() {
    let k = Keys::generate(Algorithm::RS256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let (server, _dir) = token_server(&provider(&jwks.uri(), "")).await;
    let (t, other) = (k.sign(&claims("a", "")), k.sign(&claims("b", "")));
    for _ in 0..5 {
        assert!(server.check(with_token(&t)).await.allowed);
    }
    assert!(server.check(with_token(&other)).await.allowed);
    let (_, metrics) = server.get("/metrics").await;
    assert!(
        metrics.contains(r#"meshauthz_jwt_validations_total{provider="corp",result="ok"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshauthz_jwt_cache_entries 2\n"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn claim_headers_cannot_be_forged() {
    let k = Keys::generate(Algorithm::RS256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let (server, _dir) = token_server(&provider(&jwks.uri(), "")).await;
    let req = Req {
        method: "GET",
        path: "/",
        ..Default::default()
    }
    .header("x-jwt-sub", "admin")
    .bearer(&k.sign(&claims("alice", "")));
    let got = server.check(req.build()).await;
    // Overwrite, not append: the upstream sees exactly one value, the verified one.
    assert_eq!(got.headers["x-jwt-sub"], vec![("alice".to_string(), 2)]);
    server.stop().await;
}

#[tokio::test]
async fn oidc_discovery_finds_the_jwks() {
    let k = Keys::generate(Algorithm::EdDSA, "ed");
    let jwks = JwksServer::start(&[&k]).await;
    let issuer = format!("http://{}", jwks.addr);
    let yaml = format!(
        "  providers:\n    - name: oidc\n      issuer: \"{issuer}\"\n      jwks: {{ discovery: true }}\n"
    );
    let (server, _dir) = token_server(&yaml).await;
    let mut c = claims("alice", "");
    c["iss"] = json!(issuer);
    let got = server.check(with_token(&k.sign(&c))).await;
    assert!(got.allowed, "{got:?}");
    assert_eq!(got.header("x-provider"), Some("oidc"));
    server.stop().await;
}

#[tokio::test]
async fn jwks_file_source_and_a_garbage_jwks() {
    let k = Keys::generate(Algorithm::ES384, "file-key");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    std::fs::write(&file, jwks_body(&[&k])).unwrap();
    let yaml = format!(
        "  providers:\n    - name: corp\n      issuer: \"{ISSUER}\"\n      jwks: {{ file: \"{}\" }}\n",
        file.display()
    );
    let (server, _dir) = token_server(&yaml).await;
    assert!(
        server
            .check(with_token(&k.sign(&claims("a", ""))))
            .await
            .allowed
    );
    server.stop().await;

    // A JWKS endpoint answering garbage: no keys, a clear reason, the server keeps running.
    let jwks = JwksServer::start(&[]).await;
    jwks.set_body("<html>not json</html>");
    let (server, _dir) = token_server(&provider(&jwks.uri(), r#", max_wait: "300ms""#)).await;
    let got = server.check(with_token(&k.sign(&claims("a", "")))).await;
    assert_eq!(got.reason, "jwt_keys_unavailable");
    let (_, ready) = server.get("/readyz").await;
    assert!(ready.contains("JWKS is not JSON"), "{ready}");
    server.stop().await;
}

#[tokio::test]
async fn a_slow_or_hanging_jwks_never_holds_requests_past_the_budget() {
    let old = Keys::generate(Algorithm::ES256, "old");
    let new = Keys::generate(Algorithm::ES256, "new");
    let jwks = JwksServer::start(&[&old]).await;
    let (server, _dir) = token_server(&provider(
        &jwks.uri(),
        r#", max_wait: "200ms", fetch_timeout: "1s""#,
    ))
    .await;
    assert!(
        server
            .check(with_token(&old.sign(&claims("a", ""))))
            .await
            .allowed
    );

    // The issuer hangs (longer than fetch_timeout) while a token with a new kid arrives.
    jwks.set_keys(&[&old, &new]);
    jwks.set_delay(Duration::from_secs(30));
    let started = std::time::Instant::now();
    let got = server.check(with_token(&new.sign(&claims("b", "")))).await;
    let waited = started.elapsed();
    assert_eq!((got.status, got.reason.as_str()), (401, "jwt_unknown_key"));
    // Bounded by max_wait (generous margin for a loaded CI machine, still far below the hang).
    assert!(waited < Duration::from_secs(5), "waited {waited:?}");
    // Cached keys keep serving meanwhile.
    assert!(
        server
            .check(with_token(&old.sign(&claims("c", ""))))
            .await
            .allowed
    );
    // The hung fetch times out and is counted.
    let counted = eventually(Duration::from_secs(5), async || {
        server
            .get("/metrics")
            .await
            .1
            .contains(r#"meshauthz_jwks_fetches_total{provider="corp",result="error"}"#)
    })
    .await;
    assert!(counted, "a fetch past fetch_timeout counts as an error");
    server.stop().await;
}

#[tokio::test]
async fn an_oversized_jwks_is_refused() {
    let k = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    // A valid JWKS padded past the 1 MiB cap.
    let mut doc: serde_json::Value = serde_json::from_str(&jwks_body(&[&k])).unwrap();
    doc["padding"] = json!("x".repeat(2 * 1024 * 1024));
    jwks.set_body(&doc.to_string());
    let (server, _dir) = token_server(&provider(&jwks.uri(), r#", max_wait: "500ms""#)).await;
    let got = server.check(with_token(&k.sign(&claims("a", "")))).await;
    assert_eq!(got.reason, "jwt_keys_unavailable");
    let (_, ready) = server.get("/readyz").await;
    assert!(ready.contains("larger than 1048576 bytes"), "{ready}");
    server.stop().await;
}

/// Registered claims of the wrong type, a missing audience and critical header extensions are
/// refusals: a validator that skips a claim of the wrong type skips its check too.
#[tokio::test]
async fn registered_claims_must_have_their_types_and_crit_is_refused() {
    let k = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let (server, _dir) = token_server(&provider(&jwks.uri(), "")).await;
    let with = |key: &str, value: serde_json::Value| {
        let mut c = claims("alice", "");
        match value {
            serde_json::Value::Null if key.starts_with('-') => {
                c.as_object_mut().unwrap().remove(&key[1..]);
            }
            v => c[key] = v,
        }
        c
    };
    // (note, claims, reason)
    let cases: Vec<(&str, serde_json::Value, &str)> = vec![
        (
            "aud absent",
            with("-aud", json!(null)),
            "jwt_wrong_audience",
        ),
        ("aud null", with("aud", json!(null)), "jwt_malformed"),
        ("aud a number", with("aud", json!(7)), "jwt_malformed"),
        (
            "aud an object",
            with("aud", json!({"shop-api": true})),
            "jwt_malformed",
        ),
        (
            "aud an empty array",
            with("aud", json!([])),
            "jwt_malformed",
        ),
        (
            "aud an array with a number",
            with("aud", json!([AUDIENCE, 1])),
            "jwt_malformed",
        ),
        (
            "aud another audience",
            with("aud", json!("billing")),
            "jwt_wrong_audience",
        ),
        ("iss a number", with("iss", json!(1)), "jwt_malformed"),
        (
            "iss an array",
            with("iss", json!([ISSUER])),
            "jwt_malformed",
        ),
        (
            "exp a string",
            with("exp", json!((now() + 600).to_string())),
            "jwt_malformed",
        ),
        ("nbf a string", with("nbf", json!("0")), "jwt_malformed"),
        ("iat an object", with("iat", json!({})), "jwt_malformed"),
        ("jti a number", with("jti", json!(123)), "jwt_malformed"),
    ];
    for (note, c, reason) in &cases {
        let got = server.check(with_token(&k.sign(c))).await;
        assert_eq!(
            (got.allowed, got.status, got.reason.as_str()),
            (false, 401, *reason),
            "{note}"
        );
    }
    for crit in [json!(["exp"]), json!([]), json!(["b64"])] {
        let token = k.sign_with_header(&json!({"crit": crit, "exp": 1}), &claims("alice", ""));
        let got = server.check(with_token(&token)).await;
        assert_eq!(
            (got.status, got.reason.as_str()),
            (401, "jwt_malformed"),
            "crit {crit}"
        );
    }
    // The correct types still pass: aud as an array holding the audience.
    let ok = with("aud", json!(["other", AUDIENCE]));
    assert!(server.check(with_token(&k.sign(&ok))).await.allowed);
    let ok = k.sign_with_header(&json!({}), &claims("alice", ""));
    assert!(server.check(with_token(&ok)).await.allowed);
    server.stop().await;
}

/// A fractional `exp` ends the token at that instant, from the cache too.
#[tokio::test]
async fn a_fractional_exp_expires_the_cached_token_on_time() {
    let k = Keys::generate(Algorithm::ES256, "k");
    let jwks = JwksServer::start(&[&k]).await;
    let yaml = provider(&jwks.uri(), "").replace(
        "      claims_to_headers",
        "      clock_skew: 0s\n      claims_to_headers",
    );
    let (server, _dir) = token_server(&yaml).await;
    let mut c = claims("alice", "");
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
        + 2.5;
    c["exp"] = json!(exp);
    let token = k.sign(&c);
    assert!(server.check(with_token(&token)).await.allowed, "valid now");
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let got = server.check(with_token(&token)).await;
    assert_eq!((got.status, got.reason.as_str()), (401, "jwt_expired"));
    server.stop().await;
}
