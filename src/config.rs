//! The YAML configuration file: parsing, validation and defaults.
//!
//! A file goes through two stages. First serde fills the `Raw*` structs, which mirror the YAML
//! exactly and reject unknown keys, so a typo never silently falls back to a default. Then each
//! raw section is validated into the typed config that the rest of the crate uses (durations
//! parsed, paths resolved against the config file's directory, cross-field rules checked). Every
//! error carries the file, the key path (`policy.paths[1]`) and what was expected.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::{decision_log, http_authz, jwt, limits, policy, tls};

/// Where the bundled default config lives, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/meshauthz.yaml";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The OS error is part of the message, not a `source`: a report that prints the chain
    /// would show it twice.
    #[error("{file}: cannot read config: {error}")]
    Read {
        file: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: {key}: {message}")]
    Invalid {
        file: PathBuf,
        key: String,
        message: String,
    },
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (for messages).
    pub file: PathBuf,
    pub server: ServerConfig,
    pub policy: policy::Config,
    pub jwt: jwt::Config,
    pub decision_log: decision_log::Config,
    pub limits: limits::Limits,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Tokio worker threads; `None` means one per core.
    pub worker_threads: Option<usize>,
    /// How long in-flight requests may take to finish after SIGTERM.
    pub shutdown_grace: Duration,
    /// HTTP/2 SETTINGS_MAX_CONCURRENT_STREAMS on the gRPC listener. h2 keeps a connection's
    /// frame buffers at their high-water mark until the connection closes, so this caps what a
    /// burst (a stalled process catching up, a client fan-out) can leave behind.
    pub max_concurrent_streams: u32,
    /// Connection cap and timeouts, on both listeners.
    pub connections: crate::conn::Settings,
    /// The HTTP ext_authz mode on the HTTP listener.
    pub http_authz: http_authz::Config,
    /// TLS (and optionally mTLS) on our listeners.
    pub tls: Option<tls::Config>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    policy: policy::RawConfig,
    #[serde(default)]
    jwt: jwt::RawConfig,
    #[serde(default)]
    decision_log: decision_log::RawConfig,
    #[serde(default)]
    limits: limits::RawLimits,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    #[serde(default = "default_grpc_addr")]
    grpc_addr: String,
    #[serde(default = "default_http_addr")]
    http_addr: String,
    #[serde(default)]
    worker_threads: usize,
    #[serde(default = "default_shutdown_grace")]
    shutdown_grace: String,
    #[serde(default = "default_max_concurrent_streams")]
    max_concurrent_streams: u32,
    max_connections: Option<usize>,
    header_read_timeout: Option<String>,
    idle_timeout: Option<String>,
    #[serde(default)]
    http_authz: http_authz::RawConfig,
    tls: Option<tls::RawConfig>,
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            grpc_addr: default_grpc_addr(),
            http_addr: default_http_addr(),
            worker_threads: 0,
            shutdown_grace: default_shutdown_grace(),
            max_concurrent_streams: default_max_concurrent_streams(),
            max_connections: None,
            header_read_timeout: None,
            idle_timeout: None,
            http_authz: http_authz::RawConfig::default(),
            tls: None,
        }
    }
}

fn default_grpc_addr() -> String {
    "0.0.0.0:9191".into()
}
fn default_http_addr() -> String {
    "0.0.0.0:8181".into()
}
fn default_shutdown_grace() -> String {
    "10s".into()
}
/// hyper's own default, which tonic replaces with "unlimited" unless it is set.
fn default_max_concurrent_streams() -> u32 {
    200
}

/// Validation context handed to each section: it knows the file and the base directory and turns
/// a problem at a key path into an [`Error`].
pub struct Ctx<'a> {
    file: &'a Path,
    base_dir: &'a Path,
}

