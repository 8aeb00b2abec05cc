//! Sequence idempotency (`client_id` + `seq`): replays, overlaps, gaps, concurrent retries of the same batch, and a
//! request whose answer was lost after the commit. The contract is docs/api.md "Idempotency".

use std::time::Duration;

use deeprecall_tests::batch::numbered;
use deeprecall_tests::{TestEnv, count, dump_table, error_code, insert, op, statuses, xmins};
use serde_json::{Value, json};
use uuid::Uuid;

async fn last_seq(db: &tokio_postgres::Client, user: Uuid, client: Uuid) -> Option<i64> {
    db.query_opt(
        "select last_seq from sync_clients where owner_id = $1 and client_id = $2",
        &[&user, &client],
    )
    .await
    .unwrap()
    .map(|r| r.get(0))
}

async fn works_of(db: &tokio_postgres::Client, user: Uuid) -> i64 {
    count(
        db,
        "select count(*) from works where owner_id = $1",
        &[&user],
    )
    .await
}

/// Inserts without an id: not idempotent by themselves (each run creates new rows), so only the sequence can keep
/// a replay from applying them again.
fn idless(n: usize, tag: &str) -> Vec<Value> {
    (0..n)
        .map(|i| insert("works", json!({"title": format!("{tag} {i}")})))
        .collect()
}

#[tokio::test]
async fn replays_overlaps_and_gaps() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let client = Uuid::new_v4();
    let queue = numbered(&idless(8, "w"), 1);

    // A new client: seqs 1–3 apply.
    let (status, body) = env.seq_batch(user, client, &queue[0..3]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"; 3]);
    assert_eq!(body["last_seq"], 3);
    assert_eq!(body["results"][2]["seq"], 3);
    assert_eq!(body["results"][2]["op_id"], queue[2]["op_id"]);
    assert_eq!(last_seq(&db, user, client).await, Some(3));
    let before = (
        dump_table(&db, "works", &[]).await,
        xmins(&db, "works").await,
    );

    // The same batch again: all duplicate, nothing rewritten (xmin unchanged), last_seq unchanged.
    for _ in 0..2 {
        let (status, body) = env.seq_batch(user, client, &queue[0..3]).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(statuses(&body), ["duplicate"; 3]);
        assert_eq!(body["last_seq"], 3);
        assert_eq!(
            (
                dump_table(&db, "works", &[]).await,
                xmins(&db, "works").await
            ),
            before
        );
    }

    // Overlap: 2–5 answers 2 and 3 duplicate and applies 4 and 5.
    let (status, body) = env.seq_batch(user, client, &queue[1..5]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        statuses(&body),
        ["duplicate", "duplicate", "applied", "applied"]
    );
    assert_eq!(body["last_seq"], 5);
    assert_eq!(works_of(&db, user).await, 5);

    // A gap: the batch starts at 7 while the server is at 5. Refused whole with the server's last_seq.
    let (status, body) = env.seq_batch(user, client, &queue[6..8]).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (409, "seq_gap"),
        "{body}"
    );
    assert_eq!(body["error"]["last_seq"], 5, "{body}");
    assert_eq!(works_of(&db, user).await, 5);
    assert_eq!(last_seq(&db, user, client).await, Some(5));

    // An empty batch tells the client where it stands.
    let (status, body) = env.seq_batch(user, client, &[]).await;
    assert_eq!(
        (status.as_u16(), &body["last_seq"]),
        (200, &json!(5)),
        "{body}"
    );
    let (status, body) = env.seq_batch(user, Uuid::new_v4(), &[]).await;
    assert_eq!(
        (status.as_u16(), &body["last_seq"]),
        (200, &json!(0)),
        "{body}"
    );

    // Resending from last_seq + 1 fills the gap.
    let (status, body) = env.seq_batch(user, client, &queue[5..8]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"; 3]);
    assert_eq!(body["last_seq"], 8);
    assert_eq!(works_of(&db, user).await, 8);

    // The sequence path never touches the per-op ledger.
    assert_eq!(
        count(
            &db,
            "select count(*) from sync_applied_ops where owner_id = $1",
            &[&user]
        )
        .await,
        0
    );

    // client_ids are per user: another user's outbox with the same id starts from 0.
    let other = Uuid::new_v4();
    let (status, body) = env.seq_batch(other, client, &queue[0..2]).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied"; 2]);
    assert_eq!(last_seq(&db, other, client).await, Some(2));
    assert_eq!(last_seq(&db, user, client).await, Some(8));
}

