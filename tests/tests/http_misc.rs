//! Small HTTP behaviours: JSON errors everywhere, where a URL token is accepted, quiet rescans.

use deeprecall_tests::TestEnv;
use serde_json::json;
use uuid::Uuid;

#[tokio::test]
async fn unknown_paths_and_methods_answer_json_errors() {
    let env = TestEnv::start().await;
    let (status, body) = env.get("/v1/nope", None).await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "not_found");
    let (status, body) = env.get("/v1/batch", None).await;
    assert_eq!(status, 405);
    assert_eq!(body["error"]["code"], "method_not_allowed");
    let token = env.token(Uuid::new_v4());
    let (status, body) = env.get("/v1/blobs?limit=many", Some(&token)).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["error"]["code"], "invalid_query");
}

#[tokio::test]
async fn a_token_in_the_url_is_only_accepted_for_the_stream() {
    let env = TestEnv::start().await;
    let token = env.token(Uuid::new_v4());
    let (status, body) = env
        .get(&format!("/v1/blobs?access_token={token}"), None)
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["error"]["code"], "missing_token");
}

#[tokio::test]
async fn an_unchanged_rescan_rewrites_no_device_row() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let device = Uuid::new_v4();
    let body = json!({"device_id": device, "complete": true, "blobs": [
        {"sha256": "a".repeat(64), "size": 10, "path": "/x/a.pdf"},
        {"sha256": "b".repeat(64), "size": 20, "path": "/x/b.pdf"},
    ]});
    let (status, first) = env.post("/v1/blobs/coordinate", Some(&token), &body).await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["devices_upserted"], 2);
    let db = env.superuser().await;
    let xmins = |rows: Vec<tokio_postgres::Row>| {
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>()
    };
    let sql = "select xmin::text from device_blobs order by sha256";
    let before = xmins(db.query(sql, &[]).await.unwrap());
    let (_, second) = env.post("/v1/blobs/coordinate", Some(&token), &body).await;
    assert_eq!(second["devices_upserted"], 0, "{second}");
    assert_eq!(xmins(db.query(sql, &[]).await.unwrap()), before);
    // A moved file is a change.
    let moved = json!({"device_id": device, "blobs": [{"sha256": "a".repeat(64), "size": 10, "path": "/y/a.pdf"}]});
    let (_, third) = env.post("/v1/blobs/coordinate", Some(&token), &moved).await;
    assert_eq!(third["devices_upserted"], 1, "{third}");
}

/// Consecutive ops of one shape run as one statement; a repeated id must still behave as if each op ran alone.
#[tokio::test]
async fn set_based_batches_keep_per_op_semantics() {
    use deeprecall_tests::{insert, op};
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let (status, body) = env
        .batch(
            user,
            json!([
                insert("works", json!({"id": a, "title": "a"})),
                insert("works", json!({"id": b, "title": "b"})),
                op("update", "works", json!({"id": a, "year": 1})),
                op("update", "works", json!({"id": a, "year": 2})),
                op("update", "works", json!({"id": c, "year": 3})),
                op("delete", "works", json!({"id": b})),
                op("delete", "works", json!({"id": b})),
                op("upsert", "works", json!({"id": c, "title": "c"})),
                op("upsert", "works", json!({"id": c, "title": "c2"})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let statuses: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "applied",
            "applied",
            "applied",
            "applied",
            "not_found",
            "applied",
            "not_found",
            "applied",
            "applied"
        ]
    );
    let db = env.superuser().await;
    let rows = db
        .query("select id, title, year from works order by title", &[])
        .await
        .unwrap();
    let got: Vec<(Uuid, String, Option<i32>)> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        got,
        vec![(a, "a".to_owned(), Some(2)), (c, "c2".to_owned(), None)]
    );
}

/// Browsers call the API from the app's origin: preflights name `authorization`, and every answer (errors
/// included: a CORS-less 401 looks like a network error to a page) carries the origin and the exposed headers.
#[tokio::test]
async fn cors_answers_preflights_and_errors_for_allowed_origins_only() {
    use deeprecall_sync::http::cors::CorsOrigins;
    let env = TestEnv::start_with(deeprecall_tests::EnvOptions {
        cors: CorsOrigins::List(vec!["http://app.example:3000".into()]),
        ..Default::default()
    })
    .await;
    let preflight = env
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/batch", env.base))
        .header("origin", "http://app.example:3000")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,content-type",
        )
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    let h = preflight.headers();
    assert_eq!(h["access-control-allow-origin"], "http://app.example:3000");
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    assert!(allowed.contains("content-type"), "{allowed}");
    assert!(
        h["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );

    // A 401 from an allowed origin is readable by the page.
    let denied = env
        .http
        .post(format!("{}/v1/batch", env.base))
        .header("origin", "http://app.example:3000")
        .json(&json!({"ops": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), 401);
    assert_eq!(
        denied.headers()["access-control-allow-origin"],
        "http://app.example:3000"
    );
    let exposed = denied.headers()["access-control-expose-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(exposed.contains("electric-offset"), "{exposed}");

    // Another origin gets no CORS headers (the browser blocks it).
    let other = env
        .http
        .post(format!("{}/v1/batch", env.base))
        .header("origin", "http://evil.example")
        .json(&json!({"ops": []}))
        .send()
        .await
        .unwrap();
    assert!(other.headers().get("access-control-allow-origin").is_none());
}

/// A compressed body was parsed as its compressed bytes (400 "not UTF-8"), and a plain body labelled compressed was
/// accepted as it was. Bodies are not decompressed: any `Content-Encoding` but `identity` is 415, on both write
/// endpoints, and nothing is written.
#[tokio::test]
async fn a_content_encoding_is_refused_not_guessed() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let token = env.token(user);
    let batch = json!({"ops": [deeprecall_tests::insert("works", json!({"id": Uuid::new_v4(), "title": "t"}))]});
    let coordinate = json!({"device_id": Uuid::new_v4(), "blobs": []});
    for (path, body) in [("/v1/batch", &batch), ("/v1/blobs/coordinate", &coordinate)] {
        for encoding in ["gzip", "br", "deflate"] {
            let resp = env
                .http
                .post(format!("{}{path}", env.base))
                .bearer_auth(&token)
                .header("content-type", "application/json")
                .header("content-encoding", encoding)
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 415, "{path} {encoding}");
            let body: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(body["error"]["code"], "unsupported_encoding", "{body}");
        }
    }
    let db = env.superuser().await;
    assert_eq!(
        deeprecall_tests::count(&db, "select count(*) from works", &[]).await,
        0
    );
    // `identity` is no encoding at all.
    let resp = env
        .http
        .post(format!("{}/v1/batch", env.base))
        .bearer_auth(&token)
        .header("content-type", "application/json")
        .header("content-encoding", "identity")
        .body(batch.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
