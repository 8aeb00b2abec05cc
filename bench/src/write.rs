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
    /// Reference 2: pgbench with the same idempotency ledger insert as the server.
    pub(crate) ledger: PgbenchResult,
    /// Reference 3: pgbench asking Postgres for exactly the server's work: ledger insert plus rows read from a
    /// JSON array through `jsonb_populate_recordset`.
    pub(crate) json: PgbenchResult,
}

/// One pgbench reference's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgbenchResult {
    /// Rows/s (tps × batch).
    pub(crate) rows_s: f64,
    /// Average transaction latency, ms.
    pub(crate) latency_ms: f64,
}

/// The ledger statement the server runs (`server/src/http/batch.rs`), with op_ids generated in Postgres instead
/// of sent as a uuid[] parameter, in ascending order as the server sorts them.
fn ledger_sql(batch: usize) -> String {
    format!(
        "insert into sync_applied_ops (op_id) select u from (select gen_random_uuid() as u from generate_series(1, {batch})) as ids order by u on conflict do nothing returning op_id;"
    )
}

/// A JSON array of `batch` annotation rows shaped like the API's `row`s (with an `id`, so Postgres parses one
/// uuid per row as it does for the server).
fn json_rows(batch: usize) -> String {
    let mut s = String::with_capacity(batch * 160 + 2);
    s.push('[');
    for i in 0..batch {
        if i > 0 {
            s.push(',');
        }
        let _ = write!(
            s,
            "{{\"id\":\"{}\",\"kind\":\"note\",\"body\":\"{BODY}\",\"page\":1,\"geometry\":{{\"x\":1}}}}",
            Uuid::new_v4()
        );
    }
    s.push(']');
    s
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

    // --- pgbench: plain (the target's reference), + ledger, + ledger and rows from JSON ---
    // Every side writes as 4 users of its own, so each starts from the same state: the ledger and the
    // annotations primary key are indexed by (owner_id, …), and inserting into an owner's range that an earlier
    // side already filled with 100k random uuids touches far more index pages than inserting into a fresh one.
    let head = || {
        let array = (0..CLIENTS)
            .map(|_| format!("'{}'", Uuid::new_v4()))
            .collect::<Vec<_>>()
            .join(",");
        format!(
            "begin;\n\
             select set_config('role', 'deeprecall_user', true), set_config('app.user_id', (array[{array}])[:client_id + 1], true);\n"
        )
    };
    let plain_insert = format!(
        "insert into annotations (id, kind, body, page, geometry) select gen_random_uuid(), 'note', '{BODY}', 1, '{{\"x\":1}}' from generate_series(1, {batch});\n"
    );
    // The server's set statement, reading the JSON text from bench_json and converting it to jsonb (as the
    // server's parameter is). The JSON's ids are parsed but fresh ids are inserted, so every transaction can
    // reuse the same array.
    let json_insert = format!(
        "insert into annotations (id, page, kind, geometry, body) select gen_random_uuid(), page, kind, geometry, body \
         from jsonb_populate_recordset(null::annotations, (select rows::jsonb from bench_json where n = {batch}));\n"
    );
    let sql = env.sql().await?;
    sql.batch_execute(
        "create table if not exists bench_json (n int primary key, rows text not null); \
         grant select on bench_json to deeprecall_user;",
    )
    .await?;
    sql.execute(
        "insert into bench_json (n, rows) values ($1, $2) on conflict (n) do update set rows = excluded.rows",
        &[&(batch as i32), &json_rows(batch)],
    )
    .await?;
    drop(sql);
    let plain = pgbench(
        env,
        &format!("{}{plain_insert}commit;\n", head()),
        &format!("insert-{batch}"),
        batch,
        per_client,
    )
    .await?;
    let ledger = pgbench(
        env,
        &format!("{}{}\n{plain_insert}commit;\n", head(), ledger_sql(batch)),
        &format!("insert-ledger-{batch}"),
        batch,
        per_client,
    )
    .await?;
    let json = pgbench(
        env,
        &format!("{}{}\n{json_insert}commit;\n", head(), ledger_sql(batch)),
        &format!("insert-json-{batch}"),
        batch,
        per_client,
    )
    .await?;
    Ok(WriteResult {
        rows,
        api_rows_s: rows as f64 / api_secs,
        api_p50_ms: p50,
        api_p99_ms: p99,
        pg_rows_s: plain.rows_s,
        pg_latency_ms: plain.latency_ms,
        ledger,
        json,
    })
}

/// Runs `script` with `pgbench -n -c 4 -j 2`, `per_client` transactions per client.
async fn pgbench(
    env: &Env,
    script: &str,
    name: &str,
    batch: usize,
    per_client: usize,
) -> anyhow::Result<PgbenchResult> {
    let script_path = env.scratch.join(format!("{name}.sql"));
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
    .with_context(|| format!("pgbench ({name}) took longer than 300 s"))??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench ({name}) failed ({}): {}{}",
            output.status,
            stdout,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let tps = parse_after(&stdout, "tps = ").context("no `tps = ` in pgbench's output")?;
    Ok(PgbenchResult {
        rows_s: tps * batch as f64,
        latency_ms: parse_after(&stdout, "latency average = ").unwrap_or(0.0),
    })
}

/// The number right after `key` on the first line containing it.
fn parse_after(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}
