//! Our own view of an authorization request, independent of protobuf.
//!
//! The gRPC edge converts Envoy's `CheckRequest` into [`Attributes`] once (see `server`), and the
//! offline `eval` command deserializes the same type from protojson. Both then feed the same input
//! builder, so a policy sees identical documents whichever way a request arrived. Field names
//! and omission rules follow protojson (lowerCamelCase, empty scalars omitted, 64-bit integers as
//! strings) because that is what OPA-Envoy hands to its policies.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `envoy.service.auth.v3.AttributeContext`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Attributes {
    pub source: Option<Peer>,
    pub destination: Option<Peer>,
    pub request: Option<Request>,
    pub context_extensions: BTreeMap<String, String>,
    /// `metadataContext` as protojson (a `Metadata` message).
    pub metadata_context: Option<serde_json::Value>,
    pub route_metadata_context: Option<serde_json::Value>,
    pub tls_session: Option<TlsSession>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Peer {
    pub address: Option<Address>,
    pub service: String,
    pub labels: BTreeMap<String, String>,
    pub principal: String,
    pub certificate: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Address {
    SocketAddress(SocketAddress),
    Pipe(Pipe),
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct SocketAddress {
    pub address: String,
    pub port_value: u32,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Pipe {
    pub path: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct Request {
    /// RFC 3339 timestamp, as protojson renders `google.protobuf.Timestamp`.
    pub time: Option<String>,
    pub http: Option<HttpRequest>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct HttpRequest {
    pub id: String,
    pub method: String,
    /// Lower-case header names; Envoy joins repeated headers with `,`.
    pub headers: BTreeMap<String, String>,
    pub path: String,
    pub host: String,
    pub scheme: String,
    pub query: String,
    pub fragment: String,
    #[serde(deserialize_with = "de_int64")]
    pub size: i64,
    pub protocol: String,
    pub body: String,
    /// Base64, as protojson renders `bytes`.
    pub raw_body: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct TlsSession {
    pub sni: String,
}

/// A protojson `CheckRequest` (`{"attributes": {...}}`) or an OPA-Envoy input document, which
/// carries the same `attributes` plus derived keys that are recomputed here.
#[derive(Debug, Deserialize)]
pub struct CheckRequestJson {
    pub attributes: Attributes,
}

/// protojson renders int64 as a string, but hand-written inputs often use a number.
fn de_int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        N(i64),
        S(String),
    }
    match Int::deserialize(d)? {
        Int::N(n) => Ok(n),
        Int::S(s) => s.parse().map_err(serde::de::Error::custom),
    }
}

impl Attributes {
    pub fn http(&self) -> Option<&HttpRequest> {
        self.request.as_ref().and_then(|r| r.http.as_ref())
    }

    pub fn http_mut(&mut self) -> Option<&mut HttpRequest> {
        self.request.as_mut().and_then(|r| r.http.as_mut())
    }

    /// The downstream peer's principal (a SPIFFE ID in a mesh), if any.
    pub fn source_principal(&self) -> Option<&str> {
        self.source
            .as_ref()
            .map(|p| p.principal.as_str())
            .filter(|p| !p.is_empty())
    }
}
