//! Command line: `dev`, `serve`, `migrate`, `check`, `token`, `tail`. Every flag can also come from the environment variable
//! named in `--help`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use uuid::Uuid;

use crate::auth::{AuthConfig, KeySource};
use crate::db::catalog::{Catalog, CatalogHandle};
use crate::db::{self, migrate};
use crate::http::cors::CorsOrigins;
use crate::live::admission::{PerUserLimit, SnapshotCapacity, SnapshotLimits};
use crate::live::hub::{Hub, HubConfig};
use crate::live::replicator::ReplicatorConfig;
use crate::pgcluster::{ClusterOptions, LocalCluster, random_token};
use crate::state::{AppState, Limits, Shared};
use deeprecall_replication::stream::StreamConfig;

/// deeprecall-sync: authoritative writes and live per-user sync next to PostgreSQL.
#[derive(Debug, Parser)]
#[command(name = "deeprecall-sync", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Log format on stderr: `text` for people, `json` (one object per line: timestamp, level, target, fields,
    /// spans with the request id) for log shippers.
    #[arg(
        long,
        env = "DEEPRECALL_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text,
        global = true
    )]
    pub log_format: LogFormat,
    /// Threads of the async runtime that serves HTTP, WebSockets and the replication stream. Default: one per
    /// core (tokio's default). Beside Postgres on a small machine, fewer leave Postgres more CPU
    /// (docs/decisions.md 29).
    #[arg(long, env = "DEEPRECALL_WORKER_THREADS", global = true, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
}

impl Cli {
    /// The runtime's worker threads: `--worker-threads`, else one per core the process may use.
    pub fn worker_threads(&self) -> usize {
        self.worker_threads.map_or_else(
            || std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            usize::from,
        )
    }
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Ends the process with this exit status without printing an error (the command already reported why).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("exit status {0}")]
pub struct Exit(pub u8);

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run locally: start (and on first run create) a Postgres cluster under --data-dir, migrate, serve, and print
    /// a dev token with a curl example. Uses DATABASE_URL instead when it is set.
    Dev(DevArgs),
    /// Production mode: serve against DATABASE_URL.
    Serve(ServeArgs),
    /// Apply migrations (sql/) and policies (policies/) to DATABASE_URL; safe to run twice or concurrently.
    Migrate(MigrateArgs),
    /// Preflight a database before serving from it: settings, privileges, publication, row-level security, grants,
    /// migrations, slot. One line per check; exit 0 when nothing failed, 1 on a failure, 2 when it cannot connect.
    Check(crate::check::CheckArgs),
    /// Mint an HS256 token with the configured secret, for development; prints only the token.
    Token(TokenArgs),
    /// Watch your own changes live: connect to a running server's /v1/stream with a token and print every frame
    /// as one JSON line.
    Tail(crate::tail::TailArgs),
}

/// How tokens are verified.
#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HS256 shared secret (at least 32 bytes), as shared with the app that issues tokens.
    #[arg(long, env = "DEEPRECALL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// PEM public key verifying RS256/384/512, ES256/384 or EdDSA tokens.
    #[arg(long, env = "DEEPRECALL_JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,
    /// JWKS file (`{"keys": [...]}`); the key is chosen by the token's `kid`. Not fetched over HTTP: mount it.
    #[arg(long, env = "DEEPRECALL_JWKS_FILE")]
    pub jwks_file: Option<PathBuf>,
    /// Require this `iss` claim.
    #[arg(long, env = "DEEPRECALL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Require this `aud` claim.
    #[arg(long, env = "DEEPRECALL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Claim that marks an admin token.
    #[arg(long, env = "DEEPRECALL_ADMIN_CLAIM", default_value = "role")]
    pub admin_claim: String,
    /// Value of --admin-claim that marks an admin (a string claim equal to it, or an array containing it).
    #[arg(long, env = "DEEPRECALL_ADMIN_CLAIM_VALUE", default_value = "admin")]
    pub admin_claim_value: String,
}

impl JwtArgs {
    /// Builds the verifier; `fallback_secret` is used when no key is configured (dev).
    pub fn auth_config(&self, fallback_secret: Option<String>) -> anyhow::Result<AuthConfig> {
        let mut sources = Vec::new();
        if let Some(s) = self.jwt_secret.clone().or(fallback_secret) {
            sources.push(KeySource::Secret(s.into_bytes()));
        }
        if let Some(path) = &self.jwt_public_key_file {
            let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
            sources.push(KeySource::PublicKeyPem(pem));
        }
        if let Some(path) = &self.jwks_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            sources.push(KeySource::Jwks(text));
        }
        Ok(AuthConfig::new(
            sources,
            self.jwt_issuer.clone(),
            self.jwt_audience.clone(),
            self.admin_claim.clone(),
            self.admin_claim_value.clone(),
        )?)
    }
}

