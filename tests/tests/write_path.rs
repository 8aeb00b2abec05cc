//! `POST /v1/batch`: Postgres assigns the owner and the clocks, replays are no-ops (also when sent twice at
//! once), `not_found` never jams a batch, and any bad op rejects the whole batch with its index.

use deeprecall_tests::{TestEnv, count, dump_table, error_code, insert, op, statuses, xmins};
use serde_json::{Value, json};
use uuid::Uuid;

const TABLES: &[&str] = &[
    "works",
    "assets",
    "annotations",
    "activities",
    "boards",
    "strokes",
];

#[tokio::test]
async fn owner_and_timestamps_are_assigned_by_postgres() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let someone_else = Uuid::new_v4();
    let (w1, w2) = (Uuid::new_v4(), Uuid::new_v4());
    let forged = json!({"owner_id": someone_else, "created_at": "2000-01-01T00:00:00Z",
                        "updated_at": "2000-01-01T00:00:00Z"});
    let mut row1 = json!({"id": w1, "title": "Attention"});
    let mut row2 = json!({"id": w2, "title": "BERT"});
    for (k, v) in forged.as_object().unwrap() {
        row1[k] = v.clone();
        row2[k] = v.clone();
    }
    let (status, body) = env
        .batch(
            user,
            json!([insert("works", row1), op("upsert", "works", row2)]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied", "applied"]);

    // The response's txid is the transaction that wrote the rows.
    let txid = body["txid"].as_str().expect("txid is a string").to_owned();
    assert!(txid.parse::<u64>().is_ok(), "txid {txid} is decimal");
    let written_by_txid = count(
        &db,
        "select count(*) from works where xmin = xid($1::text::xid8)",
        &[&txid],
    )
    .await;
    assert_eq!(written_by_txid, 2);

    for id in [w1, w2] {
        let row = db
            .query_one(
                "select owner_id, created_at > now() - interval '1 minute', updated_at > now() - interval '1 minute'
                   from works where id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, Uuid>(0),
            user,
            "owner_id comes from the token, not the row"
        );
        assert!(row.get::<_, bool>(1), "client created_at ignored");
        assert!(row.get::<_, bool>(2), "client updated_at ignored");
    }
    assert_eq!(
        count(
            &db,
            "select count(*) from works where owner_id = $1",
            &[&someone_else]
        )
        .await,
        0
    );

    // An update (also one naming another owner or an old clock) keeps the owner and moves updated_at forward
    // on the server's clock, leaving created_at alone.
    let before = db
        .query_one(
            "select created_at, updated_at from works where id = $1",
            &[&w1],
        )
        .await
        .unwrap();
    let (created, updated): (std::time::SystemTime, std::time::SystemTime) =
        (before.get(0), before.get(1));
    let (status, body) = env
        .batch(
            user,
            json!([op(
                "update",
                "works",
                json!({"id": w1, "title": "Attention Is All You Need",
                "owner_id": someone_else, "updated_at": "2000-01-01T00:00:00Z"})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"]);
    let after = db
        .query_one(
            "select created_at, updated_at, title, owner_id from works where id = $1",
            &[&w1],
        )
        .await;
    let after = after.unwrap();
    assert_eq!(after.get::<_, std::time::SystemTime>(0), created);
    assert!(
        after.get::<_, std::time::SystemTime>(1) > updated,
        "updated_at moved forward"
    );
    assert_eq!(after.get::<_, String>(2), "Attention Is All You Need");
    assert_eq!(after.get::<_, Uuid>(3), user);

    // An upsert that hits the existing row updates it (and its clock) without touching the owner.
    let (status, body) = env
        .batch(
            user,
            json!([op(
                "upsert",
                "works",
                json!({"id": w2, "title": "BERT v2", "year": 2019})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let row = db
        .query_one(
            "select title, year, owner_id from works where id = $1",
            &[&w2],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "BERT v2");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(2019));
    assert_eq!(row.get::<_, Uuid>(2), user);
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 2);
}

/// A batch touching several tables, with an update of a row it inserted itself.
fn mixed_batch() -> Value {
    let work = Uuid::new_v4();
    let board = Uuid::new_v4();
    json!([
        insert(
            "works",
            json!({"id": work, "title": "A", "tags": ["ml", "nlp"], "authors": [{"name": "V"}]})
        ),
        insert(
            "annotations",
            json!({"id": Uuid::new_v4(), "work_id": work, "page": 3, "quote": "q",
                                     "geometry": {"x": 1.5}})
        ),
        op(
            "update",
            "works",
            json!({"id": work, "read_status": "reading"})
        ),
        insert("boards", json!({"id": board, "work_id": work})),
        insert(
            "strokes",
            json!({"id": Uuid::new_v4(), "board_id": board, "points": [[0, 0], [1, 1]]})
        ),
        insert(
            "activities",
            json!({"id": Uuid::new_v4(), "title": "Reading group", "work_ids": [work]})
        ),
    ])
}

async fn snapshot(db: &tokio_postgres::Client) -> Vec<(Vec<Value>, Vec<(String, String)>)> {
    let mut out = Vec::new();
    for t in TABLES.iter().chain(&["sync_applied_ops"]) {
        let rows = dump_table(db, t, &[]).await;
        let x = if *t == "sync_applied_ops" {
            Vec::new()
        } else {
            xmins(db, t).await
        };
        out.push((rows, x));
    }
    out
}

#[tokio::test]
async fn replaying_a_batch_changes_nothing() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let ops = mixed_batch();
    let (status, first) = env.batch(user, ops.clone()).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(statuses(&first), vec!["applied"; 6]);
    let before = snapshot(&db).await;
    assert_eq!(before[0].0.len(), 1);

    for _ in 0..2 {
        let (status, replay) = env.batch(user, ops.clone()).await;
        assert_eq!(status, 200, "{replay}");
        assert_eq!(statuses(&replay), vec!["duplicate"; 6]);
        let op_ids: Vec<&Value> = replay["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| &r["op_id"])
            .collect();
        let sent: Vec<&Value> = ops
            .as_array()
            .unwrap()
            .iter()
            .map(|o| &o["op_id"])
            .collect();
        assert_eq!(op_ids, sent, "results in request order");
        // Same contents, and no row was even rewritten (xmin unchanged): the live stream sees nothing.
        assert_eq!(snapshot(&db).await, before);
    }

    // A replay mixed with new ops applies only the new ones.
    let mut mixed = ops.as_array().unwrap().clone();
    mixed.push(insert("works", json!({"id": Uuid::new_v4(), "title": "B"})));
    let (status, body) = env.batch(user, Value::Array(mixed)).await;
    assert_eq!(status, 200, "{body}");
    let mut expected = vec!["duplicate"; 6];
    expected.push("applied");
    assert_eq!(statuses(&body), expected);
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 2);

    // op_ids are per user: another user sending the same ops gets them applied to their own rows.
    let other = Uuid::new_v4();
    let (status, body) = env.batch(other, ops).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), vec!["applied"; 6]);
    assert_eq!(
        count(
            &db,
            "select count(*) from works where owner_id = $1",
            &[&other]
        )
        .await,
        1
    );
}

#[tokio::test]
async fn concurrent_double_send_applies_once() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    for round in 0..5 {
        // Inserts without an id are not idempotent by themselves (each run creates a new row): only the op
        // ledger can keep the second request from applying them again.
        let ops = json!([
            insert("works", json!({"title": format!("round {round}")})),
            insert("activities", json!({"title": format!("round {round}")})),
            insert("works", json!({"title": format!("round {round} bis")})),
        ]);
        let ((s1, b1), (s2, b2)) =
            tokio::join!(env.batch(user, ops.clone()), env.batch(user, ops.clone()));
        assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{b1} {b2}");
        for (a, b) in statuses(&b1).iter().zip(statuses(&b2)) {
            let mut pair = [a.as_str(), b.as_str()];
            pair.sort_unstable();
            assert_eq!(pair, ["applied", "duplicate"], "{b1} {b2}");
        }
        let title = format!("round {round}%");
        assert_eq!(
            count(
                &db,
                "select count(*) from works where title like $1",
                &[&title]
            )
            .await,
            2
        );
        assert_eq!(
            count(
                &db,
                "select count(*) from activities where title like $1",
                &[&title]
            )
            .await,
            1
        );
    }
}

#[tokio::test]
async fn update_or_delete_of_a_missing_row_is_not_found_and_the_rest_commits() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let existing = Uuid::new_v4();
    let (status, body) = env
        .batch(
            user,
            json!([insert("works", json!({"id": existing, "title": "keep"}))]),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    let new = Uuid::new_v4();
    let (status, body) = env
        .batch(
            user,
            json!([
                op(
                    "update",
                    "works",
                    json!({"id": Uuid::new_v4(), "title": "ghost"})
                ),
                op("delete", "annotations", json!({"id": Uuid::new_v4()})),
                insert("works", json!({"id": new, "title": "new"})),
                op(
                    "update",
                    "works",
                    json!({"id": existing, "title": "kept and updated"})
                ),
                op("delete", "works", json!({"id": Uuid::new_v4()})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        ["not_found", "not_found", "applied", "applied", "not_found"]
    );
    assert_eq!(
        count(&db, "select count(*) from works where id = $1", &[&new]).await,
        1
    );
    let title: String = db
        .query_one("select title from works where id = $1", &[&existing])
        .await
        .unwrap()
        .get(0);
    assert_eq!(title, "kept and updated");

    // A delete that finds its row is applied; deleting it again (new op) is not_found.
    let (_, body) = env
        .batch(user, json!([op("delete", "works", json!({"id": new}))]))
        .await;
    assert_eq!(statuses(&body), ["applied"]);
    let (_, body) = env
        .batch(user, json!([op("delete", "works", json!({"id": new}))]))
        .await;
    assert_eq!(statuses(&body), ["not_found"]);
    // not_found ops are recorded too: replaying them returns duplicate, not a second attempt.
    assert_eq!(
        count(
            &db,
            "select count(*) from sync_applied_ops where owner_id = $1",
            &[&user]
        )
        .await,
        8
    );
}

/// One bad op at index 2 of an otherwise valid batch: (name, bad op, expected status, expected code, fixed op).
fn bad_cases(
    first_op_id: &Value,
    work: Uuid,
) -> Vec<(&'static str, Value, u16, &'static str, Value)> {
    let id = Uuid::new_v4();
    let good = insert("works", json!({"id": id, "title": "fixed"}));
    let with = |mut o: Value, f: &dyn Fn(&mut Value)| {
        f(&mut o);
        o
    };
    vec![
        (
            "unknown table",
            insert("workz", json!({"id": id, "title": "x"})),
            422,
            "unknown_table",
            good.clone(),
        ),
        (
            "unknown column",
            insert("works", json!({"id": id, "title": "x", "colour": "red"})),
            422,
            "unknown_column",
            good.clone(),
        ),
        (
            "wrong type",
            insert("works", json!({"id": id, "title": "x", "year": "abc"})),
            400,
            "invalid_value",
            good.clone(),
        ),
        (
            "object in a text column",
            insert("works", json!({"id": id, "title": {"en": "x"}})),
            400,
            "invalid_value",
            good.clone(),
        ),
        (
            "number in a text[] column",
            insert("works", json!({"id": id, "title": "x", "tags": ["ok", 7]})),
            400,
            "invalid_value",
            good.clone(),
        ),
        (
            "check violation",
            insert(
                "works",
                json!({"id": id, "title": "x", "read_status": "skimmed"}),
            ),
            422,
            "constraint_violation",
            good.clone(),
        ),
        (
            "not null violation",
            insert("works", json!({"id": id, "title": null})),
            422,
            "constraint_violation",
            good.clone(),
        ),
        (
            "missing op_id",
            with(good.clone(), &|o| {
                o.as_object_mut().unwrap().remove("op_id");
            }),
            422,
            "missing_op_id",
            good.clone(),
        ),
        (
            "duplicate op_id",
            with(good.clone(), &|o| o["op_id"] = first_op_id.clone()),
            422,
            "duplicate_op_id",
            good.clone(),
        ),
        (
            "non-uuid row.id",
            insert("works", json!({"id": "not-a-uuid", "title": "x"})),
            400,
            "invalid_value",
            good.clone(),
        ),
        (
            "foreign key to a missing row",
            insert("annotations", json!({"id": id, "work_id": Uuid::new_v4()})),
            422,
            "foreign_key_violation",
            insert("annotations", json!({"id": id, "work_id": work})),
        ),
        (
            "same id inserted twice",
            insert("works", json!({"id": work, "title": "again"})),
            409,
            "conflict",
            good.clone(),
        ),
        (
            "unknown kind",
            op("merge", "works", json!({"id": id})),
            422,
            "invalid_kind",
            good,
        ),
    ]
}

#[tokio::test]
async fn a_bad_op_rejects_the_whole_batch() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let cases = bad_cases(&json!(Uuid::new_v4()), Uuid::new_v4()).len();
    assert_eq!(cases, 13);
    // Several cases fail inside Postgres after ops 0 and 1 already ran in the same transaction.
    for case in 0..cases {
        let user = Uuid::new_v4();
        let work = Uuid::new_v4();
        let first = insert("works", json!({"id": work, "title": "first"}));
        let (name, bad, want_status, want_code, fixed) =
            bad_cases(&first["op_id"], work).remove(case);
        let second = insert(
            "annotations",
            json!({"id": Uuid::new_v4(), "work_id": work}),
        );
        let last = insert(
            "activities",
            json!({"id": Uuid::new_v4(), "title": "after"}),
        );
        let ops = json!([first, second, bad, last]);
        let (status, body) = env.batch(user, ops.clone()).await;
        assert_eq!(status.as_u16(), want_status, "{name}: {body}");
        assert_eq!(error_code(&body), want_code, "{name}: {body}");
        assert_eq!(body["error"]["op_index"], 2, "{name}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{name}: {body}"
        );

        // Nothing of the batch was written, not even the op ledger.
        for t in ["works", "annotations", "activities", "sync_applied_ops"] {
            let n = count(
                &db,
                &format!("select count(*) from {t} where owner_id = $1"),
                &[&user],
            )
            .await;
            assert_eq!(n, 0, "{name}: {t} has rows after a rejected batch");
        }

        // The corrected batch (same op_ids for the good ops) applies every op: none was recorded as done.
        let mut ops = ops.as_array().unwrap().clone();
        ops[2] = fixed;
        let (status, body) = env.batch(user, Value::Array(ops)).await;
        assert_eq!(status, 200, "{name}: {body}");
        assert_eq!(statuses(&body), vec!["applied"; 4], "{name}");
    }
}

#[tokio::test]
async fn malformed_requests_are_rejected_before_anything_is_written() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        ("not JSON", b"{\"ops\": [".to_vec(), 400, "invalid_json"),
        ("not an object", b"[1, 2]".to_vec(), 400, "invalid_request"),
        ("no ops", b"{}".to_vec(), 400, "invalid_request"),
        (
            "bad device_id",
            br#"{"device_id": "laptop", "ops": []}"#.to_vec(),
            422,
            "invalid_device_id",
        ),
    ];
    for (name, body, want_status, want_code) in cases {
        let (status, resp) = env.post_raw("/v1/batch", Some(&token), body).await;
        assert_eq!(status.as_u16(), want_status, "{name}: {resp}");
        assert_eq!(error_code(&resp), want_code, "{name}: {resp}");
    }
    // An op that is not an object names its index.
    let (status, body) = env
        .batch(
            user,
            json!([insert("works", json!({"title": "x"})), "oops"]),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["op_index"], 1);
    // An update without id, or without columns, is rejected too.
    let (status, body) = env
        .batch(user, json!([op("update", "works", json!({"title": "x"}))]))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "missing_id"),
        "{body}"
    );
    let (status, body) = env
        .batch(
            user,
            json!([op("update", "works", json!({"id": Uuid::new_v4()}))]),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "empty_update"),
        "{body}"
    );
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);
    assert_eq!(
        count(&db, "select count(*) from sync_applied_ops", &[]).await,
        0
    );
}

