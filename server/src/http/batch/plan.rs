//! Pure planner: a typed request + the catalog → validated ops with typed values, and → the SQL statements with
//! their typed parameters. No I/O; everything here is unit-tested without a database.
//!
//! ```text
//! BatchRequest ──plan()──► Plan { ops: [PlannedOp { table, kind, columns, cells: [Cell] }] }   (400 or 422 + op_index)
//!      Plan + "which ops are new" ──statements()──► [Statement { sql, params: [typed arrays] }]
//!                                  ──single(i)────► Statement for op i alone (to name a failing op)
//! ```
//!
//! One statement per run of consecutive new ops of the same shape (table, kind, column set), each column bound as
//! one typed array and expanded by `unnest`:
//!
//! ```sql
//! insert into "public"."annotations" ("id", "kind", "page")
//!   select u."id", u."kind", u."page"
//!   from (select unnest($1::uuid[]) as "id", unnest($2::text[]) as "kind", unnest($3::int4[]) as "page") as u
//! update "public"."works" as t set "title" = u."title"
//!   from (select unnest($1::uuid[]) as "id", unnest($2::text[]) as "title") as u
//!   where t."id" = u."id" returning t."id"
//! delete from "public"."works" where "id" = any($1::uuid[]) returning "id"
//! ```
//!
//! A single op is the same statement with one-element arrays, so both paths share one prepared statement per shape.

use std::collections::HashSet;
use std::sync::Arc;

use tokio_postgres::types::ToSql;
use uuid::Uuid;

use super::request::{BatchRequest, OpKind, OpRequest};
use super::value::{self, Cell, ColumnType, JsonText, Timestamp};
use crate::db::catalog::{Catalog, SERVER_COLUMNS, Table, quote_ident};
use crate::error::ApiError;

/// Where the planner looks tables up: the catalog (a trait so that tests can hand it tables directly).
pub(crate) trait Tables {
    /// The synced table called `name`.
    fn table(&self, name: &str) -> Option<&Arc<Table>>;
    /// Every synced table's name, sorted (for error messages).
    fn names(&self) -> Vec<&str>;
}

impl Tables for Catalog {
    fn table(&self, name: &str) -> Option<&Arc<Table>> {
        Catalog::table(self, name)
    }

    fn names(&self) -> Vec<&str> {
        Catalog::names(self)
    }
}

/// A validated op with typed values.
#[derive(Debug)]
pub(crate) struct PlannedOp {
    /// The op's id, as sent.
    pub(crate) op_id: Uuid,
    /// Its position in the client's sequence (`client_id` batches).
    pub(crate) seq: Option<i64>,
    /// Target table.
    pub(crate) table: Arc<Table>,
    /// What to do.
    pub(crate) kind: OpKind,
    /// Indexes (into `table.columns`) of the columns written, in table order.
    pub(crate) columns: Vec<usize>,
    /// One value per entry of `columns`.
    pub(crate) cells: Vec<Cell>,
    /// `row.id`.
    pub(crate) id: Option<Uuid>,
}

/// A validated batch.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Sequence idempotency: the client whose `seq`s the ops carry.
    pub(crate) client_id: Option<Uuid>,
    /// The ops, in request order.
    pub(crate) ops: Vec<PlannedOp>,
}

/// Validates every op against the catalog and decodes its values; the first bad op in request order is reported
/// with its index.
pub(crate) fn plan(tables: &impl Tables, request: &BatchRequest<'_>) -> Result<Plan, ApiError> {
    let duplicate = first_repeated_op_id(request);
    // Each table's column types, worked out once per batch rather than once per value.
    let mut types: Vec<(u32, Vec<ColumnType>)> = Vec::new();
    let mut ops: Vec<PlannedOp> = Vec::with_capacity(request.ops.len());
    for (index, op) in request.ops.iter().enumerate() {
        let planned = plan_one(tables, &mut types, op).map_err(|e| e.at_op(index))?;
        if duplicate == Some(index) {
            return Err(ApiError::unprocessable(
                "duplicate_op_id",
                format!("op_id {} appears twice in this batch", planned.op_id),
            )
            .at_op(index));
        }
        check_seq(request.client_id, ops.last(), &planned).map_err(|e| e.at_op(index))?;
        ops.push(planned);
    }
    Ok(Plan {
        client_id: request.client_id,
        ops,
    })
}

