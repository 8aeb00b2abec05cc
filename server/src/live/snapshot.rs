//! The snapshot job: reads one subscription's rows as of one consistent database snapshot and establishes its
//! handoff to the live stream. It knows nothing about transports: rows go to a [`SnapshotSink`] (WebSocket
//! frames, or an Electric HTTP response body), its report goes back through the sink too.
//!
//! ```text
//!  job task (holds no connection)                     reader task (holds a snapshot connection)
//!   admission: a per-user place, a snapshot connection (admission.rs; bounded wait, else `Busy`)
//!                                          ──spawn──►  BEGIN REPEATABLE READ READ ONLY
//!                                                       1. pg_current_snapshot() = S, pg_current_wal_insert_lsn() = L,
//!                                                          role + app.user_id (RLS applies)
//!                                                       2. canonicalise the filter; the column list; start the query
//!   ◄──────────── started (S, L, filter, columns) ───── 3. rows ──► spool (memory, then a temp file; spill.rs)
//!   barrier committed after S ──► stream position B     COMMIT; the connection goes back to the snapshot pool
//!   sink.prepared(S, L, B, columns, filter)
//!   rows from the spool ──► sink.row() … at the client's pace
//!   sink.finish(report); the per-user place is given back
//! ```
//!
//! Why two tasks: the reader never waits for the client. It reads as fast as Postgres produces the rows, commits
//! and gives its connection back; a client that reads slowly (or not at all) only keeps its spool (bounded memory,
//! then disk) and its user's place, never a connection or an open transaction holding back `xmin`
//! (docs/decisions.md, "Snapshots never wait for a client while holding a connection"). A fast client still gets
//! the first rows while Postgres reads the rest: the spool hands rows over as soon as the forwarder waits for them.
//!
//! The connection's buffered transactions plus S, L and B decide which transactions the rows miss
//! (handoff.rs). A resume job only canonicalises the filter and waits until the stream can serve the offset.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Object;
use futures::StreamExt;
use tokio::sync::oneshot;
use tokio_postgres::types::{Oid, ToSql, Type};

use super::admission::{Admission, AdmitError, SnapshotCapacity, UserPermit};
use super::barrier::{BARRIER_TIMEOUT, Barriers};
use super::convert::output_text_sql;
use super::filter::{Filter, SqlParam, is_relative_time};
use super::handoff::{Handoff, PgSnapshot};
use super::hub::{CannotResume, Hub};
use super::job::{JobError, JobReport, JobSpec, Prepared, Purpose, SnapshotColumn};
use super::spill::{SpoolError, SpoolWriter};
use crate::db::catalog::{Table, quote_ident};
use crate::db::{Scope, begin_scoped};

/// How long a resume waits for the replication stream to (re)start and reach the client's offset.
const RESUME_WAIT: Duration = Duration::from_secs(10);

/// The receiver went away (client disconnected): stop reading rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkGone;

/// Where a job's rows and report go.
pub trait SnapshotSink: Send + 'static {
    /// Called once, after the barrier and before the first row (not for a resume).
    fn prepared(
        &mut self,
        prepared: &Prepared,
    ) -> impl Future<Output = Result<(), SinkGone>> + Send;

    /// One row: `row[i]` is the text output of `columns[i]` (`None`: NULL).
    fn row(
        &mut self,
        columns: &[SnapshotColumn],
        row: &[Option<&str>],
    ) -> impl Future<Output = Result<(), SinkGone>> + Send;

    /// Resolves once the receiver is gone: a job still waiting for its turn is then dropped.
    fn closed(&self) -> impl Future<Output = ()> + Send;

    /// The job ended (after its last row, or with an error).
    fn finish(self, report: JobReport) -> impl Future<Output = ()> + Send;
}

/// Runs a job and hands its report to the sink.
pub async fn run<S: SnapshotSink>(
    capacity: Arc<SnapshotCapacity>,
    hub: Arc<Hub>,
    barriers: Barriers,
    spec: JobSpec,
    mut sink: S,
) {
    let result = match spec.purpose {
        Purpose::Snapshot => snapshot(&capacity, &hub, &barriers, &spec, &mut sink).await,
        Purpose::Resume(from) => {
            let result = canonical_only(&capacity, &spec, &sink).await;
            // Right after a server restart clients reconnect before the replicator has started (generation 0,
            // position 0), and its position may still trail an offset the previous process issued: resuming
            // then would refuse a servable offset. Wait, bounded, here rather than in the connection's loop.
            hub.ready_for(from, RESUME_WAIT).await;
            result
        }
    };
    if let Err(JobError::Database(detail)) = &result {
        // The client gets a generic `database_error`; the cause is for the operator.
        tracing::warn!(error = %detail, table = %spec.table.name, "snapshot failed");
    }
    sink.finish(JobReport {
        sub_id: spec.sub_id.clone(),
        epoch: spec.epoch,
        result,
    })
    .await;
}

