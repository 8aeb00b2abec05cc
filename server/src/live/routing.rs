//! Pure: which user a change belongs to, and what a subscription makes of it.
//!
//! One pass over a committed transaction groups its changes by owner. The cost is the transaction's size; users
//! it does not touch are never looked at. Ownership comes from the row itself, exactly as the RLS policy decides
//! it (`owner_id = app.user_id`): the WAL is not protected by RLS, so this check is the only access control on
//! the live path.
//!
//! - insert: the new row's owner.
//! - delete: the old row's owner (synced tables use REPLICA IDENTITY FULL, and owner_id is in the primary key
//!   anyway, so it is always there).
//! - update: the old row's owner if Postgres sent an old row, else the new row's. When the owner changed (only a
//!   superuser can do that: the policy's WITH CHECK forbids it to users), the old owner gets a delete and the new
//!   owner an insert; so does the owner when the row's `id` changed (plain SQL only).
//!
//! With REPLICA IDENTITY FULL the old row carries every column, so an update that did not touch an out-of-line
//! (TOASTed) value, which pgoutput marks "unchanged" in the new row, is filled from the old row: clients always
//! get whole rows. Only if a table lacks the full identity does a change keep an `unchanged` list (a patch).

use std::collections::HashMap;
use std::sync::Arc;

use deeprecall_replication::{ColumnDef, Lsn, Op, RelationCache, Row, Transaction};
use uuid::Uuid;

use super::convert;
use super::filter::Filter;

/// Prefix of the logical messages the snapshot handoff uses as barriers.
pub const BARRIER_PREFIX: &str = "deeprecall.barrier";

/// One change as a user's subscribers see it.
#[derive(Debug, Clone)]
pub struct Change {
    /// Table name.
    pub table: Arc<str>,
    /// What happened, from the owner's point of view.
    pub op: Op,
    /// New row (insert/update) for filtering.
    pub new: Option<Row>,
    /// Old row (update/delete) for filtering.
    pub old: Option<Row>,
    /// Columns neither sent nor recoverable from the old row (a patch); empty under REPLICA IDENTITY FULL.
    pub unchanged: Vec<String>,
    /// The row clients receive, serialised once: the new row for inserts and updates, the old row for deletes.
    pub row_json: Box<str>,
}

impl Change {
    /// Value of `column` in the row after the change (`None`: not carried).
    pub fn new_value(&self, column: &str) -> Option<Option<&str>> {
        let new = self.new.as_ref()?;
        new.get(column)
            .or_else(|| self.old.as_ref().and_then(|o| o.get(column)))
    }

    /// Value of `column` before the change (`None`: not carried).
    pub fn old_value(&self, column: &str) -> Option<Option<&str>> {
        self.old.as_ref()?.get(column)
    }

    /// What a subscription with `filter` on this change's table should receive, if anything.
    ///
    /// A row that stops matching becomes a delete for that subscription and one that starts matching an insert,
    /// so a client's state always equals "rows of mine matching my filter". When the old row is unknown (no full
    /// replica identity) an update that does not match is sent as a delete: harmless if the client never had
    /// the row, and necessary if it had.
    pub fn for_filter(&self, filter: &Filter) -> Option<Op> {
        let new_match = || filter.matches(|c| self.new_value(c)).unwrap_or(true);
        let old_match = || filter.matches(|c| self.old_value(c));
        match self.op {
            Op::Insert => new_match().then_some(Op::Insert),
            Op::Delete => old_match().unwrap_or(true).then_some(Op::Delete),
            Op::Update => match (old_match(), new_match()) {
                (Some(true), true) | (None, true) => Some(Op::Update),
                (Some(true), false) | (None, false) => Some(Op::Delete),
                (Some(false), true) => Some(Op::Insert),
                (Some(false), false) => None,
            },
        }
    }
}

/// A committed transaction's changes for one user.
#[derive(Debug, Clone)]
pub struct UserTxn {
    /// The user.
    pub owner: Uuid,
    /// 64-bit transaction id (equals `/v1/batch`'s `txid`).
    pub xid: u64,
    /// Slot generation the transaction was streamed in (set by the hub).
    pub generation: i64,
    /// Commit LSN.
    pub commit_lsn: Lsn,
    /// End of the commit record: the stream position after this transaction. In a part that is not the
    /// transaction's last, the commit LSN (the end is not known yet).
    pub end_lsn: Lsn,
    /// The changes, in commit order.
    pub changes: Vec<Change>,
    /// Memory held (rows, rendered JSON, bookkeeping), for the history and queue budgets.
    pub bytes: usize,
    /// Which part of a transaction that came in parts this is (0 for a transaction that came whole).
    pub part: u32,
    /// Whether this is the transaction's last part (always, for a transaction that came whole).
    pub last: bool,
}