#[tokio::test]
async fn bad_sequences_are_refused_and_a_rejected_batch_does_not_advance() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let client = Uuid::new_v4();
    let token = env.token(user);
    let (status, body) = env
        .seq_batch(user, client, &numbered(&idless(2, "a"), 1))
        .await;
    assert_eq!(status, 200, "{body}");

    let ops = numbered(&idless(3, "b"), 3);
    let mut skipping = ops.clone();
    skipping[1]["seq"] = json!(5);
    let mut missing = ops.clone();
    missing[2].as_object_mut().unwrap().remove("seq");
    let mut zero = ops.clone();
    zero[0]["seq"] = json!(0);
    let cases: Vec<(&str, Value, &str, Option<u64>)> = vec![
        (
            "seq jumps inside the batch",
            json!({"client_id": client, "ops": skipping}),
            "invalid_seq",
            Some(1),
        ),
        (
            "an op without seq",
            json!({"client_id": client, "ops": missing}),
            "missing_seq",
            Some(2),
        ),
        (
            "seq 0",
            json!({"client_id": client, "ops": zero}),
            "invalid_seq",
            Some(0),
        ),
        (
            "seq without client_id",
            json!({"ops": ops}),
            "missing_client_id",
            Some(0),
        ),
        (
            "client_id not a uuid",
            json!({"client_id": "laptop", "ops": ops}),
            "invalid_client_id",
            None,
        ),
    ];
    for (name, body, code, index) in cases {
        let (status, resp) = env.post("/v1/batch", Some(&token), &body).await;
        assert_eq!(
            (status.as_u16(), error_code(&resp)),
            (422, code),
            "{name}: {resp}"
        );
        assert_eq!(resp["error"]["op_index"].as_u64(), index, "{name}: {resp}");
    }
    assert_eq!(works_of(&db, user).await, 2);

    // A batch Postgres rejects (a foreign key to a missing work at its second op) applies nothing and leaves
    // last_seq where it was; the corrected batch with the same seqs then applies.
    let work = Uuid::new_v4();
    let bad = numbered(
        &[
            insert("works", json!({"id": work, "title": "parent"})),
            insert(
                "annotations",
                json!({"id": Uuid::new_v4(), "work_id": Uuid::new_v4()}),
            ),
        ],
        3,
    );
    let (status, resp) = env.seq_batch(user, client, &bad).await;
    assert_eq!(
        (status.as_u16(), error_code(&resp)),
        (422, "foreign_key_violation"),
        "{resp}"
    );
    assert_eq!(resp["error"]["op_index"], 1, "{resp}");
    assert_eq!(last_seq(&db, user, client).await, Some(2));
    assert_eq!(works_of(&db, user).await, 2);
    let mut fixed = bad.clone();
    fixed[1]["row"]["work_id"] = json!(work);
    let (status, resp) = env.seq_batch(user, client, &fixed).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(statuses(&resp), ["applied"; 2]);
    assert_eq!(last_seq(&db, user, client).await, Some(4));
}

#[tokio::test]
async fn concurrent_retries_of_the_same_batch_apply_it_once() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    // Round 0 is the client's first batch: the concurrent requests also race to create its row.
    let client = Uuid::new_v4();
    let mut next = 1;
    for round in 0..5 {
        let ops = numbered(&idless(20, &format!("r{round}")), next);
        next += 20;
        let sends = (0..4).map(|_| env.seq_batch(user, client, &ops));
        let answers = futures::future::join_all(sends).await;
        for (status, body) in &answers {
            assert_eq!(*status, 200, "round {round}: {body}");
            assert_eq!(body["last_seq"], next - 1, "round {round}: {body}");
        }
        // Every op applied by exactly one of the four requests (each request is all applied or all duplicate,
        // since it waits for the others' transactions on the client's row).
        for i in 0..20 {
            let applied = answers
                .iter()
                .filter(|(_, b)| b["results"][i]["status"] == "applied")
                .count();
            assert_eq!(applied, 1, "round {round}, op {i}: {answers:?}");
        }
        let pattern = format!("r{round} %");
        assert_eq!(
            count(
                &db,
                "select count(*) from works where owner_id = $1 and title like $2",
                &[&user, &pattern]
            )
            .await,
            20,
            "round {round}"
        );
    }
    assert_eq!(last_seq(&db, user, client).await, Some(100));
    assert_eq!(
        count(
            &db,
            "select count(*) from sync_clients where owner_id = $1",
            &[&user]
        )
        .await,
        1
    );
}

