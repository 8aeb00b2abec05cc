//! Memory amplification (issue 11, item 3): another user's small batch while 4 clients keep sending 8 MB bodies of
//! a million tiny ops each, which the server must refuse with 413. Measures that user's request latency without and
//! with the flood, and the server's resident memory during the flood.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use uuid::Uuid;

use crate::env::Env;
use crate::stats;

/// Concurrent flooding clients.
const FLOODERS: usize = 4;
/// Ops in one flooding body: `{"a":1},` is 8 bytes, so the body is 8 MB, under the default 8 MiB limit.
const TINY_OPS: usize = 1_000_000;

/// The figures.
#[derive(Debug, Clone)]
pub(crate) struct AmplificationResult {
    /// The probe user's 1-op batch latency without the flood: (p50, p99, requests).
    pub(crate) quiet: (f64, f64, usize),
    /// The same during the flood.
    pub(crate) flooded: (f64, f64, usize),
    /// Flooding requests answered, and how many of them were 413.
    pub(crate) flood_requests: (usize, usize),
    /// Server RSS before the flood and its highest sample during it, KiB.
    pub(crate) rss_kib: (u64, u64),
}

fn flood_body() -> Vec<u8> {
    let mut body = Vec::with_capacity(TINY_OPS * 8 + 16);
    body.extend_from_slice(b"{\"ops\":[");
    for i in 0..TINY_OPS {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(b"{\"a\":1}");
    }
    body.extend_from_slice(b"]}");
    body
}

/// Sends 1-op batches back to back for `secs` as a fresh user; returns p50, p99 (ms) and the count.
async fn probe(env: &Env, secs: f64) -> anyhow::Result<(f64, f64, usize)> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()?;
    let token = env.token(Uuid::new_v4());
    let url = format!("{}/v1/batch", env.base());
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let body = serde_json::json!({"ops": [{"op_id": Uuid::new_v4(), "table": "works", "kind": "insert",
                                               "row": {"id": Uuid::new_v4(), "title": "probe"}}]});
        let t = Instant::now();
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .json(&body)
            .send()
            .await
            .context("probe batch")?;
        let status = r.status();
        let _ = r.bytes().await;
        anyhow::ensure!(status == 200, "probe batch answered {status}");
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let n = latencies.len();
    let (p50, _, p99) = stats::summary(&mut latencies);
    Ok((p50, p99, n))
}

/// Runs the measurement: `secs` of probing alone, then `secs` of probing while the flood runs.
pub(crate) async fn run(env: &Env, secs: f64) -> anyhow::Result<AmplificationResult> {
    let quiet = probe(env, secs).await?;
    // One shared buffer for every flooding request (cloning it is free).
    let body = bytes::Bytes::from(flood_body());
    let stop = Arc::new(AtomicBool::new(false));
    let url = format!("{}/v1/batch", env.base());
    let mut flooders = Vec::new();
    for _ in 0..FLOODERS {
        let (stop, url, body) = (stop.clone(), url.clone(), body.clone());
        let token = env.token(Uuid::new_v4());
        flooders.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?;
            let (mut sent, mut refused) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await
                    .context("flood request")?;
                sent += 1;
                if r.status() == 413 {
                    refused += 1;
                }
                let _ = r.bytes().await;
            }
            anyhow::Ok((sent, refused))
        }));
    }
    let base_rss = env.server_rss_kib()?;
    let sampler = {
        let stop = stop.clone();
        let pid = env.server_pid()?;
        tokio::spawn(async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(kib) = crate::machine::rss_kib(pid) {
                    peak = peak.max(kib);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };
    // Let the flood reach its stride before probing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let flooded = probe(env, secs).await;
    stop.store(true, Ordering::Relaxed);
    let mut flood_requests = (0, 0);
    for f in flooders {
        let (sent, refused) = tokio::time::timeout(Duration::from_secs(180), f)
            .await
            .context("flooding clients did not stop")???;
        flood_requests.0 += sent;
        flood_requests.1 += refused;
    }
    let peak = sampler.await?;
    Ok(AmplificationResult {
        quiet,
        flooded: flooded?,
        flood_requests,
        rss_kib: (base_rss, peak.max(base_rss)),
    })
}
