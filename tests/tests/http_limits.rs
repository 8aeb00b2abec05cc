//! The HTTP server's own limits (issue 11): a client cannot keep sockets open for ever by sending a request slowly
//! or by idling between requests, and the number of client connections is capped below the descriptor limit.

use std::time::Duration;

use deeprecall_sync::state::Limits;
use deeprecall_tests::{EnvOptions, TestEnv};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn env_with(limits: Limits) -> TestEnv {
    TestEnv::start_with(EnvOptions {
        limits: Some(limits),
        ..Default::default()
    })
    .await
}

/// Reads until the server closes the connection (EOF or reset); returns what arrived. Panics after `within`.
async fn until_closed(tcp: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(within, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the server kept the connection open: {what}"));
    got
}

#[tokio::test]
async fn a_slow_request_header_and_an_idle_keep_alive_are_closed() {
    let env = env_with(Limits {
        header_timeout: Duration::from_secs(1),
        ..Limits::default()
    })
    .await;

    // Slowloris: a request line and a header, never finished.
    let mut slow = TcpStream::connect(env.addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    until_closed(&mut slow, Duration::from_secs(10), "slow header").await;

    // Nothing at all after connecting.
    let mut silent = TcpStream::connect(env.addr).await.unwrap();
    until_closed(&mut silent, Duration::from_secs(10), "silent").await;

    // A complete request is answered; the keep-alive connection is then closed once idle.
    let mut idle = TcpStream::connect(env.addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut idle, Duration::from_secs(10), "idle keep-alive").await;
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
}

#[tokio::test]
async fn client_connections_are_capped_and_a_freed_slot_is_reused() {
    let env = env_with(Limits {
        max_http_connections: 8,
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(TcpStream::connect(env.addr).await.unwrap());
    }
    // Every slot is taken by a socket that sends nothing: a new request waits (in the kernel's backlog).
    let url = format!("{}/healthz", env.base);
    let request = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !request.is_finished(),
        "a request was served beyond the connection cap"
    );
    // One socket closes: its slot serves the waiting request.
    drop(held.pop());
    let status = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the waiting request was not served after a slot freed")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_open_websocket_keeps_its_connection_slot() {
    let env = env_with(Limits {
        max_http_connections: 2,
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    })
    .await;
    let token = env.token(uuid::Uuid::new_v4());
    let _one = deeprecall_tests::stream::StreamClient::connect(&env.base, &token).await;
    let _two = deeprecall_tests::stream::StreamClient::connect(&env.base, &token).await;
    // Both slots are held by upgraded sockets: a plain request waits.
    let url = format!("{}/healthz", env.base);
    let request = tokio::spawn(async move { reqwest::get(url).await.map(|r| r.status()) });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !request.is_finished(),
        "a request was served while both slots were held by WebSockets"
    );
    drop(_two);
    let status = tokio::time::timeout(Duration::from_secs(10), request)
        .await
        .expect("the waiting request was not served after a WebSocket closed")
        .unwrap()
        .unwrap();
    assert_eq!(status, 200);
}

/// Starts a `POST /v1/batch` as `token` that declares `declared` bytes of body, sends `sent` of them and stalls.
async fn stalled_batch(env: &TestEnv, token: &str, declared: usize, sent: usize) -> TcpStream {
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
         Content-Type: application/json\r\nContent-Length: {declared}\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&vec![b' '; sent]).await.unwrap();
    tcp
}

/// The status line and body of the answer to a request whose body never finishes (the server answers and closes).
async fn early_answer(tcp: &mut TcpStream, within: Duration, what: &str) -> (String, String) {
    let answer = until_closed(tcp, within, what).await;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.lines().next().unwrap_or_default().to_owned();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Whether a stalled request is still waiting for its body (the server has neither answered nor closed).
async fn still_waiting(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(300), tcp.read(&mut buf))
        .await
        .is_err()
}

