//! Prometheus metrics: the one place that names every metric (type, unit, HELP text), the typed functions the rest
//! of the server calls to count, and the `/metrics` endpoint on its own listener (`--metrics-listen`).
//!
//! ```text
//!  counting sites ──metrics::frame_sent(..), jwt_rejected(..), ...──► global recorder (process-wide counters)
//!                                                                          │
//!  GET /metrics ──► sample this server's state (slot, pool, hub) ──► set gauges ─┴─► render text
//! ```
//!
//! Two kinds of metric, because a global recorder can be installed only once per process:
//! - **Counters and histograms** (and the subscription gauge) are process-wide. In production a process runs one
//!   server, so they are that server's; a test process running many servers reads them as deltas.
//! - **Per-server gauges** (slot lag, pool, connections, history) are not kept up to date continuously: each scrape
//!   samples the state of the server whose listener answers and sets them just before rendering, under a lock, so
//!   two servers in one process never mix their values in one answer.
//!
//! Nothing is recorded until [`install`] ran (the recorder is installed only when `--metrics-listen` is on): the
//! typed functions then cost one relaxed atomic load. A few counters are mirrored in plain atomics
//! ([`Totals`]) for the admin page, which works without the metrics listener.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Counter, Histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::state::AppState;

/// Metric names. Prometheus conventions: `deeprecall_` prefix, base units in the name (`_bytes`, `_seconds`),
/// `_total` on counters.
pub mod names {
    /// Gauge: 1 when this scrape's query to Postgres succeeded.
    pub const DATABASE_UP: &str = "deeprecall_database_up";
    /// Gauge: 1 when the replication slot exists.
    pub const SLOT_EXISTS: &str = "deeprecall_replication_slot_exists";
    /// Gauge: 1 when a walsender holds the slot.
    pub const SLOT_ACTIVE: &str = "deeprecall_replication_slot_active";
    /// Gauge: current WAL position minus the slot's confirmed flush position.
    pub const SLOT_LAG_BYTES: &str = "deeprecall_replication_slot_lag_bytes";
    /// Gauge: current WAL position minus the slot's restart position (WAL the slot keeps).
    pub const SLOT_RETAINED_BYTES: &str = "deeprecall_replication_slot_retained_bytes";
    /// Gauge: `safe_wal_size` of the slot.
    pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "deeprecall_replication_slot_safe_wal_size_bytes";
    /// Gauge (state set, label `status`): the slot's `wal_status`.
    pub const SLOT_WAL_STATUS: &str = "deeprecall_replication_slot_wal_status";
    /// Gauge: slot generation (first number of client offsets).
    pub const SLOT_GENERATION: &str = "deeprecall_replication_slot_generation";
    /// Counter: slot recreations.
    pub const SLOT_RECREATIONS: &str = "deeprecall_replication_slot_recreations_total";
    /// Counter: decoded transactions.
    pub const TRANSACTIONS: &str = "deeprecall_replication_transactions_total";
    /// Counter: decoded row changes.
    pub const CHANGES: &str = "deeprecall_replication_changes_total";
    /// Counter: row changes routed to users.
    pub const ROUTED_CHANGES: &str = "deeprecall_stream_routed_changes_total";
    /// Counter: frames sent to clients.
    pub const FRAMES_SENT: &str = "deeprecall_stream_frames_sent_total";
    /// Counter: bytes of frames sent to clients.
    pub const SENT_BYTES: &str = "deeprecall_stream_sent_bytes_total";
    /// Counter (label `reason`): `must_refetch` answers.
    pub const MUST_REFETCH: &str = "deeprecall_stream_must_refetch_total";
    /// Counter: connections closed for being too slow.
    pub const SLOW_CLIENT_DISCONNECTS: &str = "deeprecall_stream_slow_client_disconnects_total";
    /// Gauge (label `transport`): open stream connections.
    pub const CONNECTIONS: &str = "deeprecall_stream_connections";
    /// Gauge (label `transport`): live subscriptions.
    pub const SUBSCRIPTIONS: &str = "deeprecall_stream_subscriptions";
    /// Gauge: users with at least one open connection.
    pub const USERS: &str = "deeprecall_stream_users";
    /// Gauge: bytes of resume history held in memory.
    pub const HISTORY_BYTES: &str = "deeprecall_stream_history_bytes";
    /// Gauge.
    pub const QUEUED_BYTES: &str = "deeprecall_stream_queued_bytes";
    /// Gauge.
    pub const SNAPSHOTS_READING: &str = "deeprecall_snapshots_reading";
    /// Gauge.
    pub const SNAPSHOTS_WAITING: &str = "deeprecall_snapshots_waiting";
    /// Counter.
    pub const SNAPSHOTS_REJECTED: &str = "deeprecall_snapshots_rejected_total";
    /// Gauge.
    pub const SNAPSHOT_BUFFERED_BYTES: &str = "deeprecall_snapshot_buffered_bytes";
    /// Counter.
    pub const SNAPSHOT_SPILLED_BYTES: &str = "deeprecall_snapshot_spilled_bytes_total";
    /// Gauge.
    pub const SNAPSHOT_SPILL_FILES: &str = "deeprecall_snapshot_spill_files";
    /// Gauge.
    pub const STREAM_STATE: &str = "deeprecall_replication_stream_state";
    /// Counter (label `status`): `POST /v1/batch` responses.
    pub const BATCH_REQUESTS: &str = "deeprecall_batch_requests_total";
    /// Histogram: `POST /v1/batch` latency.
    pub const BATCH_DURATION: &str = "deeprecall_batch_request_duration_seconds";
    /// Histogram: rows (ops) per batch.
    pub const BATCH_ROWS: &str = "deeprecall_batch_rows";
    /// Counter (label `reason`): rejected tokens.
    pub const JWT_REJECTIONS: &str = "deeprecall_jwt_rejections_total";
    /// Counter (label `reason`): write request bodies refused for the in-flight budget or the body deadline.
    pub const BODY_REFUSALS: &str = "deeprecall_http_body_refusals_total";
    /// Gauge: bytes reserved by write request bodies in flight.
    pub const BODY_BYTES_IN_FLIGHT: &str = "deeprecall_http_body_bytes_in_flight";
    /// Counter (label `reason`): requests refused a pooled connection (a user's share, or the whole pool, busy).
    pub const DB_CONNECTION_REFUSALS: &str = "deeprecall_db_connection_refusals_total";
    /// Counter: `/v1/shape` requests refused for their user's `--max-shape-requests-per-user`.
    pub const SHAPE_REQUEST_REFUSALS: &str = "deeprecall_shape_requests_refused_total";
    /// Gauge: pool size limit.
    pub const POOL_MAX: &str = "deeprecall_db_pool_max_connections";
    /// Gauge: open pooled connections.
    pub const POOL_SIZE: &str = "deeprecall_db_pool_connections";
    /// Gauge: pooled connections handed out.
    pub const POOL_IN_USE: &str = "deeprecall_db_pool_connections_in_use";
    /// Gauge: requests waiting for a pooled connection.
    pub const POOL_WAITING: &str = "deeprecall_db_pool_waiting";
    /// Gauge (label `version`): always 1.
    pub const BUILD_INFO: &str = "deeprecall_build_info";
}

