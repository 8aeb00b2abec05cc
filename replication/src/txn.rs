//! Transaction assembly: a fold over pgoutput messages that yields one [`Transaction`] per Commit.
//!
//! With protocol version 1 Postgres sends each transaction whole, at commit, in commit order:
//! `Begin, (Relation | Type | Origin | Insert | Update | Delete | Truncate | Message)*, Commit`.
//! Relation, Type, Origin and non-transactional Messages may also arrive between transactions.
//! Anything else out of place means the stream is not what we think it is, so it is an error and
//! the caller should restart replication from the last acknowledged LSN instead of guessing.
//!
//! Rows are decoded as they arrive, against the relation cache as it is at that point of the
//! stream: a Relation message inside a transaction (sent after `ALTER TABLE`) applies to the
//! changes after it, exactly as Postgres wrote them.
//!
//! **Parts.** A transaction is never held whole in memory beyond [`PartLimit`]: once its decoded
//! changes reach the limit, they are handed out as a part (`last == false`) and the assembler goes
//! on with an empty list. Protocol version 1 sends a transaction only after it committed, so a part
//! is committed data; what a part does not have yet is the end of the commit record (`end_lsn`),
//! which only the last part (at Commit) carries. A small transaction is one part, `part == 0`,
//! `last == true`, as before. Truncations and logical messages always travel in the last part.

use crate::decode::{ChangeError, RelationCache, RowChange};
use crate::protocol::{Lsn, PgOutputMessage};

/// One committed transaction, ready to route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// 32-bit transaction id from Begin.
    pub xid: u32,
    /// LSN of the commit record; orders transactions and deduplicates re-sent ones.
    pub commit_lsn: Lsn,
    /// LSN just past the commit: acknowledge it once the transaction is handed on.
    pub end_lsn: Lsn,
    /// Commit time in microseconds since 2000-01-01 00:00 UTC.
    pub commit_time_micros: i64,
    /// Row changes in the order they happened.
    pub changes: Vec<RowChange>,
    /// `(schema, table)` of every truncated table, once each, in first-truncated order.
    pub truncated: Vec<(String, String)>,
    /// Transactional logical decoding messages (`pg_logical_emit_message(true, prefix, content)`) as
    /// `(prefix, content)`, in order. The server uses them as barriers in the snapshot handoff.
    pub messages: Vec<(String, Vec<u8>)>,
    /// Index of this part of the transaction (0 for the first, or only, part).
    pub part: u32,
    /// Whether this is the transaction's last part (its Commit was seen). Only the last part has the
    /// real `end_lsn`; earlier parts carry `commit_lsn` there, and no truncations or messages.
    pub last: bool,
}

impl Transaction {
    /// Whether the transaction came in more than one part and this is one of them.
    pub fn is_split(&self) -> bool {
        self.part > 0 || !self.last
    }
}

/// When an open transaction's decoded changes are handed out as a part (whichever is reached first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartLimit {
    /// Most changes in one part.
    pub changes: usize,
    /// Most decoded bytes ([`RowChange::approx_bytes`]) in one part.
    pub bytes: usize,
}

impl PartLimit {
    /// No limit: every transaction is one part.
    pub const NONE: Self = Self {
        changes: usize::MAX,
        bytes: usize::MAX,
    };
}

impl Default for PartLimit {
    fn default() -> Self {
        Self::NONE
    }
}

/// Why a message does not fit the stream so far. Fatal for this connection: reset the assembler
/// and restart replication from the last acknowledged LSN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnError {
    /// A row change could not be decoded.
    #[error(transparent)]
    Change(#[from] ChangeError),
    /// A message that belongs inside a transaction arrived outside one.
    #[error("{what} outside a transaction")]
    NotInTransaction {
        /// The kind of message.
        what: &'static str,
    },
    /// A Begin arrived while another transaction was open.
    #[error("Begin of xid {new_xid} while xid {open_xid} is still open")]
    NestedBegin {
        /// The transaction already open.
        open_xid: u32,
        /// The transaction the new Begin names.
        new_xid: u32,
    },
    /// A Commit's LSN differs from its Begin's final LSN.
    #[error("Commit LSN {commit_lsn} of xid {xid} differs from its Begin's final LSN {final_lsn}")]
    CommitLsnMismatch {
        /// The open transaction.
        xid: u32,
        /// LSN announced by Begin.
        final_lsn: Lsn,
        /// LSN in Commit.
        commit_lsn: Lsn,
    },
    /// A Truncate names a table no Relation message has described.
    #[error("Truncate of relation OID {oid} arrived before its Relation message")]
    UnknownTruncatedRelation {
        /// The relation OID.
        oid: u32,
    },
}