#[tokio::test]
async fn a_table_added_by_sql_is_writable_without_a_restart() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let op_bookmark = insert(
        "bookmarks",
        json!({"label": "chapter 3", "owner_id": Uuid::new_v4()}),
    );
    let (status, body) = env.batch(user, json!([op_bookmark.clone()])).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "unknown_table"),
        "{body}"
    );

    // SQL only: a table following the convention, added to the publication; migrate re-applies the policies
    // (which cover every publication member) and tells running servers to reload their catalog.
    db.batch_execute(
        "create table bookmarks (
           id uuid not null default gen_random_uuid(),
           owner_id uuid not null default deeprecall_current_user_id(),
           label text not null,
           created_at timestamptz not null default now(),
           updated_at timestamptz not null default now(),
           primary key (owner_id, id));
         alter publication deeprecall_sync add table bookmarks;",
    )
    .await
    .unwrap();
    let mut migrator = deeprecall_tests::connect(&env.db_url()).await;
    deeprecall_sync::db::migrate::migrate(&mut migrator)
        .await
        .expect("migrate");
    let forced: bool = db
        .query_one("select relrowsecurity and relforcerowsecurity from pg_class where relname = 'bookmarks'", &[])
        .await
        .unwrap()
        .get(0);
    assert!(forced, "the policies cover the new synced table");

    let mut last = Value::Null;
    for _ in 0..50 {
        let (status, body) = env.batch(user, json!([op_bookmark.clone()])).await;
        if status == 200 {
            assert_eq!(statuses(&body), ["applied"]);
            let owner: Uuid = db
                .query_one("select owner_id from bookmarks", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(owner, user);
            return;
        }
        last = body;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("bookmarks never became writable: {last}");
}

#[tokio::test]
async fn a_large_batch_runs_in_request_order() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    // 200 ops where every update depends on the insert just before it: a pipeline that reordered statements
    // would answer not_found somewhere.
    let ids: Vec<Uuid> = (0..100).map(|_| Uuid::new_v4()).collect();
    let ops: Vec<Value> = ids
        .iter()
        .enumerate()
        .flat_map(|(i, id)| {
            [
                insert("works", json!({"id": id, "title": format!("draft {i}")})),
                op(
                    "update",
                    "works",
                    json!({"id": id, "title": format!("final {i}"), "year": i}),
                ),
            ]
        })
        .collect();
    let (status, body) = env.batch(user, Value::Array(ops.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), vec!["applied"; 200]);
    let finals = count(
        &db,
        "select count(*) from works where title = 'final ' || year",
        &[],
    )
    .await;
    assert_eq!(finals, 100);

    // In a long batch, the reported index is the first failing op, not a later one aborted with it.
    let user = Uuid::new_v4();
    let mut ops: Vec<Value> = (0..120)
        .map(|i| {
            insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": format!("w{i}")}),
            )
        })
        .collect();
    ops[77] = insert(
        "works",
        json!({"id": Uuid::new_v4(), "title": "bad", "year": "MMXVII"}),
    );
    ops[101] = insert(
        "works",
        json!({"id": Uuid::new_v4(), "title": "bad", "read_status": "nope"}),
    );
    let (status, body) = env.batch(user, Value::Array(ops)).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (400, "invalid_value"),
        "{body}"
    );
    assert_eq!(body["error"]["op_index"], 77, "{body}");
    assert_eq!(
        count(
            &db,
            "select count(*) from works where owner_id = $1",
            &[&user]
        )
        .await,
        0
    );
}

