//! Pure: the Electric HTTP shape API's wire format (docs/electric.md), as `@electric-sql/client` 1.5 reads it.
//!
//! - Offsets are `<stream position as decimal>_0`; the slot generation lives in the handle (handle.rs).
//! - Values are Postgres's text output as JSON strings (`"2017"`, `"t"`, jsonb as its JSON text, arrays as array
//!   literals), or `null`: the client parses them by the `electric-schema` types. Not the WebSocket protocol's
//!   JSON-typed values.
//! - Messages: `{"key", "value", "headers": {"operation", "relation", "txids"?, "lsn"?, "op_position"?}}` and
//!   `{"headers": {"control": "up-to-date" | "must-refetch"}}`.
//! - Any `lsn` is a decimal string (the client calls `BigInt` on it); `txids` holds the 32-bit xid, so the echo
//!   of a `/v1/batch` write matches its `txid` taken modulo 2^32.

use std::io::Write as _;

use deeprecall_replication::Op;

use super::convert::write_json_str;
use super::filter::Filter;
use super::routing::{Change, UserTxn};

/// `<lsn>_0`.
pub fn format_offset(lsn: u64) -> String {
    format!("{lsn}_0")
}

/// The stream position of an offset this server issues (`<digits>_0`), or `None`.
pub fn parse_offset(s: &str) -> Option<u64> {
    let (lsn, n) = s.split_once('_')?;
    if n != "0" || lsn.is_empty() || !lsn.bytes().all(|c| c.is_ascii_digit()) {
        return None;
    }
    lsn.parse().ok()
}

/// One column of a shape: what the schema header says about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeColumn {
    /// Column name.
    pub name: String,
    /// Type OID (how its text output is produced).
    pub type_oid: u32,
    /// Type name for the client's parser: the element type's `typname` for arrays (`text[]` is `text`).
    pub typname: String,
    /// Array dimensions (0: not an array).
    pub dims: i32,
    /// `not null` constraint.
    pub not_null: bool,
    /// Position in the primary key.
    pub pk_index: Option<usize>,
}

/// The `electric-schema` header: `{"col": {"type", "dims"?, "not_null"?, "pk_index"?}}`, ASCII only.
pub fn schema_header(columns: &[ShapeColumn]) -> String {
    let mut map = serde_json::Map::new();
    for c in columns {
        let mut info = serde_json::Map::new();
        info.insert("type".into(), c.typname.clone().into());
        if c.dims > 0 {
            info.insert("dims".into(), c.dims.into());
        }
        // Not on arrays: the client applies it to every element too, and a NULL element would throw.
        if c.not_null && c.dims == 0 {
            info.insert("not_null".into(), true.into());
        }
        if let Some(i) = c.pk_index {
            info.insert("pk_index".into(), i.into());
        }
        map.insert(c.name.clone(), info.into());
    }
    ascii_json(&serde_json::Value::Object(map).to_string())
}

