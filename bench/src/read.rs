//! Read throughput: both deeprecall-sync and `pg_recvlogical` drain the same WAL backlog.
//!
//! N subscribers (one per user) are up to date; a second slot is created; the server stops gracefully (clients
//! get their final offsets); R rows are loaded in SQL (100 rows per transaction, users round-robin); the server
//! starts again, every client reconnects and resumes from its offset, and the clock runs from the server's spawn
//! until every client holds all its rows. Then `pg_recvlogical` drains the second slot up to the same LSN.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use uuid::Uuid;

use crate::env::{self, Env, PUBLICATION};
use crate::load::load_rows;
use crate::ws::{self, Buffers, FrameKind};

/// Read-throughput figures.
#[derive(Debug, Clone)]
pub(crate) struct ThroughputResult {
    /// Subscribers (= users).
    pub(crate) users: usize,
    /// Rows in the backlog.
    pub(crate) rows: usize,
    /// Seconds from server spawn until every client had all its rows.
    pub(crate) api_secs: f64,
    /// Seconds pg_recvlogical took to reach the same LSN.
    pub(crate) pg_secs: f64,
    /// Subscriptions that got `must_refetch` instead of resuming.
    pub(crate) refetches: usize,
    /// Clients that received a final `up_to_date` at shutdown.
    pub(crate) final_offsets: usize,
}

/// Runs the throughput measurement. Leaves the server running (restarted).
pub(crate) async fn throughput(
    env: &mut Env,
    users: usize,
    rows: usize,
) -> anyhow::Result<ThroughputResult> {
    const ROWS_PER_TXN: usize = 100;
    let ids: Vec<Uuid> = (0..users).map(|_| Uuid::new_v4()).collect();
    let tokens: Vec<String> = ids.iter().map(|u| env.token(*u)).collect();
    let port = env.port;

    // 1. Every user's subscriber up to date.
    let conns = tokio::time::timeout(Duration::from_secs(120), async {
        use futures::StreamExt;
        futures::stream::iter(tokens.clone())
            .map(|t| async move {
                ws::connect_subscribed(port, &t, "annotations", Buffers::Large).await
            })
            .buffered(200)
            .collect::<Vec<_>>()
            .await
    })
    .await
    .context("connecting the read-throughput subscribers took longer than 120 s")?;
    let conns = conns.into_iter().collect::<anyhow::Result<Vec<_>>>()?;

    // 2. The second slot, at the same point of the WAL.
    let sql = env.sql().await?;
    sql.execute(
        "select pg_create_logical_replication_slot('bench_recv', 'pgoutput')",
        &[],
    )
    .await?;

    // 3. Graceful stop; clients keep the last offset they were told.
    let deadline = Instant::now() + Duration::from_secs(40);
    let readers: Vec<_> = conns
        .into_iter()
        .map(|(mut w, mut offset)| {
            tokio::spawn(async move {
                let mut final_offset = false;
                while let Ok(Some(text)) = ws::next_text(&mut w, deadline).await {
                    if let Ok(f) = ws::classify(&text)
                        && let Some(o) = f.offset
                    {
                        final_offset |= f.kind == FrameKind::UpToDate;
                        offset = o;
                    }
                }
                (offset, final_offset)
            })
        })
        .collect();
    env.stop_server().await?;
    let mut offsets = Vec::with_capacity(users);
    let mut final_offsets = 0;
    for r in readers {
        let (o, f) = r.await?;
        offsets.push(o);
        final_offsets += usize::from(f);
    }

    // 4. The backlog, written while the server is down.
    let txns = rows / ROWS_PER_TXN;
    load_rows(env, &ids, txns, ROWS_PER_TXN, 4, Duration::from_secs(180)).await?;
    let end_lsn = env::current_lsn(&sql).await?;
    let mut expected = vec![0usize; users];
    for t in 0..txns {
        expected[t % users] += ROWS_PER_TXN;
    }
    let total = txns * ROWS_PER_TXN;

    // 5. Restart; resume everyone; clock from spawn to the last row.
    let spawned = env.spawn_server().await?;
    let gate = Arc::new(tokio::sync::Semaphore::new(200));
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut tasks = Vec::with_capacity(users);
    for ((token, offset), want) in tokens.into_iter().zip(offsets).zip(expected) {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut w = ws::connect(port, &token, Buffers::Large).await?;
            ws::subscribe(&mut w, "s", "annotations", Some(&offset)).await?;
            drop(permit);
            let mut got = 0usize;
            let mut refetched = false;
            while got < want {
                let Some(text) = ws::next_text(&mut w, deadline).await? else {
                    bail!("connection closed after {got} of {want} rows");
                };
                let f = ws::classify(&text)?;
                match f.kind {
                    FrameKind::MustRefetch => {
                        refetched = true;
                        got = 0;
                    }
                    FrameKind::Txn | FrameKind::Snapshot => got += f.rows,
                    _ => {}
                }
            }
            anyhow::Ok((Instant::now(), refetched, w))
        }));
    }
    let mut last = spawned;
    let mut refetches = 0;
    let mut keep = Vec::with_capacity(users);
    for t in tasks {
        let (done, refetched, w) = t.await??;
        last = last.max(done);
        refetches += usize::from(refetched);
        keep.push(w);
    }
    let api_secs = (last - spawned).as_secs_f64();
    drop(keep);

    // 6. pg_recvlogical drains the second slot up to the same LSN.
    let began = Instant::now();
    let status = tokio::time::timeout(
        Duration::from_secs(300),
        env.pg_tool("pg_recvlogical")
            .arg("-d")
            .arg(env.conninfo())
            .args([
                "--slot",
                "bench_recv",
                "--start",
                "-o",
                "proto_version=1",
                "-o",
            ])
            .arg(format!("publication_names={PUBLICATION}"))
            .arg("--endpos")
            .arg(&end_lsn)
            .args(["-f", "/dev/null"])
            .status(),
    )
    .await
    .context("pg_recvlogical took longer than 300 s")??;
    let pg_secs = began.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    sql.execute("select pg_drop_replication_slot('bench_recv')", &[])
        .await?;
    Ok(ThroughputResult {
        users,
        rows: total,
        api_secs,
        pg_secs,
        refetches,
        final_offsets,
    })
}
