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
    dry_run: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    jwks: Vec<JwksStatus>,
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
        modules: policy.modules().len(),
        dry_run: app.authz.dry_run,
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
