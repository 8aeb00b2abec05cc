//! Write path: rows/s through `POST /v1/batch` (4 clients, 4 users) next to `pgbench` running the same inserts
//! as the same role under the same RLS policy.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use uuid::Uuid;

use crate::env::{DATABASE, Env};
use crate::stats;

/// The `body` of every benchmark annotation: 100 ASCII characters, no quotes or backslashes.
pub(crate) const BODY: &str = "benchmark annotation body, one hundred characters long, plain ASCII for JSON and SQL alike. 0123456";

/// Concurrent clients (and users) on both sides.
const CLIENTS: usize = 4;

/// One batch size's figures.
#[derive(Debug, Clone)]
pub(crate) struct WriteResult {
    /// Rows written per side.
    pub(crate) rows: usize,
    /// Rows/s through the API.
    pub(crate) api_rows_s: f64,
    /// Request latency p50, ms.
    pub(crate) api_p50_ms: f64,
    /// Request latency p99, ms.
    pub(crate) api_p99_ms: f64,
    /// Rows/s through pgbench (tps × batch).
    pub(crate) pg_rows_s: f64,
    /// pgbench's average transaction latency, ms.
    pub(crate) pg_latency_ms: f64,
}

fn request_body(batch: usize) -> Vec<u8> {
    let mut s = String::with_capacity(batch * 230 + 16);
    s.push_str("{\"ops\":[");
    for i in 0..batch {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"op_id\":\"{}\",\"table\":\"annotations\",\"kind\":\"insert\",\"row\":{{\"id\":\"{}\",\"kind\":\"note\",\"body\":\"{BODY}\",\"page\":1,\"geometry\":{{\"x\":1}}}}}}",
            Uuid::new_v4(),
            Uuid::new_v4()
        );
    }
    s.push_str("]}");
    s.into_bytes()
}

async fn post(http: &reqwest::Client, url: &str, token: &str, body: Vec<u8>) -> anyhow::Result<()> {
    let r = http
        .post(url)
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .context("POST /v1/batch")?;
    let status = r.status();
    if status != 200 {
        let text = r.text().await.unwrap_or_default();
        bail!("POST /v1/batch answered {status}: {text}");
    }
    // Read the response fully, as a client would.
    let _ = r.bytes().await?;
    Ok(())
}

/// Runs one batch size on both sides: `total_rows` rows each.
pub(crate) async fn run(env: &Env, batch: usize, total_rows: usize) -> anyhow::Result<WriteResult> {
    let users: Vec<Uuid> = (0..CLIENTS).map(|_| Uuid::new_v4()).collect();
    let per_client = (total_rows / (batch * CLIENTS)).max(1);
    let rows = per_client * batch * CLIENTS;
    let url = format!("{}/v1/batch", env.base());

    // --- API ---
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let mut tasks = Vec::new();
    for user in &users {
        let token = env.token(*user);
        let url = url.clone();
        let start = start.clone();
        // Bodies are built before the clock starts.
        let warmup: Vec<Vec<u8>> = (0..2).map(|_| request_body(batch)).collect();
        let bodies: Vec<Vec<u8>> = (0..per_client).map(|_| request_body(batch)).collect();
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()?;
            for body in warmup {
                post(&http, &url, &token, body).await?;
            }
            start.wait().await;
            let mut latencies = Vec::with_capacity(bodies.len());
            for body in bodies {
                let t = Instant::now();
                post(&http, &url, &token, body).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok((latencies, Instant::now()))
        }));
    }
    start.wait().await;
    let began = Instant::now();
    let mut latencies = Vec::new();
    let mut ended = began;
    for t in tasks {
        let (l, end) = tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .context("API write clients took longer than 300 s")???;
        latencies.extend(l);
        ended = ended.max(end);
    }
    let api_secs = (ended - began).as_secs_f64();
    let (p50, _, p99) = stats::summary(&mut latencies);

    // --- pgbench ---
    let array = users
        .iter()
        .map(|u| format!("'{u}'"))
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "begin;\n\
         select set_config('role', 'deeprecall_user', true), set_config('app.user_id', (array[{array}])[:client_id + 1], true);\n\
         insert into annotations (id, kind, body, page, geometry) select gen_random_uuid(), 'note', '{BODY}', 1, '{{\"x\":1}}' from generate_series(1, {batch});\n\
         commit;\n"
    );
    let script_path = env.scratch.join(format!("insert-{batch}.sql"));
    std::fs::write(&script_path, script)?;
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        env.pg_tool("pgbench")
            .args(["-n", "-c", "4", "-j", "2", "-t"])
            .arg(per_client.to_string())
            .arg("-f")
            .arg(&script_path)
            .args(["-h", "127.0.0.1", "-p"])
            .arg(env.cluster.port().to_string())
            .args(["-U", "postgres", DATABASE])
            .output(),
    )
    .await
    .context("pgbench took longer than 300 s")??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps = parse_after(&stdout, "tps = ").context("no `tps = ` in pgbench's output")?;
    let pg_latency_ms = parse_after(&stdout, "latency average = ").unwrap_or(0.0);
    Ok(WriteResult {
        rows,
        api_rows_s: rows as f64 / api_secs,
        api_p50_ms: p50,
        api_p99_ms: p99,
        pg_rows_s: tps * batch as f64,
        pg_latency_ms,
    })
}

/// The number right after `key` on the first line containing it.
fn parse_after(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}