/// A metric's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up (resets at restart).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Buckets of observations.
    Histogram,
}

/// One metric: everything docs/operations.md lists about it.
#[derive(Debug, Clone, Copy)]
pub struct MetricDef {
    /// Full name.
    pub name: &'static str,
    /// Type.
    pub kind: Kind,
    /// Unit (the name carries it too).
    pub unit: Unit,
    /// Label name and the values registered at zero up front (so `rate()` sees them from the first scrape).
    pub label: Option<(&'static str, &'static [&'static str])>,
    /// HELP text.
    pub help: &'static str,
}

/// `wal_status` values of `pg_replication_slots` (PostgreSQL 15).
pub const WAL_STATUSES: &[&str] = &["reserved", "extended", "unreserved", "lost"];

/// States of the replication stream in this process (`StreamState`).
pub const STREAM_STATES: &[&str] = &["starting", "streaming", "standby", "failed"];

/// `must_refetch` reasons (docs/protocol.md).
pub const REFETCH_REASONS: &[&str] = &[
    "stream_discontinuity",
    "transaction_too_large",
    "truncated",
    "schema_changed",
    "invalid_offset",
    "slot_recreated",
    "offset_from_another_slot_generation",
    "offset_ahead_of_server",
    "offset_older_than_server_history",
    "table_truncated",
    "transaction_not_in_history",
];

/// Token rejection reasons: the 401 codes of docs/api.md.
pub const JWT_REASONS: &[&str] = &[
    "missing_token",
    "malformed_authorization_header",
    "malformed_token",
    "unsupported_algorithm",
    "invalid_signature",
    "token_expired",
    "token_not_yet_valid",
    "missing_claim",
    "invalid_issuer",
    "invalid_audience",
    "invalid_subject",
    "unknown_key",
    "unsupported_critical_header",
];

/// Why a request got no pooled connection (`deeprecall_db_connection_refusals_total`).
pub const DB_CONNECTION_REFUSAL_REASONS: &[&str] = &["user_share", "pool_busy"];

/// Why a write request's body was refused (`deeprecall_http_body_refusals_total`).
pub const BODY_REFUSAL_REASONS: &[&str] = &["user_share", "server_budget", "timeout"];

/// Transports a stream connection can use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /v1/stream` WebSocket.
    WebSocket,
    /// `GET /v1/shape?live=true` (Electric long-poll and SSE), while a request waits.
    LongPoll,
}

impl Transport {
    fn label(self) -> &'static str {
        match self {
            Self::WebSocket => "websocket",
            Self::LongPoll => "long_poll",
        }
    }
}

const TRANSPORTS: &[&str] = &["websocket", "long_poll"];

