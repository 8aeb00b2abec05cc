//! The snapshot job: reads one subscription's rows as of one consistent database snapshot and establishes its
//! handoff to the live stream. It knows nothing about transports: rows go to a [`SnapshotSink`] (WebSocket
//! frames, or an Electric HTTP response body), its report goes back through the sink too.
//!
//! ```text
//!   pooled connection: BEGIN REPEATABLE READ READ ONLY
//!     1. pg_current_snapshot() = S, pg_current_wal_insert_lsn() = L, role + app.user_id (RLS applies)
//!     2. canonicalise the filter's values; read the column list
//!   barrier task: a barrier committed after S ──► stream position B       (barrier.rs)
//!     3. sink.prepared(S, L, B, columns, filter)
//!     4. rows ──► sink.row() …  (while Postgres still reads them; the sink's bound makes a slow client wait)
//!   COMMIT; sink.finish(report)
//! ```
//!
//! The connection's buffered transactions plus S, L and B decide which transactions the rows miss
//! (handoff.rs). A resume job only canonicalises the filter and waits until the stream can serve the offset.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio_postgres::types::{Oid, ToSql};

use super::barrier::{BARRIER_TIMEOUT, Barriers};
use super::convert::output_text_sql;
use super::filter::{Filter, SqlParam};
use super::handoff::{Handoff, PgSnapshot};
use super::hub::Hub;
use super::job::{JobError, JobReport, JobSpec, Prepared, Purpose, SnapshotColumn};
use crate::db::catalog::{Table, quote_ident};
use crate::db::{USER_ROLE, begin_as};

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

    /// One row: `row.get::<Option<&str>>(i)` is the text output of `columns[i]`.
    fn row(
        &mut self,
        columns: &[SnapshotColumn],
        row: &tokio_postgres::Row,
    ) -> impl Future<Output = Result<(), SinkGone>> + Send;

    /// The job ended (after its last row, or with an error).
    fn finish(self, report: JobReport) -> impl Future<Output = ()> + Send;
}

/// Runs a job and hands its report to the sink.
pub async fn run<S: SnapshotSink>(
    pool: Pool,
    hub: Arc<Hub>,
    barriers: Barriers,
    spec: JobSpec,
    mut sink: S,
) {
    let result = match spec.purpose {
        Purpose::Snapshot => snapshot(&pool, &hub, &barriers, &spec, &mut sink).await,
        Purpose::Resume(from) => {
            let result = canonical_only(&pool, &spec).await;
            // Right after a server restart clients reconnect before the replicator has started (generation 0,
            // position 0), and its position may still trail an offset the previous process issued: resuming
            // then would refuse a servable offset. Wait, bounded, here rather than in the connection's loop.
            hub.ready_for(from, RESUME_WAIT).await;
            result
        }
    };
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

async fn canonical_only(pool: &Pool, spec: &JobSpec) -> Result<Prepared, JobError> {
    let mut client = pool
        .get()
        .await
        .map_err(|e| JobError::Database(e.to_string()))?;
    let (tx, _) = begin_as(&mut client, USER_ROLE, spec.owner, true)
        .await
        .map_err(db_err)?;
    let filter = canonicalise(&tx, &spec.filter).await?;
    Ok(Prepared {
        filter,
        purpose: spec.purpose,
        handoff: None,
        columns: Arc::from(Vec::new()),
        generation: 0,
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
    pool: &Pool,
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
    let mut client = pool
        .get()
        .await
        .map_err(|e| JobError::Database(e.to_string()))?;
    let tx = client
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .await
        .map_err(db_err)?;
    // First statement: fixes the transaction's snapshot, and reads S and L in the same instant.
    let user = spec.owner.to_string();
    let head = tx
        .query_one(
            "select pg_current_snapshot()::text, pg_current_wal_insert_lsn()::text,
                    set_config('role', $1, true), set_config('app.user_id', $2, true)",
            &[&USER_ROLE, &user],
        )
        .await
        .map_err(db_err)?;
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
    // Requested now, after S was taken: its barrier commits after S.
    let barrier_lsn = barriers.after_now().await?;
    let prepared = Prepared {
        filter,
        purpose: spec.purpose,
        handoff: Some(Handoff {
            snapshot,
            wal_lsn,
            barrier_lsn,
        }),
        columns,
        generation: hub.position().generation,
    };
    sink.prepared(&prepared).await.map_err(gone)?;

    let (sql, filter_params) = select_sql(&spec.table, &prepared.columns, &prepared.filter);
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&spec.owner];
    for p in &filter_params {
        params.push(match p {
            SqlParam::Text(t) => t,
            SqlParam::List(l) => l,
        });
    }
    // Rows are handed to the sink while Postgres still produces them; the sink waits when its client is slow.
    let stream = tx
        .query_raw(&sql, params.iter().copied())
        .await
        .map_err(|e| schema_or_db(e, spec))?;
    futures::pin_mut!(stream);
    while let Some(row) = stream.next().await {
        let row = row.map_err(db_err)?;
        sink.row(&prepared.columns, &row).await.map_err(gone)?;
    }
    tx.commit().await.map_err(db_err)?;
    Ok(prepared)
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
