//! Row changes: an Insert, Update or Delete message plus the table's last Relation message gives a
//! [`RowChange`] with named, text-decoded columns.
//!
//! pgoutput tuples are positional; only the Relation message says what each position means. It is
//! re-sent after every `ALTER TABLE` and on every new connection, so the [`RelationCache`] replaces
//! an entry whole and a tuple whose width disagrees with the cached relation is an error rather than
//! a guess.
//!
//! Two kinds of "no value" are kept apart from SQL NULL, because confusing them corrupts clients:
//! - unchanged TOAST (`'u'`): the column kept its old, large value; it is listed in
//!   [`RowChange::unchanged`] and absent from the row, never turned into null;
//! - columns outside the replica identity in an old *key* tuple (`'K'`): Postgres sends them as
//!   null although they are merely unknown, so the old row keeps only the key columns.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::{ColumnValue, PgOutputMessage, RelationBody, TupleData};

/// Why a row change cannot be decoded against the relation cache. Fatal for the stream position:
/// restart replication (which re-sends Relation messages) rather than skip the change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChangeError {
    /// A change names a table no Relation message has described.
    #[error("change for relation OID {oid} arrived before its Relation message")]
    UnknownRelation {
        /// The relation OID in the change.
        oid: u32,
    },
    /// A tuple's column count differs from the cached Relation's.
    #[error(
        "tuple for {schema}.{table} (OID {oid}) has {found} columns, the Relation message has {expected}"
    )]
    ColumnCountMismatch {
        /// The relation OID.
        oid: u32,
        /// Schema of the table.
        schema: String,
        /// Name of the table.
        table: String,
        /// Columns in the cached Relation.
        expected: usize,
        /// Columns in the tuple.
        found: usize,
    },
    /// A text value is not UTF-8 (the database encoding must be UTF8).
    #[error("value of {schema}.{table}.{column} is not valid UTF-8")]
    InvalidUtf8 {
        /// Schema of the table.
        schema: String,
        /// Name of the table.
        table: String,
        /// Column name.
        column: String,
    },
    /// A binary-format value: the slot was read with `binary 'true'`, which this decoder does not use.
    #[error(
        "value of {schema}.{table}.{column} is in binary format; read the slot without the binary option"
    )]
    BinaryValue {
        /// Schema of the table.
        schema: String,
        /// Name of the table.
        table: String,
        /// Column name.
        column: String,
    },
}

/// A table as last described by a Relation message.
#[derive(Debug, Clone)]
struct CachedRelation {
    body: Arc<RelationBody>,
    /// `pg_catalog` where the wire sends an empty namespace.
    schema: String,
    /// Column names shared by every decoded row instead of copied into each.
    names: Vec<Arc<str>>,
}

/// The last Relation message per relation OID.
#[derive(Debug, Clone, Default)]
pub struct RelationCache {
    relations: HashMap<u32, CachedRelation>,
}