/// Every metric this server exports.
pub const CATALOGUE: &[MetricDef] = &[
    MetricDef {
        name: names::DATABASE_UP,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "1 when this scrape's query to PostgreSQL (pg_replication_slots) succeeded within 2 s, else 0; the slot gauges are then NaN.",
    },
    MetricDef {
        name: names::SLOT_EXISTS,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "1 when the replication slot (--slot) exists in PostgreSQL, else 0.",
    },
    MetricDef {
        name: names::SLOT_ACTIVE,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "1 when a walsender holds the replication slot (the live stream is connected), else 0.",
    },
    MetricDef {
        name: names::SLOT_LAG_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "WAL written but not yet confirmed by this server: pg_current_wal_lsn() - confirmed_flush_lsn of the slot, sampled at scrape time.",
    },
    MetricDef {
        name: names::SLOT_RETAINED_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "WAL the slot keeps on the PostgreSQL server's disk: pg_current_wal_lsn() - restart_lsn, sampled at scrape time.",
    },
    MetricDef {
        name: names::SLOT_SAFE_WAL_SIZE_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "WAL that may still be written before the slot is lost (safe_wal_size); -1 when max_slot_wal_keep_size = -1 (no limit).",
    },
    MetricDef {
        name: names::SLOT_WAL_STATUS,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: Some(("status", WAL_STATUSES)),
        help: "The slot's wal_status: 1 for the current value (reserved, extended, unreserved, lost), 0 for the others.",
    },
    MetricDef {
        name: names::SLOT_GENERATION,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Generation of the replication slot (incremented when it is recreated; the first number of client offsets).",
    },
    MetricDef {
        name: names::SLOT_RECREATIONS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Times the replication slot was lost or missing and was recreated (every live subscription then refetches).",
    },
    MetricDef {
        name: names::TRANSACTIONS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Transactions decoded from the replication stream.",
    },
    MetricDef {
        name: names::CHANGES,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Row changes (insert, update, delete, truncate) decoded from the replication stream.",
    },
    MetricDef {
        name: names::ROUTED_CHANGES,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Row changes routed to a user (a change counts once per user it reaches).",
    },
    MetricDef {
        name: names::FRAMES_SENT,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Frames sent to stream clients (snapshot, txn, up_to_date, must_refetch, ...).",
    },
    MetricDef {
        name: names::SENT_BYTES,
        kind: Kind::Counter,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes of frames sent to stream clients (payload, before WebSocket framing).",
    },
    MetricDef {
        name: names::MUST_REFETCH,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: Some(("reason", REFETCH_REASONS)),
        help: "must_refetch answers sent to subscriptions, by reason (docs/protocol.md).",
    },
    MetricDef {
        name: names::SLOW_CLIENT_DISCONNECTS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Stream connections closed because the client read too slowly (close code 4008).",
    },
    MetricDef {
        name: names::CONNECTIONS,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: Some(("transport", TRANSPORTS)),
        help: "Open stream connections, by transport.",
    },
    MetricDef {
        name: names::SUBSCRIPTIONS,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: Some(("transport", TRANSPORTS)),
        help: "Live subscriptions on open stream connections, by transport.",
    },
    MetricDef {
        name: names::USERS,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Users with at least one open stream connection.",
    },
    MetricDef {
        name: names::HISTORY_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes of per-user resume history held in memory (bounded by the hub's limit, 256 MiB by default).",
    },
    MetricDef {
        name: names::QUEUED_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes of transactions waiting in connection queues (bounded per connection and in total; a connection over its bound is cut off as too slow).",
    },
    MetricDef {
        name: names::SNAPSHOTS_READING,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Snapshots reading rows from PostgreSQL right now (each holds one connection of the snapshot pool, --snapshot-concurrency).",
    },
    MetricDef {
        name: names::SNAPSHOTS_WAITING,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Snapshots waiting for a place (per user or server-wide) or a snapshot connection.",
    },
    MetricDef {
        name: names::SNAPSHOTS_REJECTED,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "Snapshots refused after waiting past --snapshot-queue-timeout-ms, or for want of a spill file (the client retries: too_many_snapshots).",
    },
    MetricDef {
        name: names::SNAPSHOT_BUFFERED_BYTES,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes of snapshot rows held in memory between PostgreSQL and slower clients (bounded by --snapshot-buffer-total-bytes).",
    },
    MetricDef {
        name: names::SNAPSHOT_SPILLED_BYTES,
        kind: Kind::Counter,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes of snapshot rows written to spill files (clients slower than PostgreSQL, past the memory budgets).",
    },
    MetricDef {
        name: names::SNAPSHOT_SPILL_FILES,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Snapshot spill files open now (unlinked temporary files in TMPDIR, at most --snapshot-spill-files).",
    },
    MetricDef {
        name: names::STREAM_STATE,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: Some(("state", STREAM_STATES)),
        help: "Whether this server streams from the replication slot: 1 for the current state (starting, streaming, standby: another process holds the slot, failed: the stream cannot be decoded), 0 for the others.",
    },
    MetricDef {
        name: names::BATCH_REQUESTS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: Some(("status", &[])),
        help: "POST /v1/batch responses, by HTTP status code.",
    },
    MetricDef {
        name: names::BATCH_DURATION,
        kind: Kind::Histogram,
        unit: Unit::Seconds,
        label: None,
        help: "POST /v1/batch latency, from the request's arrival to its response (all statuses).",
    },
    MetricDef {
        name: names::BATCH_ROWS,
        kind: Kind::Histogram,
        unit: Unit::Count,
        label: None,
        help: "Ops (rows written) per accepted POST /v1/batch request.",
    },
    MetricDef {
        name: names::JWT_REJECTIONS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: Some(("reason", JWT_REASONS)),
        help: "Requests and token refreshes refused with 401, by reason (the error code of docs/api.md).",
    },
    MetricDef {
        name: names::BODY_REFUSALS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: Some(("reason", BODY_REFUSAL_REASONS)),
        help: "Write request bodies refused: user_share (429, --max-body-bytes-in-flight-per-user), server_budget (503, --max-body-bytes-in-flight), timeout (408, --body-timeout-secs).",
    },
    MetricDef {
        name: names::SHAPE_REQUEST_REFUSALS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: None,
        help: "GET /v1/shape requests answered 429 because their user already had --max-shape-requests-per-user requests waiting, streaming or being written.",
    },
    MetricDef {
        name: names::DB_CONNECTION_REFUSALS,
        kind: Kind::Counter,
        unit: Unit::Count,
        label: Some(("reason", DB_CONNECTION_REFUSAL_REASONS)),
        help: "Requests that got no pooled connection within --pool-wait-timeout-ms: user_share (429, the user's requests held --max-db-connections-per-user), pool_busy (503 database_busy, every connection in use).",
    },
    MetricDef {
        name: names::BODY_BYTES_IN_FLIGHT,
        kind: Kind::Gauge,
        unit: Unit::Bytes,
        label: None,
        help: "Bytes reserved by write request bodies being read, parsed or applied (bounded by --max-body-bytes-in-flight).",
    },
    MetricDef {
        name: names::POOL_MAX,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Most pooled PostgreSQL connections this server opens (--pool-size).",
    },
    MetricDef {
        name: names::POOL_SIZE,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Pooled PostgreSQL connections currently open.",
    },
    MetricDef {
        name: names::POOL_IN_USE,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Pooled PostgreSQL connections handed out to requests right now.",
    },
    MetricDef {
        name: names::POOL_WAITING,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: None,
        help: "Requests waiting for a pooled PostgreSQL connection (above 0 for long: the pool is exhausted).",
    },
    MetricDef {
        name: names::BUILD_INFO,
        kind: Kind::Gauge,
        unit: Unit::Count,
        label: Some(("version", &[])),
        help: "Always 1; the label carries the deeprecall-sync version.",
    },
];

/// Latency buckets (seconds): a batch is one transaction, from sub-millisecond to a slow 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Rows per batch: single ops up to the largest configurable batches.
const ROW_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 10000.0,
];

