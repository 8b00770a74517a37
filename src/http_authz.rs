//! The HTTP ext_authz mode: Envoy's `http_service` (Istio's `envoyExtAuthzHttp`) sends a copy of
//! the request's method, path (after the configured prefix) and allowed headers; the answer is a
//! plain HTTP response. The same pipeline as gRPC decides it.
//!
//! Mapping (Envoy's `http_service` semantics):
//! - allow → 200; the decision's headers are response headers, which Envoy copies to the upstream
//!   request when `authorization_response.allowed_upstream_headers` matches them; headers the
//!   upstream must not see are listed in `x-envoy-auth-headers-to-remove` (configured claim headers
//!   the token did not fill are always listed, since Envoy may not have sent us the client's copy);
//! - deny → the decision's status, headers and body, which Envoy relays to the client.
//!
//! The peer identity comes from `x-forwarded-client-cert` only when `trusted_xfcc` is set: the
//! header is only trustworthy when the proxy in front sets it itself (`SANITIZE_SET`, or
//! `APPEND_FORWARD`, whose last element is the proxy's own view of its client — the one used here)
//! and nothing else can reach this listener.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use serde::Deserialize;

use crate::app::App;
use crate::config::{self, Ctx};
use crate::decision::Decision;
use crate::identity::xfcc;
use crate::request::{Attributes, HttpRequest, Peer, Request};

/// Header naming the decision, on every answer.
pub const DECISION_ID_HEADER: &str = "x-meshauthz-decision-id";
/// Envoy removes the headers listed here from the upstream request.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// Validated `server.http_authz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub enabled: bool,
    /// Envoy's `http_service.path_prefix`; the original path follows it.
    pub path_prefix: String,
    /// Take the peer identity from `x-forwarded-client-cert`.
    pub trusted_xfcc: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            enabled: false,
            path_prefix: "/authz".into(),
            trusted_xfcc: false,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    enabled: bool,
    path_prefix: Option<String>,
    #[serde(default)]
    trusted_xfcc: bool,
}

impl RawConfig {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Config, config::Error> {
        let prefix = self
            .path_prefix
            .unwrap_or_else(|| Config::default().path_prefix);
        let reserved = ["/healthz", "/readyz", "/metrics"];
        if !prefix.starts_with('/')
            || prefix.len() < 2
            || prefix.ends_with('/')
            || prefix.contains(['{', '}', '*', '?', '#'])
            || reserved.iter().any(|r| prefix.starts_with(r))
        {
            return Err(ctx.err(
                "server.http_authz.path_prefix",
                format!(
                    "expected a path such as \"/authz\" (leading '/', no trailing '/', not /healthz, /readyz or /metrics), got {prefix:?}"
                ),
            ));
        }
        Ok(Config {
            enabled: self.enabled,
            path_prefix: prefix,
            trusted_xfcc: self.trusted_xfcc,
        })
    }
}

/// Handles one authorization request from Envoy's `http_service`.
pub async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let cfg = &app.config.server.http_authz;
    let attrs = match attributes(cfg, &method, &uri, &headers) {
        Ok(a) => a,
        Err(detail) => return respond(&Decision::bad_request(detail), "", &[]),
    };
    let checked = app.authz.check(attrs).await;
    let claim_headers: Vec<&str> = app.authz.jwt.claim_header_names().collect();
    respond(&checked.decision, &checked.decision_id, &claim_headers)
}

/// The request Envoy asked about, as our attributes.
fn attributes(
    cfg: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Attributes, String> {
    let full = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = full.strip_prefix(cfg.path_prefix.as_str()).unwrap_or(full);
    let path = if path.is_empty() || path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let mut map: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        // hyper's names are lower case already.
        crate::request::join_header(&mut map, name.as_str().to_string(), value);
    }
    let principal = if cfg.trusted_xfcc {
        match map.get("x-forwarded-client-cert") {
            Some(h) => xfcc::client_uri(h)
                .map_err(|e| e.to_string())?
                .unwrap_or_default(),
            None => String::new(),
        }
    } else {
        String::new()
    };
    let host = map.get("host").cloned().unwrap_or_default();
    Ok(Attributes {
        source: Some(Peer {
            principal,
            ..Peer::default()
        }),
        request: Some(Request {
            time: None,
            http: Some(HttpRequest {
                method: method.as_str().to_string(),
                path,
                host,
                headers: map,
                ..HttpRequest::default()
            }),
        }),
        ..Attributes::default()
    })
}

fn respond(d: &Decision, decision_id: &str, claim_headers: &[&str]) -> Response {
    let status = if d.allowed {
        StatusCode::OK
    } else {
        StatusCode::from_u16(d.status).unwrap_or(StatusCode::FORBIDDEN)
    };
    let mut resp = Response::new(Body::from(if d.allowed {
        String::new()
    } else {
        d.body.clone()
    }));
    *resp.status_mut() = status;
    let out = resp.headers_mut();
    let mut add = |name: &str, value: &str| {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            out.append(n, v);
        }
    };
    for h in &d.headers {
        add(&h.name, &h.value);
    }
    if d.allowed {
        for h in &d.response_headers_to_add {
            add(&h.name, &h.value);
        }
        let mut remove: Vec<&str> = d
            .request_headers_to_remove
            .iter()
            .map(String::as_str)
            .collect();
        for name in claim_headers {
            if !d.headers.iter().any(|h| h.name.eq_ignore_ascii_case(name))
                && !remove.contains(name)
            {
                remove.push(name);
            }
        }
        if !remove.is_empty() {
            add(HEADERS_TO_REMOVE, &remove.join(","));
        }
    }
    if !decision_id.is_empty() {
        add(DECISION_ID_HEADER, decision_id);
    }
    resp
}
