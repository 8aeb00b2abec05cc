//! The HTTP router and the serve loop.

use std::future::Future;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tower_http::trace::TraceLayer;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::http::{batch, blobs, health};
use crate::state::AppState;

/// All routes. Tests drive this directly, without a socket.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let cors = crate::http::cors::layer(&state.cors);
    let router = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/v1/batch", post(batch::post_batch))
        .route("/v1/blobs/coordinate", post(blobs::coordinate))
        .route("/v1/blobs", get(blobs::my_inventory))
        .route("/v1/blobs/{sha256}", get(blobs::get_blob))
        .route("/v1/admin/blobs", get(blobs::admin_inventory))
        .route("/v1/admin/replication", get(health::replication))
        .route("/v1/stream", get(crate::live::ws::stream))
        .route("/v1/shape", get(crate::live::shape::get_shape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(TraceLayer::new_for_http())
        .with_state(state);
    // Outermost, so preflights are answered before routing and every response (errors included) gets the headers.
    match cors {
        Some(cors) => router.layer(cors),
        None => router,
    }
}

/// Serves `router(state)` on `listener` until `shutdown` resolves, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    // No Nagle: a live change is one small frame, and waiting for an ACK before sending it adds up to ~40 ms of
    // latency to exactly the messages this server exists to deliver quickly.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such endpoint; see docs/api.md",
    )
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}
