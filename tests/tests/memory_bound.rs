//! The memory bound is the memory (issue 11): a transaction far larger than the bounds passes through the real
//! server binary with its resident memory staying within a fixed bound, and delivers every change. Before parts,
//! a 200k-row insert took the server from 15 MB to 690 MB, and a 300k-row UPDATE killed it under 1.5 GiB (on
//! every restart again, since the slot was never acknowledged past it).

use std::time::{Duration, Instant};

use deeprecall_tests::ops::{free_port, server_bin};
use deeprecall_tests::stream::StreamClient;
use deeprecall_tests::{TEST_SECRET, TestEnv};
use serde_json::json;
use uuid::Uuid;

/// Rows in the large transactions (a CI-sized stand-in for the 200k/300k; the bound does not depend on
/// it, which is the point).
const ROWS: i64 = 100_000;

/// Resident-memory bound for the server process while the large transactions pass (MiB). The bounds it rests on:
/// one transaction part (4 MiB decoded), one connection queue (32 MiB), pgwire-replication's event buffer, the
/// allocator's slack; far below the hundreds of MiB the whole transaction costs when held.
const RSS_BOUND_MIB: u64 = 200;

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn large_transactions_pass_the_real_server_within_a_fixed_memory_bound() {
    let mut env = TestEnv::start().await;
    // The in-process server lets go of the slot; the binary takes it.
    env.stop_server().await;
    let port = free_port();
    let mut child = tokio::process::Command::new(server_bin())
        .args([
            "serve",
            "--database-url",
            &env.db_url(),
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--slot",
            &env.state.slot_name,
            "--jwt-secret",
            TEST_SECRET,
        ])
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .expect("starting deeprecall-sync");
    let pid = child.id().expect("pid");
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while reqwest::get(format!("{base}/readyz"))
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(Instant::now() < deadline, "the server did not become ready");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let alice = Uuid::new_v4();
    let mut client = StreamClient::connect(&base, &env.token(alice)).await;
    client.subscribe("works", "works", json!(null)).await;
    client.up_to_date("works").await;
    let before = status_kib(pid, "VmRSS:");

    let db = env.superuser().await;
    let started = Instant::now();
    db.execute(
        "insert into works (id, owner_id, title, year)
         select gen_random_uuid(), $1, 'row ' || g, 2000 from generate_series(1, $2::bigint) g",
        &[&alice, &ROWS],
    )
    .await
    .unwrap();
    db.execute(
        "update works set year = 2001, title = title || ' (edited)' where owner_id = $1",
        &[&alice],
    )
    .await
    .unwrap();
    // Both transactions reach the client completely (each ends with a frame that has no "more").
    let mut completed = 0;
    let mut changes = 0usize;
    while completed < 2 {
        let Some(frame) = client.next(Duration::from_secs(120)).await else {
            panic!(
                "the stream stopped after {changes} changes: {:?}",
                client.closed
            );
        };
        if frame["type"] == "txn" {
            changes += frame["changes"].as_array().map_or(0, Vec::len);
            if frame.get("offset").is_some() {
                completed += 1;
            }
        }
        // Only the counts are needed: keep the client's own memory flat.
        client.frames.clear();
        client.state.clear();
    }
    let elapsed = started.elapsed();
    let peak_mib = status_kib(pid, "VmHWM:") / 1024;
    eprintln!(
        "{ROWS}-row insert + update: {changes} changes delivered in {elapsed:?}; server RSS before {} MiB, peak {peak_mib} MiB",
        before / 1024
    );
    assert_eq!(changes as i64, 2 * ROWS, "every change delivered once");
    assert!(
        peak_mib <= RSS_BOUND_MIB,
        "server peak RSS {peak_mib} MiB exceeds the bound of {RSS_BOUND_MIB} MiB"
    );
    let _ = child.kill().await;
}