/// Handles of the label-less metrics, resolved once at install so the hot paths skip the registry lookup.
struct Handles {
    prometheus: PrometheusHandle,
    transactions: Counter,
    changes: Counter,
    routed: Counter,
    frames: Counter,
    sent_bytes: Counter,
    slow: Counter,
    recreations: Counter,
    batch_duration: Histogram,
    batch_rows: Histogram,
}

static HANDLES: OnceLock<Result<Handles, String>> = OnceLock::new();

/// Installs the global Prometheus recorder (once per process; later calls return the first result), describes and
/// registers every metric, and starts the upkeep thread. Fails when another recorder was installed first.
pub fn install() -> Result<(), String> {
    HANDLES
        .get_or_init(build)
        .as_ref()
        .map(|_| ())
        .map_err(Clone::clone)
}

fn build() -> Result<Handles, String> {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(names::BATCH_DURATION.into()),
            DURATION_BUCKETS,
        )
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Full(names::BATCH_ROWS.into()), ROW_BUCKETS)
        })
        .map_err(|e| e.to_string())?;
    let prometheus = builder
        .install_recorder()
        .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
    for def in CATALOGUE {
        match def.kind {
            Kind::Counter => metrics::describe_counter!(def.name, def.unit, def.help),
            Kind::Gauge => metrics::describe_gauge!(def.name, def.unit, def.help),
            Kind::Histogram => metrics::describe_histogram!(def.name, def.unit, def.help),
        }
        match (def.kind, def.label) {
            (Kind::Counter, Some((label, values))) => {
                for v in values {
                    metrics::counter!(def.name, label => *v).increment(0);
                }
            }
            (Kind::Counter, None) => metrics::counter!(def.name).increment(0),
            (Kind::Gauge, Some((label, values))) => {
                for v in values {
                    metrics::gauge!(def.name, label => *v).set(0.0);
                }
            }
            (Kind::Gauge, None) => metrics::gauge!(def.name).set(0.0),
            // A histogram without observations renders nothing until its first one; its HELP is still kept.
            (Kind::Histogram, _) => {}
        }
    }
    metrics::gauge!(names::BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    // Subscriptions are counted up and down as they happen; start from what was counted before install.
    for t in [Transport::WebSocket, Transport::LongPoll] {
        metrics::gauge!(names::SUBSCRIPTIONS, "transport" => t.label())
            .set(TOTALS.subscriptions[t as usize].load(Ordering::Relaxed) as f64);
    }
    // Histograms buffer observations until upkeep folds them in; scrapes run it too, but a server that is never
    // scraped must not grow without bound. A thread, not a task: tests start and drop many Tokio runtimes.
    let upkeep = prometheus.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(Duration::from_secs(5));
                upkeep.run_upkeep();
            }
        })
        .map_err(|e| format!("cannot start the metrics upkeep thread: {e}"))?;
    Ok(Handles {
        prometheus,
        transactions: metrics::counter!(names::TRANSACTIONS),
        changes: metrics::counter!(names::CHANGES),
        routed: metrics::counter!(names::ROUTED_CHANGES),
        frames: metrics::counter!(names::FRAMES_SENT),
        sent_bytes: metrics::counter!(names::SENT_BYTES),
        slow: metrics::counter!(names::SLOW_CLIENT_DISCONNECTS),
        recreations: metrics::counter!(names::SLOT_RECREATIONS),
        batch_duration: metrics::histogram!(names::BATCH_DURATION),
        batch_rows: metrics::histogram!(names::BATCH_ROWS),
    })
}

