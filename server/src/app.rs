//! The HTTP router and the serve loop.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderName;
use axum::routing::{get, post};
use tokio::net::TcpListener;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::request_id::{
    MakeRequestUuid, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::http::{admin, batch, blobs, health};
use crate::state::AppState;

/// All routes. Tests drive this directly, without a socket.
pub fn router(state: AppState) -> Router {
    let body_limit = state.limits.max_body_bytes;
    let cors = crate::http::cors::layer(&state.cors);
    let router = Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route(
            "/v1/batch",
            post(batch::post_batch).layer(axum::middleware::from_fn(crate::metrics::track_batch)),
        )
        .route("/v1/blobs/coordinate", post(blobs::coordinate))
        .route("/v1/blobs", get(blobs::my_inventory))
        .route("/v1/blobs/{sha256}", get(blobs::get_blob))
        .route("/v1/admin/blobs", get(admin::blobs))
        .route("/v1/admin/stats", get(admin::stats))
        .route("/v1/admin/replication", get(health::replication))
        .route("/admin", get(admin::page))
        .route("/admin/", get(admin::page_slash))
        .route("/admin/app.js", get(admin::script))
        .route("/admin/app.css", get(admin::style))
        .route("/v1/stream", get(crate::live::ws::stream))
        .route("/v1/shape", get(crate::live::shape::get_shape))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(request_span)
                .on_response(log_server_error)
                .on_failure(log_failure),
        )
        .with_state(state);
    // Outermost, so preflights are answered before routing and every response (errors included) gets the headers.
    let router = match cors {
        Some(cors) => router.layer(cors),
        None => router,
    };
    with_request_id(router)
}

/// The header carrying a request's id, in both directions.
pub const REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Gives every request an id (the caller's `x-request-id` when it is usable, else a new UUID), puts it on every
/// response (preflights and errors included: these layers wrap everything else), and lets the trace span record
/// it, so each log line of a request carries it.
fn with_request_id(router: Router) -> Router {
    router
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER))
        .layer(SetRequestIdLayer::new(REQUEST_ID_HEADER, MakeRequestUuid))
        .layer(axum::middleware::map_request(drop_unusable_request_id))
}

/// An incoming id is kept only if it is one header of 1 to 128 characters from a conservative set: it ends up in
/// log lines and in the response, so a client must not be able to inject line breaks, escape sequences or
/// kilobytes into either. Anything else is replaced with a generated id.
async fn drop_unusable_request_id(mut req: Request) -> Request {
    let headers = req.headers();
    let mut values = headers.get_all(&REQUEST_ID_HEADER).iter();
    let usable = match (values.next(), values.next()) {
        (None, _) => return req,
        (Some(v), None) => usable_request_id(v.as_bytes()),
        (Some(_), Some(_)) => false,
    };
    if !usable {
        req.headers_mut().remove(&REQUEST_ID_HEADER);
    }
    req
}

fn usable_request_id(id: &[u8]) -> bool {
    (1..=128).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:/+=@".contains(b))
}

/// The span of one HTTP request: its id, method and path. Only the path: a WebSocket URL may carry the user's
/// token in its query (`access_token`), which must not reach the logs. INFO level, so that warnings and errors
/// logged while handling the request carry the id under the default filter.
fn request_span(req: &Request) -> tracing::Span {
    let id = req
        .extensions()
        .get::<RequestId>()
        .and_then(|id| id.header_value().to_str().ok())
        .unwrap_or("");
    tracing::info_span!(
        "request",
        request_id = %id,
        method = %req.method(),
        path = %req.uri().path(),
    )
}

/// tower-http's default logs every 5xx response at ERROR. Two kinds are not worth an ERROR line here:
/// - A 503 is the server saying "not now": `/readyz` of an instance that is starting or on standby (which a load
///   balancer polls every few seconds, for as long as the standby waits), or load shed on purpose
///   (`too_many_snapshots`, `too_many_connections`). None of them is an error an operator must act on, and a 503 that
///   does come from a fault is logged where it is answered, with its cause (`database unavailable`, the pool wait
///   timeout, `readiness: database unreachable`: WARN).
/// - A 500 made by [`crate::error::ApiError`] was logged at ERROR where it was made, with its cause; a second line
///   without the cause made one fault count as two.
///
/// Those are logged here at DEBUG, under tower-http's own target (`RUST_LOG=tower_http=debug` shows them, as it
/// shows every request); any other 5xx stays at ERROR, and so does a response that failed outright
/// ([`log_failure`]).
fn log_server_error<B>(
    response: &axum::http::Response<B>,
    latency: Duration,
    _span: &tracing::Span,
) {
    let status = response.status();
    if !status.is_server_error() {
        return;
    }
    let latency_ms = latency.as_secs_f64() * 1000.0;
    let logged = response
        .extensions()
        .get::<crate::error::LoggedAtSource>()
        .is_some();
    if status == StatusCode::SERVICE_UNAVAILABLE || logged {
        tracing::debug!(
            target: "tower_http::trace::on_failure",
            latency_ms,
            "response {status}"
        );
    } else {
        tracing::error!(
            target: "tower_http::trace::on_failure",
            classification = %format!("Status code: {status}"),
            latency_ms,
            "response failed"
        );
    }
}

