//! The plain HTTP listener: `/healthz` (liveness), `/readyz` (readiness with details) and
//! `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{any, get};
use serde::Serialize;
use tokio::net::TcpListener;

use crate::app::App;
use crate::jwt::JwksStatus;

#[derive(Debug, Serialize)]
struct Readiness {
    ready: bool,
    policy_revision: String,
    decision_rule: String,
    engine: &'static str,
    modules: usize,
    /// Why `engine: auto` runs the serving revision on the interpreter.
    #[serde(skip_serializing_if = "Option::is_none")]
    engine_fallback: Option<String>,
    dry_run: bool,
    /// The last reload that was refused (the revision above kept serving).
    #[serde(skip_serializing_if = "Option::is_none")]
    last_reload_error: Option<ReloadErrorView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    jwks: Vec<JwksStatus>,
}

#[derive(Debug, Serialize)]
struct ReloadErrorView {
    time: String,
    stage: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    location: Option<String>,
    message: String,
}

pub fn router(app: Arc<App>) -> Router {
    let mut router = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let authz = &app.config.server.http_authz;
    if authz.enabled {
        let prefix = authz.path_prefix.clone();
        router = router
            .route(&prefix, any(crate::http_authz::handle))
            .route(&format!("{prefix}/"), any(crate::http_authz::handle))
            .route(
                &format!("{prefix}/{{*rest}}"),
                any(crate::http_authz::handle),
            );
    }
    router.with_state(app)
}

async fn readyz(State(app): State<Arc<App>>) -> impl IntoResponse {
    let policy = app.authz.policy.current();
    let ready = app.is_ready();
    let body = Readiness {
        ready,
        policy_revision: policy.revision().to_string(),
        decision_rule: policy.decision_rule().to_string(),
        engine: policy.engine(),
        engine_fallback: policy.fallback().map(str::to_owned),
        modules: policy.modules().len(),
        dry_run: app.authz.dry_run,
        last_reload_error: app.authz.policy.last_error().map(|e| ReloadErrorView {
            time: e.time,
            stage: e.stage,
            location: e.location,
            message: e.message,
        }),
        jwks: app.authz.jwt.jwks_status(),
    };
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body))
}

async fn metrics(State(app): State<Arc<App>>) -> impl IntoResponse {
    app.metrics
        .set_jwt_cache_entries(app.authz.jwt.cache_entries());
    // Ages are computed now, as /readyz does, not left at their value of the last fetch.
    for s in app.authz.jwt.jwks_status() {
        let age = s
            .age_seconds
            .map_or(-1, |a| i64::try_from(a).unwrap_or(i64::MAX));
        app.metrics.set_jwks_age(&s.provider, age);
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
}

/// Serves until `shutdown` resolves (over TLS when `server.tls` covers the HTTP listener).
pub async fn run(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<Arc<crate::tls::Tls>>,
    connections: crate::conn::Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let router = router(app);
    match tls {
        Some(tls) => {
            axum::serve(crate::tls::listener(&tls, listener, connections)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
        None => {
            axum::serve(crate::conn::Listener::new(listener, connections)?, router)
                .with_graceful_shutdown(shutdown)
                .await
        }
    }
}
