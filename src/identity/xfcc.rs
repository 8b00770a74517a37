//! `x-forwarded-client-cert` (XFCC), the header Envoy uses to pass the downstream client
//! certificate's identity along: `By=<uri>;Hash=<hex>;URI=spiffe://…;Subject="…",…`.
//!
//! Elements are separated by `,`, key-value pairs by `;`; values may be double-quoted, with `\"`
//! escapes, and quoted values may contain `,` and `;`. With `forward_client_cert_details:
//! APPEND_FORWARD` each proxy appends an element, so the last element describes the immediate
//! client; with `SANITIZE_SET` there is exactly one.

/// One XFCC element: its key-value pairs in order, keys as written.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    pub pairs: Vec<(String, String)>,
}

impl Element {
    /// The first value of `key` (case-insensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("x-forwarded-client-cert: unterminated quoted value")]
    Unterminated,
    #[error("x-forwarded-client-cert: a pair without '='")]
    MissingEquals,
    #[error("x-forwarded-client-cert: empty key")]
    EmptyKey,
    #[error("x-forwarded-client-cert: header longer than {0} bytes")]
    TooLong(usize),
    #[error(
        "x-forwarded-client-cert: ambiguous ({0}); expected one element as Envoy's SANITIZE_SET writes it"
    )]
    Ambiguous(&'static str),
}

/// Longest XFCC header parsed.
pub const MAX_LEN: usize = 16 * 1024;

/// Parses a whole XFCC header value.
pub fn parse(header: &str) -> Result<Vec<Element>, Error> {
    if header.len() > MAX_LEN {
        return Err(Error::TooLong(MAX_LEN));
    }
    let mut elements = Vec::new();
    let mut current = Element::default();
    let mut key = String::new();
    let mut value = String::new();
    let mut in_value = false;
    let mut quoted = false;
    let mut chars = header.chars().peekable();
    let finish_pair = |key: &mut String,
                       value: &mut String,
                       in_value: &mut bool,
                       current: &mut Element|
     -> Result<(), Error> {
        let k = key.trim();
        if k.is_empty() && !*in_value && value.is_empty() {
            return Ok(()); // empty segment, e.g. a trailing ';'
        }
        if !*in_value {
            return Err(Error::MissingEquals);
        }
        if k.is_empty() {
            return Err(Error::EmptyKey);
        }
        current.pairs.push((k.to_string(), std::mem::take(value)));
        key.clear();
        *in_value = false;
        Ok(())
    };
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '\\' => {
                    if let Some(next) = chars.next() {
                        value.push(next);
                    }
                }
                '"' => quoted = false,
                _ => value.push(c),
            }
            continue;
        }
        match c {
            '"' if in_value && value.is_empty() => quoted = true,
            '=' if !in_value => in_value = true,
            ';' => finish_pair(&mut key, &mut value, &mut in_value, &mut current)?,
            ',' => {
                finish_pair(&mut key, &mut value, &mut in_value, &mut current)?;
                elements.push(std::mem::take(&mut current));
            }
            _ if in_value => value.push(c),
            _ => key.push(c),
        }
    }
    if quoted {
        return Err(Error::Unterminated);
    }
    finish_pair(&mut key, &mut value, &mut in_value, &mut current)?;
    elements.push(current);
    elements.retain(|e| !e.pairs.is_empty());
    Ok(elements)
}

/// The keys Envoy writes, in the order it writes them.
const ENVOY_KEYS: &[&str] = &["By", "Hash", "Cert", "Chain", "Subject", "URI", "DNS"];

