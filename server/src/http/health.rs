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
    let not_ready = |reason: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": reason })),
        )
    };
    let client = match state.pool.get().await {
        Ok(c) => c,
        Err(e) => return not_ready(format!("database unreachable: {e}")),
    };
    match migrate::check_current(&client).await {
        Ok(version) => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "schema_version": version })),
        ),
        Err(e) => not_ready(e.to_string()),
    }
}

/// `GET /v1/admin/replication` (admin token): slot health and stream position, for operators.
pub async fn replication(
    State(state): State<AppState>,
    user: crate::auth::AuthUser,
) -> Result<Json<Value>, axum::response::Response> {
    use axum::response::IntoResponse;
    if !user.admin {
        return Err(crate::auth::AuthError::Forbidden.into_response());
    }
    let client = state
        .pool
        .get()
        .await
        .map_err(|e| crate::error::ApiError::from(e).into_response())?;
    let slot = deeprecall_replication::slot::slot_info(&client, &state.slot_name)
        .await
        .map_err(|e| crate::error::from_db(&e).into_response())?;
    Ok(Json(json!({
        "slot": state.slot_name,
        "exists": slot.is_some(),
        "active": slot.as_ref().map(|s| s.active),
        "wal_status": slot.as_ref().and_then(|s| s.wal_status.clone()),
        "safe_wal_size": slot.as_ref().and_then(|s| s.safe_wal_size),
        "retained_bytes": slot.as_ref().and_then(|s| s.retained_bytes),
        "confirmed_flush_lsn": slot.as_ref().and_then(|s| s.confirmed_flush_lsn).map(|l| l.to_string()),
        "hub": state.hub.stats(),
    })))
}
