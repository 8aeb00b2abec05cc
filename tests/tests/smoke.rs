//! The harness itself: a cluster starts, the schema is current, a batch writes a row owned by its caller.

use deeprecall_tests::{TestEnv, insert};
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn batch_insert_is_owned_by_the_token_user() {
    let env = TestEnv::start().await;
    let (status, body) = env.get("/readyz", None).await;
    assert_eq!(status, 200, "{body}");
    let user = Uuid::new_v4();
    let id = Uuid::new_v4();
    let (status, body) = env
        .batch(
            user,
            json!([insert("works", json!({"id": id, "title": "T"}))]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let owner: Uuid = env
        .superuser()
        .await
        .query_one("select owner_id from works where id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner, user);
}
