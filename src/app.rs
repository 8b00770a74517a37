//! Wiring: building the pipeline from a config, serving it, and the offline commands.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authz::Authorizer;
use crate::config::Config;
use crate::decision_log::Logger;
use crate::jwt::Verifier;
use crate::policy::Store;
use crate::request::{Attributes, CheckRequestJson};
use crate::telemetry::Metrics;
use crate::{http, policy, server};

/// A built server: everything the listeners share.
pub struct App {
    pub config: Config,
    pub authz: Arc<Authorizer>,
    pub metrics: Arc<Metrics>,
    shutting_down: AtomicBool,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("config", &self.config.file)
            .finish()
    }
}

impl App {
    /// Loads the policy (failing on any compile error) and builds the pipeline. Starts no task,
    /// so offline commands can use it without a runtime.
    pub fn build(config: Config) -> anyhow::Result<Arc<App>> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::load(config.policy.clone(), metrics.clone())
            .context("cannot load the policy")?;
        let jwt = Verifier::new(&config.jwt, metrics.clone())
            .context("cannot set up JWT verification")?;
        let log = Logger::start(config.decision_log.clone(), metrics.clone())
            .context("cannot open the decision log")?;
        let authz = Authorizer {
            policy: Arc::new(store),
            jwt: Arc::new(jwt),
            log,
            metrics: metrics.clone(),
            limits: config.limits,
            dry_run: config.policy.dry_run,
            peer_certs: Default::default(),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        };
        Ok(Arc::new(App {
            config,
            authz: Arc::new(authz),
            metrics,
            shutting_down: AtomicBool::new(false),
        }))
    }

    /// Ready while a policy is serving and no shutdown has begun. (A policy always serves once
    /// built: startup fails otherwise, and a failed reload keeps the last good one.)
    pub fn is_ready(&self) -> bool {
        !self.shutting_down.load(Ordering::Acquire)
    }

    /// Serves gRPC and HTTP on the given listeners until `shutdown` resolves; then readiness
    /// turns false at once, in-flight requests finish, and it returns within the grace period.
    pub async fn serve(
        self: Arc<Self>,
        grpc: TcpListener,
        http_listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.authz.jwt.start();
        let _watcher = if self.config.policy.watch {
            Some(
                policy::spawn_watcher(self.authz.policy.clone())
                    .context("cannot watch the policy files")?,
            )
        } else {
            None
        };
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(server::SERVICE_NAME, tonic_health::ServingStatus::Serving)
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;

        let grpc_addr = grpc.local_addr().context("gRPC listener")?;
        let http_addr = http_listener.local_addr().context("HTTP listener")?;
        let (stop_tx, stop_rx) = watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        let tls = match &self.config.server.tls {
            Some(cfg) => {
                let tls = crate::tls::Tls::load(cfg.clone()).context("cannot load TLS")?;
                tls.start_reloader();
                Some(tls)
            }
            None => None,
        };
        let streams = self.config.server.max_concurrent_streams;
        let connections = self.config.server.connections;
        let grpc_task = match tls.as_ref().filter(|t| t.config().grpc) {
            Some(t) => tokio::spawn(server::run_tls(
                t.incoming(crate::conn::accept(grpc, connections)),
                self.authz.clone(),
                health_service,
                streams,
                stopped(),
            )),
            None => tokio::spawn(server::run(
                grpc,
                self.authz.clone(),
                health_service,
                streams,
                connections,
                stopped(),
            )),
        };
        let http_tls = tls.filter(|t| t.config().http);
        let http_task = tokio::spawn(http::run(
            http_listener,
            self.clone(),
            http_tls,
            connections,
            stopped(),
        ));
        tracing::info!(
            grpc = %grpc_addr,
            http = %http_addr,
            engine = self.authz.policy.current().engine(),
            revision = %self.authz.policy.current().revision(),
            "meshauthz serving"
        );

        shutdown.await;
        tracing::info!("shutting down: readiness off, draining in-flight requests");
        self.shutting_down.store(true, Ordering::Release);
        health
            .set_service_status(
                server::SERVICE_NAME,
                tonic_health::ServingStatus::NotServing,
            )
            .await;
        health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        // Stop accepting; connections get GOAWAY. Then wait for the checks in flight (not for
        // idle keep-alive connections, which a proxy may hold open) within the grace period.
        let _ = stop_tx.send(true);
        let grace = self.config.server.shutdown_grace;
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if grpc_task.is_finished() && http_task.is_finished() {
                break;
            }
            if self.authz.in_flight.load(Ordering::Acquire) == 0 {
                // Let responses already decided be written out.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                if self.authz.in_flight.load(Ordering::Acquire) == 0 {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(grace = ?grace, "grace period over; exiting with requests in flight");
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        grpc_task.abort();
        http_task.abort();
        if let Ok(Err(e)) = grpc_task.await {
            return Err(e).context("gRPC server failed");
        }
        match http_task.await {
            Ok(Err(e)) => Err(e).context("HTTP server failed"),
            _ => Ok(()),
        }
    }
}

