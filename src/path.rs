//! Request path and query parsing for `input.parsed_path` and `input.parsed_query`, and the one
//! rule for paths the policy and the upstream could read differently.
//!
//! An unambiguous path is parsed as OPA-Envoy does with Go's `url.Parse`: the path (before `?` and
//! `#`) is split on `/` after trimming the leading `/`, each segment percent-decoded; the query is
//! form-decoded into `{name: [values]}`.
//!
//! Ambiguous paths — dot segments (`/api/../admin`, `/%2e%2e/`), an encoded slash or backslash
//! (`%2F`, `%5C`), a literal backslash, repeated slashes — are handled by [`Mode`]:
//! `reject` (the default) denies them with 400; `normalize` resolves them the way Envoy does with
//! `normalize_path: true`, `merge_slashes: true` and `path_with_escaped_slashes_action:
//! UNESCAPE_AND_FORWARD` (configure Envoy the same way so the upstream sees what was decided on).
//! Either way `parsed_path` is the form the decision was made on. Invalid percent-encoding, NUL and
//! other control characters are always rejected: there is nothing safe to normalize them to.

use std::collections::BTreeMap;

use serde::Deserialize;

/// How ambiguous paths are handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Deny with 400.
    #[default]
    Reject,
    /// Resolve dot segments, merge slashes, unescape `%2F`/`%5C`, treat `\` as `/`.
    Normalize,
}

/// What made a path ambiguous or invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid percent-encoding in path")]
    BadEncoding,
    #[error("NUL in path")]
    Nul,
    #[error("control character in path")]
    ControlChar,
    #[error("ambiguous path: dot segment")]
    DotSegment,
    #[error("ambiguous path: encoded slash (%2F)")]
    EncodedSlash,
    #[error("ambiguous path: backslash")]
    Backslash,
    #[error("ambiguous path: repeated slashes")]
    RepeatedSlash,
}

/// The decoded parts of a request target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTarget {
    pub segments: Vec<String>,
    pub query: BTreeMap<String, Vec<String>>,
}

/// Parses with the default rule (reject ambiguous paths).
pub fn parse(target: &str) -> Result<ParsedTarget, Error> {
    parse_with(target, Mode::Reject)
}

