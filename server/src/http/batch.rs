//! `POST /v1/batch`: the one write path.
//!
//! ```text
//! body ──parse/validate (no DB)──► planned ops ──► BEGIN
//!   set_config('role', deeprecall_user, true), set_config('app.user_id', sub, true), pg_current_xact_id()
//!   insert into sync_applied_ops (op_ids) on conflict do nothing returning op_id   -- which ops are new
//!   one prepared statement per new op, pipelined on the connection                  -- RLS binds every row
//! COMMIT (or ROLLBACK on the first failing op, reported with its index)
//! ```
//!
//! Values never become SQL text: a row travels as one `jsonb` parameter and `jsonb_populate_record(null::table,
//! $1)` converts each field to its column's type inside Postgres (a bad value fails there with SQLSTATE class 22,
//! answered 422). Identifiers come from the catalog and are quoted. `owner_id` is never taken from the client: it
//! defaults to `app.user_id`, and the policy's `with check` refuses anything else.

use std::collections::HashSet;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::StatusCode;
use futures::future::join_all;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio_postgres::types::{Json as PgJson, ToSql};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::db::catalog::{Catalog, SERVER_COLUMNS, Table, quote_ident};
use crate::db::{BEGIN_AS_USER_SQL, USER_ROLE};
use crate::error::{ApiError, from_db};
use crate::state::AppState;

/// What a batch op does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    /// Insert a new row; an existing id is a 409 conflict.
    Insert,
    /// Insert, or update the given columns when the row exists.
    Upsert,
    /// Update the given columns of an existing row; `not_found` when there is none.
    Update,
    /// Delete a row; `not_found` when there is none.
    Delete,
}

impl OpKind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "insert" => Self::Insert,
            "upsert" => Self::Upsert,
            "update" => Self::Update,
            "delete" => Self::Delete,
            _ => return None,
        })
    }
}

/// How concurrent writes to the same row are resolved. Today: the last write to commit wins, column by column
/// (an update only touches the columns it names), and `updated_at` is the server's clock. This is the hook for
/// the per-table policies the owner wants later (e.g. reject a stale update by comparing a client's
/// `base_updated_at`, or merge sets): `update_sql` is the one place an update's predicate is built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictPolicy {
    /// Last writer wins per column.
    #[default]
    LastWriterWins,
}

/// Status of one op in the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OpStatus {
    /// The op changed the database (or, for an upsert, left it as asked).
    Applied,
    /// This op_id was applied before for this user; nothing was done now.
    Duplicate,
    /// Update/delete matched no row the user can see.
    NotFound,
}

/// One entry of the response's `results`.
#[derive(Debug, Clone, Serialize)]
pub struct OpResult {
    /// The op's id, as sent.
    pub op_id: Uuid,
    /// What happened.
    pub status: OpStatus,
}

/// Response body of a successful batch.
#[derive(Debug, Clone, Serialize)]
pub struct BatchResponse {
    /// `pg_current_xact_id()` of the transaction, decimal; the live stream's `txn.xid` for the same commit.
    pub txid: String,
    /// One result per op, in request order.
    pub results: Vec<OpResult>,
}

/// A validated op, ready to run.
#[derive(Debug)]
struct PlannedOp {
    op_id: Uuid,
    table: Arc<Table>,
    kind: OpKind,
    /// Writable columns present in the row, in table order.
    columns: Vec<String>,
    /// The row without server-assigned columns.
    row: Value,
    id: Option<Uuid>,
}

