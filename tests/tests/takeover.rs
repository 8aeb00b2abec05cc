//! Two servers and one replication slot (issue 11, "a takeover never leaves a hole"): the second waits on standby
//! and says so, takes over when the first lets go, and continuity is checked, never assumed: a process whose slot
//! another one advanced makes every subscription refetch instead of silently skipping what it never saw.

use std::time::Duration;

use deeprecall_tests::ops::UrlServer;
use deeprecall_tests::stream::{Closed, StreamClient};
use deeprecall_tests::{StreamCheck, TestEnv, diff_rows, insert};
use serde_json::{Value, json};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

async fn get(base: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{base}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// Polls `path` on `base` until `pred` holds; returns the last answer. Panics after `within`.
async fn poll(
    base: &str,
    path: &str,
    token: Option<&str>,
    within: Duration,
    pred: impl Fn(u16, &Value) -> bool,
) -> (u16, Value) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let (status, body) = get(base, path, token).await;
        if pred(status, &body) {
            return (status, body);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never matched: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_server_on_the_slot_waits_on_standby_then_takes_over_exactly() {
    let mut env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let admin = env.admin_token(Uuid::new_v4());
    poll(&env.base, "/readyz", None, T, |s, _| s == 200).await;
    let mut a = StreamClient::connect(&env.base, &env.token(alice)).await;
    a.subscribe("works", "works", json!(null)).await;
    a.up_to_date("works").await;

    // The second server: on standby while the first streams, and it says so.
    let b = UrlServer::start_on_slot(&env.db_url(), &env.state.slot_name).await;
    let (_, ready) = poll(&b.base, "/readyz", None, T, |s, v| {
        s == 503 && v["reason"] == "standby"
    })
    .await;
    assert!(
        ready["detail"].as_str().unwrap().contains("walsender pid"),
        "{ready}"
    );
    let (status, repl) = get(&b.base, "/v1/admin/replication", Some(&admin)).await;
    assert_eq!(status, 200, "{repl}");
    assert_eq!(repl["stream"]["state"], "standby", "{repl}");
    assert!(repl["holder"]["pid"].is_i64(), "{repl}");
    let refused = reqwest::Client::new()
        .get(format!("{}/v1/shape?table=works&offset=-1", b.base))
        .bearer_auth(b.token(alice))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert!(refused.headers().get("retry-after").is_some());

    // The first streams on; its client gets everything.
    for title in ["one", "two"] {
        let (s, body) = env
            .batch(
                alice,
                json!([insert(
                    "works",
                    json!({"id": Uuid::new_v4(), "title": title})
                )]),
            )
            .await;
        assert_eq!(s, 200, "{body}");
    }
    a.until(T, |v| {
        v["type"] == "txn" && v["changes"][0]["row"]["title"] == "two"
    })
    .await;
    let (s, body) = env
        .batch(
            alice,
            json!([insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": "three"})
            )]),
        )
        .await;
    assert_eq!(s, 200, "{body}");
    a.until(T, |v| {
        v["type"] == "txn" && v["changes"][0]["row"]["title"] == "three"
    })
    .await;

    // The first stops (a rolling deploy): its client gets the final offset; the second takes over.
    env.stop_server().await;
    a.drain(Duration::from_secs(2)).await;
    assert!(
        matches!(&a.closed, Some(Closed::Code(1001, _))),
        "{:?}",
        a.closed
    );
    let final_offset = a.offsets["works"].clone();
    poll(&b.base, "/readyz", None, T, |s, _| s == 200).await;

    // A write made after the takeover, then the client resumes on the second server: exactly what it missed.
    let write = reqwest::Client::new()
        .post(format!("{}/v1/batch", b.base))
        .bearer_auth(b.token(alice))
        .json(&json!({"ops": [insert("works", json!({"id": Uuid::new_v4(), "title": "four"}))]}))
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 200);
    let mut resumed = StreamClient::connect(&b.base, &b.token(alice)).await;
    resumed
        .resume("works", "works", json!(null), &final_offset)
        .await;
    let got = resumed
        .until(T, |v| v["type"] == "txn" || v["type"] == "must_refetch")
        .await;
    assert_eq!(got["type"], "txn", "resumed exactly, no refetch: {got}");
    assert_eq!(got["changes"][0]["row"]["title"], "four");
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slot_advanced_by_another_process_makes_every_subscription_refetch() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let mut a = StreamClient::connect(&env.base, &env.token(alice)).await;
    a.subscribe("works", "works", json!(null)).await;
    a.up_to_date("works").await;
    let db = env.superuser().await;
    let slot = env.state.slot_name.clone();

    // Another process takes the slot from under the server (its walsender is terminated, the slot is consumed
    // elsewhere), while a write happens that this server never streams.
    let lost = Uuid::new_v4();
    let mut written = false;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let _ = db
            .execute(
                "select pg_terminate_backend(active_pid) from pg_replication_slots
                  where slot_name = $1 and active_pid is not null",
                &[&slot],
            )
            .await;
        if !written {
            db.execute(
                "insert into works (id, owner_id, title) values ($1, $2, 'while away')",
                &[&lost, &alice],
            )
            .await
            .unwrap();
            written = true;
        }
        // Consumes the slot up to now, as another server would have (fails while the server holds it again).
        let advanced = db
            .execute(
                "select pg_replication_slot_advance($1, pg_current_wal_lsn())",
                &[&slot],
            )
            .await;
        if advanced.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not take the slot: {advanced:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The server reconnects past what it published: its subscriptions refetch and see the row they missed.
    let refetch = a.until(T, |v| v["type"] == "must_refetch").await;
    assert_eq!(refetch["reason"], "stream_discontinuity", "{refetch}");
    a.until(T, |v| v["type"] == "up_to_date").await;
    let mut check = StreamCheck::default();
    check.apply_all(a.frames.iter());
    let diff = diff_rows(
        &check.state["works"],
        &env.truth("works", alice, None).await,
        false,
    );
    assert!(diff.is_empty(), "{diff:#?}");
    assert!(check.state["works"].contains_key(&lost.to_string()));
}
