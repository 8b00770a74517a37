//! Bearer tokens: extraction from headers and verification (HMAC provider, so no network), on
//! arbitrary bytes. Never panics; nothing but a correctly signed token verifies.
#![no_main]
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshauthz::jwt::{Config, FromHeader, ProviderConfig, Verifier};
use meshauthz::telemetry::Metrics;

fn verifier() -> &'static (Verifier, tokio::runtime::Runtime) {
    static V: OnceLock<(Verifier, tokio::runtime::Runtime)> = OnceLock::new();
    V.get_or_init(|| {
        let provider = ProviderConfig {
            name: "fuzz".into(),
            issuer: "https://issuer.fuzz".into(),
            audiences: vec!["api".into()],
            jwks: None,
            hmac_secret: Some(b"fuzzing-secret-fuzzing-secret-32b".to_vec()),
            algorithms: vec![jsonwebtoken::Algorithm::HS256],
            from_headers: vec![FromHeader { name: "authorization".into(), prefix: "Bearer ".into() }],
            claims_to_headers: Vec::new(),
            forward_token: true,
            clock_skew: Duration::from_secs(30),
        };
        let config = Config { providers: vec![provider], revocation_file: None, cache_capacity: 0, max_claims_depth: 16 };
        let v = Verifier::new(&config, Arc::new(Metrics::new())).expect("verifier");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        (v, rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let (v, rt) = verifier();
    let mut headers = BTreeMap::new();
    headers.insert("authorization".to_string(), format!("Bearer {s}"));
    if let Ok(Some(found)) = v.extract(&headers, 8192) {
        // Random bytes are never a valid HS256 signature under the secret.
        assert!(rt.block_on(v.verify_uncached(&found.token)).is_err());
    }
});
