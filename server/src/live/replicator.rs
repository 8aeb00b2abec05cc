//! The replication task: slot upkeep, streaming, routing, publishing, acknowledging, reconnecting.
//!
//! What an acknowledged LSN promises: every transaction that ended at or before it has been published to the
//! hub (delivered to connected subscribers' queues and kept in the in-memory history). It does not promise
//! durability of that history: after a restart of this server, resumes are served from the slot's confirmed
//! position onwards, and older offsets get `must_refetch`. On shutdown the final position is both acknowledged
//! and sent to every live subscription, so clients connected at shutdown resume without refetching.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use deeprecall_replication::Lsn;
use deeprecall_replication::slot::{self, SlotOutcome};
use deeprecall_replication::stream::{ReplicationStream, StreamConfig, StreamError, StreamEvent};
use tokio::sync::watch;

use super::hub::Hub;
use super::routing::{route, widen_xid};
use crate::db::catalog::CatalogHandle;

/// Replicator settings.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// How to reach Postgres for replication.
    pub stream: StreamConfig,
    /// Slot name.
    pub slot: String,
    /// Ordinary connection settings of the replication role: slot functions need the REPLICATION attribute,
    /// which the pool's role may lack (`--replication-url`).
    pub slot_admin: tokio_postgres::Config,
}