/// A response that failed outright (its body errored): ERROR. Responses with a 5xx status are logged by
/// [`log_server_error`].
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    if let ServerErrorsFailureClass::Error(error) = class {
        tracing::error!(
            target: "tower_http::trace::on_failure",
            error = %error,
            latency_ms = latency.as_secs_f64() * 1000.0,
            "response failed"
        );
    }
}

/// Holds one of the server's client-connection slots (see [`serve`]). Every request carries its connection's slot
/// in its extensions, so a WebSocket keeps the slot for as long as the upgraded socket lives.
#[derive(Debug, Clone)]
pub struct ConnectionSlot(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// hyper's read buffer, which bounds a request's line and header together (431 once a read leaves it fuller: hyper
/// checks between reads, so in practice somewhere between 128 and about 192 KiB; a request target over
/// 65,534 bytes is hyper's 414 regardless). hyper's default (~400 KiB) let every connection that had not finished
/// its header hold up to a megabyte of it for `--header-timeout-secs`; 128 KiB is a request target at hyper's limit
/// plus 64 KiB of headers, far above what browsers send (a few KiB, cookies included).
const MAX_HEADER_BUFFER_BYTES: usize = 128 * 1024;

/// TCP keepalive on every client connection: probed after 60 s without a packet, every 10 s, reset after 6
/// unanswered probes (about two minutes). A peer that vanished without a FIN (a phone that lost its network, a
/// laptop that went to sleep) otherwise leaves an idle WebSocket open for ever, since the server writes to it only
/// when its user has a change: it holds a connection slot and one of its user's `--max-connections-per-user`
/// places, so a user whose devices dropped off often enough would be refused new sockets (4029). The kernel does
/// the probing, so an idle connection costs the server no wake-up; once it gives up, the socket's pending read
/// fails and the connection ends.
const TCP_KEEPALIVE: socket2::TcpKeepalive = socket2::TcpKeepalive::new()
    .with_time(Duration::from_secs(60))
    .with_interval(Duration::from_secs(10))
    .with_retries(6);

/// Longest a write to a client connection may wait without progress before the connection is closed.
///
/// Without it, a client that requests and then stops reading kept its response in the server for as long as its
/// socket stayed open (TCP keepalive does not help: the peer is alive, it just does not read): 60 unread catch-ups of
/// one user held 3.1 GB. Longer than the WebSocket's own write timeout (30 s, which closes with 4008 and a reason)
/// and the SSE stream's, so those policies act first; this is the floor under every response.
pub const WRITE_STALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(45);

/// Serves `router(state)` on `listener` until `shutdown` resolves, then drains in-flight requests.
///
/// Our own accept loop rather than `axum::serve`, for the limits a public server needs (docs/operations.md).
/// HTTP/1.1 only (with upgrades): browsers never speak cleartext HTTP/2, and hyper's HTTP/1-or-2 sniffing reads
/// the first bytes without any timeout, so a silent connection would stay open for ever.
/// - at most `limits.max_http_connections` client connections (a semaphore taken *before* accepting: at the cap
///   new connections wait in the kernel's backlog instead of costing a file descriptor each), kept below the
///   process's descriptor limit so Postgres connections never fail for want of one;
/// - `limits.header_timeout` for a complete request header, which hyper also applies while a keep-alive
///   connection waits for its next request: slowloris and idle sockets are closed, not kept for ever;
/// - [`MAX_HEADER_BUFFER_BYTES`] for a request's line and header;
/// - [`TCP_KEEPALIVE`], so connections to vanished peers end;
/// - [`WRITE_STALL_TIMEOUT`], so responses to clients that stop reading are not held for ever.
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
        .max_buf_size(MAX_HEADER_BUFFER_BYTES)
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
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_keepalive(&TCP_KEEPALIVE) {
            tracing::debug!(error = %e, "could not set TCP keepalive");
        }
        // A write that makes no progress for WRITE_STALL_TIMEOUT ends the connection (and frees the response it
        // was writing); a connection that is merely idle is not affected.
        let mut tcp = tokio_io_timeout::TimeoutStream::new(tcp);
        tcp.set_write_timeout(Some(limits.write_stall_timeout));
        let tcp = Box::pin(tcp);
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

#[cfg(test)]
mod tests {
    use super::usable_request_id;

    #[test]
    fn request_ids_from_clients_are_kept_only_when_harmless() {
        assert!(usable_request_id(b"0b9c1d2e-3f40-4a5b-8c6d-7e8f9a0b1c2d"));
        assert!(usable_request_id(b"req_42:edge/eu-1"));
        assert!(!usable_request_id(b""));
        assert!(!usable_request_id(&[b'a'; 129]));
        assert!(!usable_request_id(b"abc def"));
        assert!(!usable_request_id(b"abc\x1b[31m"));
        assert!(!usable_request_id("caf\u{e9}".as_bytes()));
    }
}
