//! Building the policy input document.
//!
//! The shape is OPA-Envoy's v3 input (so its policies run unchanged) plus our own `peer` and `jwt`:
//!
//! ```json
//! {
//!   "attributes":   { ...CheckRequest attributes in protojson... },
//!   "parsed_path":  ["api", "v1", "orders"],
//!   "parsed_query": {"limit": ["10"]},
//!   "parsed_body":  null,
//!   "truncated_body": false,
//!   "version":      {"ext_authz": "v3", "encoding": "protojson"},
//!   "peer":         {"spiffe_id": "...", "trust_domain": "...", "namespace": "...",
//!                    "service_account": "...", "istio_principal": "..."},
//!   "jwt":          {"provider": "...", "header": {...}, "claims": {...}}
//! }
//! ```
//!
//! The document is built as a regorus [`Value`] directly: no JSON text and no serde round trip on
//! the request path.

use std::collections::BTreeMap;

use regorus::Value;

use crate::identity::SpiffeId;
use crate::path::ParsedTarget;
use crate::request::{Address, Attributes, HttpRequest, Peer};

/// Every fixed key of the document, made once per worker thread: a document has ~45 of them,
/// and cloning a prebuilt string value is a reference-count bump where `Value::from(&str)` is an
/// allocation and a copy. Thread-local, so workers never contend on one reference count.
macro_rules! keys {
    ($($name:ident),* $(,)?) => {
        #[allow(non_camel_case_types)]
        #[derive(Clone, Copy)]
        enum K { $($name),* }

        thread_local! {
            static KEYS: Vec<Value> = vec![$(Value::from(stringify!($name))),*];
            /// `input.version`, the same for every request.
            static VERSION: Value = {
                let mut v = Value::new_object();
                if let Ok(m) = v.as_object_mut() {
                    m.insert(Value::from("ext_authz"), Value::from("v3"));
                    m.insert(Value::from("encoding"), Value::from("protojson"));
                }
                v
            };
        }
    };
}

keys!(
    address,
    attributes,
    body,
    certificate,
    contextExtensions,
    destination,
    fragment,
    headers,
    host,
    http,
    id,
    jwt,
    labels,
    metadataContext,
    method,
    namespace,
    parsed_body,
    parsed_path,
    parsed_query,
    path,
    peer,
    pipe,
    portValue,
    principal,
    protocol,
    query,
    rawBody,
    request,
    routeMetadataContext,
    scheme,
    service,
    service_account,
    size,
    sni,
    socketAddress,
    source,
    spiffe_id,
    time,
    tlsSession,
    truncated_body,
    trust_domain,
    istio_principal,
    version,
);

fn key(k: K) -> Value {
    KEYS.with(|keys| keys.get(k as usize).cloned().unwrap_or(Value::Null))
}

/// Appends `key: value` to an object value.
fn put(obj: &mut Value, k: K, value: Value) {
    if let Ok(map) = obj.as_object_mut() {
        map.insert(key(k), value);
    }
}

/// Appends `key: value` unless `value` is empty (protojson omits default scalars).
fn put_str(obj: &mut Value, k: K, value: &str) {
    if !value.is_empty() {
        put(obj, k, Value::from(value));
    }
}

fn string_map(map: &BTreeMap<String, String>) -> Value {
    let mut obj = Value::new_object();
    if let Ok(m) = obj.as_object_mut() {
        for (k, v) in map {
            m.insert(Value::from(k.as_str()), Value::from(v.as_str()));
        }
    }
    obj
}

fn peer(p: &Peer) -> Value {
    let mut obj = Value::new_object();
    if let Some(addr) = &p.address {
        let mut a = Value::new_object();
        match addr {
            Address::SocketAddress(sa) => {
                let mut s = Value::new_object();
                put_str(&mut s, K::address, &sa.address);
                if sa.port_value != 0 {
                    put(&mut s, K::portValue, Value::from(sa.port_value));
                }
                put(&mut a, K::socketAddress, s);
            }
            Address::Pipe(pipe) => {
                let mut s = Value::new_object();
                put_str(&mut s, K::path, &pipe.path);
                put(&mut a, K::pipe, s);
            }
        }
        put(&mut obj, K::address, a);
    }
    put_str(&mut obj, K::service, &p.service);
    if !p.labels.is_empty() {
        put(&mut obj, K::labels, string_map(&p.labels));
    }
    put_str(&mut obj, K::principal, &p.principal);
    put_str(&mut obj, K::certificate, &p.certificate);
    obj
}