fn db_err(e: tokio_postgres::Error) -> JobError {
    match e.as_db_error() {
        Some(db) if db.code().code().starts_with("22") => {
            JobError::BadFilter(db.message().to_owned())
        }
        _ => JobError::Database(e.to_string()),
    }
}

fn gone(_: SinkGone) -> JobError {
    JobError::Database("connection closed".into())
}

impl From<SpoolError> for JobError {
    fn from(e: SpoolError) -> Self {
        match e {
            // Out of spill files: like out of places, a retry later succeeds.
            SpoolError::TooManyFiles => JobError::Busy,
            SpoolError::ReaderGone => gone(SinkGone),
            other => {
                tracing::warn!(error = %other, "snapshot spool failed");
                JobError::Database(other.to_string())
            }
        }
    }
}

/// Waits for a per-user place and a snapshot connection (bounded), unless the receiver goes away first.
async fn admit<S: SnapshotSink>(
    capacity: &SnapshotCapacity,
    spec: &JobSpec,
    sink: &S,
) -> Result<(Admission, Object), JobError> {
    let waited = async {
        let admission = capacity.admit(spec.owner).await?;
        let client = capacity.connection(&admission).await?;
        Ok::<_, AdmitError>((admission, client))
    };
    tokio::select! {
        admitted = waited => admitted.map_err(|e| match e {
            AdmitError::Busy => JobError::Busy,
            AdmitError::Database(e) => JobError::Database(e.to_string()),
        }),
        () = sink.closed() => Err(gone(SinkGone)),
    }
}

async fn canonical_only<S: SnapshotSink>(
    capacity: &SnapshotCapacity,
    spec: &JobSpec,
    sink: &S,
) -> Result<Prepared, JobError> {
    let filter = if spec.filter.is_canonical() {
        spec.filter.clone()
    } else {
        let (_admission, mut client) = admit(capacity, spec, sink).await?;
        let session = begin_scoped(&mut client, &Scope::user(spec.owner).read_only(), &[])
            .await
            .map_err(db_err)?;
        canonicalise(&session.tx, &spec.filter).await?
    };
    Ok(Prepared {
        filter,
        purpose: spec.purpose,
        handoff: None,
        columns: Arc::from(Vec::new()),
        generation: 0,
        earlier: Ok(Vec::new()),
    })
}

/// Rewrites the filter's values into Postgres's canonical text for each column's type (validating them), in one
/// round trip: each type's literals are cast and printed by the type's output function (what pgoutput sends, see
/// `output_text_sql`), in order.
pub async fn canonicalise(
    client: &impl deadpool_postgres::GenericClient,
    filter: &Filter,
) -> Result<Filter, JobError> {
    if filter.is_canonical() {
        return Ok(filter.clone());
    }
    let groups = filter.literals_by_type();
    for (_, type_oid, texts) in &groups {
        if let Some(text) = texts.iter().find(|t| is_relative_time(*type_oid, t)) {
            return Err(JobError::BadFilter(format!(
                "{text:?} is a time relative to when the filter is read, and would move under a live filter: \
                 use an absolute date or timestamp"
            )));
        }
    }
    if groups.is_empty() {
        return filter
            .with_canonical(&[])
            .map_err(|e| JobError::BadFilter(e.0));
    }
    let selects: Vec<String> = groups
        .iter()
        .enumerate()
        .map(|(i, (type_name, type_oid, _))| {
            format!(
                "(select coalesce(array_agg({} order by o), '{{}}') from unnest(${}::text[]) with ordinality u(v, o))",
                output_text_sql(&format!("v::{type_name}"), *type_oid),
                i + 1
            )
        })
        .collect();
    let sql = format!("select {}", selects.join(", "));
    let params: Vec<&(dyn ToSql + Sync)> = groups
        .iter()
        .map(|(_, _, texts)| texts as &(dyn ToSql + Sync))
        .collect();
    let row = client.query_one(&sql, &params).await.map_err(db_err)?;
    let canonical: Vec<Vec<String>> = (0..groups.len()).map(|i| row.get(i)).collect();
    filter
        .with_canonical(&canonical)
        .map_err(|e| JobError::BadFilter(e.0))
}