#[tokio::test]
async fn the_same_ops_sent_concurrently_in_different_orders_apply_once_without_failing() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    // Large enough that the two ledger inserts interleave; a ledger taking its locks in request order would
    // deadlock here (one request answered 409 retry).
    const N: usize = 1000;
    for round in 0..3 {
        let ops: Vec<Value> = (0..N)
            .map(|i| insert("works", json!({"title": format!("r{round} {i}")})))
            .collect();
        let reversed: Vec<Value> = ops.iter().rev().cloned().collect();
        let ((s1, b1), (s2, b2)) = tokio::join!(
            env.batch(user, Value::Array(ops)),
            env.batch(user, Value::Array(reversed))
        );
        assert_eq!((s1.as_u16(), s2.as_u16()), (200, 200), "{b1} {b2}");
        let applied = statuses(&b1)
            .iter()
            .chain(&statuses(&b2))
            .filter(|s| *s == "applied")
            .count();
        assert_eq!(applied, N, "{b1} {b2}");
        let pattern = format!("r{round} %");
        assert_eq!(
            count(
                &db,
                "select count(*) from works where title like $1",
                &[&pattern]
            )
            .await,
            N as i64
        );
    }
}

/// Values are decoded by the server into their column's type and bound as typed parameters: what is stored is
/// exactly what was meant, including the forms the live stream itself sends (a client writing back a row it received).
#[tokio::test]
async fn values_are_typed_by_the_server_and_stored_exactly() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let (work, activity, board, stroke) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    let upper = Uuid::new_v4();
    let tags = json!(["a \"q\"", "back\\slash", null, "NULL", "", "{x,y}", "é ✓"]);
    let authors = json!([{"name": "Vaswani", "orcid": null, "n": [1, 2.5, {"deep": true}]}]);
    let ops = json!([
        insert(
            "works",
            json!({"id": work, "title": "It's \"quoted\"", "year": "2017", "tags": tags,
                   "authors": authors, "favorite": true, "subtitle": null})
        ),
        insert(
            "activities",
            json!({"id": activity, "title": "t", "work_ids": [upper.to_string().to_uppercase(), work],
                   "starts_at": "2026-12-01T10:00:00.5+01:00",
                   "ends_at": "2026-12-01 10:00:00.409858+00"})
        ),
        insert(
            "boards",
            json!({"id": board, "width": "NaN", "height": 1.5, "background": {"a": [1, {"b": null}]}})
        ),
        insert(
            "strokes",
            json!({"id": stroke, "board_id": board, "bbox": null, "z_index": -3, "points": []})
        ),
        insert(
            "blobs_meta",
            json!({"sha256": deeprecall_tests::sha(7), "size": "9007199254740991", "page_count": 5})
        ),
        op(
            "update",
            "activities",
            json!({"id": activity, "ends_at": "infinity"})
        ),
    ]);
    let (status, body) = env.batch(user, ops).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), vec!["applied"; 6]);

    let tags_sent: Vec<Option<String>> = serde_json::from_value(tags).unwrap();
    let row = db
        .query_one(
            "select title, year, tags = $2::text[], authors = $3::jsonb, favorite, subtitle is null
               from works where id = $1",
            &[&work, &tags_sent, &authors],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "It's \"quoted\"");
    assert_eq!(row.get::<_, Option<i32>>(1), Some(2017));
    assert!(row.get::<_, bool>(2), "text[] stored element by element");
    assert!(row.get::<_, bool>(3), "jsonb stored as sent");
    assert!(row.get::<_, bool>(4));
    assert!(row.get::<_, bool>(5));

    let row = db
        .query_one(
            "select starts_at = '2026-12-01 09:00:00.5+00', ends_at = 'infinity', work_ids = array[$2, $3]::uuid[]
               from activities where id = $1",
            &[&activity, &upper, &work],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "offset applied, fraction kept");
    assert!(row.get::<_, bool>(1), "infinity");
    assert!(row.get::<_, bool>(2), "uuid[] normalised");

    let row = db
        .query_one(
            "select width = 'NaN', height = 1.5, background = '{\"a\": [1, {\"b\": null}]}'
               from boards where id = $1",
            &[&board],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    let row = db
        .query_one(
            "select bbox is null, z_index from strokes where id = $1",
            &[&stroke],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "a JSON null is SQL NULL");
    assert_eq!(row.get::<_, i32>(1), -3);
    let size: i64 = db
        .query_one("select size from blobs_meta", &[])
        .await
        .unwrap()
        .get(0);
    // The largest size blobs_meta takes (sql/0005); bigints past 2^53 as strings: the value decoder's unit tests.
    assert_eq!(size, 9_007_199_254_740_991, "a bigint as a string");

    // A timestamp exactly as Postgres prints it (what the stream sends) writes back unchanged.
    let printed: String = db
        .query_one("select created_at::text from works where id = $1", &[&work])
        .await
        .unwrap()
        .get(0);
    let (status, body) = env
        .batch(
            user,
            json!([op(
                "update",
                "activities",
                json!({"id": activity, "starts_at": printed})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let same: bool = db
        .query_one(
            "select a.starts_at = w.created_at from activities a, works w where a.id = $1 and w.id = $2",
            &[&activity, &work],
        )
        .await
        .unwrap()
        .get(0);
    assert!(same, "{printed} did not round-trip");
}

/// Values that do not fit their column are refused with 400 and the op's index, naming the column, before the
/// database: the whole batch writes nothing.
/// Asserts that a batch was refused with 400 `invalid_value` at op 1, naming `column`; returns the message.
/// `context` says which case failed.
fn refused_value_of_op_1<'b>(
    status: reqwest::StatusCode,
    body: &'b Value,
    column: &str,
    context: &str,
) -> &'b str {
    assert_eq!(
        (status.as_u16(), error_code(body)),
        (400, "invalid_value"),
        "{context}: {body}"
    );
    assert_eq!(body["error"]["op_index"], 1, "{context}: {body}");
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("column `{column}`")),
        "{context}: {message}"
    );
    message
}