impl UserTxn {
    /// Whether the transaction came in parts (too large to hold whole): it is delivered part by part, never kept
    /// in the history, and only its last part carries a resumable position.
    pub fn is_split(&self) -> bool {
        self.part > 0 || !self.last
    }
}

impl Change {
    /// Memory this change holds.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.row_json.len()
            + self.new.as_ref().map_or(0, Row::approx_bytes)
            + self.old.as_ref().map_or(0, Row::approx_bytes)
            + self.unchanged.iter().map(|c| c.len() + 24).sum::<usize>()
    }
}

/// A transaction split by owner.
#[derive(Debug)]
pub struct Routed {
    /// One entry per owner touched.
    pub per_owner: Vec<UserTxn>,
    /// Tables truncated (every subscription on them must refetch).
    pub truncated: Vec<Arc<str>>,
    /// Tables whose columns changed (added with a default, dropped, retyped): existing rows changed without a
    /// row change in the stream, so every subscription on them must refetch. Filled in by the replicator.
    pub schema_changed: Vec<Arc<str>>,
    /// Barrier ids carried by this transaction.
    pub barriers: Vec<String>,
    /// Changes without a usable owner_id (not routed; counted for the operator).
    pub unroutable: usize,
    /// The transaction's identity and part (for owners a part did not reach).
    pub xid: u64,
    /// Commit LSN.
    pub commit_lsn: u64,
    /// End LSN (the commit LSN in a part before the last).
    pub end_lsn: u64,
    /// Part number.
    pub part: u32,
    /// Whether this is the transaction's last part.
    pub last: bool,
}

impl Default for Routed {
    /// A whole (not split) transaction with nothing in it.
    fn default() -> Self {
        Self {
            per_owner: Vec::new(),
            truncated: Vec::new(),
            schema_changed: Vec::new(),
            barriers: Vec::new(),
            unroutable: 0,
            xid: 0,
            commit_lsn: 0,
            end_lsn: 0,
            part: 0,
            last: true,
        }
    }
}

impl Routed {
    /// Whether the transaction came in parts.
    pub fn is_split(&self) -> bool {
        self.part > 0 || !self.last
    }

    /// This part of the transaction for `owner`, without changes.
    pub fn empty_part_for(&self, owner: Uuid) -> UserTxn {
        UserTxn {
            owner,
            xid: self.xid,
            generation: 0,
            commit_lsn: Lsn(self.commit_lsn),
            end_lsn: Lsn(self.end_lsn),
            changes: Vec::new(),
            bytes: std::mem::size_of::<UserTxn>(),
            part: self.part,
            last: self.last,
        }
    }
}

/// Widens a 32-bit xid to the 64-bit value nearest `reference` (both sides of a wraparound).
pub fn widen_xid(xid: u32, reference: u64) -> u64 {
    let epoch = reference >> 32;
    let candidate = (epoch << 32) | u64::from(xid);
    const HALF: u64 = 1 << 31;
    if candidate > reference.saturating_add(HALF) && epoch > 0 {
        candidate - (1 << 32)
    } else if candidate.saturating_add(HALF) < reference {
        candidate + (1 << 32)
    } else {
        candidate
    }
}