/// Escapes every non-ASCII character of a JSON text as `\uXXXX` (header values are ASCII).
fn ascii_json(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    for ch in json.chars() {
        if ch.is_ascii() {
            out.push(ch);
        } else {
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

/// Renders one shape's rows and changes as Electric messages.
#[derive(Debug, Clone)]
pub struct ShapeEncoder {
    /// `["schema","table"]`, ready to append.
    relation: Vec<u8>,
    /// `"schema"."table"` prefix of every key.
    key_prefix: String,
    table: String,
    columns: Vec<ShapeColumn>,
    /// Indexes into `columns`, in primary-key order.
    pk: Vec<usize>,
    replica_full: bool,
    /// Scratch buffer for keys (no allocation per row).
    key: String,
}

impl ShapeEncoder {
    /// An encoder for `schema.table` sending `columns` (which include the whole primary key).
    pub fn new(schema: &str, table: &str, columns: Vec<ShapeColumn>, replica_full: bool) -> Self {
        let mut relation = Vec::new();
        relation.push(b'[');
        write_json_str(&mut relation, schema);
        relation.push(b',');
        write_json_str(&mut relation, table);
        relation.push(b']');
        let mut pk: Vec<(usize, usize)> = columns
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.pk_index.map(|p| (p, i)))
            .collect();
        pk.sort_unstable();
        Self {
            relation,
            key_prefix: format!(
                "\"{}\".\"{}\"",
                schema.replace('"', "\"\""),
                table.replace('"', "\"\"")
            ),
            table: table.to_owned(),
            columns,
            pk: pk.into_iter().map(|(_, i)| i).collect(),
            replica_full,
            key: String::new(),
        }
    }

    /// The columns sent.
    pub fn columns(&self) -> &[ShapeColumn] {
        &self.columns
    }

    /// `"public"."works"/"<pk 1>"/"<pk 2>"`: `/` inside values doubled, so keys of different rows never collide.
    fn build_key<'a>(&mut self, value: impl Fn(usize) -> Option<&'a str>) {
        self.key.clear();
        self.key.push_str(&self.key_prefix);
        for &i in &self.pk {
            self.key.push_str("/\"");
            match value(i) {
                Some(v) => self.key.push_str(&v.replace('/', "//")),
                None => self.key.push('_'),
            }
            self.key.push('"');
        }
    }

    /// Appends a snapshot row as an insert; `value(i)` is the text of `columns[i]`.
    pub fn write_snapshot_row<'a>(
        &mut self,
        out: &mut Vec<u8>,
        value: impl Fn(usize) -> Option<&'a str>,
    ) {
        self.build_key(&value);
        out.extend_from_slice(b"{\"key\":");
        write_json_str(out, &self.key);
        out.extend_from_slice(b",\"value\":{");
        for (i, c) in self.columns.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            write_json_str(out, &c.name);
            out.push(b':');
            write_text(out, value(i));
        }
        out.extend_from_slice(b"},\"headers\":{\"operation\":\"insert\",\"relation\":");
        out.extend_from_slice(&self.relation);
        out.extend_from_slice(b"}}");
    }

    /// Appends the messages of `txn` this shape receives (filter moves become inserts and deletes), each preceded
    /// by `sep` when `first` is false; returns how many.
    pub fn write_txn(
        &mut self,
        out: &mut Vec<u8>,
        txn: &UserTxn,
        filter: &Filter,
        first: &mut bool,
    ) -> usize {
        let mut n = 0;
        for (position, change) in txn.changes.iter().enumerate() {
            if *change.table != *self.table {
                continue;
            }
            let Some(op) = change.for_filter(filter) else {
                continue;
            };
            if !*first {
                out.push(b',');
            }
            *first = false;
            self.write_change(out, txn, change, op, position);
            n += 1;
        }
        n
    }

    /// The messages of `txn` for this shape, one buffer each (for server-sent events).
    pub fn txn_messages(&mut self, txn: &UserTxn, filter: &Filter) -> Vec<Vec<u8>> {
        let mut messages = Vec::new();
        for (position, change) in txn.changes.iter().enumerate() {
            if *change.table != *self.table {
                continue;
            }
            if let Some(op) = change.for_filter(filter) {
                let mut out = Vec::with_capacity(256);
                self.write_change(&mut out, txn, change, op, position);
                messages.push(out);
            }
        }
        messages
    }

    fn write_change(
        &mut self,
        out: &mut Vec<u8>,
        txn: &UserTxn,
        change: &Change,
        op: Op,
        position: usize,
    ) {
        // The row the message describes: the new one, except for deletes (the old one when carried).
        let old_image = op == Op::Delete && change.old.is_some();
        let image = |name: &str| -> Option<Option<&str>> {
            if old_image {
                change.old_value(name)
            } else {
                change.new_value(name)
            }
        };
        let columns = std::mem::take(&mut self.columns);
        self.build_key(|i| columns.get(i).and_then(|c| image(&c.name)).flatten());
        out.extend_from_slice(b"{\"key\":");
        write_json_str(out, &self.key);
        out.extend_from_slice(b",\"value\":{");
        let mut first = true;
        for c in &columns {
            // A column the change does not carry (an unchanged out-of-line value without full replica
            // identity) is left out: the client keeps what it has.
            let Some(v) = image(&c.name) else { continue };
            if !first {
                out.push(b',');
            }
            first = false;
            write_json_str(out, &c.name);
            out.push(b':');
            write_text(out, v);
        }
        out.push(b'}');
        if self.replica_full && op == Op::Update && change.old.is_some() {
            out.extend_from_slice(b",\"old_value\":{");
            let mut first = true;
            for c in &columns {
                let (Some(old), Some(new)) = (change.old_value(&c.name), change.new_value(&c.name))
                else {
                    continue;
                };
                if old == new {
                    continue;
                }
                if !first {
                    out.push(b',');
                }
                first = false;
                write_json_str(out, &c.name);
                out.push(b':');
                write_text(out, old);
            }
            out.push(b'}');
        }
        self.columns = columns;
        out.extend_from_slice(match op {
            Op::Insert => b",\"headers\":{\"operation\":\"insert\",\"relation\":".as_slice(),
            Op::Update => b",\"headers\":{\"operation\":\"update\",\"relation\":".as_slice(),
            Op::Delete => b",\"headers\":{\"operation\":\"delete\",\"relation\":".as_slice(),
        });
        out.extend_from_slice(&self.relation);
        // The 32-bit xid, as Electric sends it: `/v1/batch`'s 64-bit `txid` modulo 2^32.
        let _ = write!(
            out,
            ",\"txids\":[{}],\"lsn\":\"{}\",\"op_position\":{position}}}}}",
            txn.xid & 0xFFFF_FFFF,
            txn.commit_lsn.0
        );
    }
}

