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

use pgwire_replication::{PgWireError, ReplicationClient, ReplicationConfig, ReplicationEvent};

use crate::protocol::{Lsn, PgOutputMessage, parse_bytes};
use crate::txn::{Transaction, TxnAssembler};
use crate::{RelationCache, TxnError};

/// How to reach the slot.
#[derive(Debug, Clone)]
pub struct StreamConfig {
    /// Host name or IP (TCP).
    pub host: String,
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
}

impl StreamConfig {
    /// Derives the replication settings from a `tokio_postgres::Config` (first TCP host).
    pub fn from_pg_config(
        config: &tokio_postgres::Config,
        slot: &str,
        publication: &str,
        options: &str,
    ) -> Result<Self, StreamError> {
        let host = config
            .get_hosts()
            .iter()
            .find_map(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => Some(name.clone()),
                _ => None,
            })
            .ok_or_else(|| {
                StreamError::Fatal("replication needs a TCP host in DATABASE_URL".into())
            })?;
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let user = config.get_user().unwrap_or("postgres").to_owned();
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let database = config.get_dbname().unwrap_or(&user).to_owned();
        Ok(Self {
            host,
            port,
            user,
            password,
            database,
            slot: slot.to_owned(),
            publication: publication.to_owned(),
            options: options.to_owned(),
            status_interval: Duration::from_millis(500),
        })
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
}

impl StreamError {
    /// Whether retrying the same thing later can succeed.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Transient(_))
    }
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
        // A decode error on a well-formed stream is a bug or a version mismatch; reconnecting re-sends Relation
        // messages and may heal a cache problem, so treat it as transient but log it loudly upstream.
        StreamError::Transient(format!("pgoutput decoding: {e}"))
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
        let cfg = ReplicationConfig::new(
            config.host.clone(),
            config.user.clone(),
            config.password.clone(),
            config.database.clone(),
            config.slot.clone(),
            config.publication.as_str(),
        )
        .with_port(config.port)
        .with_start_lsn(pgwire_replication::Lsn::from_u64(start.0))
        .with_status_interval(config.status_interval)
        .with_wakeup_interval(Duration::from_secs(1))
        .with_options(config.options.clone())
        .with_application_name("deeprecall-sync-replication");
        let mut client = ReplicationClient::connect(cfg).await.map_err(classify)?;
        client.wait_started().await.map_err(classify)?;
        Ok(Self {
            client,
            assembler: TxnAssembler::new(),
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
                    .map_err(|e| StreamError::Transient(format!("pgoutput parse: {e}")))?,
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
