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

use super::hub::{Hub, StreamState};
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

/// How long the parts of one large transaction may wait, in all, for slow connections to make room in their
/// queues before those still full are cut off (the bound on how much a large transaction can delay the ones
/// committed after it, beyond its own decoding).
pub const SPLIT_PACING_BUDGET: Duration = Duration::from_secs(30);

/// How long another process may hold the slot before this server calls itself on standby. Shorter holds are
/// normal: right after a replication connection closes, its walsender keeps the slot for a moment (55006).
const STANDBY_AFTER: Duration = Duration::from_secs(2);

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
    let mut split = SplitProgress::default();
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let began = tokio::time::Instant::now();
        let result = session(
            &config,
            &pool,
            &hub,
            &catalog,
            &mut shutdown,
            &mut known,
            &mut split,
        )
        .await;
        let wait = match result {
            Ok(()) => break,
            Err(SessionError::Stream(e)) if e.is_definite() => {
                // The same bytes come again after a reconnect: retrying would loop for ever. Stop, loudly.
                tracing::error!(
                    error = %crate::error::Chain(&e),
                    "the replication stream cannot be decoded; live delivery stops until the cause is fixed and \
                     the server restarted (a retry would fail the same way)"
                );
                hub.stream_failed(crate::error::Chain(&e).to_string());
                crate::shutdown::until_true(&mut shutdown).await;
                break;
            }
            Err(SessionError::SlotInUse(holder)) => {
                hub.stream_interrupted(format!("the replication slot is in use by {holder}"));
                let since = *held_since.get_or_insert(began);
                if since.elapsed() >= STANDBY_AFTER {
                    if !matches!(hub.stream_state(), StreamState::Standby(_)) {
                        tracing::warn!(%holder, slot = %config.slot, "another process holds the replication slot; on standby until it is free");
                    }
                    hub.stream_standby(holder);
                }
                // Take over promptly when the other process lets go (a rolling deploy).
                Duration::from_millis(500)
            }
            Err(SessionError::WrongDatabase(mismatch)) => {
                // Retried, not given up: a failover or a DNS change may be under way, and it may end.
                held_since = None;
                tracing::error!(%mismatch, retry_in = ?backoff, "not streaming from another database");
                hub.stream_interrupted(mismatch);
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                wait
            }
            Err(e) => {
                held_since = None;
                hub.stream_interrupted(crate::error::Chain(&e).to_string());
                // A session that ran for a while failed for a new reason: retry quickly again.
                if began.elapsed() > Duration::from_secs(30) {
                    backoff = FIRST_RETRY;
                }
                tracing::warn!(error = %crate::error::Chain(&e), retry_in = ?backoff, "replication interrupted");
                let wait = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                wait
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = crate::shutdown::until_true(&mut shutdown) => break,
        }
    }
    hub.close();
}

/// How far a transaction that comes in parts has been published. After a reconnect Postgres sends it again from
/// its first part (only its end is acknowledged); the parts already published are skipped, so no client gets a
/// change twice. Part boundaries are a pure function of the decoded changes and the limit, so they are the same.
#[derive(Debug, Default)]
struct SplitProgress {
    /// Commit LSN of the transaction in progress, and how many of its parts were published.
    open: Option<(u64, u32)>,
    /// Tables whose columns changed in a part published so far: refetched when the transaction completes.
    schema_changed: Vec<Arc<str>>,
    /// Until when its parts may wait for room in slow connections' queues ([`SPLIT_PACING_BUDGET`]).
    pace_until: Option<tokio::time::Instant>,
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
    #[error("the replication slot is in use by {0}")]
    SlotInUse(String),
    /// The replication URL reaches another database than the pool ([`crate::db::DbIdentity::mismatch`]).
    #[error("{0}")]
    WrongDatabase(String),
}

