//! Commit → client latency (next to commit → `pg_recvlogical` on a third slot) and fan-out cost (server CPU per
//! routed change), with growing numbers of idle connected users.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use tokio::io::AsyncReadExt;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::env::{Env, PUBLICATION};
use crate::load::load_rows;
use crate::stats;
use crate::write::BODY;
use crate::ws::{self, Buffers};

/// Receive instants of probe markers, by probe number.
type Seen = Arc<Mutex<HashMap<u32, Instant>>>;

/// Finds every `probe-NNNNNN-` marker in `bytes`.
fn markers(bytes: &[u8]) -> impl Iterator<Item = u32> + '_ {
    const KEY: &[u8] = b"probe-";
    bytes.windows(KEY.len() + 7).filter_map(|w| {
        if &w[..KEY.len()] != KEY || w[KEY.len() + 6] != b'-' {
            return None;
        }
        std::str::from_utf8(&w[KEY.len()..KEY.len() + 6])
            .ok()?
            .parse()
            .ok()
    })
}

fn record(seen: &Seen, bytes: &[u8], at: Instant) {
    let mut found = markers(bytes).peekable();
    if found.peek().is_none() {
        return;
    }
    let mut map = seen.lock().unwrap_or_else(|e| e.into_inner());
    for id in found {
        map.entry(id).or_insert(at);
    }
}

/// The receiving side: active subscribers (reading everything) and a `pg_recvlogical` on its own slot.
pub(crate) struct Live {
    /// Users whose subscribers read (probes and fan-out load go to them).
    pub(crate) active: Vec<Uuid>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    rows: Arc<AtomicU64>,
    api_seen: Seen,
    pg_seen: Seen,
    recvlogical: tokio::process::Child,
    pg_reader: tokio::task::JoinHandle<()>,
    next_probe: AtomicU32,
    /// Idle connections (TCP sockets only).
    pub(crate) idle: Vec<tokio::net::TcpStream>,
}

/// Latency of one stage, in ms.
#[derive(Debug, Clone)]
pub(crate) struct LatencyResult {
    /// Connected users (active + idle).
    pub(crate) connected: usize,
    /// Probes sent.
    pub(crate) probes: usize,
    /// deeprecall-sync p50/p95/p99.
    pub(crate) api: (f64, f64, f64),
    /// pg_recvlogical p50/p95/p99.
    pub(crate) pg: (f64, f64, f64),
    /// Probes that never reached the client / pg_recvlogical within the wait.
    pub(crate) missing: (usize, usize),
}

/// Fan-out cost of one stage.
#[derive(Debug, Clone)]
pub(crate) struct FanoutResult {
    /// Idle connected users.
    pub(crate) idle: usize,
    /// Rows routed.
    pub(crate) rows: usize,
    /// Server CPU seconds spent.
    pub(crate) cpu_secs: f64,
}

impl FanoutResult {
    /// Server CPU microseconds per routed change.
    pub(crate) fn us_per_change(&self) -> f64 {
        self.cpu_secs * 1e6 / self.rows as f64
    }
}