fn http(h: &HttpRequest) -> Value {
    let mut obj = Value::new_object();
    put_str(&mut obj, K::id, &h.id);
    put_str(&mut obj, K::method, &h.method);
    if !h.headers.is_empty() {
        put(&mut obj, K::headers, string_map(&h.headers));
    }
    put_str(&mut obj, K::path, &h.path);
    put_str(&mut obj, K::host, &h.host);
    put_str(&mut obj, K::scheme, &h.scheme);
    put_str(&mut obj, K::query, &h.query);
    put_str(&mut obj, K::fragment, &h.fragment);
    if h.size != 0 {
        // protojson renders int64 as a string.
        put(&mut obj, K::size, Value::from(h.size.to_string()));
    }
    put_str(&mut obj, K::protocol, &h.protocol);
    put_str(&mut obj, K::body, &h.body);
    put_str(&mut obj, K::rawBody, &h.raw_body);
    obj
}

/// `input.attributes`: the attributes in protojson form.
pub fn attributes(a: &Attributes) -> Value {
    let mut obj = Value::new_object();
    if let Some(p) = &a.source {
        put(&mut obj, K::source, peer(p));
    }
    if let Some(p) = &a.destination {
        put(&mut obj, K::destination, peer(p));
    }
    if let Some(r) = &a.request {
        let mut req = Value::new_object();
        if let Some(t) = &r.time {
            put(&mut req, K::time, Value::from(t.as_str()));
        }
        if let Some(h) = &r.http {
            put(&mut req, K::http, http(h));
        }
        put(&mut obj, K::request, req);
    }
    if !a.context_extensions.is_empty() {
        put(
            &mut obj,
            K::contextExtensions,
            string_map(&a.context_extensions),
        );
    }
    if let Some(m) = &a.metadata_context {
        put(&mut obj, K::metadataContext, Value::from(m.clone()));
    }
    if let Some(m) = &a.route_metadata_context {
        put(&mut obj, K::routeMetadataContext, Value::from(m.clone()));
    }
    if let Some(t) = &a.tls_session {
        let mut s = Value::new_object();
        put_str(&mut s, K::sni, &t.sni);
        put(&mut obj, K::tlsSession, s);
    }
    obj
}

/// `input.peer` for a SPIFFE principal.
pub fn peer_identity(id: &SpiffeId) -> Value {
    let mut obj = Value::new_object();
    put(&mut obj, K::spiffe_id, Value::from(id.to_string()));
    put(&mut obj, K::trust_domain, Value::from(id.trust_domain()));
    if let Some((ns, sa)) = id.istio_workload() {
        put(&mut obj, K::namespace, Value::from(ns));
        put(&mut obj, K::service_account, Value::from(sa));
    }
    put(
        &mut obj,
        K::istio_principal,
        Value::from(id.istio_principal()),
    );
    obj
}

/// Everything besides the attributes that goes into the document.
#[derive(Debug, Default)]
pub struct Extras<'a> {
    pub target: Option<&'a ParsedTarget>,
    pub peer: Option<&'a SpiffeId>,
    /// The verified token document (`{"provider", "header", "claims"}`), prebuilt and cached.
    pub jwt: Option<Value>,
    pub parsed_body: Option<Value>,
    pub truncated_body: bool,
}

/// The whole input document.
pub fn document(attrs: &Attributes, extras: Extras<'_>) -> Value {
    let mut doc = Value::new_object();
    put(&mut doc, K::attributes, attributes(attrs));
    if let Some(t) = extras.target {
        let segments: Vec<Value> = t.segments.iter().map(|s| Value::from(s.as_str())).collect();
        put(&mut doc, K::parsed_path, Value::from(segments));
        let mut q = Value::new_object();
        if let Ok(m) = q.as_object_mut() {
            for (k, vs) in &t.query {
                let vs: Vec<Value> = vs.iter().map(|v| Value::from(v.as_str())).collect();
                m.insert(Value::from(k.as_str()), Value::from(vs));
            }
        }
        put(&mut doc, K::parsed_query, q);
    }
    put(
        &mut doc,
        K::parsed_body,
        extras.parsed_body.unwrap_or(Value::Null),
    );
    put(
        &mut doc,
        K::truncated_body,
        Value::from(extras.truncated_body),
    );
    put(&mut doc, K::version, VERSION.with(Value::clone));
    if let Some(id) = extras.peer {
        put(&mut doc, K::peer, peer_identity(id));
    }
    if let Some(jwt) = extras.jwt {
        put(&mut doc, K::jwt, jwt);
    }
    doc
}