/// The client's URI SAN from a header Envoy set with `forward_client_cert_details:
/// SANITIZE_SET`, if the certificate has one.
///
/// Envoy does not quote or escape URI and DNS values, so a certificate whose URI SAN holds a
/// `,` or `;` can make the header read as more elements or more pairs than Envoy wrote — one of
/// which names another workload. Only a header that can have one reading is accepted: exactly
/// one element, only Envoy's keys, in Envoy's order, a `Hash`, and at most one `URI`. Anything
/// else is refused as ambiguous (and so is an `APPEND_FORWARD` chain, whose elements cannot be
/// told apart from a split one).
pub fn client_uri(header: &str) -> Result<Option<String>, Error> {
    let elements = parse(header)?;
    let element = match elements.as_slice() {
        [] => return Ok(None),
        [one] => one,
        _ => return Err(Error::Ambiguous("more than one element")),
    };
    let mut last_rank = 0;
    let mut uri = None;
    let mut hash = false;
    for (key, value) in &element.pairs {
        let Some(rank) = ENVOY_KEYS.iter().position(|k| k.eq_ignore_ascii_case(key)) else {
            return Err(Error::Ambiguous("a key Envoy does not write"));
        };
        if rank < last_rank {
            return Err(Error::Ambiguous("keys out of Envoy's order"));
        }
        last_rank = rank;
        match ENVOY_KEYS.get(rank) {
            Some(&"Hash") if hash => return Err(Error::Ambiguous("more than one Hash")),
            Some(&"Hash") => hash = true,
            Some(&"URI") if uri.is_some() => return Err(Error::Ambiguous("more than one URI")),
            Some(&"URI") => uri = Some(value.clone()),
            _ => {}
        }
    }
    if !hash {
        return Err(Error::Ambiguous("no Hash"));
    }
    Ok(uri)
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    #[test]
    fn parses_xfcc_table() {
        // (header, [[(key, value)…] per element])
        let cases: &[(&str, &[&[(&str, &str)]])] = &[
            (
                "By=spiffe://cluster.local/ns/default/sa/backend;Hash=b340;URI=spiffe://cluster.local/ns/default/sa/foo",
                &[&[
                    ("By", "spiffe://cluster.local/ns/default/sa/backend"),
                    ("Hash", "b340"),
                    ("URI", "spiffe://cluster.local/ns/default/sa/foo"),
                ]],
            ),
            (
                r#"Hash=aa;Subject="CN=a,O=b;c";URI=spiffe://td/x,By=spiffe://td/y;URI=spiffe://td/z"#,
                &[
                    &[
                        ("Hash", "aa"),
                        ("Subject", "CN=a,O=b;c"),
                        ("URI", "spiffe://td/x"),
                    ],
                    &[("By", "spiffe://td/y"), ("URI", "spiffe://td/z")],
                ],
            ),
            (r#"Subject="say \"hi\"""#, &[&[("Subject", r#"say "hi""#)]]),
            ("URI=spiffe://td/x;", &[&[("URI", "spiffe://td/x")]]),
            ("", &[]),
        ];
        for (header, want) in cases {
            let got = parse(header).unwrap_or_else(|e| panic!("{header}: {e}"));
            let got: Vec<Vec<(&str, &str)>> = got
                .iter()
                .map(|e| {
                    e.pairs
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect()
                })
                .collect();
            let want: Vec<Vec<(&str, &str)>> = want.iter().map(|e| e.to_vec()).collect();
            assert_eq!(got, want, "{header}");
        }
    }

    #[test]
    fn client_uri_accepts_only_one_reading_table() {
        let ok: &[(&str, Option<&str>)] = &[
            (
                "By=spiffe://td/be;Hash=ab12;URI=spiffe://td/ns/a/sa/b",
                Some("spiffe://td/ns/a/sa/b"),
            ),
            ("Hash=ab12;URI=spiffe://td/x", Some("spiffe://td/x")),
            (
                r#"Hash=ab;Subject="CN=a,O=b;c";URI=spiffe://td/x;DNS=a.example;DNS=b.example"#,
                Some("spiffe://td/x"),
            ),
            ("By=spiffe://td/be;Hash=ab12", None),
            ("", None),
        ];
        for (h, want) in ok {
            assert_eq!(client_uri(h).unwrap().as_deref(), *want, "{h}");
        }
        let ambiguous = [
            // A URI SAN "spiffe://td/x,Hash=00;URI=spiffe://td/admin": Envoy writes it as is.
            "By=spiffe://td/be;Hash=ab;URI=spiffe://td/x,Hash=00;URI=spiffe://td/admin",
            // A URI SAN "spiffe://td/x;URI=spiffe://td/admin".
            "Hash=ab;URI=spiffe://td/x;URI=spiffe://td/admin",
            // "spiffe://td/x;Foo=1", and keys out of order ("…;By=…" injected after URI).
            "Hash=ab;URI=spiffe://td/x;Foo=1",
            "Hash=ab;URI=spiffe://td/x;By=spiffe://td/y",
            "URI=spiffe://td/x",
            "Hash=a;Hash=b;URI=spiffe://td/x",
            // APPEND_FORWARD chains cannot be told from a split element.
            "By=a;Hash=1;URI=spiffe://td/first,By=b;Hash=2;URI=spiffe://td/last",
        ];
        for h in ambiguous {
            assert!(
                matches!(client_uri(h), Err(Error::Ambiguous(_))),
                "{h}: {:?}",
                client_uri(h)
            );
        }
    }

    #[test]
    fn rejects_malformed_xfcc() {
        assert_eq!(parse(r#"URI="open"#), Err(Error::Unterminated));
        assert_eq!(parse("URI"), Err(Error::MissingEquals));
        assert_eq!(parse("=x"), Err(Error::EmptyKey));
        assert_eq!(parse(&"a=b;".repeat(5000)), Err(Error::TooLong(MAX_LEN)));
    }
}
