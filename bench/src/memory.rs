//! Server memory per idle connection: authenticated, one subscription (to `boards`, no rows) up to date.

use std::time::Duration;

use uuid::Uuid;

use crate::env::Env;
use crate::ws;

/// RSS growth at one connection count.
#[derive(Debug, Clone)]
pub(crate) struct MemoryPoint {
    /// Idle connections open (beyond the warm-up ones).
    pub(crate) connections: usize,
    /// RSS growth over the baseline, KiB.
    pub(crate) growth_kib: u64,
}

impl MemoryPoint {
    /// KiB per connection.
    pub(crate) fn kib_per_conn(&self) -> f64 {
        self.growth_kib as f64 / self.connections as f64
    }
}

/// Memory figures.
#[derive(Debug, Clone)]
pub(crate) struct MemoryResult {
    /// Baseline RSS (after the warm-up connections), KiB.
    pub(crate) base_kib: u64,
    /// One point per target count.
    pub(crate) points: Vec<MemoryPoint>,
}

const WARMUP: usize = 200;

/// Opens idle connections up to each of `targets` (ascending) on a freshly started server and reads its RSS.
pub(crate) async fn run(env: &Env, targets: &[usize]) -> anyhow::Result<MemoryResult> {
    let open = |n: usize| {
        let tokens: Vec<String> = (0..n).map(|_| env.token(Uuid::new_v4())).collect();
        let limit = Duration::from_secs(60 + (n as u64) / 100);
        ws::open_idle(env.port, tokens, "boards", 200, limit)
    };
    let mut held = open(WARMUP).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base_kib = env.server_rss_kib()?;
    let mut points = Vec::new();
    for &target in targets {
        let more = target.saturating_sub(held.len() - WARMUP);
        held.extend(open(more).await?);
        // Let deferred frees and allocator bookkeeping settle.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = env.server_rss_kib()?;
        points.push(MemoryPoint {
            connections: held.len() - WARMUP,
            growth_kib: rss.saturating_sub(base_kib),
        });
    }
    drop(held);
    Ok(MemoryResult { base_kib, points })
}