/// Runs until `shutdown` becomes true; then acknowledges the final position, closes the stream and marks the hub
/// closed.
pub async fn run(
    config: ReplicatorConfig,
    pool: Pool,
    hub: Arc<Hub>,
    catalog: Arc<CatalogHandle>,
    mut shutdown: watch::Receiver<bool>,
) {
    const FIRST_RETRY: Duration = Duration::from_millis(100);
    let mut backoff = FIRST_RETRY;
    // Column lists per relation as last streamed, kept across reconnects (Postgres re-sends Relation messages on
    // every connection; only a real change must trigger a refetch). A relation not streamed yet is compared with
    // the catalog as it was when this server started, so a column added later is caught on its first change.
    let mut known: HashMap<u32, Vec<(String, u32)>> = HashMap::new();
    for table in catalog.get().await.tables() {
        let columns = table
            .columns
            .iter()
            .filter(|c| !c.generated)
            .map(|c| (c.name.clone(), c.type_oid))
            .collect();
        known.insert(table.oid, columns);
    }
    loop {
        if *shutdown.borrow() {
            break;
        }
        let began = tokio::time::Instant::now();
        match session(&config, &pool, &hub, &catalog, &mut shutdown, &mut known).await {
            Ok(()) => break,
            Err(e) => {
                // A session that ran for a while failed for a new reason: retry quickly again.
                if began.elapsed() > Duration::from_secs(30) {
                    backoff = FIRST_RETRY;
                }
                tracing::warn!(error = %e, retry_in = ?backoff, "replication interrupted");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = crate::shutdown::until_true(&mut shutdown) => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
    hub.close();
}

#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("slot: {0}")]
    Slot(#[from] slot::SlotError),
    #[error("database: {0}")]
    Db(#[from] tokio_postgres::Error),
    #[error("pool: {0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

async fn session(
    config: &ReplicatorConfig,
    pool: &Pool,
    hub: &Hub,
    catalog: &CatalogHandle,
    shutdown: &mut watch::Receiver<bool>,
    known: &mut HashMap<u32, Vec<(String, u32)>>,
) -> Result<(), SessionError> {
    let (admin, admin_conn) = config
        .slot_admin
        .connect(
            crate::db::tls::connector(&config.stream.tls)
                .map_err(|e| StreamError::Fatal(e.to_string()))?,
        )
        .await?;
    tokio::spawn(admin_conn);
    let outcome = slot::ensure_slot(&admin, &config.slot).await?;
    let client = pool.get().await?;
    let generation = generation(&client, &config.slot, outcome).await?;
    let info = slot::slot_info(&admin, &config.slot).await?;
    let start = info.and_then(|i| i.confirmed_flush_lsn).unwrap_or_default();
    // Reference for widening 32-bit xids: the current snapshot's xmax (no xid is consumed to read it).
    let mut xid_ref: u64 = client
        .query_one(
            "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get::<_, i64>(0) as u64;
    drop(client);
    hub.stream_started(generation, start.0);
    tracing::info!(slot = %config.slot, generation, %start, ?outcome, "starting replication");

    let mut stream = match ReplicationStream::start(&config.stream, Lsn(hub.position().lsn)).await {
        Ok(s) => s,
        Err(StreamError::SlotLost(reason)) => {
            tracing::error!(%reason, "replication slot lost; recreating it, every subscription will refetch");
            slot::recreate_slot(&admin, &config.slot).await?;
            bump_generation(&*pool.get().await?, &config.slot).await?;
            return Err(StreamError::Transient("slot recreated".into()).into());
        }
        Err(e) => return Err(e.into()),
    };
    loop {
        let event = tokio::select! {
            biased;
            () = crate::shutdown::until_true(shutdown) => {
                let position = Lsn(hub.position().lsn);
                stream.close(position).await;
                tracing::info!(%position, "replication stopped; final position acknowledged");
                return Ok(());
            }
            event = stream.next() => event?,
        };
        match event {
            None => return Err(StreamError::Transient("stream ended".into()).into()),
            Some(StreamEvent::Idle { wal_end }) => {
                hub.advance(wal_end.0);
                stream.ack(Lsn(hub.position().lsn));
            }
            Some(StreamEvent::Txn(txn)) => {
                // After a reconnect Postgres re-sends from its confirmed position, which (persisted only at
                // checkpoints) may be older than what we already published: skip those, by position.
                if txn.end_lsn.0 <= hub.position().lsn {
                    stream.ack(txn.end_lsn);
                    continue;
                }
                let xid = widen_xid(txn.xid, xid_ref);
                xid_ref = xid_ref.max(xid);
                let current = catalog.get().await;
                let mut routed = route(&txn, xid, stream.relations(), |name| {
                    current.table(name).is_some()
                });
                routed.schema_changed = columns_changed(&txn, stream.relations(), known, &current);
                if routed.unroutable > 0 {
                    tracing::warn!(
                        count = routed.unroutable,
                        "changes without a valid owner_id were not routed"
                    );
                }
                if !routed.schema_changed.is_empty() {
                    // A column was added, dropped or retyped: let the write path and snapshots see it too.
                    // A forced refresh, not `refresh_on_miss`: that one is rate-limited (1 s) against bad client
                    // requests, so a DDL within a second of the last reload would be skipped. This runs once per
                    // schema change (the new column list is then the known one).
                    if let Ok(conn) = pool.get().await {
                        let _ = catalog.refresh(&conn).await;
                    }
                }
                hub.publish(routed, txn.end_lsn.0);
                stream.ack(txn.end_lsn);
            }
        }
    }
}

/// Synced tables of `txn` whose streamed columns differ from the last Relation seen for them (or, before the
/// first, from the catalog at startup). An added column with a default (or a dropped or retyped one) changes
/// existing rows without a row change in the stream, so their subscriptions must refetch.
fn columns_changed(
    txn: &deeprecall_replication::Transaction,
    relations: &deeprecall_replication::RelationCache,
    known: &mut HashMap<u32, Vec<(String, u32)>>,
    catalog: &crate::db::catalog::Catalog,
) -> Vec<Arc<str>> {
    let mut changed: Vec<Arc<str>> = Vec::new();
    let mut seen: Vec<u32> = Vec::new();
    for c in &txn.changes {
        if seen.contains(&c.relation_oid) {
            continue;
        }
        seen.push(c.relation_oid);
        let Some(rel) = relations.get(c.relation_oid) else {
            continue;
        };
        let same = known.get(&c.relation_oid).is_some_and(|prev| {
            prev.len() == rel.columns.len()
                && prev
                    .iter()
                    .zip(&rel.columns)
                    .all(|((n, t), col)| *n == col.name && *t == col.type_oid)
        });
        if same {
            continue;
        }
        let columns = rel
            .columns
            .iter()
            .map(|col| (col.name.clone(), col.type_oid))
            .collect();
        let had = known.insert(c.relation_oid, columns).is_some();
        if had && catalog.table(&c.table).is_some() {
            changed.push(Arc::from(c.table.as_str()));
        }
    }
    changed
}

/// The slot generation, bumped when the slot had to be (re)created after having existed.
async fn generation(
    client: &tokio_postgres::Client,
    slot: &str,
    outcome: SlotOutcome,
) -> Result<i64, tokio_postgres::Error> {
    let existing: Option<i64> = client
        .query_opt(
            "select generation from deeprecall_replication_state where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    match (existing, outcome) {
        (None, _) => Ok(client
            .query_one(
                "insert into deeprecall_replication_state (slot_name) values ($1)
                 on conflict (slot_name) do update set updated_at = now() returning generation",
                &[&slot],
            )
            .await?
            .get(0)),
        (Some(g), SlotOutcome::Existing) => Ok(g),
        (Some(_), SlotOutcome::Created | SlotOutcome::Recreated) => {
            bump_generation(client, slot).await
        }
    }
}

async fn bump_generation(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<i64, tokio_postgres::Error> {
    Ok(client
        .query_one(
            "insert into deeprecall_replication_state (slot_name) values ($1)
             on conflict (slot_name) do update set generation = deeprecall_replication_state.generation + 1,
                                                   updated_at = now()
             returning generation",
            &[&slot],
        )
        .await?
        .get(0))
}
