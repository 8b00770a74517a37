//! The HTTP ext_authz mode: Envoy's `http_service` (Istio's `envoyExtAuthzHttp`) sends a copy of
//! the request's method, path (after the configured prefix) and allowed headers; the answer is a
//! plain HTTP response. The same pipeline as gRPC decides it.
//!
//! Mapping (Envoy's `http_service` semantics):
//! - allow → 200; the decision's headers are response headers, which Envoy copies to the upstream
//!   request when `authorization_response.allowed_upstream_headers` matches them; headers the
//!   upstream must not see are listed in `x-envoy-auth-headers-to-remove` (configured claim headers
//!   the token did not fill are always listed, since Envoy may not have sent us the client's copy);
//! - deny → the decision's status (always 3xx–5xx: Envoy reads a 200 as an allow; a 5xx goes
//!   out as 403, because Envoy reads a 5xx as the server failing, which `failure_mode_allow`
//!   would turn into an allow), headers and body, which Envoy relays to the client;
//! - a decision this transport cannot carry out (a query rewrite) is an `invalid_decision`.
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
use crate::authz::{Context, Transport};
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
    let (attrs, malformed) = attributes(cfg, &method, &uri, &headers);
    // Envoy's http_service sends no grpc-timeout; when it says how long it waits, use that.
    let deadline = headers
        .get("x-envoy-expected-rq-timeout-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map(|ms| crate::authz::answer_by(std::time::Duration::from_millis(ms)));
    let ctx = Context {
        transport: Transport::Http,
        deadline,
        malformed,
        capture_input: false,
    };
    let checked = app.authz.check_with(attrs, ctx).await;
    respond(&checked.decision, &checked.decision_id)
}

/// The request Envoy asked about, as our attributes, and why it cannot be read if it cannot
/// (the pipeline denies it, so it is logged and counted like every other denial).
fn attributes(
    cfg: &Config,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> (Attributes, Option<String>) {
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
    let mut malformed = None;
    let principal = match map.get("x-forwarded-client-cert") {
        Some(h) if cfg.trusted_xfcc => match xfcc::client_uri(h) {
            Ok(uri) => uri.unwrap_or_default(),
            Err(e) => {
                malformed = Some(e.to_string());
                String::new()
            }
        },
        _ => String::new(),
    };
    let host = map.get("host").cloned().unwrap_or_default();
    let attrs = Attributes {
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
    };
    (attrs, malformed)
}

fn respond(d: &Decision, decision_id: &str) -> Response {
    let status = if d.allowed {
        StatusCode::OK
    } else if d.status >= 500 {
        // Envoy's http_service reads a 5xx from the authorization server as the server failing,
        // which `failure_mode_allow: true` turns into an allow. A denial must stay a denial:
        // 5xx denials (policy_error, invalid_decision…) go out as 403; the decision log keeps
        // the real status and reason.
        StatusCode::FORBIDDEN
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
    for h in &d.joined_headers() {
        add(&h.name, &h.value);
    }
    if d.allowed {
        for h in &d.response_headers_to_add {
            add(&h.name, &h.value);
        }
        // The pipeline has already listed every identity header it did not set.
        if !d.request_headers_to_remove.is_empty() {
            add(HEADERS_TO_REMOVE, &d.request_headers_to_remove.join(","));
        }
    }
    if !decision_id.is_empty() {
        add(DECISION_ID_HEADER, decision_id);
    }
    resp
}
