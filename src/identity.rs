//! Workload identity: SPIFFE IDs as Envoy reports them in `source.principal`.
//!
//! Parsing follows the SPIFFE ID specification strictly (lower-case trust domain of
//! `[a-z0-9.-_]`, path segments of `[A-Za-z0-9.-_]`, no empty, `.` or `..` segments, no query,
//! fragment, port or user info, at most 2048 bytes), because a lax parser is how two components
//! come to disagree on who is calling.

use std::fmt;

pub mod cert;
pub mod xfcc;

/// The longest SPIFFE ID the specification allows.
pub const MAX_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// A parsed SPIFFE ID. `Display` renders it back exactly as parsed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    trust_domain: String,
    /// Empty, or starting with `/`.
    path: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("not a SPIFFE ID: missing spiffe:// scheme")]
    Scheme,
    #[error("SPIFFE ID longer than {MAX_LEN} bytes")]
    TooLong,
    #[error("SPIFFE ID has an empty trust domain")]
    EmptyTrustDomain,
    #[error("SPIFFE ID trust domain has a character outside [a-z0-9.-_]")]
    TrustDomainChar,
    #[error("SPIFFE ID path has an empty segment")]
    EmptySegment,
    #[error("SPIFFE ID path has a '.' or '..' segment")]
    DotSegment,
    #[error("SPIFFE ID path has a character outside [A-Za-z0-9.-_]")]
    PathChar,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<SpiffeId, Error> {
        if s.len() > MAX_LEN {
            return Err(Error::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(Error::Scheme)?;
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if td.is_empty() {
            return Err(Error::EmptyTrustDomain);
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(Error::TrustDomainChar);
        }
        if !path.is_empty() {
            for seg in path.split('/').skip(1) {
                match seg {
                    "" => return Err(Error::EmptySegment),
                    "." | ".." => return Err(Error::DotSegment),
                    _ if !seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) =>
                    {
                        return Err(Error::PathChar);
                    }
                    _ => {}
                }
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            path: path.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The path, empty or starting with `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Namespace and service account when the path has Istio's `/ns/<ns>/sa/<sa>` form.
    pub fn istio_workload(&self) -> Option<(&str, &str)> {
        let mut it = self.path.strip_prefix('/')?.split('/');
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }

    /// The scheme-less form Istio `AuthorizationPolicy` principals use: `td/ns/x/sa/y`.
    pub fn istio_principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl std::str::FromStr for SpiffeId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        SpiffeId::parse(s)
    }
}

#[cfg(test)]
#[allow(clippy::type_complexity)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids_table() {
        // (input, trust domain, path, istio (ns, sa))
        let cases: &[(&str, &str, &str, Option<(&str, &str)>)] = &[
            (
                "spiffe://cluster.local/ns/shop/sa/checkout",
                "cluster.local",
                "/ns/shop/sa/checkout",
                Some(("shop", "checkout")),
            ),
            ("spiffe://example.org", "example.org", "", None),
            (
                "spiffe://example.org/workload/web-1",
                "example.org",
                "/workload/web-1",
                None,
            ),
            (
                "spiffe://td/ns/a/sa/b/extra",
                "td",
                "/ns/a/sa/b/extra",
                None,
            ),
            ("spiffe://a_b-c.d/X.y_Z-1", "a_b-c.d", "/X.y_Z-1", None),
        ];
        for (input, td, path, istio) in cases {
            let id = SpiffeId::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(id.trust_domain(), *td, "{input}");
            assert_eq!(id.path(), *path, "{input}");
            assert_eq!(id.istio_workload(), *istio, "{input}");
            assert_eq!(id.to_string(), *input, "display round-trips {input}");
        }
    }

    #[test]
    fn rejects_invalid_ids_table() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_LEN));
        let cases: &[(&str, Error)] = &[
            ("", Error::Scheme),
            ("cluster.local/ns/a/sa/b", Error::Scheme),
            ("SPIFFE://td/x", Error::Scheme),
            ("https://td/x", Error::Scheme),
            ("spiffe://", Error::EmptyTrustDomain),
            ("spiffe:///ns/a", Error::EmptyTrustDomain),
            ("spiffe://Cluster.local/x", Error::TrustDomainChar),
            ("spiffe://td:8080/x", Error::TrustDomainChar),
            ("spiffe://user@td/x", Error::TrustDomainChar),
            ("spiffe://td/", Error::EmptySegment),
            ("spiffe://td//x", Error::EmptySegment),
            ("spiffe://td/x/", Error::EmptySegment),
            ("spiffe://td/./x", Error::DotSegment),
            ("spiffe://td/ns/../sa", Error::DotSegment),
            ("spiffe://td/x?y=1", Error::PathChar),
            ("spiffe://td/x#f", Error::PathChar),
            ("spiffe://td/x%2Fy", Error::PathChar),
            ("spiffe://td/ns/a b", Error::PathChar),
            (long.as_str(), Error::TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(SpiffeId::parse(input).as_ref(), Err(want), "{input:?}");
        }
    }

    #[test]
    fn istio_principal_drops_scheme() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/checkout").unwrap();
        assert_eq!(id.istio_principal(), "cluster.local/ns/shop/sa/checkout");
    }
}