/// The index of the first op (in request order) whose op_id an earlier op already has. Found before planning, by
/// one sort, so that the planning loop only compares an index (it used to hash every op_id into a set).
fn first_repeated_op_id(request: &BatchRequest<'_>) -> Option<usize> {
    let mut ids: Vec<(Uuid, usize)> = request
        .ops
        .iter()
        .enumerate()
        .map(|(i, op)| (op.op_id, i))
        .collect();
    ids.sort_unstable();
    // Within a run of equal ids the indexes are ascending, so each run's second entry is its first repeat.
    ids.windows(2)
        .filter(|w| w[0].0 == w[1].0)
        .map(|w| w[1].1)
        .min()
}

/// With `client_id`, every op has a `seq`, one more than the op before it; without, none has.
fn check_seq(
    client_id: Option<Uuid>,
    previous: Option<&PlannedOp>,
    op: &PlannedOp,
) -> Result<(), ApiError> {
    match (client_id, op.seq) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(ApiError::unprocessable(
            "missing_client_id",
            "`seq` needs the batch's `client_id` (the outbox the sequence belongs to)",
        )),
        (Some(_), None) => Err(ApiError::unprocessable(
            "missing_seq",
            "with `client_id`, every op needs its `seq`",
        )),
        (Some(_), Some(seq)) => match previous.and_then(|p| p.seq) {
            Some(before) if before.checked_add(1) != Some(seq) => Err(ApiError::unprocessable(
                "invalid_seq",
                format!(
                    "`seq` must grow by one from op to op: {seq} follows {before}; renumber the ops that \
                     were never applied"
                ),
            )),
            _ => Ok(()),
        },
    }
}

fn plan_one(
    tables: &impl Tables,
    types: &mut Vec<(u32, Vec<ColumnType>)>,
    op: &OpRequest<'_>,
) -> Result<PlannedOp, ApiError> {
    let table_name = op.table.as_ref();
    let table = tables.table(table_name).ok_or_else(|| {
        ApiError::unprocessable(
            "unknown_table",
            format!(
                "`{table_name}` is not a synced table (synced: {})",
                tables.names().join(", ")
            ),
        )
    })?;
    let types = match types.iter().position(|(oid, _)| *oid == table.oid) {
        Some(at) => &types[at].1,
        None => {
            types.push((
                table.oid,
                table.columns.iter().map(ColumnType::of).collect(),
            ));
            &types[types.len() - 1].1
        }
    };
    // Column indexes in table order (ops that write the same columns get the same list, whatever order their keys
    // came in) and their values, kept sorted as they are filled: two vectors per op and no third to sort and split.
    // A key sent twice keeps its last value.
    let mut columns: Vec<usize> = Vec::with_capacity(op.row.len());
    let mut cells: Vec<Cell> = Vec::with_capacity(op.row.len());
    for (name, raw) in &op.row {
        if SERVER_COLUMNS.contains(&name.as_ref()) {
            continue; // owner_id, created_at, updated_at: Postgres assigns them; a client's value is ignored.
        }
        let Some((index, column)) = table
            .columns
            .iter()
            .enumerate()
            .find(|(_, c)| c.name == *name)
        else {
            return Err(ApiError::unprocessable(
                "unknown_column",
                format!("table `{table_name}` has no column `{name}`"),
            ));
        };
        // Server columns were skipped above, so what is left to refuse is a generated or `generated always as
        // identity` column.
        if column.read_only() {
            return Err(ApiError::unprocessable(
                "read_only_column",
                format!("column `{name}` cannot be written"),
            ));
        }
        let cell = value::decode(&types[index], raw)
            .map_err(|e| e.into_api(&format!("column `{name}` ({})", column.type_name)))?;
        match columns.binary_search(&index) {
            Ok(at) => cells[at] = cell,
            Err(at) => {
                columns.insert(at, index);
                cells.insert(at, cell);
            }
        }
    }
    let id_index = table.columns.iter().position(|c| c.name == "id");
    let id_at = id_index.and_then(|i| columns.binary_search(&i).ok());
    let id = id_at.and_then(|at| match cells[at] {
        Cell::Uuid(id) => Some(id),
        _ => None,
    });
    let kind_name = match op.kind {
        OpKind::Insert => "insert",
        OpKind::Upsert => "upsert",
        OpKind::Update => "update",
        OpKind::Delete => "delete",
    };
    if id.is_none() && op.kind != OpKind::Insert {
        return Err(ApiError::unprocessable(
            "missing_id",
            format!("`{kind_name}` needs `row.id`"),
        ));
    }
    if op.kind == OpKind::Delete
        && let Some(at) = id_at
    {
        // A delete binds the id alone (one without an id was refused above).
        columns.swap(0, at);
        columns.truncate(1);
        cells.swap(0, at);
        cells.truncate(1);
    }
    if op.kind == OpKind::Update && columns.len() < 2 {
        return Err(ApiError::unprocessable(
            "empty_update",
            "an update needs `row.id` and at least one column",
        ));
    }
    Ok(PlannedOp {
        op_id: op.op_id,
        seq: op.seq,
        table: table.clone(),
        kind: op.kind,
        columns,
        cells,
        id,
    })
}

