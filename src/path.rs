//! Request path and query parsing for `input.parsed_path` and `input.parsed_query`.
//!
//! Mirrors what OPA-Envoy derives with Go's `url.Parse`: the path (before `?` and `#`) is
//! percent-decoded, stripped of leading slashes and split on `/`; the query is decoded as a form
//! (`+` is a space) into `{name: [values]}`. Invalid percent-encoding is an error, which the
//! caller answers with a 400 denial.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid percent-encoding in path")]
    BadEncoding,
}

/// The decoded parts of a request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTarget {
    pub segments: Vec<String>,
    pub query: BTreeMap<String, Vec<String>>,
}

/// Splits `/a/b?x=1#frag` into decoded path segments and query parameters.
pub fn parse(target: &str) -> Result<ParsedTarget, Error> {
    let without_fragment = target.split_once('#').map_or(target, |(t, _)| t);
    let (path, query) = without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""));
    let decoded = decode(path)?;
    let segments = decoded
        .trim_start_matches('/')
        .split('/')
        .map(str::to_owned)
        .collect();
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !query.is_empty() {
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            params
                .entry(k.into_owned())
                .or_default()
                .push(v.into_owned());
        }
    }
    Ok(ParsedTarget {
        segments,
        query: params,
    })
}

/// Strict percent-decoding: `%` must be followed by two hex digits.
fn decode(path: &str) -> Result<String, Error> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let ok = bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit));
            if !ok {
                return Err(Error::BadEncoding);
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(percent_encoding::percent_decode_str(path)
        .decode_utf8_lossy()
        .into_owned())
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    #[test]
    fn parses_targets_table() {
        // (target, segments, query)
        let cases: &[(&str, &[&str], &[(&str, &[&str])])] = &[
            ("/", &[""], &[]),
            ("/api/v1/orders", &["api", "v1", "orders"], &[]),
            ("/api/v1/orders/", &["api", "v1", "orders", ""], &[]),
            ("//x", &["x"], &[]),
            ("/a%20b/c", &["a b", "c"], &[]),
            ("/p?x=1&x=2&y=", &["p"], &[("x", &["1", "2"]), ("y", &[""])]),
            ("/p?q=a+b%21", &["p"], &[("q", &["a b!"])]),
            ("/p#frag?not=query", &["p"], &[]),
            ("/p?x=1#frag", &["p"], &[("x", &["1"])]),
        ];
        for (target, segments, query) in cases {
            let got = parse(target).unwrap_or_else(|e| panic!("{target}: {e}"));
            assert_eq!(got.segments, *segments, "{target}");
            let want: BTreeMap<String, Vec<String>> = query
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect();
            assert_eq!(got.query, want, "{target}");
        }
    }

    #[test]
    fn rejects_invalid_percent_encoding() {
        for target in ["/a%zz", "/a%2", "/%", "/a%g0/b"] {
            assert_eq!(parse(target), Err(Error::BadEncoding), "{target}");
        }
    }
}
