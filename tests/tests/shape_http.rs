//! `GET /v1/shape`, the request/response contract the Electric client depends on: headers on every kind of
//! response, values as Postgres text, the schema header, 400/401/409, CORS, columns and replica=full.

use deeprecall_sync::http::cors::CorsOrigins;
use deeprecall_tests::shape::{Follower, enc, get};
use deeprecall_tests::{EnvOptions, TestEnv, error_code, insert, op};
use serde_json::{Value, json};
use uuid::Uuid;

const ORIGIN: &str = "https://app.example.com";

async fn env() -> TestEnv {
    TestEnv::start_with(EnvOptions {
        cors: CorsOrigins::Any,
        ..Default::default()
    })
    .await
}

fn is_offset(s: &str) -> bool {
    s.split_once('_')
        .is_some_and(|(a, b)| !a.is_empty() && a.bytes().all(|c| c.is_ascii_digit()) && b == "0")
}

#[tokio::test]
async fn snapshot_headers_text_values_and_schema() {
    let env = env().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let w = Uuid::new_v4();
    let (s, b) = env
        .batch(
            alice,
            json!([insert(
                "works",
                json!({"id": w, "title": "Attention", "year": 2017, "tags": ["nlp", "x y", "a,b"],
                       "authors": [{"name": "V"}], "favorite": true})
            )]),
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

    let token = env.token(alice);
    let r = get(
        &env.http,
        &env.base,
        Some(&token),
        "table=works&offset=-1&log=full",
        &[("Origin", ORIGIN)],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.header("cache-control"), Some("no-store"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert!(is_offset(&r.offset()), "{r:?}");
    assert!(r.header("electric-up-to-date").is_some());
    assert!(!r.handle().is_empty());
    assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
    let exposed = r
        .header("access-control-expose-headers")
        .unwrap_or("")
        .to_owned();
    for h in [
        "electric-handle",
        "electric-offset",
        "electric-schema",
        "electric-cursor",
        "electric-up-to-date",
    ] {
        assert!(exposed.contains(h), "{h} not exposed: {exposed}");
    }

    let schema: Value = serde_json::from_str(r.header("electric-schema").expect("schema")).unwrap();
    assert_eq!(schema["year"], json!({"type": "int4"}));
    assert_eq!(
        schema["favorite"],
        json!({"type": "bool", "not_null": true})
    );
    assert_eq!(
        schema["authors"],
        json!({"type": "jsonb", "not_null": true})
    );
    assert_eq!(
        schema["tags"],
        json!({"type": "text", "dims": 1}),
        "no not_null on arrays"
    );
    assert_eq!(schema["owner_id"]["pk_index"], 0);
    assert_eq!(schema["id"]["pk_index"], 1);
    assert_eq!(schema["created_at"]["type"], "timestamptz");

    let messages = r.messages();
    assert_eq!(
        messages.len(),
        2,
        "alice's row and up-to-date only: {messages:?}"
    );
    let row = &messages[0];
    assert_eq!(
        row["key"],
        format!("\"public\".\"works\"/\"{alice}\"/\"{w}\"")
    );
    assert_eq!(row["headers"]["operation"], "insert");
    assert_eq!(row["headers"]["relation"], json!(["public", "works"]));
    let v = &row["value"];
    assert_eq!(v["year"], "2017");
    assert_eq!(v["favorite"], "t");
    assert_eq!(v["tags"], "{nlp,\"x y\",\"a,b\"}");
    assert_eq!(v["authors"], "[{\"name\": \"V\"}]");
    assert_eq!(v["subtitle"], Value::Null);
    assert_eq!(v["owner_id"], alice.to_string());
    assert!(
        v["created_at"].as_str().is_some_and(|t| t.ends_with("+00")),
        "{v}"
    );
    let last = &messages[1];
    assert_eq!(last["headers"]["control"], "up-to-date");
    let lsn = last["headers"]["global_last_seen_lsn"].as_str().unwrap();
    assert!(lsn.bytes().all(|c| c.is_ascii_digit()), "decimal: {lsn}");
    assert!(!r.text.contains(&bob.to_string()), "bob leaked: {}", r.text);

    // A non-live catch-up: the same headers minus nothing (schema on every non-live response).
    let again = get(
        &env.http,
        &env.base,
        Some(&token),
        &format!(
            "table=works&offset={}&handle={}",
            r.offset(),
            enc(&r.handle())
        ),
        &[],
    )
    .await;
    assert_eq!(again.status, 200, "{again:?}");
    assert_eq!(again.handle(), r.handle());
    assert!(again.header("electric-schema").is_some());
    assert!(again.header("electric-up-to-date").is_some());
    assert_eq!(
        again.messages().last().unwrap()["headers"]["control"],
        "up-to-date"
    );
    // Every new snapshot gets a new handle.
    let other = get(
        &env.http,
        &env.base,
        Some(&token),
        "table=public.works&offset=-1",
        &[],
    )
    .await;
    assert_eq!(other.status, 200);
    assert_ne!(other.handle(), r.handle());
}

#[tokio::test]
async fn bad_requests_are_400_and_bad_tokens_401() {
    let env = env().await;
    let alice = Uuid::new_v4();
    let token = env.token(alice);
    let ok = get(
        &env.http,
        &env.base,
        Some(&token),
        "table=works&offset=-1",
        &[],
    )
    .await;
    let handle = enc(&ok.handle());
    for query in [
        "offset=-1".to_owned(),
        "table=no_such_table&offset=-1".into(),
        "table=sync_applied_ops&offset=-1".into(),
        "table=other.works&offset=-1".into(),
        "table=works".into(),
        format!("table=works&offset={}", ok.offset()),
        "table=works&offset=-1&live=true".into(),
        "table=works&offset=-1&live=maybe".into(),
        "table=works&offset=-1&replica=half".into(),
        "table=works&offset=-1&log=changes_only".into(),
        "table=works&offset=now".into(),
        format!("table=works&offset=-1&where={}", enc("nope = 1")),
        format!("table=works&offset=-1&where={}", enc("title LIKE 'a%'")),
        format!(
            "table=works&offset=-1&where={}",
            enc("title = 'a'; drop table works")
        ),
        format!("table=works&offset=-1&where={}", enc("year = 'abc'")),
        format!("table=works&offset=-1&where={}", enc("year > $1")),
        format!(
            "table=works&offset=-1&where={}&params%5B1%5D=x",
            enc("year > $1")
        ),
        format!("table=works&offset=-1&where={}", enc("authors < '[]'")),
        format!(
            "table=works&offset=-1&where={}",
            enc("tags = 'not an array'")
        ),
        "table=works&offset=-1&params%5Bx%5D=1".into(),
        // A parameter twice with different values, and params numbered with a gap.
        "table=no_such_table&table=works&offset=-1".into(),
        format!(
            "table=works&offset=-1&where={}&params%5B1%5D=1999&params%5B1%5D=2000",
            enc("year > $1")
        ),
        format!(
            "table=works&offset=-1&where={}&params%5B2%5D=2000",
            enc("year > $2")
        ),
        format!("table=works&offset=-1&columns={}", enc("\"id\",\"title\"")),
        format!(
            "table=works&offset=-1&columns={}",
            enc("\"id\",\"owner_id\",\"nope\"")
        ),
        format!("table=works&offset=-1&columns={}", enc("\"id\",,")),
        format!("table=works&offset=-1&handle={handle}&live=true"),
    ] {
        let r = get(
            &env.http,
            &env.base,
            Some(&token),
            &query,
            &[("Origin", ORIGIN)],
        )
        .await;
        assert_eq!(r.status, 400, "{query}: {r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"), "{query}");
        assert_eq!(
            r.header("access-control-allow-origin"),
            Some(ORIGIN),
            "{query}"
        );
        let body = r.json();
        assert!(!error_code(&body).is_empty(), "{query}: {body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // Nothing was created by the bad requests: the works table is untouched and no error leaked as a 500.
    let db = env.superuser().await;
    let n: i64 = db
        .query_one("select count(*) from works", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);

    // 401: JSON body and CORS headers, so a browser client reaches onError.
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": alice, "exp": jsonwebtoken::get_current_timestamp() - 3600}),
        &jsonwebtoken::EncodingKey::from_secret(deeprecall_tests::TEST_SECRET.as_bytes()),
    )
    .unwrap();
    for (token, code) in [
        (None, "missing_token"),
        (Some("not-a-jwt"), "malformed_token"),
        (Some(expired.as_str()), "token_expired"),
    ] {
        let r = get(
            &env.http,
            &env.base,
            token,
            "table=works&offset=-1",
            &[("Origin", ORIGIN)],
        )
        .await;
        assert_eq!(r.status, 401, "{r:?}");
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(error_code(&r.json()), code, "{}", r.text);
    }
    // Preflight names authorization explicitly.
    let pre = env
        .http
        .request(reqwest::Method::OPTIONS, format!("{}/v1/shape", env.base))
        .header("Origin", ORIGIN)
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "authorization")
        .send()
        .await
        .unwrap();
    assert!(pre.status().is_success(), "{:?}", pre.status());
    let allowed = pre
        .headers()
        .get("access-control-allow-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
}

#[tokio::test]
async fn unusable_handles_and_offsets_are_409_with_a_new_handle() {
    let env = env().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let (ta, tb) = (env.token(alice), env.token(bob));
    let a = get(
        &env.http,
        &env.base,
        Some(&ta),
        "table=works&offset=-1",
        &[],
    )
    .await;
    let b = get(
        &env.http,
        &env.base,
        Some(&tb),
        "table=works&offset=-1",
        &[],
    )
    .await;
    let filtered = get(
        &env.http,
        &env.base,
        Some(&ta),
        &format!("table=works&offset=-1&where={}", enc("year > 2000")),
        &[],
    )
    .await;
    let cases = [
        // Bob's handle, Alice's token.
        (
            format!(
                "table=works&offset={}&handle={}",
                b.offset(),
                enc(&b.handle())
            ),
            "unknown_handle",
        ),
        // The handle of another definition (a where).
        (
            format!(
                "table=works&offset={}&handle={}",
                filtered.offset(),
                enc(&filtered.handle())
            ),
            "unknown_handle",
        ),
        // Made up.
        (
            format!("table=works&offset={}&handle=1-abc-def", a.offset()),
            "unknown_handle",
        ),
        // Offsets this server never issued.
        (
            format!("table=works&offset=0%2F1A0ABC8&handle={}", enc(&a.handle())),
            "invalid_offset",
        ),
        (
            format!("table=works&offset=12_inf&handle={}", enc(&a.handle())),
            "invalid_offset",
        ),
        // Ahead of the server.
        (
            format!(
                "table=works&offset=999999999999_0&handle={}",
                enc(&a.handle())
            ),
            "offset_ahead_of_server",
        ),
        // Before this process's history.
        (
            format!("table=works&offset=1_0&handle={}", enc(&a.handle())),
            "offset_older_than_server_history",
        ),
    ];
    for (query, reason) in cases {
        let r = get(
            &env.http,
            &env.base,
            Some(&ta),
            &query,
            &[("Origin", ORIGIN)],
        )
        .await;
        assert_eq!(r.status, 409, "{query}: {r:?}");
        assert_eq!(r.header("cache-control"), Some("no-store"));
        assert_eq!(r.header("access-control-allow-origin"), Some(ORIGIN));
        let new = r.handle();
        assert_ne!(new, a.handle());
        assert_ne!(new, b.handle());
        let body = r.json();
        assert_eq!(body[0]["headers"]["control"], "must-refetch", "{body}");
        assert_eq!(body[0]["headers"]["reason"], reason, "{query}");
        // The new handle is never served as-is: with offset=-1 it is ignored and a fresh one comes back.
        let again = get(
            &env.http,
            &env.base,
            Some(&ta),
            &format!("table=works&offset=-1&handle={}", enc(&new)),
            &[],
        )
        .await;
        assert_eq!(again.status, 200);
        assert_ne!(again.handle(), new);
    }
    // Alice's own handle works, also for a live request with an old cursor and app parameters.
    let r = get(
        &env.http,
        &env.base,
        Some(&ta),
        &format!(
            "table=works&offset={}&handle={}&cache-buster=x&expired_handle=y&my_app_param=1",
            a.offset(),
            enc(&a.handle())
        ),
        &[],
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
}

#[tokio::test]
async fn columns_and_replica_full() {
    let env = env().await;
    let alice = Uuid::new_v4();
    let w = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": w, "title": "one", "year": 2001})
        )]),
    )
    .await;
    let token = env.token(alice);
    let cols = enc("\"id\",\"owner_id\",\"title\",\"year\"");
    let mut f = Follower::start(
        &env.http,
        &env.base,
        &token,
        &format!("table=works&columns={cols}&replica=full"),
    )
    .await;
    let row = &f.log.by_id()[&w.to_string()];
    assert_eq!(
        row.keys().cloned().collect::<Vec<_>>(),
        vec!["id", "owner_id", "title", "year"]
    );
    let (s, b) = env
        .batch(
            alice,
            json!([op("update", "works", json!({"id": w, "title": "two"}))]),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let mut update = None;
    for _ in 0..50 {
        let r = f.poll(&env.http, false).await;
        assert_eq!(r.status, 200);
        if let Some(m) = r
            .messages()
            .into_iter()
            .find(|m| m["headers"]["operation"] == "update")
        {
            update = Some(m);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let update = update.expect("the update arrives");
    assert_eq!(update["value"]["title"], "two");
    assert!(
        update["value"].get("abstract").is_none(),
        "projected: {update}"
    );
    assert_eq!(update["old_value"], json!({"title": "one"}), "{update}");
    // The 32-bit xid of the batch.
    let txid: u64 = b["txid"].as_str().unwrap().parse().unwrap();
    assert_eq!(update["headers"]["txids"], json!([txid & 0xFFFF_FFFF]));
    let lsn = update["headers"]["lsn"].as_str().unwrap();
    assert!(lsn.bytes().all(|c| c.is_ascii_digit()), "{lsn}");
    let schema: Value = serde_json::from_str(
        get(
            &env.http,
            &env.base,
            Some(&token),
            &format!("table=works&columns={cols}&offset=-1"),
            &[],
        )
        .await
        .header("electric-schema")
        .unwrap(),
    )
    .unwrap();
    assert_eq!(schema.as_object().unwrap().len(), 4, "{schema}");
}