/// Handler for `POST /v1/batch`.
pub async fn post_batch(
    State(state): State<AppState>,
    user: AuthUser,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BatchResponse>, ApiError> {
    let body = body.map_err(body_error)?;
    let request: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::bad_request(
            "invalid_json",
            format!("request body is not valid JSON: {e}"),
        )
    })?;
    let ops = request_ops(&request, state.limits.max_ops_per_batch)?;

    let mut client = state.pool.get().await?;
    let mut catalog = state.catalog.get().await;
    let planned = match plan(&catalog, ops) {
        Err(e) if e.code == "unknown_table" || e.code == "unknown_column" => {
            // Maybe a migration added it since we loaded the catalog.
            catalog = state
                .catalog
                .refresh_on_miss(&client)
                .await
                .map_err(|e| from_db(&e))?;
            plan(&catalog, ops)?
        }
        other => other?,
    };

    // Fast path: consecutive ops of the same shape run as one set-based statement each. If any statement fails,
    // we cannot tell which op of its set was to blame, so the batch is rolled back and run again op by op (still
    // pipelined) purely to report the failing op's index; should that run succeed (a conflicting row vanished in
    // between), it is the batch's result.
    let (tx, txid, fresh) = begin_and_record(&mut client, user.user_id, &planned).await?;
    match execute_sets(&tx, &planned, &fresh).await {
        Ok(statuses) => {
            tx.commit().await.map_err(|e| from_db(&e))?;
            return Ok(Json(response(txid, &planned, statuses)));
        }
        Err(e) if e.as_db_error().is_none() => return Err(from_db(&e)),
        Err(_) => {
            let _ = tx.rollback().await;
        }
    }
    let (tx, txid, fresh) = begin_and_record(&mut client, user.user_id, &planned).await?;
    let statuses = execute_each(&tx, &planned, &fresh).await?;
    tx.commit().await.map_err(|e| from_db(&e))?;
    Ok(Json(response(txid, &planned, statuses)))
}

fn response(txid: String, planned: &[PlannedOp], statuses: Vec<OpStatus>) -> BatchResponse {
    let results = planned
        .iter()
        .zip(statuses)
        .map(|(op, status)| OpResult {
            op_id: op.op_id,
            status,
        })
        .collect();
    BatchResponse { txid, results }
}

/// Opens the user-scoped transaction and records the batch's op_ids in the idempotency ledger, both statements
/// pipelined (one round trip). Returns the transaction, its txid and the op_ids that are new (the others were
/// applied before and are answered `duplicate`).
async fn begin_and_record<'a>(
    client: &'a mut deadpool_postgres::Object,
    user: Uuid,
    planned: &[PlannedOp],
) -> Result<(deadpool_postgres::Transaction<'a>, String, HashSet<Uuid>), ApiError> {
    let tx = client
        .build_transaction()
        .start()
        .await
        .map_err(|e| from_db(&e))?;
    let begin = tx
        .prepare_cached(BEGIN_AS_USER_SQL)
        .await
        .map_err(|e| from_db(&e))?;
    // A conflict on (owner_id, op_id) means this op was applied before. A concurrent request with the same op_id
    // blocks here on the unique index until the first commits, then sees the conflict. Sorted so every request
    // takes the ledger's index locks in the same order: two requests carrying the same op_ids in different orders
    // (a re-batched retry racing the original) would otherwise deadlock (40P01).
    let ledger = tx
        .prepare_cached(
            "insert into sync_applied_ops (op_id) select unnest($1::uuid[]) on conflict do nothing returning op_id",
        )
        .await
        .map_err(|e| from_db(&e))?;
    let mut op_ids: Vec<Uuid> = planned.iter().map(|p| p.op_id).collect();
    op_ids.sort_unstable();
    let user = user.to_string();
    // Sent back to back on one connection, so Postgres runs them in this order: the ledger rows get their
    // owner_id default from the app.user_id the first statement sets.
    let head_params: [&(dyn ToSql + Sync); 2] = [&USER_ROLE, &user];
    let ledger_params: [&(dyn ToSql + Sync); 1] = [&op_ids];
    let (head, recorded) = futures::join!(
        tx.query_one(&begin, &head_params),
        tx.query(&ledger, &ledger_params)
    );
    let txid: String = head.map_err(|e| from_db(&e))?.get(2);
    let fresh = recorded
        .map_err(|e| from_db(&e))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((tx, txid, fresh))
}

/// Consecutive new ops that can run as one statement: same table, kind and columns, and (except for inserts,
/// where a repeated id is the client's error anyway) no id twice, since one statement cannot update or delete a
/// row twice.
struct OpSet<'a> {
    ops: Vec<(usize, &'a PlannedOp)>,
    ids: HashSet<Uuid>,
}

impl OpSet<'_> {
    fn first(&self) -> &PlannedOp {
        self.ops[0].1
    }
}

fn op_sets<'a>(planned: &'a [PlannedOp], fresh: &HashSet<Uuid>) -> Vec<OpSet<'a>> {
    let mut sets: Vec<OpSet<'a>> = Vec::new();
    for (index, op) in planned.iter().enumerate() {
        if !fresh.contains(&op.op_id) {
            continue;
        }
        let joins = sets.last().is_some_and(|set| {
            let first = set.first();
            first.kind == op.kind
                && first.table.oid == op.table.oid
                && first.columns == op.columns
                && !op.columns.is_empty()
                && (op.kind == OpKind::Insert || op.id.is_none_or(|id| !set.ids.contains(&id)))
        });
        if !joins {
            sets.push(OpSet {
                ops: Vec::new(),
                ids: HashSet::new(),
            });
        }
        if let Some(set) = sets.last_mut() {
            set.ops.push((index, op));
            if let Some(id) = op.id {
                set.ids.insert(id);
            }
        }
    }
    sets
}