async fn session(
    config: &ReplicatorConfig,
    pool: &Pool,
    hub: &Hub,
    catalog: &CatalogHandle,
    shutdown: &mut watch::Receiver<bool>,
    known: &mut HashMap<u32, Vec<(String, u32)>>,
    split: &mut SplitProgress,
) -> Result<(), SessionError> {
    let (admin, admin_conn) = config
        .slot_admin
        .connect(
            crate::db::tls::connector(&config.stream.tls)
                .map_err(|e| StreamError::Fatal(e.to_string()))?,
        )
        .await?;
    tokio::spawn(admin_conn);
    // The pooled connection first: a slot made anew and not counted (its generation not bumped, because no
    // connection came in time) would look like an existing one to the next attempt, and its loss would go unsaid.
    let client = pool.get().await?;
    // Checked at every connection, not only at start: the replication URL's host may be another server by now.
    let ours = crate::db::DbIdentity::read(&client).await?;
    if let Some(mismatch) = crate::db::DbIdentity::read(&admin).await?.mismatch(&ours) {
        return Err(SessionError::WrongDatabase(mismatch));
    }
    let outcome = slot::ensure_slot(&admin, &config.slot).await?;
    let (generation, bumped) = generation(&client, &config.slot, outcome).await?;
    if bumped {
        // The slot this server streamed from is gone (dropped, or invalidated while no one streamed from it) and
        // was made anew: the changes made meanwhile will never be streamed. Said as loudly as the loss found while
        // streaming (below): an alert on `wal_status = 'lost'` rarely sees it, since the slot is recreated at once.
        tracing::error!(slot = %config.slot, found = ?outcome, generation,
            "replication slot lost; recreating it, every subscription will refetch");
        crate::metrics::slot_recreated();
    }
    // Reference for widening 32-bit xids: the current snapshot's xmax (no xid is consumed to read it).
    let mut xid_ref: u64 = client
        .query_one(
            "select pg_snapshot_xmax(pg_current_snapshot())::text::bigint",
            &[],
        )
        .await?
        .get::<_, i64>(0) as u64;
    drop(client);

    // Where this process left off, in the slot's own generation. A recreated slot (a new generation) starts where
    // Postgres says: after a failover to a replica that was behind, its WAL (and the new slot) can be *behind* the
    // old position, and asking for the old position would skip every commit in between (Postgres skips what
    // commits before the requested start).
    let here = hub.position();
    let from = if here.generation == generation {
        Lsn(here.lsn)
    } else {
        // Nor does the count of a transaction's parts already published carry over: on the new slot's timeline
        // the same commit LSN may be another transaction.
        *split = SplitProgress::default();
        Lsn(0)
    };
    let mut stream = match ReplicationStream::start(&config.stream, from).await {
        Ok(s) => s,
        Err(StreamError::SlotLost(reason)) => {
            tracing::error!(%reason, "replication slot lost; recreating it, every subscription will refetch");
            slot::recreate_slot(&admin, &config.slot).await?;
            bump_generation(&*pool.get().await?, &config.slot).await?;
            crate::metrics::slot_recreated();
            return Err(StreamError::Transient("slot recreated".into()).into());
        }
        // 55006: another walsender streams from the slot (another server, or our previous connection's for a
        // moment).
        Err(StreamError::Transient(message)) if message.contains("55006") => {
            let holder = slot::slot_holder(&admin, &config.slot).await.ok().flatten();
            return Err(SessionError::SlotInUse(
                holder.map_or_else(|| "another process".to_owned(), |h| h.to_string()),
            ));
        }
        Err(e) => return Err(e.into()),
    };
    // Only now is the slot ours: no other process can move its confirmed position any more, so this is where the
    // stream really starts. Read before, it could be stale (another server acknowledging until it let go), and
    // the hub could not tell that changes are missing (hub.rs, `stream_started`).
    let info = slot::slot_info(&admin, &config.slot).await?;
    let start = info.and_then(|i| i.confirmed_flush_lsn).unwrap_or_default();
    hub.stream_started(generation, start.0);
    tracing::info!(slot = %config.slot, generation, %start, ?outcome, "streaming from the replication slot");

    // At shutdown: acknowledge what was published and close the stream.
    async fn stop(stream: ReplicationStream, hub: &Hub) -> Result<(), SessionError> {
        let position = Lsn(hub.position().lsn);
        stream.close(position).await;
        tracing::info!(%position, "replication stopped; final position acknowledged");
        Ok(())
    }

    loop {
        let event = tokio::select! {
            biased;
            () = crate::shutdown::until_true(shutdown) => return stop(stream, hub).await,
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
                // checkpoints) may be older than what we already published: skip those, by position. (A part
                // before a transaction's last does not move the position, so its commit LSN is what counts.)
                if txn.commit_lsn.0 < hub.position().lsn {
                    if txn.last {
                        stream.ack(txn.end_lsn);
                    }
                    continue;
                }
                // ... and the parts of a split transaction that were published before the reconnect.
                if let Some((commit, published)) = split.open {
                    if commit == txn.commit_lsn.0 && txn.part < published {
                        continue;
                    }
                    if commit != txn.commit_lsn.0 {
                        split.open = None;
                        split.schema_changed.clear();
                        split.pace_until = None;
                    }
                }
                crate::metrics::transaction_decoded(txn.changes.len(), txn.last);
                let xid = widen_xid(txn.xid, xid_ref);
                xid_ref = xid_ref.max(xid);
                let current = catalog.get().await;
                let changed = columns_changed(&txn, stream.relations(), known, &current);
                let mut routed = route(txn, xid, stream.relations(), |name| {
                    current.table(name).is_some()
                });
                if routed.unroutable > 0 {
                    tracing::warn!(
                        count = routed.unroutable,
                        "changes without a valid owner_id were not routed"
                    );
                }
                if !changed.is_empty() {
                    // A column was added, dropped or retyped: let the write path and snapshots see it too.
                    // A forced refresh, not `refresh_on_miss`: that one is rate-limited (1 s) against bad client
                    // requests, so a DDL within a second of the last reload would be skipped. This runs once per
                    // schema change (the new column list is then the known one).
                    if let Ok(conn) = pool.get().await {
                        let _ = catalog.refresh(&conn).await;
                    }
                }
                // Refetches happen when the transaction is complete (with its truncations and barriers).
                split.schema_changed.extend(changed);
                let (last, end_lsn) = (routed.last, Lsn(routed.end_lsn));
                if last {
                    routed.schema_changed = std::mem::take(&mut split.schema_changed);
                    split.open = None;
                } else {
                    split.open = Some((routed.commit_lsn, routed.part + 1));
                }
                crate::metrics::changes_routed(
                    routed.per_owner.iter().map(|u| u.changes.len()).sum(),
                );
                if routed.is_split() {
                    let deadline = *split
                        .pace_until
                        .get_or_insert_with(|| tokio::time::Instant::now() + SPLIT_PACING_BUDGET);
                    // A shutdown does not wait for slow connections: the part is not published (a stop between
                    // parts, which clients resume from as from any other), and the stream closes at once.
                    tokio::select! {
                        biased;
                        () = crate::shutdown::until_true(shutdown) => return stop(stream, hub).await,
                        () = hub.wait_for_room(&routed, deadline) => {}
                    }
                    if last {
                        split.pace_until = None;
                    }
                }
                hub.publish(routed, end_lsn.0);
                if last {
                    stream.ack(end_lsn);
                }
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
/// The slot's generation, and whether this call bumped it: the slot was made anew (created or recreated) where one
/// had been streamed from before.
async fn generation(
    client: &tokio_postgres::Client,
    slot: &str,
    outcome: SlotOutcome,
) -> Result<(i64, bool), tokio_postgres::Error> {
    let existing: Option<i64> = client
        .query_opt(
            "select generation from deeprecall_replication_state where slot_name = $1",
            &[&slot],
        )
        .await?
        .map(|r| r.get(0));
    match (existing, outcome) {
        (None, _) => Ok((
            client
                .query_one(
                    "insert into deeprecall_replication_state (slot_name) values ($1)
                     on conflict (slot_name) do update set updated_at = now() returning generation",
                    &[&slot],
                )
                .await?
                .get(0),
            false,
        )),
        (Some(g), SlotOutcome::Existing) => Ok((g, false)),
        (Some(_), SlotOutcome::Created | SlotOutcome::Recreated) => {
            Ok((bump_generation(client, slot).await?, true))
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