/// Request limits.
#[derive(Debug, Clone, Copy, Args)]
pub struct LimitArgs {
    /// Largest request body, in bytes (413 above it); at least 1024.
    #[arg(long, env = "DEEPRECALL_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1024..))]
    pub max_body_bytes: usize,
    /// Most ops in one /v1/batch request, and blobs in one coordination (413 above it).
    #[arg(long, env = "DEEPRECALL_MAX_OPS_PER_BATCH", default_value_t = 1000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_ops_per_batch: usize,
    /// Most concurrent WebSocket connections and waiting GET /v1/shape requests (initial snapshots, live
    /// long-polls, SSE streams), counted together; a new one beyond it is answered 503 too_many_connections.
    #[arg(long, env = "DEEPRECALL_MAX_CONNECTIONS", default_value_t = 100_000,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// Most concurrent WebSocket connections of one user; the next one is closed right after the upgrade with
    /// code 4029.
    #[arg(long, env = "DEEPRECALL_MAX_CONNECTIONS_PER_USER", default_value_t = 32,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_user: u32,
    /// Bytes of `where` filters one user's WebSocket subscriptions hold together, over all their connections
    /// (about the filters' text: a 1000-value `in` list of UUIDs is ~60 KiB); a subscribe beyond it is refused with
    /// too_many_filter_bytes.
    #[arg(long, env = "DEEPRECALL_MAX_FILTER_BYTES_PER_USER", default_value_t = 16 * 1024 * 1024,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_filter_bytes_per_user: u32,
    /// Most GET /v1/shape requests of one user that wait, stream or are being written at once (initial snapshots,
    /// live long-polls, SSE streams, answers the socket has not taken yet); the next one is answered 429
    /// too_many_requests with Retry-After.
    #[arg(long, env = "DEEPRECALL_MAX_SHAPE_REQUESTS_PER_USER", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_shape_requests_per_user: u32,
    /// Milliseconds a request waits for a pooled connection when all are busy; then 503 `database_busy` with
    /// `Retry-After`.
    #[arg(long, env = "DEEPRECALL_POOL_WAIT_TIMEOUT_MS", default_value_t = 5_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub pool_wait_timeout_ms: u64,
    /// Most pooled connections one user's requests hold at once; the user's next requests wait in a line of their
    /// own (not the pool's) for --pool-wait-timeout-ms, then 429 too_many_requests. Default: a quarter of
    /// --pool-size, at least 1.
    #[arg(long, env = "DEEPRECALL_MAX_DB_CONNECTIONS_PER_USER",
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_db_connections_per_user: Option<u32>,
    /// Milliseconds a user's transaction (a batch, a blob request) waits for a lock another transaction holds (an
    /// operator's CREATE INDEX, a forgotten open transaction); then 503 locked with Retry-After, and nothing done.
    /// 0: wait as long as it takes.
    #[arg(long, env = "DEEPRECALL_LOCK_TIMEOUT_MS", default_value_t = 5_000)]
    pub lock_timeout_ms: u64,
    /// Snapshot and resume jobs reading from Postgres at once, on connections of their own (in addition to
    /// --pool-size).
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub snapshot_concurrency: u32,
    /// One user's snapshot jobs at once, from start until the client has received the rows.
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_CONCURRENCY_PER_USER", default_value_t = 2,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub snapshot_concurrency_per_user: u32,
    /// Milliseconds a snapshot job waits in line for both; then `too_many_snapshots` (retryable).
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_QUEUE_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub snapshot_queue_timeout_ms: u64,
    /// Bytes of rows one snapshot keeps in memory until its client takes them; beyond, they go to a temporary
    /// file in TMPDIR.
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_BUFFER_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub snapshot_buffer_bytes: usize,
    /// Bytes of rows all snapshots together keep in memory.
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_BUFFER_TOTAL_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub snapshot_buffer_total_bytes: usize,
    /// Snapshot spill files open at once (one file descriptor each); a snapshot that needs one more fails with
    /// `too_many_snapshots`.
    #[arg(long, env = "DEEPRECALL_SNAPSHOT_SPILL_FILES", default_value_t = 512,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub snapshot_spill_files: u32,
    /// Most open client TCP connections, HTTP and WebSocket alike; above it the server stops accepting until one
    /// closes. Default: the file-descriptor limit (raised to its hard limit at start) minus a reserve for the
    /// database pool, the replication stream and files; a larger value is lowered to that.
    #[arg(long, env = "DEEPRECALL_MAX_HTTP_CONNECTIONS", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_http_connections: Option<usize>,
    /// Seconds a client has to send a complete request header, and an idle keep-alive connection stays open.
    #[arg(long, env = "DEEPRECALL_HEADER_TIMEOUT_SECS", default_value_t = 20,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_secs: u64,
    /// Seconds a client has to send a write request's whole body (/v1/batch, /v1/blobs/coordinate) once its
    /// header is in; 408 body_timeout after it.
    #[arg(long, env = "DEEPRECALL_BODY_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_secs: u64,
    /// Bytes of write request bodies held at once, server-wide (each reserves its Content-Length, or
    /// --max-body-bytes without one, until it is answered); 503 server_busy beyond. At least --max-body-bytes.
    #[arg(long, env = "DEEPRECALL_MAX_BODY_BYTES_IN_FLIGHT", default_value_t = 256 * 1024 * 1024)]
    pub max_body_bytes_in_flight: usize,
    /// Bytes of one user's write request bodies held at once; 429 too_many_requests beyond. At least
    /// --max-body-bytes.
    #[arg(long, env = "DEEPRECALL_MAX_BODY_BYTES_IN_FLIGHT_PER_USER", default_value_t = 32 * 1024 * 1024)]
    pub max_body_bytes_in_flight_per_user: usize,
}

