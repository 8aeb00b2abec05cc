//! Op-ledger retention: `sync_applied_ops` rows older than the retention are deleted in the background.
//!
//! The ledger answers `duplicate` for an `op_id` sent again by a batch without `client_id` (docs/api.md). A retry
//! arrives within seconds or days, not months, so rows older than the retention (default 30 days,
//! `--op-ledger-retention-days`) are pruned. Pruning deletes at most [`CHUNK`] rows per transaction, found through
//! the `applied_at` index, and pauses between chunks: each transaction holds its row locks for milliseconds and never
//! blocks writers (they insert new rows; nothing else touches old ones), and autovacuum can keep up.
//!
//! It runs as `deeprecall_maintenance` (policies/): the ledger is under forced row-level security, so the server's
//! own login role sees none of its rows, and no user role may delete across owners.

use std::time::Duration;

use deadpool_postgres::Pool;

use crate::db::{Scope, begin_scoped};

/// Rows deleted per transaction.
pub const CHUNK: i64 = 1000;

/// Pause between two chunks, so a large backlog does not monopolise a connection or the disk.
const CHUNK_PAUSE: Duration = Duration::from_millis(20);

/// Why one pruning pass stopped.
#[derive(Debug, thiserror::Error)]
pub enum PruneError {
    /// No pooled connection.
    #[error("no database connection: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
    /// A statement failed.
    #[error("database error: {0}")]
    Db(#[from] tokio_postgres::Error),
}

/// Deletes every ledger row applied more than `retention` ago (by the database's clock), `chunk` rows per
/// transaction. Returns how many rows were deleted.
pub async fn prune_once(pool: &Pool, retention: Duration, chunk: i64) -> Result<u64, PruneError> {
    let mut total = 0;
    let seconds = retention.as_secs_f64();
    loop {
        // One short transaction per chunk; the pooled connection goes back between chunks.
        let deleted = {
            let mut client = pool.get().await?;
            let session = begin_scoped(&mut client, &Scope::maintenance(), &[]).await?;
            // `ctid = any(array(...))` is a TID scan: the rows just found through the applied_at index are
            // deleted without a second index lookup.
            let deleted = session
                .tx
                .execute(
                    "delete from sync_applied_ops where ctid = any(array(
                       select ctid from sync_applied_ops
                        where applied_at < now() - $1::float8 * interval '1 second'
                        limit $2))",
                    &[&seconds, &chunk],
                )
                .await?;
            session.tx.commit().await?;
            deleted
        };
        total += deleted;
        if deleted < chunk as u64 {
            return Ok(total);
        }
        tokio::time::sleep(CHUNK_PAUSE).await;
    }
}

/// Prunes every `interval` until `shutdown` turns true. A `retention` of zero keeps the ledger forever.
pub async fn prune_periodically(
    pool: Pool,
    retention: Duration,
    interval: Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    if retention.is_zero() {
        tracing::info!("op ledger retention disabled; sync_applied_ops is kept forever");
        return;
    }
    loop {
        match prune_once(&pool, retention, CHUNK).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(rows = n, "op ledger: pruned rows past the retention"),
            Err(e) => {
                tracing::warn!(error = %crate::error::Chain(&e), "op ledger pruning failed; retrying later")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
