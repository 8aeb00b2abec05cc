//! The executor: runs a [`Plan`] in one transaction as the user. It only talks to Postgres; what to run comes
//! from the planner.
//!
//! Fast path, the common case (nothing of the batch was seen before), **one round trip** (`db::run_scoped`):
//!
//! ```text
//! BEGIN; set role + app.user_id + txid;
//!   claim: deeprecall_claim_seq(client, first, last)   -- lock the client's row, check last_seq = first - 1,
//!                                                          advance it (client_id batches)
//!       or insert into sync_applied_ops (op_ids)       -- plain insert: a known op_id is a unique violation
//!   one statement per run of same-shape ops
//! COMMIT                                                -- a rollback if anything failed
//! ```
//!
//! If the claim fails (a retry, an overlap, a gap, a concurrent copy of the batch), the careful path runs instead:
//!
//! ```text
//! BEGIN
//!   set role + app.user_id + txid (db::begin_scoped)  ┐ one round trip
//!   lock the client's row and read last_seq (client_id)│
//!     or insert the op_ids, on conflict do nothing     ┘ → which ops are new
//!   [409 seq_gap if the batch starts after last_seq + 1]
//!   one statement per run of new same-shape ops         ┐ one round trip
//!   advance the client's last_seq (client_id)           ┘
//! COMMIT
//! ```
//!
//! If a data statement fails we cannot tell which row of its run was to blame: the batch runs again op by op
//! (careful path, still pipelined, the same prepared statements with one-element arrays) purely to report the first
//! failing op's index; should that run succeed (a conflicting row vanished in between), it is the batch's result.

use std::collections::HashSet;

use axum::http::StatusCode;
use futures::future::join_all;
use serde::Serialize;
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::plan::{self, Plan, PlannedOp, Statement};
use super::request::OpKind;
use crate::db::{Scope, begin_scoped, run_scoped};
use crate::error::{ApiError, from_batch_db as from_db};

/// Status of one op in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// The op changed the database (or, for an upsert, left it as asked).
    Applied,
    /// Applied by an earlier request (its op_id is in the ledger, or its seq is at most the client's last seq);
    /// nothing was done now.
    Duplicate,
    /// Update/delete matched no row the user can see.
    NotFound,
}

/// One entry of the response's `results`.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    /// The op's id, as sent.
    pub op_id: Uuid,
    /// The op's seq, as sent (`client_id` batches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seq: Option<i64>,
    /// What happened.
    pub status: OpStatus,
}

/// Response body of a successful batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchResponse {
    /// `pg_current_xact_id()` of the transaction, decimal; the live stream's `txn.xid` for the same commit.
    pub txid: String,
    /// `client_id` batches: the client's last applied seq after this batch (send `last_seq + 1` next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_seq: Option<i64>,
    /// One result per op, in request order.
    pub results: Vec<OpResult>,
}

/// Which ops were applied before.
enum Seen {
    /// Ledger batches: the op_ids that are new.
    New(HashSet<Uuid>),
    /// Sequence batches: the client's last applied seq; ops after it are new.
    LastSeq(i64),
}

impl Seen {
    fn is_new(&self, op: &PlannedOp) -> bool {
        match self {
            Self::New(ids) => ids.contains(&op.op_id),
            Self::LastSeq(last) => op.seq.is_some_and(|s| s > *last),
        }
    }
}

/// An open transaction, its txid and what was seen before.
struct Begun<'c> {
    tx: deadpool_postgres::Transaction<'c>,
    txid: String,
    seen: Seen,
}

const LEDGER_SQL: &str = "insert into sync_applied_ops (op_id) select unnest($1::uuid[]) on conflict do nothing returning op_id";
/// Row-level security narrows it to the caller's own client; `for update` serialises concurrent batches of one
/// client (a retry racing the original waits here, then sees the original's last_seq).
const LOCK_CLIENT_SQL: &str = "select last_seq from sync_clients where client_id = $1 for update";
const CREATE_CLIENT_SQL: &str = "insert into sync_clients (client_id, last_seq) values ($1, 0) \
     on conflict (owner_id, client_id) do nothing";
const ADVANCE_CLIENT_SQL: &str =
    "update sync_clients set last_seq = $2, updated_at = now() where client_id = $1";

const CLAIM_SQL: &str = "select deeprecall_claim_seq($1, $2, $3)";
/// The fast path's ledger insert: no `on conflict`, so an op_id applied before aborts the fast path.
const LEDGER_FAST_SQL: &str = "insert into sync_applied_ops (op_id) select unnest($1::uuid[])";
/// SQLSTATE raised by `deeprecall_claim_seq` when the batch does not continue the client's sequence.
const SEQ_MISMATCH: &str = "DRSEQ";