impl LimitArgs {
    /// The limits, with the connection cap fitted under the process's file-descriptor limit (which is raised to
    /// its hard limit first; both are logged).
    fn limits(&self, pool_size: usize) -> Limits {
        let snapshots = SnapshotLimits {
            concurrency: self.snapshot_concurrency as usize,
            per_user: self.snapshot_concurrency_per_user as usize,
            queue_timeout: std::time::Duration::from_millis(self.snapshot_queue_timeout_ms),
            buffer_bytes: self.snapshot_buffer_bytes,
            buffer_total_bytes: self.snapshot_buffer_total_bytes,
            spill_files: self.snapshot_spill_files as usize,
        };
        // Descriptors kept for Postgres connections (both pools) and spill files, not for clients.
        let fd_cap =
            fd_connection_budget(pool_size + snapshots.concurrency + snapshots.spill_files);
        let max_http_connections = match self.max_http_connections {
            Some(wanted) if wanted > fd_cap => {
                tracing::warn!(
                    wanted,
                    allowed = fd_cap,
                    "--max-http-connections is above what the file-descriptor limit allows; lowered"
                );
                fd_cap
            }
            Some(wanted) => wanted,
            None => fd_cap,
        };
        Limits {
            max_body_bytes: self.max_body_bytes,
            max_ops_per_batch: self.max_ops_per_batch,
            max_connections: self.max_connections,
            max_connections_per_user: self.max_connections_per_user as usize,
            max_filter_bytes_per_user: self.max_filter_bytes_per_user as usize,
            max_shape_requests_per_user: self.max_shape_requests_per_user as usize,
            pool_wait_timeout: std::time::Duration::from_millis(self.pool_wait_timeout_ms),
            lock_timeout: (self.lock_timeout_ms > 0)
                .then(|| std::time::Duration::from_millis(self.lock_timeout_ms)),
            max_db_connections_per_user: match self.max_db_connections_per_user {
                Some(n) => n as usize,
                None => (pool_size / 4).max(1),
            },
            snapshots,
            max_http_connections,
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs),
            max_body_bytes_in_flight: self.max_body_bytes_in_flight,
            max_body_bytes_in_flight_per_user: self.max_body_bytes_in_flight_per_user,
            write_stall_timeout: crate::app::WRITE_STALL_TIMEOUT,
        }
    }
}

/// Raises the soft file-descriptor limit to the hard one and returns how many client connections fit under it:
/// a reserve stays for `reserved` (both pools and the spill files), the replication and watcher connections, the
/// listener, logs and files.
fn fd_connection_budget(reserved: usize) -> usize {
    let before = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((1024, 1024));
    let soft = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(before.0);
    tracing::info!(
        soft_before = before.0,
        soft_now = soft,
        hard = before.1,
        "file-descriptor limit"
    );
    let reserve = reserved as u64 + 128;
    usize::try_from(soft.saturating_sub(reserve).max(16)).unwrap_or(usize::MAX)
}

/// Op-ledger retention (docs/operations.md).
#[derive(Debug, Clone, Copy, Args)]
pub struct LedgerArgs {
    /// Days an op_id stays in the idempotency ledger of batches without `client_id` (a retry after that is applied
    /// again); older entries are pruned in the background. 0 keeps them forever; at most 36500 (100 years).
    #[arg(
        long,
        env = "DEEPRECALL_OP_LEDGER_RETENTION_DAYS",
        default_value_t = 30,
        value_parser = clap::value_parser!(u32).range(0..=36_500)
    )]
    pub op_ledger_retention_days: u32,
}

impl LedgerArgs {
    /// The retention as a duration.
    pub fn retention(&self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.op_ledger_retention_days) * 86_400)
    }
}

/// HTTP flags shared by `serve` and `dev`.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Origin allowed to call the API from a browser (scheme://host[:port]); repeat or comma-separate for several,
    /// `*` for any. Default: none in `serve`, any in `dev`.
    #[arg(
        long = "cors-origin",
        env = "DEEPRECALL_CORS_ORIGINS",
        value_delimiter = ','
    )]
    pub cors_origins: Vec<String>,
    /// How long a `GET /v1/shape?live=true` request waits for a change before answering up-to-date, in
    /// milliseconds (at most 40000: Electric's client gives up after 45 s).
    #[arg(
        long,
        env = "DEEPRECALL_SHAPE_LIVE_HOLD_MS",
        default_value_t = 20_000,
        value_parser = clap::value_parser!(u64).range(1..=40_000)
    )]
    pub shape_live_hold_ms: u64,
}