/// One column of values, bound as one typed array parameter.
#[derive(Debug)]
pub(crate) enum Param<'p> {
    /// `uuid[]`.
    Uuid(Vec<Option<Uuid>>),
    /// `text[]`: text, and the text form of arrays and other types (cast by Postgres).
    Text(Vec<Option<&'p str>>),
    /// `bool[]`.
    Bool(Vec<Option<bool>>),
    /// `int2[]`.
    I16(Vec<Option<i16>>),
    /// `int4[]`.
    I32(Vec<Option<i32>>),
    /// `int8[]`.
    I64(Vec<Option<i64>>),
    /// `float4[]`.
    F32(Vec<Option<f32>>),
    /// `float8[]`.
    F64(Vec<Option<f64>>),
    /// `json[]` / `jsonb[]`: each value's JSON text as sent.
    Json(Vec<Option<JsonText<'p>>>),
    /// `timestamptz[]`.
    Timestamp(Vec<Option<Timestamp>>),
}

impl Param<'_> {
    /// As a bind parameter.
    pub(crate) fn as_sql(&self) -> &(dyn ToSql + Sync) {
        match self {
            Self::Uuid(v) => v,
            Self::Text(v) => v,
            Self::Bool(v) => v,
            Self::I16(v) => v,
            Self::I32(v) => v,
            Self::I64(v) => v,
            Self::F32(v) => v,
            Self::F64(v) => v,
            Self::Json(v) => v,
            Self::Timestamp(v) => v,
        }
    }
}

/// The values of one column across `cells`. Every cell of a column was decoded for the same type, so the only
/// other variant met is `Null`.
fn param<'p>(ty: &ColumnType, cells: impl Iterator<Item = &'p Cell>) -> Param<'p> {
    macro_rules! collect {
        ($variant:ident, $cell:pat => $value:expr) => {
            Param::$variant(
                cells
                    .map(|c| match c {
                        $cell => Some($value),
                        _ => None,
                    })
                    .collect(),
            )
        };
    }
    match ty {
        ColumnType::Uuid => collect!(Uuid, Cell::Uuid(u) => *u),
        ColumnType::Text
        | ColumnType::Sha256
        | ColumnType::Array { .. }
        | ColumnType::JsonDomain { .. }
        | ColumnType::Other { .. } => {
            collect!(Text, Cell::Text(s) => s.as_str())
        }
        ColumnType::Bool => collect!(Bool, Cell::Bool(b) => *b),
        ColumnType::Int2 => collect!(I16, Cell::I16(v) => *v),
        ColumnType::Int4 => collect!(I32, Cell::I32(v) => *v),
        ColumnType::Int8 => collect!(I64, Cell::I64(v) => *v),
        ColumnType::Float4 => collect!(F32, Cell::F32(v) => *v),
        ColumnType::Float8 => collect!(F64, Cell::F64(v) => *v),
        ColumnType::Json | ColumnType::Jsonb => collect!(Json, Cell::Json(j) => JsonText(j)),
        ColumnType::Timestamptz => collect!(Timestamp, Cell::Timestamp(t) => *t),
    }
}

