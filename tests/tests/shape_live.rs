//! `GET /v1/shape` over time: catch-up from an offset without duplicates, live long-polls that hold and answer at
//! once, cursors, filter moves, TRUNCATE and column changes as 409, users isolated, handles surviving a graceful
//! restart, and server-sent events.

use std::time::{Duration, Instant};

use deeprecall_tests::shape::{Follower, enc, get, listener_with, short_hold, truth_text};
use deeprecall_tests::{TestEnv, insert, op};
use serde_json::{Value, json};
use uuid::Uuid;

/// Polls (not live) until `pred` holds for the log, at most ~10 s.
async fn catch_up(env: &TestEnv, f: &mut Follower, pred: impl Fn(&Follower) -> bool) {
    for _ in 0..100 {
        let r = f.poll(&env.http, false).await;
        assert_eq!(r.status, 200, "{r:?}");
        if pred(f) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("did not converge: {:?}", f.log.by_id());
}

/// Waits (at most ~10 s) until a live request of `owner` is registered with the server's hub: a long-poll that the
/// server holds. Writing, truncating or stopping the server before then would test something else.
async fn until_held(env: &TestEnv, owner: Uuid) {
    for _ in 0..1000 {
        if env.state.hub.user_connections(owner) > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no live request of {owner} is held");
}

#[tokio::test]
async fn catch_up_from_an_offset_is_exact_and_resumable() {
    let env = TestEnv::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    env.batch(
        alice,
        json!([insert("works", json!({"id": ids[0], "title": "zero"}))]),
    )
    .await;
    let token = env.token(alice);
    let mut f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    assert_eq!(f.log.rows.len(), 1);
    // A client that stores its handle, offset and rows here and comes back later.
    let saved = f.clone();

    // Several transactions, one of them touching two rows, plus another user's.
    for (i, id) in ids.iter().enumerate().skip(1) {
        let (s, b) = env
            .batch(
                alice,
                json!([insert("works", json!({"id": id, "title": format!("w{i}")}))]),
            )
            .await;
        assert_eq!(s, 200, "{b}");
    }
    env.batch(
        alice,
        json!([
            op("update", "works", json!({"id": ids[0], "title": "zero!"})),
            op("delete", "works", json!({"id": ids[1]})),
        ]),
    )
    .await;
    env.batch(
        bob,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "bob"})
        )]),
    )
    .await;
    let truth = truth_text(&env, "works", alice, "true").await;
    catch_up(&env, &mut f, |f| f.log.by_id() == truth).await;

    // Resuming from the saved handle and offset replays the same changes once each (the log panics on a
    // duplicate insert, or an update/delete of a row it does not hold) and ends in the same state.
    let mut resumed = saved;
    catch_up(&env, &mut resumed, |r| r.log.by_id() == truth).await;
    assert_eq!(resumed.log.changes.len(), f.log.changes.len());
    // At the end: nothing new.
    let r = resumed.poll(&env.http, false).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.messages().len(), 1, "only up-to-date: {}", r.text);
    for m in &f.log.changes {
        assert_ne!(m["value"]["owner_id"], bob.to_string(), "bob leaked");
    }
}