/// Runs every set as one statement, all pipelined.
async fn execute_sets(
    tx: &deadpool_postgres::Transaction<'_>,
    planned: &[PlannedOp],
    fresh: &HashSet<Uuid>,
) -> Result<Vec<OpStatus>, tokio_postgres::Error> {
    let sets = op_sets(planned, fresh);
    let mut statements = Vec::with_capacity(sets.len());
    for set in &sets {
        statements.push(
            tx.prepare_cached(&set_sql(set.first(), ConflictPolicy::default()))
                .await?,
        );
    }
    let outcomes = join_all(sets.iter().zip(&statements).map(|(set, stmt)| async move {
        let first = set.first();
        if first.columns.is_empty() {
            // `insert ... default values`: one row, no parameter.
            return tx.query(stmt, &[]).await;
        }
        match first.kind {
            OpKind::Delete => {
                let ids: Vec<Uuid> = set.ops.iter().filter_map(|(_, op)| op.id).collect();
                tx.query(stmt, &[&ids]).await
            }
            _ => {
                let rows: Vec<&Value> = set.ops.iter().map(|(_, op)| &op.row).collect();
                tx.query(stmt, &[&PgJson(&rows)]).await
            }
        }
    }))
    .await;
    let mut statuses = vec![OpStatus::Duplicate; planned.len()];
    for (set, outcome) in sets.iter().zip(outcomes) {
        let rows = outcome?;
        let kind = set.first().kind;
        let touched: HashSet<Uuid> = match kind {
            OpKind::Update | OpKind::Delete => rows.iter().map(|r| r.get(0)).collect(),
            _ => HashSet::new(),
        };
        for (index, op) in &set.ops {
            statuses[*index] = match kind {
                OpKind::Update | OpKind::Delete
                    if !op.id.is_some_and(|id| touched.contains(&id)) =>
                {
                    OpStatus::NotFound
                }
                _ => OpStatus::Applied,
            };
        }
    }
    Ok(statuses)
}

/// Runs every new op as its own statement, pipelined, and reports the first failing op by index.
async fn execute_each(
    tx: &deadpool_postgres::Transaction<'_>,
    planned: &[PlannedOp],
    fresh: &HashSet<Uuid>,
) -> Result<Vec<OpStatus>, ApiError> {
    let mut to_run: Vec<(usize, tokio_postgres::Statement, &PlannedOp)> = Vec::new();
    for (index, op) in planned.iter().enumerate() {
        if fresh.contains(&op.op_id) {
            let sql = op_sql(op, ConflictPolicy::default());
            let stmt = tx
                .prepare_cached(&sql)
                .await
                .map_err(|e| from_db(&e).at_op(index))?;
            to_run.push((index, stmt, op));
        }
    }
    // Pipelined: every statement is sent before the first answer is awaited, so even this path costs one round
    // trip's latency plus Postgres's work, not one round trip per op. After a failure Postgres aborts the
    // transaction and later statements fail with 25P02; the first failure in request order is the culprit.
    let outcomes = join_all(to_run.iter().map(|(_, stmt, op)| {
        let row = PgJson(&op.row);
        async move {
            let param: &(dyn ToSql + Sync) = if op.kind == OpKind::Delete {
                &op.id
            } else {
                &row
            };
            // `insert ... default values` (a row with no columns) takes no parameter.
            let params = if stmt.params().is_empty() {
                &[][..]
            } else {
                std::slice::from_ref(&param)
            };
            tx.execute(stmt, params).await
        }
    }))
    .await;
    let mut statuses = vec![OpStatus::Duplicate; planned.len()];
    for ((index, _, op), outcome) in to_run.iter().zip(outcomes) {
        let affected = outcome.map_err(|e| from_db(&e).at_op(*index))?;
        statuses[*index] = match op.kind {
            OpKind::Update | OpKind::Delete if affected == 0 => OpStatus::NotFound,
            _ => OpStatus::Applied,
        };
    }
    Ok(statuses)
}