/// One SQL statement over a run of ops.
#[derive(Debug)]
pub(crate) struct Statement<'p> {
    /// The SQL text (identifiers from the catalog, quoted; no values).
    pub(crate) sql: String,
    /// One typed array per column (a delete binds the ids only; `default values` binds nothing).
    pub(crate) params: Vec<Param<'p>>,
    /// The ops it runs (indexes into the plan), in request order.
    pub(crate) ops: Vec<usize>,
    /// Their kind: updates and deletes return the ids they touched (the others are `not_found`).
    pub(crate) kind: OpKind,
}

impl Statement<'_> {
    /// The parameters as bind parameters.
    pub(crate) fn bind(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(Param::as_sql).collect()
    }
}

/// Groups consecutive new ops that one statement can run: same table, kind and columns, at least one column, and
/// (except for inserts, where a repeated id is the client's error anyway) no id twice, since one statement cannot
/// update, upsert or delete a row twice.
fn runs(plan: &[PlannedOp], fresh: impl Fn(usize) -> bool) -> Vec<Vec<usize>> {
    let mut runs: Vec<(Vec<usize>, HashSet<Uuid>)> = Vec::new();
    for (index, op) in plan.iter().enumerate() {
        if !fresh(index) {
            continue;
        }
        let joins = runs.last().is_some_and(|(run, ids)| {
            let first = &plan[run[0]];
            first.kind == op.kind
                && first.table.oid == op.table.oid
                && first.columns == op.columns
                && !op.columns.is_empty()
                && (op.kind == OpKind::Insert || op.id.is_none_or(|id| !ids.contains(&id)))
        });
        if !joins {
            runs.push((Vec::new(), HashSet::new()));
        }
        if let Some((run, ids)) = runs.last_mut() {
            run.push(index);
            // Inserts never look ids up (see above): no hashing for the common case.
            if op.kind != OpKind::Insert
                && let Some(id) = op.id
            {
                ids.insert(id);
            }
        }
    }
    runs.into_iter().map(|(run, _)| run).collect()
}

/// The statements that run every op for which `fresh` holds, in order.
pub(crate) fn statements(plan: &[PlannedOp], fresh: impl Fn(usize) -> bool) -> Vec<Statement<'_>> {
    runs(plan, fresh)
        .into_iter()
        .map(|run| statement(plan, run))
        .collect()
}

/// The statement that runs op `index` alone.
pub(crate) fn single(plan: &[PlannedOp], index: usize) -> Statement<'_> {
    statement(plan, vec![index])
}

fn statement(plan: &[PlannedOp], ops: Vec<usize>) -> Statement<'_> {
    let first = &plan[ops[0]];
    let table = &first.table;
    let types: Vec<ColumnType> = first
        .columns
        .iter()
        .map(|&c| ColumnType::of(&table.columns[c]))
        .collect();
    let names: Vec<String> = first
        .columns
        .iter()
        .map(|&c| quote_ident(&table.columns[c].name))
        .collect();
    let sql = sql(table, first.kind, &names, &types);
    let params = match first.kind {
        _ if first.columns.is_empty() => Vec::new(),
        OpKind::Delete => vec![Param::Uuid(ops.iter().map(|&i| plan[i].id).collect())],
        _ => types
            .iter()
            .enumerate()
            .map(|(j, ty)| param(ty, ops.iter().map(|&i| &plan[i].cells[j])))
            .collect(),
    };
    Statement {
        sql,
        params,
        ops,
        kind: first.kind,
    }
}