impl RelationCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Stores a Relation message, replacing whatever was known about that OID.
    pub fn insert(&mut self, body: RelationBody) {
        let schema = if body.namespace.is_empty() {
            "pg_catalog".to_owned()
        } else {
            body.namespace.clone()
        };
        let names = body
            .columns
            .iter()
            .map(|c| Arc::<str>::from(c.name.as_str()))
            .collect();
        self.relations.insert(
            body.oid,
            CachedRelation {
                body: Arc::new(body),
                schema,
                names,
            },
        );
    }

    /// The last Relation message for `oid`.
    pub fn get(&self, oid: u32) -> Option<&RelationBody> {
        self.relations.get(&oid).map(|r| &*r.body)
    }

    /// `(schema, table)` of `oid`, with `pg_catalog` for the wire's empty namespace.
    pub fn table_name(&self, oid: u32) -> Option<(&str, &str)> {
        self.relations
            .get(&oid)
            .map(|r| (r.schema.as_str(), r.body.name.as_str()))
    }

    /// Number of cached relations.
    pub fn len(&self) -> usize {
        self.relations.len()
    }

    /// Whether no relation is cached.
    pub fn is_empty(&self) -> bool {
        self.relations.is_empty()
    }

    /// Forgets every relation (a new connection re-sends them).
    pub fn clear(&mut self) {
        self.relations.clear();
    }

    /// Decodes an Insert, Update or Delete; `Ok(None)` for every other message.
    pub fn decode(&self, msg: &PgOutputMessage) -> Result<Option<RowChange>, ChangeError> {
        let (oid, op, new, old, key) = match msg {
            PgOutputMessage::Insert { relation_oid, new } => {
                (*relation_oid, Op::Insert, Some(new), None, None)
            }
            PgOutputMessage::Update {
                relation_oid,
                old,
                key,
                new,
            } => (
                *relation_oid,
                Op::Update,
                Some(new),
                old.as_ref(),
                key.as_ref(),
            ),
            PgOutputMessage::Delete {
                relation_oid,
                old,
                key,
            } => (*relation_oid, Op::Delete, None, old.as_ref(), key.as_ref()),
            _ => return Ok(None),
        };
        let rel = self
            .relations
            .get(&oid)
            .ok_or(ChangeError::UnknownRelation { oid })?;

        let mut unchanged = Vec::new();
        let new = new
            .map(|tuple| rel.row(tuple, TupleKind::Full, &mut unchanged))
            .transpose()?;
        // Unchanged TOAST in an old tuple says nothing about the new row; drop it there.
        let mut ignored = Vec::new();
        let old = match (old, key) {
            (Some(old), _) => Some(rel.row(old, TupleKind::Full, &mut ignored)?),
            (None, Some(key)) => Some(rel.row(key, TupleKind::Key, &mut ignored)?),
            (None, None) => None,
        };
        Ok(Some(RowChange {
            relation_oid: oid,
            schema: rel.schema.clone(),
            table: rel.body.name.clone(),
            op,
            new,
            old,
            unchanged,
        }))
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum TupleKind {
    /// Every column is meaningful.
    Full,
    /// Only replica-identity columns are meaningful; the rest are placeholders.
    Key,
}

impl CachedRelation {
    fn row(
        &self,
        tuple: &TupleData,
        kind: TupleKind,
        unchanged: &mut Vec<String>,
    ) -> Result<Row, ChangeError> {
        let values = &tuple.0;
        if values.len() != self.names.len() {
            return Err(ChangeError::ColumnCountMismatch {
                oid: self.body.oid,
                schema: self.schema.clone(),
                table: self.body.name.clone(),
                expected: self.names.len(),
                found: values.len(),
            });
        }
        let mut columns = Vec::with_capacity(values.len());
        for ((value, name), def) in values.iter().zip(&self.names).zip(&self.body.columns) {
            if kind == TupleKind::Key && !def.is_key() {
                continue;
            }
            let text = match value {
                ColumnValue::Null => None,
                ColumnValue::UnchangedToast => {
                    unchanged.push(name.to_string());
                    continue;
                }
                ColumnValue::Text(bytes) => match std::str::from_utf8(bytes) {
                    Ok(s) => Some(s.to_owned()),
                    Err(_) => return Err(self.column_error(name, false)),
                },
                ColumnValue::Binary(_) => return Err(self.column_error(name, true)),
            };
            columns.push((Arc::clone(name), text));
        }
        Ok(Row { columns })
    }

    fn column_error(&self, column: &str, binary: bool) -> ChangeError {
        let (schema, table, column) = (
            self.schema.clone(),
            self.body.name.clone(),
            column.to_owned(),
        );
        if binary {
            ChangeError::BinaryValue {
                schema,
                table,
                column,
            }
        } else {
            ChangeError::InvalidUtf8 {
                schema,
                table,
                column,
            }
        }
    }
}

/// What happened to a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `INSERT`.
    Insert,
    /// `UPDATE`.
    Update,
    /// `DELETE`.
    Delete,
}

/// Column values of one row in table order, as Postgres' text output; `None` is SQL NULL.
///
/// Columns the stream did not send (unchanged TOAST, non-key columns of an old key) are absent,
/// so [`Row::get`] tells "absent" (`None`) from "null" (`Some(None)`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    columns: Vec<(Arc<str>, Option<String>)>,
}

impl Row {
    /// `None` if the column is absent, `Some(None)` if it is null.
    pub fn get(&self, name: &str) -> Option<Option<&str>> {
        self.columns
            .iter()
            .find(|(n, _)| &**n == name)
            .map(|(_, v)| v.as_deref())
    }

    /// The `index`-th column present, `(name, value)`; columns are in table order.
    pub fn at(&self, index: usize) -> Option<(&str, Option<&str>)> {
        self.columns.get(index).map(|(n, v)| (&**n, v.as_deref()))
    }

