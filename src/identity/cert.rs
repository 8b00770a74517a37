//! The peer certificate Envoy sends with `include_peer_certificate: true`: which URI SANs it
//! holds.
//!
//! Envoy fills `source.principal` from the certificate's URI SAN, and falls back to its DNS SAN
//! when there is none — so a certificate whose only SAN is a DNS name spelled like a SPIFFE ID
//! would pass as that workload. When the Check carries the certificate, its SPIFFE ID counts
//! only if it is one of the certificate's URI SANs.

use std::sync::Arc;

/// Most certificates whose SANs are remembered. Certificates are issued by the mesh CA (Envoy
/// verified them), so there are about as many as workload identities; the cap bounds the rest.
const CACHE_CAPACITY: u64 = 4096;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("peer certificate is not URL-encoded PEM")]
    Pem,
    #[error("peer certificate does not parse as X.509")]
    X509,
}

/// The URI SANs of `certificate` (URL-encoded PEM, as Envoy sends it).
pub fn uri_sans(certificate: &str) -> Result<Vec<String>, Error> {
    let pem_text = percent_encoding::percent_decode_str(certificate)
        .decode_utf8()
        .map_err(|_| Error::Pem)?;
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).map_err(|_| Error::Pem)?;
    let cert = pem.parse_x509().map_err(|_| Error::X509)?;
    let sans = match cert.subject_alternative_name() {
        Ok(Some(ext)) => ext
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some((*u).to_string()),
                _ => None,
            })
            .collect(),
        Ok(None) => Vec::new(),
        Err(_) => return Err(Error::X509),
    };
    Ok(sans)
}

/// [`uri_sans`] behind a bounded cache keyed by the certificate text: a workload presents the
/// same certificate on every request until it rotates.
pub struct UriSans {
    cache: moka::sync::Cache<Arc<str>, Arc<[String]>>,
}

impl std::fmt::Debug for UriSans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UriSans").finish_non_exhaustive()
    }
}

impl Default for UriSans {
    fn default() -> Self {
        UriSans {
            cache: moka::sync::Cache::new(CACHE_CAPACITY),
        }
    }
}

impl UriSans {
    /// Whether `id` is a URI SAN of `certificate`; an unreadable certificate backs no identity.
    pub fn backs(&self, certificate: &str, id: &str) -> bool {
        if let Some(sans) = self.cache.get(certificate) {
            return sans.iter().any(|s| s == id);
        }
        let sans: Arc<[String]> = uri_sans(certificate).unwrap_or_default().into();
        let backed = sans.iter().any(|s| s == id);
        self.cache.insert(Arc::from(certificate), sans);
        backed
    }
}
