//! Initial snapshots and their handoff to the live stream (field notes, "Snapshot + live stream").
//!
//! 1. The connection already receives every committed transaction of its user; while a subscription is
//!    pending, they are buffered for it.
//! 2. A `REPEATABLE READ READ ONLY` transaction whose first statement reads `pg_current_snapshot()` (S) and
//!    `pg_current_wal_insert_lsn()` (L), as the user-scoped role (so RLS applies), reads the rows.
//! 3. A barrier: a transactional logical message committed after the snapshot. When the stream delivers it, every
//!    transaction that committed before it has been published (stream order is commit order), so the buffer
//!    holds everything the snapshot might have missed.
//! 4. Buffered transaction T is delivered iff `T.commit_lsn >= L` or T is not visible in S (xid widened to 64
//!    bits; visible = `x < xmin`, or `x < xmax` and not in xip). Everything else is already in the rows.
//!
//! `pg_current_wal_insert_lsn()` rather than `pg_current_wal_lsn()`: the latter can lag an asynchronous commit.

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Oid;
use uuid::Uuid;

use super::convert;
use super::filter::{Condition, Filter};
use super::hub::{ConnEvent, Hub};
use super::routing::{BARRIER_PREFIX, UserTxn};
use crate::db::catalog::{Table, quote_ident};
use crate::db::{USER_ROLE, begin_as};

/// A Postgres snapshot (`pg_current_snapshot()`), 64-bit xids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgSnapshot {
    /// Oldest xid still running; everything below is finished.
    pub xmin: u64,
    /// First xid not yet assigned; everything at or above is invisible.
    pub xmax: u64,
    /// In progress at snapshot time (invisible).
    pub xip: Vec<u64>,
}

impl PgSnapshot {
    /// Parses `xmin:xmax:xip,xip,...`.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let xmin = parts.next()?.parse().ok()?;
        let xmax = parts.next()?.parse().ok()?;
        let xip = match parts.next()? {
            "" => Vec::new(),
            list => list
                .split(',')
                .map(|x| x.parse().ok())
                .collect::<Option<Vec<u64>>>()?,
        };
        Some(Self { xmin, xmax, xip })
    }

    /// Whether a transaction with (64-bit) id `xid` had committed as far as this snapshot is concerned.
    pub fn sees(&self, xid: u64) -> bool {
        xid < self.xmin || (xid < self.xmax && !self.xip.contains(&xid))
    }
}

/// What a pending subscription waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// Initial (or refetch) snapshot.
    Snapshot,
    /// Resume: only the filter needs canonicalising; the hub's history does the rest.
    Resume(super::offset::Offset),
}

/// The result of a snapshot task, delivered through the connection's queue.
#[derive(Debug)]
pub struct SnapshotOutcome {
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Which attempt of that subscription this answers.
    pub epoch: u64,
    /// Data or error.
    pub result: Result<SnapshotData, SnapshotError>,
}

/// Rows and handoff data.
#[derive(Debug)]
pub struct SnapshotData {
    /// The filter with canonical values.
    pub filter: Filter,
    /// What the task was for.
    pub purpose: Purpose,
    /// S.
    pub snapshot: Option<PgSnapshot>,
    /// L.
    pub wal_lsn: u64,
    /// Position of the barrier transaction.
    pub barrier_lsn: u64,
}

impl SnapshotData {
    /// Whether buffered transaction `t` must be delivered after the rows.
    pub fn must_deliver(&self, t: &UserTxn) -> bool {
        match &self.snapshot {
            None => true,
            Some(s) => t.commit_lsn.0 >= self.wal_lsn || !s.sees(t.xid),
        }
    }
}

/// Why a subscription could not start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    /// A `where` value does not fit its column's type.
    #[error("invalid `where` value: {0}")]
    BadFilter(String),
    /// The replication stream did not deliver the barrier in time.
    #[error("the live stream is not available; retry")]
    StreamUnavailable,
    /// Database trouble.
    #[error("database error: {0}")]
    Database(String),
}

impl SnapshotError {
    /// Stable code for the client.
    pub fn code(&self) -> &'static str {
        match self {
            Self::BadFilter(_) => "invalid_where",
            Self::StreamUnavailable => "stream_unavailable",
            Self::Database(_) => "database_error",
        }
    }
}

