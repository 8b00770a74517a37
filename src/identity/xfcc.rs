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

/// The SPIFFE URI of the immediate client (the last element's `URI`), if any.
pub fn client_uri(header: &str) -> Result<Option<String>, Error> {
    Ok(parse(header)?
        .last()
        .and_then(|e| e.get("URI"))
        .map(str::to_owned))
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
    fn the_last_element_is_the_immediate_client() {
        let h = "By=a;URI=spiffe://td/first,By=b;URI=spiffe://td/last";
        assert_eq!(client_uri(h).unwrap().as_deref(), Some("spiffe://td/last"));
        assert_eq!(client_uri("By=a;Hash=b").unwrap(), None);
    }

    #[test]
    fn rejects_malformed_xfcc() {
        assert_eq!(parse(r#"URI="open"#), Err(Error::Unterminated));
        assert_eq!(parse("URI"), Err(Error::MissingEquals));
        assert_eq!(parse("=x"), Err(Error::EmptyKey));
        assert_eq!(parse(&"a=b;".repeat(5000)), Err(Error::TooLong(MAX_LEN)));
    }
}
