//! The live stream end to end: snapshot, then live changes whose xid equals the batch's txid; never another
//! user's rows.

use std::time::Duration;

use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TestEnv, insert, op};
use serde_json::json;
use uuid::Uuid;

const T: Duration = Duration::from_secs(20);

#[tokio::test]
async fn snapshot_then_live_changes_with_matching_xid() {
    let env = TestEnv::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let w1 = Uuid::new_v4();
    let (s, b) = env
        .batch(
            alice,
            json!([insert("works", json!({"id": w1, "title": "Before"}))]),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    env.batch(
        bob,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "Bob's"})
        )]),
    )
    .await;

    let mut client = StreamClient::connect(&env.base, &env.token(alice)).await;
    client.subscribe("w", "works", json!(null)).await;
    let snap = client.until(T, |v| v["type"] == "snapshot").await;
    assert_eq!(snap["rows"].as_array().unwrap().len(), 1, "{snap}");
    assert_eq!(snap["rows"][0]["title"], "Before");
    assert_eq!(snap["rows"][0]["owner_id"], alice.to_string());
    client.up_to_date("w").await;

    let w2 = Uuid::new_v4();
    let (_, body) = env
        .batch(
            alice,
            json!([
                insert(
                    "works",
                    json!({"id": w2, "title": "Live", "year": 2017, "tags": ["a", "b c"]})
                ),
                op("update", "works", json!({"id": w1, "favorite": true})),
            ]),
        )
        .await;
    env.batch(
        bob,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "Bob's 2"})
        )]),
    )
    .await;
    let txn = client.until(T, |v| v["type"] == "txn").await;
    assert_eq!(txn["xid"], body["txid"], "{txn}");
    let changes = txn["changes"].as_array().unwrap();
    assert_eq!(changes.len(), 2);
    assert_eq!(changes[0]["op"], "insert");
    assert_eq!(changes[0]["row"]["year"], 2017);
    assert_eq!(changes[0]["row"]["tags"], json!(["a", "b c"]));
    assert_eq!(changes[1]["op"], "update");
    assert_eq!(changes[1]["row"]["favorite"], true);
    assert_eq!(changes[1]["row"]["title"], "Before");
    client.drain(Duration::from_millis(500)).await;
    for frame in &client.frames {
        assert!(
            !frame.to_string().contains(&bob.to_string()),
            "bob's data leaked: {frame}"
        );
    }
    assert_eq!(client.state["w"].len(), 2);
}