/// Splits `txn` by owner. `xid` is the widened transaction id. Only tables in `synced` are routed. Takes the
/// transaction by value: its decoded rows move into the changes (kept for filters) instead of being copied.
pub fn route(
    txn: Transaction,
    xid: u64,
    relations: &RelationCache,
    synced: impl Fn(&str) -> bool,
) -> Routed {
    let mut routed = Routed {
        barriers: txn
            .messages
            .iter()
            .filter(|(p, _)| p == BARRIER_PREFIX)
            .map(|(_, c)| String::from_utf8_lossy(c).into_owned())
            .collect(),
        // A truncate of a publication member that is not synced concerns no subscription (none can exist on it),
        // and would otherwise stay in the hub's resume record of truncates.
        truncated: txn
            .truncated
            .iter()
            .filter(|(_, t)| synced(t))
            .map(|(_, t)| Arc::from(t.as_str()))
            .collect(),
        xid,
        commit_lsn: txn.commit_lsn.0,
        end_lsn: txn.end_lsn.0,
        part: txn.part,
        last: txn.last,
        ..Default::default()
    };
    let mut index: HashMap<Uuid, usize> = HashMap::new();
    let mut tables: HashMap<u32, Arc<str>> = HashMap::new();
    for rc in txn.changes {
        if !synced(&rc.table) {
            continue;
        }
        let table = tables
            .entry(rc.relation_oid)
            .or_insert_with(|| Arc::from(rc.table.as_str()))
            .clone();
        let owner_of = |row: Option<&Row>| {
            row.and_then(|r| r.get("owner_id"))
                .flatten()
                .and_then(|s| Uuid::parse_str(s).ok())
        };
        let new_owner = owner_of(rc.new.as_ref());
        let old_owner = owner_of(rc.old.as_ref());
        let mut emit = |owner: Option<Uuid>, change: Change| match owner {
            Some(owner) => {
                let i = *index.entry(owner).or_insert_with(|| {
                    routed.per_owner.push(UserTxn {
                        owner,
                        xid,
                        generation: 0,
                        commit_lsn: txn.commit_lsn,
                        end_lsn: txn.end_lsn,
                        changes: Vec::new(),
                        bytes: std::mem::size_of::<UserTxn>(),
                        part: txn.part,
                        last: txn.last,
                    });
                    routed.per_owner.len() - 1
                });
                let user = &mut routed.per_owner[i];
                user.bytes += change.approx_bytes();
                user.changes.push(change);
            }
            None => routed.unroutable += 1,
        };
        let columns = relations
            .get(rc.relation_oid)
            .map(|r| r.columns.as_slice())
            .unwrap_or(&[]);
        let (op, new, old) = (rc.op, rc.new, rc.old);
        match op {
            Op::Insert => emit(new_owner, change(table, Op::Insert, new, old, columns)),
            Op::Delete => emit(old_owner, change(table, Op::Delete, None, old, columns)),
            Op::Update => {
                // A row whose key changed is another row: only a superuser can move a row to another owner
                // (the policy's WITH CHECK), and only SQL that bypasses /v1/batch can change its `id`. Clients
                // key rows by `id`, so an `update` would leave the old row behind: the old key gets a delete,
                // the new one an insert (Electric does the same).
                fn id_of(row: &Option<Row>) -> Option<&str> {
                    row.as_ref().and_then(|r| r.get("id")).flatten()
                }
                let moved = matches!((old_owner, new_owner), (Some(from), Some(to)) if from != to);
                let rekeyed = matches!(
                    (id_of(&old), id_of(&new)),
                    (Some(before), Some(after)) if before != after
                );
                if moved || rekeyed {
                    emit(
                        old_owner.or(new_owner),
                        change(table.clone(), Op::Delete, None, old.clone(), columns),
                    );
                    emit(
                        new_owner.or(old_owner),
                        change(table, Op::Insert, new, old, columns),
                    );
                } else {
                    emit(
                        old_owner.or(new_owner),
                        change(table, Op::Update, new, old, columns),
                    );
                }
            }
        }
    }
    routed
}

/// One change for its owner: the rows, and the row clients receive rendered once as JSON: the new row for
/// inserts and updates (a column the new row lacks, an unchanged TOAST value, taken from the old full row), the
/// old row for deletes. `new` is `None` for deletes.
fn change(
    table: Arc<str>,
    op: Op,
    new: Option<Row>,
    old: Option<Row>,
    columns: &[ColumnDef],
) -> Change {
    let mut unchanged = Vec::new();
    let mut out = Vec::with_capacity(256);
    out.push(b'{');
    // Rows hold their columns in table order, as `columns` lists them: walk both in step instead of looking
    // every column up by name (`Row::get` is a linear search).
    let mut new_cols = new.as_ref().map(ColumnCursor::new);
    let mut old_cols = old.as_ref().map(ColumnCursor::new);
    let mut first = true;
    for col in columns {
        let from_new = new_cols.as_mut().and_then(|c| c.take(&col.name));
        let from_old = old_cols.as_mut().and_then(|c| c.take(&col.name));
        match from_new.or(from_old) {
            Some(value) => {
                if !first {
                    out.push(b',');
                }
                first = false;
                convert::write_json_str(&mut out, &col.name);
                out.push(b':');
                convert::write_value(&mut out, col.type_oid, value);
            }
            None if op != Op::Delete => unchanged.push(col.name.clone()),
            None => {}
        }
    }
    out.push(b'}');
    let row_json = convert::into_string(out);
    Change {
        table,
        op,
        new,
        old,
        unchanged,
        row_json: row_json.into_boxed_str(),
    }
}

