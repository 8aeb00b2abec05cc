//! Bytes captured once from PostgreSQL 15.18 (see `fixtures/capture.sql` for the statements and
//! `fixtures/*.hex` for how they were read), decoded end to end and compared field by field.

use deeprecall_replication::{
    ChangeError, ColumnValue, Lsn, Op, PgOutputMessage, Row, RowChange, Transaction, TxnAssembler,
    TxnError, parse,
};

const ITEMS: u32 = 16389;
const NOTES: u32 = 16396;
const MOOD: u32 = 16385;
const OWNER1: &str = "11111111-1111-1111-1111-111111111111";
const OWNER2: &str = "22222222-2222-2222-2222-222222222222";
const QUOTED: &str = "it's \"quoted\" ünïcode";

fn unhex(line: &str) -> Vec<u8> {
    let digit = |c: u8| (c as char).to_digit(16).expect("hex digit") as u8;
    line.as_bytes()
        .chunks(2)
        .map(|pair| digit(pair[0]) << 4 | digit(pair[1]))
        .collect()
}

/// One message per non-comment line.
fn load(name: &str) -> Vec<Vec<u8>> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(unhex)
        .collect()
}

fn messages(name: &str) -> Vec<PgOutputMessage> {
    load(name)
        .iter()
        .enumerate()
        .map(|(i, m)| parse(m).unwrap_or_else(|e| panic!("{name} message {i}: {e}")))
        .collect()
}

fn row(pairs: &[(&str, Option<&str>)]) -> Row {
    pairs.iter().copied().collect()
}

fn change(
    table: &str,
    op: Op,
    new: Option<Row>,
    old: Option<Row>,
    unchanged: &[&str],
) -> RowChange {
    RowChange {
        relation_oid: if table == "items" { ITEMS } else { NOTES },
        schema: "public".into(),
        table: table.into(),
        op,
        new,
        old,
        unchanged: unchanged.iter().map(|s| s.to_string()).collect(),
    }
}

fn txn(
    xid: u32,
    commit_lsn: &str,
    end_lsn: &str,
    commit_time_micros: i64,
    changes: Vec<RowChange>,
) -> Transaction {
    Transaction {
        xid,
        commit_lsn: commit_lsn.parse().unwrap(),
        end_lsn: end_lsn.parse().unwrap(),
        commit_time_micros,
        changes,
        truncated: vec![],
        messages: vec![],
        part: 0,
        last: true,
    }
}

