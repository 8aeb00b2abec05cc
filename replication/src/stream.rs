//! The only owner of the replication socket: START_REPLICATION, transaction assembly, standby feedback.
//!
//! `pgwire-replication` does the wire work (vetted in the field notes; `tokio-postgres` has no CopyBoth). It decodes
//! Begin, Commit and logical Messages itself and hands every other pgoutput message over as raw XLogData, which
//! [`crate::protocol::parse_bytes`] decodes. Everything crate-specific stays in this file so it can be swapped.
//!
//! Acknowledgement: [`ReplicationStream::ack`] tells Postgres it may discard WAL up to an LSN. The caller acks a
//! transaction's `end_lsn` only after it has handed the transaction on, and acks an idle keepalive's `wal_end`
//! when no transaction is in flight (Postgres skips empty transactions, so writes to unpublished tables produce
//! nothing else to ack, and an unacknowledged slot pins WAL without bound).

use std::time::Duration;

use pgwire_replication::config::TlsConfig;
use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::protocol::{Lsn, PgOutputMessage, parse_bytes};
use crate::txn::{Transaction, TxnAssembler};
use crate::{PartLimit, RelationCache, TxnError};

/// libpq's `sslmode`: whether the connection is encrypted and what of the server's certificate is verified.
///
/// | mode | encrypted | chain verified | host name verified |
/// |---|---|---|---|
/// | `disable` | never | | |
/// | `prefer` | when the server offers TLS | when a root certificate is configured | |
/// | `require` | always | when a root certificate is configured (as libpq) | |
/// | `verify-ca` | always | yes | |
/// | `verify-full` | always | yes | yes |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    /// Plain TCP.
    Disable,
    /// TLS if the server offers it, else plain (libpq's default).
    #[default]
    Prefer,
    /// TLS; the certificate is only checked when a root certificate is configured.
    Require,
    /// TLS; the certificate chain must lead to a configured root.
    VerifyCa,
    /// TLS; chain as `VerifyCa`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// libpq's spelling (`verify-full`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Disable => "disable",
            Self::Prefer => "prefer",
            Self::Require => "require",
            Self::VerifyCa => "verify-ca",
            Self::VerifyFull => "verify-full",
        }
    }

    /// Whether the connection fails rather than fall back to plain TCP.
    pub fn requires_tls(self) -> bool {
        matches!(self, Self::Require | Self::VerifyCa | Self::VerifyFull)
    }
}

impl std::fmt::Display for SslMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SslMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(Self::Disable),
            "prefer" => Ok(Self::Prefer),
            "require" => Ok(Self::Require),
            "verify-ca" => Ok(Self::VerifyCa),
            "verify-full" => Ok(Self::VerifyFull),
            // libpq's `allow` tries plain first; nothing here wants that order, so say so instead of guessing.
            other => Err(format!(
                "unsupported sslmode {other:?}: use disable, prefer, require, verify-ca or verify-full"
            )),
        }
    }
}

/// TLS settings of a connection, as libpq's `sslmode`, `sslrootcert`, `sslcert` and `sslkey` give them. The server
/// parses them from DATABASE_URL and uses the same settings for its pooled and its replication connections.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`.
    pub mode: SslMode,
    /// PEM file of the trusted root certificates (`sslrootcert`, or a system bundle for `sslrootcert=system`).
    /// With `prefer` or `require`, a root certificate makes the chain verified, as in libpq.
    pub root_cert: Option<std::path::PathBuf>,
    /// Client certificate chain (`sslcert`) and its key (`sslkey`), for servers that authenticate clients by
    /// certificate.
    pub client_cert: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl TlsSettings {
    /// Whether the server's certificate chain is verified.
    pub fn verifies_chain(&self) -> bool {
        match self.mode {
            SslMode::Disable => false,
            SslMode::Prefer | SslMode::Require => self.root_cert.is_some(),
            SslMode::VerifyCa | SslMode::VerifyFull => true,
        }
    }

    /// Whether the certificate must name the host.
    pub fn verifies_host_name(&self) -> bool {
        self.mode == SslMode::VerifyFull
    }
}

