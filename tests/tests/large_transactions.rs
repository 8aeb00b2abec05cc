//! Transactions too large to hold whole (issue 11, "the memory bound is not the memory"): they come from the slot
//! in parts and reach subscribers part by part, each change exactly once; only the last part carries an offset,
//! and an offset from before such a transaction refetches instead of resuming into half of it.

use std::time::Duration;

use deeprecall_replication::PartLimit;
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{EnvOptions, StreamCheck, TestEnv, diff_rows, insert};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

async fn env() -> TestEnv {
    TestEnv::start_with(EnvOptions {
        part_limit: Some(PartLimit {
            changes: 100,
            bytes: usize::MAX,
        }),
        ..Default::default()
    })
    .await
}

/// One transaction of `n` new works: every third for `other`, the rest for `owner`.
async fn big_insert(env: &TestEnv, owner: Uuid, other: Uuid, n: i32) {
    env.superuser()
        .await
        .execute(
            "insert into works (id, owner_id, title)
             select gen_random_uuid(), case when g % 3 = 0 then $2::uuid else $1::uuid end, 'big ' || g
               from generate_series(1, $3) g",
            &[&owner, &other, &n],
        )
        .await
        .unwrap();
}

/// Reads frames until the last part of a transaction that came in parts.
async fn until_complete(client: &mut StreamClient) -> Value {
    client
        .until(T, |v| {
            v["type"] == "txn" && v.get("part").is_some() && v.get("more").is_none()
        })
        .await
}

/// A connection of `owner`'s, subscribed to works (subscription id "works") and up to date. Once it has received a
/// transaction, the server has routed it: a resume from before it is answered from what the server has seen, not
/// raced against it.
async fn subscribed(env: &TestEnv, owner: Uuid) -> StreamClient {
    let mut client = StreamClient::connect(&env.base, &env.token(owner)).await;
    client.subscribe("works", "works", json!(null)).await;
    client.up_to_date("works").await;
    client
}

#[tokio::test]
async fn a_large_transaction_arrives_in_parts_each_change_once_and_converges() {
    let env = env().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut a = subscribed(&env, alice).await;
    let mut b = subscribed(&env, bob).await;
    let before = a.frames.len();
    big_insert(&env, alice, bob, 1500).await;
    let last = until_complete(&mut a).await;
    until_complete(&mut b).await;

    // Alice's share: 1000 rows in parts of at most 100 changes of the whole transaction.
    let frames: Vec<&Value> = a.frames[before..]
        .iter()
        .filter(|v| v["type"] == "txn")
        .collect();
    assert!(
        frames.len() >= 10,
        "expected parts, got {} frames",
        frames.len()
    );
    deeprecall_tests::assert_txn_parts(&frames);
    assert_eq!(frames[0]["xid"], last["xid"]);
    for f in &frames {
        assert!(f["changes"].as_array().unwrap().len() <= 100);
    }
    let mut check = StreamCheck::default();
    check.apply_all(a.frames.iter());
    let diff = diff_rows(
        &check.state["works"],
        &env.truth("works", alice, None).await,
        false,
    );
    assert!(diff.is_empty(), "{diff:#?}");
    assert_eq!(check.state["works"].len(), 1000);
    let mut check = StreamCheck::default();
    check.apply_all(b.frames.iter());
    assert_eq!(check.state["works"].len(), 500);
    assert!(
        check.state["works"]
            .values()
            .all(|r| r["owner_id"] == bob.to_string()),
        "only bob's rows reach bob"
    );

    // Ordinary transactions after it still come whole.
    let (status, body) = env
        .batch(
            alice,
            json!([insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": "after"})
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let after = a
        .until(T, |v| {
            v["type"] == "txn" && v["changes"][0]["row"]["title"] == "after"
        })
        .await;
    assert!(
        after.get("part").is_none() && after.get("offset").is_some(),
        "{after}"
    );
}

#[tokio::test]
async fn an_offset_from_before_a_large_transaction_refetches_and_converges() {
    let env = env().await;
    let alice = Uuid::new_v4();
    // `a` stays live: the resume below, from its offset, is made on a new connection.
    let mut a = subscribed(&env, alice).await;
    let offset = a.offsets["works"].clone();
    big_insert(&env, alice, Uuid::new_v4(), 600).await;
    // An ordinary one after it, so the stream has certainly passed the large one once `a` has it.
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "later"})
        )]),
    )
    .await;
    a.until(T, |v| {
        v["type"] == "txn" && v["changes"][0]["row"]["title"] == "later"
    })
    .await;

    let mut again = StreamClient::connect(&env.base, &env.token(alice)).await;
    again.resume("works", "works", json!(null), &offset).await;
    let refetch = again.until(T, |v| v["type"] == "must_refetch").await;
    assert_eq!(
        refetch["reason"], "offset_older_than_server_history",
        "{refetch}"
    );
    again.up_to_date("works").await;
    let mut check = StreamCheck::default();
    check.apply_all(again.frames.iter());
    let diff = diff_rows(
        &check.state["works"],
        &env.truth("works", alice, None).await,
        false,
    );
    assert!(diff.is_empty(), "{diff:#?}");
    assert_eq!(check.state["works"].len(), 401);
}

