//! Read throughput: both deeprecall-sync and `pg_recvlogical` drain the same WAL backlog.
//!
//! One round: N subscribers (one per user) are up to date; a second slot is created; the server stops gracefully
//! (clients get their final offsets); R rows are loaded in SQL (100 rows per transaction, users round-robin), then
//! a checkpoint; the server starts again, every client reconnects and resumes from its offset, and the clock runs
//! from the server's spawn until every client holds all its rows; `pg_recvlogical` drains the second slot up to
//! the same LSN, before the server's drain or after it (the caller alternates, round by round).

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
    /// Rows in the backlog.
    pub(crate) rows: usize,
    /// Seconds from server spawn until every client had all its rows.
    pub(crate) api_secs: f64,
    /// Seconds pg_recvlogical took to reach the same LSN.
    pub(crate) pg_secs: f64,
    /// Whether pg_recvlogical drained first.
    pub(crate) pg_first: bool,
    /// The `reason` of every `must_refetch` a resuming subscription got instead of its rows.
    pub(crate) refetches: Vec<String>,
    /// Clients that received a final `up_to_date` at shutdown.
    pub(crate) final_offsets: usize,
}

impl ThroughputResult {
    /// Server rows/s ÷ pg_recvlogical rows/s: both drained the same rows.
    pub(crate) fn ratio(&self) -> f64 {
        self.pg_secs / self.api_secs
    }
}

/// Runs one round of the throughput measurement, `pg_recvlogical` first if `pg_first`. Leaves the server running
/// (restarted).
pub(crate) async fn throughput(
    env: &mut Env,
    users: usize,
    rows: usize,
    pg_first: bool,
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
    // Written out now, so that neither side's drain shares the machine with the checkpoint of what was loaded.
    sql.execute("checkpoint", &[]).await?;
    let mut expected = vec![0usize; users];
    for t in 0..txns {
        expected[t % users] += ROWS_PER_TXN;
    }
    let total = txns * ROWS_PER_TXN;

    // 5. pg_recvlogical drains the second slot up to the same LSN (here, or after the server: step 7).
    let pg_secs = if pg_first {
        Some(recvlogical(env, &end_lsn).await?)
    } else {
        None
    };

    // 6. Restart; resume everyone; clock from spawn to the last row.
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
            let mut refetched = None;
            while got < want {
                let Some(text) = ws::next_text(&mut w, deadline).await? else {
                    bail!("connection closed after {got} of {want} rows");
                };
                let f = ws::classify(&text)?;
                match f.kind {
                    FrameKind::MustRefetch => {
                        refetched = Some(refetch_reason(&text));
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
    let mut refetches = Vec::new();
    let mut keep = Vec::with_capacity(users);
    for t in tasks {
        let (done, refetched, w) = t.await??;
        last = last.max(done);
        refetches.extend(refetched);
        keep.push(w);
    }
    let api_secs = (last - spawned).as_secs_f64();
    drop(keep);

    // 7. pg_recvlogical, if it did not go first.
    let pg_secs = match pg_secs {
        Some(secs) => secs,
        None => recvlogical(env, &end_lsn).await?,
    };
    sql.execute("select pg_drop_replication_slot('bench_recv')", &[])
        .await?;
    Ok(ThroughputResult {
        rows: total,
        api_secs,
        pg_secs,
        pg_first,
        refetches,
        final_offsets,
    })
}

/// Seconds `pg_recvlogical` takes to drain the slot `bench_recv` up to `end_lsn`.
async fn recvlogical(env: &Env, end_lsn: &str) -> anyhow::Result<f64> {
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
            .arg(end_lsn)
            .args(["-f", "/dev/null"])
            .status(),
    )
    .await
    .context("pg_recvlogical took longer than 300 s")??;
    let secs = began.elapsed().as_secs_f64();
    if !status.success() {
        bail!("pg_recvlogical failed: {status}");
    }
    Ok(secs)
}

/// The `reason` of a `must_refetch` frame (or the frame itself, should it have none).
fn refetch_reason(frame: &str) -> String {
    serde_json::from_str::<serde_json::Value>(frame)
        .ok()
        .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| frame.to_owned())
}
