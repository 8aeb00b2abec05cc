//! Tokens on the live stream: `?access_token=`, 401 on the upgrade, expiry closing the socket (4001), refresh
//! keeping it (and its subscriptions) open, and a refresh with another user's token (4003).

use std::time::Duration;

use deeprecall_tests::stream::{Closed, StreamClient};
use deeprecall_tests::{TEST_SECRET, TestEnv, insert};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

/// The HTTP status of a refused upgrade (panics if the upgrade succeeded).
async fn upgrade_status(base: &str, authorization: Option<&str>, query: &str) -> u16 {
    let url = format!("{}/v1/stream{query}", base.replace("http://", "ws://"));
    let mut req = url.into_client_request().unwrap();
    if let Some(a) = authorization {
        req.headers_mut()
            .insert("Authorization", a.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok(_) => panic!("the upgrade was accepted ({authorization:?}, {query:?})"),
        Err(tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

/// An HS256 token for `user` that expired `ago` seconds ago.
fn expired_token(user: Uuid, ago: u64) -> String {
    let now = jsonwebtoken::get_current_timestamp();
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": user.to_string(), "iat": now - ago - 60, "exp": now - ago}),
        &jsonwebtoken::EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn upgrade_needs_a_valid_token_header_or_query() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    assert_eq!(upgrade_status(&env.base, None, "").await, 401);
    assert_eq!(
        upgrade_status(&env.base, Some("Bearer not.a.jwt"), "").await,
        401
    );
    assert_eq!(
        upgrade_status(&env.base, None, "?access_token=garbage").await,
        401
    );
    // Expired well past the leeway.
    let expired = expired_token(alice, 600);
    assert_eq!(
        upgrade_status(&env.base, Some(&format!("Bearer {expired}")), "").await,
        401
    );
    assert_eq!(
        upgrade_status(&env.base, None, &format!("?access_token={expired}")).await,
        401
    );

    // The browser way works end to end.
    let w = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert("works", json!({"id": w, "title": "q"}))]),
    )
    .await;
    let mut client = StreamClient::connect_query(&env.base, &env.token(alice)).await;
    client.subscribe("w", "works", Value::Null).await;
    let snap = client.until(T, |v| v["type"] == "snapshot").await;
    assert_eq!(snap["rows"][0]["id"], w.to_string());
    client.up_to_date("w").await;
}

#[tokio::test]
async fn expiring_token_closes_the_socket_with_4001() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let short = env.auth.mint(alice, false, 3).unwrap();
    let started = Instant::now();
    let mut client = StreamClient::connect(&env.base, &short).await;
    client.subscribe("w", "works", Value::Null).await;
    client.up_to_date("w").await;
    while client.closed.is_none() && started.elapsed() < Duration::from_secs(10) {
        client.next(Duration::from_millis(200)).await;
    }
    let elapsed = started.elapsed();
    assert!(
        matches!(client.closed, Some(Closed::Code(4001, _))),
        "{:?}",
        client.closed
    );
    assert!(
        elapsed >= Duration::from_millis(1900),
        "closed before the token expired: {elapsed:?}"
    );
}

#[tokio::test]
async fn refreshing_the_token_keeps_the_socket_and_its_subscriptions() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let short = env.auth.mint(alice, false, 3).unwrap();
    let started = Instant::now();
    let mut client = StreamClient::connect(&env.base, &short).await;
    client.subscribe("w", "works", Value::Null).await;
    client.up_to_date("w").await;

    // An invalid token is refused without closing anything.
    client
        .send(json!({"type": "refresh_token", "access_token": "garbage"}))
        .await;
    let err = client.until(T, |v| v["type"] == "error").await;
    assert!(err["code"].as_str().is_some_and(|c| !c.is_empty()), "{err}");

    client
        .send(json!({"type": "refresh_token", "access_token": env.token(alice)}))
        .await;
    let ok = client.until(T, |v| v["type"] == "token_refreshed").await;
    assert!(ok["expires_at"].as_u64().unwrap() > jsonwebtoken::get_current_timestamp() + 600);

    // Past the first token's expiry the socket is still open...
    while started.elapsed() < Duration::from_millis(4500) {
        client.next(Duration::from_millis(200)).await;
        assert!(client.closed.is_none(), "closed: {:?}", client.closed);
    }
    // ...and the subscription still delivers.
    let w = Uuid::new_v4();
    let (s, b) = env
        .batch(
            alice,
            json!([insert("works", json!({"id": w, "title": "later"}))]),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let txn = client.until(T, |v| v["type"] == "txn").await;
    assert_eq!(txn["xid"], b["txid"]);
    assert_eq!(txn["changes"][0]["row"]["id"], w.to_string());
}

#[tokio::test]
async fn refresh_with_another_users_token_closes_with_4003() {
    let env = TestEnv::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;
    client.subscribe("w", "works", Value::Null).await;
    client.up_to_date("w").await;
    client
        .send(json!({"type": "refresh_token", "access_token": env.token(bob)}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.closed.is_none() && Instant::now() < deadline {
        client.next(Duration::from_millis(200)).await;
    }
    assert!(
        matches!(client.closed, Some(Closed::Code(4003, _))),
        "{:?}",
        client.closed
    );
    assert!(
        !client.frames.iter().any(|f| f["type"] == "token_refreshed"),
        "{:?}",
        client.frames
    );
}