#[tokio::test]
async fn a_shape_touched_by_a_large_transaction_refetches() {
    let env = env().await;
    let alice = Uuid::new_v4();
    let token = env.token(alice);
    let url = |q: &str| format!("{}/v1/shape?table=works&{q}", env.base);
    let first = env
        .http
        .get(url("offset=-1"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let handle = first.headers()["electric-handle"]
        .to_str()
        .unwrap()
        .to_owned();
    let offset = first.headers()["electric-offset"]
        .to_str()
        .unwrap()
        .to_owned();
    let _ = first.text().await;
    let mut watcher = subscribed(&env, alice).await;
    big_insert(&env, alice, Uuid::new_v4(), 600).await;
    until_complete(&mut watcher).await;
    let resumed = env
        .http
        .get(url(&format!("offset={offset}&handle={handle}")))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        resumed.status(),
        409,
        "{}",
        resumed.text().await.unwrap_or_default()
    );
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_off_by_queued_bytes_not_by_count() {
    let env = TestEnv::start_with_hub(
        EnvOptions::default(),
        deeprecall_sync::live::hub::HubConfig {
            queue_bytes: 64 * 1024,
            ..Default::default()
        },
    )
    .await;
    let alice = Uuid::new_v4();
    let mut slow = subscribed(&env, alice).await;
    // Not reading now. Transactions of ~300 kB each fill the socket buffers, then overflow a 64 kB queue long
    // before 1024 of them would.
    let title = "x".repeat(300_000);
    for _ in 0..60 {
        let (status, body) = env
            .batch(
                alice,
                json!([insert(
                    "works",
                    json!({"id": Uuid::new_v4(), "title": title})
                )]),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let stats = env.state.hub.stats();
    // At most the cap plus the one transaction an empty queue always takes.
    assert!(
        stats.queued_bytes <= 2 * 1024 * 1024,
        "queued bytes stay bounded: {stats:?}"
    );
    // Reading again: what was queued, then the close with the resume code.
    slow.drain(Duration::from_secs(2)).await;
    assert!(
        matches!(
            &slow.closed,
            Some(deeprecall_tests::stream::Closed::Code(4008, _))
        ),
        "{:?}",
        slow.closed
    );
}

/// A large transaction's parts wait for room in a connection that does not read (up to the pacing budget, 30 s).
/// A shutdown in that wait stops the stream at once, and the connection, blocked writing to its client, gets a few
/// seconds to take its last frames. Before: the replicator finished waiting first (the server gave up on it after
/// 10 s, without acknowledging its final position), and the connection noticed the shutdown only once its write
/// timed out (30 s; the server gave up after 10 more): 20 s to stop here.
#[tokio::test]
async fn a_shutdown_does_not_wait_for_a_slow_connection_to_make_room() {
    let mut env = TestEnv::start_with_hub(
        EnvOptions {
            part_limit: Some(PartLimit {
                changes: 100,
                bytes: usize::MAX,
            }),
            ..Default::default()
        },
        deeprecall_sync::live::hub::HubConfig {
            queue_bytes: 64 * 1024,
            ..Default::default()
        },
    )
    .await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    // Subscribed, then not read: its queue fills with the first parts.
    let _slow = subscribed(&env, alice).await;
    big_insert(&env, alice, bob, 30_000).await;
    // Until the replicator waits for room (its parts are published one at a time; the queue holds a few).
    let deadline = tokio::time::Instant::now() + T;
    while env.state.hub.stats().queued_bytes < 64 * 1024 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the queue never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    env.stop_server().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(9),
        "shutdown took {took:?} (the pacing budget is 30 s, the write timeout 30 s; the shutdown waits 10 s for each)"
    );
}