    /// Whether the row holds a value (possibly null) for `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.columns.iter().any(|(n, _)| &**n == name)
    }

    /// `(name, value)` pairs in table order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.columns.iter().map(|(n, v)| (&**n, v.as_deref()))
    }

    /// Number of columns present.
    pub fn len(&self) -> usize {
        self.columns.len()
    }

    /// Whether no column is present.
    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    /// Memory this row holds: its values plus a slot (name pointer and value header) per column.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self
                .columns
                .iter()
                .map(|(_, v)| {
                    std::mem::size_of::<(Arc<str>, Option<String>)>()
                        + v.as_ref().map_or(0, String::len)
                })
                .sum::<usize>()
    }
}

impl<'a> FromIterator<(&'a str, Option<&'a str>)> for Row {
    fn from_iter<I: IntoIterator<Item = (&'a str, Option<&'a str>)>>(iter: I) -> Self {
        Row {
            columns: iter
                .into_iter()
                .map(|(n, v)| (Arc::from(n), v.map(str::to_owned)))
                .collect(),
        }
    }
}

/// One decoded row change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowChange {
    /// OID of the table.
    pub relation_oid: u32,
    /// Schema of the table (`pg_catalog` where the wire sends an empty namespace).
    pub schema: String,
    /// Name of the table.
    pub table: String,
    /// Insert, update or delete.
    pub op: Op,
    /// The new row (insert, update); unchanged-TOAST columns are absent from it.
    pub new: Option<Row>,
    /// The old full row ('O') or old key columns only ('K'), when Postgres sent one.
    pub old: Option<Row>,
    /// Columns of `new` that kept their previous out-of-line value and were not sent.
    pub unchanged: Vec<String>,
}

impl RowChange {
    /// The value of `name` from the new row, else from the old one; `None` if null or unknown.
    pub fn column(&self, name: &str) -> Option<&str> {
        match self.new.as_ref().and_then(|r| r.get(name)) {
            Some(value) => value,
            None => self.old_column(name),
        }
    }

    /// The value of `name` in the old row; `None` if null, not sent, or no old row.
    pub fn old_column(&self, name: &str) -> Option<&str> {
        self.old.as_ref().and_then(|r| r.get(name)).flatten()
    }

    /// Whether `name` kept its previous out-of-line value and was not sent.
    pub fn is_unchanged(&self, name: &str) -> bool {
        self.unchanged.iter().any(|c| c == name)
    }

    /// Memory this change holds (its rows, names and lists), for size limits.
    pub fn approx_bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + self.schema.len()
            + self.table.len()
            + self.new.as_ref().map_or(0, Row::approx_bytes)
            + self.old.as_ref().map_or(0, Row::approx_bytes)
            + self.unchanged.iter().map(|c| c.len() + 24).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::protocol::ColumnDef;

    fn col(flags: u8, name: &str) -> ColumnDef {
        ColumnDef {
            flags,
            name: name.into(),
            type_oid: 25,
            type_modifier: -1,
        }
    }

    fn items(columns: Vec<ColumnDef>) -> RelationBody {
        RelationBody {
            oid: 16390,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: b'd',
            columns,
        }
    }

    fn cache() -> RelationCache {
        let mut cache = RelationCache::new();
        cache.insert(items(vec![
            col(1, "id"),
            col(0, "owner_id"),
            col(0, "body"),
        ]));
        cache
    }

    fn t(v: &str) -> ColumnValue {
        ColumnValue::Text(Bytes::copy_from_slice(v.as_bytes()))
    }

    fn row(pairs: &[(&str, Option<&str>)]) -> Row {
        pairs.iter().copied().collect()
    }