async fn snapshot<S: SnapshotSink>(
    capacity: &SnapshotCapacity,
    hub: &Hub,
    barriers: &Barriers,
    spec: &JobSpec,
    sink: &mut S,
) -> Result<Prepared, JobError> {
    // The slot must exist before the snapshot is taken: a transaction committed after the snapshot but before the
    // slot's consistent point would be in neither (right after server start, or while the slot is recreated).
    if !hub.wait_started(BARRIER_TIMEOUT).await {
        return Err(JobError::StreamUnavailable);
    }
    // The place is held until the rows are delivered (this function returns); the connection only while they are
    // read (the reader task).
    let (admission, client) = admit(capacity, spec, sink).await?;
    let (writer, mut rows) = capacity.spool::<JobError>();
    let (started_tx, started_rx) = oneshot::channel();
    tokio::spawn(read(
        client,
        admission.share(),
        spec.clone(),
        started_tx,
        writer,
    ));
    let started = started_rx
        .await
        .unwrap_or_else(|_| Err(JobError::Database("the snapshot reader ended early".into())))?;
    // Requested now, after S was taken: its barrier commits after S. No connection is held meanwhile; the rows
    // keep arriving in the spool.
    let barrier_lsn = barriers.after_now().await?;
    // At once, while the stream has barely moved past the barrier (see `Hub::published_among`).
    let earlier = hub
        .published_among(spec.owner, &started.snapshot, barrier_lsn)
        .map_err(|CannotResume(reason)| reason);
    let prepared = Prepared {
        filter: started.filter,
        purpose: spec.purpose,
        handoff: Some(Handoff {
            snapshot: started.snapshot,
            wal_lsn: started.wal_lsn,
            barrier_lsn,
        }),
        columns: started.columns,
        generation: hub.position().generation,
        earlier,
    };
    sink.prepared(&prepared).await.map_err(gone)?;
    // At the client's pace. Dropping `rows` early (an error, the client gone) stops the reader.
    while let Some(row) = rows.next().await? {
        sink.row(&prepared.columns, &row).await.map_err(gone)?;
    }
    drop(admission);
    Ok(prepared)
}

/// What the reader established before its first row.
struct Started {
    snapshot: PgSnapshot,
    wal_lsn: u64,
    filter: Filter,
    columns: Arc<[SnapshotColumn]>,
}

/// The reader task: reads the rows into the spool and gives the connection back as soon as they are read.
async fn read(
    mut client: Object,
    place: Arc<UserPermit>,
    spec: JobSpec,
    started: oneshot::Sender<Result<Started, JobError>>,
    mut writer: SpoolWriter<JobError>,
) {
    let mut started = Some(started);
    let result = read_rows(&mut client, &spec, &mut started, &mut writer).await;
    if result.is_err() {
        // Perhaps ended mid-query (the client went away): Postgres is still sending the rest of the rows, which the
        // connection discards. It goes back to the pool, and the user's place with it, only once they are all
        // through; before, the next job handed this connection waited behind them, and a user could abandon
        // snapshot after snapshot of a large table with every one of them holding a connection and no place.
        crate::db::settle(&client).await;
    }
    // Committed (or rolled back): the connection goes back to the snapshot pool before the client has the rows.
    drop(client);
    drop(place);
    match (result, started) {
        (Err(e), Some(started)) => {
            let _ = started.send(Err(e));
        }
        (result, _) => writer.finish(result).await,
    }
}