/// What `meshauthz eval` decides.
#[derive(Debug)]
pub enum EvalInput {
    /// A protojson CheckRequest (only `attributes`): the pipeline builds the input document and
    /// verifies tokens, as when serving.
    Check(Box<Attributes>),
    /// An OPA-Envoy input document (`attributes` with any of `parsed_path`, `peer`, `jwt`, …):
    /// evaluated exactly as given, every key kept, no token verified.
    Document(regorus::Value),
}

/// Keys of the input document meshauthz builds that a CheckRequest does not have.
const DOCUMENT_KEYS: &[&str] = &[
    "parsed_path",
    "parsed_query",
    "parsed_body",
    "truncated_body",
    "peer",
    "jwt",
    "version",
];

/// Reads an `eval` input: a file, or standard input for `-`.
pub fn read_eval_input(path: &Path) -> anyhow::Result<EvalInput> {
    let (name, text) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("standard input: cannot read input")?;
        ("standard input".to_string(), text)
    } else {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read input", path.display()))?;
        (path.display().to_string(), text)
    };
    parse_eval_input(&name, &text)
}

fn parse_eval_input(name: &str, text: &str) -> anyhow::Result<EvalInput> {
    let expected = "expected a protojson CheckRequest or an OPA-Envoy input document (an object with \"attributes\")";
    let json: serde_json::Value =
        serde_json::from_str(text).with_context(|| format!("{name}: {expected}"))?;
    let Some(obj) = json.as_object().filter(|o| o.contains_key("attributes")) else {
        anyhow::bail!("{name}: {expected}");
    };
    if obj.keys().any(|k| DOCUMENT_KEYS.contains(&k.as_str())) {
        let doc =
            regorus::Value::from_json_str(text).with_context(|| format!("{name}: {expected}"))?;
        return Ok(EvalInput::Document(doc));
    }
    let parsed: CheckRequestJson =
        serde_json::from_value(json).with_context(|| format!("{name}: {expected}"))?;
    Ok(EvalInput::Check(Box::new(parsed.attributes)))
}

/// Signals that end `serve`: SIGTERM or SIGINT. SIGHUP forces a policy reload.
pub async fn shutdown_signal(app: Arc<App>) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers");
        return std::future::pending().await;
    };
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading the policy");
                let store = app.authz.policy.clone();
                let _ = tokio::task::spawn_blocking(move || store.reload()).await;
            }
        }
    }
}

/// The decision as `eval` prints it.
pub fn decision_json(c: &crate::authz::Checked, print_input: bool) -> String {
    let d = &c.decision;
    let headers = |hs: &[crate::decision::Header]| -> Vec<serde_json::Value> {
        hs.iter()
            .map(|h| serde_json::json!({"name": h.name, "value": h.value, "append": h.append}))
            .collect()
    };
    let mut v = serde_json::json!({
        "decision_id": c.decision_id,
        "allowed": d.allowed,
        "status": if d.allowed { 200 } else { d.status },
        "reason": d.reason.category,
        "detail": d.reason.detail,
        "headers": headers(&d.headers),
        "response_headers_to_add": headers(&d.response_headers_to_add),
        "request_headers_to_remove": d.request_headers_to_remove,
        "body": d.body,
        "dynamic_metadata": d.dynamic_metadata.as_ref()
            .and_then(|m| m.to_json_str().ok())
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok()),
    });
    if print_input
        && let Some(input) = &c.input
        && let Some(obj) = v.as_object_mut()
    {
        let json = input
            .to_json_str()
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
        obj.insert("input".into(), json.unwrap_or_default());
    }
    serde_json::to_string_pretty(&v).unwrap_or_default()
}