fn handles() -> Option<&'static Handles> {
    HANDLES.get().and_then(|r| r.as_ref().ok())
}

/// Process-wide totals mirrored outside the recorder, for the admin page (`GET /v1/admin/stats`), which works
/// whether or not the metrics listener is on.
#[derive(Debug)]
pub struct Totals {
    /// Decoded transactions.
    pub transactions: AtomicU64,
    /// Decoded row changes.
    pub changes: AtomicU64,
    /// Frames sent.
    pub frames: AtomicU64,
    /// Bytes sent.
    pub sent_bytes: AtomicU64,
    /// Live subscriptions, by [`Transport`].
    pub subscriptions: [AtomicI64; 2],
}

/// The mirrored totals.
pub static TOTALS: Totals = Totals {
    transactions: AtomicU64::new(0),
    changes: AtomicU64::new(0),
    frames: AtomicU64::new(0),
    sent_bytes: AtomicU64::new(0),
    subscriptions: [AtomicI64::new(0), AtomicI64::new(0)],
};

// ---- Counting sites. Each is one call at the place where the event happens. ----

/// The replicator decoded `changes` row changes of a committed transaction; `complete` on its last part (a large
/// transaction comes in parts: it is counted once).
pub fn transaction_decoded(changes: usize, complete: bool) {
    let transactions = u64::from(complete);
    TOTALS
        .transactions
        .fetch_add(transactions, Ordering::Relaxed);
    TOTALS.changes.fetch_add(changes as u64, Ordering::Relaxed);
    if let Some(h) = handles() {
        h.transactions.increment(transactions);
        h.changes.increment(changes as u64);
    }
}

/// `changes` row changes were routed to users (one per change and user reached).
pub fn changes_routed(changes: usize) {
    if let Some(h) = handles() {
        h.routed.increment(changes as u64);
    }
}

/// A frame of `bytes` bytes was sent to a stream client.
pub fn frame_sent(bytes: usize) {
    TOTALS.frames.fetch_add(1, Ordering::Relaxed);
    TOTALS.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    if let Some(h) = handles() {
        h.frames.increment(1);
        h.sent_bytes.increment(bytes as u64);
    }
}

/// A subscription was answered `must_refetch` with `reason`.
pub fn must_refetch(reason: &'static str) {
    if handles().is_some() {
        metrics::counter!(names::MUST_REFETCH, "reason" => reason).increment(1);
    }
}

/// A write request's body was refused; `reason` is one of [`BODY_REFUSAL_REASONS`].
pub fn body_refused(reason: &'static str) {
    if handles().is_some() {
        metrics::counter!(names::BODY_REFUSALS, "reason" => reason).increment(1);
    }
}

/// A `/v1/shape` request was refused for its user's share.
pub fn shape_request_refused() {
    if handles().is_some() {
        metrics::counter!(names::SHAPE_REQUEST_REFUSALS).increment(1);
    }
}

/// A request got no pooled connection; `reason` is one of [`DB_CONNECTION_REFUSAL_REASONS`].
pub fn db_connection_refused(reason: &'static str) {
    if handles().is_some() {
        metrics::counter!(names::DB_CONNECTION_REFUSALS, "reason" => reason).increment(1);
    }
}

/// A connection was closed because its client read too slowly.
pub fn slow_client_cut_off() {
    if let Some(h) = handles() {
        h.slow.increment(1);
    }
}

/// The replication slot was recreated.
pub fn slot_recreated() {
    if let Some(h) = handles() {
        h.recreations.increment(1);
    }
}

