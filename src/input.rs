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

/// Appends `key: value` to an object value.
fn put(obj: &mut Value, key: &str, value: Value) {
    if let Ok(map) = obj.as_object_mut() {
        map.insert(Value::from(key), value);
    }
}

/// Appends `key: value` unless `value` is empty (protojson omits default scalars).
fn put_str(obj: &mut Value, key: &str, value: &str) {
    if !value.is_empty() {
        put(obj, key, Value::from(value));
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
                put_str(&mut s, "address", &sa.address);
                if sa.port_value != 0 {
                    put(&mut s, "portValue", Value::from(sa.port_value));
                }
                put(&mut a, "socketAddress", s);
            }
            Address::Pipe(pipe) => {
                let mut s = Value::new_object();
                put_str(&mut s, "path", &pipe.path);
                put(&mut a, "pipe", s);
            }
        }
        put(&mut obj, "address", a);
    }
    put_str(&mut obj, "service", &p.service);
    if !p.labels.is_empty() {
        put(&mut obj, "labels", string_map(&p.labels));
    }
    put_str(&mut obj, "principal", &p.principal);
    put_str(&mut obj, "certificate", &p.certificate);
    obj
}

fn http(h: &HttpRequest) -> Value {
    let mut obj = Value::new_object();
    put_str(&mut obj, "id", &h.id);
    put_str(&mut obj, "method", &h.method);
    if !h.headers.is_empty() {
        put(&mut obj, "headers", string_map(&h.headers));
    }
    put_str(&mut obj, "path", &h.path);
    put_str(&mut obj, "host", &h.host);
    put_str(&mut obj, "scheme", &h.scheme);
    put_str(&mut obj, "query", &h.query);
    put_str(&mut obj, "fragment", &h.fragment);
    if h.size != 0 {
        // protojson renders int64 as a string.
        put(&mut obj, "size", Value::from(h.size.to_string()));
    }
    put_str(&mut obj, "protocol", &h.protocol);
    put_str(&mut obj, "body", &h.body);
    put_str(&mut obj, "rawBody", &h.raw_body);
    obj
}

/// `input.attributes`: the attributes in protojson form.
pub fn attributes(a: &Attributes) -> Value {
    let mut obj = Value::new_object();
    if let Some(p) = &a.source {
        put(&mut obj, "source", peer(p));
    }
    if let Some(p) = &a.destination {
        put(&mut obj, "destination", peer(p));
    }
    if let Some(r) = &a.request {
        let mut req = Value::new_object();
        if let Some(t) = &r.time {
            put(&mut req, "time", Value::from(t.as_str()));
        }
        if let Some(h) = &r.http {
            put(&mut req, "http", http(h));
        }
        put(&mut obj, "request", req);
    }
    if !a.context_extensions.is_empty() {
        put(
            &mut obj,
            "contextExtensions",
            string_map(&a.context_extensions),
        );
    }
    if let Some(m) = &a.metadata_context {
        put(&mut obj, "metadataContext", Value::from(m.clone()));
    }
    if let Some(m) = &a.route_metadata_context {
        put(&mut obj, "routeMetadataContext", Value::from(m.clone()));
    }
    if let Some(t) = &a.tls_session {
        let mut s = Value::new_object();
        put_str(&mut s, "sni", &t.sni);
        put(&mut obj, "tlsSession", s);
    }
    obj
}

/// `input.peer` for a SPIFFE principal.
pub fn peer_identity(id: &SpiffeId) -> Value {
    let mut obj = Value::new_object();
    put(&mut obj, "spiffe_id", Value::from(id.to_string()));
    put(&mut obj, "trust_domain", Value::from(id.trust_domain()));
    if let Some((ns, sa)) = id.istio_workload() {
        put(&mut obj, "namespace", Value::from(ns));
        put(&mut obj, "service_account", Value::from(sa));
    }
    put(
        &mut obj,
        "istio_principal",
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
    put(&mut doc, "attributes", attributes(attrs));
    if let Some(t) = extras.target {
        let segments: Vec<Value> = t.segments.iter().map(|s| Value::from(s.as_str())).collect();
        put(&mut doc, "parsed_path", Value::from(segments));
        let mut q = Value::new_object();
        if let Ok(m) = q.as_object_mut() {
            for (k, vs) in &t.query {
                let vs: Vec<Value> = vs.iter().map(|v| Value::from(v.as_str())).collect();
                m.insert(Value::from(k.as_str()), Value::from(vs));
            }
        }
        put(&mut doc, "parsed_query", q);
    }
    put(
        &mut doc,
        "parsed_body",
        extras.parsed_body.unwrap_or(Value::Null),
    );
    put(
        &mut doc,
        "truncated_body",
        Value::from(extras.truncated_body),
    );
    let mut version = Value::new_object();
    put(&mut version, "ext_authz", Value::from("v3"));
    put(&mut version, "encoding", Value::from("protojson"));
    put(&mut doc, "version", version);
    if let Some(id) = extras.peer {
        put(&mut doc, "peer", peer_identity(id));
    }
    if let Some(jwt) = extras.jwt {
        put(&mut doc, "jwt", jwt);
    }
    doc
}

/// `parsed_body` as OPA-Envoy derives it: JSON bodies only, and only when complete.
/// Returns `(parsed_body, truncated)`; a body that is not valid JSON is `None`.
pub fn parsed_body(h: &HttpRequest) -> (Option<Value>, bool) {
    let is_json = h
        .headers
        .get("content-type")
        .is_some_and(|ct| ct.contains("application/json"));
    if !is_json || h.body.is_empty() {
        return (None, false);
    }
    if let Some(len) = h
        .headers
        .get("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        && len > h.body.len()
    {
        return (None, true);
    }
    (Value::from_json_str(&h.body).ok(), false)
}