/// The client sent a batch, the server committed it, and the answer never reached the client (its connection died,
/// or the server crashed right after the commit). The retry is answered `duplicate` and changes nothing.
#[tokio::test]
async fn an_answer_lost_after_the_commit_is_a_duplicate_on_retry() {
    let mut env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let client = Uuid::new_v4();
    let mut next = 1;
    for (round, restart) in [(0, false), (1, true)] {
        let ops = numbered(&idless(5, &format!("lost{round}")), next);
        next += 5;
        let body = json!({"client_id": client, "ops": ops});
        let connection = env.send_unread("/v1/batch", &token, &body).await;
        // Wait for the commit, then drop the connection without reading the answer.
        let mut committed = false;
        for _ in 0..200 {
            if last_seq(&db, user, client).await == Some(next - 1) {
                committed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(committed, "round {round}: the batch never committed");
        drop(connection);
        if restart {
            // A crash right after the commit: the retry reaches another server process.
            env.restart_server().await;
        }
        let rows = (
            dump_table(&db, "works", &[]).await,
            xmins(&db, "works").await,
        );
        let (status, resp) = env.seq_batch(user, client, &ops).await;
        assert_eq!(status, 200, "round {round}: {resp}");
        assert_eq!(statuses(&resp), ["duplicate"; 5], "round {round}");
        assert_eq!(
            (
                dump_table(&db, "works", &[]).await,
                xmins(&db, "works").await
            ),
            rows,
            "round {round}: the retry rewrote rows"
        );
    }
    assert_eq!(works_of(&db, user).await, 10);

    // The same holds for the per-op ledger (batches without client_id).
    let ops = idless(3, "ledger");
    let connection = env
        .send_unread("/v1/batch", &token, &json!({"ops": ops}))
        .await;
    for _ in 0..200 {
        if works_of(&db, user).await == 13 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    drop(connection);
    let (status, resp) = env.batch(user, json!(ops)).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(statuses(&resp), ["duplicate"; 3]);
    assert_eq!(works_of(&db, user).await, 13);
}

/// Connections dropped at random points (before, during or after the commit): whatever happened, the retry leaves
/// every op applied exactly once.
#[tokio::test]
async fn requests_dropped_at_any_point_end_applied_exactly_once() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let client = Uuid::new_v4();
    let mut next = 1;
    for round in 0..8u64 {
        let ops = numbered(&idless(10, &format!("d{round}")), next);
        next += 10;
        let body = json!({"client_id": client, "ops": ops});
        let connection = env.send_unread("/v1/batch", &token, &body).await;
        tokio::time::sleep(Duration::from_millis(round * 3)).await;
        drop(connection);
        let (status, resp) = env.seq_batch(user, client, &ops).await;
        assert_eq!(status, 200, "round {round}: {resp}");
        let s = statuses(&resp);
        assert!(
            s.iter().all(|x| x == "applied") || s.iter().all(|x| x == "duplicate"),
            "round {round}: {s:?}"
        );
        let pattern = format!("d{round} %");
        assert_eq!(
            count(
                &db,
                "select count(*) from works where owner_id = $1 and title like $2",
                &[&user, &pattern]
            )
            .await,
            10,
            "round {round}"
        );
    }
    assert_eq!(last_seq(&db, user, client).await, Some(80));
}

#[tokio::test]
async fn op_ids_stay_accepted_and_answered_on_the_sequence_path() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let client = Uuid::new_v4();
    let id = Uuid::new_v4();
    let ops = numbered(
        &[
            insert("works", json!({"id": id, "title": "t"})),
            op("update", "works", json!({"id": id, "year": 2020})),
            op("delete", "works", json!({"id": Uuid::new_v4()})),
        ],
        1,
    );
    let (status, body) = env.seq_batch(user, client, &ops).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), ["applied", "applied", "not_found"]);
    for (result, op) in body["results"].as_array().unwrap().iter().zip(&ops) {
        assert_eq!(result["op_id"], op["op_id"]);
        assert_eq!(result["seq"], op["seq"]);
    }
    // A repeated op_id is still refused inside one batch.
    let mut twice = numbered(&idless(2, "x"), 4);
    twice[1]["op_id"] = twice[0]["op_id"].clone();
    let (status, body) = env.seq_batch(user, client, &twice).await;
    assert_eq!(
        (
            status.as_u16(),
            error_code(&body),
            &body["error"]["op_index"]
        ),
        (422, "duplicate_op_id", &json!(1)),
        "{body}"
    );
}
