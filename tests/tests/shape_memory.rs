//! What one user's `GET /v1/shape` requests can make the server hold: a catch-up's body is served in shares of
//! about 4 MiB, and a connection whose client stops reading is closed, not kept with its response.

use std::time::Duration;

use deeprecall_sync::state::Limits;
use deeprecall_tests::shape::{Follower, enc};
use deeprecall_tests::{EnvOptions, TestEnv, insert};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);

/// Twelve transactions of one work with a 600,000-character abstract (about 7.2 MB of changes), written after
/// `follower`'s snapshot; returns once another follower has seen them all live, so they are in the history.
async fn twelve_large_transactions(env: &TestEnv, user: Uuid) {
    let http = reqwest::Client::new();
    let mut watcher = Follower::start(&http, &env.base, &env.token(user), "table=works").await;
    let abstract_text = "a".repeat(600_000);
    for i in 0..12 {
        let (status, body) = env
            .batch(
                user,
                json!([insert(
                    "works",
                    json!({"id": Uuid::new_v4(), "title": format!("w{i}"), "abstract": abstract_text})
                )]),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = tokio::time::Instant::now() + T;
    while watcher.log.rows.len() < 12 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the writes never arrived"
        );
        let r = watcher.poll(&http, true).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
}

/// A catch-up rendered the user's whole history after its offset into one body (up to 256 MiB), for every request:
/// 60 of them left unread held 3.1 GB of the server. Now a body ends after the transaction that takes it past
/// 4 MiB, without up-to-date, at that transaction's end; the client asks again from there and gets the rest, each
/// change once.
#[tokio::test]
async fn a_catch_up_is_served_in_shares_of_about_4_mib() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let http = reqwest::Client::new();
    let mut follower = Follower::start(&http, &env.base, &env.token(user), "table=works").await;
    twelve_large_transactions(&env, user).await;

    let (mut cut, mut requests) = (0, 0);
    loop {
        let before = follower.offset.clone();
        let r = follower.poll(&http, false).await;
        assert_eq!(r.status, 200, "{:?}", r.headers);
        requests += 1;
        // 4 MiB, plus the one transaction that passed it.
        assert!(
            r.text.len() < (4 << 20) + 700_000,
            "a body of {} bytes",
            r.text.len()
        );
        if r.header("electric-up-to-date").is_some() {
            assert!(follower.log.up_to_date);
            break;
        }
        // Not up to date: the body does not end with up-to-date, and the offset moved on.
        assert!(
            !follower.log.up_to_date,
            "{}",
            &r.text[r.text.len() - 200..]
        );
        assert_ne!(follower.offset, before);
        cut += 1;
        assert!(requests < 10, "never up to date");
    }
    assert!(cut >= 1, "no response was cut ({requests} requests)");
    // Every work once (the log panics on an insert of a key it holds).
    assert_eq!(follower.log.rows.len(), 12);
}

/// A client that asks and then reads nothing kept its responses in the server for as long as its socket stayed
/// open. A write that makes no progress for the stall timeout (45 s; 2 s here) now closes the connection.
#[tokio::test]
async fn a_connection_whose_client_stops_reading_is_closed() {
    let env = TestEnv::start_with(EnvOptions {
        limits: Some(Limits {
            write_stall_timeout: Duration::from_secs(2),
            ..Limits::default()
        }),
        ..Default::default()
    })
    .await;
    let user = Uuid::new_v4();
    let http = reqwest::Client::new();
    let follower = Follower::start(&http, &env.base, &env.token(user), "table=works").await;
    twelve_large_transactions(&env, user).await;

    // Five pipelined catch-ups of about 4.5 MB each: more than the sockets' buffers hold, so the server's writes
    // stall while the client reads nothing.
    let addr = env.base.trim_start_matches("http://").to_owned();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "GET /v1/shape?table=works&offset={}&handle={} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\r\n",
        follower.offset,
        enc(&follower.handle),
        env.token(user)
    );
    tcp.write_all(request.repeat(5).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_secs(6)).await;

    // Now read: what the kernel still held arrives, then the end of the connection, well before five bodies.
    let mut got = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(T, async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => got += n,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the connection stayed open ({got} bytes read)"
    );
    assert!(
        got < 4 * 4_500_000,
        "{got} bytes arrived: the server did not stop writing"
    );
}

/// An SSE stream from an offset with more than 4 MiB of history sends it in shares, each ending with an up-to-date
/// at its end, all in the one stream (ending the stream after a share made Electric's client count short
/// connections and give up on SSE); every change arrives once.
#[tokio::test]
async fn an_sse_stream_sends_a_large_history_in_shares_on_one_connection() {
    let env = TestEnv::start().await;
    let user = Uuid::new_v4();
    let http = reqwest::Client::new();
    let follower = Follower::start(&http, &env.base, &env.token(user), "table=works").await;
    twelve_large_transactions(&env, user).await;
    let mut resp = http
        .get(format!(
            "{}/v1/shape?table=works&offset={}&handle={}&live=true&cursor=&live_sse=true&experimental_live_sse=true",
            env.base,
            follower.offset,
            enc(&follower.handle)
        ))
        .bearer_auth(env.token(user))
        .header("Accept", "text/event-stream")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (mut text, mut rows, mut up_to_dates) =
        (String::new(), std::collections::HashSet::new(), 0);
    let deadline = tokio::time::Instant::now() + T;
    while rows.len() < 12 {
        let chunk = tokio::time::timeout_at(deadline, resp.chunk())
            .await
            .expect("the history never arrived")
            .unwrap()
            .expect("the stream ended before the history was sent");
        text.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            let Some(data) = event.strip_prefix("data: ") else {
                continue;
            };
            let v: serde_json::Value = serde_json::from_str(data.trim_end()).unwrap();
            if v["headers"]["control"] == "up-to-date" {
                up_to_dates += 1;
            } else {
                let id = v["value"]["id"].as_str().unwrap().to_owned();
                assert!(rows.insert(id), "a change twice");
            }
        }
    }
    // At least two shares, each closed by its up-to-date (the last one's may still be on its way).
    assert!(up_to_dates >= 1, "{up_to_dates} up-to-dates");
    let more = tokio::time::timeout(Duration::from_secs(5), resp.chunk()).await;
    // The stream goes on after the history: its last up-to-date, then keep-alives; not its end.
    if let Ok(next) = more {
        assert!(
            next.unwrap().is_some(),
            "the stream ended after the history"
        );
    }
}
