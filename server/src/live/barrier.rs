//! Barriers: a transactional logical message (`pg_logical_emit_message(true, 'deeprecall.barrier', <uuid>)`)
//! committed after a snapshot was taken. When the replicator publishes the transaction carrying it, every
//! transaction that committed before it has been published too (the stream is in commit order), which is what the
//! snapshot handoff waits for (docs/decisions.md, "Snapshot handoff with a barrier message").
//!
//! One task emits them on its own connection, outside the pool:
//!
//! - a snapshot asks for its barrier while it still holds its pooled connection (its rows are read after the
//!   barrier, so the HTTP endpoint knows the response's offset before its first byte). Taking a second pooled
//!   connection there could deadlock once every pooled connection is held by a snapshot waiting for one;
//! - every request waiting when a barrier is emitted is answered by that one barrier (each was sent after its
//!   snapshot was taken, so the barrier commits after all of them): a thousand clients subscribing at once cost a
//!   handful of barrier transactions, not a thousand.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use uuid::Uuid;

use super::hub::Hub;
use super::job::JobError;
use super::routing::BARRIER_PREFIX;

/// How long a barrier may take to come back through the stream before the request fails.
pub const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);
/// After this long without its barrier, another one is emitted (a reconnecting replicator may resume past it).
const BARRIER_RETRY: Duration = Duration::from_secs(5);

type Waiter = oneshot::Sender<Result<u64, JobError>>;

/// Handle to the barrier task. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Barriers {
    requests: mpsc::UnboundedSender<Waiter>,
}

impl Barriers {
    /// Starts the barrier task for the database at `config` (the pool's settings). Its connection is opened on
    /// first use.
    pub fn spawn(config: crate::db::PgTarget, hub: Arc<Hub>) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        tokio::spawn(emitter(rx, config, hub));
        Self { requests }
    }

    /// Commits a barrier after this call and waits until the stream has delivered it; returns its stream
    /// position. Every transaction that committed before the call has been published to the hub by then.
    pub async fn after_now(&self) -> Result<u64, JobError> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(tx)
            .map_err(|_| JobError::StreamUnavailable)?;
        rx.await.unwrap_or(Err(JobError::StreamUnavailable))
    }
}

async fn emitter(
    mut rx: mpsc::UnboundedReceiver<Waiter>,
    config: crate::db::PgTarget,
    hub: Arc<Hub>,
) {
    let mut conn: Option<Client> = None;
    while let Some(first) = rx.recv().await {
        let mut waiters = vec![first];
        while let Ok(w) = rx.try_recv() {
            waiters.push(w);
        }
        let result = emit_and_wait(&mut conn, &config, &hub).await;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

/// Emits barriers until one comes back through the stream (re-emitting after [`BARRIER_RETRY`], reconnecting after
/// an error), at most [`BARRIER_TIMEOUT`].
async fn emit_and_wait(
    conn: &mut Option<Client>,
    config: &crate::db::PgTarget,
    hub: &Hub,
) -> Result<u64, JobError> {
    let deadline = tokio::time::Instant::now() + BARRIER_TIMEOUT;
    let mut backoff = Duration::from_millis(50);
    let mut last_error = JobError::StreamUnavailable;
    while tokio::time::Instant::now() < deadline {
        let id = Uuid::new_v4().to_string();
        let done = hub.barrier(id.clone());
        match emit(conn, config, &id).await {
            Ok(()) => match tokio::time::timeout(BARRIER_RETRY, done).await {
                Ok(Ok(lsn)) => return Ok(lsn),
                _ => hub.cancel_barrier(&id),
            },
            Err(e) => {
                hub.cancel_barrier(&id);
                tracing::debug!(error = %crate::error::Chain(&e), "barrier not emitted; reconnecting");
                *conn = None;
                last_error = JobError::Database(e.to_string());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
    Err(match last_error {
        // The database answered but the stream never brought the barrier back.
        JobError::StreamUnavailable => JobError::StreamUnavailable,
        other => other,
    })
}

async fn emit(
    conn: &mut Option<Client>,
    config: &crate::db::PgTarget,
    id: &str,
) -> Result<(), tokio_postgres::Error> {
    if conn.as_ref().is_none_or(Client::is_closed) {
        // Outside the pool (see the module doc), with the pool's settings (TLS included).
        let (fresh, connection) = config.config.connect(config.connector()).await?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        // The commit must reach the WAL (and so the walsender) now, whatever the server's default; `local`, not
        // `on`: waiting for a synchronous standby as well would only delay the barrier (the walsender streams
        // what is flushed locally).
        fresh
            .batch_execute("set synchronous_commit = local")
            .await?;
        *conn = Some(fresh);
    }
    let Some(client) = conn.as_ref() else {
        return Ok(());
    };
    // One statement, its own transaction.
    client
        .execute(
            "select pg_logical_emit_message(true, $1, $2)",
            &[&BARRIER_PREFIX, &id],
        )
        .await?;
    Ok(())
}