/// Memory bounds of the live stream (docs/operations.md, "Memory bounds").
#[derive(Debug, Clone, Copy, Args)]
pub struct MemoryArgs {
    /// Bytes of per-user transaction history kept for resumes, for all users together (oldest evicted first;
    /// a resume from before what is kept refetches).
    #[arg(long, env = "DEEPRECALL_HISTORY_BYTES", default_value_t = 256 * 1024 * 1024)]
    pub history_bytes: usize,
    /// Bytes of transactions queued for one connection; a connection that falls further behind is closed as
    /// too slow (4008) and resumes.
    #[arg(long, env = "DEEPRECALL_QUEUE_BYTES", default_value_t = 32 * 1024 * 1024)]
    pub queue_bytes: usize,
    /// Bytes of transactions queued for all connections together; beyond it, connections that are behind are
    /// closed as too slow (a connection that keeps up always gets its transaction).
    #[arg(long, env = "DEEPRECALL_QUEUE_BYTES_TOTAL", default_value_t = 512 * 1024 * 1024)]
    pub queue_bytes_total: usize,
    /// Bytes of transactions queued for one user's connections together; beyond it, that user's connections that
    /// are behind are closed as too slow, so that one user cannot fill the total.
    #[arg(long, env = "DEEPRECALL_QUEUE_BYTES_PER_USER", default_value_t = 64 * 1024 * 1024)]
    pub queue_bytes_per_user: usize,
    /// Decoded bytes after which a large transaction is handed on in parts instead of being held whole.
    #[arg(long, env = "DEEPRECALL_TRANSACTION_PART_BYTES", default_value_t = deeprecall_replication::stream::DEFAULT_PART_LIMIT.bytes)]
    pub transaction_part_bytes: usize,
}

impl MemoryArgs {
    fn apply(&self, options: &mut ServerOptions) {
        options.hub.history_bytes = self.history_bytes;
        options.hub.queue_bytes = self.queue_bytes;
        options.hub.queued_bytes_total = self.queue_bytes_total;
        options.hub.queued_bytes_per_user = self.queue_bytes_per_user;
        options.part_limit.bytes = self.transaction_part_bytes.max(1);
    }
}

impl HttpArgs {
    fn cors(&self, fallback: CorsOrigins) -> anyhow::Result<CorsOrigins> {
        CorsOrigins::from_flags(&self.cors_origins, fallback).map_err(anyhow::Error::msg)
    }

    fn shape(&self) -> crate::live::shape::ShapeConfig {
        crate::live::shape::ShapeConfig {
            live_hold: std::time::Duration::from_millis(self.shape_live_hold_ms),
            ..Default::default()
        }
    }
}

/// `serve` flags.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Postgres connection URL (postgres://user:password@host:port/db). The role needs to be a member of
    /// deeprecall_user, deeprecall_admin and deeprecall_maintenance (the migration grants this to the role that
    /// runs it).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Address to listen on.
    #[arg(long, env = "DEEPRECALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Apply pending migrations at start instead of refusing to start when the schema is behind.
    #[arg(long, env = "DEEPRECALL_MIGRATE")]
    pub migrate: bool,
    /// Maximum pooled database connections.
    #[arg(long, env = "DEEPRECALL_POOL_SIZE", default_value_t = 16,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub pool_size: usize,
    /// Postgres URL for the replication connection, when DATABASE_URL's role lacks the REPLICATION attribute.
    #[arg(long, env = "DEEPRECALL_REPLICATION_URL", hide_env_values = true)]
    pub replication_url: Option<String>,
    /// Logical replication slot this server owns (one per server instance reading the stream).
    #[arg(long, env = "DEEPRECALL_SLOT", default_value = crate::live::DEFAULT_SLOT)]
    pub slot: String,
    /// Serve Prometheus metrics at http://ADDR/metrics (no authentication: a loopback or private address, never
    /// --listen's). Default: off.
    #[arg(long, env = "DEEPRECALL_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<crate::metrics::MetricsListen>,
    /// Token verification.
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Op-ledger retention.
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// HTTP settings.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Memory bounds.
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// `dev` flags.
#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Where the local cluster, its password, the dev JWT secret and dev user id live.
    #[arg(long, env = "DEEPRECALL_DATA_DIR", default_value = ".deeprecall")]
    pub data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "DEEPRECALL_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Use this Postgres instead of a local cluster.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Serve Prometheus metrics at http://ADDR/metrics, or `off`. Default: 127.0.0.1:9090 (skipped with a warning
    /// when that port is taken).
    #[arg(long, env = "DEEPRECALL_METRICS_LISTEN", value_name = "ADDR|off")]
    pub metrics_listen: Option<crate::metrics::MetricsListen>,
    /// Token verification (default: an HS256 secret generated into --data-dir).
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Op-ledger retention.
    #[command(flatten)]
    pub ledger: LedgerArgs,
    /// HTTP settings.
    #[command(flatten)]
    pub http: HttpArgs,
    /// Memory bounds.
    #[command(flatten)]
    pub memory: MemoryArgs,
}

/// `migrate` flags.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Postgres connection URL.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
}

/// `token` flags.
#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// The user's UUID (`sub`).
    #[arg(long)]
    pub sub: Uuid,
    /// Add the admin claim.
    #[arg(long)]
    pub admin: bool,
    /// Lifetime in seconds (at most ten years).
    #[arg(long, default_value_t = 86_400,
          value_parser = clap::value_parser!(u64).range(1..=10 * 365 * 86_400))]
    pub ttl: u64,
    /// HS256 secret; default: the dev secret in --data-dir.
    #[arg(long, env = "DEEPRECALL_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Dev data directory holding `jwt-secret`.
    #[arg(long, env = "DEEPRECALL_DATA_DIR", default_value = ".deeprecall")]
    pub data_dir: PathBuf,
    /// `iss` claim to add.
    #[arg(long, env = "DEEPRECALL_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// `aud` claim to add.
    #[arg(long, env = "DEEPRECALL_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Claim that marks an admin token.
    #[arg(long, env = "DEEPRECALL_ADMIN_CLAIM", default_value = "role")]
    pub admin_claim: String,
    /// Value of the admin claim.
    #[arg(long, env = "DEEPRECALL_ADMIN_CLAIM_VALUE", default_value = "admin")]
    pub admin_claim_value: String,
}

