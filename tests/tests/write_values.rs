//! `POST /v1/batch` values at the edges of their types, against a real Postgres: what Postgres refuses is refused
//! by the server first (422 `invalid_value` with the op's index, nothing written), and what Postgres prints (the
//! live stream and snapshots send its output) is accepted back.

use deeprecall_tests::{TestEnv, count, error_code};
use uuid::Uuid;

/// Runs `ddl` as superuser and tells the server to reload its catalog.
async fn alter(env: &TestEnv, ddl: &str) {
    env.superuser()
        .await
        .batch_execute(&format!("{ddl}; notify deeprecall_schema_changed"))
        .await
        .unwrap_or_else(|e| panic!("{ddl}: {e}"));
}

/// A batch of two inserts: a valid work first, then `table`'s `row` (raw JSON text), as op 1.
fn two_ops(table: &str, row: &str) -> Vec<u8> {
    format!(
        r#"{{"ops":[{{"op_id":"{}","table":"works","kind":"insert","row":{{"title":"first"}}}},
            {{"op_id":"{}","table":"{table}","kind":"insert","row":{row}}}]}}"#,
        Uuid::new_v4(),
        Uuid::new_v4()
    )
    .into_bytes()
}

/// Sends [`two_ops`] and asserts it was refused with 422 `invalid_value` at op 1, naming `column`; returns the
/// message.
async fn refused(env: &TestEnv, user: Uuid, table: &str, row: &str, column: &str) -> String {
    let (status, body) = env
        .post_raw("/v1/batch", Some(&env.token(user)), two_ops(table, row))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (422, "invalid_value"),
        "{row}: {body}"
    );
    assert_eq!(body["error"]["op_index"], 1, "{row}: {body}");
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(message.contains(&format!("column `{column}`")), "{message}");
    message
}

/// Fault: a double precision value that underflows (`1e-400`) was stored as 0 (and a real's `1e-46` too), where
/// Postgres refuses both as out of range.
#[tokio::test]
async fn floats_that_underflow_are_refused_as_postgres_refuses_them() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    alter(
        &env,
        "alter table boards add column ratio real, add column samples double precision[]",
    )
    .await;
    for (row, column) in [
        (r#"{"width": 1e-400}"#, "width"),
        (r#"{"height": -2e-324}"#, "height"),
        (r#"{"ratio": 1e-46}"#, "ratio"),
        (r#"{"ratio": 1e-400}"#, "ratio"),
        (r#"{"samples": [1, 1e-400]}"#, "samples"),
    ] {
        let message = refused(&env, user, "boards", row, column).await;
        assert!(message.contains("out of range"), "{message}");
    }
    assert_eq!(count(&db, "select count(*) from boards", &[]).await, 0);
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);

    // Zero in any spelling, and subnormals that are not zero, are Postgres's to keep, and it keeps them.
    let board = Uuid::new_v4();
    let (status, body) = env
        .post_raw(
            "/v1/batch",
            Some(&env.token(user)),
            format!(
                r#"{{"ops":[{{"op_id":"{}","table":"boards","kind":"insert","row":{{"id":"{board}",
                   "width": 5e-324, "height": 0e-400, "ratio": 1e-45, "samples": [3e-324, -0.0e-999]}}}}]}}"#,
                Uuid::new_v4()
            )
            .into_bytes(),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let row = db
        .query_one(
            "select width = '5e-324'::float8, height = 0, ratio = '1e-45'::float4, samples::text
               from boards where id = $1",
            &[&board],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0) && row.get::<_, bool>(1) && row.get::<_, bool>(2));
    assert_eq!(row.get::<_, String>(3), "{5e-324,-0}");
}