#[tokio::test]
async fn values_that_do_not_fit_their_column_are_refused() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "activities",
            json!({"title": "t", "starts_at": "yesterday"}),
            "starts_at",
        ),
        (
            "activities",
            json!({"title": "t", "starts_at": "now"}),
            "starts_at",
        ),
        (
            "activities",
            json!({"title": "t", "starts_at": "2026-12-01"}),
            "starts_at",
        ),
        (
            "activities",
            json!({"title": "t", "starts_at": "2026-12-01T10:00:00"}),
            "starts_at",
        ),
        (
            "activities",
            json!({"title": "t", "starts_at": "2026-02-30T10:00:00Z"}),
            "starts_at",
        ),
        (
            "activities",
            json!({"title": "t", "work_ids": ["not-a-uuid"]}),
            "work_ids",
        ),
        (
            "works",
            json!({"title": "t", "favorite": "yes"}),
            "favorite",
        ),
        ("works", json!({"title": "t", "year": 2019.5}), "year"),
        (
            "works",
            json!({"title": "t", "year": 99_999_999_999_i64}),
            "year",
        ),
        ("works", json!({"title": "t", "tags": "{a,b}"}), "tags"),
        ("works", json!({"title": "t", "tags": [["a"]]}), "tags"),
        ("works", json!({"title": 7}), "title"),
        ("works", json!({"title": "a\u{0}b"}), "title"),
        (
            "works",
            json!({"title": "t", "authors": [{"name": "a\u{0}b"}]}),
            "authors",
        ),
        ("boards", json!({"width": "1.5"}), "width"),
        (
            "blobs_meta",
            json!({"sha256": deeprecall_tests::sha(1), "size": 1.5}),
            "size",
        ),
    ];
    for (table, row, column) in cases {
        let ops = json!([
            insert("works", json!({"title": "first"})),
            insert(table, row.clone())
        ]);
        let (status, body) = env.batch(user, ops).await;
        refused_value_of_op_1(status, &body, column, &format!("{table} {row}"));
    }
    for t in TABLES.iter().chain(&["blobs_meta", "sync_applied_ops"]) {
        assert_eq!(
            count(&db, &format!("select count(*) from {t}"), &[]).await,
            0,
            "{t}"
        );
    }
}