/// Everything needed to start a server against a database.
#[derive(Debug)]
pub struct ServerOptions {
    /// Postgres URL for queries (and, without `replication_url`, for replication too).
    pub database_url: String,
    /// Postgres URL of a role with REPLICATION, when it differs from `database_url`.
    pub replication_url: Option<String>,
    /// Token verification.
    pub auth: AuthConfig,
    /// Request limits.
    pub limits: Limits,
    /// Pool size.
    pub pool_size: usize,
    /// Apply migrations at start (else refuse an outdated schema).
    pub migrate: bool,
    /// Replication slot name.
    pub slot: String,
    /// Hub limits.
    pub hub: HubConfig,
    /// Origins allowed to call the API from a browser.
    pub cors: CorsOrigins,
    /// Timing of `GET /v1/shape`.
    pub shape: crate::live::shape::ShapeConfig,
    /// How long op_ids stay in the ledger (zero: forever).
    pub op_ledger_retention: std::time::Duration,
    /// How often the ledger is pruned.
    pub op_ledger_prune_interval: std::time::Duration,
    /// When a large transaction is handed on in parts.
    pub part_limit: deeprecall_replication::PartLimit,
}

impl ServerOptions {
    /// Defaults for everything but the URL and the verifier.
    pub fn new(database_url: impl Into<String>, auth: AuthConfig) -> Self {
        Self {
            database_url: database_url.into(),
            replication_url: None,
            auth,
            limits: Limits::default(),
            pool_size: 16,
            migrate: true,
            slot: crate::live::DEFAULT_SLOT.to_owned(),
            hub: HubConfig::default(),
            cors: CorsOrigins::None,
            shape: Default::default(),
            op_ledger_retention: std::time::Duration::from_secs(30 * 86_400),
            op_ledger_prune_interval: std::time::Duration::from_secs(600),
            part_limit: deeprecall_replication::stream::DEFAULT_PART_LIMIT,
        }
    }
}

/// A started server: state for the router plus the background tasks.
#[derive(Debug)]
pub struct Server {
    /// State shared by the handlers.
    pub state: AppState,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    replicator: tokio::task::JoinHandle<()>,
}

impl Server {
    /// A future that resolves when shutdown has begun (for `axum::serve`'s graceful shutdown).
    pub fn shutdown_signal(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.state.shutdown.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Begins shutdown: the replicator acknowledges its final position and stops, then every connection delivers
    /// what is queued, sends each live subscription that final offset, and closes with the shutdown code.
    pub fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// Shuts down and waits (bounded) for the replicator and the connections to finish.
    pub async fn shutdown(self) {
        self.begin_shutdown();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.replicator).await;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while self.state.hub.stats_connections() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// Connects, migrates (or checks the schema), loads the catalog, starts the catalog watcher and the replicator.
pub async fn start_server(options: ServerOptions) -> anyhow::Result<Server> {
    let target =
        db::PgTarget::parse(&options.database_url).context("DATABASE_URL cannot be used")?;
    let limits = options.limits;
    let pool = db::pool(
        &target.with_lock_timeout(limits.lock_timeout),
        options.pool_size,
        Some(limits.pool_wait_timeout),
    )?;
    // Snapshots get connections of their own, so they can never take the write path's (docs/decisions.md,
    // "Snapshots never wait for a client while holding a connection"); named so operators can tell them apart.
    let snapshot_pool = db::pool(
        &target.named("deeprecall-sync snapshot"),
        limits.snapshots.concurrency.max(1),
        None,
    )?;
    let probe_pool = db::pool(&target.named("deeprecall-sync probe"), 1, None)?;
    let mut client = pool
        .get()
        .await
        .map_err(|e| anyhow::anyhow!(target.explain(&e)))
        .context("connecting to Postgres")?;
    if options.migrate {
        let report = migrate::migrate(&mut client).await?;
        if !report.applied.is_empty() {
            tracing::info!(applied = ?report.applied, version = report.version, "migrations applied");
        }
    } else {
        migrate::check_current(&client).await?;
    }
    let catalog = Arc::new(CatalogHandle::new(Catalog::load(&client).await?));
    warn_publication_filters(&client, &*catalog.get().await).await;
    // Before anything is spawned: a replication URL reaching another database refuses the start. (The replicator
    // checks again at every connection; one it cannot reach yet is its to retry, as without this check.)
    let replication = match &options.replication_url {
        Some(url) => {
            let replication =
                db::PgTarget::parse(url).context("the replication URL cannot be used")?;
            let identity = db::DbIdentity::read(&client)
                .await
                .context("reading which database DATABASE_URL reaches")?;
            verify_same_database(&replication, &identity).await?;
            Some(replication)
        }
        None => None,
    };
    drop(client);
    tokio::spawn(db::catalog::watch(
        target.clone(),
        catalog.clone(),
        pool.clone(),
    ));

    let barrier_target = target.clone();
    let replication = replication.unwrap_or(target);
    let mut stream = StreamConfig::from_pg_config(
        &replication.config,
        &replication.tls,
        &options.slot,
        db::catalog::PUBLICATION,
        db::SESSION_OPTIONS,
    )?;
    stream.part_limit = options.part_limit;
    let hub = Arc::new(Hub::new(options.hub));
    let barriers = crate::live::barrier::Barriers::spawn(barrier_target, hub.clone());
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(db::ledger::prune_periodically(
        pool.clone(),
        options.op_ledger_retention,
        options.op_ledger_prune_interval,
        shutdown_rx.clone(),
    ));
    let replicator = tokio::spawn(crate::live::replicator::run(
        ReplicatorConfig {
            stream,
            slot: options.slot.clone(),
            slot_admin: replication.config,
        },
        pool.clone(),
        hub.clone(),
        catalog.clone(),
        shutdown_rx.clone(),
    ));
    let state = AppState::new(Shared {
        user_pool: Arc::new(crate::db::user_pool::UserPool::new(
            pool.clone(),
            limits.max_db_connections_per_user,
            limits.pool_wait_timeout,
        )),
        pool,
        probe_pool,
        snapshots: Arc::new(SnapshotCapacity::new(snapshot_pool, &limits.snapshots)),
        sockets_per_user: PerUserLimit::new(limits.max_connections_per_user),
        filter_bytes_per_user: PerUserLimit::new(limits.max_filter_bytes_per_user),
        shape_requests_per_user: PerUserLimit::new(limits.max_shape_requests_per_user),
        bodies: crate::http::batch::BodyBudget::new(
            limits.max_body_bytes_in_flight,
            limits.max_body_bytes_in_flight_per_user,
            limits.max_body_bytes,
        ),
        auth: Arc::new(options.auth),
        catalog,
        limits: options.limits,
        hub,
        barriers,
        slot_name: options.slot,
        cors: options.cors,
        shapes: Arc::new(crate::live::shape::Shapes::new(options.shape)),
        shutdown: shutdown_rx,
    });
    Ok(Server {
        state,
        shutdown_tx,
        replicator,
    })
}

/// Refuses a replication URL that reaches another database than DATABASE_URL (`pool`, see
/// [`db::DbIdentity::mismatch`]). Checked over an ordinary connection of the replication URL, the one the
/// replicator manages the slot with: the replication connection is opened from the same settings. A URL that
/// cannot be reached now is let through with a warning: the replicator retries it, and checks it when it connects.
async fn verify_same_database(
    replication: &db::PgTarget,
    pool: &db::DbIdentity,
) -> anyhow::Result<()> {
    let client = match replication.connect().await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, "the replication URL cannot be reached yet; the stream will retry it");
            return Ok(());
        }
    };
    let reached = db::DbIdentity::read(&client)
        .await
        .context("reading which database the replication URL reaches")?;
    if let Some(mismatch) = reached.mismatch(pool) {
        anyhow::bail!(
            "{mismatch}; point the replication URL at the same host, port and database (only its role and \
             password may differ)"
        );
    }
    Ok(())
}