#[tokio::test]
async fn live_requests_hold_answer_at_once_and_cursors_increase() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let hold = Duration::from_millis(1500);
    let base = listener_with(&env, short_hold(hold)).await;
    let token = env.token(alice);
    let mut f = Follower::start(&env.http, &base, &token, "table=works").await;

    // Nothing happens: held for the whole hold time, then up-to-date at an offset at or past the request's.
    let before: u64 = f.offset.split('_').next().unwrap().parse().unwrap();
    let t = Instant::now();
    let r = f.poll(&env.http, true).await;
    assert!(t.elapsed() >= hold, "answered after {:?}", t.elapsed());
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("electric-schema").is_none(),
        "no schema on live responses"
    );
    let c1: u64 = r
        .header("electric-cursor")
        .expect("cursor on live")
        .parse()
        .unwrap();
    assert_eq!(r.messages(), vec![r.messages()[0].clone()]);
    assert_eq!(r.messages()[0]["headers"]["control"], "up-to-date");
    let after: u64 = f.offset.split('_').next().unwrap().parse().unwrap();
    assert!(after >= before);

    // A write while held: answered with it, well before the hold ends (the write is what ends it).
    let w = Uuid::new_v4();
    let poll = {
        let mut f = f.clone();
        let http = env.http.clone();
        tokio::spawn(async move {
            let r = f.poll(&http, true).await;
            (r, f)
        })
    };
    until_held(&env, alice).await;
    let (s, b) = env
        .batch(
            alice,
            json!([insert("works", json!({"id": w, "title": "live"}))]),
        )
        .await;
    assert_eq!(s, 200, "{b}");
    let (r, f2) = poll.await.unwrap();
    assert_eq!(r.status, 200);
    let msgs = r.messages();
    assert_eq!(msgs[0]["headers"]["operation"], "insert", "{}", r.text);
    assert_eq!(msgs[0]["value"]["title"], "live");
    assert_eq!(msgs.last().unwrap()["headers"]["control"], "up-to-date");
    let txid: u64 = b["txid"].as_str().unwrap().parse().unwrap();
    assert_eq!(msgs[0]["headers"]["txids"], json!([txid & 0xFFFF_FFFF]));
    let c2: u64 = r.header("electric-cursor").unwrap().parse().unwrap();
    assert!(c2 > c1, "cursor must increase: {c1} -> {c2}");
    f = f2;
    assert_eq!(f.log.rows.len(), 1);
    // Cursors keep increasing, also across quick responses.
    let mut last = c2;
    for _ in 0..3 {
        let r = f.poll(&env.http, true).await;
        let c: u64 = r.header("electric-cursor").unwrap().parse().unwrap();
        assert!(c > last);
        last = c;
    }
}