/// How the fast path ended.
enum Fast {
    /// Committed.
    Done(BatchResponse),
    /// Part of the batch was seen before (or a gap): take the careful path.
    Seen,
    /// A data statement failed: find the failing op.
    Failed,
}

/// The fast path: the whole batch, assumed new, in one round trip.
async fn fast(
    client: &mut deadpool_postgres::Object,
    scope: Scope<'_>,
    plan: &Plan,
) -> Result<Fast, ApiError> {
    let db = |e: tokio_postgres::Error| from_db(&e);
    let (Some(first), Some(last)) = (
        plan.ops.first().map(|o| o.seq),
        plan.ops.last().map(|o| o.seq),
    ) else {
        return Ok(Fast::Seen);
    };
    let statements = plan::statements(&plan.ops, |_| true);
    let (claim, prepared) = futures::join!(
        client.prepare_cached(match plan.client_id {
            Some(_) => CLAIM_SQL,
            None => LEDGER_FAST_SQL,
        }),
        join_all(statements.iter().map(|s| client.prepare_cached(&s.sql)))
    );
    let claim = claim.map_err(db)?;
    let prepared = match prepared.into_iter().collect::<Result<Vec<_>, _>>() {
        Ok(prepared) => prepared,
        // Postgres refused to prepare a data statement (a value for an identity column it assigns, a column it does
        // not have): the op-by-op path names the op.
        Err(e) if e.as_db_error().is_some() && !waited_out(&e) => return Ok(Fast::Failed),
        Err(e) => return Err(db(e)),
    };
    // Ledger batches only (a sequence batch claims its seqs instead).
    let op_ids: Vec<Uuid> = match plan.client_id {
        Some(_) => Vec::new(),
        None => sorted_op_ids(plan),
    };
    let (first, last) = (first.unwrap_or(0), last.unwrap_or(0));
    let claim_params: Vec<&(dyn ToSql + Sync)> = match plan.client_id {
        Some(ref client_id) => vec![client_id, &first, &last],
        None => vec![&op_ids],
    };
    let binds: Vec<Vec<&(dyn ToSql + Sync)>> = statements.iter().map(Statement::bind).collect();
    let mut pipelined: Vec<crate::db::Pipelined<'_>> = vec![(&claim, &claim_params)];
    pipelined.extend(prepared.iter().zip(&binds).map(|(p, b)| (p, b.as_slice())));
    let trip = run_scoped(client, &scope.with_txid(), &pipelined)
        .await
        .map_err(db)?;
    if let Err(e) = &trip.head {
        return Err(from_db(e));
    }
    let mut results = trip.results.into_iter();
    match results.next() {
        Some(Ok(_)) => {}
        Some(Err(e)) => {
            let seen = e.code().is_some_and(|c| {
                c.code() == SEQ_MISMATCH || *c == tokio_postgres::error::SqlState::UNIQUE_VIOLATION
            });
            return if seen {
                Ok(Fast::Seen)
            } else {
                Err(from_db(&e))
            };
        }
        None => {
            return Err(ApiError::internal(&std::io::Error::other(
                "claim result missing",
            )));
        }
    }
    let mut statuses = vec![OpStatus::Applied; plan.ops.len()];
    for (statement, outcome) in statements.iter().zip(results) {
        match outcome {
            Ok(rows) => record(&mut statuses, plan, statement, &rows),
            Err(e) if waited_out(&e) => return Err(from_db(&e)),
            Err(e) if e.as_db_error().is_some() => return Ok(Fast::Failed),
            Err(e) => return Err(from_db(&e)),
        }
    }
    if !trip.committed {
        return Ok(Fast::Failed);
    }
    let seen = match plan.client_id {
        Some(_) => Seen::LastSeq(first - 1),
        None => Seen::New(HashSet::new()),
    };
    Ok(Fast::Done(response(
        trip.txid.unwrap_or_default(),
        plan,
        &seen,
        statuses,
    )))
}

