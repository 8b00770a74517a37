//! Size limits on what a request may carry, checked before any parsing work is spent on it.
//!
//! Each limit answers with an explicit denial (400 for the request shape, 401 for the token) and
//! a counted reason, so an oversized request can neither stall a worker nor slip through.

use serde::Deserialize;

use crate::config::{Ctx, Error};

/// Validated limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest bearer token accepted, in bytes.
    pub max_token_bytes: usize,
    /// Most request headers accepted.
    pub max_headers: usize,
    /// Largest total size of header names and values, in bytes.
    pub max_header_bytes: usize,
    /// Longest `:path` (with query) accepted, in bytes.
    pub max_path_bytes: usize,
    /// Deepest array/object nesting accepted in a token's header or claims.
    pub max_claims_depth: usize,
    /// What to do with paths the policy and the upstream could read differently.
    pub ambiguous_paths: crate::path::Mode,
    /// Largest request body a Check may carry (413 above it), and so the largest parsed into
    /// `input.parsed_body`: parsing costs ~30 times the body's size in policy values.
    pub max_body_bytes: usize,
    /// Deepest array/object nesting parsed into `input.parsed_body`; a deeper body is left
    /// unparsed and reported as `truncated_body: true`.
    pub max_body_depth: usize,
}

impl Limits {
    /// The gRPC decode limit: well above every configured limit together, so a Check over a
    /// limit is decoded and answered with a denial rather than refused with a gRPC error
    /// (which `failure_mode_allow: true` would turn into an allow). Only a message beyond this
    /// ceiling is refused by the transport.
    pub fn grpc_decode_limit(&self) -> usize {
        let configured = self
            .max_header_bytes
            .saturating_add(self.max_path_bytes)
            .saturating_add(self.max_body_bytes.saturating_mul(3))
            .saturating_add(self.max_token_bytes);
        configured.saturating_mul(2).max(GRPC_DECODE_FLOOR)
    }
}

/// The smallest gRPC decode limit: four times tonic's default of 4 MiB.
pub const GRPC_DECODE_FLOOR: usize = 16 * 1024 * 1024;

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_token_bytes: 8 * 1024,
            max_headers: 128,
            max_header_bytes: 64 * 1024,
            max_path_bytes: 8 * 1024,
            // Real claims nest 3–4 levels (resource_access.<client>.roles[]).
            max_claims_depth: 16,
            ambiguous_paths: crate::path::Mode::Reject,
            max_body_bytes: 64 * 1024,
            max_body_depth: 32,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    max_token_bytes: Option<usize>,
    max_headers: Option<usize>,
    max_header_bytes: Option<usize>,
    max_path_bytes: Option<usize>,
    max_claims_depth: Option<usize>,
    ambiguous_paths: Option<crate::path::Mode>,
    max_body_bytes: Option<usize>,
    max_body_depth: Option<usize>,
}

impl RawLimits {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Limits, Error> {
        let d = Limits::default();
        let positive = |key: &str, v: Option<usize>, default: usize| match v {
            Some(0) => Err(ctx.err(format!("limits.{key}"), "expected a positive number")),
            Some(n) => Ok(n),
            None => Ok(default),
        };
        Ok(Limits {
            max_token_bytes: positive("max_token_bytes", self.max_token_bytes, d.max_token_bytes)?,
            max_headers: positive("max_headers", self.max_headers, d.max_headers)?,
            max_header_bytes: positive(
                "max_header_bytes",
                self.max_header_bytes,
                d.max_header_bytes,
            )?,
            max_path_bytes: positive("max_path_bytes", self.max_path_bytes, d.max_path_bytes)?,
            max_claims_depth: positive(
                "max_claims_depth",
                self.max_claims_depth,
                d.max_claims_depth,
            )?,
            ambiguous_paths: self.ambiguous_paths.unwrap_or_default(),
            max_body_bytes: positive("max_body_bytes", self.max_body_bytes, d.max_body_bytes)?,
            max_body_depth: positive("max_body_depth", self.max_body_depth, d.max_body_depth)?,
        })
    }
}