#[tokio::test]
async fn filters_move_rows_in_and_out() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    env.batch(
        alice,
        json!([
            insert(
                "works",
                json!({"id": a, "title": "a", "read_status": "unread"})
            ),
            insert(
                "works",
                json!({"id": b, "title": "b", "read_status": "read"})
            ),
        ]),
    )
    .await;
    let token = env.token(alice);
    let shape = format!(
        "table=works&where={}&params%5B1%5D=unread",
        enc("read_status = $1")
    );
    let mut f = Follower::start(&env.http, &env.base, &token, &shape).await;
    assert_eq!(
        f.log.by_id().keys().cloned().collect::<Vec<_>>(),
        vec![a.to_string()]
    );
    let snapshot_rows = f.log.changes.len();
    // a leaves, b enters (an insert carrying the whole row), an unrelated change of b's title while read.
    env.batch(
        alice,
        json!([op(
            "update",
            "works",
            json!({"id": a, "read_status": "read"})
        )]),
    )
    .await;
    env.batch(
        alice,
        json!([op(
            "update",
            "works",
            json!({"id": b, "read_status": "unread"})
        )]),
    )
    .await;
    env.batch(
        alice,
        json!([op("update", "works", json!({"id": a, "title": "a2"}))]),
    )
    .await;
    let truth = truth_text(&env, "works", alice, "read_status = 'unread'").await;
    catch_up(&env, &mut f, |f| f.log.by_id() == truth).await;
    let ops: Vec<(String, String)> = f
        .log
        .changes
        .iter()
        .skip(snapshot_rows)
        .map(|m| {
            (
                m["headers"]["operation"].as_str().unwrap().to_owned(),
                m["value"]["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        ops,
        vec![
            ("delete".into(), a.to_string()),
            ("insert".into(), b.to_string())
        ],
        "a change outside the filter is not sent"
    );
    let insert = &f.log.changes[snapshot_rows + 1];
    assert_eq!(
        insert["value"]["title"], "b",
        "a move-in carries the whole row"
    );
    assert!(insert["value"].get("created_at").is_some());
}

#[tokio::test]
async fn truncate_and_column_changes_answer_409() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert("works", json!({"id": Uuid::new_v4(), "title": "x"}))]),
    )
    .await;
    let token = env.token(alice);
    let f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    // Not referencing works, so `truncate works cascade` leaves it alone.
    let blobs = Follower::start(&env.http, &env.base, &token, "table=blobs_meta").await;

    // A held request (default 20 s hold) is answered promptly with 409 on TRUNCATE.
    let held = {
        let mut f = f.clone();
        let http = env.http.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            (f.poll(&http, true).await, t.elapsed())
        })
    };
    until_held(&env, alice).await;
    env.superuser()
        .await
        .batch_execute("truncate works cascade")
        .await
        .unwrap();
    let (r, took) = held.await.unwrap();
    assert_eq!(r.status, 409, "{r:?}");
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    assert_eq!(r.json()[0]["headers"]["reason"], "truncated");
    assert_ne!(r.handle(), f.handle);
    // A later request from before the truncate: 409 as well.
    let r = get(
        &env.http,
        &env.base,
        Some(&token),
        &format!("table=works&offset={}&handle={}", f.offset, enc(&f.handle)),
        &[],
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.json()[0]["headers"]["reason"], "table_truncated");
    // Another table's shape is not affected.
    let mut blobs = blobs;
    assert_eq!(blobs.poll(&env.http, false).await.status, 200);

    // A column change (noticed with the table's next change) makes the shape refetch; the fresh snapshot has it.
    let mut f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    env.superuser()
        .await
        .batch_execute("alter table works add column rating integer not null default 3")
        .await
        .unwrap();
    env.batch(
        alice,
        json!([insert("works", json!({"id": Uuid::new_v4(), "title": "y"}))]),
    )
    .await;
    let mut status = 200;
    for _ in 0..50 {
        let r = f.poll(&env.http, false).await;
        status = r.status.as_u16();
        if status == 409 {
            // Either the history says the table changed after the offset, or the definition (all columns)
            // changed under the handle.
            let reason = r.json()[0]["headers"]["reason"].clone();
            assert!(
                reason == "table_truncated" || reason == "unknown_handle",
                "{}",
                r.text
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 409);
    let fresh = Follower::start(&env.http, &env.base, &token, "table=works").await;
    assert!(
        fresh.log.rows.values().all(|r| r["rating"] == "3"),
        "{:?}",
        fresh.log.rows
    );
}

#[tokio::test]
async fn a_column_dropped_by_plain_ddl_refetches_once_then_snapshots_without_it() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "x", "venue": "v"})
        )]),
    )
    .await;
    let token = env.token(alice);
    // The definition is compiled and cached with every column of the catalog.
    let f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    assert!(f.log.rows.values().all(|r| r["venue"] == "v"));
    // Plain DDL, no `migrate`, and no change of the table streamed after it: the catalog does not know yet.
    env.superuser()
        .await
        .batch_execute("alter table works drop column venue")
        .await
        .unwrap();
    let first = get(
        &env.http,
        &env.base,
        Some(&token),
        "table=works&offset=-1",
        &[],
    )
    .await;
    assert_eq!(first.status, 409, "{first:?}");
    // The client starts over at once (Electric's client does, without a pause): it gets the snapshot without the
    // column, not the same 409 again (which made the client give up after a few).
    let second = get(
        &env.http,
        &env.base,
        Some(&token),
        "table=works&offset=-1",
        &[],
    )
    .await;
    assert_eq!(second.status, 200, "{second:?}");
    let rows: Vec<Value> = second
        .messages()
        .into_iter()
        .filter(|m| m["headers"]["operation"] == "insert")
        .collect();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["value"]["title"], "x");
    assert!(rows[0]["value"].get("venue").is_none(), "{:?}", rows[0]);
}