    #[test]
    fn insert_keeps_nulls_and_order() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![t("1"), ColumnValue::Null, t("")]),
        };
        let change = cache().decode(&msg).unwrap().unwrap();
        assert_eq!(
            change,
            RowChange {
                relation_oid: 16390,
                schema: "public".into(),
                table: "items".into(),
                op: Op::Insert,
                new: Some(row(&[
                    ("id", Some("1")),
                    ("owner_id", None),
                    ("body", Some(""))
                ])),
                old: None,
                unchanged: vec![],
            }
        );
        assert_eq!(change.column("id"), Some("1"));
        assert_eq!(change.column("owner_id"), None);
        assert_eq!(change.new.as_ref().unwrap().get("owner_id"), Some(None));
        assert_eq!(change.new.as_ref().unwrap().get("nope"), None);
        let names: Vec<_> = change
            .new
            .as_ref()
            .unwrap()
            .iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, ["id", "owner_id", "body"]);
    }

    #[test]
    fn unchanged_toast_is_listed_never_null() {
        let msg = PgOutputMessage::Update {
            relation_oid: 16390,
            old: None,
            key: None,
            new: TupleData(vec![t("1"), t("o"), ColumnValue::UnchangedToast]),
        };
        let change = cache().decode(&msg).unwrap().unwrap();
        assert_eq!(change.op, Op::Update);
        assert_eq!(change.unchanged, vec!["body".to_owned()]);
        assert!(change.is_unchanged("body"));
        let new = change.new.as_ref().unwrap();
        assert!(!new.contains("body"));
        assert_eq!(new.get("body"), None);
        assert_eq!(new.len(), 2);
        assert_eq!(change.old, None);
    }

    #[test]
    fn key_update_keeps_only_key_columns_of_old() {
        // Postgres sends non-key columns of a 'K' tuple as null: they are unknown, not null.
        let msg = PgOutputMessage::Update {
            relation_oid: 16390,
            old: None,
            key: Some(TupleData(vec![
                t("1"),
                ColumnValue::Null,
                ColumnValue::Null,
            ])),
            new: TupleData(vec![t("2"), t("o"), ColumnValue::UnchangedToast]),
        };
        let change = cache().decode(&msg).unwrap().unwrap();
        assert_eq!(change.old, Some(row(&[("id", Some("1"))])));
        assert_eq!(change.old_column("id"), Some("1"));
        assert_eq!(change.column("id"), Some("2"));
        assert_eq!(change.old.as_ref().unwrap().get("owner_id"), None);
        assert_eq!(change.unchanged, vec!["body".to_owned()]);
    }

    #[test]
    fn full_old_update_keeps_every_old_column() {
        let msg = PgOutputMessage::Update {
            relation_oid: 16390,
            old: Some(TupleData(vec![t("1"), ColumnValue::Null, t("b")])),
            key: None,
            new: TupleData(vec![t("1"), t("o"), t("b")]),
        };
        let change = cache().decode(&msg).unwrap().unwrap();
        assert_eq!(
            change.old,
            Some(row(&[
                ("id", Some("1")),
                ("owner_id", None),
                ("body", Some("b"))
            ]))
        );
        assert_eq!(change.old_column("owner_id"), None);
        assert_eq!(change.column("owner_id"), Some("o"));
    }

    #[test]
    fn column_falls_back_to_old_only_when_new_lacks_it() {
        let msg = PgOutputMessage::Update {
            relation_oid: 16390,
            old: Some(TupleData(vec![t("1"), t("o"), t("big")])),
            key: None,
            new: TupleData(vec![t("1"), ColumnValue::Null, ColumnValue::UnchangedToast]),
        };
        let change = cache().decode(&msg).unwrap().unwrap();
        // Null in the new row is the answer; unchanged TOAST falls back to the old value.
        assert_eq!(change.column("owner_id"), None);
        assert_eq!(change.column("body"), Some("big"));
        assert!(change.unchanged.contains(&"body".to_owned()));
    }

    #[test]
    fn delete_by_key_and_by_full_old() {
        let by_key = PgOutputMessage::Delete {
            relation_oid: 16390,
            old: None,
            key: Some(TupleData(vec![
                t("1"),
                ColumnValue::Null,
                ColumnValue::Null,
            ])),
        };
        let change = cache().decode(&by_key).unwrap().unwrap();
        assert_eq!(change.op, Op::Delete);
        assert_eq!(change.new, None);
        assert_eq!(change.old, Some(row(&[("id", Some("1"))])));
        assert_eq!(change.column("id"), Some("1"));
        assert!(change.unchanged.is_empty());

        let by_old = PgOutputMessage::Delete {
            relation_oid: 16390,
            old: Some(TupleData(vec![t("1"), t("o"), ColumnValue::UnchangedToast])),
            key: None,
        };
        let change = cache().decode(&by_old).unwrap().unwrap();
        assert_eq!(
            change.old,
            Some(row(&[("id", Some("1")), ("owner_id", Some("o"))]))
        );
        // 'unchanged' describes the new row only.
        assert!(change.unchanged.is_empty());
    }

    #[test]
    fn unknown_relation_is_an_error() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 1,
            new: TupleData(vec![]),
        };
        assert_eq!(
            cache().decode(&msg),
            Err(ChangeError::UnknownRelation { oid: 1 })
        );
    }

    #[test]
    fn column_count_mismatch_is_an_error() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![t("1"), t("o")]),
        };
        assert_eq!(
            cache().decode(&msg),
            Err(ChangeError::ColumnCountMismatch {
                oid: 16390,
                schema: "public".into(),
                table: "items".into(),
                expected: 3,
                found: 2
            })
        );
        // The old tuple is checked too.
        let msg = PgOutputMessage::Delete {
            relation_oid: 16390,
            old: None,
            key: Some(TupleData(vec![t("1")])),
        };
        assert!(matches!(
            cache().decode(&msg),
            Err(ChangeError::ColumnCountMismatch { found: 1, .. })
        ));
    }

    #[test]
    fn relation_replaced_after_alter_table() {
        let mut cache = cache();
        let three = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![t("1"), t("o"), t("b")]),
        };
        let four = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![t("1"), t("o"), t("b"), t("x")]),
        };
        assert!(cache.decode(&three).is_ok());
        assert!(cache.decode(&four).is_err());

        // ALTER TABLE items ADD COLUMN extra, and the key moved to (id, owner_id): the new
        // Relation message replaces the entry, flags included, rather than merging.
        cache.insert(items(vec![
            col(1, "id"),
            col(1, "owner_id"),
            col(0, "body"),
            col(0, "extra"),
        ]));
        assert_eq!(cache.len(), 1);
        assert_eq!(cache.get(16390).unwrap().columns.len(), 4);
        let change = cache.decode(&four).unwrap().unwrap();
        assert_eq!(change.column("extra"), Some("x"));
        assert!(matches!(
            cache.decode(&three),
            Err(ChangeError::ColumnCountMismatch {
                expected: 4,
                found: 3,
                ..
            })
        ));
        let delete = PgOutputMessage::Delete {
            relation_oid: 16390,
            old: None,
            key: Some(TupleData(vec![
                t("1"),
                t("o"),
                ColumnValue::Null,
                ColumnValue::Null,
            ])),
        };
        let change = cache.decode(&delete).unwrap().unwrap();
        assert_eq!(
            change.old,
            Some(row(&[("id", Some("1")), ("owner_id", Some("o"))]))
        );

        // A rename replaces names too.
        let mut renamed = items(vec![
            col(1, "id"),
            col(0, "owner"),
            col(0, "body"),
            col(0, "extra"),
        ]);
        renamed.name = "things".into();
        cache.insert(renamed);
        let change = cache.decode(&four).unwrap().unwrap();
        assert_eq!(change.table, "things");
        assert_eq!(change.column("owner"), Some("o"));
        assert_eq!(change.column("owner_id"), None);
    }

    #[test]
    fn empty_namespace_is_pg_catalog() {
        let mut cache = RelationCache::new();
        cache.insert(RelationBody {
            oid: 7,
            namespace: String::new(),
            name: "t".into(),
            replica_identity: b'd',
            columns: vec![],
        });
        assert_eq!(cache.table_name(7), Some(("pg_catalog", "t")));
        assert_eq!(cache.get(7).unwrap().namespace, "");
    }

    #[test]
    fn non_utf8_and_binary_values_are_errors() {
        let msg = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![
                t("1"),
                ColumnValue::Text(Bytes::from_static(&[0xE9])),
                t(""),
            ]),
        };
        assert!(matches!(
            cache().decode(&msg),
            Err(ChangeError::InvalidUtf8 { column, .. }) if column == "owner_id"
        ));
        let msg = PgOutputMessage::Insert {
            relation_oid: 16390,
            new: TupleData(vec![
                ColumnValue::Binary(Bytes::from_static(&[1])),
                t(""),
                t(""),
            ]),
        };
        assert!(matches!(
            cache().decode(&msg),
            Err(ChangeError::BinaryValue { column, .. }) if column == "id"
        ));
    }

    #[test]
    fn other_messages_are_not_row_changes() {
        let msg = PgOutputMessage::Truncate {
            options: 0,
            relation_oids: vec![16390],
        };
        assert_eq!(cache().decode(&msg), Ok(None));
    }
}
