//! Protocol behaviour of `/v1/stream`: errors for bad subscriptions, duplicate ids, unsubscribe, ping, and
//! TRUNCATE turning into `must_refetch` + a fresh snapshot for the subscriptions on that table only.

use std::time::Duration;

use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{
    StreamCheck, TestEnv, all_up_to_date, assert_txn_parts, diff_rows, insert, short,
};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

async fn expect_error(client: &mut StreamClient, id: Option<&str>, code: &str) -> Value {
    let err = client
        .until(T, |v| v["type"] == "error" || v["type"] == "snapshot")
        .await;
    assert_eq!(err["type"], "error", "{err}");
    assert_eq!(err["code"], code, "{err}");
    if let Some(id) = id {
        assert_eq!(err["id"], id, "{err}");
    }
    assert!(err["message"].as_str().is_some_and(|m| !m.is_empty()));
    err
}

#[tokio::test]
async fn bad_subscriptions_get_errors_and_the_socket_stays_usable() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;

    client.send(json!({"type": "ping"})).await;
    let pong = client.until(T, |_| true).await;
    assert_eq!(pong, json!({"type": "pong"}));

    client.subscribe("t", "no_such_table", Value::Null).await;
    expect_error(&mut client, Some("t"), "unknown_table").await;
    // Not synced, though it exists.
    client.subscribe("t", "sync_applied_ops", Value::Null).await;
    expect_error(&mut client, Some("t"), "unknown_table").await;

    client
        .subscribe("c", "annotations", json!({"no_such_column": 1}))
        .await;
    expect_error(&mut client, Some("c"), "invalid_where").await;
    client
        .subscribe(
            "o",
            "annotations",
            json!({"owner_id": Uuid::new_v4().to_string()}),
        )
        .await;
    expect_error(&mut client, Some("o"), "invalid_where").await;

    client
        .subscribe("v", "annotations", json!({"work_id": "not-a-uuid"}))
        .await;
    expect_error(&mut client, Some("v"), "invalid_where").await;
    client
        .subscribe("p", "annotations", json!({"page": {"in": [1, "two"]}}))
        .await;
    expect_error(&mut client, Some("p"), "invalid_where").await;

    client
        .send(json!({"type": "subscribe", "table": "works"}))
        .await;
    expect_error(&mut client, None, "invalid_message").await;
    client.send(json!({"type": "dance"})).await;
    expect_error(&mut client, None, "invalid_message").await;

    // Failed subscriptions leave nothing behind: the ids are free, and a good one works.
    client.subscribe("v", "works", Value::Null).await;
    client.up_to_date("v").await;
    client.subscribe("v", "works", Value::Null).await;
    expect_error(&mut client, Some("v"), "duplicate_subscription").await;
    assert!(client.closed.is_none());
    // The first subscription still delivers (once: the duplicate did not add another).
    let (s, b) = env
        .batch(
            alice,
            json!([insert("works", json!({"id": Uuid::new_v4(), "title": "x"}))]),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let txn = client.until(T, |v| v["type"] == "txn").await;
    assert_eq!(txn["changes"].as_array().unwrap().len(), 1, "{txn}");
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;
    client.subscribe("a", "works", Value::Null).await;
    client.subscribe("b", "works", Value::Null).await;
    all_up_to_date(&mut client, &["a", "b"]).await;
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "both"})
        )]),
    )
    .await;
    let txn = client.until(T, |v| v["type"] == "txn").await;
    let mut ids: Vec<&str> = txn["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    ids.sort_unstable(); // the order of subscriptions inside one frame is not specified
    assert_eq!(ids, ["a", "b"], "{txn}");

    client.send(json!({"type": "unsubscribe", "id": "a"})).await;
    let done = client.until(T, |v| v["type"] == "unsubscribed").await;
    assert_eq!(done["id"], "a");
    client.send(json!({"type": "unsubscribe", "id": "a"})).await;
    expect_error(&mut client, Some("a"), "unknown_subscription").await;

    let (_, body) = env
        .batch(
            alice,
            json!([insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": "b only"})
            )]),
        )
        .await;
    let txn = client.until(T, |v| v["type"] == "txn").await;
    assert_eq!(txn["xid"], body["txid"]);
    let ids: Vec<&str> = txn["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b"], "{txn}");
    // Unsubscribing the last one: nothing arrives any more.
    client.send(json!({"type": "unsubscribe", "id": "b"})).await;
    client.until(T, |v| v["type"] == "unsubscribed").await;
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "nobody"})
        )]),
    )
    .await;
    let more = client.next(Duration::from_millis(1500)).await;
    assert!(more.is_none(), "delivered after unsubscribe: {more:?}");
}

