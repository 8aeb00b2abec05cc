//! `/metrics` on its own listener: every metric has HELP and TYPE, values move with what the server does, per-server
//! gauges come from the scraped server only, and the public port does not serve it.
//!
//! The recorder is process-wide and tests in this file run concurrently, so counters are asserted as deltas
//! (at least the events this test caused) and gauges on state only this test's server has.

use std::time::Duration;

use deeprecall_sync::metrics::{CATALOGUE, Kind, names};
use deeprecall_tests::admin::{MetricsEndpoint, Scrape};
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TEST_SECRET, TestEnv, insert};
use jsonwebtoken::{EncodingKey, Header};
use serde_json::json;
use uuid::Uuid;

/// Scrapes until `pred` holds (the replicator creates the slot in the background), at most 30 s.
async fn scrape_until(m: &MetricsEndpoint, what: &str, pred: impl Fn(&Scrape) -> bool) -> Scrape {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let s = m.scrape().await;
        if pred(&s) {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}:\n{}",
            s.text
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_metric_has_help_and_type_and_batches_are_counted() {
    let env = TestEnv::start().await;
    let m = MetricsEndpoint::start(&env).await;
    let before = m.scrape().await;

    let user = Uuid::new_v4();
    let (status, body) = env
        .batch(
            user,
            json!([
                insert("works", json!({"id": Uuid::new_v4(), "title": "a"})),
                insert("works", json!({"id": Uuid::new_v4(), "title": "b"})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = env
        .post_raw("/v1/batch", Some(&env.token(user)), b"{not json".to_vec())
        .await;
    assert_eq!(status, 400);
    let (status, _) = env.post("/v1/batch", None, &json!({"ops": []})).await;
    assert_eq!(status, 401);

    let after = m.scrape().await;
    for def in CATALOGUE {
        assert!(
            after.help.get(def.name).is_some_and(|h| h.len() > 20),
            "{} has no HELP:\n{}",
            def.name,
            after.text
        );
        let kind = match def.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        };
        assert_eq!(
            after.types.get(def.name).map(String::as_str),
            Some(kind),
            "{}",
            def.name
        );
    }
    let delta = |series: &str| after.value(series) - before.value(series);
    let status = |code: &str| format!("{}{{status=\"{code}\"}}", names::BATCH_REQUESTS);
    assert!(delta(&status("200")) >= 1.0, "{}", after.text);
    assert!(delta(&status("400")) >= 1.0, "{}", after.text);
    assert!(delta(&status("401")) >= 1.0, "{}", after.text);
    let count = format!("{}_count", names::BATCH_DURATION);
    assert!(delta(&count) >= 3.0, "{}", after.text);
    // A real histogram (buckets), not a summary.
    assert!(
        after
            .get(&format!("{}_bucket{{le=\"+Inf\"}}", names::BATCH_DURATION))
            .is_some(),
        "{}",
        after.text
    );
    assert!(
        after.get(&format!(
            "{}{{version=\"{}\"}}",
            names::BUILD_INFO,
            env!("CARGO_PKG_VERSION")
        )) == Some(1.0)
    );
}

#[tokio::test]
async fn jwt_rejections_are_counted_by_reason() {
    let env = TestEnv::start().await;
    let m = MetricsEndpoint::start(&env).await;
    let before = m.scrape().await;

    let now = jsonwebtoken::get_current_timestamp();
    let expired = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": Uuid::new_v4(), "exp": now - 3600}),
        &EncodingKey::from_secret(TEST_SECRET.as_bytes()),
    )
    .unwrap();
    let forged = jsonwebtoken::encode(
        &Header::default(),
        &json!({"sub": Uuid::new_v4(), "exp": now + 3600}),
        &EncodingKey::from_secret(b"not-the-server-secret-not-the-server"),
    )
    .unwrap();
    for token in [&expired, &expired, &forged] {
        let (status, _) = env.get("/v1/blobs", Some(token)).await;
        assert_eq!(status, 401);
    }
    let (status, _) = env.get("/v1/blobs", None).await;
    assert_eq!(status, 401);
    let (status, _, _) = env
        .post_with_authorization("/v1/batch", Some("Basic abc"), &json!({"ops": []}))
        .await;
    assert_eq!(status, 401);

    let after = m.scrape().await;
    let reason = |r: &str| {
        let series = format!("{}{{reason=\"{r}\"}}", names::JWT_REJECTIONS);
        after.value(&series) - before.value(&series)
    };
    assert!(reason("token_expired") >= 2.0, "{}", after.text);
    assert!(reason("invalid_signature") >= 1.0, "{}", after.text);
    assert!(reason("missing_token") >= 1.0, "{}", after.text);
    assert!(
        reason("malformed_authorization_header") >= 1.0,
        "{}",
        after.text
    );
    // Reasons are registered at zero before they first happen, so rate() works from the first scrape.
    assert!(
        after
            .get(&format!(
                "{}{{reason=\"unknown_key\"}}",
                names::JWT_REJECTIONS
            ))
            .is_some()
    );
}

#[tokio::test]
async fn slot_gauges_follow_postgres_and_lag_grows_while_the_stream_is_down() {
    // Stops Postgres: a cluster of its own.
    let mut env = TestEnv::start_with(deeprecall_tests::EnvOptions {
        own_cluster: true,
        ..Default::default()
    })
    .await;
    let m = MetricsEndpoint::start(&env).await;
    let slot = |s: &Scrape, name: &str| s.get(name).unwrap_or(f64::NAN);
    let live = scrape_until(&m, "an active slot", |s| {
        slot(s, names::SLOT_ACTIVE) == 1.0 && slot(s, names::DATABASE_UP) == 1.0
    })
    .await;
    assert_eq!(slot(&live, names::SLOT_EXISTS), 1.0);
    assert!(slot(&live, names::SLOT_LAG_BYTES) >= 0.0, "{}", live.text);
    assert!(
        slot(&live, names::SLOT_RETAINED_BYTES) >= 0.0,
        "{}",
        live.text
    );
    // The test cluster keeps max_slot_wal_keep_size at its default, -1: no limit.
    assert_eq!(slot(&live, names::SLOT_SAFE_WAL_SIZE_BYTES), -1.0);
    let status =
        |s: &Scrape, v: &str| slot(s, &format!("{}{{status=\"{v}\"}}", names::SLOT_WAL_STATUS));
    assert_eq!(status(&live, "reserved"), 1.0, "{}", live.text);
    assert_eq!(status(&live, "lost"), 0.0);
    assert_eq!(slot(&live, names::POOL_MAX), 8.0, "the harness's pool size");
    assert_eq!(slot(&live, names::SLOT_GENERATION), 1.0);

    // With the server stopped nothing confirms the slot: every write grows the lag. The metrics endpoint keeps
    // the old state, whose pool still reaches Postgres.
    env.stop_server().await;
    let stopped = scrape_until(&m, "an inactive slot", |s| {
        slot(s, names::SLOT_ACTIVE) == 0.0
    })
    .await;
    let db = env.superuser().await;
    let user = Uuid::new_v4().to_string();
    db.batch_execute(&format!(
        "insert into works (owner_id, title) select '{user}', 'load ' || g from generate_series(1, 500) g"
    ))
    .await
    .unwrap();
    let loaded = m.scrape().await;
    let grew = slot(&loaded, names::SLOT_LAG_BYTES) - slot(&stopped, names::SLOT_LAG_BYTES);
    assert!(grew > 10_000.0, "lag grew by {grew}:\n{}", loaded.text);
    // It is what Postgres itself says.
    let truth: i64 = db
        .query_one(
            "select (pg_current_wal_lsn() - confirmed_flush_lsn)::bigint from pg_replication_slots
              where slot_name = 'deeprecall_sync'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        truth as f64 >= slot(&loaded, names::SLOT_LAG_BYTES),
        "truth {truth} vs {}",
        loaded.text
    );

    // Postgres gone: the scrape still answers, says so, and does not invent slot figures.
    env.db.own_cluster_mut().stop().expect("stopping Postgres");
    let down = m.scrape().await;
    assert_eq!(slot(&down, names::DATABASE_UP), 0.0, "{}", down.text);
    assert!(slot(&down, names::SLOT_LAG_BYTES).is_nan(), "{}", down.text);
}

/// Someone drops the slot under the running server (or it is invalidated while no server streams): the server makes
/// a new one at once, so an alert on `wal_status = 'lost'` rarely sees it. The counter (and an ERROR line) must: the
/// changes made meanwhile are never streamed. Before, only a loss found while streaming was counted.
#[tokio::test]
async fn a_slot_dropped_under_the_server_is_counted_as_recreated() {
    let env = TestEnv::start_with(deeprecall_tests::EnvOptions {
        own_cluster: true,
        ..Default::default()
    })
    .await;
    let m = MetricsEndpoint::start(&env).await;
    let value = |s: &Scrape, name: &str| s.get(name).unwrap_or(0.0);
    let before = scrape_until(&m, "an active slot", |s| {
        value(s, names::SLOT_ACTIVE) == 1.0
    })
    .await;
    assert_eq!(value(&before, names::SLOT_GENERATION), 1.0);
    let db = env.superuser().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The server's walsender holds the slot; end it, and drop the slot before the server takes it again.
        let dropped = db
            .batch_execute(
                "select pg_terminate_backend(active_pid) from pg_replication_slots
                  where slot_name = 'deeprecall_sync' and active_pid is not null;
                 select pg_drop_replication_slot('deeprecall_sync');",
            )
            .await;
        if dropped.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "could not drop the slot: {dropped:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = scrape_until(&m, "the slot made anew", |s| {
        value(s, names::SLOT_GENERATION) == 2.0 && value(s, names::SLOT_ACTIVE) == 1.0
    })
    .await;
    assert!(
        value(&after, names::SLOT_RECREATIONS) >= value(&before, names::SLOT_RECREATIONS) + 1.0,
        "{}",
        after.text
    );
}

#[tokio::test]
async fn per_server_gauges_come_from_the_scraped_server() {
    let a = TestEnv::start().await;
    let b = TestEnv::start().await;
    let ma = MetricsEndpoint::start(&a).await;
    let mb = MetricsEndpoint::start(&b).await;
    let user = Uuid::new_v4();
    let mut client = StreamClient::connect(&a.base, &a.token(user)).await;
    client.subscribe("works", "works", json!(null)).await;
    client.up_to_date("works").await;

    let connections = format!("{}{{transport=\"websocket\"}}", names::CONNECTIONS);
    let sa = ma.scrape().await;
    let sb = mb.scrape().await;
    assert_eq!(sa.get(&connections), Some(1.0), "{}", sa.text);
    assert_eq!(sa.get(names::USERS), Some(1.0));
    assert_eq!(sb.get(&connections), Some(0.0), "{}", sb.text);
    assert_eq!(sb.get(names::USERS), Some(0.0));
    // A held long-poll of the shape endpoint is counted as long_poll, not as a WebSocket (it was never counted).
    let token = a.token(user);
    let shape =
        deeprecall_tests::shape::Follower::start(&a.http, &a.base, &token, "table=works").await;
    let held = tokio::spawn({
        let (mut shape, http) = (shape.clone(), a.http.clone());
        async move { shape.poll(&http, true).await }
    });
    let long_poll = format!("{}{{transport=\"long_poll\"}}", names::CONNECTIONS);
    let s = scrape_until(&ma, "the held long-poll", |s| {
        s.get(&long_poll) == Some(1.0)
    })
    .await;
    assert_eq!(s.get(&connections), Some(1.0), "{}", s.text);
    held.abort();
    client.close().await;
}

#[tokio::test]
async fn metrics_are_not_served_on_the_public_port() {
    let env = TestEnv::start().await;
    let m = MetricsEndpoint::start(&env).await;
    let (status, body) = env.get("/metrics", None).await;
    assert_eq!(status, 404, "{body}");
    // Not even to an admin.
    let (status, _) = env
        .get("/metrics", Some(&env.admin_token(Uuid::new_v4())))
        .await;
    assert_eq!(status, 404);
    // The metrics listener serves /metrics and nothing else.
    let other = m.url.replace("/metrics", "/v1/batch");
    assert_eq!(reqwest::get(&other).await.unwrap().status(), 404);
    assert!(
        m.scrape()
            .await
            .text
            .contains("# TYPE deeprecall_database_up gauge")
    );
}

#[tokio::test]
async fn the_live_path_counts_frames_refetches_subscriptions_and_batch_rows() {
    let env = TestEnv::start().await;
    let m = MetricsEndpoint::start(&env).await;
    let before = m.scrape().await;
    let user = Uuid::new_v4();
    let mut client = StreamClient::connect(&env.base, &env.token(user)).await;
    client.subscribe("works", "works", json!(null)).await;
    client.up_to_date("works").await;
    // A resume with an offset this server never issues: one must_refetch, reason invalid_offset.
    client
        .resume("notes", "annotations", json!(null), "not-an-offset")
        .await;
    client.up_to_date("notes").await;
    let (status, body) = env
        .batch(
            user,
            json!([
                insert("works", json!({"id": Uuid::new_v4(), "title": "a"})),
                insert("works", json!({"id": Uuid::new_v4(), "title": "b"})),
                insert("works", json!({"id": Uuid::new_v4(), "title": "c"})),
            ]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    client
        .until(Duration::from_secs(30), |v| v["type"] == "txn")
        .await;

    let live = scrape_until(&m, "the live counters", |s| {
        s.value(names::FRAMES_SENT) - before.value(names::FRAMES_SENT) >= 4.0
    })
    .await;
    let delta = |series: &str| live.value(series) - before.value(series);
    assert!(delta(names::SENT_BYTES) > 100.0, "{}", live.text);
    assert!(
        delta(&format!(
            "{}{{reason=\"invalid_offset\"}}",
            names::MUST_REFETCH
        )) >= 1.0,
        "{}",
        live.text
    );
    assert!(
        live.value(&format!(
            "{}{{transport=\"websocket\"}}",
            names::SUBSCRIPTIONS
        )) >= 2.0,
        "{}",
        live.text
    );
    assert!(
        delta(&format!("{}_sum", names::BATCH_ROWS)) >= 3.0,
        "{}",
        live.text
    );
    assert!(delta(names::TRANSACTIONS) >= 1.0, "{}", live.text);
    assert!(delta(names::ROUTED_CHANGES) >= 3.0, "{}", live.text);
    assert_eq!(
        live.value(&format!("{}{{state=\"streaming\"}}", names::STREAM_STATE)),
        1.0,
        "{}",
        live.text
    );
    assert!(
        live.get(names::SNAPSHOTS_READING).is_some(),
        "{}",
        live.text
    );

    // The connection closes: its subscriptions end.
    client.close().await;
    scrape_until(&m, "subscriptions gone", |s| {
        s.value(&format!(
            "{}{{transport=\"websocket\"}}",
            names::SUBSCRIPTIONS
        )) <= before.value(&format!(
            "{}{{transport=\"websocket\"}}",
            names::SUBSCRIPTIONS
        ))
    })
    .await;
}