/// Logs an ERROR for every synced table whose publication membership has a row filter or a column list: the
/// server starts (the other tables sync), but that table's live changes are dropped or refetched (`check` fails).
async fn warn_publication_filters(client: &tokio_postgres::Client, catalog: &Catalog) {
    match db::catalog::publication_filters(client).await {
        Ok(filters) => {
            for f in filters.iter().filter(|f| catalog.table(&f.table).is_some()) {
                tracing::error!(
                    table = %f.qualified,
                    problem = %f.describe(),
                    "a synced table's membership in the publication deeprecall_sync is filtered: its live changes \
                     are not streamed as written (run `deeprecall-sync check` for the fix)"
                );
            }
        }
        Err(e) => {
            tracing::warn!(error = %crate::error::Chain(&e), "could not read the publication's row filters and column lists")
        }
    }
}

/// Serves until `stop` resolves (a signal), then shuts down in order (docs/operations.md).
async fn serve_until_signal(
    listener: tokio::net::TcpListener,
    metrics: Option<tokio::net::TcpListener>,
    server: Server,
    stop: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let state = server.state.clone();
    let signal = server.shutdown_signal();
    if let Some(metrics) = metrics {
        tokio::spawn(crate::metrics::serve(
            metrics,
            state.clone(),
            server.shutdown_signal(),
        ));
    }
    let http = tokio::spawn(crate::app::serve(listener, state.clone(), signal));
    stop.await;
    tracing::info!("shutting down");
    server.shutdown().await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), http).await;
    // The pools' connections end here, each with a Terminate message, rather than be cut by whatever stops
    // Postgres next: `dev` stops its cluster right after, and every clean stop logged deadpool's "WARN Connection
    // error: db error" for each pooled connection.
    state.pool.close();
    state.probe_pool.close();
    state.snapshots.close();
    Ok(())
}