/// How long a resume waits for the replication stream to (re)start and reach the client's offset.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// How long a snapshot waits for its barrier to come back through the stream.
const BARRIER_TIMEOUT: Duration = Duration::from_secs(60);
/// After this long without its barrier, a snapshot emits another one.
const BARRIER_RETRY: Duration = Duration::from_secs(5);

/// Everything a snapshot task needs.
#[derive(Debug, Clone)]
pub struct SnapshotJob {
    /// The user.
    pub owner: Uuid,
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Attempt number.
    pub epoch: u64,
    /// Table (from the catalog).
    pub table: Arc<Table>,
    /// Filter as the client sent it.
    pub filter: Filter,
    /// Snapshot or resume.
    pub purpose: Purpose,
    /// Where row frames go (the connection's snapshot channel).
    pub chunks: mpsc::Sender<SnapshotChunk>,
}

impl SnapshotJob {
    async fn send_chunk(&self, frame: String) -> Result<(), SnapshotError> {
        let chunk = SnapshotChunk {
            sub_id: self.sub_id.clone(),
            epoch: self.epoch,
            frame,
        };
        // The connection is gone: stop reading rows.
        self.chunks
            .send(chunk)
            .await
            .map_err(|_| SnapshotError::Database("connection closed".into()))
    }
}

/// One ready-to-send `snapshot` frame of a subscription's initial rows.
#[derive(Debug)]
pub struct SnapshotChunk {
    /// Subscription id.
    pub sub_id: Arc<str>,
    /// Attempt it belongs to (a stale attempt's frames are dropped).
    pub epoch: u64,
    /// The frame's JSON text.
    pub frame: String,
}

/// Rows per `snapshot` frame.
pub const SNAPSHOT_FRAME_ROWS: usize = 500;

/// Builds `{"type":"snapshot","id":…,"rows":[…]}` by appending rows.
struct SnapshotFrame {
    out: Vec<u8>,
    rows: usize,
}

impl SnapshotFrame {
    fn new(id: &str) -> Self {
        let mut out = Vec::with_capacity(64 * 1024);
        out.extend_from_slice(b"{\"type\":\"snapshot\",\"id\":");
        convert::write_json_str(&mut out, id);
        out.extend_from_slice(b",\"rows\":[");
        Self { out, rows: 0 }
    }

    fn push_row(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        if self.rows > 0 {
            self.out.push(b',');
        }
        write(&mut self.out);
        self.rows += 1;
    }

    fn finish(mut self) -> String {
        self.out.extend_from_slice(b"]}");
        convert::into_string(self.out)
    }
}

/// Runs a job and sends the outcome into the connection's queue.
pub async fn run(pool: Pool, hub: Arc<Hub>, job: SnapshotJob, queue: mpsc::Sender<ConnEvent>) {
    let result = match job.purpose {
        Purpose::Snapshot => snapshot(&pool, &hub, &job).await,
        Purpose::Resume(from) => {
            let result = canonical_only(&pool, &job).await;
            // Right after a server restart clients reconnect before the replicator has started (generation 0,
            // position 0), and its position may still trail an offset the previous process issued: resuming
            // then would refuse a servable offset. Wait, bounded, here rather than in the connection's loop.
            hub.ready_for(from, RESUME_WAIT).await;
            result
        }
    };
    let outcome = SnapshotOutcome {
        sub_id: job.sub_id.clone(),
        epoch: job.epoch,
        result,
    };
    // Waits if the queue is full: a snapshot result must not be dropped (the connection closes if it lags).
    let _ = queue.send(ConnEvent::Snapshot(Box::new(outcome))).await;
}

fn db_err(e: tokio_postgres::Error) -> SnapshotError {
    match e.as_db_error() {
        Some(db) if db.code().code().starts_with("22") => {
            SnapshotError::BadFilter(db.message().to_owned())
        }
        _ => SnapshotError::Database(e.to_string()),
    }
}

async fn canonical_only(pool: &Pool, job: &SnapshotJob) -> Result<SnapshotData, SnapshotError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| SnapshotError::Database(e.to_string()))?;
    let (tx, _) = begin_as(&mut client, USER_ROLE, job.owner, true)
        .await
        .map_err(db_err)?;
    let filter = canonicalise(&tx, &job.table, &job.filter).await?;
    Ok(SnapshotData {
        filter,
        purpose: job.purpose,
        snapshot: None,
        wal_lsn: 0,
        barrier_lsn: 0,
    })
}