#[tokio::test]
async fn truncate_refetches_only_that_tables_subscriptions() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let w = Uuid::new_v4();
    env.batch(
        alice,
        json!([
            insert("works", json!({"id": w, "title": "kept"})),
            insert(
                "annotations",
                json!({"id": Uuid::new_v4(), "work_id": w, "page": 1})
            ),
            insert(
                "annotations",
                json!({"id": Uuid::new_v4(), "work_id": w, "page": 2})
            ),
        ]),
    )
    .await;
    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;
    client.subscribe("ann", "annotations", Value::Null).await;
    client.subscribe("works", "works", Value::Null).await;
    all_up_to_date(&mut client, &["ann", "works"]).await;
    let ann_offset = client.offsets["ann"].clone();

    env.superuser()
        .await
        .batch_execute("truncate annotations")
        .await
        .unwrap();
    let refetch = client
        .until(T, |v| v["type"] == "must_refetch" || v["type"] == "txn")
        .await;
    assert_eq!(refetch["type"], "must_refetch", "{refetch}");
    assert_eq!(refetch["id"], "ann");
    let snap = client
        .until(T, |v| v["type"] == "snapshot" && v["id"] == "ann")
        .await;
    assert_eq!(snap["rows"], json!([]), "{}", short(&snap));
    client.up_to_date("ann").await;

    // Live again afterwards.
    let a = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert(
            "annotations",
            json!({"id": a, "work_id": w, "page": 3})
        )]),
    )
    .await;
    let txn = client.until(T, |v| v["type"] == "txn").await;
    assert_eq!(txn["changes"][0]["row"]["id"], a.to_string());
    client.drain(Duration::from_millis(300)).await;

    let mut check = StreamCheck::default();
    check.apply_all(&client.frames);
    assert_eq!(
        check.refetches,
        [("ann".to_owned(), "truncated".to_owned())]
    );
    let diff = diff_rows(
        &check.state["ann"],
        &env.truth("annotations", alice, None).await,
        false,
    );
    assert!(diff.is_empty(), "{diff:#?}");
    let diff = diff_rows(
        &check.state["works"],
        &env.truth("works", alice, None).await,
        false,
    );
    assert!(diff.is_empty(), "{diff:#?}");

    // A resume from before the truncate cannot be served as changes.
    let mut later = StreamClient::connect(&env.base, &env.token(alice)).await;
    later
        .resume("ann", "annotations", Value::Null, &ann_offset)
        .await;
    let r = later
        .until(T, |v| v["type"] == "must_refetch" || v["type"] == "txn")
        .await;
    assert_eq!(r["type"], "must_refetch", "{r}");
    assert_eq!(r["reason"], "table_truncated", "{r}");
    later.up_to_date("ann").await;
}

#[tokio::test]
async fn snapshot_frames_are_bounded_in_bytes_as_well_as_rows() {
    // 20 rows of 300 kB (a repeated character: a few KiB on disk). Frames were counted in rows only, so these came
    // as one 6 MB frame, and 500 rows of 4 MB as one 2 GB frame built in the server's memory.
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.superuser()
        .await
        .execute(
            "insert into works (owner_id, id, title)
             select $1, gen_random_uuid(), g || repeat('a', 300000) from generate_series(1, 20) g",
            &[&user],
        )
        .await
        .unwrap();
    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    client.subscribe("big", "works", json!({})).await;
    client.up_to_date("big").await;
    let sizes: Vec<usize> = client
        .frames
        .iter()
        .filter(|f| f["type"] == "snapshot")
        .map(|f| f.to_string().len())
        .collect();
    // A frame ends at the first row that takes it to 1 MiB: at most 1 MiB plus one row.
    assert!(
        sizes.iter().all(|&n| n <= 1024 * 1024 + 310_000),
        "frame sizes {sizes:?}"
    );
    assert!(sizes.len() >= 5, "frame sizes {sizes:?}");
    let truth = env.truth("works", user, None).await;
    assert_eq!(truth.len(), 20);
    let diff = diff_rows(&client.state["big"], &truth, false);
    assert!(diff.is_empty(), "{} rows differ", diff.len());
}

#[tokio::test]
async fn a_transaction_for_many_subscriptions_comes_in_parts_of_bounded_size() {
    // A change goes into a connection's frame once per subscription that receives it: 20 subscriptions on `works`
    // and a 1 MB transaction made one 20 MB frame (100 and 4 MB: 400 MB, which no client accepted). Now the
    // connection gets it in parts of about 4 MiB, numbered 0, 1, … and closed by the one with the offset.
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    let ids: Vec<String> = (0..20).map(|i| format!("s{i}")).collect();
    for id in &ids {
        client.subscribe(id, "works", json!({})).await;
    }
    all_up_to_date(
        &mut client,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await;
    let before = client.frames.len();
    let ops: Vec<Value> = (0..200)
        .map(|i| {
            insert(
                "works",
                json!({"title": format!("{i:03}{}", "b".repeat(5000))}),
            )
        })
        .collect();
    let (status, body) = env.batch(user, json!(ops)).await;
    assert_eq!(status, 200, "{body}");
    let last = client
        .until(Duration::from_secs(30), |f| {
            f["type"] == "txn" && f.get("more").is_none()
        })
        .await;
    let frames: Vec<&Value> = client.frames[before..]
        .iter()
        .filter(|f| f["type"] == "txn")
        .collect();
    assert!(frames.len() >= 4, "{} frames", frames.len());
    assert_txn_parts(&frames);
    assert_eq!(frames[0]["xid"], last["xid"]);
    for f in &frames {
        let size = f.to_string().len();
        assert!(
            size <= 4 * 1024 * 1024 + 1_100_000,
            "a part of {size} bytes"
        );
    }
    let truth = env.truth("works", user, None).await;
    assert_eq!(truth.len(), 200);
    for id in &ids {
        let diff = diff_rows(&client.state[id.as_str()], &truth, false);
        assert!(diff.is_empty(), "{id}: {} rows differ", diff.len());
    }
}