/// How to reach the slot.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Host name or IP to connect to (TCP): the URL's `hostaddr` when given, else its host.
    pub host: String,
    /// The name the server's certificate must carry under `verify-full` (the URL's host, also with `hostaddr`).
    pub tls_host_name: String,
    /// Port.
    pub port: u16,
    /// Role with the REPLICATION attribute.
    pub user: String,
    /// Its password.
    pub password: String,
    /// Database whose changes are decoded.
    pub database: String,
    /// Logical replication slot (pgoutput).
    pub slot: String,
    /// Publication naming the replicated tables.
    pub publication: String,
    /// Startup `options` (pin DateStyle etc. the same way as on snapshot connections).
    pub options: String,
    /// How often feedback is sent at most.
    pub status_interval: Duration,
    /// TLS, as for the server's other connections.
    pub tls: TlsSettings,
    /// How large a part of a transaction may get before it is handed out ([`crate::txn`]): the bound on what a
    /// transaction costs in memory, whatever its size.
    pub part_limit: PartLimit,
}

/// Default [`StreamConfig::part_limit`]: about 4 MiB of decoded rows, at most 5,000 changes.
pub const DEFAULT_PART_LIMIT: PartLimit = PartLimit {
    changes: 5_000,
    bytes: 4 * 1024 * 1024,
};

impl StreamConfig {
    /// Derives the replication settings from a `tokio_postgres::Config` (first TCP host) and the TLS settings parsed
    /// from the same URL (`tokio_postgres::Config` keeps only part of them). Taking them as an argument, not as a
    /// default, means a caller cannot silently stream in plain text from a URL that asked for TLS.
    pub fn from_pg_config(
        config: &tokio_postgres::Config,
        tls: &TlsSettings,
        slot: &str,
        publication: &str,
        options: &str,
    ) -> Result<Self, StreamError> {
        let host = config.get_hosts().iter().find_map(|h| match h {
            tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
            _ => None,
        });
        let hostaddr = config.get_hostaddrs().first().map(|a| a.to_string());
        let (host, tls_host_name) = match (host, hostaddr) {
            (Some(name), Some(addr)) => (addr, name),
            (Some(name), None) => (name.clone(), name),
            (None, Some(addr)) => (addr.clone(), addr),
            (None, None) => {
                return Err(StreamError::Fatal(
                    "replication needs a TCP host in DATABASE_URL".into(),
                ));
            }
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = config.get_dbname().unwrap_or(&user).to_owned();
        Ok(Self {
            host,
            tls_host_name,
            port,
            user,
            password,
            database,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            options: options.to_owned(),
            status_interval: Duration::from_millis(500),
            tls: tls.clone(),
            part_limit: DEFAULT_PART_LIMIT,
        })
    }

    /// pgwire-replication's TLS configuration for these settings.
    fn pgwire_tls(&self) -> TlsConfig {
        let mode = match self.tls.mode {
            SslMode::Disable => pgwire_replication::SslMode::Disable,
            // With a root certificate, libpq verifies the chain in these modes too. pgwire-replication would not
            // (and its `Prefer` cannot verify): `verify-ca` is the same check, at the price of no plain-text
            // fallback for `prefer`, which a configured root certificate makes pointless anyway.
            SslMode::Prefer | SslMode::Require if self.tls.root_cert.is_some() => {
                pgwire_replication::SslMode::VerifyCa
            }
            SslMode::Prefer => pgwire_replication::SslMode::Prefer,
            SslMode::Require => pgwire_replication::SslMode::Require,
            SslMode::VerifyCa => pgwire_replication::SslMode::VerifyCa,
            SslMode::VerifyFull => pgwire_replication::SslMode::VerifyFull,
        };
        let mut tls = TlsConfig {
            mode,
            ca_pem_path: self.tls.root_cert.clone(),
            // Verify against the URL's host name even when connecting to `hostaddr`, and let an IP address be
            // checked against the certificate's IP SANs (without this, pgwire-replication refuses `verify-full` to
            // an IP address outright, where libpq checks it).
            sni_hostname: Some(self.tls_host_name.clone()),
            ..TlsConfig::default()
        };
        if let Some((cert, key)) = &self.tls.client_cert {
            tls = tls.with_client_cert(cert.clone(), key.clone());
        }
        tls
    }
}

/// What the stream yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    /// A committed transaction (possibly without row changes, e.g. only a logical message).
    Txn(Transaction),
    /// Postgres's WAL end while no transaction is open: everything before it has been sent.
    Idle {
        /// The server's WAL end.
        wal_end: Lsn,
    },
}

