//! Shared state handed to every handler.

use std::sync::Arc;

use axum::extract::FromRef;
use deadpool_postgres::Pool;

use crate::auth::AuthConfig;
use crate::db::catalog::CatalogHandle;
use crate::live::admission::{PerUserLimit, SnapshotCapacity, SnapshotLimits};
use crate::live::barrier::Barriers;
use crate::live::hub::Hub;
use crate::live::shape::Shapes;

/// Request and resource limits (configurable; docs/operations.md lists them with their flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Most ops in one batch (and blobs in one coordination).
    pub max_ops_per_batch: usize,
    /// Most concurrent WebSocket connections and waiting `GET /v1/shape` requests together (503 above it).
    pub max_connections: usize,
    /// Most concurrent WebSocket connections of one user (the next one is closed with 4029).
    pub max_connections_per_user: usize,
    /// Bytes of `where` filters one user's WebSocket subscriptions hold together (`Filter::retained_bytes`); a
    /// subscription beyond is refused with `too_many_filter_bytes`.
    pub max_filter_bytes_per_user: usize,
    /// Most `/v1/shape` requests of one user that wait, stream or are being written at once (snapshots, live
    /// long-polls, SSE, answers the socket has not taken yet); 429 `too_many_requests` beyond.
    pub max_shape_requests_per_user: usize,
    /// How long a request waits for a pooled connection before it is answered 503 `database_busy` (or 429
    /// `too_many_requests` when its user's share stayed full).
    pub pool_wait_timeout: std::time::Duration,
    /// How long a user's transaction waits for a lock before it fails (503 `locked`); `None`: as long as it takes.
    pub lock_timeout: Option<std::time::Duration>,
    /// Most pooled connections one user's requests hold at once (db::user_pool).
    pub max_db_connections_per_user: usize,
    /// Snapshot concurrency (a pool of their own), per-user places, spool memory and spill files.
    pub snapshots: SnapshotLimits,
    /// Most open client TCP connections (HTTP and WebSocket alike); kept below the file-descriptor limit so
    /// the database connections and the replication stream always have descriptors. Above it, the server
    /// stops accepting until a connection closes.
    pub max_http_connections: usize,
    /// Time a client has to send a request's complete header; also how long an idle keep-alive connection
    /// stays open between requests (slowloris and idle sockets cannot pile up).
    pub header_timeout: std::time::Duration,
    /// Time a client has to send a write request's whole body once its header is in (408 `body_timeout`).
    pub body_timeout: std::time::Duration,
    /// Bytes of write request bodies in flight at once, server-wide (503 `server_busy` beyond).
    pub max_body_bytes_in_flight: usize,
    /// Bytes of one user's write request bodies in flight at once (429 `too_many_requests` beyond).
    pub max_body_bytes_in_flight_per_user: usize,
    /// Longest a write to a client connection may wait without progress before the connection is closed
    /// (`app::WRITE_STALL_TIMEOUT` by default; not a flag: tests shorten it).
    pub write_stall_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 8 * 1024 * 1024,
            max_ops_per_batch: 1000,
            max_connections: 100_000,
            max_connections_per_user: 32,
            max_filter_bytes_per_user: 16 * 1024 * 1024,
            max_shape_requests_per_user: 64,
            pool_wait_timeout: std::time::Duration::from_secs(5),
            lock_timeout: Some(std::time::Duration::from_secs(5)),
            max_db_connections_per_user: 4,
            snapshots: SnapshotLimits::default(),
            max_http_connections: 10_000,
            header_timeout: std::time::Duration::from_secs(20),
            body_timeout: std::time::Duration::from_secs(60),
            max_body_bytes_in_flight: 256 * 1024 * 1024,
            max_body_bytes_in_flight_per_user: 32 * 1024 * 1024,
            write_stall_timeout: crate::app::WRITE_STALL_TIMEOUT,
        }
    }
}

/// Everything a handler needs: a handle, cloned for every request (by the router, the `State` extractor and the
/// auth extractor), so it is one reference count; the state itself is [`Shared`].
#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// Wraps the state for sharing between handlers.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The server's state, shared by every handler through [`AppState`].
#[derive(Debug, Clone)]
pub struct Shared {
    /// Pooled connections as the server's role (user work switches role per transaction); never used by snapshots.
    pub pool: Pool,
    /// One connection of its own for `/readyz` and the metrics' database sample: a pool busy with requests is not
    /// a database that is down (with the request pool, every instance under load went unready at once).
    pub probe_pool: Pool,
    /// The same pool as users' requests draw on it: each user holds at most a share (`Limits::max_db_connections_per_user`).
    pub user_pool: Arc<crate::db::user_pool::UserPool>,
    /// Snapshot jobs' own connections, per-user places and spool budget.
    pub snapshots: Arc<SnapshotCapacity>,
    /// Open WebSockets per user (`Limits::max_connections_per_user`).
    pub sockets_per_user: Arc<PerUserLimit>,
    /// Bytes of subscription filters per user, across their WebSockets (`Limits::max_filter_bytes_per_user`).
    pub filter_bytes_per_user: Arc<PerUserLimit>,
    /// `/v1/shape` requests per user that wait or stream (`Limits::max_shape_requests_per_user`).
    pub shape_requests_per_user: Arc<PerUserLimit>,
    /// Write request bodies in flight (`Limits::max_body_bytes_in_flight`, per user and in all).
    pub bodies: Arc<crate::http::batch::BodyBudget>,
    /// Token verification.
    pub auth: Arc<AuthConfig>,
    /// Synced tables and their columns.
    pub catalog: Arc<CatalogHandle>,
    /// Request limits.
    pub limits: Limits,
    /// Live-stream fan-out.
    pub hub: Arc<Hub>,
    /// Snapshot barriers (one emitter task for every snapshot).
    pub barriers: Barriers,
    /// The Electric-compatible shape endpoint (`GET /v1/shape`): handle key, compiled definitions, timing.
    pub shapes: Arc<Shapes>,
    /// Replication slot name.
    pub slot_name: String,
    /// Origins allowed to call the API from a browser.
    pub cors: crate::http::cors::CorsOrigins,
    /// Becomes true when the server shuts down (connections then close with the shutdown code).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

impl FromRef<AppState> for Arc<AuthConfig> {
    fn from_ref(state: &AppState) -> Self {
        state.auth.clone()
    }
}
