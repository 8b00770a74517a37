//! meshauthz: an Envoy/Istio external-authorization server that decides each request from the
//! caller's mesh identity (SPIFFE), its verified bearer token, and Rego policy.
//!
//! Modules, in the order a Check flows through them:
//!
//! - [`server`]: the gRPC edge (`envoy.service.auth.v3.Authorization/Check`, gRPC health). The
//!   only module that sees protobuf: `CheckRequest` → [`request::Attributes`] in,
//!   [`decision::Decision`] → `CheckResponse` out.
//! - [`authz`]: the pipeline. [`limits`] → [`path`] (parsed path and query) → [`identity`]
//!   (SPIFFE ID of the peer) → [`jwt`] (token extraction, verified-token cache, JWKS) →
//!   [`input`] (the policy input document) → [`policy`] (regorus evaluation) → [`decision`]
//!   (what the policy's value means) → [`decision_log`] and [`telemetry`].
//! - [`policy`] also owns loading, the content-hash revision, hot reload and file watching.
//! - [`http`]: `/healthz`, `/readyz`, `/metrics`, and [`http_authz`], the HTTP ext_authz mode
//!   (Envoy `http_service`), which feeds the same pipeline (peer identity from a trusted
//!   `x-forwarded-client-cert`, parsed in [`identity::xfcc`]).
//! - [`tls`]: rustls TLS/mTLS for both listeners, with certificate reload.
//! - [`config`]: the YAML file, validated into typed sections owned by each module.
//! - [`app`]: wiring for `serve`, `eval` and friends; `main.rs` only parses the command line.
#![forbid(unsafe_code)]

pub mod app;
pub mod authz;
pub mod config;
pub mod conn;
pub mod decision;
pub mod decision_log;
pub mod demo;
pub mod http;
pub mod http_authz;
pub mod identity;
pub mod input;
pub mod jwt;
pub mod limits;
pub mod path;
pub mod policy;
pub mod request;
pub mod server;
pub mod telemetry;
pub mod tls;