/// `input.parsed_body` and `input.truncated_body`.
#[derive(Debug, Default)]
pub struct Body {
    pub parsed: Option<Value>,
    pub truncated: bool,
}

/// `parsed_body` as OPA-Envoy derives it: JSON bodies only, and only when complete. A body that
/// Envoy cut (`x-envoy-auth-partial-body: true`, or shorter than its `content-length`), or that
/// is larger or deeper than the limits, is not parsed and reported as truncated, so a policy
/// that needs its fields fails closed. A body that is not valid JSON is `null`.
pub fn parsed_body(h: &HttpRequest, limits: &crate::limits::Limits) -> Body {
    let is_json = h
        .headers
        .get("content-type")
        .is_some_and(|ct| is_json_media_type(ct));
    if !is_json || h.body.is_empty() {
        return Body::default();
    }
    let truncated = Body {
        parsed: None,
        truncated: true,
    };
    if h.headers
        .get("x-envoy-auth-partial-body")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        return truncated;
    }
    if let Some(len) = h
        .headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        && len > h.body.len()
    {
        return truncated;
    }
    if h.body.len() > limits.max_body_bytes
        || crate::jwt::bracket_depth(h.body.as_bytes()) > limits.max_body_depth
    {
        return truncated;
    }
    Body {
        parsed: Value::from_json_str(&h.body).ok(),
        truncated: false,
    }
}

/// `application/json` or `application/<x>+json`, in any case, with any parameters.
fn is_json_media_type(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.ends_with("+json"))
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)], body: &str) -> HttpRequest {
        HttpRequest {
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            body: body.to_string(),
            ..HttpRequest::default()
        }
    }

    #[test]
    fn parsed_body_table() {
        let limits = crate::limits::Limits {
            max_body_bytes: 64,
            max_body_depth: 3,
            ..Default::default()
        };
        let deep = format!("{}1{}", "[".repeat(4), "]".repeat(4));
        let big = format!("{{\"a\": \"{}\"}}", "x".repeat(80));
        // (headers, body, parsed?, truncated)
        let cases: &[(&[(&str, &str)], &str, bool, bool)] = &[
            (
                &[("content-type", "application/json")],
                r#"{"a":1}"#,
                true,
                false,
            ),
            (
                &[("content-type", "Application/JSON; charset=utf-8")],
                r#"{"a":1}"#,
                true,
                false,
            ),
            (
                &[("content-type", "application/problem+json")],
                r#"{"a":1}"#,
                true,
                false,
            ),
            (
                &[("content-type", "text/plain")],
                r#"{"a":1}"#,
                false,
                false,
            ),
            (
                &[("content-type", "application/jsonx")],
                r#"{"a":1}"#,
                false,
                false,
            ),
            (
                &[("content-type", "application/json")],
                "not json",
                false,
                false,
            ),
            (
                &[
                    ("content-type", "application/json"),
                    ("x-envoy-auth-partial-body", "true"),
                ],
                r#"{"a":1}"#,
                false,
                true,
            ),
            (
                &[
                    ("content-type", "application/json"),
                    ("x-envoy-auth-partial-body", "false"),
                ],
                r#"{"a":1}"#,
                true,
                false,
            ),
            (
                &[
                    ("content-type", "application/json"),
                    ("content-length", "99"),
                ],
                r#"{"a":1}"#,
                false,
                true,
            ),
            (&[("content-type", "application/json")], &big, false, true),
            (&[("content-type", "application/json")], &deep, false, true),
            (
                &[("content-type", "application/json")],
                "[[1]]",
                true,
                false,
            ),
        ];
        for (headers, body, parsed, truncated) in cases {
            let got = parsed_body(&req(headers, body), &limits);
            assert_eq!(
                (got.parsed.is_some(), got.truncated),
                (*parsed, *truncated),
                "{headers:?} {body}"
            );
        }
    }
}