/// Rewrites the filter's values into Postgres's canonical text for each column's type (validating them).
async fn canonicalise(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
    filter: &Filter,
) -> Result<Filter, SnapshotError> {
    let mut out = Filter::default();
    for c in &filter.conditions {
        let column = table
            .column(&c.column)
            .ok_or_else(|| SnapshotError::BadFilter(format!("unknown column `{}`", c.column)))?;
        let given: Vec<&str> = c.values.iter().filter_map(|v| v.as_deref()).collect();
        // The type's output function (what pgoutput sends), not a cast to text: see `output_text`.
        let sql = format!(
            "select coalesce(array_agg({}), '{{}}') from unnest($1::text[]) v",
            output_text(&format!("v::{}", column.type_name), column.type_oid)
        );
        let canonical: Vec<String> = tx.query_one(&sql, &[&given]).await.map_err(db_err)?.get(0);
        let mut values: Vec<Option<String>> = canonical.into_iter().map(Some).collect();
        if c.values.iter().any(Option::is_none) {
            values.push(None);
        }
        out.conditions.push(Condition {
            column: c.column.clone(),
            values,
        });
    }
    Ok(out)
}

async fn snapshot(
    pool: &Pool,
    hub: &Hub,
    job: &SnapshotJob,
) -> Result<SnapshotData, SnapshotError> {
    // The slot must exist before the snapshot is taken: a transaction committed after the snapshot but before the
    // slot's consistent point would be in neither (right after server start, or while the slot is recreated).
    if !hub.wait_started(BARRIER_TIMEOUT).await {
        return Err(SnapshotError::StreamUnavailable);
    }
    let mut client = pool
        .get()
        .await
        .map_err(|e| SnapshotError::Database(e.to_string()))?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_err)?;
    // First statement: fixes the transaction's snapshot, and reads S and L in the same instant.
    let user = job.owner.to_string();
    let head = tx
        .query_one(
            "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text,
                    set_config('role', $1, true), set_config('app.user_id', $2, true)",
            &[&USER_ROLE, &user],
        )
        .await
        .map_err(db_err)?;
    let snapshot = PgSnapshot::parse(head.get::<_, &str>(0))
        .ok_or_else(|| SnapshotError::Database("unparseable pg_current_snapshot()".into()))?;
    let wal_lsn = head
        .get::<_, &str>(1)
        .parse::<deeprecall_replication::Lsn>()
        .map_err(|_| SnapshotError::Database("unparseable WAL position".into()))?
        .0;
    let filter = canonicalise(&tx, &job.table, &job.filter).await?;

    // The columns as of now (a column added since the catalog was loaded is included); generated columns are not
    // in the stream, so not here either.
    let columns: Vec<(String, u32)> = tx
        .query(
            "select attname::text, atttypid from pg_attribute
              where attrelid = $1 and attnum > 0 and not attisdropped and attgenerated = ''
              order by attnum",
            &[&(job.table.oid as Oid)],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let select_list: Vec<String> = columns
        .iter()
        .map(|(n, oid)| output_text(&quote_ident(n), *oid))
        .collect();
    let mut sql = format!(
        "select {} from {} where owner_id = $1",
        select_list.join(", "),
        job.table.qualified()
    );
    let mut arrays: Vec<Vec<String>> = Vec::new();
    for c in &filter.conditions {
        let Some(column) = job.table.column(&c.column) else {
            continue;
        };
        let ident = quote_ident(&c.column);
        let mut parts = Vec::new();
        let given: Vec<String> = c.values.iter().filter_map(Clone::clone).collect();
        if !given.is_empty() {
            arrays.push(given);
            parts.push(format!(
                "{ident} = any(${}::text[]::{}[])",
                arrays.len() + 1,
                column.type_name
            ));
        }
        if c.values.iter().any(Option::is_none) {
            parts.push(format!("{ident} is null"));
        }
        if parts.is_empty() {
            parts.push("false".into());
        }
        sql.push_str(&format!(" and ({})", parts.join(" or ")));
    }
    let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = vec![&job.owner];
    for a in &arrays {
        params.push(a);
    }
    // Rows are streamed to the client while Postgres still produces them, in frames of SNAPSHOT_FRAME_ROWS;
    // the send waits when the client is slow (a bounded channel), so memory stays bounded.
    let stream = tx
        .query_raw(&sql, params.iter().copied())
        .await
        .map_err(db_err)?;
    futures::pin_mut!(stream);
    let mut frame = SnapshotFrame::new(&job.sub_id);
    let mut sent_any = false;
    while let Some(row) = stream.next().await {
        let row = row.map_err(db_err)?;
        frame.push_row(|buf| {
            convert::write_row(
                buf,
                columns
                    .iter()
                    .enumerate()
                    .map(|(i, (name, oid))| (name.as_str(), *oid, row.get::<_, Option<&str>>(i))),
            )
        });
        if frame.rows == SNAPSHOT_FRAME_ROWS {
            let full = std::mem::replace(&mut frame, SnapshotFrame::new(&job.sub_id));
            job.send_chunk(full.finish()).await?;
            sent_any = true;
        }
    }
    if frame.rows > 0 || !sent_any {
        job.send_chunk(frame.finish()).await?;
    }
    tx.commit().await.map_err(db_err)?;

    let barrier_lsn = barrier(&mut client, hub).await?;
    Ok(SnapshotData {
        filter,
        purpose: job.purpose,
        snapshot: Some(snapshot),
        wal_lsn,
        barrier_lsn,
    })
}