#[tokio::test]
async fn write_bodies_in_flight_are_bounded_per_user_and_in_all() {
    const KIB: usize = 1024;
    let env = env_with(Limits {
        max_body_bytes: 64 * KIB,
        max_body_bytes_in_flight_per_user: 128 * KIB,
        max_body_bytes_in_flight: 256 * KIB,
        header_timeout: Duration::from_secs(60),
        ..Limits::default()
    })
    .await;
    let [a, b, c] = [(); 3].map(|()| uuid::Uuid::new_v4());
    // Two bodies of A that never finish hold A's whole share: a third is refused at once, before its body.
    let mut held_a = Vec::new();
    for _ in 0..2 {
        held_a.push(stalled_batch(&env, &env.token(a), 64 * KIB, KIB).await);
    }
    let mut third = stalled_batch(&env, &env.token(a), 64 * KIB, KIB).await;
    let (status, body) = early_answer(&mut third, Duration::from_secs(10), "A's third").await;
    assert!(status.starts_with("HTTP/1.1 429"), "{status} {body}");
    assert!(body.contains("\"too_many_requests\""), "{body}");
    // Two of B fill the server's total: anyone else is told to come back later, and nothing is written.
    let mut held_b = Vec::new();
    for _ in 0..2 {
        held_b.push(stalled_batch(&env, &env.token(b), 64 * KIB, KIB).await);
    }
    for held in held_a.iter_mut().chain(held_b.iter_mut()) {
        assert!(
            still_waiting(held).await,
            "a body within the budget was cut off"
        );
    }
    let row = |title: &str| {
        serde_json::json!([deeprecall_tests::insert(
            "works",
            serde_json::json!({ "title": title })
        )])
    };
    let (status, body) = env.batch(c, row("refused")).await;
    assert_eq!(
        (status.as_u16(), deeprecall_tests::error_code(&body)),
        (503, "server_busy"),
        "{body}"
    );
    // A's bodies go away: their room is given back, and C's batch is applied.
    // (The server sees the closed sockets as soon as it polls them; a loaded machine may take a moment.)
    drop(held_a);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (status, body) = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, body) = env.batch(c, row("applied")).await;
        if status.as_u16() != 503 || std::time::Instant::now() > deadline {
            break (status, body);
        }
    };
    assert_eq!(status.as_u16(), 200, "{body}");
    let titles: Vec<String> = env
        .superuser()
        .await
        .query("select title from works where owner_id = $1", &[&c])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(titles, ["applied"]);
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_answered_408_and_gives_its_room_back() {
    let env = env_with(Limits {
        body_timeout: Duration::from_secs(1),
        // One body's room per user: the user's next batch fits only once the stalled one is gone.
        max_body_bytes_in_flight_per_user: 0,
        ..Limits::default()
    })
    .await;
    let user = uuid::Uuid::new_v4();
    let mut stalled = stalled_batch(&env, &env.token(user), 8 * 1024 * 1024, 10).await;
    let (status, body) = early_answer(&mut stalled, Duration::from_secs(10), "stalled body").await;
    assert!(status.starts_with("HTTP/1.1 408"), "{status} {body}");
    assert!(body.contains("\"body_timeout\""), "{body}");
    let (status, body) = env
        .batch(
            user,
            serde_json::json!([deeprecall_tests::insert(
                "works",
                serde_json::json!({ "title": "t" })
            )]),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
}

#[tokio::test]
async fn a_request_header_over_128_kib_is_refused() {
    let env = env_with(Limits::default()).await;
    let send = |filler: usize| {
        let addr = env.addr;
        async move {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "GET /healthz HTTP/1.1\r\nHost: x\r\nX-Filler: {}\r\nConnection: close\r\n\r\n",
                "y".repeat(filler)
            );
            // The server may answer and close before it has read everything.
            let _ = tcp.write_all(head.as_bytes()).await;
            let answer = until_closed(&mut tcp, Duration::from_secs(10), "large header").await;
            String::from_utf8_lossy(&answer)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        }
    };
    // 100 KiB of header is served; 200 KiB (hyper's default buffer took up to ~400 KiB) is not.
    assert!(send(100 * 1024).await.starts_with("HTTP/1.1 200"));
    assert!(send(200 * 1024).await.starts_with("HTTP/1.1 431"));
}

/// The kernel's pending timer on the TCP socket `local` → `remote` (ports on 127.0.0.1), from /proc/net/tcp: its
/// kind (`tr`: 0 none, 1 retransmit, 2 keepalive, …) and when it fires, in seconds (`tm->when`, in USER_HZ ticks).
fn socket_timer(local: u16, remote: u16) -> Option<(u8, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?
        + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
    let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 6 || port(f[1])? != local || port(f[2])? != remote {
            return None;
        }
        let (kind, when) = f[5].split_once(':')?;
        Some((
            u8::from_str_radix(kind, 16).ok()?,
            u64::from_str_radix(when, 16).ok()? as f64 / 100.0,
        ))
    })
}

