//! Guest → user upgrade: a guest's offline queue (client ids, no owner) flushed after sign-in ends in exactly the
//! same rows however often it is interrupted and re-sent, all owned by the signed-in user.
//!
//! The same queue is flushed for three fresh users in one database (op ids and row ids are per owner, so they do
//! not collide): cleanly once, cut off after half of the batches and then flushed again, and with every request
//! abandoned mid-flight before a full flush. Their rows must be identical apart from the owner and the clocks.

use std::time::Duration;

use deeprecall_tests::batch::numbered;
use deeprecall_tests::{TestEnv, count, insert, op, sha, statuses};
use serde_json::{Value, json};
use uuid::Uuid;

const TABLES: &[&str] = &[
    "works",
    "assets",
    "annotations",
    "activities",
    "boards",
    "strokes",
    "blobs_meta",
    "device_blobs",
];

/// What the guest's client has queued: one blob coordination and four batches, as the client would send them.
struct Queue {
    coordinate: Value,
    batches: Vec<Value>,
}

fn guest_queue() -> Queue {
    let device = Uuid::new_v4();
    let (w1, w2, a1, a2, n1, n2, board) = (
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
        Uuid::new_v4(),
    );
    // A guest has no owner: whatever stale owner id the local store holds is ignored.
    let guest_owner = Uuid::nil();
    let coordinate = json!({"device_id": device, "complete": true, "blobs": [
        {"sha256": sha(0xa1), "size": 123_456, "mime": "application/pdf", "filename": "attention.pdf",
         "path": "/guest/attention.pdf", "page_count": 15},
        {"sha256": sha(0xa2), "size": 654_321, "mime": "application/pdf", "filename": "bert.pdf",
         "path": "/guest/bert.pdf", "page_count": 16},
    ]});
    let batches = vec![
        json!([
            insert(
                "works",
                json!({"id": w1, "title": "Attention", "year": 2017, "owner_id": guest_owner})
            ),
            insert(
                "works",
                json!({"id": w2, "title": "BERT", "authors": [{"name": "Devlin"}]})
            ),
        ]),
        json!([
            insert(
                "assets",
                json!({"id": a1, "sha256": sha(0xa1), "work_id": w1})
            ),
            insert(
                "assets",
                json!({"id": a2, "sha256": sha(0xa2), "work_id": w2, "role": "main"})
            ),
            op(
                "update",
                "works",
                json!({"id": w1, "title": "Attention Is All You Need"})
            ),
        ]),
        json!([
            insert(
                "annotations",
                json!({"id": n1, "work_id": w1, "asset_id": a1, "page": 1, "quote": "attention",
                                          "geometry": {"rects": [[1, 2, 3, 4]]}, "color": "yellow"})
            ),
            insert(
                "annotations",
                json!({"id": n2, "work_id": w1, "asset_id": a1, "page": 2, "kind": "note",
                                          "body": "draft"})
            ),
            insert(
                "boards",
                json!({"id": board, "work_id": w1, "title": "Notes"})
            ),
        ]),
        json!([
            op("delete", "annotations", json!({"id": n2})),
            op(
                "upsert",
                "annotations",
                json!({"id": n1, "body": "key idea", "tags": ["core"]})
            ),
            insert(
                "strokes",
                json!({"id": Uuid::new_v4(), "board_id": board, "points": [[0, 0], [5, 5]]})
            ),
            insert(
                "activities",
                json!({"id": Uuid::new_v4(), "title": "Reading group", "work_ids": [w1, w2]})
            ),
            op(
                "update",
                "works",
                json!({"id": w2, "favorite": true, "read_status": "read"})
            ),
        ]),
    ];
    Queue {
        coordinate,
        batches,
    }
}

async fn flush_coordinate(env: &TestEnv, user: Uuid, queue: &Queue) {
    let (status, body) = env.coordinate(user, queue.coordinate.clone()).await;
    assert_eq!(status, 200, "{body}");
}

async fn flush_batch(env: &TestEnv, user: Uuid, batch: &Value) -> Vec<String> {
    let (status, body) = env.batch(user, batch.clone()).await;
    assert_eq!(status, 200, "{body}");
    statuses(&body)
}

/// Everything `user` owns, without the owner and the clocks (which differ between users by construction), in
/// id order per table.
async fn rows_of(db: &tokio_postgres::Client, user: Uuid) -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    for t in TABLES {
        // Blob rows get their ids from the server (coordination carries none): compare them by natural key.
        let (drop, order) = match *t {
            "blobs_meta" => (",id", "sha256"),
            "device_blobs" => (",id", "device_id, sha256"),
            _ => ("", "id"),
        };
        let sql = format!(
            "select to_jsonb(t) - '{{owner_id,created_at,updated_at,last_seen_at{drop}}}'::text[] from {t} t
              where owner_id = $1 order by {order}"
        );
        let rows = db
            .query(&sql, &[&user])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        out.push(((*t).to_owned(), rows));
    }
    out
}