/// Appends a value: its text as a JSON string, or `null`.
fn write_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        Some(t) => write_json_str(out, t),
        None => out.extend_from_slice(b"null"),
    }
}

/// `{"headers":{"control":"up-to-date","global_last_seen_lsn":"<lsn>"}}`.
pub fn write_up_to_date(out: &mut Vec<u8>, lsn: u64) {
    let _ = write!(
        out,
        "{{\"headers\":{{\"control\":\"up-to-date\",\"global_last_seen_lsn\":\"{lsn}\"}}}}"
    );
}

/// The body of a 409: `[{"headers":{"control":"must-refetch","reason":…}}]`.
pub fn must_refetch_body(reason: &str) -> String {
    serde_json::json!([{"headers": {"control": "must-refetch", "reason": reason}}]).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::catalog::Column;
    use deeprecall_replication::{Lsn, Row};
    use serde_json::{Value, json};

    fn columns() -> Vec<ShapeColumn> {
        let c = |name: &str, oid, typname: &str, dims, not_null, pk| ShapeColumn {
            name: name.into(),
            type_oid: oid,
            typname: typname.into(),
            dims,
            not_null,
            pk_index: pk,
        };
        vec![
            c("id", 2950, "uuid", 0, true, Some(1)),
            c("owner_id", 2950, "uuid", 0, true, Some(0)),
            c("title", 25, "text", 0, true, None),
            c("year", 23, "int4", 0, false, None),
            c("tags", 1009, "text", 1, true, None),
            c("favorite", 16, "bool", 0, true, None),
        ]
    }

    #[test]
    fn offsets() {
        assert_eq!(format_offset(27_568_424), "27568424_0");
        assert_eq!(parse_offset("27568424_0"), Some(27_568_424));
        for bad in [
            "-1",
            "0/1A_0",
            "12_1",
            "12_inf",
            "_0",
            "12",
            "1-0000000001a0a7c0",
            "x_0",
        ] {
            assert_eq!(parse_offset(bad), None, "{bad}");
        }
    }

    #[test]
    fn schema() {
        let v: Value = serde_json::from_str(&schema_header(&columns())).unwrap();
        assert_eq!(
            v["id"],
            json!({"type": "uuid", "not_null": true, "pk_index": 1})
        );
        assert_eq!(v["year"], json!({"type": "int4"}));
        assert_eq!(
            v["tags"],
            json!({"type": "text", "dims": 1}),
            "no not_null on arrays"
        );
        assert_eq!(v["favorite"], json!({"type": "bool", "not_null": true}));
        let odd = vec![ShapeColumn {
            name: "größe".into(),
            type_oid: 25,
            typname: "text".into(),
            dims: 0,
            not_null: false,
            pk_index: None,
        }];
        let h = schema_header(&odd);
        assert!(h.is_ascii(), "{h}");
        let v: Value = serde_json::from_str(&h).unwrap();
        assert!(v.get("größe").is_some());
    }

    #[test]
    fn snapshot_rows_are_text() {
        let mut e = ShapeEncoder::new("public", "works", columns(), false);
        let values = ["a/b", "o", "T", "2017", "{nlp,\"x y\"}", "t"];
        let mut out = Vec::new();
        e.write_snapshot_row(&mut out, |i| if i == 3 { None } else { Some(values[i]) });
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["key"], "\"public\".\"works\"/\"o\"/\"a//b\"");
        assert_eq!(
            v["value"],
            json!({"id": "a/b", "owner_id": "o", "title": "T", "year": null, "tags": "{nlp,\"x y\"}", "favorite": "t"})
        );
        assert_eq!(
            v["headers"],
            json!({"operation": "insert", "relation": ["public", "works"]})
        );
    }

    fn change(
        op: Op,
        new: Option<&[(&str, Option<&str>)]>,
        old: Option<&[(&str, Option<&str>)]>,
    ) -> Change {
        let row = |pairs: &[(&str, Option<&str>)]| -> Row { pairs.iter().copied().collect() };
        Change {
            table: "works".into(),
            op,
            new: new.map(row),
            old: old.map(row),
            unchanged: vec![],
            row_json: "{}".into(),
        }
    }

    #[test]
    fn changes_moves_and_full_replica() {
        let old = [
            ("id", Some("1")),
            ("owner_id", Some("o")),
            ("title", Some("old")),
            ("year", Some("2000")),
            ("tags", Some("{}")),
            ("favorite", Some("f")),
        ];
        let mut new = old;
        new[2].1 = Some("new");
        new[3].1 = Some("2020");
        let txn = UserTxn {
            owner: uuid::Uuid::nil(),
            xid: (5u64 << 32) + 758,
            generation: 1,
            commit_lsn: Lsn(1000),
            end_lsn: Lsn(1008),
            changes: vec![
                change(Op::Update, Some(&new), Some(&old)),
                change(Op::Delete, None, Some(&old)),
            ],
            bytes: 0,
            part: 0,
            last: true,
        };
        let cols: Vec<Column> = vec![Column {
            name: "year".into(),
            type_name: "integer".into(),
            type_oid: 23,
            base_type_oid: 23,
            not_null: false,
            generated: false,
            identity_always: false,
        }];
        let mut e = ShapeEncoder::new("public", "works", columns(), true);
        let mut out = vec![b'['];
        let mut first = true;
        assert_eq!(
            e.write_txn(&mut out, &txn, &Filter::default(), &mut first),
            2
        );
        out.push(b']');
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v[0]["headers"]["operation"], "update");
        assert_eq!(v[0]["headers"]["txids"], json!([758]));
        assert_eq!(v[0]["headers"]["lsn"], "1000");
        assert_eq!(v[0]["value"]["title"], "new");
        assert_eq!(v[0]["old_value"], json!({"title": "old", "year": "2000"}));
        assert_eq!(v[1]["headers"]["operation"], "delete");
        assert_eq!(v[1]["value"]["title"], "old");
        assert_eq!(v[1]["key"], v[0]["key"]);
        // A filter the update leaves: a delete for this shape; one it enters: an insert with the whole row.
        let f = crate::live::where_sql::parse_where("year < 2010", &Default::default(), |n| {
            cols.iter().find(|c| c.name == n)
        })
        .unwrap();
        let mut e = ShapeEncoder::new("public", "works", columns(), false);
        let msgs = e.txn_messages(&txn, &f);
        let ops: Vec<Value> = msgs
            .iter()
            .map(|m| serde_json::from_slice::<Value>(m).unwrap()["headers"]["operation"].clone())
            .collect();
        assert_eq!(ops, vec![json!("delete"), json!("delete")]);
        let v: Value = serde_json::from_slice(&msgs[0]).unwrap();
        assert!(
            v.get("old_value").is_none(),
            "default replica sends no old values"
        );
    }

    #[test]
    fn control_messages() {
        let mut out = Vec::new();
        write_up_to_date(&mut out, 42);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"headers":{"control":"up-to-date","global_last_seen_lsn":"42"}}"#
        );
        let v: Value = serde_json::from_str(&must_refetch_body("truncated")).unwrap();
        assert_eq!(v[0]["headers"]["control"], "must-refetch");
    }
}
