//! `meshauthz demo-token`: a token the bundled demo issuer would sign, for trying things out.
//!
//! The demo issuer's private key is in the repository (`config/demo/signing-key.pem`), which is
//! why the bundled config listens on loopback only. Nothing here is for production use.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::jwt::{JwksSource, ProviderConfig};

/// What `demo-token` cannot do, each naming what it needed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no jwt provider {0:?} in the config")]
    NoProvider(String),
    #[error(
        "provider {0:?} has no JWKS file to read the key id from (demo-token signs for file-based demo issuers)"
    )]
    NoJwksFile(String),
    #[error("{path}: {message}")]
    Key { path: PathBuf, message: String },
}

/// What to put in the token.
#[derive(Debug, Clone)]
pub struct Request {
    pub sub: String,
    /// Space-separated, as the `scope` claim carries them.
    pub scopes: Vec<String>,
    pub ttl: Duration,
}

/// Signs a token for `provider` (its issuer, first audience and the first key id of its JWKS
/// file) with the PEM private key at `key`.
pub fn token(
    providers: &[ProviderConfig],
    provider: &str,
    key: &Path,
    req: &Request,
) -> Result<String, Error> {
    let p = providers
        .iter()
        .find(|p| p.name == provider)
        .ok_or_else(|| Error::NoProvider(provider.to_string()))?;
    let Some(JwksSource::File(jwks_file)) = p.jwks.as_ref().map(|j| &j.source) else {
        return Err(Error::NoJwksFile(provider.to_string()));
    };
    let key_err = |path: &Path, message: String| Error::Key {
        path: path.to_path_buf(),
        message,
    };
    let jwks: serde_json::Value = std::fs::read_to_string(jwks_file)
        .map_err(|e| key_err(jwks_file, e.to_string()))
        .and_then(|t| serde_json::from_str(&t).map_err(|e| key_err(jwks_file, e.to_string())))?;
    let first = jwks.get("keys").and_then(|k| k.get(0));
    let kid = first
        .and_then(|k| k.get("kid"))
        .and_then(|k| k.as_str())
        .map(str::to_owned);
    let alg = first
        .and_then(|k| k.get("alg"))
        .and_then(|a| a.as_str())
        .and_then(|a| a.parse::<jsonwebtoken::Algorithm>().ok())
        .or_else(|| p.algorithms.first().copied())
        .unwrap_or(jsonwebtoken::Algorithm::RS256);
    let pem = std::fs::read(key).map_err(|e| key_err(key, e.to_string()))?;
    let encoding = match alg {
        jsonwebtoken::Algorithm::ES256 | jsonwebtoken::Algorithm::ES384 => {
            jsonwebtoken::EncodingKey::from_ec_pem(&pem)
        }
        jsonwebtoken::Algorithm::EdDSA => jsonwebtoken::EncodingKey::from_ed_pem(&pem),
        _ => jsonwebtoken::EncodingKey::from_rsa_pem(&pem),
    }
    .map_err(|e| key_err(key, format!("not a {alg:?} private key: {e}")))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut claims = serde_json::json!({
        "iss": p.issuer,
        "sub": req.sub,
        "iat": now,
        "exp": now + req.ttl.as_secs(),
        "scope": req.scopes.join(" "),
    });
    if let (Some(aud), Some(obj)) = (p.audiences.first(), claims.as_object_mut()) {
        obj.insert("aud".into(), serde_json::Value::from(aud.as_str()));
    }
    let mut header = jsonwebtoken::Header::new(alg);
    header.kid = kid;
    jsonwebtoken::encode(&header, &claims, &encoding)
        .map_err(|e| key_err(key, format!("cannot sign: {e}")))
}