#[tokio::test]
async fn an_interrupted_flush_ends_in_the_same_rows_as_a_clean_one() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let queue = guest_queue();

    // Clean: coordinate, then every batch once.
    let clean = Uuid::new_v4();
    flush_coordinate(&env, clean, &queue).await;
    for batch in &queue.batches {
        let s = flush_batch(&env, clean, batch).await;
        assert!(s.iter().all(|s| s == "applied"), "{s:?}");
    }
    let expected = rows_of(&db, clean).await;
    for (table, rows) in &expected {
        assert!(!rows.is_empty(), "the queue writes {table}");
    }

    // Cut off after half of the batches (the app was closed), then the whole queue again from the start.
    let resumed = Uuid::new_v4();
    flush_coordinate(&env, resumed, &queue).await;
    let half = queue.batches.len() / 2;
    for batch in &queue.batches[..half] {
        flush_batch(&env, resumed, batch).await;
    }
    flush_coordinate(&env, resumed, &queue).await;
    for (i, batch) in queue.batches.iter().enumerate() {
        let s = flush_batch(&env, resumed, batch).await;
        let want = if i < half { "duplicate" } else { "applied" };
        assert!(s.iter().all(|s| s == want), "batch {i}: {s:?}");
    }
    assert_eq!(rows_of(&db, resumed).await, expected);

    // Every request abandoned at a random point (the response may or may not have been committed), then a
    // full flush.
    let abandoned = Uuid::new_v4();
    for (i, batch) in queue.batches.iter().enumerate() {
        let delay = Duration::from_millis(2 * i as u64);
        let _ =
            tokio::time::timeout(delay, env.coordinate(abandoned, queue.coordinate.clone())).await;
        let _ = tokio::time::timeout(delay, env.batch(abandoned, batch.clone())).await;
    }
    flush_coordinate(&env, abandoned, &queue).await;
    for batch in &queue.batches {
        let s = flush_batch(&env, abandoned, batch).await;
        assert!(
            s.iter().all(|s| s == "applied" || s == "duplicate"),
            "{s:?}"
        );
    }
    assert_eq!(rows_of(&db, abandoned).await, expected);

    // Every row in the database belongs to one of the three signed-in users; nothing to the guest's stale id.
    for t in TABLES {
        let stray = count(
            &db,
            &format!("select count(*) from {t} where owner_id not in ($1, $2, $3)"),
            &[&clean, &resumed, &abandoned],
        )
        .await;
        assert_eq!(stray, 0, "{t}");
    }
    // The BlobHandle of the flushed blob is complete for the user.
    let (status, handle) = env
        .get(
            &format!("/v1/blobs/{}", sha(0xa1)),
            Some(&env.token(resumed)),
        )
        .await;
    assert_eq!(status, 200, "{handle}");
    assert_eq!(handle["assets"].as_array().map(Vec::len), Some(1));
    assert_eq!(handle["devices"].as_array().map(Vec::len), Some(1));
}

/// The same queue on the sequence path: the outbox has a `client_id` and numbered its ops when they were queued.
/// Interrupted and re-sent from the start, or abandoned mid-flight, the flush ends in the clean flush's rows.
#[tokio::test]
async fn an_interrupted_flush_with_a_client_sequence_ends_in_the_same_rows() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let queue = guest_queue();
    let mut next = 1;
    let batches: Vec<Vec<Value>> = queue
        .batches
        .iter()
        .map(|b| {
            let ops = numbered(b.as_array().expect("a batch is an array"), next);
            next += ops.len() as i64;
            ops
        })
        .collect();
    let flush = |user: Uuid, client: Uuid, batch: &[Value]| {
        let env = &env;
        let batch = batch.to_vec();
        async move {
            let (status, body) = env.seq_batch(user, client, &batch).await;
            assert_eq!(status, 200, "{body}");
            statuses(&body)
        }
    };

    let clean = Uuid::new_v4();
    let client = Uuid::new_v4();
    flush_coordinate(&env, clean, &queue).await;
    for batch in &batches {
        let s = flush(clean, client, batch).await;
        assert!(s.iter().all(|s| s == "applied"), "{s:?}");
    }
    let expected = rows_of(&db, clean).await;

    let resumed = Uuid::new_v4();
    flush_coordinate(&env, resumed, &queue).await;
    let half = batches.len() / 2;
    for batch in &batches[..half] {
        flush(resumed, client, batch).await;
    }
    // The whole outbox again, as one request: the first half answers duplicate, the rest applies.
    let all: Vec<Value> = batches.concat();
    let s = flush(resumed, client, &all).await;
    let done: usize = batches[..half].iter().map(Vec::len).sum();
    assert!(s[..done].iter().all(|s| s == "duplicate"), "{s:?}");
    assert!(s[done..].iter().all(|s| s == "applied"), "{s:?}");
    assert_eq!(rows_of(&db, resumed).await, expected);

    let abandoned = Uuid::new_v4();
    for (i, batch) in batches.iter().enumerate() {
        let delay = Duration::from_millis(2 * i as u64);
        let _ =
            tokio::time::timeout(delay, env.coordinate(abandoned, queue.coordinate.clone())).await;
        let _ = tokio::time::timeout(delay, env.seq_batch(abandoned, client, batch)).await;
    }
    flush_coordinate(&env, abandoned, &queue).await;
    for batch in &batches {
        let s = flush(abandoned, client, batch).await;
        assert!(
            s.iter().all(|s| s == "applied" || s == "duplicate"),
            "{s:?}"
        );
    }
    assert_eq!(rows_of(&db, abandoned).await, expected);
}