/// Why the stream stopped.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StreamError {
    /// The slot can no longer serve (SQLSTATE 55000, `wal_status = 'lost'`): recreate it and refetch.
    #[error("replication slot is invalidated: {0}")]
    SlotLost(String),
    /// Network, restart, slot briefly held by a previous walsender (55006): retry with backoff.
    #[error("replication stream interrupted: {0}")]
    Transient(String),
    /// Configuration or protocol problems that retrying will not fix.
    #[error("replication stream failed: {0}")]
    Fatal(String),
    /// The stream could not be decoded. Definite: Postgres re-sends the same bytes after a reconnect, so a retry
    /// fails the same way (the caller stops instead of looping).
    #[error("replication stream cannot be decoded: {0}")]
    Decode(String),
}

impl StreamError {
    /// Whether retrying the same thing later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    /// Whether a retry is certain to fail the same way (the stream itself is undecodable).
    pub fn is_definite(&self) -> bool {
        matches!(self, Self::Decode(_))
    }
}

/// Whether a TLS failure of `prefer` should be retried in plain text: the server refused TLS altogether (libpq's
/// `prefer` falls back then; a certificate that does not verify is not retried).
fn prefers_plain_fallback(mode: SslMode, message: &str) -> bool {
    mode == SslMode::Prefer && message.contains("SSLRequest rejected")
}

fn classify(err: PgWireError) -> StreamError {
    match &err {
        PgWireError::Server(msg) if msg.contains("55000") && msg.contains("invalidated") => {
            StreamError::SlotLost(msg.clone())
        }
        PgWireError::Server(msg) if msg.contains("55000") && msg.contains("wal_status") => {
            StreamError::SlotLost(msg.clone())
        }
        PgWireError::Server(msg) if msg.contains("42704") => {
            // The slot does not exist (dropped behind our back): same remedy as a lost slot.
            StreamError::SlotLost(msg.clone())
        }
        PgWireError::Auth(msg) => StreamError::Fatal(format!("authentication failed: {msg}")),
        // A certificate that does not verify, a server without TLS under sslmode=require, an unreadable root
        // certificate: retrying the same connection cannot fix any of them.
        PgWireError::Tls(msg) => StreamError::Fatal(format!("TLS: {msg}")),
        PgWireError::Server(msg) if msg.contains("42501") || msg.contains("28000") => {
            StreamError::Fatal(msg.clone())
        }
        // I/O, 55006 (slot active for another pid, e.g. our previous connection's walsender), admin shutdown
        // (57P01), protocol hiccups: retry.
        _ => StreamError::Transient(err.to_string()),
    }
}

impl From<TxnError> for StreamError {
    fn from(e: TxnError) -> Self {
        // Every connection starts with a fresh assembler and Postgres re-sends the Relation messages it needs, so
        // a decode error is not a cache glitch: it is a bug or a version mismatch, and the same bytes come again.
        StreamError::Decode(format!("pgoutput decoding: {e}"))
    }
}

/// A started replication stream.
pub struct ReplicationStream {
    client: ReplicationClient,
    assembler: TxnAssembler,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream").finish_non_exhaustive()
    }
}

