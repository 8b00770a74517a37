//! Our own view of an authorization request, independent of protobuf.
//!
//! The gRPC edge converts Envoy's `CheckRequest` into [`Attributes`] once (see `server`), and the
//! offline `eval` command deserializes the same type from protojson. Both then feed the same input
//! builder, so a policy sees identical documents whichever way a request arrived. Field names
//! and omission rules follow protojson (lowerCamelCase, empty scalars omitted, 64-bit integers as
//! strings) because that is what OPA-Envoy hands to its policies.

use std::collections::{BTreeMap, HashMap};

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
    #[serde(deserialize_with = "de_headers")]
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

/// Header names as the upstream sees them: lower case, and names that differ only in case
/// joined with ',' (Envoy's rule for a repeated header). Envoy itself sends lower-case names;
/// a caller that does not must neither hide a token from the extractor (`Authorization`) nor
/// smuggle a second one past it (`authorization` and `AUTHORIZATION`).
pub fn lowercase_headers(headers: HashMap<String, String>) -> BTreeMap<String, String> {
    if !headers.keys().any(|k| has_upper(k)) {
        return headers.into_iter().collect();
    }
    fold_headers(headers.into_iter().collect())
}

/// Lower-cases and joins names, in sorted order so the joined order does not depend on the
/// source map's.
fn fold_headers(mut pairs: Vec<(String, String)>) -> BTreeMap<String, String> {
    pairs.sort_unstable();
    let mut out = BTreeMap::new();
    for (name, value) in pairs {
        join_header(&mut out, name.to_ascii_lowercase(), value);
    }
    out
}

fn has_upper(name: &str) -> bool {
    name.bytes().any(|b| b.is_ascii_uppercase())
}

/// `headers` of a protojson request (`meshauthz eval`, test inputs) get the same names as the
/// server gives a gRPC one.
fn de_headers<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<String, String>, D::Error> {
    let map = BTreeMap::<String, String>::deserialize(d)?;
    if !map.keys().any(|k| has_upper(k)) {
        return Ok(map);
    }
    Ok(fold_headers(map.into_iter().collect()))
}

/// Adds a header the way Envoy folds a repeated one: values joined with ','.
pub fn join_header(headers: &mut BTreeMap<String, String>, name: String, value: String) {
    headers
        .entry(name)
        .and_modify(|v| {
            v.push(',');
            v.push_str(&value);
        })
        .or_insert(value);
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

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::{CheckRequestJson, lowercase_headers};

    /// Header name → value pairs.
    type Headers<'a> = &'a [(&'a str, &'a str)];

    #[test]
    fn header_names_are_lowercased_and_case_variants_joined() {
        let cases: &[(Headers, Headers)] = &[
            (
                &[("authorization", "Bearer a"), ("x-b", "1")],
                &[("authorization", "Bearer a"), ("x-b", "1")],
            ),
            (
                &[("Authorization", "Bearer a")],
                &[("authorization", "Bearer a")],
            ),
            (
                &[("X-Jwt-Sub", "forged"), ("host", "h")],
                &[("host", "h"), ("x-jwt-sub", "forged")],
            ),
            (
                &[("authorization", "Bearer b"), ("AUTHORIZATION", "Bearer a")],
                &[("authorization", "Bearer a,Bearer b")],
            ),
            (
                &[("x-a", "3"), ("X-A", "1"), ("X-a", "2")],
                &[("x-a", "1,2,3")],
            ),
        ];
        for (input, want) in cases {
            let input: HashMap<String, String> = input
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect();
            let want: BTreeMap<String, String> = want
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect();
            assert_eq!(lowercase_headers(input.clone()), want, "{input:?}");
            // The protojson path (`meshauthz eval`) gives the same names.
            let json = serde_json::json!({"attributes": {"request": {"http": {"headers": input}}}});
            let parsed: CheckRequestJson = serde_json::from_value(json).unwrap();
            let http = parsed.attributes.request.and_then(|r| r.http).unwrap();
            assert_eq!(http.headers, want, "{input:?} as protojson");
        }
    }
}
