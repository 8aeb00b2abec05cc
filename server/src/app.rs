//! The HTTP router and the serve loop.

use std::future::Future;
use std::sync::Arc;

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

/// Holds one of the server's client-connection slots (see [`serve`]). Every request carries its connection's slot
/// in its extensions, so a WebSocket keeps the slot for as long as the upgraded socket lives.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Serves `router(state)` on `listener` until `shutdown` resolves, then drains in-flight requests.
///
/// Our own accept loop rather than `axum::serve`, for the limits a public server needs (docs/operations.md).
/// HTTP/1.1 only (with upgrades): browsers never speak cleartext HTTP/2, and hyper's HTTP/1-or-2 sniffing reads
/// the first bytes without any timeout, so a silent connection would stay open for ever.
/// - at most `limits.max_http_connections` client connections (a semaphore taken *before* accepting: at the cap
///   new connections wait in the kernel's backlog instead of costing a file descriptor each), kept below the
///   process's descriptor limit so Postgres connections never fail for want of one;
/// - `limits.header_timeout` for a complete request header, which hyper also applies while a keep-alive
///   connection waits for its next request: slowloris and idle sockets are closed, not kept for ever.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};

    let limits = state.limits;
    let capacity = limits.max_http_connections.max(1);
    let app = router(state);
    let slots = Arc::new(tokio::sync::Semaphore::new(capacity));
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let (closing_tx, closing) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => ConnectionSlot(Arc::new(slot)),
                Err(_) => break,
            },
        };
        let tcp = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or a connection reset before accept: wait a little
                    // rather than spin; the loop goes on.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // No Nagle: a live change is one small frame, and waiting for an ACK before sending it adds up to ~40 ms
        // of latency to exactly the messages this server exists to deliver quickly.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
        let service = tower::ServiceBuilder::new()
            .map_request({
                let slot = slot.clone();
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(slot.clone());
                    req
                }
            })
            .service(app.clone());
        let connection = builder
            .serve_connection(
                TokioIo::new(tcp),
                hyper_util::service::TowerToHyperService::new(service),
            )
            .with_upgrades();
        let mut closing = closing.clone();
        tokio::spawn(async move {
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                () = crate::shutdown::until_true(&mut closing) => {
                    // Finish the request in flight, then close (idle keep-alives close at once).
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
            drop(slot);
        });
    }
    drop(listener);
    closing_tx.send_replace(true);
    // Wait (bounded) until every connection has returned its slot: in-flight requests finish, WebSockets close
    // themselves on the same shutdown signal.
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        slots.acquire_many(u32::try_from(capacity).unwrap_or(u32::MAX)),
    )
    .await;
    Ok(())
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