#[test]
fn text_stream_decodes_to_the_expected_transactions() {
    let big_body = "abcdefghij".repeat(300);
    let big_note = "0123456789".repeat(300);
    let mut asm = TxnAssembler::new();
    let mut got = Vec::new();
    for msg in messages("pg15_v1_text.hex") {
        got.extend(asm.push(msg).unwrap());
    }
    assert!(!asm.in_transaction());

    let mut truncate = txn(739, "0/1537EC8", "0/1538180", 849152495449552, vec![]);
    truncate.truncated = vec![
        ("public".into(), "items".into()),
        ("public".into(), "notes".into()),
    ];
    let expected = vec![
        // 1: insert with a null and an out-of-line body.
        txn(
            731,
            "0/1535FF0",
            "0/1536038",
            849152495443438,
            vec![change(
                "items",
                Op::Insert,
                Some(row(&[
                    ("id", Some("1")),
                    ("owner_id", Some(OWNER1)),
                    ("title", Some("hello")),
                    ("body", Some(&big_body)),
                    ("n", None),
                ])),
                None,
                &[],
            )],
        ),
        // 2: the untouched TOASTed body is 'u': listed as unchanged, absent from the row.
        txn(
            732,
            "0/15360E8",
            "0/1536118",
            849152495444476,
            vec![change(
                "items",
                Op::Update,
                Some(row(&[
                    ("id", Some("1")),
                    ("owner_id", Some(OWNER1)),
                    ("title", Some("world")),
                    ("n", Some("7")),
                ])),
                None,
                &["body"],
            )],
        ),
        // 3: key change under the default identity: 'K' carries the old key only.
        txn(
            733,
            "0/1536218",
            "0/1536248",
            849152495444882,
            vec![change(
                "items",
                Op::Update,
                Some(row(&[
                    ("id", Some("2")),
                    ("owner_id", Some(OWNER1)),
                    ("title", Some("world")),
                    ("n", Some("7")),
                ])),
                Some(row(&[("id", Some("1"))])),
                &["body"],
            )],
        ),
        // 4: delete under the default identity: owner_id is not known.
        txn(
            734,
            "0/1536300",
            "0/1536330",
            849152495445189,
            vec![change(
                "items",
                Op::Delete,
                None,
                Some(row(&[("id", Some("2"))])),
                &[],
            )],
        ),
        // 5: REPLICA IDENTITY FULL: 'O' old tuples, four changes in one transaction.
        txn(735, "0/15365C0", "0/15365F0", 849152495446232, {
            let r10 = |note| {
                row(&[
                    ("id", Some("10")),
                    ("owner_id", Some(OWNER2)),
                    ("feeling", Some("happy")),
                    ("note", Some(note)),
                ])
            };
            let r11 = row(&[
                ("id", Some("11")),
                ("owner_id", Some(OWNER2)),
                ("feeling", None),
                ("note", Some(QUOTED)),
            ]);
            vec![
                change("notes", Op::Insert, Some(r10("first")), None, &[]),
                change("notes", Op::Insert, Some(r11.clone()), None, &[]),
                change(
                    "notes",
                    Op::Update,
                    Some(r10("second")),
                    Some(r10("first")),
                    &[],
                ),
                change("notes", Op::Delete, None, Some(r11), &[]),
            ]
        }),
        // 6: the unpublished insert (xid 736) sends nothing. 7: transactional message only.
        // A transaction holding only a transactional logical message: kept for the server's barriers.
        Transaction {
            messages: vec![("deeprecall".into(), b"txn-msg".to_vec())],
            ..txn(737, "0/15366A8", "0/15366D8", 849152495446808, vec![])
        },
        // 8: insert, then truncate of both tables in one statement.
        txn(
            738,
            "0/15367B8",
            "0/15367E8",
            849152495447233,
            vec![change(
                "items",
                Op::Insert,
                Some(row(&[
                    ("id", Some("3")),
                    ("owner_id", Some("33333333-3333-3333-3333-333333333333")),
                    ("title", Some("t")),
                    ("body", Some("short")),
                    ("n", Some("1")),
                ])),
                None,
                &[],
            )],
        ),
        truncate,
        // 9: after ALTER TABLE ADD COLUMN the new Relation carries `extra`.
        txn(
            741,
            "0/1538C68",
            "0/1538C98",
            849152495451510,
            vec![change(
                "items",
                Op::Insert,
                Some(row(&[
                    ("id", Some("4")),
                    ("owner_id", Some("44444444-4444-4444-4444-444444444444")),
                    ("title", Some("after alter")),
                    ("body", None),
                    ("n", None),
                    ("extra", Some("x")),
                ])),
                None,
                &[],
            )],
        ),
        // 10: replicated from origin 'upstream', whose commit time (2026-01-02 03:04:05 UTC) wins.
        txn(
            743,
            "0/1538FA0",
            "0/1538FE8",
            820_638_245_000_000,
            vec![change(
                "items",
                Op::Insert,
                Some(row(&[
                    ("id", Some("5")),
                    ("owner_id", Some("55555555-5555-5555-5555-555555555555")),
                    ("title", Some("from origin")),
                    ("body", None),
                    ("n", None),
                    ("extra", None),
                ])),
                None,
                &[],
            )],
        ),
        // 11: FULL identity with an out-of-line note.
        txn(
            745,
            "0/153A048",
            "0/153A078",
            849152510734170,
            vec![change(
                "notes",
                Op::Insert,
                Some(row(&[
                    ("id", Some("20")),
                    ("owner_id", Some(OWNER2)),
                    ("feeling", Some("sad")),
                    ("note", Some(&big_note)),
                ])),
                None,
                &[],
            )],
        ),
        // Even under FULL the new tuple says 'u' for the untouched note; the old tuple has it whole.
        txn(
            746,
            "0/153AD00",
            "0/153AD30",
            849152510734883,
            vec![change(
                "notes",
                Op::Update,
                Some(row(&[
                    ("id", Some("20")),
                    ("owner_id", Some(OWNER2)),
                    ("feeling", Some("happy")),
                ])),
                Some(row(&[
                    ("id", Some("20")),
                    ("owner_id", Some(OWNER2)),
                    ("feeling", Some("sad")),
                    ("note", Some(&big_note)),
                ])),
                &["note"],
            )],
        ),
    ];
    assert_eq!(got.len(), expected.len());
    for (got, expected) in got.iter().zip(&expected) {
        assert_eq!(got, expected, "xid {}", expected.xid);
    }

    // The last update's readers: new row first, old row for what the new one lacks.
    let last = &got.last().unwrap().changes[0];
    assert_eq!(last.column("feeling"), Some("happy"));
    assert_eq!(last.old_column("feeling"), Some("sad"));
    assert_eq!(last.column("note"), Some(big_note.as_str()));
    assert!(last.new.as_ref().unwrap().get("note").is_none());
}