#[tokio::test]
async fn client_connections_are_kept_alive_by_tcp_probes() {
    let env = env_with(Limits::default()).await;
    let mut tcp = TcpStream::connect(env.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    // The connection is now idle (keep-alive). The server's end has the keepalive timer armed, about 60 s out; the
    // test's own end (tokio's default, no keepalive) has none, so the check can tell the two apart.
    let (server, client) = (env.addr.port(), tcp.local_addr().unwrap().port());
    let (kind, when) = socket_timer(server, client).expect("the server's socket in /proc/net/tcp");
    assert_eq!(kind, 2, "no keepalive timer on the server's socket");
    assert!((30.0..=61.0).contains(&when), "keepalive fires in {when} s");
    let (kind, _) = socket_timer(client, server).expect("the client's socket in /proc/net/tcp");
    assert_ne!(kind, 2, "the client's socket was not expected to probe");
}

/// A fresh user's 1-op batch is answered 200 within 700 ms (under a few ms on an idle test server).
/// A work of `user`'s, and a superuser session holding its row lock (`for update`) until it commits.
/// A new work of `user`'s titled `title`, written through `/v1/batch`.
async fn written_work(env: &TestEnv, user: uuid::Uuid, title: &str) -> uuid::Uuid {
    let work = uuid::Uuid::new_v4();
    let (status, body) = env
        .batch(
            user,
            serde_json::json!([deeprecall_tests::insert(
                "works",
                serde_json::json!({ "id": work, "title": title })
            )]),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
    work
}

/// A server whose users' transactions wait at most 400 ms for a lock.
async fn env_with_short_lock_timeout() -> TestEnv {
    env_with(Limits {
        lock_timeout: Some(Duration::from_millis(400)),
        ..Limits::default()
    })
    .await
}

async fn locked_work(env: &TestEnv, user: uuid::Uuid) -> (uuid::Uuid, tokio_postgres::Client) {
    let work = written_work(env, user, "locked").await;
    let locker = env.superuser().await;
    locker
        .batch_execute(&format!(
            "begin; select 1 from works where id = '{work}' for update"
        ))
        .await
        .unwrap();
    (work, locker)
}

/// Backends of the test database waiting for a lock now.
async fn lock_waiters(env: &TestEnv) -> i64 {
    env.superuser()
        .await
        .query_one(
            "select count(*) from pg_stat_activity \
             where datname = current_database() and wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn another_user_writes_at_once(env: &TestEnv, meanwhile: &str) {
    let started = std::time::Instant::now();
    let batch = env.batch(
        uuid::Uuid::new_v4(),
        serde_json::json!([deeprecall_tests::insert(
            "works",
            serde_json::json!({ "title": "t" })
        )]),
    );
    let (status, body) = tokio::time::timeout(Duration::from_secs(5), batch)
        .await
        .unwrap_or_else(|_| panic!("another user's batch was not answered in 5 s {meanwhile}"));
    let took = started.elapsed();
    assert_eq!(status.as_u16(), 200, "{body}");
    assert!(
        took < Duration::from_millis(700),
        "another user's batch took {took:?} {meanwhile}"
    );
}

#[tokio::test]
async fn requests_naming_unknown_tables_hold_no_database_connection_while_they_wait() {
    // An unknown table makes the server reload its catalog, at most once a second; requests that miss in between
    // wait for that reload. They used to wait holding a pooled connection (the test pool has 8).
    let env = env_with(Limits::default()).await;
    let attacker = uuid::Uuid::new_v4();
    let misses: Vec<_> = (0..32)
        .map(|i| {
            let (base, token) = (env.base.clone(), env.token(attacker));
            tokio::spawn(async move {
                let body = serde_json::json!({"ops": [deeprecall_tests::insert(
                    &format!("no_such_table_{i}"),
                    serde_json::json!({ "title": "x" })
                )]});
                reqwest::Client::new()
                    .post(format!("{base}/v1/batch"))
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Another user's batch meanwhile does not queue behind them for a connection.
    another_user_writes_at_once(&env, "while other requests waited for a catalog reload").await;
    for miss in misses {
        assert_eq!(miss.await.unwrap().unwrap(), 422, "unknown_table");
    }
}

#[tokio::test]
async fn one_user_holds_at_most_its_share_of_the_pool() {
    // One user's batches wait for a row lock the test holds, so each keeps its pooled connection. Without a share,
    // eight of them took the whole test pool (8) and another user's batch waited for the pool's timeout, then 503.
    let env = env_with(Limits {
        pool_wait_timeout: Duration::from_secs(1),
        max_db_connections_per_user: 3,
        ..Limits::default()
    })
    .await;
    let attacker = uuid::Uuid::new_v4();
    let (work, locker) = locked_work(&env, attacker).await;

    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel();
    let started = std::time::Instant::now();
    for _ in 0..8 {
        let (base, token, done_tx) = (env.base.clone(), env.token(attacker), done_tx.clone());
        tokio::spawn(async move {
            let body = serde_json::json!({"ops": [deeprecall_tests::op(
                "update",
                "works",
                serde_json::json!({ "id": work, "title": "again" })
            )]});
            let resp = reqwest::Client::new()
                .post(format!("{base}/v1/batch"))
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").cloned();
            let status = resp.status().as_u16();
            let body: serde_json::Value = resp.json().await.unwrap_or_default();
            let _ = done_tx.send((status, retry_after, body, started.elapsed()));
        });
    }
    drop(done_tx);

    // Exactly the share waits on the lock, each on a connection of its own.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lock_waiters(&env).await < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "three batches never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lock_waiters(&env).await,
        3,
        "one user held more than its share of the pool"
    );
    assert_eq!(env.state.user_pool.held_by(attacker), 3);

    // Another user still gets a connection at once.
    another_user_writes_at_once(&env, "while one user's batches waited on a lock").await;

    // The five beyond the share waited in their own line for the pool's wait timeout, then were told to retry.
    for _ in 0..5 {
        let (status, retry_after, body, at) =
            tokio::time::timeout(Duration::from_secs(5), done.recv())
                .await
                .expect("a request beyond the share was never answered")
                .unwrap();
        assert_eq!(status, 429, "{body}");
        assert_eq!(deeprecall_tests::error_code(&body), "too_many_requests");
        assert_eq!(
            retry_after.as_ref().and_then(|v| v.to_str().ok()),
            Some("1")
        );
        assert!(
            at >= Duration::from_millis(900),
            "answered after {at:?}, before the wait timeout"
        );
    }
    // The three holding connections finish once the lock is gone.
    locker.batch_execute("commit").await.unwrap();
    for _ in 0..3 {
        let (status, _, body, _) = tokio::time::timeout(Duration::from_secs(5), done.recv())
            .await
            .expect("a batch holding a connection was never answered")
            .unwrap();
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(env.state.user_pool.held_by(attacker), 0);
}

#[tokio::test]
async fn abandoned_batches_keep_their_share_until_postgres_is_done_with_them() {
    // A client that gives up on its batch (closes the connection) ends the request, but not the transaction it
    // queued: Postgres still runs it, here waiting for a row lock the test holds. Its connection used to go back to
    // the pool at once, with that transaction still in it, and the user's place with it: a user could abandon batch
    // after batch, fill every pooled connection with waiting transactions, and every other user's batch queued behind
    // one of them.
    let env = env_with(Limits {
        pool_wait_timeout: Duration::from_millis(300),
        max_db_connections_per_user: 3,
        ..Limits::default()
    })
    .await;
    let attacker = uuid::Uuid::new_v4();
    let (work, locker) = locked_work(&env, attacker).await;

    // Twelve batches, each abandoned by its client after 150 ms, in waves of three (the share).
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let wave = (0..3).map(|_| {
            let (base, token) = (env.base.clone(), env.token(attacker));
            async move {
                let body = serde_json::json!({"ops": [deeprecall_tests::op(
                    "update",
                    "works",
                    serde_json::json!({ "id": work, "title": "again" })
                )]});
                reqwest::Client::new()
                    .post(format!("{base}/v1/batch"))
                    .bearer_auth(token)
                    .timeout(Duration::from_millis(150))
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            }
        });
        statuses.extend(futures::future::join_all(wave).await);
    }
    // The first wave waited on the lock until its clients gave up; the later ones found the share still taken by
    // the abandoned transactions and waited for a place instead, each until its client gave up.
    assert!(statuses.iter().all(Result::is_err), "{statuses:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        lock_waiters(&env).await,
        3,
        "abandoned batches left more than the user's share of transactions in Postgres"
    );
    another_user_writes_at_once(&env, "after one user abandoned batches waiting on a lock").await;
    assert_eq!(env.state.user_pool.held_by(attacker), 3);

    // Once the lock is gone, Postgres finishes the abandoned transactions, and the user's places come back.
    locker.batch_execute("commit").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while env.state.user_pool.held_by(attacker) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the abandoned batches never gave their places back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = env
        .batch(
            attacker,
            serde_json::json!([deeprecall_tests::op(
                "update",
                "works",
                serde_json::json!({ "id": work, "title": "last" })
            )]),
        )
        .await;
    assert_eq!(status.as_u16(), 200, "{body}");
}

#[tokio::test]
async fn a_batch_waits_for_a_lock_at_most_the_lock_timeout_and_then_did_nothing() {
    // Someone else (here the test; in production an operator's CREATE INDEX or a forgotten open transaction) holds
    // a row lock. The batch that needs it is answered 503 `locked` after the lock timeout, once, not after a second
    // wait op by op; its sequence did not advance, so the same batch sent again is applied, not `duplicate`.
    let env = env_with_short_lock_timeout().await;
    let user = uuid::Uuid::new_v4();
    let other = written_work(&env, user, "free").await;
    let (work, locker) = locked_work(&env, user).await;

    let client_id = uuid::Uuid::new_v4();
    let batch = serde_json::json!({
        "client_id": client_id,
        "ops": [
            { "op_id": uuid::Uuid::new_v4(), "seq": 1, "table": "works", "kind": "update",
              "row": { "id": other, "title": "first" } },
            { "op_id": uuid::Uuid::new_v4(), "seq": 2, "table": "works", "kind": "update",
              "row": { "id": work, "title": "second" } },
        ],
    });
    let send = || {
        env.http
            .post(format!("{}/v1/batch", env.base))
            .bearer_auth(env.token(user))
            .json(&batch)
            .send()
    };
    let started = std::time::Instant::now();
    let resp = send().await.unwrap();
    let took = started.elapsed();
    let (status, retry_after) = (
        resp.status().as_u16(),
        resp.headers().get("retry-after").cloned(),
    );
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert_eq!(
        retry_after.as_ref().and_then(|v| v.to_str().ok()),
        Some("1")
    );
    assert_eq!(deeprecall_tests::error_code(&body), "locked", "{body}");
    assert!(
        took >= Duration::from_millis(400) && took < Duration::from_millis(750),
        "answered after {took:?}: the lock timeout is 400 ms, waited once"
    );
    assert_eq!(env.state.user_pool.held_by(user), 0);

    // Nothing was done: neither row changed, the sequence did not move.
    let db = env.superuser().await;
    let titles: Vec<String> = db
        .query(
            "select title from works where id = any($1) order by title",
            &[&vec![work, other]],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(titles, ["free", "locked"]);
    let clients: i64 = db
        .query_one(
            "select count(*) from sync_clients where client_id = $1",
            &[&client_id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(clients, 0);

    // Once the lock is gone, the same batch is applied.
    locker.batch_execute("commit").await.unwrap();
    let resp = send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        deeprecall_tests::statuses(&body),
        ["applied", "applied"],
        "{body}"
    );
}

/// An operator's `CREATE INDEX` (here `lock table … in share mode`, the lock it takes) holds a table lock. A batch
/// whose statements its pooled connection has not prepared yet prepares them before its transaction begins, and
/// preparing an `UPDATE` takes the table's lock: the transaction-local `lock_timeout` the server used to set in the
/// transaction's first statement came too late, and such a batch waited for the whole index build (an audit measured
/// 9 s behind a 9-s lock, with a 5-s timeout). The pool's sessions now carry the timeout from their start.
#[tokio::test]
async fn a_statement_new_to_its_connection_waits_for_a_table_lock_at_most_the_lock_timeout() {
    let env = env_with_short_lock_timeout().await;
    let user = uuid::Uuid::new_v4();
    let work = written_work(&env, user, "before").await;
    let locker = env.superuser().await;
    locker
        .batch_execute("begin; lock table works in share mode")
        .await
        .unwrap();
    // Without the fix this request waits for the lock; let it go after 5 s so the test fails rather than hangs.
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        locker.batch_execute("commit").await.unwrap();
    });
    // `venue`: a column no statement on any pooled connection has updated yet.
    let update = serde_json::json!([{ "op_id": uuid::Uuid::new_v4(), "table": "works", "kind": "update",
        "row": { "id": work, "venue": "NeurIPS" } }]);
    let started = std::time::Instant::now();
    let (status, body) = env.batch(user, update.clone()).await;
    let took = started.elapsed();
    assert_eq!(
        (status.as_u16(), deeprecall_tests::error_code(&body)),
        (503, "locked"),
        "after {took:?}: {body}"
    );
    assert!(
        took < Duration::from_millis(2000),
        "answered after {took:?}: the lock timeout is 400 ms"
    );
    assert_eq!(env.state.user_pool.held_by(user), 0);
    release.await.unwrap();
    let (status, body) = env.batch(user, update).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(deeprecall_tests::statuses(&body), ["applied"], "{body}");
}

/// Posts `body` to `path` as `user` and, once it waits for a lock, ends its Postgres session (57P01, "terminating
/// connection due to administrator command": what a fast restart or a failover does to every session); returns the
/// answer's status, `Retry-After` and body.
async fn end_its_session_while_it_waits(
    env: &TestEnv,
    user: uuid::Uuid,
    path: &str,
    body: serde_json::Value,
) -> (u16, Option<reqwest::header::HeaderValue>, serde_json::Value) {
    let pending = tokio::spawn({
        let (url, token) = (format!("{}{path}", env.base), env.token(user));
        async move {
            let resp = reqwest::Client::new()
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            let retry_after = resp.headers().get("retry-after").cloned();
            let status = resp.status().as_u16();
            (status, retry_after, resp.json().await.unwrap_or_default())
        }
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while lock_waiters(env).await < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the request never reached the lock"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ended: i64 = env
        .superuser()
        .await
        .query_one(
            "select count(*) from (select pg_terminate_backend(pid) from pg_stat_activity \
              where datname = current_database() and wait_event_type = 'Lock') t",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(ended, 1);
    tokio::time::timeout(Duration::from_secs(5), pending)
        .await
        .expect("the request was not answered")
        .unwrap()
}

#[tokio::test]
async fn a_request_whose_session_postgres_ends_is_told_to_retry_and_did_nothing() {
    // A Postgres restart or failover ends every session, statements in flight included. That is neither a bug of the
    // server nor the client's fault: 503 database_unavailable with Retry-After, not 500 (which a blob request got:
    // the error came as Postgres's FATAL message, not as a closed connection); the same request then succeeds.
    let env = env_with(Limits::default()).await;
    let user = uuid::Uuid::new_v4();
    let unavailable = |(status, retry_after, body): (
        u16,
        Option<reqwest::header::HeaderValue>,
        serde_json::Value,
    )| {
        assert_eq!(status, 503, "{body}");
        assert_eq!(deeprecall_tests::error_code(&body), "database_unavailable");
        assert!(retry_after.is_some());
    };

    // A batch.
    let (work, locker) = locked_work(&env, user).await;
    let ops = serde_json::json!([deeprecall_tests::op(
        "update",
        "works",
        serde_json::json!({ "id": work, "title": "after" })
    )]);
    let body = serde_json::json!({ "ops": ops.clone() });
    unavailable(end_its_session_while_it_waits(&env, user, "/v1/batch", body).await);
    locker.batch_execute("commit").await.unwrap();
    let db = env.superuser().await;
    let title = |id| {
        let db = &db;
        async move {
            db.query_one("select title from works where id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, String>(0)
        }
    };
    assert_eq!(
        title(work).await,
        "locked",
        "the ended batch wrote something"
    );
    let (status, body) = env.batch(user, ops).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(title(work).await, "after");

    // A blob report.
    let device = uuid::Uuid::new_v4();
    let blob = deeprecall_tests::sha(9);
    let report = |mime: Option<&str>| serde_json::json!({"device_id": device, "blobs": [{"sha256": blob, "size": 10, "mime": mime}]});
    let (status, body) = env.coordinate(user, report(None)).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    db.batch_execute(&format!(
        "begin; select 1 from blobs_meta where sha256 = '{blob}' for update"
    ))
    .await
    .unwrap();
    unavailable(
        end_its_session_while_it_waits(
            &env,
            user,
            "/v1/blobs/coordinate",
            report(Some("application/pdf")),
        )
        .await,
    );
    db.batch_execute("commit").await.unwrap();
    let (status, body) = env.coordinate(user, report(Some("application/pdf"))).await;
    assert_eq!(status.as_u16(), 200, "{body}");
    assert_eq!(body["meta_updated"], 1, "{body}");
}

#[tokio::test]
async fn one_user_holds_at_most_its_share_of_waiting_shape_requests() {
    // Live long-polls and SSE streams hold a TCP connection each. Without a per-user share, one user's could fill
    // the server's connection cap (--max-connections, --max-http-connections) and keep every other user out.
    let env = env_with(Limits {
        max_shape_requests_per_user: 3,
        ..Limits::default()
    })
    .await;
    let (alice, bob) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let token = env.token(alice);
    let shape = |query: String, token: String| {
        let (http, base) = (env.http.clone(), env.base.clone());
        async move {
            http.get(format!("{base}/v1/shape?table=works&{query}"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
        }
    };
    let first = shape("offset=-1".into(), token.clone()).await;
    assert_eq!(first.status(), 200);
    let at = |r: &reqwest::Response, h: &str| r.headers()[h].to_str().unwrap().to_owned();
    let (handle, offset) = (at(&first, "electric-handle"), at(&first, "electric-offset"));
    first.text().await.unwrap();
    let live = format!("offset={offset}&handle={handle}&live=true");
    let taken = || env.state.shape_requests_per_user.taken(alice);
    let until_taken = |n: usize| async move {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while taken() != n {
            assert!(
                std::time::Instant::now() < deadline,
                "{} places taken, not {n}",
                taken()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    until_taken(0).await;

    // Three long-polls wait for a change; the fourth is told to come back.
    let polls: Vec<_> = (0..3)
        .map(|_| tokio::spawn(shape(live.clone(), token.clone())))
        .collect();
    until_taken(3).await;
    let refused = shape(live.clone(), token.clone()).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(refused.headers()["retry-after"], "1");
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(
        deeprecall_tests::error_code(&body),
        "too_many_requests",
        "{body}"
    );
    // A snapshot waits too, so it needs a place as well; so does a catch-up, whose answer holds its place until the
    // socket has taken it (unread catch-ups of one user held gigabytes when they were not counted).
    assert_eq!(shape("offset=-1".into(), token.clone()).await.status(), 429);
    let catch_up = shape(format!("offset={offset}&handle={handle}"), token.clone()).await;
    assert_eq!(catch_up.status(), 429);
    // Another user is not affected.
    assert_eq!(
        shape("offset=-1".into(), env.token(bob)).await.status(),
        200
    );

    // A change answers the long-polls, and their places come back.
    let (status, body) = env
        .batch(
            alice,
            serde_json::json!([deeprecall_tests::insert(
                "works",
                serde_json::json!({ "title": "wakes them" })
            )]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    for poll in polls {
        assert_eq!(poll.await.unwrap().status(), 200);
    }
    until_taken(0).await;

    // An SSE stream keeps its place for as long as it is open.
    let sse = format!("{live}&live_sse=true");
    let mut streams = Vec::new();
    for _ in 0..3 {
        let stream = shape(sse.clone(), token.clone()).await;
        assert_eq!(stream.status(), 200);
        streams.push(stream);
    }
    until_taken(3).await;
    assert_eq!(shape(sse.clone(), token.clone()).await.status(), 429);
    drop(streams);
    until_taken(0).await;
    // A catch-up answered and read gives its place back.
    let catch_up = shape(format!("offset={offset}&handle={handle}"), token).await;
    assert_eq!(catch_up.status(), 200);
    catch_up.text().await.unwrap();
    until_taken(0).await;
}
