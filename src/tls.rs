//! TLS and mTLS on our own listeners (rustls, aws-lc-rs), with certificate reload.
//!
//! The serving `rustls::ServerConfig` sits behind an `ArcSwap`; every accepted connection takes the
//! current one, so a rotated certificate (cert-manager, SPIRE) applies to new connections without a
//! restart while established ones keep theirs. Files are polled (size and mtime, following
//! symlinks, so a Kubernetes secret's `..data` swap counts); a rotation that does not load keeps
//! the previous certificate serving and is logged.

use crate::conn::Conn;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::{self, Ctx};

/// Longest a client may take to finish the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Validated `server.tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// When set, clients must present a certificate issued by one of these CAs.
    pub client_ca_file: Option<PathBuf>,
    /// Serve the gRPC listener over TLS.
    pub grpc: bool,
    /// Serve the HTTP listener (health, metrics, HTTP ext_authz) over TLS.
    pub http: bool,
    /// How often the files are checked for rotation.
    pub reload_interval: Duration,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    cert_file: String,
    key_file: String,
    client_ca_file: Option<String>,
    #[serde(default = "default_listeners")]
    listeners: Vec<String>,
    #[serde(default = "default_reload")]
    reload_interval: String,
}

fn default_listeners() -> Vec<String> {
    vec!["grpc".into(), "http".into()]
}
fn default_reload() -> String {
    "10s".into()
}

impl RawConfig {
    pub fn validate(self, ctx: &Ctx<'_>) -> Result<Config, config::Error> {
        let mut grpc = false;
        let mut http = false;
        for (i, l) in self.listeners.iter().enumerate() {
            match l.as_str() {
                "grpc" => grpc = true,
                "http" => http = true,
                other => {
                    return Err(ctx.err(
                        format!("server.tls.listeners[{i}]"),
                        format!("expected \"grpc\" or \"http\", got {other:?}"),
                    ));
                }
            }
        }
        let cfg = Config {
            cert_file: ctx.resolve(&self.cert_file),
            key_file: ctx.resolve(&self.key_file),
            client_ca_file: self.client_ca_file.map(|f| ctx.resolve(&f)),
            grpc,
            http,
            reload_interval: ctx.duration("server.tls.reload_interval", &self.reload_interval)?,
        };
        // Load once now so a bad certificate is a config error naming the key, not a late failure.
        build(&cfg).map_err(|e| ctx.err("server.tls", e.to_string()))?;
        Ok(cfg)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("invalid TLS setup: {0}")]
    Rustls(String),
}

fn file_err(path: &std::path::Path, e: impl std::fmt::Display) -> Error {
    Error::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Builds a rustls server config from the files.
fn build(cfg: &Config) -> Result<rustls::ServerConfig, Error> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cfg.cert_file)
        .map_err(|e| file_err(&cfg.cert_file, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(&cfg.cert_file, e))?;
    if certs.is_empty() {
        return Err(file_err(&cfg.cert_file, "no certificate in the file"));
    }
    let key =
        PrivateKeyDer::from_pem_file(&cfg.key_file).map_err(|e| file_err(&cfg.key_file, e))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Rustls(e.to_string()))?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e))? {
                roots
                    .add(c.map_err(|e| file_err(ca, e))?)
                    .map_err(|e| file_err(ca, e))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .map_err(|e| file_err(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::Rustls(e.to_string()))?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

type Stamp = Vec<Option<(SystemTime, u64)>>;

/// The serving TLS configuration, reloaded when its files change.
pub struct Tls {
    config: Config,
    current: ArcSwap<rustls::ServerConfig>,
    stamp: std::sync::Mutex<Stamp>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("config", &self.config).finish()
    }
}

impl Tls {
    pub fn load(config: Config) -> Result<Arc<Tls>, Error> {
        let server = build(&config)?;
        let stamp = stamp(&config);
        Ok(Arc::new(Tls {
            config,
            current: ArcSwap::from_pointee(server),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Polls the files and swaps in a new configuration when they change.
    pub fn start_reloader(self: &Arc<Self>) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(this.config.reload_interval).await;
                this.reload_if_changed();
            }
        });
    }

    /// Returns whether a new configuration was swapped in.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.config);
        let mut last = self
            .stamp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *last == now {
            return false;
        }
        match build(&self.config) {
            Ok(server) => {
                self.current.store(Arc::new(server));
                *last = now;
                tracing::info!(cert = %self.config.cert_file.display(), "TLS certificate reloaded");
                true
            }
            Err(e) => {
                // Keep the old one; try again next time (the files may be mid-rotation).
                tracing::warn!(error = %e, "TLS reload failed; the previous certificate keeps serving");
                false
            }
        }
    }

    /// Hands out completed TLS handshakes over [`crate::conn::accept`]ed connections.
    /// Handshakes run concurrently, so a slow client never holds up the others.
    pub fn incoming(
        self: &Arc<Self>,
        mut accepted: mpsc::Receiver<(Conn<TcpStream>, SocketAddr)>,
    ) -> mpsc::Receiver<(TlsStream<Conn<TcpStream>>, SocketAddr)> {
        let (tx, rx) = mpsc::channel(256);
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, addr) = tokio::select! {
                    a = accepted.recv() => match a {
                        Some(a) => a,
                        None => return,
                    },
                    () = tx.closed() => return,
                };
                let acceptor = TlsAcceptor::from(this.current.load_full());
                let tx = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, addr)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                        }
                        Err(_) => tracing::debug!(peer = %addr, "TLS handshake timed out"),
                    }
                });
            }
        });
        rx
    }
}

fn stamp(cfg: &Config) -> Stamp {
    [
        Some(&cfg.cert_file),
        Some(&cfg.key_file),
        cfg.client_ca_file.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|p| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
    })
    .collect()
}

/// An axum listener over TLS connections produced by [`Tls::incoming`].
pub type TlsListener = crate::conn::Listener<TlsStream<Conn<TcpStream>>>;

/// The TLS listener for `listener`.
pub fn listener(
    tls: &Arc<Tls>,
    listener: TcpListener,
    settings: crate::conn::Settings,
) -> std::io::Result<TlsListener> {
    let local = listener.local_addr()?;
    Ok(crate::conn::Listener::from_channel(
        tls.incoming(crate::conn::accept(listener, settings)),
        local,
    ))
}