/// A subscription went live on `transport`.
pub fn subscription_opened(transport: Transport) {
    TOTALS.subscriptions[transport as usize].fetch_add(1, Ordering::Relaxed);
    if handles().is_some() {
        metrics::gauge!(names::SUBSCRIPTIONS, "transport" => transport.label()).increment(1.0);
    }
}

/// A subscription ended (unsubscribed, refetch replaced it, or its connection closed).
pub fn subscription_closed(transport: Transport) {
    TOTALS.subscriptions[transport as usize].fetch_sub(1, Ordering::Relaxed);
    if handles().is_some() {
        metrics::gauge!(names::SUBSCRIPTIONS, "transport" => transport.label()).decrement(1.0);
    }
}

/// An accepted batch wrote `rows` ops.
pub fn batch_rows(rows: usize) {
    if let Some(h) = handles() {
        h.batch_rows.record(rows as f64);
    }
}

/// A token was refused; `reason` is the error code (docs/api.md).
pub fn jwt_rejected(reason: &'static str) {
    if handles().is_some() {
        metrics::counter!(names::JWT_REJECTIONS, "reason" => reason).increment(1);
    }
}

/// Middleware on `POST /v1/batch`: counts responses by status and observes latency.
pub async fn track_batch(request: Request, next: Next) -> Response {
    // Only the batch itself: a 405 for another method is not a batch request.
    let counted = request.method() == Method::POST && handles().is_some();
    let started = Instant::now();
    let response = next.run(request).await;
    if counted && let Some(h) = handles() {
        h.batch_duration.record(started.elapsed().as_secs_f64());
        metrics::counter!(names::BATCH_REQUESTS, "status" => status_label(response.status()))
            .increment(1);
    }
    response
}

/// The status as a label without allocating for the usual ones.
fn status_label(status: StatusCode) -> std::borrow::Cow<'static, str> {
    match status.as_u16() {
        200 => "200".into(),
        400 => "400".into(),
        401 => "401".into(),
        403 => "403".into(),
        409 => "409".into(),
        413 => "413".into(),
        422 => "422".into(),
        500 => "500".into(),
        503 => "503".into(),
        other => other.to_string().into(),
    }
}

// ---- Sampling a server's state. ----

/// The replication slot as Postgres reports it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotSample {
    /// A walsender holds it.
    pub active: bool,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes before the slot is lost; `None` when there is no limit (or it is lost).
    pub safe_wal_size: Option<i64>,
    /// `pg_current_wal_lsn() - confirmed_flush_lsn`.
    pub lag_bytes: Option<i64>,
    /// `pg_current_wal_lsn() - restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// Where Postgres resumes the stream.
    pub confirmed_flush_lsn: Option<String>,
    /// `pg_current_wal_lsn()`.
    pub current_wal_lsn: String,
}

/// Why the slot could not be sampled.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    /// No pooled connection within the time limit.
    #[error("no database connection within {0:?}")]
    Timeout(Duration),
    /// The pool could not connect.
    #[error("database unreachable: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// The query failed.
    #[error("query failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

/// Time limit for a sample: a scrape must answer even when the pool is exhausted or Postgres hangs.
pub const SAMPLE_LIMIT: Duration = Duration::from_secs(2);

/// Reads the slot's state: one small query on a pooled connection, bounded by [`SAMPLE_LIMIT`]. `Ok(None)`: no
/// such slot.
pub async fn sample_slot(state: &AppState) -> Result<Option<SlotSample>, SampleError> {
    let query = async {
        // The probe connection: a request pool that is all busy is not a database that is down.
        let client = state.probe_pool.get().await?;
        let row = client
            .query_one(
                "select s.active, s.wal_status::text, s.safe_wal_size,
                        (w.lsn - s.confirmed_flush_lsn)::bigint, (w.lsn - s.restart_lsn)::bigint,
                        s.confirmed_flush_lsn::text, w.lsn::text, s.slot_name is not null
                   from (select pg_current_wal_lsn() as lsn) w
                   left join pg_replication_slots s on s.slot_name = $1",
                &[&state.slot_name],
            )
            .await?;
        Ok::<_, SampleError>(row.get::<_, bool>(7).then(|| SlotSample {
            active: row.get(0),
            wal_status: row.get(1),
            safe_wal_size: row.get(2),
            lag_bytes: row.get(3),
            retained_bytes: row.get(4),
            confirmed_flush_lsn: row.get(5),
            current_wal_lsn: row.get(6),
        }))
    };
    tokio::time::timeout(SAMPLE_LIMIT, query)
        .await
        .map_err(|_| SampleError::Timeout(SAMPLE_LIMIT))?
}

/// Serializes "set this server's gauges, render": two servers in one process (tests) never interleave.
static SCRAPE: Mutex<()> = Mutex::new(());