#[test]
fn text_stream_messages_beyond_rows() {
    let msgs = messages("pg15_v1_text.hex");
    assert_eq!(msgs.len(), 50);

    // Relations: items under the default identity (only id is key), notes under FULL (all key),
    // and items again after ALTER TABLE, whole, with the added column.
    let relations: Vec<_> = msgs
        .iter()
        .filter_map(|m| match m {
            PgOutputMessage::Relation(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(relations.len(), 6);
    let describe = |i: usize| {
        let r = relations[i];
        let cols: Vec<_> = r
            .columns
            .iter()
            .map(|c| (c.name.as_str(), c.is_key(), c.type_oid, c.type_modifier))
            .collect();
        (
            r.oid,
            r.namespace.as_str(),
            r.name.as_str(),
            r.replica_identity,
            cols,
        )
    };
    let items_before = vec![
        ("id", true, 20, -1),
        ("owner_id", false, 2950, -1),
        ("title", false, 25, -1),
        ("body", false, 25, -1),
        ("n", false, 23, -1),
    ];
    let mut items_after = items_before.clone();
    items_after.push(("extra", false, 25, -1));
    let notes = vec![
        ("id", true, 23, -1),
        ("owner_id", true, 2950, -1),
        ("feeling", true, MOOD, -1),
        ("note", true, 25, -1),
    ];
    assert_eq!(
        describe(0),
        (ITEMS, "public", "items", b'd', items_before.clone())
    );
    assert_eq!(describe(1), (NOTES, "public", "notes", b'f', notes.clone()));
    assert_eq!(describe(2), (ITEMS, "public", "items", b'd', items_before));
    assert_eq!(describe(3), (NOTES, "public", "notes", b'f', notes.clone()));
    assert_eq!(describe(4), (ITEMS, "public", "items", b'd', items_after));
    assert_eq!(describe(5), (NOTES, "public", "notes", b'f', notes));

    let mood = PgOutputMessage::Type {
        oid: MOOD,
        namespace: "public".into(),
        name: "mood".into(),
    };
    assert_eq!(msgs.iter().filter(|m| **m == mood).count(), 3);
    assert_eq!(msgs[14], mood);

    assert_eq!(
        msgs[22],
        PgOutputMessage::Message {
            transactional: true,
            lsn: Lsn(0x15366A8),
            prefix: "deeprecall".into(),
            content: b"txn-msg".to_vec(),
        }
    );
    // Non-transactional: outside any Begin/Commit.
    assert_eq!(
        msgs[24],
        PgOutputMessage::Message {
            transactional: false,
            lsn: Lsn(0x1536718),
            prefix: "deeprecall".into(),
            content: vec![0x00, 0xFF],
        }
    );
    assert!(matches!(msgs[23], PgOutputMessage::Commit { .. }));
    assert!(matches!(msgs[25], PgOutputMessage::Begin { .. }));

    // RESTART IDENTITY is option bit 2.
    assert_eq!(
        msgs[32],
        PgOutputMessage::Truncate {
            options: 2,
            relation_oids: vec![ITEMS, NOTES],
        }
    );
    assert_eq!(
        msgs[39],
        PgOutputMessage::Origin {
            lsn: "0/ABCDEF01".parse().unwrap(),
            name: "upstream".into(),
        }
    );
    assert_eq!(
        msgs[0],
        PgOutputMessage::Begin {
            final_lsn: Lsn(0x1535FF0),
            commit_time_micros: 849152495443438,
            xid: 731,
        }
    );
    assert_eq!(
        msgs[3],
        PgOutputMessage::Commit {
            flags: 0,
            commit_lsn: Lsn(0x1535FF0),
            end_lsn: Lsn(0x1536038),
            commit_time_micros: 849152495443438,
        }
    );
}

#[test]
fn binary_stream_parses_and_is_refused_by_the_row_decoder() {
    let msgs = messages("pg15_v1_binary.hex");
    assert_eq!(msgs.len(), 46);
    let PgOutputMessage::Insert { relation_oid, new } = &msgs[2] else {
        panic!("message 2 is {:?}", msgs[2]);
    };
    assert_eq!(*relation_oid, ITEMS);
    let bin = |b: &[u8]| ColumnValue::Binary(bytes::Bytes::copy_from_slice(b));
    assert_eq!(
        new.0,
        vec![
            bin(&1i64.to_be_bytes()),
            bin(&[0x11; 16]),
            bin(b"hello"),
            bin("abcdefghij".repeat(300).as_bytes()),
            ColumnValue::Null,
        ]
    );
    let PgOutputMessage::Update {
        new,
        key: None,
        old: None,
        ..
    } = &msgs[5]
    else {
        panic!("message 5 is {:?}", msgs[5]);
    };
    assert_eq!(new.0[3], ColumnValue::UnchangedToast);
    assert_eq!(new.0[4], bin(&7i32.to_be_bytes()));

    // The row decoder speaks text only and says so instead of guessing.
    let mut asm = TxnAssembler::new();
    asm.push(msgs[0].clone()).unwrap();
    asm.push(msgs[1].clone()).unwrap();
    assert!(matches!(
        asm.push(msgs[2].clone()),
        Err(TxnError::Change(ChangeError::BinaryValue { column, .. })) if column == "id"
    ));
}

#[test]
fn every_prefix_of_every_captured_message_is_an_error() {
    for name in ["pg15_v1_text.hex", "pg15_v1_binary.hex"] {
        for (i, msg) in load(name).iter().enumerate() {
            for len in 0..msg.len() {
                assert!(
                    parse(&msg[..len]).is_err(),
                    "{name} message {i} prefix {len}"
                );
            }
        }
    }
}

#[test]
fn changes_before_their_relation_are_refused() {
    // Starting mid-stream (after the Relation message) must fail loudly, not decode positionally.
    let msgs = messages("pg15_v1_text.hex");
    let mut asm = TxnAssembler::new();
    asm.push(msgs[4].clone()).unwrap();
    assert_eq!(
        asm.push(msgs[5].clone()),
        Err(TxnError::Change(ChangeError::UnknownRelation {
            oid: ITEMS
        }))
    );
}