/// Maps a body-read failure: over the size limit is 413, anything else 400.
pub fn body_error(rejection: BytesRejection) -> ApiError {
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            "request body exceeds the server's limit (--max-body-bytes); split the batch",
        )
    } else {
        ApiError::bad_request("invalid_body", rejection.body_text())
    }
}

fn request_ops(request: &Value, max_ops: usize) -> Result<&Vec<Value>, ApiError> {
    let obj = request.as_object().ok_or_else(|| {
        ApiError::bad_request(
            "invalid_request",
            "the body must be a JSON object with `ops`",
        )
    })?;
    if let Some(device) = obj.get("device_id")
        && !device.is_null()
        && device
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .is_none()
    {
        return Err(ApiError::unprocessable(
            "invalid_device_id",
            "`device_id` must be a UUID string",
        ));
    }
    let ops = obj.get("ops").and_then(Value::as_array).ok_or_else(|| {
        ApiError::bad_request("invalid_request", "`ops` must be an array of operations")
    })?;
    if ops.len() > max_ops {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_ops",
            format!(
                "a batch holds at most {max_ops} ops (this one has {}); split it",
                ops.len()
            ),
        ));
    }
    Ok(ops)
}

fn plan(catalog: &Catalog, ops: &[Value]) -> Result<Vec<PlannedOp>, ApiError> {
    let mut seen = HashSet::with_capacity(ops.len());
    let mut planned = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let p = plan_one(catalog, op).map_err(|e| e.at_op(index))?;
        if !seen.insert(p.op_id) {
            return Err(ApiError::unprocessable(
                "duplicate_op_id",
                format!("op_id {} appears twice in this batch", p.op_id),
            )
            .at_op(index));
        }
        planned.push(p);
    }
    Ok(planned)
}

fn plan_one(catalog: &Catalog, op: &Value) -> Result<PlannedOp, ApiError> {
    let op = op
        .as_object()
        .ok_or_else(|| ApiError::bad_request("invalid_op", "each op must be a JSON object"))?;
    let op_id = match op.get("op_id") {
        None | Some(Value::Null) => {
            return Err(ApiError::unprocessable(
                "missing_op_id",
                "every op needs an `op_id` (a UUID)",
            ));
        }
        Some(v) => v
            .as_str()
            .and_then(|s| Uuid::parse_str(s).ok())
            .ok_or_else(|| {
                ApiError::unprocessable("invalid_op_id", "`op_id` must be a UUID string")
            })?,
    };
    let table_name = op
        .get("table")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::unprocessable("missing_table", "every op needs a `table`"))?;
    let table = catalog.table(table_name).ok_or_else(|| {
        ApiError::unprocessable(
            "unknown_table",
            format!(
                "`{table_name}` is not a synced table (synced: {})",
                catalog.names().join(", ")
            ),
        )
    })?;
    let kind_name = op.get("kind").and_then(Value::as_str).unwrap_or("");
    let kind = OpKind::parse(kind_name).ok_or_else(|| {
        ApiError::unprocessable(
            "invalid_kind",
            format!("`kind` must be insert, upsert, update or delete (got {kind_name:?})"),
        )
    })?;
    let row = op
        .get("row")
        .and_then(Value::as_object)
        .ok_or_else(|| ApiError::unprocessable("invalid_row", "`row` must be a JSON object"))?;

    let mut clean = Map::with_capacity(row.len());
    for (name, value) in row {
        if SERVER_COLUMNS.contains(&name.as_str()) {
            continue; // owner_id, created_at, updated_at: Postgres assigns them; a client's value is ignored.
        }
        if table.column(name).is_none() {
            return Err(ApiError::unprocessable(
                "unknown_column",
                format!("table `{table_name}` has no column `{name}`"),
            ));
        }
        if !table.is_writable(name) {
            return Err(ApiError::unprocessable(
                "read_only_column",
                format!("column `{name}` cannot be written"),
            ));
        }
        if let Some(column) = table.column(name)
            && !json_fits(&column.type_name, value)
        {
            return Err(ApiError::unprocessable(
                "invalid_value",
                format!(
                    "column `{name}` is of type {}; got a JSON {}",
                    column.type_name,
                    json_kind(value)
                ),
            ));
        }
        clean.insert(name.clone(), value.clone());
    }
    let id = match clean.get("id") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .ok_or_else(|| {
                    ApiError::unprocessable("invalid_value", "`row.id` must be a UUID string")
                })?,
        ),
    };
    if id.is_none() && kind != OpKind::Insert {
        return Err(ApiError::unprocessable(
            "missing_id",
            format!("`{kind_name}` needs `row.id`"),
        ));
    }
    if kind == OpKind::Delete {
        clean.retain(|k, _| k == "id");
    }
    let columns: Vec<String> = table
        .columns
        .iter()
        .filter(|c| clean.contains_key(&c.name))
        .map(|c| c.name.clone())
        .collect();
    if kind == OpKind::Update && columns.len() < 2 {
        return Err(ApiError::unprocessable(
            "empty_update",
            "an update needs `row.id` and at least one column",
        ));
    }
    Ok(PlannedOp {
        op_id,
        table: table.clone(),
        kind,
        columns,
        row: Value::Object(clean),
        id,
    })
}