/// Reads a row's columns in table order: `take(name)` is the next column when it is `name` (the usual case, one
/// comparison), else a lookup by name (a column the row lacks, or a relation that changed under the row).
struct ColumnCursor<'r> {
    row: &'r Row,
    next: usize,
}

impl<'r> ColumnCursor<'r> {
    fn new(row: &'r Row) -> Self {
        Self { row, next: 0 }
    }

    fn take(&mut self, name: &str) -> Option<Option<&'r str>> {
        match self.row.at(self.next) {
            Some((n, value)) if n == name => {
                self.next += 1;
                Some(value)
            }
            _ => self.row.get(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use deeprecall_replication::{RelationBody, RowChange};
    use serde_json::json;

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000b";

    fn relations() -> RelationCache {
        let mut cache = RelationCache::new();
        let col = |flags, name: &str, type_oid| ColumnDef {
            flags,
            name: name.into(),
            type_oid,
            type_modifier: -1,
        };
        cache.insert(RelationBody {
            oid: 1,
            namespace: "public".into(),
            name: "notes".into(),
            replica_identity: b'f',
            columns: vec![
                col(1, "id", 2950),
                col(1, "owner_id", 2950),
                col(0, "body", 25),
                col(0, "page", 23),
            ],
        });
        cache
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs.iter().copied().collect()
    }

    fn rc(op: Op, new: Option<Row>, old: Option<Row>, unchanged: &[&str]) -> RowChange {
        RowChange {
            relation_oid: 1,
            schema: "public".into(),
            table: "notes".into(),
            op,
            new,
            old,
            unchanged: unchanged.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn txn(changes: Vec<RowChange>) -> Transaction {
        Transaction {
            xid: 7,
            commit_lsn: Lsn(100),
            end_lsn: Lsn(120),
            commit_time_micros: 0,
            changes,
            truncated: vec![],
            messages: vec![],
            part: 0,
            last: true,
        }
    }

    fn json_of(c: &Change) -> serde_json::Value {
        serde_json::from_str(&c.row_json).unwrap()
    }

    #[test]
    fn only_synced_tables_truncates_are_routed() {
        let mut t = txn(vec![]);
        t.truncated = vec![
            ("public".into(), "notes".into()),
            ("public".into(), "scratch".into()),
        ];
        let routed = route(t, 7, &relations(), |name| name == "notes");
        assert_eq!(routed.truncated, vec![Arc::<str>::from("notes")]);
    }

    #[test]
    fn a_row_in_another_column_order_renders_the_same() {
        // Rows are normally in the relation's column order; one that is not (a relation that changed under it)
        // is read by name, column by column.
        let t = txn(vec![rc(
            Op::Insert,
            Some(row(&[
                ("page", Some("2")),
                ("body", Some("b")),
                ("owner_id", Some(A)),
                ("id", Some("9")),
            ])),
            None,
            &[],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        assert_eq!(
            json_of(&routed.per_owner[0].changes[0]),
            json!({"id": "9", "owner_id": A, "body": "b", "page": 2})
        );
    }

    #[test]
    fn splits_by_owner_and_fills_unchanged_toast_from_old_row() {
        let full_old = row(&[
            ("id", Some("1")),
            ("owner_id", Some(A)),
            ("body", Some("long")),
            ("page", Some("3")),
        ]);
        let t = txn(vec![
            rc(
                Op::Insert,
                Some(row(&[
                    ("id", Some("2")),
                    ("owner_id", Some(B)),
                    ("body", None),
                    ("page", Some("1")),
                ])),
                None,
                &[],
            ),
            rc(
                Op::Update,
                Some(row(&[
                    ("id", Some("1")),
                    ("owner_id", Some(A)),
                    ("page", Some("4")),
                ])),
                Some(full_old.clone()),
                &["body"],
            ),
        ]);
        let routed = route(t, 7, &relations(), |_| true);
        assert_eq!(routed.per_owner.len(), 2);
        let b = &routed.per_owner[0];
        assert_eq!(b.owner.to_string(), B);
        assert_eq!(
            json_of(&b.changes[0]),
            json!({"id": "2", "owner_id": B, "body": null, "page": 1})
        );
        let a = &routed.per_owner[1];
        assert_eq!(a.changes[0].op, Op::Update);
        assert_eq!(
            json_of(&a.changes[0]),
            json!({"id": "1", "owner_id": A, "body": "long", "page": 4})
        );
        assert!(a.changes[0].unchanged.is_empty());
    }

    #[test]
    fn unchanged_without_old_row_stays_a_patch() {
        let t = txn(vec![rc(
            Op::Update,
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("page", Some("4")),
            ])),
            None,
            &["body"],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        let c = &routed.per_owner[0].changes[0];
        assert_eq!(c.unchanged, vec!["body".to_string()]);
        assert_eq!(json_of(c), json!({"id": "1", "owner_id": A, "page": 4}));
    }

    #[test]
    fn owner_change_is_delete_for_old_and_insert_for_new() {
        let t = txn(vec![rc(
            Op::Update,
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(B)),
                ("body", Some("x")),
                ("page", None),
            ])),
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("body", Some("x")),
                ("page", None),
            ])),
            &[],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        let ops: Vec<(String, Op)> = routed
            .per_owner
            .iter()
            .map(|u| (u.owner.to_string(), u.changes[0].op))
            .collect();
        assert_eq!(
            ops,
            vec![(A.to_string(), Op::Delete), (B.to_string(), Op::Insert)]
        );
    }

    #[test]
    fn a_changed_id_is_a_delete_of_the_old_row_and_an_insert_of_the_new() {
        let t = txn(vec![rc(
            Op::Update,
            Some(row(&[
                ("id", Some("2")),
                ("owner_id", Some(A)),
                ("body", Some("x")),
            ])),
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("body", Some("x")),
            ])),
            &[],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        assert_eq!(routed.per_owner.len(), 1);
        let changes: Vec<(Op, String)> = routed.per_owner[0]
            .changes
            .iter()
            .map(|c| (c.op, c.row_json.to_string()))
            .collect();
        assert_eq!(changes.len(), 2, "{changes:?}");
        assert_eq!(changes[0].0, Op::Delete);
        assert!(changes[0].1.contains(r#""id":"1""#), "{changes:?}");
        assert_eq!(changes[1].0, Op::Insert);
        assert!(changes[1].1.contains(r#""id":"2""#), "{changes:?}");
        // An update that keeps the id stays one update.
        let t = txn(vec![rc(
            Op::Update,
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("body", Some("y")),
            ])),
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("body", Some("x")),
            ])),
            &[],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        let ops: Vec<Op> = routed.per_owner[0].changes.iter().map(|c| c.op).collect();
        assert_eq!(ops, [Op::Update]);
    }

    #[test]
    fn rows_without_owner_and_unsynced_tables_are_not_routed() {
        let t = txn(vec![rc(
            Op::Insert,
            Some(row(&[("id", Some("1")), ("owner_id", None)])),
            None,
            &[],
        )]);
        let routed = route(t, 7, &relations(), |_| true);
        assert!(routed.per_owner.is_empty());
        assert_eq!(routed.unroutable, 1);
        let t = txn(vec![rc(
            Op::Insert,
            Some(row(&[("id", Some("1")), ("owner_id", Some(A))])),
            None,
            &[],
        )]);
        assert!(route(t, 7, &relations(), |_| false).per_owner.is_empty());
    }

    #[test]
    fn filters_turn_moves_into_inserts_and_deletes() {
        let page = crate::db::catalog::Column {
            name: "page".into(),
            type_name: "integer".into(),
            type_oid: 23,
            base_type_oid: 23,
            not_null: false,
            generated: false,
            identity_always: false,
        };
        let f = Filter::parse(Some(&json!({"page": 1})), |_| Some(&page)).unwrap();
        let old = |p: &str| {
            row(&[
                ("id", Some("1")),
                ("owner_id", Some(A)),
                ("body", Some("b")),
                ("page", Some(p)),
            ])
            .clone()
        };
        let upd = |from: &str, to: &str| {
            let t = txn(vec![rc(Op::Update, Some(old(to)), Some(old(from)), &[])]);
            route(t, 7, &relations(), |_| true)
                .per_owner
                .remove(0)
                .changes
                .remove(0)
        };
        assert_eq!(upd("1", "1").for_filter(&f), Some(Op::Update));
        assert_eq!(upd("1", "2").for_filter(&f), Some(Op::Delete));
        assert_eq!(upd("2", "1").for_filter(&f), Some(Op::Insert));
        assert_eq!(upd("2", "3").for_filter(&f), None);
    }

    #[test]
    fn widening_picks_the_nearest_epoch() {
        assert_eq!(widen_xid(5, 10), 5);
        assert_eq!(widen_xid(5, (1 << 32) + 10), (1 << 32) + 5);
        assert_eq!(widen_xid(u32::MAX - 1, (1 << 32) + 10), (1 << 32) - 2);
        assert_eq!(widen_xid(3, (1 << 32) - 5), (1 << 32) + 3);
    }
}
