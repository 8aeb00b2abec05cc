//! `POST /v1/batch` values at the edges of their types, against a real Postgres: what Postgres refuses is refused
//! by the server first (400 `invalid_value` with the op's index, nothing written), and what Postgres prints (the
//! live stream and snapshots send its output) is accepted back.

use deeprecall_tests::{TestEnv, count, error_code, insert, op, statuses};
use serde_json::{Value, json};
use uuid::Uuid;

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

/// Sends [`two_ops`] and asserts it was refused with 400 `invalid_value` at op 1, naming `column`; returns the
/// message.
async fn refused(env: &TestEnv, user: Uuid, table: &str, row: &str, column: &str) -> String {
    let (status, body) = env
        .post_raw("/v1/batch", Some(&env.token(user)), two_ops(table, row))
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (400, "invalid_value"),
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

/// Sends a batch of `ops` and asserts every op was applied.
async fn applied(env: &TestEnv, user: Uuid, ops: Value) {
    let n = ops.as_array().map_or(0, Vec::len);
    let (status, body) = env.batch(user, ops).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(statuses(&body), vec!["applied"; n], "{body}");
}

/// Sends one `kind` op on `table` whose row is raw JSON text (repeated keys, exponents: what `json!` would not
/// write as given) and asserts the batch was answered 200.
async fn applied_raw(env: &TestEnv, user: Uuid, table: &str, kind: &str, row: &str) {
    let body = format!(
        r#"{{"ops":[{{"op_id":"{}","table":"{table}","kind":"{kind}","row":{row}}}]}}"#,
        Uuid::new_v4()
    );
    let (status, body) = env
        .post_raw("/v1/batch", Some(&env.token(user)), body.into_bytes())
        .await;
    assert_eq!(status, 200, "{row}: {body}");
}

/// Fault: a double precision value that underflows (`1e-400`) was stored as 0 (and a real's `1e-46` too), where
/// Postgres refuses both as out of range.
#[tokio::test]
async fn floats_that_underflow_are_refused_as_postgres_refuses_them() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    env.ddl(
        "alter table boards add column ratio real, add column samples double precision[]",
        true,
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
    applied_raw(
        &env,
        user,
        "boards",
        "insert",
        &format!(
            r#"{{"id":"{board}", "width": 5e-324, "height": 0e-400, "ratio": 1e-45, "samples": [3e-324, -0.0e-999]}}"#
        ),
    )
    .await;
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

/// Fault: timestamps the batch accepts came back from Postgres (`0001-12-31 23:00:00+00 BC`,
/// `10000-01-01 14:59:59.999999+00`) in forms the batch refused, also in a delete carrying the row as received,
/// and a `timestamptz[]` element was sent to Postgres as `0000-12-31 …`, which it refuses.
#[tokio::test]
async fn timestamps_as_postgres_prints_them_are_accepted_back() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    db.batch_execute("set timezone to 'UTC'").await.unwrap();
    let user = Uuid::new_v4();
    let activity = Uuid::new_v4();
    applied(
        &env,
        user,
        json!([insert(
            "activities",
            json!({"id": activity, "title": "t", "starts_at": "0001-01-01T00:00:00+01:00",
                   "ends_at": "9999-12-31T23:59:59.999999-15:00"})
        )]),
    )
    .await;
    let row = db
        .query_one(
            "select starts_at::text, ends_at::text from activities where id = $1",
            &[&activity],
        )
        .await
        .unwrap();
    let (starts, ends): (String, String) = (row.get(0), row.get(1));
    assert_eq!(
        (starts.as_str(), ends.as_str()),
        (
            "0001-12-31 23:00:00+00 BC",
            "10000-01-01 14:59:59.999999+00"
        )
    );

    // Written back as received: the same instants.
    applied(
        &env,
        user,
        json!([
            op(
                "update",
                "activities",
                json!({"id": activity, "starts_at": starts})
            ),
            op(
                "update",
                "activities",
                json!({"id": activity, "ends_at": ends})
            ),
        ]),
    )
    .await;
    let row = db
        .query_one(
            "select starts_at::text, ends_at::text from activities where id = $1",
            &[&activity],
        )
        .await
        .unwrap();
    assert_eq!(
        (row.get::<_, String>(0), row.get::<_, String>(1)),
        (starts.clone(), ends.clone())
    );

    // The ends of Postgres's range, and years after 9999, in a timestamptz[]: stored and printed as sent.
    env.ddl("alter table works add column seen timestamptz[]", true)
        .await;
    let work = Uuid::new_v4();
    applied(
        &env,
        user,
        json!([insert(
            "works",
            json!({"id": work, "title": "t", "seen": ["0001-01-01T00:00:00+01:00", "4714-11-24 00:00:00+00 BC",
                   "294276-12-31 23:59:59.999999+00", "12026-12-01T10:00:00Z", null]})
        )]),
    )
    .await;
    let seen: String = db
        .query_one("select seen::text from works where id = $1", &[&work])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        seen,
        r#"{"0001-12-31 23:00:00+00 BC","4714-11-24 00:00:00+00 BC","294276-12-31 23:59:59.999999+00","2026-12-01 10:00:00+00",NULL}"#
            .replace("\"2026-12-01", "\"12026-12-01")
    );

    // A delete carrying the row as received.
    applied(
        &env,
        user,
        json!([op(
            "delete",
            "activities",
            json!({"id": activity, "starts_at": starts, "ends_at": ends})
        )]),
    )
    .await;
    assert_eq!(count(&db, "select count(*) from activities", &[]).await, 0);

    // Outside Postgres's range: refused before Postgres, nothing written.
    for (table, row, column) in [
        (
            "activities",
            r#"{"title": "t", "starts_at": "4714-11-23 23:59:59.999999+00 BC"}"#,
            "starts_at",
        ),
        (
            "activities",
            r#"{"title": "t", "ends_at": "294277-01-01 00:00:00+00"}"#,
            "ends_at",
        ),
        (
            "activities",
            r#"{"title": "t", "ends_at": "0000-01-01 00:00:00+00"}"#,
            "ends_at",
        ),
        (
            "works",
            r#"{"title": "t", "seen": ["294276-12-31 23:59:59.999999-01"]}"#,
            "seen",
        ),
    ] {
        refused(&env, user, table, row, column).await;
    }
    assert_eq!(count(&db, "select count(*) from activities", &[]).await, 0);
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 1);
}