/// Runs the parsed command line.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::Dev(args) => dev(args).await,
        Command::Tail(args) => crate::tail::run(args).await,
        Command::Check(args) => crate::check::run(args).await,
        Command::Migrate(args) => {
            let mut client = db::PgTarget::parse(&args.database_url)
                .context("DATABASE_URL cannot be used")?
                .connect()
                .await
                .context("connecting to Postgres")?;
            let report = migrate::migrate(&mut client).await?;
            if report.applied.is_empty() {
                println!("schema is current (version {})", report.version);
            } else {
                println!(
                    "applied {:?}; schema is at version {}",
                    report.applied, report.version
                );
            }
            Ok(())
        }
        Command::Token(args) => {
            let secret = match args.jwt_secret {
                Some(s) => s,
                None => read_secret_file(&args.data_dir.join("jwt-secret")).with_context(|| {
                    format!(
                        "no --jwt-secret / DEEPRECALL_JWT_SECRET, and no dev secret in {} (run `deeprecall-sync dev` once)",
                        args.data_dir.display()
                    )
                })?,
            };
            let auth = AuthConfig::new(
                vec![KeySource::Secret(secret.into_bytes())],
                args.jwt_issuer,
                args.jwt_audience,
                args.admin_claim,
                args.admin_claim_value,
            )?;
            let token = auth
                .mint(args.sub, args.admin, args.ttl)
                .context("minting the token")?;
            println!("{token}");
            Ok(())
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let auth = args.jwt.auth_config(None)?;
    let mut options = ServerOptions::new(args.database_url.clone(), auth);
    options.replication_url = args.replication_url.clone();
    options.limits = args.limits.limits(args.pool_size);
    options.op_ledger_retention = args.ledger.retention();
    options.pool_size = args.pool_size;
    options.migrate = args.migrate;
    options.slot = args.slot.clone();
    options.cors = args.http.cors(CorsOrigins::None)?;
    options.shape = args.http.shape();
    args.memory.apply(&mut options);
    // Before the server starts, so that what happens at start (a slot recreation) is counted.
    let metrics = crate::metrics::bind(
        args.metrics_listen,
        crate::metrics::MetricsListen::Off,
        args.listen,
    )
    .await?;
    let server = start_server(options).await?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    tracing::info!(addr = %args.listen, "deeprecall-sync serving");
    if let Some(m) = &metrics {
        tracing::info!(addr = %m.local_addr()?, "metrics at /metrics");
    }
    serve_until_signal(listener, metrics, server, crate::shutdown::signal()).await
}

async fn dev(args: DevArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let secret = match &args.jwt.jwt_secret {
        Some(s) => s.clone(),
        None => read_or_create(&args.data_dir.join("jwt-secret"), || random_token(48))?,
    };
    let dev_user: Uuid = read_or_create(&args.data_dir.join("dev-user-id"), || {
        Uuid::new_v4().to_string()
    })?
    .parse()
    .context("dev-user-id is not a UUID")?;

    let mut cluster = None;
    let database_url = match &args.database_url {
        Some(url) => url.clone(),
        None => {
            let options = ClusterOptions::default();
            let mut c = LocalCluster::open_or_init(&args.data_dir.join("postgres"), &options)?;
            c.start(&options)?;
            create_database(&c.url("postgres"), "deeprecall").await?;
            let url = c.url("deeprecall");
            eprintln!(
                "local Postgres {} on 127.0.0.1:{} (log: {})",
                c.bindir().display(),
                c.port(),
                c.log_path().display()
            );
            cluster = Some(c);
            url
        }
    };
    let result = async {
        let auth = args.jwt.auth_config(Some(secret))?;
        let token = auth
            .mint(dev_user, false, 86_400)
            .context("minting the dev token")?;
        let mut options = ServerOptions::new(database_url.clone(), auth);
        options.limits = args.limits.limits(options.pool_size);
        options.op_ledger_retention = args.ledger.retention();
        options.cors = args.http.cors(CorsOrigins::Any)?;
        options.shape = args.http.shape();
        args.memory.apply(&mut options);
        let starting = async {
            let metrics = crate::metrics::bind(
                args.metrics_listen,
                crate::metrics::DEV_METRICS_LISTEN
                    .parse()
                    .map_err(anyhow::Error::msg)?,
                args.listen,
            )
            .await?;
            let server = start_server(options).await?;
            let listener = tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| {
                    format!(
                        "listening on {} (is another server running? use --listen)",
                        args.listen
                    )
                })?;
            anyhow::Ok((metrics, server, listener))
        };
        // Ctrl-C while starting (migrating, connecting) ends the start here, so that the local Postgres is
        // stopped below; the default action would end the process and leave it running.
        let (metrics, server, listener) = tokio::select! {
            started = starting => started?,
            () = crate::shutdown::signal_or_hangup() => anyhow::bail!("interrupted while starting"),
        };
        let metrics_addr = metrics.as_ref().map(|m| m.local_addr()).transpose()?;
        print_dev_banner(args.listen, metrics_addr, &database_url, dev_user, &token);
        serve_until_signal(
            listener,
            metrics,
            server,
            crate::shutdown::signal_or_hangup(),
        )
        .await
    }
    .await;
    if let Some(mut c) = cluster {
        // Not `eprintln!`, which panics when stderr is gone (a closed terminal): Postgres must still be stopped.
        let _ = std::io::Write::write_all(&mut std::io::stderr(), b"stopping local Postgres\n");
        c.stop()?;
    }
    result
}

