//! Initial snapshot: subscribe → `up_to_date` with every row, next to `COPY (select …) TO STDOUT` of the same rows.

use std::time::{Duration, Instant};

use anyhow::bail;
use futures::StreamExt;
use uuid::Uuid;

use crate::env::{self, Env};
use crate::load::load_rows;
use crate::ws::{self, Buffers};

/// Snapshot figures (best of `RUNS` each).
#[derive(Debug, Clone)]
pub(crate) struct SnapshotResult {
    /// Rows of the user.
    pub(crate) rows: usize,
    /// Seconds, subscribe sent → up_to_date received.
    pub(crate) api_secs: f64,
    /// Seconds, COPY started → last byte.
    pub(crate) copy_secs: f64,
    /// Bytes COPY produced.
    pub(crate) copy_bytes: usize,
}

const RUNS: usize = 3;

/// Loads `rows` rows for one user and times both ways of reading them.
pub(crate) async fn run(env: &Env, rows: usize) -> anyhow::Result<SnapshotResult> {
    const PER_TXN: usize = 10_000;
    let user = Uuid::new_v4();
    let txns = rows.div_ceil(PER_TXN);
    let per_txn = rows.div_ceil(txns);
    let rows = txns * per_txn;
    load_rows(env, &[user], txns, per_txn, 1, Duration::from_secs(180)).await?;
    let sql = env.sql().await?;
    let lsn = env::current_lsn(&sql).await?;
    // The server must have routed the load before the clock starts (its snapshot waits for a barrier behind it).
    env.wait_server_caught_up(&sql, &lsn, Duration::from_secs(120))
        .await?;

    let mut copy_secs = f64::MAX;
    let mut copy_bytes = 0;
    for _ in 0..RUNS {
        let began = Instant::now();
        let stream = sql
            .copy_out(&format!(
                "copy (select * from annotations where owner_id = '{user}') to stdout"
            ))
            .await?;
        let mut stream = std::pin::pin!(stream);
        let mut bytes = 0;
        while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), stream.next())
            .await?
            .transpose()?
        {
            bytes += chunk.len();
        }
        copy_secs = copy_secs.min(began.elapsed().as_secs_f64());
        copy_bytes = bytes;
    }

    let token = env.token(user);
    let mut api_secs = f64::MAX;
    for _ in 0..RUNS {
        let mut w = ws::connect(env.port, &token, Buffers::Large).await?;
        let began = Instant::now();
        ws::subscribe(&mut w, "s", "annotations", None).await?;
        let (got, _) = ws::until_up_to_date(&mut w, Duration::from_secs(120)).await?;
        let secs = began.elapsed().as_secs_f64();
        if got != rows {
            bail!("snapshot delivered {got} rows, expected {rows}");
        }
        api_secs = api_secs.min(secs);
        let _ = w.close(None).await;
    }
    Ok(SnapshotResult {
        rows,
        api_secs,
        copy_secs,
        copy_bytes,
    })
}