impl ReplicationStream {
    /// Connects and starts streaming from `start` (Postgres starts at the slot's confirmed position if that is
    /// later). Returns once the server accepted START_REPLICATION, i.e. the slot is ours.
    pub async fn start(config: &StreamConfig, start: Lsn) -> Result<Self, StreamError> {
        let cfg = |tls: TlsConfig| {
            ReplicationConfig::new(
                config.host.clone(),
                config.user.clone(),
                config.password.clone(),
                config.database.clone(),
                config.slot.clone(),
                config.publication.as_str(),
            )
            .with_port(config.port)
            .with_tls(tls)
            .with_start_lsn(pgwire_replication::Lsn::from_u64(start.0))
            .with_status_interval(config.status_interval)
            .with_wakeup_interval(Duration::from_secs(1))
            .with_options(config.options.clone())
            .with_application_name("deeprecall-sync-replication")
        };
        async fn open(cfg: ReplicationConfig) -> Result<ReplicationClient, PgWireError> {
            let mut client = ReplicationClient::connect(cfg).await?;
            client.wait_started().await?;
            Ok(client)
        }
        let tls = config.pgwire_tls();
        let client = match open(cfg(tls.clone())).await {
            // `prefer` with a root certificate is asked of pgwire-replication as `verify-ca` (`pgwire_tls`), which
            // does not fall back to plain text as libpq's `prefer` does (and the pool does): a server without TLS
            // refused every stream while every request worked. Fall back here, as libpq would.
            Err(PgWireError::Tls(message)) if prefers_plain_fallback(config.tls.mode, &message) => {
                let plain = TlsConfig {
                    mode: pgwire_replication::SslMode::Disable,
                    ..tls
                };
                open(cfg(plain)).await.map_err(classify)?
            }
            other => other.map_err(classify)?,
        };
        Ok(Self {
            client,
            assembler: TxnAssembler::with_part_limit(config.part_limit),
        })
    }

    /// The relation cache (column names and type OIDs as of the last Relation message).
    pub fn relations(&self) -> &RelationCache {
        self.assembler.relations()
    }

    /// The next committed transaction or idle position. `Ok(None)`: the stream ended normally.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, StreamError> {
        loop {
            let Some(event) = self.client.recv().await.map_err(classify)? else {
                return Ok(None);
            };
            let message = match event {
                ReplicationEvent::KeepAlive { wal_end, .. } => {
                    if self.assembler.in_transaction() {
                        continue;
                    }
                    return Ok(Some(StreamEvent::Idle {
                        wal_end: Lsn(wal_end.as_u64()),
                    }));
                }
                ReplicationEvent::Begin {
                    final_lsn,
                    xid,
                    commit_time_micros,
                } => PgOutputMessage::Begin {
                    final_lsn: Lsn(final_lsn.as_u64()),
                    commit_time_micros,
                    xid,
                },
                ReplicationEvent::Commit {
                    lsn,
                    end_lsn,
                    commit_time_micros,
                } => PgOutputMessage::Commit {
                    flags: 0,
                    commit_lsn: Lsn(lsn.as_u64()),
                    end_lsn: Lsn(end_lsn.as_u64()),
                    commit_time_micros,
                },
                ReplicationEvent::Message {
                    transactional,
                    lsn,
                    prefix,
                    content,
                } => PgOutputMessage::Message {
                    transactional,
                    lsn: Lsn(lsn.as_u64()),
                    prefix,
                    content: content.to_vec(),
                },
                ReplicationEvent::XLogData { data, .. } => parse_bytes(data)
                    .map_err(|e| StreamError::Decode(format!("pgoutput parse: {e}")))?,
                ReplicationEvent::StoppedAt { .. } => return Ok(None),
            };
            if let Some(txn) = self.assembler.push(message)? {
                return Ok(Some(StreamEvent::Txn(txn)));
            }
        }
    }

    /// Tells Postgres everything up to `lsn` is handled (monotonic; sent within the status interval).
    pub fn ack(&self, lsn: Lsn) {
        self.client
            .update_applied_lsn(pgwire_replication::Lsn::from_u64(lsn.0));
    }

    /// Sends a final acknowledgement of `lsn`, waits (bounded) until it went out, and closes the stream.
    pub async fn close(mut self, lsn: Lsn) {
        let metrics = self.client.metrics();
        self.ack(lsn);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while metrics.last_applied_lsn().as_u64() < lsn.0 {
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(%lsn, "final replication feedback not confirmed sent before close");
                break;
            }
            // Keep draining so the worker is never blocked on a full channel while we wait.
            let _ = tokio::time::timeout(Duration::from_millis(50), self.client.recv()).await;
        }
        let _ = self.client.shutdown().await;
    }
}
