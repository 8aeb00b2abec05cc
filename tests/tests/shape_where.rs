//! The filter model against Postgres itself: shapes with SQL `where` clauses (comparisons, ranges, OR, NOT, IN,
//! IS NULL, params, arrays, timestamps, C-collation text order) converge to what Postgres answers for the same
//! condition, through the snapshot and a stream of live updates that move rows in and out. And the WebSocket's
//! JSON `where` on array and jsonb columns.

use std::time::Duration;

use deeprecall_tests::shape::{Follower, enc, truth_text};
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TestEnv, insert, op};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// A `where` for the endpoint, its params, and the same condition for the truth query.
type Case = (&'static str, Vec<(usize, &'static str)>, &'static str);

fn shapes() -> Vec<Case> {
    vec![
        (
            "year >= 2000 AND year < 2010",
            vec![],
            "year >= 2000 and year < 2010",
        ),
        (
            "year IS NULL OR favorite",
            vec![],
            "year is null or favorite",
        ),
        (
            "read_status IN ('unread', 'reading') AND NOT favorite",
            vec![],
            "read_status in ('unread', 'reading') and not favorite",
        ),
        (
            "title <> 'x' AND (year > $1 OR year < $2)",
            vec![(1, "2015"), (2, "1995")],
            "title <> 'x' and (year > 2015 or year < 1995)",
        ),
        ("tags = '{a,\"b c\"}'", vec![], "tags = '{a,\"b c\"}'"),
        // SQL's NOT IN with a NULL in the list is never true.
        (
            "NOT (year IN (2001, 2003, NULL))",
            vec![],
            "not (year in (2001, 2003, null))",
        ),
        (
            "year NOT IN (2001, 2003)",
            vec![],
            "year not in (2001, 2003)",
        ),
        (
            "created_at > '2000-01-01 00:00:00+00'",
            vec![],
            "created_at > '2000-01-01 00:00:00+00'",
        ),
        // Text order is byte order (C collation), on both sides.
        ("title > 'M'", vec![], "title > 'M' collate \"C\""),
        ("\"Title\" = 1", vec![], "false"),
    ]
}

#[tokio::test]
async fn where_shapes_converge_to_postgres() {
    let env = TestEnv::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let db = env.superuser().await;
    db.batch_execute(r#"alter table works add column "Title" integer"#)
        .await
        .unwrap();
    // The first change streamed after the DDL carries the new column list, and subscriptions of `works` refetch
    // then (`schema_changed`). A shape whose snapshot ran while the server caught up on the writes below got that
    // 409 instead of its rows; this watcher sees when the refetch has happened.
    let mut watcher = StreamClient::connect(&env.base, &env.token(alice)).await;
    watcher.subscribe("w", "works", json!(null)).await;
    watcher.up_to_date("w").await;
    let titles = ["alpha", "Beta", "x", "Zulu", "mike", "Ünïcode", "M", "m"];
    let years: [Option<i32>; 8] = [
        None,
        Some(1990),
        Some(2001),
        Some(2003),
        Some(2005),
        Some(2012),
        Some(2020),
        Some(1999),
    ];
    let statuses = ["unread", "reading", "read"];
    let tag_sets: [&[&str]; 3] = [&["a", "b c"], &[], &["a"]];
    let ids: Vec<Uuid> = (0..24).map(|_| Uuid::new_v4()).collect();
    for (i, id) in ids.iter().enumerate() {
        let row = json!({
            "id": id, "title": titles[i % titles.len()], "year": years[i % years.len()],
            "read_status": statuses[i % 3], "favorite": i % 4 == 0, "tags": tag_sets[i % 3],
        });
        let (s, b) = env
            .batch(alice, json!([insert("works", row.clone())]))
            .await;
        assert_eq!(s, 200, "{b}");
        // Bob has rows matching every shape too; they must never show up.
        env.batch(bob, json!([insert("works", json!({"id": Uuid::new_v4(), "title": titles[i % titles.len()], "year": years[i % years.len()]}))]))
            .await;
    }
    let refetch = watcher.until(T, |v| v["type"] == "must_refetch").await;
    assert_eq!(refetch["reason"], "schema_changed", "{refetch}");
    watcher.close().await;
    let token = env.token(alice);
    let mut followers = Vec::new();
    for (sql, params, _) in shapes() {
        let mut shape = format!("table=works&where={}", enc(sql));
        for (n, v) in &params {
            shape.push_str(&format!("&params%5B{n}%5D={}", enc(v)));
        }
        followers.push(Follower::start(&env.http, &env.base, &token, &shape).await);
    }
    // Live: updates that move rows in and out of every shape, deletes, inserts.
    for round in 0..3 {
        for (i, id) in ids.iter().enumerate() {
            let change = match (i + round) % 5 {
                0 => json!({"id": id, "year": years[(i + round + 3) % years.len()]}),
                1 => json!({"id": id, "favorite": (i + round) % 2 == 0}),
                2 => {
                    json!({"id": id, "read_status": statuses[(i + round) % 3], "title": titles[(i + round) % titles.len()]})
                }
                3 => json!({"id": id, "tags": tag_sets[(i + round + 1) % 3]}),
                _ => json!({"id": id, "year": Value::Null}),
            };
            let (s, b) = env
                .batch(alice, json!([op("update", "works", change)]))
                .await;
            assert_eq!(s, 200, "{b}");
        }
    }
    env.batch(
        alice,
        json!([
            op("delete", "works", json!({"id": ids[0]})),
            op("delete", "works", json!({"id": ids[5]}))
        ]),
    )
    .await;
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "late", "year": 2004, "tags": ["a", "b c"]})
        )]),
    )
    .await;

    for ((sql, _, truth_sql), f) in shapes().into_iter().zip(followers.iter_mut()) {
        let truth = truth_text(&env, "works", alice, truth_sql).await;
        let mut converged = false;
        for _ in 0..100 {
            let r = f.poll(&env.http, false).await;
            assert_eq!(r.status, 200, "{sql}: {r:?}");
            if f.log.by_id() == truth {
                converged = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            converged,
            "{sql}: got {:?}\nwant {:?}",
            f.log.by_id().keys().collect::<Vec<_>>(),
            truth.keys().collect::<Vec<_>>()
        );
        for m in &f.log.changes {
            assert_eq!(m["value"]["owner_id"], alice.to_string(), "{sql}: {m}");
        }
    }
    // The truth is not trivial: some shapes hold rows, and the NOT IN with NULL holds none.
    assert!(followers[0].log.rows.len() > 1);
    assert!(followers[4].log.rows.len() > 1);
    assert!(followers[5].log.rows.is_empty());
}