/// Fault: a `jsonb[]` whose elements are arrays (`[{"a":1},[1,2]]`, one dimension of two JSON values) was refused
/// as "nested arrays".
#[tokio::test]
async fn jsonb_array_elements_may_be_json_arrays() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    env.ddl("alter table works add column notes jsonb[]", true)
        .await;
    let work = Uuid::new_v4();
    applied(
        &env,
        user,
        json!([insert(
            "works",
            json!({"id": work, "title": "t", "notes": [{"a": 1}, [1, 2], [], null, "s", [[["x"]]]]})
        )]),
    )
    .await;
    let notes: String = db
        .query_one("select notes::text from works where id = $1", &[&work])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        notes,
        r#"{"{\"a\": 1}","[1, 2]",[],NULL,"\"s\"","[[[\"x\"]]]"}"#
    );
    // Each element is still a jsonb value with jsonb's checks.
    let message = refused(
        &env,
        user,
        "works",
        r#"{"title": "t", "notes": [[1], ["\u0000"]]}"#,
        "notes",
    )
    .await;
    assert!(
        message.contains("element 1") && message.contains("u0000"),
        "{message}"
    );
    // jsonb is Postgres's normalised form of the value, not its text: the last of a repeated key, numbers as
    // numeric.
    applied_raw(
        &env,
        user,
        "works",
        "update",
        &format!(
            r#"{{"id":"{work}", "authors": {{"a": 1, "a": 2, "n": 1e2}}, "notes": [{{"b": 1, "b": [1e2]}}]}}"#
        ),
    )
    .await;
    let row = db
        .query_one(
            "select authors::text, notes::text from works where id = $1",
            &[&work],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"a": 2, "n": 100}"#);
    assert_eq!(row.get::<_, String>(1), r#"{"{\"b\": [100]}"}"#);
}

/// Fault: JSON text nested 20,000 deep, sent to a domain over jsonb, reached Postgres and came back as a 500
/// ("stack depth limit exceeded"): the depth bound applied to json/jsonb columns only.
#[tokio::test]
async fn domains_over_jsonb_get_the_jsonb_checks() {
    let env = TestEnv::start().await;
    let db = env.superuser().await;
    let user = Uuid::new_v4();
    env.ddl(
        "create domain doc as jsonb check (jsonb_typeof(value) <> 'null');
         create domain doc_again as doc;
         alter table works add column doc doc, add column doc_again doc_again",
        true,
    )
    .await;
    let nested = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
    for column in ["doc", "doc_again"] {
        for n in [1001, 20_000] {
            let row = json!({"title": "t", column: nested(n)}).to_string();
            let message = refused(&env, user, "works", &row, column).await;
            assert!(message.contains(&format!("{n} deep")), "{message}");
        }
        let row = json!({"title": "t", column: "[\"\\u0000\"]"}).to_string();
        let message = refused(&env, user, "works", &row, column).await;
        assert!(message.contains("u0000"), "{message}");
    }
    assert_eq!(count(&db, "select count(*) from works", &[]).await, 0);

    // At the bound the text is Postgres's to take; the domain's own check still applies (Postgres's error).
    let work = Uuid::new_v4();
    applied(
        &env,
        user,
        json!([insert(
            "works",
            json!({"id": work, "title": "t", "doc": nested(1000), "doc_again": "{\"a\": [1]}"})
        )]),
    )
    .await;
    let row = db
        .query_one(
            "select doc::text = $2, doc_again::text from works where id = $1",
            &[&work, &nested(1000)],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0));
    assert_eq!(row.get::<_, String>(1), r#"{"a": [1]}"#);
    let (status, body) = env
        .batch(
            user,
            json!([op(
                "update",
                "works",
                json!({"id": work, "doc_again": "null"})
            )]),
        )
        .await;
    assert_eq!(
        (status.as_u16(), body["error"]["op_index"].clone()),
        (422, json!(0)),
        "{body}"
    );
}