/// Whether a JSON value has a shape its column's type accepts. `jsonb_populate_record` would silently store a
/// JSON array or object (or a number) in a text column as its JSON text, and an object in an array column's
/// element as text: a wrong type that must be rejected, not coerced. Scalars are otherwise left to Postgres's
/// own input functions (a bad number, uuid or timestamp fails there with class 22).
fn json_fits(type_name: &str, value: &Value) -> bool {
    if value.is_null() || type_name == "json" || type_name == "jsonb" {
        return true;
    }
    if let Some(element) = type_name.strip_suffix("[]") {
        return value
            .as_array()
            .is_some_and(|items| items.iter().all(|v| json_fits(element, v)));
    }
    let textual =
        type_name == "text" || type_name.starts_with("character") || type_name == "citext";
    if textual {
        value.is_string()
    } else {
        !value.is_array() && !value.is_object()
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// SQL for one op. `$1` is the row as jsonb (or, for a delete, the id).
fn op_sql(op: &PlannedOp, policy: ConflictPolicy) -> String {
    let table = op.table.qualified();
    let cols: Vec<String> = op.columns.iter().map(|c| quote_ident(c)).collect();
    let col_list = cols.join(", ");
    match op.kind {
        OpKind::Insert | OpKind::Upsert if cols.is_empty() => {
            format!("insert into {table} default values")
        }
        OpKind::Insert => {
            format!(
                "insert into {table} ({col_list}) select {col_list} from jsonb_populate_record(null::{table}, $1)"
            )
        }
        OpKind::Upsert => {
            let updates: Vec<String> = cols
                .iter()
                .filter(|c| c.as_str() != "\"id\"")
                .map(|c| format!("{c} = excluded.{c}"))
                .collect();
            let action = if updates.is_empty() {
                "nothing".to_owned()
            } else {
                format!("update set {}", updates.join(", "))
            };
            format!(
                "insert into {table} ({col_list}) select {col_list} from jsonb_populate_record(null::{table}, $1) \
                 on conflict on constraint {} do {action}",
                quote_ident(&op.table.primary_key)
            )
        }
        OpKind::Update => update_sql(&table, &cols, policy),
        OpKind::Delete => format!("delete from {table} where id = $1"),
    }
}

/// SQL for a set of ops shaped like `op`: `$1` is a JSON array of rows (or, for deletes, a uuid array). Updates
/// and deletes return the ids they touched; the others are `not_found`.
fn set_sql(op: &PlannedOp, policy: ConflictPolicy) -> String {
    let single = op_sql(op, policy);
    match op.kind {
        _ if op.columns.is_empty() => single,
        OpKind::Delete => format!(
            "delete from {} where id = any($1::uuid[]) returning id",
            op.table.qualified()
        ),
        OpKind::Update => format!(
            "{} returning t.id",
            single.replace("jsonb_populate_record(", "jsonb_populate_recordset(")
        ),
        OpKind::Insert | OpKind::Upsert => {
            single.replace("jsonb_populate_record(", "jsonb_populate_recordset(")
        }
    }
}

fn update_sql(table: &str, cols: &[String], policy: ConflictPolicy) -> String {
    let sets: Vec<String> = cols
        .iter()
        .filter(|c| c.as_str() != "\"id\"")
        .map(|c| format!("{c} = r.{c}"))
        .collect();
    // Row-level security adds "owner_id = app.user_id" to the predicate: another user's row is simply not found.
    let predicate = match policy {
        ConflictPolicy::LastWriterWins => "t.id = r.id",
    };
    format!(
        "update {table} as t set {} from jsonb_populate_record(null::{table}, $1) as r where {predicate}",
        sets.join(", ")
    )
}