async fn read_rows(
    client: &mut Object,
    spec: &JobSpec,
    started: &mut Option<oneshot::Sender<Result<Started, JobError>>>,
    writer: &mut SpoolWriter<JobError>,
) -> Result<(), JobError> {
    // First statement: fixes the transaction's snapshot, and reads S and L in the same instant (before the role
    // switch to the user, in the same statement: db::Scope::first_reading).
    let scope = Scope::user(spec.owner)
        .isolation(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only()
        .first_reading(&[
            "pg_current_snapshot()::text",
            "pg_current_wal_insert_lsn()::text",
        ]);
    let session = begin_scoped(client, &scope, &[]).await.map_err(db_err)?;
    let (tx, head) = (session.tx, session.head);
    let snapshot = PgSnapshot::parse(head.get::<_, &str>(0))
        .ok_or_else(|| JobError::Database("unparseable pg_current_snapshot()".into()))?;
    let wal_lsn = head
        .get::<_, &str>(1)
        .parse::<deeprecall_replication::Lsn>()
        .map_err(|_| JobError::Database("unparseable WAL position".into()))?
        .0;
    let filter = canonicalise(&tx, &spec.filter).await?;
    let columns = match &spec.columns {
        Some(columns) => columns.clone(),
        None => current_columns(&tx, &spec.table).await?,
    };
    let (sql, filter_params) = select_sql(&spec.table, &columns, &filter);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&spec.owner];
    for p in &filter_params {
        params.push(match p {
            SqlParam::Text(t) => t,
            SqlParam::List(l) => l,
        });
    }
    let stream = tx
        .query_raw(&sql, params.iter().copied())
        .await
        .map_err(|e| schema_or_db(e, spec))?;
    let width = columns.len();
    // The query is accepted (a dropped column would have failed it): the job can ask for its barrier.
    let started_ok = Started {
        snapshot,
        wal_lsn,
        filter,
        columns,
    };
    if let Some(tx) = started.take()
        && tx.send(Ok(started_ok)).is_err()
    {
        return Err(gone(SinkGone));
    }
    futures::pin_mut!(stream);
    let mut checked = false;
    loop {
        // Rows the forwarder cannot see yet are handed over as soon as it waits for them, even while Postgres is
        // slow to produce the next row (a selective filter on a large table).
        let next = if writer.has_unpublished() {
            tokio::select! {
                biased;
                row = stream.next() => row,
                () = writer.reader_hungry() => {
                    writer.publish().await?;
                    continue;
                }
            }
        } else {
            stream.next().await
        };
        let Some(row) = next else { break };
        let row = row.map_err(db_err)?;
        if !checked {
            // Every column is selected as text (output_text_sql), so `get` below cannot panic.
            let text = row.columns().len() == width
                && row.columns().iter().all(|c| *c.type_() == Type::TEXT);
            if !text {
                return Err(JobError::Database("snapshot columns are not text".into()));
            }
            checked = true;
        }
        writer
            .push((0..width).map(|i| row.get::<_, Option<&str>>(i)))
            .await?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(())
}

/// An explicit column list that no longer exists (dropped or renamed since the shape was defined) is a schema
/// change for the caller, not a database failure.
fn schema_or_db(e: tokio_postgres::Error, spec: &JobSpec) -> JobError {
    let undefined = e
        .as_db_error()
        .is_some_and(|db| *db.code() == tokio_postgres::error::SqlState::UNDEFINED_COLUMN);
    if undefined && spec.columns.is_some() {
        JobError::SchemaChanged
    } else {
        db_err(e)
    }
}

/// The table's columns as of now (a column added since the catalog was loaded is included); generated columns are
/// not in the stream, so not here either.
async fn current_columns(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &Table,
) -> Result<Arc<[SnapshotColumn]>, JobError> {
    Ok(tx
        .query(
            "select attname::text, atttypid from pg_attribute
              where attrelid = $1 and attnum > 0 and not attisdropped and attgenerated = ''
              order by attnum",
            &[&(table.oid as Oid)],
        )
        .await
        .map_err(db_err)?
        .iter()
        .map(|r| SnapshotColumn {
            name: r.get(0),
            type_oid: r.get(1),
        })
        .collect())
}

/// The row query: the columns' text output, the user's rows (`$1`; row-level security applies as well), the
/// filter with its values as bind parameters (`$2`…, returned).
fn select_sql(
    table: &Table,
    columns: &[SnapshotColumn],
    filter: &Filter,
) -> (String, Vec<SqlParam>) {
    let select_list: Vec<String> = columns
        .iter()
        .map(|c| output_text_sql(&quote_ident(&c.name), c.type_oid))
        .collect();
    let (condition, params) = filter.to_sql(2);
    let sql = format!(
        "select {} from {} where owner_id = $1 and {condition}",
        select_list.join(", "),
        table.qualified()
    );
    (sql, params)
}