/// Splits `/a/b?x=1#frag` into decoded path segments and query parameters.
pub fn parse_with(target: &str, mode: Mode) -> Result<ParsedTarget, Error> {
    let without_fragment = target.split_once('#').map_or(target, |(t, _)| t);
    let (path, query) = without_fragment
        .split_once('?')
        .unwrap_or((without_fragment, ""));
    check_encoding(path)?;
    let segments = match mode {
        Mode::Reject => strict_segments(path)?,
        Mode::Normalize => normalized_segments(path),
    };
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !query.is_empty() {
        check_encoding(query)?;
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

/// `%` must be followed by two hex digits; no raw or encoded NUL or control characters.
fn check_encoding(s: &str) -> Result<(), Error> {
    let bytes = s.as_bytes();
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        match b {
            0 => return Err(Error::Nul),
            b if b < 0x20 || b == 0x7f => return Err(Error::ControlChar),
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
                    .ok_or(Error::BadEncoding)?;
                let value = std::str::from_utf8(hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or(Error::BadEncoding)?;
                if value == 0 {
                    return Err(Error::Nul);
                }
                if value < 0x20 || value == 0x7f {
                    return Err(Error::ControlChar);
                }
                i += 3;
            }
            _ => i += 1,
        }
    }
    Ok(())
}

fn decode(segment: &str) -> String {
    percent_encoding::percent_decode_str(segment)
        .decode_utf8_lossy()
        .into_owned()
}

/// Reject mode: any ambiguity is an error; otherwise OPA-Envoy's split.
fn strict_segments(path: &str) -> Result<Vec<String>, Error> {
    let trimmed = path.strip_prefix('/').unwrap_or(path);
    if trimmed.starts_with('/') {
        return Err(Error::RepeatedSlash);
    }
    let raw: Vec<&str> = trimmed.split('/').collect();
    let last = raw.len().saturating_sub(1);
    let mut out = Vec::with_capacity(raw.len());
    for (i, seg) in raw.iter().enumerate() {
        // An empty segment is only fine as the whole path ("/") or after a trailing slash.
        if seg.is_empty() && i != last {
            return Err(Error::RepeatedSlash);
        }
        let decoded = decode(seg);
        if decoded.contains('/') {
            return Err(Error::EncodedSlash);
        }
        if decoded.contains('\\') {
            return Err(Error::Backslash);
        }
        if decoded == "." || decoded == ".." {
            return Err(Error::DotSegment);
        }
        out.push(decoded);
    }
    Ok(out)
}

/// Normalize mode, in Envoy's order: unescape `%2F`/`%5C` and treat `\\` as `/`
/// (`path_with_escaped_slashes_action: UNESCAPE_AND_FORWARD`), then resolve dot segments
/// (`normalize_path`, RFC 3986 5.2.4: a `..` removes the segment before it, empty ones
/// included), then merge slashes (`merge_slashes`). `/a//../b` is `/a/b`, as Envoy forwards
/// it; merging first would give `/b`.
fn normalized_segments(path: &str) -> Vec<String> {
    let decoded = decode(path).replace('\\', "/");
    let rest = decoded.strip_prefix('/').unwrap_or(&decoded);
    let raw: Vec<&str> = rest.split('/').collect();
    let last = raw.len().saturating_sub(1);
    let mut resolved: Vec<&str> = Vec::with_capacity(raw.len());
    for (i, seg) in raw.iter().enumerate() {
        match *seg {
            "." => {}
            ".." => {
                resolved.pop();
            }
            s => resolved.push(s),
        }
        // A final `.` or `..` leaves the path ending in `/`.
        if i == last && matches!(*seg, "." | "..") {
            resolved.push("");
        }
    }
    let trailing = resolved.last().is_some_and(|s| s.is_empty());
    let mut out: Vec<String> = resolved
        .into_iter()
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    if trailing || out.is_empty() {
        out.push(String::new());
    }
    out
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
            ("/a%20b/c", &["a b", "c"], &[]),
            ("/p?x=1&x=2&y=", &["p"], &[("x", &["1", "2"]), ("y", &[""])]),
            ("/p?q=a+b%21", &["p"], &[("q", &["a b!"])]),
            ("/p#frag?not=query", &["p"], &[]),
            ("/p?x=1#frag", &["p"], &[("x", &["1"])]),
            ("/.well-known/x", &[".well-known", "x"], &[]),
            ("/a..b/c.", &["a..b", "c."], &[]),
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

    /// Every ambiguity, in both modes: (target, error in reject mode, segments in normalize mode).
    #[test]
    fn ambiguous_paths_table() {
        let cases: &[(&str, Error, &[&str])] = &[
            ("/api/../admin", Error::DotSegment, &["admin"]),
            ("/api/./orders", Error::DotSegment, &["api", "orders"]),
            ("/api/%2e%2e/admin", Error::DotSegment, &["admin"]),
            ("/api/.%2E/admin", Error::DotSegment, &["admin"]),
            ("/api/%2E/x", Error::DotSegment, &["api", "x"]),
            ("/..", Error::DotSegment, &[""]),
            ("/../../etc/passwd", Error::DotSegment, &["etc", "passwd"]),
            ("/api/orders/..", Error::DotSegment, &["api", ""]),
            ("/api/orders/.", Error::DotSegment, &["api", "orders", ""]),
            // Envoy resolves dot segments before it merges slashes.
            ("/api//../orders", Error::RepeatedSlash, &["api", "orders"]),
            ("/a/b//..//c", Error::RepeatedSlash, &["a", "b", "c"]),
            ("/api%2Fadmin", Error::EncodedSlash, &["api", "admin"]),
            ("/api%2fadmin", Error::EncodedSlash, &["api", "admin"]),
            ("/api%5Cadmin", Error::Backslash, &["api", "admin"]),
            ("/api\\..\\admin", Error::Backslash, &["admin"]),
            ("//api", Error::RepeatedSlash, &["api"]),
            ("/api//orders", Error::RepeatedSlash, &["api", "orders"]),
            ("/api///", Error::RepeatedSlash, &["api", ""]),
        ];
        for (target, err, normalized) in cases {
            assert_eq!(parse(target), Err(*err), "reject {target}");
            let got = parse_with(target, Mode::Normalize)
                .unwrap_or_else(|e| panic!("normalize {target}: {e}"));
            assert_eq!(got.segments, *normalized, "normalize {target}");
        }
    }

    #[test]
    fn invalid_bytes_are_rejected_in_both_modes() {
        let cases: &[(&str, Error)] = &[
            ("/a%zz", Error::BadEncoding),
            ("/a%2", Error::BadEncoding),
            ("/%", Error::BadEncoding),
            ("/a%g0/b", Error::BadEncoding),
            ("/a%00b", Error::Nul),
            ("/a\0b", Error::Nul),
            ("/a%0Ab", Error::ControlChar),
            ("/a\rb", Error::ControlChar),
            ("/a?x=%00", Error::Nul),
            ("/a?x=%zz", Error::BadEncoding),
        ];
        for (target, err) in cases {
            for mode in [Mode::Reject, Mode::Normalize] {
                assert_eq!(parse_with(target, mode), Err(*err), "{mode:?} {target:?}");
            }
        }
    }
}