/// The statement waited `--lock-timeout-ms` for a lock (55P03). Not the op's fault: the batch is answered `503 locked`
/// at once, without finding the failing op one by one, which would only wait for the same lock again.
fn waited_out(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// Runs `plan` on `client`, in transactions of `scope` (the user's: [`crate::db::user_pool::UserConnection::scope`]).
pub(crate) async fn run(
    client: &mut deadpool_postgres::Object,
    scope: Scope<'_>,
    plan: &Plan,
) -> Result<BatchResponse, ApiError> {
    let careful = match fast(client, scope, plan).await? {
        Fast::Done(response) => return Ok(response),
        Fast::Seen => true,
        Fast::Failed => false,
    };
    if careful {
        let begun = begin(client, scope, plan).await?;
        match run_sets(&begun, plan).await {
            Ok(statuses) => {
                let Begun { tx, txid, seen } = begun;
                tx.commit().await.map_err(|e| from_db(&e))?;
                return Ok(response(txid, plan, &seen, statuses));
            }
            Err(e) if e.as_db_error().is_none() || waited_out(&e) => return Err(from_db(&e)),
            Err(_) => {
                let _ = begun.tx.rollback().await;
            }
        }
    }
    let begun = begin(client, scope, plan).await?;
    let statuses = run_each(&begun, plan).await?;
    let Begun { tx, txid, seen } = begun;
    tx.commit().await.map_err(|e| from_db(&e))?;
    Ok(response(txid, plan, &seen, statuses))
}

/// Opens the user's transaction and finds out which ops are new, both in one round trip.
async fn begin<'c>(
    client: &'c mut deadpool_postgres::Object,
    scope: Scope<'_>,
    plan: &Plan,
) -> Result<Begun<'c>, ApiError> {
    let scope = scope.with_txid();
    let db = |e: tokio_postgres::Error| from_db(&e);
    match plan.client_id {
        None => {
            let ledger = client.prepare_cached(LEDGER_SQL).await.map_err(db)?;
            // Sorted so every request takes the ledger's index locks in the same order: two requests carrying the
            // same op_ids in different orders (a re-batched retry racing the original) would otherwise deadlock.
            // A concurrent request with the same op_id blocks on the unique index until the first commits, then
            // sees the conflict.
            let op_ids = sorted_op_ids(plan);
            let params: [&(dyn ToSql + Sync); 1] = [&op_ids];
            let session = begin_scoped(client, &scope, &[(&ledger, &params)])
                .await
                .map_err(db)?;
            let new = session
                .pipelined
                .first()
                .into_iter()
                .flatten()
                .map(|r| r.get(0))
                .collect();
            Ok(Begun {
                tx: session.tx,
                txid: session.txid.unwrap_or_default(),
                seen: Seen::New(new),
            })
        }
        Some(client_id) => {
            let lock = client.prepare_cached(LOCK_CLIENT_SQL).await.map_err(db)?;
            let params: [&(dyn ToSql + Sync); 1] = [&client_id];
            let session = begin_scoped(client, &scope, &[(&lock, &params)])
                .await
                .map_err(db)?;
            let locked: Option<i64> = session
                .pipelined
                .first()
                .and_then(|rows| rows.first())
                .map(|r| r.get(0));
            let last = match locked {
                Some(last) => last,
                None => {
                    // The client's first batch. A concurrent first batch may insert the row too: `do nothing`
                    // waits for it, and the second select (a new snapshot) sees and locks whichever row won.
                    let create = session
                        .tx
                        .prepare_cached(CREATE_CLIENT_SQL)
                        .await
                        .map_err(db)?;
                    session.tx.execute(&create, &params).await.map_err(db)?;
                    session
                        .tx
                        .query_one(&lock, &params)
                        .await
                        .map_err(db)?
                        .get(0)
                }
            };
            if let Some(first) = plan.ops.first().and_then(|o| o.seq)
                && first > last.saturating_add(1)
            {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "seq_gap",
                    format!(
                        "this client's last applied seq is {last}, but the batch starts at {first}: resend \
                         from seq {}",
                        last + 1
                    ),
                )
                .with("last_seq", last));
            }
            Ok(Begun {
                tx: session.tx,
                txid: session.txid.unwrap_or_default(),
                seen: Seen::LastSeq(last),
            })
        }
    }
}

/// The batch's op_ids in ascending order, as the ledger statements take them: every request then takes the ledger's
/// index locks in the same order (see `begin`).
fn sorted_op_ids(plan: &Plan) -> Vec<Uuid> {
    let mut ids: Vec<Uuid> = plan.ops.iter().map(|p| p.op_id).collect();
    ids.sort_unstable();
    ids
}

/// The client's new last seq, when this batch moves it forward.
fn advance(plan: &Plan, seen: &Seen) -> Option<(Uuid, i64)> {
    let (Some(client_id), Seen::LastSeq(last)) = (plan.client_id, seen) else {
        return None;
    };
    let top = plan.ops.last().and_then(|o| o.seq)?;
    (top > *last).then_some((client_id, top))
}