/// SQL for the text of `expr` as the type's output function prints it: what pgoutput v1 sends for the same value,
/// so the snapshot and the live path render (and filters compare) identical text.
///
/// Not `expr::text`: a cast to text is the output function only for types without their own cast. `boolean::text`
/// is `true`/`false` where the output (and the stream) says `t`/`f` (so every `true` reached snapshot clients as
/// `false`, and a `{"favorite": true}` filter, canonicalised to `true`, never matched a live `t`); `bpchar::text`
/// drops the padding and `inet::text` adds the netmask likewise. `format('%s', …)` calls the output function for
/// any type; NULL stays NULL (format would print an empty string).
fn output_text(expr: &str, type_oid: u32) -> String {
    match type_oid {
        // text, varchar, name: already their own output.
        25 | 1043 | 19 => expr.to_owned(),
        // uuid, integers, floats, numeric, json(b), timestamps, dates, arrays of these...: `::text` is the output
        // function (no type-specific cast to text exists for them) and cheaper than format().
        2950 | 20 | 21 | 23 | 26 | 700 | 701 | 1700 | 114 | 3802 | 1082 | 1083 | 1114 | 1184
        | 1186 | 1009 | 1015 | 2951 | 1007 | 1016 | 1000 => format!("({expr})::text"),
        _ => format!("case when ({expr}) is null then null else format('%s', {expr}) end"),
    }
}

/// Commits a transactional logical message and waits until the stream has delivered it; returns its position.
async fn barrier(client: &mut deadpool_postgres::Object, hub: &Hub) -> Result<u64, SnapshotError> {
    // Re-emitted if it does not come back soon: a reconnecting replicator may resume past it.
    let deadline = tokio::time::Instant::now() + BARRIER_TIMEOUT;
    while tokio::time::Instant::now() < deadline {
        let id = Uuid::new_v4().to_string();
        let done = hub.barrier(id.clone());
        let emitted = async {
            let tx = client.transaction().await?;
            // The commit must reach the WAL (and so the walsender) now, whatever the server's default.
            tx.batch_execute("set local synchronous_commit = on")
                .await?;
            tx.execute(
                "select pg_logical_emit_message(true, $1, $2)",
                &[&BARRIER_PREFIX, &id],
            )
            .await?;
            tx.commit().await
        }
        .await;
        if let Err(e) = emitted {
            hub.cancel_barrier(&id);
            return Err(db_err(e));
        }
        match tokio::time::timeout(BARRIER_RETRY, done).await {
            Ok(Ok(lsn)) => return Ok(lsn),
            _ => hub.cancel_barrier(&id),
        }
    }
    Err(SnapshotError::StreamUnavailable)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_visibility() {
        let s = PgSnapshot::parse("100:110:102,105").unwrap();
        assert_eq!(
            s,
            PgSnapshot {
                xmin: 100,
                xmax: 110,
                xip: vec![102, 105]
            }
        );
        assert!(s.sees(99));
        assert!(s.sees(101));
        assert!(!s.sees(102));
        assert!(!s.sees(110));
        assert!(!s.sees(200));
        assert_eq!(PgSnapshot::parse("5:5:").unwrap().xip, Vec::<u64>::new());
        assert!(PgSnapshot::parse("garbage").is_none());
    }
}