/// Folds pgoutput messages into committed [`Transaction`]s, owning the relation cache.
#[derive(Debug, Default)]
pub struct TxnAssembler {
    relations: RelationCache,
    open: Option<Transaction>,
    /// Decoded bytes in the open transaction's current part.
    open_bytes: usize,
    limit: PartLimit,
}

impl TxnAssembler {
    /// An assembler with an empty relation cache and no open transaction; transactions come whole.
    pub fn new() -> Self {
        Self::default()
    }

    /// An assembler that hands out a transaction in parts of at most `limit`.
    pub fn with_part_limit(limit: PartLimit) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// Feeds one message; returns the transaction it completes, if it is a Commit.
    pub fn push(&mut self, msg: PgOutputMessage) -> Result<Option<Transaction>, TxnError> {
        match msg {
            PgOutputMessage::Begin {
                final_lsn,
                commit_time_micros,
                xid,
            } => {
                if let Some(open) = &self.open {
                    return Err(TxnError::NestedBegin {
                        open_xid: open.xid,
                        new_xid: xid,
                    });
                }
                self.open = Some(Transaction {
                    xid,
                    // Begin's final LSN is the commit LSN; Commit confirms it.
                    commit_lsn: final_lsn,
                    end_lsn: Lsn(0),
                    commit_time_micros,
                    changes: Vec::new(),
                    truncated: Vec::new(),
                    messages: Vec::new(),
                    part: 0,
                    last: false,
                });
                self.open_bytes = 0;
                Ok(None)
            }
            PgOutputMessage::Commit {
                commit_lsn,
                end_lsn,
                commit_time_micros,
                flags: _,
            } => {
                let Some(mut txn) = self.open.take() else {
                    return Err(TxnError::NotInTransaction { what: "Commit" });
                };
                if txn.commit_lsn != commit_lsn {
                    let err = TxnError::CommitLsnMismatch {
                        xid: txn.xid,
                        final_lsn: txn.commit_lsn,
                        commit_lsn,
                    };
                    self.open = Some(txn);
                    return Err(err);
                }
                txn.end_lsn = end_lsn;
                txn.commit_time_micros = commit_time_micros;
                txn.last = true;
                self.open_bytes = 0;
                Ok(Some(txn))
            }
            PgOutputMessage::Relation(body) => {
                self.relations.insert(body);
                Ok(None)
            }
            // Text values need no type metadata; an origin does not change what a change means.
            PgOutputMessage::Type { .. } | PgOutputMessage::Origin { .. } => Ok(None),
            // Logical decoding messages are not row changes. A transactional one still proves
            // the stream is in a transaction; a non-transactional one may come at any point.
            PgOutputMessage::Message {
                transactional,
                prefix,
                content,
                ..
            } => {
                if transactional {
                    self.open_mut("transactional Message")?
                        .messages
                        .push((prefix, content));
                }
                Ok(None)
            }
            PgOutputMessage::Truncate { relation_oids, .. } => {
                let open = self
                    .open
                    .as_mut()
                    .ok_or(TxnError::NotInTransaction { what: "Truncate" })?;
                for oid in relation_oids {
                    let (schema, table) = self
                        .relations
                        .table_name(oid)
                        .ok_or(TxnError::UnknownTruncatedRelation { oid })?;
                    if !open
                        .truncated
                        .iter()
                        .any(|(s, t)| s == schema && t == table)
                    {
                        open.truncated.push((schema.to_owned(), table.to_owned()));
                    }
                }
                Ok(None)
            }
            change @ (PgOutputMessage::Insert { .. }
            | PgOutputMessage::Update { .. }
            | PgOutputMessage::Delete { .. }) => {
                let what = match change {
                    PgOutputMessage::Insert { .. } => "Insert",
                    PgOutputMessage::Update { .. } => "Update",
                    _ => "Delete",
                };
                let open = self
                    .open
                    .as_mut()
                    .ok_or(TxnError::NotInTransaction { what })?;
                let Some(row) = self.relations.decode(&change)? else {
                    return Ok(None);
                };
                self.open_bytes += row.approx_bytes();
                open.changes.push(row);
                if open.changes.len() < self.limit.changes && self.open_bytes < self.limit.bytes {
                    return Ok(None);
                }
                // The part is full: hand it out and go on with the same transaction.
                let part = Transaction {
                    xid: open.xid,
                    commit_lsn: open.commit_lsn,
                    end_lsn: open.commit_lsn,
                    commit_time_micros: open.commit_time_micros,
                    changes: std::mem::take(&mut open.changes),
                    truncated: Vec::new(),
                    messages: Vec::new(),
                    part: open.part,
                    last: false,
                };
                open.part += 1;
                self.open_bytes = 0;
                Ok(Some(part))
            }
        }
    }