/// The SQL for a shape. `names` are the quoted column names, `types` their decodings.
fn sql(table: &Table, kind: OpKind, names: &[String], types: &[ColumnType]) -> String {
    let qualified = table.qualified();
    if names.is_empty() {
        // Only inserts and upserts can have no column (update needs one, delete has the id).
        return format!("insert into {qualified} default values");
    }
    if kind == OpKind::Delete {
        return format!("delete from {qualified} where \"id\" = any($1::uuid[]) returning \"id\"");
    }
    let list = names.join(", ");
    // Each array is unnested in the select list of a subquery, not by `unnest(a, b, …)` in FROM: a function in FROM
    // is a FunctionScan, which materialises every function's whole result in a tuplestore before the first row
    // moves, while set-returning functions in a select list (a ProjectSet) hand their elements on one at a time, in
    // lockstep (equal lengths here, as every op of a run has every column). Postgres cannot pull such a subquery
    // up, so its rows stream straight into the insert or the update's join. Measured: 200,000-row inserts ~20%
    // faster in Postgres (docs/decisions.md 51).
    let unnested: Vec<String> = names
        .iter()
        .zip(types)
        .enumerate()
        .map(|(i, (name, ty))| format!("unnest(${}::{}) as {name}", i + 1, ty.param_array_type()))
        .collect();
    let source = format!("(select {}) as u", unnested.join(", "));
    // u."c", cast where the value travelled as text (arrays, other types). The cast has no type modifiers; the
    // column's own are applied by the assignment, which refuses what does not fit instead of truncating.
    let value = |name: &String, ty: &ColumnType| match ty.cast() {
        Some(cast) => format!("u.{name}::{cast}"),
        None => format!("u.{name}"),
    };
    let sets = || -> Vec<String> {
        names
            .iter()
            .zip(types)
            .filter(|(name, _)| name.as_str() != "\"id\"")
            .map(|(name, ty)| format!("{name} = {}", value(name, ty)))
            .collect()
    };
    match kind {
        OpKind::Insert | OpKind::Upsert => {
            let values: Vec<String> = names.iter().zip(types).map(|(n, t)| value(n, t)).collect();
            let mut sql = format!(
                "insert into {qualified} ({list}) select {} from {source}",
                values.join(", ")
            );
            if kind == OpKind::Upsert {
                let updates: Vec<String> = names
                    .iter()
                    .filter(|n| n.as_str() != "\"id\"")
                    .map(|n| format!("{n} = excluded.{n}"))
                    .collect();
                let action = if updates.is_empty() {
                    "nothing".to_owned()
                } else {
                    format!("update set {}", updates.join(", "))
                };
                sql.push_str(&format!(
                    " on conflict on constraint {} do {action}",
                    quote_ident(&table.primary_key)
                ));
            }
            sql
        }
        // Row-level security adds "owner_id = app.user_id" to the predicate: another user's row is simply not
        // found. Last writer wins per column: only the columns sent are set (docs/api.md, "Conflicts").
        OpKind::Update => format!(
            "update {qualified} as t set {} from {source} where t.\"id\" = u.\"id\" returning t.\"id\"",
            sets().join(", ")
        ),
        OpKind::Delete => unreachable!("handled above"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::db::catalog::Column;
    use crate::http::batch::request;

    struct Fake(HashMap<String, Arc<Table>>);

    impl Tables for Fake {
        fn table(&self, name: &str) -> Option<&Arc<Table>> {
            self.0.get(name)
        }
        fn names(&self) -> Vec<&str> {
            let mut n: Vec<&str> = self.0.keys().map(String::as_str).collect();
            n.sort_unstable();
            n
        }
    }

    fn col(name: &str, type_name: &str, type_oid: u32) -> Column {
        Column {
            name: name.into(),
            type_name: type_name.into(),
            type_oid,
            base_type_oid: type_oid,
            not_null: false,
            generated: name == "generated",
            identity_always: false,
        }
    }

    fn tables() -> Fake {
        let works = Table {
            oid: 1,
            schema: "public".into(),
            name: "works".into(),
            columns: vec![
                col("id", "uuid", 2950),
                col("owner_id", "uuid", 2950),
                col("title", "text", 25),
                col("year", "integer", 23),
                col("tags", "text[]", 1009),
                col("authors", "jsonb", 3802),
                col("price", "numeric(10,2)", 1700),
                col("generated", "text", 25),
                col("due", "timestamp with time zone", 1184),
                col("updated_at", "timestamp with time zone", 1184),
            ],
            primary_key: "works_pkey".into(),
        };
        let mut notes = works.clone();
        notes.oid = 2;
        notes.name = "notes".into();
        notes.primary_key = "notes_pkey".into();
        Fake(HashMap::from([
            ("works".to_owned(), Arc::new(works)),
            ("notes".to_owned(), Arc::new(notes)),
        ]))
    }

    fn op(kind: &str, table: &str, row: &str) -> String {
        format!(
            r#"{{"op_id":"{}","table":"{table}","kind":"{kind}","row":{row}}}"#,
            Uuid::new_v4()
        )
    }

    fn planned(ops: &[String]) -> Result<Plan, ApiError> {
        let body = format!("{{\"ops\":[{}]}}", ops.join(","));
        let req = request::parse(body.as_bytes(), 1000)?;
        plan(&tables(), &req)
    }

    const A: &str = "0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a01";
    const B: &str = "0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a02";

    #[test]
    fn values_are_typed_and_server_columns_dropped() {
        let plan = planned(&[op(
            "insert",
            "works",
            &format!(
                r#"{{"id":"{A}","owner_id":"{B}","title":"x","year":"2019","tags":["a"],
                    "authors":[{{"name":"V"}}],"price":12.5,"updated_at":"2000-01-01T00:00:00Z","title":"y"}}"#
            ),
        )])
        .unwrap();
        let op = &plan.ops[0];
        assert_eq!(op.id, Some(A.parse().unwrap()));
        // id, title, year, tags, authors, price: table order, owner_id and updated_at dropped.
        assert_eq!(op.columns, [0, 2, 3, 4, 5, 6]);
        assert_eq!(
            op.cells[1],
            Cell::Text("y".into()),
            "a repeated key keeps its last value"
        );
        assert_eq!(op.cells[2], Cell::I32(2019));
        assert_eq!(op.cells[3], Cell::Text("{\"a\"}".into()));
        assert_eq!(op.cells[5], Cell::Text("12.5".into()));
    }

    #[test]
    fn a_delete_keeps_only_its_id() {
        let plan = planned(&[op(
            "delete",
            "works",
            &format!(r#"{{"title":"x","id":"{A}","year":3}}"#),
        )])
        .unwrap();
        let op = &plan.ops[0];
        assert_eq!(op.columns, [0]);
        assert_eq!(op.cells, [Cell::Uuid(A.parse().unwrap())]);
        assert_eq!(op.id, Some(A.parse().unwrap()));
    }

    #[test]
    fn bad_ops_are_named_by_index() {
        let good = op("insert", "works", r#"{"title":"x"}"#);
        let cases = [
            (op("insert", "workz", "{}"), 422, "unknown_table"),
            (
                op("insert", "works", r#"{"colour":"red"}"#),
                422,
                "unknown_column",
            ),
            (
                op("insert", "works", r#"{"generated":"x"}"#),
                422,
                "read_only_column",
            ),
            (
                op("insert", "works", r#"{"year":"abc"}"#),
                400,
                "invalid_value",
            ),
            (
                op("insert", "works", r#"{"title":{"en":"x"}}"#),
                400,
                "invalid_value",
            ),
            (
                op("insert", "works", r#"{"tags":["ok",7]}"#),
                400,
                "invalid_value",
            ),
            (
                op("insert", "works", r#"{"due":"yesterday"}"#),
                400,
                "invalid_value",
            ),
            (
                op("insert", "works", r#"{"year":true}"#),
                400,
                "invalid_value",
            ),
            (
                op("insert", "works", r#"{"id":"not-a-uuid"}"#),
                400,
                "invalid_value",
            ),
            (op("update", "works", r#"{"title":"x"}"#), 422, "missing_id"),
            (op("delete", "works", r#"{"id":null}"#), 422, "missing_id"),
            (
                op(
                    "update",
                    "works",
                    &format!(r#"{{"id":"{A}","owner_id":"{B}"}}"#),
                ),
                422,
                "empty_update",
            ),
        ];
        // A value that is none of its column type's forms is 400 (issue 9's contract); other refusals 422.
        for (bad, status, code) in cases {
            let e = planned(&[good.clone(), bad.clone()]).expect_err(&bad);
            assert_eq!(
                (e.status.as_u16(), e.code, e.index),
                (status, code, Some(("op_index", 1))),
                "{bad}: {}",
                e.message
            );
        }
        let e = planned(&[good.clone(), good]).unwrap_err();
        assert_eq!(
            (e.code, e.index),
            ("duplicate_op_id", Some(("op_index", 1)))
        );
    }

    #[test]
    fn the_first_repeated_op_id_in_request_order_is_reported() {
        let with_id = |id: &str| {
            format!(r#"{{"op_id":"{id}","table":"works","kind":"insert","row":{{"title":"t"}}}}"#)
        };
        // A, B, B, A: op 2 repeats B before op 3 repeats A (sorted by id, A's repeat would come first).
        let e = planned(&[with_id(A), with_id(B), with_id(B), with_id(A)]).unwrap_err();
        assert_eq!(
            (e.code, e.index),
            ("duplicate_op_id", Some(("op_index", 2)))
        );
        // B, A, C, A, B: op 3.
        let c = "0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a03";
        let ops = [with_id(B), with_id(A), with_id(c), with_id(A), with_id(B)];
        assert_eq!(planned(&ops).unwrap_err().index, Some(("op_index", 3)));
        // An op that is wrong before the repeat is reported first, in request order.
        let bad = r#"{"op_id":"0b7c2f4e-7c1e-4a53-9d57-3b1c3c1d8a04","table":"nope","kind":"insert","row":{}}"#;
        let e = planned(&[with_id(A), bad.to_owned(), with_id(A)]).unwrap_err();
        assert_eq!((e.code, e.index), ("unknown_table", Some(("op_index", 1))));
    }

    #[test]
    fn sequences_must_be_contiguous_and_need_a_client() {
        let with_seq = |seq: i64| {
            format!(
                r#"{{"op_id":"{}","seq":{seq},"table":"works","kind":"insert","row":{{}}}}"#,
                Uuid::new_v4()
            )
        };
        let body = |client: bool, ops: &[String]| {
            let client = if client {
                r#""client_id":"7d3c9a10-4e2b-4f5a-9b6c-1a2b3c4d5e6f","#
            } else {
                ""
            };
            format!("{{{client}\"ops\":[{}]}}", ops.join(","))
        };
        let run = |client: bool, ops: &[String]| {
            let text = body(client, ops);
            let req = request::parse(text.as_bytes(), 1000)?;
            plan(&tables(), &req).map(|p| p.ops.iter().map(|o| o.seq).collect::<Vec<_>>())
        };
        assert_eq!(
            run(true, &[with_seq(5), with_seq(6), with_seq(7)]).unwrap(),
            [Some(5), Some(6), Some(7)]
        );
        let code = |client, ops: &[String]| {
            let e = run(client, ops).unwrap_err();
            (e.code, e.index.map(|(_, i)| i))
        };
        assert_eq!(
            code(true, &[with_seq(5), with_seq(7)]),
            ("invalid_seq", Some(1))
        );
        assert_eq!(
            code(true, &[with_seq(5), with_seq(5)]),
            ("invalid_seq", Some(1))
        );
        assert_eq!(
            code(true, &[with_seq(5), with_seq(4)]),
            ("invalid_seq", Some(1))
        );
        assert_eq!(
            code(true, &[with_seq(5), op("insert", "works", "{}")]),
            ("missing_seq", Some(1))
        );
        assert_eq!(code(false, &[with_seq(1)]), ("missing_client_id", Some(0)));
    }

    #[test]
    fn consecutive_ops_of_one_shape_share_a_statement() {
        let plan = planned(&[
            op("insert", "works", &format!(r#"{{"id":"{A}","title":"a"}}"#)),
            op("insert", "works", &format!(r#"{{"id":"{B}","title":"b"}}"#)),
            op("insert", "works", r#"{"title":"c","year":1}"#), // other columns
            op(
                "update",
                "works",
                &format!(r#"{{"id":"{A}","title":"a2"}}"#),
            ),
            op(
                "update",
                "works",
                &format!(r#"{{"id":"{A}","title":"a3"}}"#),
            ), // same id: a new statement
            op("update", "notes", &format!(r#"{{"id":"{A}","title":"n"}}"#)), // other table
            op(
                "delete",
                "works",
                &format!(r#"{{"id":"{A}","title":"ignored"}}"#),
            ),
            op("delete", "works", &format!(r#"{{"id":"{B}"}}"#)),
            op("insert", "works", "{}"),
            op("insert", "works", "{}"), // no columns: never grouped
        ])
        .unwrap();
        let all = statements(&plan.ops, |_| true);
        let groups: Vec<&[usize]> = all.iter().map(|s| s.ops.as_slice()).collect();
        assert_eq!(
            groups,
            [&[0, 1][..], &[2], &[3], &[4], &[5], &[6, 7], &[8], &[9]]
        );
        assert_eq!(
            all[0].sql,
            "insert into \"public\".\"works\" (\"id\", \"title\") select u.\"id\", u.\"title\" \
             from (select unnest($1::uuid[]) as \"id\", unnest($2::text[]) as \"title\") as u"
        );
        assert!(matches!(&all[0].params[1], Param::Text(v) if v == &[Some("a"), Some("b")]));
        assert_eq!(
            all[2].sql,
            "update \"public\".\"works\" as t set \"title\" = u.\"title\" from (select unnest($1::uuid[]) \
             as \"id\", unnest($2::text[]) as \"title\") as u where t.\"id\" = u.\"id\" returning t.\"id\""
        );
        assert_eq!(
            all[5].sql,
            "delete from \"public\".\"works\" where \"id\" = any($1::uuid[]) returning \"id\""
        );
        assert!(matches!(&all[5].params[..], [Param::Uuid(ids)] if ids.len() == 2));
        assert_eq!(
            all[6].sql,
            "insert into \"public\".\"works\" default values"
        );
        assert!(all[6].params.is_empty());

        // Duplicates are skipped and do not split a run.
        let fresh = statements(&plan.ops, |i| i != 1);
        assert_eq!(fresh[0].ops, [0]);
        assert_eq!(fresh[1].ops, [2]);
        // A single op is the same statement with one-element arrays.
        let one = single(&plan.ops, 1);
        assert_eq!(one.sql, all[0].sql);
        assert!(matches!(&one.params[0], Param::Uuid(ids) if ids.len() == 1));
    }

    #[test]
    fn upserts_arrays_and_other_types() {
        let plan = planned(&[op(
            "upsert",
            "works",
            &format!(r#"{{"id":"{A}","tags":["x"],"price":"1.50","authors":null}}"#),
        )])
        .unwrap();
        let s = single(&plan.ops, 0);
        assert_eq!(
            s.sql,
            "insert into \"public\".\"works\" (\"id\", \"tags\", \"authors\", \"price\") \
             select u.\"id\", u.\"tags\"::text[], u.\"authors\", u.\"price\"::numeric \
             from (select unnest($1::uuid[]) as \"id\", unnest($2::text[]) as \"tags\", \
             unnest($3::jsonb[]) as \"authors\", unnest($4::text[]) as \"price\") as u \
             on conflict on constraint \"works_pkey\" do update set \"tags\" = excluded.\"tags\", \
             \"authors\" = excluded.\"authors\", \"price\" = excluded.\"price\""
        );
        assert!(matches!(&s.params[2], Param::Json(v) if v.len() == 1 && v[0].is_none()));
        let only_id = planned(&[op("upsert", "works", &format!(r#"{{"id":"{A}"}}"#))]).unwrap();
        assert!(single(&only_id.ops, 0).sql.ends_with("do nothing"));
    }
}