/// Sends `statements` (and the client's advance) back to back and awaits them all: one round trip plus Postgres's
/// work. Postgres runs them in order. After a failure it aborts the transaction, so later statements fail with
/// 25P02; the first failure in request order is the culprit.
async fn send_all(
    begun: &Begun<'_>,
    plan: &Plan,
    statements: &[Statement<'_>],
) -> Result<Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>, tokio_postgres::Error> {
    let tx = &begun.tx;
    let advance = advance(plan, &begun.seen);
    // Prepared (or found in the connection's cache) before anything runs, so that the data statements and the
    // advance go out back to back.
    let (prepared, advance_stmt) = futures::join!(
        join_all(statements.iter().map(|s| tx.prepare_cached(&s.sql))),
        async {
            match advance {
                Some(_) => tx.prepare_cached(ADVANCE_CLIENT_SQL).await.map(Some),
                None => Ok(None),
            }
        }
    );
    let prepared = prepared.into_iter().collect::<Result<Vec<_>, _>>()?;
    let advance_stmt = advance_stmt?;
    let (outcomes, advanced) = futures::join!(
        join_all(
            statements
                .iter()
                .zip(&prepared)
                .map(|(s, stmt)| async move {
                    let params = s.bind();
                    tx.query(stmt, &params).await
                })
        ),
        async {
            match (&advance, &advance_stmt) {
                (Some((client_id, top)), Some(stmt)) => {
                    tx.execute(stmt, &[client_id, top]).await.map(|_| ())
                }
                _ => Ok(()),
            }
        }
    );
    // A failing data statement explains the advance's 25P02; report the advance only when it failed alone.
    if outcomes.iter().all(Result::is_ok) {
        advanced?;
    }
    Ok(outcomes)
}

/// Statuses of the ops `statement` ran, from its returned rows.
fn record(
    statuses: &mut [OpStatus],
    plan: &Plan,
    statement: &Statement<'_>,
    rows: &[tokio_postgres::Row],
) {
    let touched: HashSet<Uuid> = match statement.kind {
        OpKind::Update | OpKind::Delete => rows.iter().map(|r| r.get(0)).collect(),
        OpKind::Insert | OpKind::Upsert => HashSet::new(),
    };
    for &index in &statement.ops {
        let op = &plan.ops[index];
        statuses[index] = match statement.kind {
            OpKind::Update | OpKind::Delete if !op.id.is_some_and(|id| touched.contains(&id)) => {
                OpStatus::NotFound
            }
            _ => OpStatus::Applied,
        };
    }
}

/// Runs every run of new ops as one statement, all pipelined.
async fn run_sets(begun: &Begun<'_>, plan: &Plan) -> Result<Vec<OpStatus>, tokio_postgres::Error> {
    let statements = plan::statements(&plan.ops, |i| begun.seen.is_new(&plan.ops[i]));
    let outcomes = send_all(begun, plan, &statements).await?;
    let mut statuses = vec![OpStatus::Duplicate; plan.ops.len()];
    for (statement, outcome) in statements.iter().zip(outcomes) {
        record(&mut statuses, plan, statement, &outcome?);
    }
    Ok(statuses)
}

/// Runs every new op as its own statement, pipelined, and reports the first failing op by index.
async fn run_each(begun: &Begun<'_>, plan: &Plan) -> Result<Vec<OpStatus>, ApiError> {
    let statements: Vec<Statement<'_>> = (0..plan.ops.len())
        .filter(|&i| begun.seen.is_new(&plan.ops[i]))
        .map(|i| plan::single(&plan.ops, i))
        .collect();
    // A statement Postgres refuses to prepare is its op's error (428C9, 42703 are raised while preparing).
    for statement in &statements {
        if let Err(e) = begun.tx.prepare_cached(&statement.sql).await {
            return Err(from_db(&e).at_op(statement.ops[0]));
        }
    }
    let outcomes = send_all(begun, plan, &statements)
        .await
        .map_err(|e| from_db(&e))?;
    let mut statuses = vec![OpStatus::Duplicate; plan.ops.len()];
    for (statement, outcome) in statements.iter().zip(outcomes) {
        let rows = outcome.map_err(|e| from_db(&e).at_op(statement.ops[0]))?;
        record(&mut statuses, plan, statement, &rows);
    }
    Ok(statuses)
}

fn response(txid: String, plan: &Plan, seen: &Seen, statuses: Vec<OpStatus>) -> BatchResponse {
    let last_seq = match seen {
        Seen::LastSeq(last) => Some(advance(plan, seen).map_or(*last, |(_, top)| top)),
        Seen::New(_) => None,
    };
    let results = plan
        .ops
        .iter()
        .zip(statuses)
        .map(|(op, status)| OpResult {
            op_id: op.op_id,
            seq: op.seq,
            status,
        })
        .collect();
    BatchResponse {
        txid,
        last_seq,
        results,
    }
}