#[tokio::test]
async fn websocket_where_on_array_and_jsonb_columns() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    env.batch(
        alice,
        json!([
            insert(
                "works",
                json!({"id": a, "title": "a", "tags": ["x", "y z"], "authors": [{"name": "V"}]})
            ),
            insert("works", json!({"id": b, "title": "b", "tags": ["x"]})),
        ]),
    )
    .await;
    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;
    // Not an array literal: a clear error, not a database error.
    client.subscribe("bad", "works", json!({"tags": "x"})).await;
    let err = client
        .until(T, |v| v["type"] == "error" || v["type"] == "snapshot")
        .await;
    assert_eq!(err["code"], "invalid_where", "{err}");
    assert_eq!(err["id"], "bad");
    // Equality with an array literal, and with a jsonb value (both canonicalised by Postgres).
    client
        .subscribe("tags", "works", json!({"tags": "{x,\"y z\"}"}))
        .await;
    client.up_to_date("tags").await;
    client
        .subscribe("authors", "works", json!({"authors": "[{\"name\":\"V\"}]"}))
        .await;
    client.up_to_date("authors").await;
    assert_eq!(
        client.state["tags"].keys().cloned().collect::<Vec<_>>(),
        vec![a.to_string()]
    );
    assert_eq!(
        client.state["authors"].keys().cloned().collect::<Vec<_>>(),
        vec![a.to_string()]
    );
    // Live: b enters the tags subscription, a leaves it.
    env.batch(
        alice,
        json!([
            op("update", "works", json!({"id": b, "tags": ["x", "y z"]})),
            op("update", "works", json!({"id": a, "tags": []})),
        ]),
    )
    .await;
    client.until(T, |v| v["type"] == "txn").await;
    client.drain(Duration::from_millis(500)).await;
    assert_eq!(
        client.state["tags"].keys().cloned().collect::<Vec<_>>(),
        vec![b.to_string()]
    );
    assert_eq!(
        client.state["authors"].keys().cloned().collect::<Vec<_>>(),
        vec![a.to_string()]
    );
}

/// A literal that Postgres reads relative to the moment of the cast (`'yesterday'`, `'now'`, …) would be cast again
/// by every request of the shape, and move under it: refused with a clear error, for a `where` literal and a param
/// alike, over HTTP and the WebSocket. An absolute timestamp next to it is fine.
#[tokio::test]
async fn relative_time_literals_are_refused() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let token = env.token(alice);
    for (where_, param) in [
        ("created_at > 'yesterday'", None),
        ("created_at < 'tomorrow 10:00'", None),
        ("created_at > $1", Some("now")),
        ("updated_at IN ('2026-01-01 00:00:00+00', 'today')", None),
    ] {
        let mut query = format!("table=works&offset=-1&where={}", enc(where_));
        if let Some(p) = param {
            query.push_str(&format!("&params%5B1%5D={}", enc(p)));
        }
        let r = deeprecall_tests::shape::get(&env.http, &env.base, Some(&token), &query, &[]).await;
        assert_eq!(r.status, 400, "{where_}: {}", r.text);
        let body = r.json();
        assert_eq!(body["error"]["code"], "invalid_where", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("relative")),
            "{body}"
        );
    }
    let query = format!(
        "table=works&offset=-1&where={}",
        enc("created_at > '2000-01-01 00:00:00+00'")
    );
    let r = deeprecall_tests::shape::get(&env.http, &env.base, Some(&token), &query, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let mut client = StreamClient::connect(&env.base, &token).await;
    client
        .subscribe("rel", "works", json!({"created_at": "yesterday"}))
        .await;
    let err = client
        .until(T, |v| v["type"] == "error" || v["type"] == "snapshot")
        .await;
    assert_eq!(err["code"], "invalid_where", "{err}");
    assert_eq!(err["id"], "rel");
}