    fn open_mut(&mut self, what: &'static str) -> Result<&mut Transaction, TxnError> {
        self.open
            .as_mut()
            .ok_or(TxnError::NotInTransaction { what })
    }

    /// Whether a Begin has been seen without its Commit.
    pub fn in_transaction(&self) -> bool {
        self.open.is_some()
    }

    /// The relation cache as of the last message.
    pub fn relations(&self) -> &RelationCache {
        &self.relations
    }

    /// Drops any open transaction and the relation cache, for a new replication connection.
    pub fn reset(&mut self) {
        self.open = None;
        self.open_bytes = 0;
        self.relations.clear();
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::decode::Op;
    use crate::protocol::{ColumnDef, ColumnValue, RelationBody, TupleData};

    fn relation(oid: u32, name: &str, columns: &[&str]) -> PgOutputMessage {
        PgOutputMessage::Relation(RelationBody {
            oid,
            namespace: "public".into(),
            name: name.into(),
            replica_identity: b'd',
            columns: columns
                .iter()
                .enumerate()
                .map(|(i, c)| ColumnDef {
                    flags: u8::from(i == 0),
                    name: (*c).into(),
                    type_oid: 25,
                    type_modifier: -1,
                })
                .collect(),
        })
    }

    fn begin(xid: u32, lsn: u64) -> PgOutputMessage {
        PgOutputMessage::Begin {
            final_lsn: Lsn(lsn),
            commit_time_micros: 100,
            xid,
        }
    }

    fn commit(lsn: u64, end: u64) -> PgOutputMessage {
        PgOutputMessage::Commit {
            flags: 0,
            commit_lsn: Lsn(lsn),
            end_lsn: Lsn(end),
            commit_time_micros: 100,
        }
    }

    fn insert(oid: u32, values: &[&str]) -> PgOutputMessage {
        PgOutputMessage::Insert {
            relation_oid: oid,
            new: TupleData(
                values
                    .iter()
                    .map(|v| ColumnValue::Text(Bytes::copy_from_slice(v.as_bytes())))
                    .collect(),
            ),
        }
    }

    fn feed(asm: &mut TxnAssembler, msgs: Vec<PgOutputMessage>) -> Vec<Transaction> {
        msgs.into_iter()
            .filter_map(|m| asm.push(m).unwrap())
            .collect()
    }

    #[test]
    fn assembles_one_transaction_per_commit() {
        let mut asm = TxnAssembler::new();
        let txns = feed(
            &mut asm,
            vec![
                relation(1, "items", &["id", "title"]),
                begin(700, 0x10),
                insert(1, &["1", "a"]),
                insert(1, &["2", "b"]),
                commit(0x10, 0x18),
                begin(701, 0x20),
                PgOutputMessage::Delete {
                    relation_oid: 1,
                    old: None,
                    key: Some(TupleData(vec![
                        ColumnValue::Text(Bytes::from_static(b"1")),
                        ColumnValue::Null,
                    ])),
                },
                commit(0x20, 0x28),
            ],
        );
        assert_eq!(txns.len(), 2);
        assert_eq!(txns[0].xid, 700);
        assert_eq!(txns[0].commit_lsn, Lsn(0x10));
        assert_eq!(txns[0].end_lsn, Lsn(0x18));
        assert_eq!(txns[0].commit_time_micros, 100);
        let ids: Vec<_> = txns[0].changes.iter().map(|c| c.column("id")).collect();
        assert_eq!(ids, [Some("1"), Some("2")]);
        assert_eq!(txns[1].changes.len(), 1);
        assert_eq!(txns[1].changes[0].op, Op::Delete);
        assert!(!asm.in_transaction());
    }

    #[test]
    fn empty_transaction_is_still_emitted() {
        // Its end LSN must still be acknowledged.
        let mut asm = TxnAssembler::new();
        let txns = feed(&mut asm, vec![begin(5, 0x10), commit(0x10, 0x18)]);
        assert_eq!(txns.len(), 1);
        assert!(txns[0].changes.is_empty());
        assert_eq!(txns[0].end_lsn, Lsn(0x18));
    }

    #[test]
    fn metadata_outside_a_transaction_is_accepted() {
        let mut asm = TxnAssembler::new();
        let out = feed(
            &mut asm,
            vec![
                relation(1, "items", &["id"]),
                PgOutputMessage::Type {
                    oid: 9,
                    namespace: "public".into(),
                    name: "mood".into(),
                },
                PgOutputMessage::Origin {
                    lsn: Lsn(1),
                    name: "o".into(),
                },
                PgOutputMessage::Message {
                    transactional: false,
                    lsn: Lsn(1),
                    prefix: "p".into(),
                    content: vec![],
                },
            ],
        );
        assert!(out.is_empty());
        assert_eq!(asm.relations().len(), 1);
        assert!(!asm.in_transaction());
    }

    #[test]
    fn protocol_errors() {
        let mut asm = TxnAssembler::new();
        asm.push(relation(1, "items", &["id"])).unwrap();
        assert_eq!(
            asm.push(insert(1, &["1"])),
            Err(TxnError::NotInTransaction { what: "Insert" })
        );
        assert_eq!(
            asm.push(commit(1, 2)),
            Err(TxnError::NotInTransaction { what: "Commit" })
        );
        assert_eq!(
            asm.push(PgOutputMessage::Truncate {
                options: 0,
                relation_oids: vec![1]
            }),
            Err(TxnError::NotInTransaction { what: "Truncate" })
        );
        assert_eq!(
            asm.push(PgOutputMessage::Message {
                transactional: true,
                lsn: Lsn(1),
                prefix: String::new(),
                content: vec![]
            }),
            Err(TxnError::NotInTransaction {
                what: "transactional Message"
            })
        );
        asm.push(begin(7, 0x10)).unwrap();
        assert_eq!(
            asm.push(begin(8, 0x20)),
            Err(TxnError::NestedBegin {
                open_xid: 7,
                new_xid: 8
            })
        );
        assert_eq!(
            asm.push(commit(0x11, 0x18)),
            Err(TxnError::CommitLsnMismatch {
                xid: 7,
                final_lsn: Lsn(0x10),
                commit_lsn: Lsn(0x11)
            })
        );
        assert_eq!(
            asm.push(insert(2, &["1"])),
            Err(TxnError::Change(ChangeError::UnknownRelation { oid: 2 }))
        );
        assert!(asm.in_transaction());
        asm.reset();
        assert!(!asm.in_transaction());
        assert!(asm.relations().is_empty());
    }

    #[test]
    fn truncate_records_tables_once() {
        let mut asm = TxnAssembler::new();
        let txns = feed(
            &mut asm,
            vec![
                relation(1, "items", &["id"]),
                relation(2, "notes", &["id"]),
                begin(9, 0x10),
                PgOutputMessage::Truncate {
                    options: 2,
                    relation_oids: vec![2, 1],
                },
                PgOutputMessage::Truncate {
                    options: 0,
                    relation_oids: vec![1],
                },
                insert(1, &["1"]),
                commit(0x10, 0x18),
            ],
        );
        assert_eq!(
            txns[0].truncated,
            vec![
                ("public".to_owned(), "notes".to_owned()),
                ("public".to_owned(), "items".to_owned())
            ]
        );
        assert_eq!(txns[0].changes.len(), 1);

        asm.push(begin(10, 0x20)).unwrap();
        assert_eq!(
            asm.push(PgOutputMessage::Truncate {
                options: 0,
                relation_oids: vec![3]
            }),
            Err(TxnError::UnknownTruncatedRelation { oid: 3 })
        );
    }

    #[test]
    fn relation_inside_a_transaction_applies_to_later_changes() {
        let mut asm = TxnAssembler::new();
        let txns = feed(
            &mut asm,
            vec![
                relation(1, "items", &["id"]),
                begin(9, 0x10),
                insert(1, &["1"]),
                relation(1, "items", &["id", "extra"]),
                insert(1, &["2", "x"]),
                commit(0x10, 0x18),
            ],
        );
        let changes = &txns[0].changes;
        assert_eq!(changes[0].new.as_ref().unwrap().len(), 1);
        assert_eq!(changes[1].column("extra"), Some("x"));
        assert_eq!(asm.relations().get(1).unwrap().columns.len(), 2);
    }

    #[test]
    fn transactional_message_inside_a_transaction_is_accepted() {
        let mut asm = TxnAssembler::new();
        let txns = feed(
            &mut asm,
            vec![
                begin(9, 0x10),
                PgOutputMessage::Origin {
                    lsn: Lsn(3),
                    name: "o".into(),
                },
                PgOutputMessage::Message {
                    transactional: true,
                    lsn: Lsn(0x10),
                    prefix: "p".into(),
                    content: b"x".to_vec(),
                },
                commit(0x10, 0x18),
            ],
        );
        assert_eq!(txns.len(), 1);
        assert!(txns[0].changes.is_empty());
    }

    #[test]
    fn a_large_transaction_comes_in_parts_and_the_last_one_commits_it() {
        let mut asm = TxnAssembler::with_part_limit(PartLimit {
            changes: 2,
            bytes: usize::MAX,
        });
        let mut msgs = vec![relation(1, "items", &["id", "title"]), begin(700, 0x10)];
        for i in 0..5 {
            msgs.push(insert(1, &[&i.to_string(), "x"]));
        }
        msgs.push(PgOutputMessage::Message {
            transactional: true,
            lsn: Lsn(0x0f),
            prefix: "p".into(),
            content: b"c".to_vec(),
        });
        msgs.push(commit(0x10, 0x18));
        let parts = feed(&mut asm, msgs);
        let shape: Vec<(u32, bool, usize, u64, usize)> = parts
            .iter()
            .map(|t| {
                (
                    t.part,
                    t.last,
                    t.changes.len(),
                    t.end_lsn.0,
                    t.messages.len(),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, false, 2, 0x10, 0),
                (1, false, 2, 0x10, 0),
                (2, true, 1, 0x18, 1)
            ]
        );
        assert!(
            parts
                .iter()
                .all(|t| t.xid == 700 && t.commit_lsn == Lsn(0x10))
        );
        assert!(parts.iter().all(Transaction::is_split));
        let ids: Vec<&str> = parts
            .iter()
            .flat_map(|t| t.changes.iter().map(|c| c.column("id").unwrap_or("")))
            .collect();
        assert_eq!(
            ids,
            ["0", "1", "2", "3", "4"],
            "every change once, in order"
        );

        // The next transaction starts with fresh counters; a small one stays whole.
        let next = feed(
            &mut asm,
            vec![begin(701, 0x20), insert(1, &["9", "y"]), commit(0x20, 0x28)],
        );
        assert_eq!(next.len(), 1);
        assert!(!next[0].is_split() && next[0].last && next[0].part == 0);
    }

    #[test]
    fn a_byte_limit_splits_on_decoded_size() {
        let mut asm = TxnAssembler::with_part_limit(PartLimit {
            changes: usize::MAX,
            bytes: 4096,
        });
        let big = "x".repeat(3000);
        let parts = feed(
            &mut asm,
            vec![
                relation(1, "items", &["id", "title"]),
                begin(700, 0x10),
                insert(1, &["1", &big]),
                insert(1, &["2", &big]),
                insert(1, &["3", &big]),
                commit(0x10, 0x18),
            ],
        );
        let sizes: Vec<usize> = parts.iter().map(|t| t.changes.len()).collect();
        assert_eq!(sizes, vec![2, 1]);
    }
}