impl Ctx<'_> {
    /// `n` unless it is 0; `why` says what 0 would do.
    pub fn nonzero<T: Default + PartialEq>(
        &self,
        key: impl Into<String>,
        n: T,
        why: &str,
    ) -> Result<T, Error> {
        if n == T::default() {
            return Err(self.err(key, format!("expected at least 1 ({why})")));
        }
        Ok(n)
    }

    /// An error at `key` (a dotted path such as `jwt.providers[0].issuer`).
    pub fn err(&self, key: impl Into<String>, message: impl Into<String>) -> Error {
        Error::Invalid {
            file: self.file.to_path_buf(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Resolves a path written in the config relative to the config file's directory.
    pub fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Parses a humane duration ("30s", "5m", "250ms").
    pub fn duration(&self, key: &str, value: &str) -> Result<Duration, Error> {
        humantime::parse_duration(value).map_err(|e| {
            self.err(
                key,
                format!("expected a duration such as \"30s\" or \"250ms\", got {value:?} ({e})"),
            )
        })
    }

    pub fn socket_addr(&self, key: &str, value: &str) -> Result<SocketAddr, Error> {
        value.parse().map_err(|_| {
            self.err(
                key,
                format!("expected an IP:port address such as \"0.0.0.0:9191\", got {value:?}"),
            )
        })
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(file: impl AsRef<Path>) -> Result<Config, Error> {
        let file = file.as_ref();
        let text = std::fs::read_to_string(file).map_err(|error| Error::Read {
            file: file.to_path_buf(),
            error,
        })?;
        Self::from_yaml(&text, file)
    }

    /// Parses config text as if it were read from `file` (relative paths resolve against its dir).
    pub fn from_yaml(text: &str, file: &Path) -> Result<Config, Error> {
        let de = yaml_serde::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            // yaml_serde already starts its message with the key path; say it once.
            let message = e.into_inner().to_string();
            let message = message
                .strip_prefix(&format!("{key}: "))
                .map_or(message.clone(), str::to_owned);
            Error::Invalid {
                file: file.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        let base_dir = file
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let ctx = Ctx { file, base_dir };
        let limits = raw.limits.validate(&ctx)?;
        let mut jwt = raw.jwt.validate(&ctx)?;
        jwt.max_claims_depth = limits.max_claims_depth;
        let decision_log = raw.decision_log.validate(&ctx)?;
        refuse_logged_token_headers(&ctx, &decision_log, &jwt)?;
        Ok(Config {
            file: file.to_path_buf(),
            server: raw.server.validate(&ctx)?,
            policy: raw.policy.validate(&ctx)?,
            jwt,
            decision_log,
            limits,
        })
    }
}

/// A header a provider reads tokens from is a credential: copying it into the decision log
/// would log whole tokens. Spellings that differ only in `-`/`_` count as the same header.
fn refuse_logged_token_headers(
    ctx: &Ctx<'_>,
    log: &decision_log::Config,
    jwt: &jwt::Config,
) -> Result<(), Error> {
    let canonical = |h: &str| h.to_ascii_lowercase().replace('_', "-");
    for (i, logged) in log.headers.iter().enumerate() {
        for (j, p) in jwt.providers.iter().enumerate() {
            if p.from_headers
                .iter()
                .any(|f| canonical(&f.name) == canonical(logged))
            {
                return Err(ctx.err(
                    format!("decision_log.headers[{i}]"),
                    format!(
                        "{logged:?} carries tokens (jwt.providers[{j}].from_headers) and is never logged"
                    ),
                ));
            }
        }
    }
    Ok(())
}

impl RawServer {
    fn validate(self, ctx: &Ctx<'_>) -> Result<ServerConfig, Error> {
        Ok(ServerConfig {
            grpc_addr: ctx.socket_addr("server.grpc_addr", &self.grpc_addr)?,
            http_addr: ctx.socket_addr("server.http_addr", &self.http_addr)?,
            worker_threads: (self.worker_threads > 0).then_some(self.worker_threads),
            shutdown_grace: ctx.duration("server.shutdown_grace", &self.shutdown_grace)?,
            max_concurrent_streams: ctx.nonzero(
                "server.max_concurrent_streams",
                self.max_concurrent_streams,
                "0 would refuse every Check",
            )?,
            connections: {
                let d = crate::conn::Settings::default();
                let duration = |key: &str, v: Option<String>, default| match v {
                    Some(v) => ctx.duration(key, &v).and_then(|d| {
                        if d.is_zero() {
                            Err(ctx.err(key, "expected a duration above 0"))
                        } else {
                            Ok(d)
                        }
                    }),
                    None => Ok(default),
                };
                crate::conn::Settings {
                    max_connections: ctx.nonzero(
                        "server.max_connections",
                        self.max_connections.unwrap_or(d.max_connections),
                        "0 would accept no connection",
                    )?,
                    header_read_timeout: duration(
                        "server.header_read_timeout",
                        self.header_read_timeout,
                        d.header_read_timeout,
                    )?,
                    idle_timeout: duration(
                        "server.idle_timeout",
                        self.idle_timeout,
                        d.idle_timeout,
                    )?,
                }
            },
            http_authz: self.http_authz.validate(ctx)?,
            tls: self.tls.map(|t| t.validate(ctx)).transpose()?,
        })
    }
}

#[cfg(test)]
mod tests;
