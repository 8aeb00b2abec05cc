//! `GET /healthz` (the process is up) and `GET /readyz` (database reachable, schema current).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::db::migrate;
use crate::state::AppState;

/// Liveness: answers while the process runs.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the database answers and is at this binary's schema version, else 503 with the reason.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let not_ready = |reason: String| (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "not_ready", "reason": reason })));
    let client = match state.pool.get().await {
        Ok(c) => c,
        Err(e) => return not_ready(format!("database unreachable: {e}")),
    };
    match migrate::check_current(&client).await {
        Ok(version) => (StatusCode::OK, Json(json!({ "status": "ready", "schema_version": version }))),
        Err(e) => not_ready(e.to_string()),
    }
}
