//! Configurable limits answer 413 and write nothing: the body size (`payload_too_large`) and the number of ops
//! in a batch (`too_many_ops`) or blobs in a coordination (`too_many_blobs`).

use deeprecall_sync::state::Limits;
use deeprecall_tests::{EnvOptions, TestEnv, count, error_code, insert, sha, statuses};
use serde_json::{Value, json};
use uuid::Uuid;

#[tokio::test]
async fn body_size_and_op_count_limits_answer_413() {
    let limits = Limits {
        max_body_bytes: 4096,
        max_ops_per_batch: 5,
        ..Limits::default()
    };
    let env = TestEnv::start_with(EnvOptions {
        limits: Some(limits),
        ..Default::default()
    })
    .await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let ops = |n: usize| {
        Value::Array(
            (0..n)
                .map(|i| insert("works", json!({"title": format!("w{i}")})))
                .collect(),
        )
    };

    // At the limit: fine.
    let (status, body) = env.batch(user, ops(5)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body).len(), 5);

    // One op more: 413 too_many_ops, nothing written.
    let (status, body) = env.batch(user, ops(6)).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (413, "too_many_ops"),
        "{body}"
    );
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 5);

    // A body just under the byte limit is accepted, one over it is refused with payload_too_large.
    let sized = |bytes: usize| {
        let empty = json!({"ops": [insert("works", json!({"title": ""}))]})
            .to_string()
            .len();
        let body = json!({"ops": [insert("works", json!({"title": "x".repeat(bytes - empty)}))]});
        let text = body.to_string();
        assert_eq!(text.len(), bytes);
        text.into_bytes()
    };
    let (status, body) = env.post_raw("/v1/batch", Some(&token), sized(4096)).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = env.post_raw("/v1/batch", Some(&token), sized(4097)).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );
    let (status, body) = env
        .post_raw("/v1/batch", Some(&token), sized(64 * 1024))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 6);

    // The same limits guard blob coordination.
    let device = Uuid::new_v4();
    let blobs = |n: u8| {
        (0..n)
            .map(|i| json!({"sha256": sha(i), "size": 1}))
            .collect::<Vec<_>>()
    };
    let (status, body) = env
        .coordinate(user, json!({"device_id": device, "blobs": blobs(6)}))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (413, "too_many_blobs"),
        "{body}"
    );
    let big = json!({"device_id": device, "blobs": [{"sha256": sha(1), "size": 1, "path": "p".repeat(5000)}]});
    let (status, body) = env.coordinate(user, big).await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (413, "payload_too_large"),
        "{body}"
    );
    assert_eq!(count(&db, "select count(*) from blobs_meta", &[]).await, 0);
    let (status, body) = env
        .coordinate(user, json!({"device_id": device, "blobs": blobs(5)}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&db, "select count(*) from blobs_meta", &[]).await, 5);
}
