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