/// JSON that is valid but that a column cannot hold is refused by the server with the op's index, before
/// Postgres sees it: a `jsonb` value nested deeper than the server's bound (Postgres would give up with "stack
/// depth limit exceeded", a 500), and a string holding half a UTF-16 surrogate pair (no text form). Sent as raw
/// bodies: neither survives a round trip through `serde_json::Value`.
#[tokio::test]
async fn json_values_a_column_cannot_hold_are_refused_before_postgres() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    let body = |second_row: String| {
        format!(
            r#"{{"ops":[{{"op_id":"{}","table":"works","kind":"insert","row":{{"title":"first"}}}},
                {{"op_id":"{}","table":"works","kind":"insert","row":{second_row}}}]}}"#,
            Uuid::new_v4(),
            Uuid::new_v4()
        )
        .into_bytes()
    };
    let cases = [
        (
            format!(r#"{{"title":"t","authors":{}}}"#, nested(1001)),
            "authors",
            "1001 deep",
        ),
        (
            format!(r#"{{"title":"t","authors":{}}}"#, nested(100_000)),
            "authors",
            "100000 deep",
        ),
        (r#"{"title":"a\ud800b"}"#.to_owned(), "title", "surrogate"),
        (
            r#"{"title":"t","authors":"\udc00"}"#.to_owned(),
            "authors",
            "surrogate",
        ),
    ];
    for (row, column, says) in cases {
        let (status, body) = env.post_raw("/v1/batch", Some(&token), body(row)).await;
        let message = refused_value_of_op_1(status, &body, column, column);
        assert!(message.contains(says), "{message}");
    }
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);

    // At the bound the value is Postgres's to take, and it keeps it as sent.
    let (status, body) = env
        .post_raw(
            "/v1/batch",
            Some(&token),
            body(format!(r#"{{"title":"t","authors":{}}}"#, nested(1000))),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(
        count(
            &db,
            "select count(*) from works where authors::text = $1",
            &[&nested(1000)]
        )
        .await,
        1
    );
}

/// Types the server does not decode itself travel as text and are cast by Postgres, which applies its own input
/// rules (and reports errors with the op's index); explicit casts never truncate.
#[tokio::test]
async fn other_types_are_cast_by_postgres() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    db.batch_execute(
        "create table readings (
           id uuid not null default gen_random_uuid(),
           owner_id uuid not null default deeprecall_current_user_id(),
           amount numeric(30,20),
           day date,
           took interval,
           code varchar(3),
           days date[],
           created_at timestamptz not null default now(),
           updated_at timestamptz not null default now(),
           primary key (owner_id, id));
         alter publication deeprecall_sync add table readings;",
    )
    .await
    .unwrap();
    let mut migrator = deeprecall_tests::connect(&env.db_url()).await;
    deeprecall_sync::db::migrate::migrate(&mut migrator)
        .await
        .expect("migrate");
    let id = Uuid::new_v4();
    let good = insert(
        "readings",
        json!({"id": id, "amount": "AMOUNT", "day": "2026-12-01", "took": "1 day 02:00:00",
               "code": "abc", "days": ["2026-12-01", null]}),
    );
    // A JSON number with more digits than an f64 holds, sent as raw JSON: numeric keeps every digit.
    let body = good
        .to_string()
        .replace("\"AMOUNT\"", "3.14159265358979323846");
    let token = env.token(user);
    let mut last = Value::Null;
    for _ in 0..50 {
        let (status, resp) = env
            .post_raw(
                "/v1/batch",
                Some(&token),
                format!("{{\"ops\":[{body}]}}").into_bytes(),
            )
            .await;
        if status == 200 {
            last = Value::Null;
            break;
        }
        last = resp;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(last, Value::Null, "readings never became writable");
    let row = db
        .query_one(
            "select amount::text, day = '2026-12-01', took = '26 hours', code, days::text from readings where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "3.14159265358979323846");
    assert!(row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(row.get::<_, String>(3), "abc");
    assert_eq!(row.get::<_, String>(4), "{2026-12-01,NULL}");
    for (row, want) in [
        (json!({"amount": "twenty"}), "invalid_value"),
        (json!({"code": "abcd"}), "invalid_value"),
        (json!({"day": {"y": 2026}}), "invalid_value"),
    ] {
        let ops = json!([
            insert("works", json!({"title": "x"})),
            insert("readings", row.clone())
        ]);
        let (status, body) = env.batch(user, ops).await;
        assert_eq!(
            (
                status.as_u16(),
                error_code(&body),
                &body["error"]["op_index"]
            ),
            (400, want, &json!(1)),
            "{row}: {body}"
        );
    }
    assert_eq!(
        count(&db, "select count(*) from readings", &[]).await,
        1,
        "a varchar(3) is not silently truncated"
    );
}

/// `db::begin_scoped`, the one place the row-level-security session is set up (every path uses it; the live
/// snapshot will too): role and user are set for the transaction only, `first_reading` expressions come from the
/// transaction's first statement, and a read-only transaction is not given a transaction id.
#[tokio::test]
async fn the_session_function_sets_role_and_user_for_one_transaction() {
    use deeprecall_sync::db::{Scope, begin_scoped, run_scoped};
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let mut client = env.state.pool.get().await.unwrap();
    let scope = Scope::user(user)
        .isolation(tokio_postgres::IsolationLevel::RepeatableRead)
        .read_only()
        .first_reading(&[
            "pg_current_snapshot()::text",
            "pg_current_wal_insert_lsn()::text",
        ]);
    {
        let session = begin_scoped(&mut client, &scope, &[]).await.unwrap();
        let snapshot: String = session.head.get(0);
        let lsn: String = session.head.get(1);
        assert_eq!(snapshot.split(':').count(), 3, "{snapshot}");
        assert!(lsn.contains('/'), "{lsn}");
        assert_eq!(session.txid, None);
        let row = session
        .tx
        .query_one(
            "select current_user::text, current_setting('app.user_id'), \
                    current_setting('transaction_isolation'), current_setting('transaction_read_only'), \
                    pg_current_xact_id_if_assigned() is null, pg_current_snapshot()::text",
            &[],
        )
        .await
        .unwrap();
        assert_eq!(row.get::<_, String>(0), "deeprecall_user");
        assert_eq!(row.get::<_, String>(1), user.to_string());
        assert_eq!(row.get::<_, String>(2), "repeatable read");
        assert_eq!(row.get::<_, String>(3), "on");
        assert!(row.get::<_, bool>(4), "a read-only session has no xid");
        assert_eq!(
            row.get::<_, String>(5),
            snapshot,
            "the first statement took the snapshot"
        );
        session.tx.commit().await.unwrap();
    }
    // Transaction-local: the pooled connection is back to the server's role with no user.
    let row = client
        .query_one(
            "select current_user::text <> 'deeprecall_user', current_setting('app.user_id', true)",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, Option<String>>(1).unwrap_or_default(), "");

    // The one-round-trip form: a failing statement rolls the whole transaction back.
    let insert = client
        .prepare_cached("insert into works (title) values ($1)")
        .await
        .unwrap();
    let (ok, bad): (&str, Option<&str>) = ("kept?", None);
    let trip = run_scoped(
        &mut client,
        &Scope::user(user).with_txid(),
        &[(&insert, &[&ok]), (&insert, &[&bad])],
    )
    .await
    .unwrap();
    assert!(trip.txid.is_some());
    assert!(trip.results[0].is_ok() && trip.results[1].is_err());
    assert!(!trip.committed);
    let trip = run_scoped(
        &mut client,
        &Scope::user(user).with_txid(),
        &[(&insert, &[&ok])],
    )
    .await
    .unwrap();
    assert!(trip.committed);
    let db = env.superuser().await;
    assert_eq!(
        count(
            &db,
            "select count(*) from works where owner_id = $1",
            &[&user]
        )
        .await,
        1
    );
    // The txid is the committed row's (a fresh cluster: xid and xid8 agree).
    let row = db
        .query_one("select xmin::text from works where owner_id = $1", &[&user])
        .await
        .unwrap();
    assert_eq!(trip.txid.as_deref(), Some(row.get::<_, &str>(0)));
}