#[tokio::test]
async fn users_never_see_each_other() {
    let env = TestEnv::start().await;
    let (alice, bob) = (Uuid::new_v4(), Uuid::new_v4());
    for u in [alice, bob] {
        env.batch(
            u,
            json!([insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": format!("{u}")})
            )]),
        )
        .await;
    }
    let (ta, tb) = (env.token(alice), env.token(bob));
    // An owner condition can only narrow: Alice asking for Bob's rows gets nothing.
    let theirs = Follower::start(
        &env.http,
        &env.base,
        &ta,
        &format!("table=works&where={}", enc(&format!("owner_id = '{bob}'"))),
    )
    .await;
    assert!(theirs.log.rows.is_empty());
    let mine = Follower::start(
        &env.http,
        &env.base,
        &ta,
        &format!(
            "table=works&where={}",
            enc(&format!("owner_id = '{alice}'"))
        ),
    )
    .await;
    assert_eq!(mine.log.rows.len(), 1);
    let mut a = Follower::start(&env.http, &env.base, &ta, "table=works").await;
    let mut b = Follower::start(&env.http, &env.base, &tb, "table=works").await;
    for i in 0..3 {
        env.batch(
            bob,
            json!([insert(
                "works",
                json!({"id": Uuid::new_v4(), "title": format!("b{i}")})
            )]),
        )
        .await;
    }
    env.batch(
        alice,
        json!([insert("works", json!({"id": Uuid::new_v4(), "title": "a"}))]),
    )
    .await;
    let (ta_truth, tb_truth) = (
        truth_text(&env, "works", alice, "true").await,
        truth_text(&env, "works", bob, "true").await,
    );
    catch_up(&env, &mut a, |f| f.log.by_id() == ta_truth).await;
    catch_up(&env, &mut b, |f| f.log.by_id() == tb_truth).await;
    for m in &a.log.changes {
        assert_eq!(m["value"]["owner_id"], alice.to_string());
    }
    // Bob's handle and offset, with Alice's token: refused (409), never served.
    let r = get(
        &env.http,
        &env.base,
        Some(&ta),
        &format!("table=works&offset={}&handle={}", b.offset, enc(&b.handle)),
        &[],
    )
    .await;
    assert_eq!(r.status, 409);
    assert!(!r.text.contains("b0"));
}

#[tokio::test]
async fn handles_survive_a_graceful_restart() {
    let mut env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert(
            "works",
            json!({"id": Uuid::new_v4(), "title": "before"})
        )]),
    )
    .await;
    let token = env.token(alice);
    let mut f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    // A live request open at shutdown is answered (up-to-date at the final position), not dropped.
    let held = {
        let mut f = f.clone();
        let http = env.http.clone();
        tokio::spawn(async move {
            let r = f.poll(&http, true).await;
            (r, f)
        })
    };
    until_held(&env, alice).await;
    env.stop_server().await;
    let (r, held_f) = held.await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    f.offset = held_f.offset;
    // Written while the server is down.
    env.superuser()
        .await
        .execute(
            "insert into works (id, owner_id, title) values ($1, $2, 'while down')",
            &[&Uuid::new_v4(), &alice],
        )
        .await
        .unwrap();
    env.start_server_again().await;
    f.base = env.base.clone();
    let truth = truth_text(&env, "works", alice, "true").await;
    for _ in 0..100 {
        let r = f.poll(&env.http, false).await;
        assert_eq!(
            r.status, 200,
            "the old handle and offset are still good: {r:?}"
        );
        if f.log.by_id() == truth {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("did not converge: {:?}", f.log.by_id());
}

#[tokio::test]
async fn server_sent_events() {
    let env = TestEnv::start().await;
    let alice = Uuid::new_v4();
    let token = env.token(alice);
    let f = Follower::start(&env.http, &env.base, &token, "table=works").await;
    let url = format!(
        "{}/v1/shape?table=works&offset={}&handle={}&live=true&cursor=&live_sse=true&experimental_live_sse=true",
        env.base,
        f.offset,
        enc(&f.handle)
    );
    let mut resp = env
        .http
        .get(url)
        .bearer_auth(&token)
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap(),
        "text/event-stream"
    );
    assert_eq!(
        resp.headers()
            .get("electric-offset")
            .unwrap()
            .to_str()
            .unwrap(),
        f.offset
    );
    assert!(resp.headers().get("electric-cursor").is_some());
    let w = Uuid::new_v4();
    env.batch(
        alice,
        json!([insert("works", json!({"id": w, "title": "sse"}))]),
    )
    .await;
    let mut text = String::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !text.contains("up-to-date") && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(20), resp.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    let events: Vec<Value> = text
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    assert_eq!(events[0]["value"]["id"], w.to_string());
    let lsn = events[1]["headers"]["global_last_seen_lsn"]
        .as_str()
        .unwrap();
    // The up-to-date's position is a valid offset for a later request.
    let next = get(
        &env.http,
        &env.base,
        Some(&token),
        &format!("table=works&offset={lsn}_0&handle={}", enc(&f.handle)),
        &[],
    )
    .await;
    assert_eq!(next.status, 200, "{next:?}");
    assert_eq!(next.messages().len(), 1, "nothing after it: {}", next.text);
}