/// `GET /metrics`: Prometheus text format.
pub async fn scrape(State(state): State<AppState>) -> Response {
    let Some(h) = handles() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "metrics recorder not installed\n",
        )
            .into_response();
    };
    let slot = sample_slot(&state).await;
    if let Err(e) = &slot {
        tracing::warn!(error = %crate::error::Chain(&e), "metrics: could not sample the replication slot");
    }
    let pool = state.pool.status();
    let hub = state.hub.stats();
    let body = {
        let _guard = SCRAPE.lock().unwrap_or_else(|e| e.into_inner());
        set_server_gauges(slot.as_ref().ok(), &pool, &hub);
        let snapshots = state.snapshots.stats();
        metrics::gauge!(names::SNAPSHOTS_READING).set(snapshots.reading as f64);
        metrics::gauge!(names::SNAPSHOTS_WAITING).set(snapshots.waiting as f64);
        metrics::counter!(names::SNAPSHOTS_REJECTED).absolute(snapshots.rejected);
        metrics::gauge!(names::SNAPSHOT_BUFFERED_BYTES).set(snapshots.buffered_bytes as f64);
        metrics::counter!(names::SNAPSHOT_SPILLED_BYTES).absolute(snapshots.spilled_bytes);
        metrics::gauge!(names::SNAPSHOT_SPILL_FILES).set(snapshots.spill_files_open as f64);
        metrics::gauge!(names::BODY_BYTES_IN_FLIGHT).set(state.bodies.in_flight_bytes() as f64);
        h.prometheus.run_upkeep();
        h.prometheus.render()
    };
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// Sets the per-server gauges. `slot`: `None` when the sample failed (the slot gauges become NaN: unknown),
/// `Some(None)` when the slot does not exist.
fn set_server_gauges(
    slot: Option<&Option<SlotSample>>,
    pool: &deadpool_postgres::Status,
    hub: &crate::live::hub::HubStats,
) {
    let bool_gauge = |b: bool| if b { 1.0 } else { 0.0 };
    let opt = |v: Option<i64>| v.map_or(f64::NAN, |v| v as f64);
    metrics::gauge!(names::DATABASE_UP).set(bool_gauge(slot.is_some()));
    let (exists, active, lag, retained, safe, status) = match slot {
        None => (f64::NAN, f64::NAN, f64::NAN, f64::NAN, f64::NAN, None),
        Some(None) => (0.0, 0.0, f64::NAN, f64::NAN, f64::NAN, Some(None)),
        Some(Some(s)) => (
            1.0,
            bool_gauge(s.active),
            opt(s.lag_bytes),
            opt(s.retained_bytes),
            // NULL safe_wal_size: no limit (max_slot_wal_keep_size = -1), or the slot is lost (wal_status says so).
            s.safe_wal_size.map_or(-1.0, |v| v as f64),
            Some(s.wal_status.as_deref()),
        ),
    };
    metrics::gauge!(names::SLOT_EXISTS).set(exists);
    metrics::gauge!(names::SLOT_ACTIVE).set(active);
    metrics::gauge!(names::SLOT_LAG_BYTES).set(lag);
    metrics::gauge!(names::SLOT_RETAINED_BYTES).set(retained);
    metrics::gauge!(names::SLOT_SAFE_WAL_SIZE_BYTES).set(safe);
    for s in WAL_STATUSES {
        let v = match status {
            None => f64::NAN,
            Some(current) => bool_gauge(current == Some(*s)),
        };
        metrics::gauge!(names::SLOT_WAL_STATUS, "status" => *s).set(v);
    }
    metrics::gauge!(names::SLOT_GENERATION).set(hub.generation as f64);
    let long_polls = hub.long_polls.min(hub.connections);
    metrics::gauge!(names::CONNECTIONS, "transport" => "websocket")
        .set((hub.connections - long_polls) as f64);
    metrics::gauge!(names::CONNECTIONS, "transport" => "long_poll").set(long_polls as f64);
    metrics::gauge!(names::USERS).set(hub.users as f64);
    metrics::gauge!(names::HISTORY_BYTES).set(hub.history_bytes as f64);
    metrics::gauge!(names::QUEUED_BYTES).set(hub.queued_bytes as f64);
    let state = match &hub.stream {
        crate::live::hub::StreamState::Starting(_) => "starting",
        crate::live::hub::StreamState::Streaming => "streaming",
        crate::live::hub::StreamState::Standby(_) => "standby",
        crate::live::hub::StreamState::Failed(_) => "failed",
    };
    for s in STREAM_STATES {
        metrics::gauge!(names::STREAM_STATE, "state" => *s).set(bool_gauge(*s == state));
    }
    metrics::gauge!(names::POOL_MAX).set(pool.max_size as f64);
    metrics::gauge!(names::POOL_SIZE).set(pool.size as f64);
    metrics::gauge!(names::POOL_IN_USE).set(pool.size.saturating_sub(pool.available) as f64);
    metrics::gauge!(names::POOL_WAITING).set(pool.waiting as f64);
}

// ---- The listener. ----

