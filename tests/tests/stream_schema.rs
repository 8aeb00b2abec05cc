//! Changes that alter rows without row changes in the stream, and offsets the server never issued.

use std::time::Duration;

use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TestEnv, insert};
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_column_added_with_a_default_makes_subscriptions_refetch() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let w = Uuid::new_v4();
    env.batch(
        user,
        json!([insert("works", json!({"id": w, "title": "old row"}))]),
    )
    .await;
    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    client.subscribe("w", "works", json!(null)).await;
    client.up_to_date("w").await;

    // Existing rows get the default inside Postgres; the stream carries no change for them.
    env.superuser()
        .await
        .batch_execute("alter table works add column shelf text not null default 'inbox'")
        .await
        .unwrap();
    // The next change to the table brings the new Relation message.
    env.batch(
        user,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "new row"})
        )]),
    )
    .await;
    let refetch = client.until(T, |v| v["type"] == "must_refetch").await;
    assert_eq!(refetch["reason"], "schema_changed");
    client.up_to_date("w").await;
    let rows = &client.state["w"];
    assert_eq!(rows.len(), 2);
    assert!(rows.values().all(|r| r["shelf"] == "inbox"), "{rows:?}");
}

#[tokio::test]
async fn an_offset_we_never_issued_is_a_refetch() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    env.batch(
        user,
        json!([insert("works", json!({"id": Uuid::new_v4(), "title": "x"}))]),
    )
    .await;
    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    client
        .resume("w", "works", json!(null), "not-an-offset")
        .await;
    let first = client.until(T, |v| v["type"] != "pong").await;
    assert_eq!(first["type"], "must_refetch", "{first}");
    assert_eq!(first["reason"], "invalid_offset");
    client.up_to_date("w").await;
    assert_eq!(client.state["w"].len(), 1);
}

#[tokio::test]
async fn an_expired_token_cannot_open_a_socket_even_within_the_http_leeway() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    // Expired 5 s ago: HTTP requests still accept it (30 s clock-skew leeway); a socket would close at once.
    let now = jsonwebtoken::get_current_timestamp();
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user.to_string(), "exp": now - 5}),
        &jsonwebtoken::EncodingKey::from_secret(deeprecall_tests::TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let (status, _) = env.get("/v1/blobs", Some(&token)).await;
    assert_eq!(status, 200);
    let url = format!(
        "{}/v1/stream?access_token={token}",
        env.base.replace("http://", "ws://")
    );
    let err = tokio_tungstenite::connect_async(url)
        .await
        .expect_err("upgrade must be refused");
    match err {
        tokio_tungstenite::tungstenite::Error::Http(resp) => assert_eq!(resp.status(), 401),
        other => panic!("unexpected error {other}"),
    }
}

/// A `varchar` or `name` column (an operator's `alter table … add column code varchar(10)`) made every snapshot of
/// its table fail, on the stream and on `GET /v1/shape` ("snapshot columns are not text"): those types were selected
/// uncast, as if already text. Now their values arrive as the strings they are, in the snapshot and live.
#[tokio::test]
async fn varchar_name_and_char_columns_reach_snapshots_and_the_stream() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let db = env.superuser().await;
    db.batch_execute(
        "alter table works add column code varchar(10), add column handle name, add column kind char(3);
         notify deeprecall_schema_changed",
    )
    .await
    .unwrap();
    let w = Uuid::new_v4();
    let row = json!({"id": w, "title": "typed", "code": "ab-12", "handle": "alice", "kind": "pd"});
    // The server reloads its catalog on the notification: a write naming the new columns works once it has.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let (status, body) = env.batch(user, json!([insert("works", row.clone())])).await;
        if status == 200 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // char(3) is blank-padded: its text output, as the stream sends it.
    let expect = |r: &serde_json::Value| {
        assert_eq!(
            (&r["code"], &r["handle"], &r["kind"]),
            (&json!("ab-12"), &json!("alice"), &json!("pd ")),
            "{r}"
        );
    };

    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    client.subscribe("w", "works", json!(null)).await;
    client.up_to_date("w").await;
    expect(&client.state["w"][&w.to_string()]);
    // Live.
    let w2 = Uuid::new_v4();
    let mut live = row.clone();
    live["id"] = json!(w2);
    env.batch(user, json!([insert("works", live)])).await;
    client
        .until(T, |v| {
            v["type"] == "txn" && v.to_string().contains(&w2.to_string())
        })
        .await;
    expect(&client.state["w"][&w2.to_string()]);

    // The shape endpoint's snapshot.
    let http = reqwest::Client::new();
    let shape =
        deeprecall_tests::shape::Follower::start(&http, &env.base, &env.token(user), "table=works")
            .await;
    assert_eq!(shape.log.rows.len(), 2);
    for r in shape.log.rows.values() {
        let r = serde_json::to_value(r).unwrap();
        expect(&r);
    }
}