impl Live {
    /// Creates the third slot, starts `pg_recvlogical -f -` on it, and connects no one yet.
    pub(crate) async fn start(env: &Env) -> anyhow::Result<Self> {
        let sql = env.sql().await?;
        sql.execute(
            "select pg_create_logical_replication_slot('bench_lat', 'pgoutput')",
            &[],
        )
        .await?;
        let mut child = env
            .pg_tool("pg_recvlogical")
            .arg("-d")
            .arg(env.conninfo())
            .args([
                "--slot",
                "bench_lat",
                "--start",
                "-o",
                "proto_version=1",
                "-o",
            ])
            .arg(format!("publication_names={PUBLICATION}"))
            .args(["-f", "-"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting pg_recvlogical")?;
        let mut out = child.stdout.take().context("pg_recvlogical stdout")?;
        let pg_seen: Seen = Arc::default();
        let seen = pg_seen.clone();
        let pg_reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 1 << 16];
            // Keep the tail of the previous read so a marker split across reads is still found.
            let mut carry: Vec<u8> = Vec::new();
            loop {
                let n = match out.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let at = Instant::now();
                carry.extend_from_slice(&buf[..n]);
                record(&seen, &carry, at);
                let keep = carry.len().saturating_sub(12);
                carry.drain(..keep);
            }
        });
        Ok(Self {
            active: Vec::new(),
            tasks: Vec::new(),
            rows: Arc::default(),
            api_seen: Arc::default(),
            pg_seen,
            recvlogical: child,
            pg_reader,
            next_probe: AtomicU32::new(1),
            idle: Vec::new(),
        })
    }

    /// Connects `n` more active users (subscribed to `annotations`, reading everything).
    pub(crate) async fn add_active(&mut self, env: &Env, n: usize) -> anyhow::Result<()> {
        for _ in 0..n {
            let user = Uuid::new_v4();
            let (mut w, _) =
                ws::connect_subscribed(env.port, &env.token(user), "annotations", Buffers::Large)
                    .await?;
            let rows = self.rows.clone();
            let seen = self.api_seen.clone();
            self.tasks.push(tokio::spawn(async move {
                while let Some(Ok(msg)) = w.next().await {
                    let at = Instant::now();
                    if let Message::Text(text) = msg {
                        let text = text.as_str();
                        rows.fetch_add(text.matches("\"op\":\"").count() as u64, Ordering::Relaxed);
                        record(&seen, text.as_bytes(), at);
                    }
                }
            }));
            self.active.push(user);
        }
        Ok(())
    }

    /// Opens idle users (subscribed to `annotations`, receiving nothing) until there are `target` of them.
    pub(crate) async fn grow_idle(&mut self, env: &Env, target: usize) -> anyhow::Result<()> {
        let more = target.saturating_sub(self.idle.len());
        let tokens: Vec<String> = (0..more).map(|_| env.token(Uuid::new_v4())).collect();
        let limit = Duration::from_secs(60 + (more as u64) / 100);
        let opened = ws::open_idle(env.port, tokens, "annotations", 200, limit).await?;
        self.idle.extend(opened);
        Ok(())
    }

    /// Brings the idle users to `target`: opens more, or closes the most recent ones and waits (at most 60 s) until
    /// the server holds no more stream connections than remain, so that letting them go is not counted in what is
    /// measured next.
    pub(crate) async fn set_idle(&mut self, env: &Env, target: usize) -> anyhow::Result<()> {
        if target >= self.idle.len() {
            return self.grow_idle(env, target).await;
        }
        self.idle.truncate(target);
        let want = self.connected() as u64;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let open = env.stream_connections().await?;
            if open <= want {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "the server still holds {open} stream connections 60 s after all but {want} closed"
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Connected users.
    pub(crate) fn connected(&self) -> usize {
        self.active.len() + self.idle.len()
    }

    /// Sends `count` one-row probe transactions at `rate` per second to random active users and measures
    /// commit → subscriber and commit → pg_recvlogical.
    pub(crate) async fn latency(
        &self,
        env: &Env,
        rate: f64,
        count: usize,
    ) -> anyhow::Result<LatencyResult> {
        let sql = env.sql().await?;
        let stmt = sql
            .prepare(
                "insert into annotations (id, owner_id, kind, body, page, geometry)
                 values (gen_random_uuid(), $1, 'note', $2, 1, '{\"x\":1}')",
            )
            .await?;
        let mut rng = Rng::new();
        let mut send = async |n: usize, pace: bool| -> anyhow::Result<Vec<(u32, Instant)>> {
            let start = Instant::now();
            let mut sent = Vec::with_capacity(n);
            for i in 0..n {
                if pace {
                    let at = start + Duration::from_secs_f64(i as f64 / rate);
                    tokio::time::sleep_until(at.into()).await;
                }
                let id = self.next_probe.fetch_add(1, Ordering::Relaxed);
                let user = self.active[rng.below(self.active.len())];
                let mut body = format!("probe-{id:06}-");
                body.push_str(&BODY[body.len()..]);
                sql.execute(&stmt, &[&user, &body]).await?;
                sent.push((id, Instant::now()));
            }
            Ok(sent)
        };
        // Warm-up (not counted): also proves both receivers are streaming.
        let warm = send(3, false).await?;
        self.wait_seen(&warm, Duration::from_secs(20)).await;
        let sent = send(count, true).await?;
        self.wait_seen(&sent, Duration::from_secs(10)).await;
        let collect = |seen: &Seen| {
            let map = seen.lock().unwrap_or_else(|e| e.into_inner());
            let mut ms = Vec::with_capacity(sent.len());
            let mut missing = 0;
            for (id, committed) in &sent {
                match map.get(id) {
                    Some(at) => {
                        ms.push(at.saturating_duration_since(*committed).as_secs_f64() * 1e3)
                    }
                    None => missing += 1,
                }
            }
            (stats::summary(&mut ms), missing)
        };
        let (api, api_missing) = collect(&self.api_seen);
        let (pg, pg_missing) = collect(&self.pg_seen);
        if api_missing == sent.len() || pg_missing == sent.len() {
            bail!(
                "no probe arrived (client missing {api_missing}, pg_recvlogical missing {pg_missing} of {})",
                sent.len()
            );
        }
        Ok(LatencyResult {
            connected: self.connected(),
            probes: sent.len(),
            api,
            pg,
            missing: (api_missing, pg_missing),
        })
    }

    async fn wait_seen(&self, sent: &[(u32, Instant)], limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let all = |seen: &Seen| {
                let map = seen.lock().unwrap_or_else(|e| e.into_inner());
                sent.iter().all(|(id, _)| map.contains_key(id))
            };
            if all(&self.api_seen) && all(&self.pg_seen) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Loads `rows` rows (10 per transaction, active users round-robin) and measures the server's CPU time until
    /// the active subscribers have received all of them.
    pub(crate) async fn fanout(&self, env: &Env, rows: usize) -> anyhow::Result<FanoutResult> {
        const ROWS_PER_TXN: usize = 10;
        let txns = rows / ROWS_PER_TXN;
        let rows = txns * ROWS_PER_TXN;
        let target = self.rows.load(Ordering::Relaxed) + rows as u64;
        let cpu0 = env.server_cpu_secs()?;
        load_rows(
            env,
            &self.active,
            txns,
            ROWS_PER_TXN,
            2,
            Duration::from_secs(180),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.rows.load(Ordering::Relaxed) < target {
            if Instant::now() > deadline {
                bail!("the active subscribers did not receive the fan-out load within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let cpu1 = env.server_cpu_secs()?;
        Ok(FanoutResult {
            idle: self.idle.len(),
            rows,
            cpu_secs: cpu1 - cpu0,
        })
    }

    /// Stops everything and drops the third slot.
    pub(crate) async fn finish(mut self, env: &Env) -> anyhow::Result<()> {
        for t in &self.tasks {
            t.abort();
        }
        self.idle.clear();
        let _ = self.recvlogical.kill().await;
        self.pg_reader.abort();
        let sql = env.sql().await?;
        // The walsender may hold the slot for a moment after its client went away.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match sql
                .execute("select pg_drop_replication_slot('bench_lat')", &[])
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() > deadline => return Err(e.into()),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// xorshift64*: enough to pick a random active user without another dependency.
struct Rng(u64);

impl Rng {
    fn new() -> Self {
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0x9E37_79B9_7F4A_7C15);
        Self(seed | 1)
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % n
    }
}

#[cfg(test)]
mod tests {
    use super::markers;

    #[test]
    fn finds_markers() {
        let found: Vec<u32> = markers(b"xxprobe-000123-yyprobe-000124-probe-12").collect();
        assert_eq!(found, vec![123, 124]);
    }
}