fn print_dev_banner(
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    database_url: &str,
    user: Uuid,
    token: &str,
) {
    let redacted = crate::db::redact_url(database_url);
    let op = Uuid::new_v4();
    let id = Uuid::new_v4();
    let metrics = metrics.map_or("off".to_owned(), |m| format!("http://{m}/metrics"));
    println!(
        "\ndeeprecall-sync dev: serving on http://{listen}\n  database: {redacted}\n  dev user: {user}\n  \
         metrics: {metrics}\n  admin page: http://{listen}/admin (token: `deeprecall-sync token --sub <uuid> --admin`)\n\n\
         dev token (24 h; mint more with `deeprecall-sync token --sub <uuid>`):\n  {token}\n\n\
         try it (writes one row, owned by the dev user):\n\
         curl -s -X POST http://{listen}/v1/batch \\\n  -H 'Authorization: Bearer {token}' \\\n  \
         -H 'Content-Type: application/json' \\\n  \
         -d '{{\"ops\":[{{\"op_id\":\"{op}\",\"table\":\"works\",\"kind\":\"insert\",\"row\":{{\"id\":\"{id}\",\"title\":\"Attention Is All You Need\"}}}}]}}'\n\n\
         Ctrl-C stops the server and Postgres.\n"
    );
}

async fn create_database(admin_url: &str, name: &str) -> anyhow::Result<()> {
    let client = db::PgTarget::parse(admin_url)?
        .connect()
        .await
        .context("connecting to local Postgres")?;
    let exists = client
        .query_opt("select 1 from pg_database where datname = $1", &[&name])
        .await?
        .is_some();
    if !exists {
        client
            .batch_execute(&format!(
                "create database {}",
                db::catalog::quote_ident(name)
            ))
            .await?;
    }
    Ok(())
}

fn read_secret_file(path: &Path) -> anyhow::Result<String> {
    let s = std::fs::read_to_string(path)?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(s)
}

fn read_or_create(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    if path.exists() {
        return read_secret_file(path);
    }
    let value = make();
    write_private(path, &value)?;
    Ok(value)
}

/// Creates `path` readable by its owner only from the first byte (not written world-readable, then restricted),
/// and refuses to overwrite an existing file.
fn write_private(path: &Path, value: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(format!("{value}\n").as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_threads_default_to_the_cores_and_refuse_zero() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        // `token` with the given arguments before and after the subcommand.
        let parse = |before: &[&str], after: &[&str]| {
            let sub = ["token", "--sub", "00000000-0000-0000-0000-000000000000"];
            let args = ["deeprecall-sync"]
                .iter()
                .chain(before)
                .chain(&sub)
                .chain(after);
            Cli::try_parse_from(args.copied())
        };
        let default = parse(&[], &[]).unwrap();
        assert_eq!(default.worker_threads(), cores);
        assert!(default.worker_threads() >= 1);
        // Global: accepted before or after the subcommand.
        let set = parse(&["--worker-threads", "3"], &[]).unwrap();
        assert_eq!(set.worker_threads(), 3);
        let after = parse(&[], &["--worker-threads", "2"]).unwrap();
        assert_eq!(after.worker_threads(), 2);
        let zero = parse(&["--worker-threads", "0"], &[]).unwrap_err();
        assert_eq!(zero.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn sizes_and_times_that_would_disable_the_server_are_refused() {
        // Each was accepted: `--pool-size 0` failed after 5 s blaming Postgres, `--max-body-bytes 0` answered every
        // batch 413, `--max-http-connections 0` and `--header-timeout-secs 0` were silently read as 1, a retention
        // of 4294967295 days failed every pruning in Postgres ("interval out of range"), and `token --ttl` past
        // u64 panicked on an overflow.
        let refused = |args: &[&str]| {
            let e = Cli::try_parse_from(["deeprecall-sync"].iter().chain(args))
                .expect_err(&format!("{args:?} was accepted"));
            assert_eq!(
                e.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{args:?}: {e}"
            );
        };
        for flag in [
            "--pool-size",
            "--max-body-bytes",
            "--max-ops-per-batch",
            "--max-connections",
            "--max-http-connections",
            "--header-timeout-secs",
        ] {
            refused(&["serve", flag, "0"]);
            if flag != "--pool-size" {
                refused(&["dev", flag, "0"]);
            }
        }
        refused(&["serve", "--max-body-bytes", "1023"]);
        refused(&["serve", "--op-ledger-retention-days", "4294967295"]);
        let sub = ["token", "--sub", "00000000-0000-0000-0000-000000000000"];
        refused(&[&sub[..], &["--ttl", "18446744073709551615"]].concat());
        refused(&[&sub[..], &["--ttl", "0"]].concat());
        // The edges that are meant are taken.
        let taken = |args: &[&str]| {
            Cli::try_parse_from(["deeprecall-sync"].iter().chain(args))
                .unwrap_or_else(|e| panic!("{args:?}: {e}"));
        };
        taken(&[
            "serve",
            "--database-url",
            "postgres://h/db",
            "--pool-size",
            "1",
            "--max-body-bytes",
            "1024",
        ]);
        taken(&["dev", "--op-ledger-retention-days", "0"]);
        taken(&[&sub[..], &["--ttl", "315360000"]].concat());
    }

    #[test]
    fn dev_secrets_are_private_from_the_first_byte() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("deeprecall-cli-{}", Uuid::new_v4()));
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("jwt-secret");
        let value = read_or_create(&path, || "s3cret".into()).unwrap();
        assert_eq!(value, "s3cret");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // An existing secret is read, never replaced.
        assert_eq!(read_or_create(&path, || "other".into()).unwrap(), "s3cret");
        assert!(write_private(&path, "other").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