/// `--metrics-listen`: an address, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// No metrics listener.
    Off,
    /// Serve `/metrics` here.
    At(SocketAddr),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "" | "off" | "none" | "false" => Ok(Self::Off),
            addr => addr.parse().map(Self::At).map_err(|_| {
                format!("expected an address such as 127.0.0.1:9090, or `off`; got {s:?}")
            }),
        }
    }
}

/// Address `dev` serves metrics on when `--metrics-listen` is not given.
pub const DEV_METRICS_LISTEN: &str = "127.0.0.1:9090";

/// Installs the recorder and binds the metrics listener. `flag`: the operator's `--metrics-listen`; `default`:
/// what to use without it (`dev`: [`DEV_METRICS_LISTEN`], where a busy port only earns a warning; `serve`: off).
/// Refuses the public address: `/metrics` is unauthenticated and must never share the API's port.
pub async fn bind(
    flag: Option<MetricsListen>,
    default: MetricsListen,
    public: SocketAddr,
) -> anyhow::Result<Option<TcpListener>> {
    let (addr, explicit) = match (flag, default) {
        (Some(MetricsListen::Off), _) | (None, MetricsListen::Off) => return Ok(None),
        (Some(MetricsListen::At(addr)), _) => (addr, true),
        (None, MetricsListen::At(addr)) => (addr, false),
    };
    if addr.port() != 0
        && addr.port() == public.port()
        && (addr.ip() == public.ip() || addr.ip().is_unspecified() || public.ip().is_unspecified())
    {
        if !explicit {
            // The default address is the one `--listen` asked for: the public port wins, as when the default is
            // taken by another process.
            tracing::warn!(%addr, "metrics listener not started: --listen uses its default address (pass --metrics-listen ADDR or off)");
            return Ok(None);
        }
        anyhow::bail!(
            "--metrics-listen {addr} overlaps --listen {public}: /metrics has no authentication and is served \
             only on its own address"
        );
    }
    install().map_err(anyhow::Error::msg)?;
    match TcpListener::bind(addr).await {
        Ok(listener) => Ok(Some(listener)),
        Err(e) if !explicit => {
            tracing::warn!(%addr, error = %e, "metrics listener not started (pass --metrics-listen ADDR or off)");
            Ok(None)
        }
        Err(e) => {
            Err(anyhow::Error::new(e).context(format!("listening on {addr} (--metrics-listen)")))
        }
    }
}

/// The metrics listener's routes: `GET /metrics` only.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .fallback(|| async { (StatusCode::NOT_FOUND, "only /metrics is served here\n") })
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_default_metrics_address_that_is_the_public_one_gives_way() {
        let public: SocketAddr = "127.0.0.1:9090".parse().unwrap();
        // `dev --listen 127.0.0.1:9090`: the default metrics address is taken by the public port; no metrics.
        let listener = bind(None, MetricsListen::At(public), public).await.unwrap();
        assert!(listener.is_none());
        // Asked for explicitly, the same overlap is an error (/metrics must not be served publicly).
        let err = bind(Some(MetricsListen::At(public)), MetricsListen::Off, public)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("overlaps"), "{err}");
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        let mut seen = std::collections::HashSet::new();
        for def in CATALOGUE {
            assert!(seen.insert(def.name), "{} twice", def.name);
            assert!(def.name.starts_with("deeprecall_"), "{}", def.name);
            assert!(
                def.name
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{}",
                def.name
            );
            assert_eq!(
                def.kind == Kind::Counter,
                def.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                def.name
            );
            match def.unit {
                Unit::Bytes => assert!(def.name.contains("_bytes"), "{}", def.name),
                Unit::Seconds => assert!(def.name.ends_with("_seconds"), "{}", def.name),
                Unit::Count => assert!(
                    !def.name.contains("_bytes") && !def.name.contains("_seconds"),
                    "{}",
                    def.name
                ),
                other => panic!("{}: unexpected unit {other:?}", def.name),
            }
            assert!(def.help.len() > 20, "{}: HELP too short", def.name);
        }
    }

    #[test]
    fn every_metric_is_documented() {
        let doc = include_str!("../../docs/operations.md");
        for def in CATALOGUE {
            assert!(
                doc.contains(&format!("`{}`", def.name)),
                "docs/operations.md does not list {}",
                def.name
            );
        }
    }

    #[test]
    fn metrics_listen_flag() {
        assert_eq!("off".parse(), Ok(MetricsListen::Off));
        assert_eq!(
            "127.0.0.1:9090".parse(),
            Ok(MetricsListen::At("127.0.0.1:9090".parse().unwrap()))
        );
        assert!("9090".parse::<MetricsListen>().is_err());
    }

    #[tokio::test]
    async fn the_public_address_is_refused() {
        let public: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        for addr in ["127.0.0.1:8080", "0.0.0.0:8080"] {
            let flag = Some(MetricsListen::At(addr.parse().unwrap()));
            let err = bind(flag, MetricsListen::Off, public).await.unwrap_err();
            assert!(err.to_string().contains("overlaps --listen"), "{err}");
        }
        assert!(
            bind(None, MetricsListen::Off, public)
                .await
                .unwrap()
                .is_none()
        );
    }
}
