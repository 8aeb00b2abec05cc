//! `GET /healthz` (the process is up) and `GET /readyz` (database reachable, schema current).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde_json::{Value, json};

use crate::db::migrate;
use crate::live::hub::StreamState;
use crate::state::AppState;

/// Liveness: answers while the process runs.
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the database answers, is at this binary's schema version, and this process streams from
/// the replication slot (a server on standby, whose slot another process holds, is not ready: a load balancer
/// must send clients to the one that streams); else 503 with the reason.
pub async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let not_ready = |reason: &str, detail: String| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": reason, "detail": detail })),
        )
    };
    // Its own connection: a request pool whose connections are all busy says nothing about the database. Bounded:
    // a load balancer's probe must be answered even when Postgres hangs.
    let probe = tokio::time::timeout(std::time::Duration::from_secs(5), state.probe_pool.get());
    let client = match probe
        .await
        .unwrap_or(Err(deadpool_postgres::PoolError::Timeout(
            deadpool_postgres::TimeoutType::Wait,
        ))) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %crate::error::Chain(&e), "readiness: database unreachable");
            return not_ready(
                "database_unreachable",
                "no database connection could be opened; see the server log".into(),
            );
        }
    };
    let version = match migrate::check_current(&client).await {
        Ok(version) => version,
        Err(e) => return not_ready("schema", e.to_string()),
    };
    match state.hub.stream_state() {
        StreamState::Streaming => (
            StatusCode::OK,
            Json(json!({ "status": "ready", "schema_version": version })),
        ),
        StreamState::Starting(_) => not_ready(
            "stream_starting",
            "the replication stream is starting or reconnecting; GET /v1/admin/replication says why if it failed"
                .into(),
        ),
        StreamState::Standby(holder) => not_ready(
            "standby",
            format!(
                "another process holds the replication slot ({holder}); this server waits on standby"
            ),
        ),
        StreamState::Failed(_) => not_ready(
            "stream_failed",
            "the replication stream stopped: it cannot be decoded; see the server log".into(),
        ),
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
    // Who streams from the slot: this process or another (a server on standby names the one that streams).
    let holder = deeprecall_replication::slot::slot_holder(&client, &state.slot_name)
        .await
        .ok()
        .flatten()
        .map(|h| {
            json!({
                "pid": h.pid,
                "application_name": h.application_name,
                "client_addr": h.client_addr,
                "since": h.since,
            })
        });
    Ok(Json(json!({
        "slot": state.slot_name,
        "exists": slot.is_some(),
        "active": slot.as_ref().map(|s| s.active),
        "wal_status": slot.as_ref().and_then(|s| s.wal_status.clone()),
        "safe_wal_size": slot.as_ref().and_then(|s| s.safe_wal_size),
        "retained_bytes": slot.as_ref().and_then(|s| s.retained_bytes),
        "confirmed_flush_lsn": slot.as_ref().and_then(|s| s.confirmed_flush_lsn).map(|l| l.to_string()),
        // Whether this process streams from the slot, or who else holds it (standby).
        "stream": state.hub.stream_state(),
        "holder": holder,
        "hub": state.hub.stats(),
    })))
}
