//! Write path: rows/s through `POST /v1/batch` (4 clients, 4 users, sequence idempotency) next to `pgbench`
//! running the same inserts as the same role under the same RLS policy, plus pgbench references that run the
//! server's own SQL; and the ledger path (batches without `client_id`) for comparison.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio_postgres::types::ToSql;
use uuid::Uuid;

use crate::env::{DATABASE, Env};
use crate::machine::{PerRow, Use};
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
    /// Server CPU per row on the API side, µs.
    pub(crate) api_server_us_per_row: f64,
    /// Server CPU per row while plain pgbench wrote (decoding and routing only), µs.
    pub(crate) pg_server_us_per_row: f64,
    /// Rows/s through pgbench (tps × batch).
    pub(crate) pg_rows_s: f64,
    /// pgbench's average transaction latency, ms.
    pub(crate) pg_latency_ms: f64,
    /// pgbench's transaction latency p50 and p99 over all rounds, ms (from its per-transaction log), the same
    /// percentiles as the API's request latency.
    pub(crate) pg_p50_ms: f64,
    /// See `pg_p50_ms`.
    pub(crate) pg_p99_ms: f64,
    /// Reference 2: pgbench plus the per-op ledger insert of batches without `client_id`.
    pub(crate) ledger: PgbenchResult,
    /// Reference 3: pgbench asking Postgres for exactly the server's work on the sequence path: claim the client's
    /// next seqs (`deeprecall_claim_seq`: lock, check, advance), one `insert … select … from unnest(arrays)`. `None` against a server whose
    /// schema has no `sync_clients` (a build from before sequence idempotency).
    pub(crate) server_sql: Option<PgbenchResult>,
    /// Reference 4: the same statements sent the way the server sends them (binary array parameters, `BEGIN` …
    /// `COMMIT` pipelined in one round trip) by a minimal client in this process: Postgres's work for the API's
    /// rows without HTTP, JSON or the server process. `None` where reference 3 is.
    pub(crate) server_statements: Option<PgbenchResult>,
    /// The API without `client_id` (per-op ledger), when measured for this batch size.
    pub(crate) api_ledger: Option<ApiResult>,
    /// Machine CPU per row (every process) and the cores' idle share on the API side, the mean of the rounds.
    pub(crate) api_machine: PerRow,
    /// The same while plain pgbench wrote.
    pub(crate) pg_machine: PerRow,
    /// The same while reference 5 wrote.
    pub(crate) values_machine: PerRow,
    /// Each round's rows/s per side, in the order the rounds ran.
    pub(crate) rounds: Vec<Round>,
    /// Reference 5 (pgbench sending the same rows as one multi-row `insert … values (…), (…)` per transaction,
    /// run in every round next to the other two sides): rows/s over all rounds.
    pub(crate) values_rows_s: f64,
    /// Reference 5's average transaction latency over the rounds, ms.
    pub(crate) values_latency_ms: f64,
}

/// One round's rows/s per side.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Round {
    /// The API.
    pub(crate) api: f64,
    /// Plain pgbench (the target's reference).
    pub(crate) plain: f64,
    /// Reference 5 (the same rows as a `values` list).
    pub(crate) values: f64,
    /// The API, written and streamed ([`ApiResult::streamed_rows_s`]).
    pub(crate) api_streamed: f64,
    /// Plain pgbench, written and streamed.
    pub(crate) plain_streamed: f64,
}

impl WriteResult {
    /// The target's ratio: the median of the rounds' API ÷ plain pgbench, each side written and streamed
    /// ([`ApiResult::streamed_rows_s`]). A round compares two sides that ran back to back, so drift of the shared
    /// machine between rounds cancels, and one disturbed round cannot move the median.
    pub(crate) fn ratio(&self) -> f64 {
        stats::median(
            self.rounds
                .iter()
                .map(|r| r.api_streamed / r.plain_streamed)
                .collect(),
        )
    }

    /// The median of the rounds' API ÷ plain pgbench with each side's clock stopped when its clients were done
    /// (the target's measure until 2026-12-06, docs/decisions.md 53).
    pub(crate) fn clients_ratio(&self) -> f64 {
        stats::median(self.rounds.iter().map(|r| r.api / r.plain).collect())
    }

    /// Rows/s of the API and of plain pgbench, written and streamed, over all rounds.
    pub(crate) fn streamed_rows_s(&self) -> (f64, f64) {
        (
            stats::harmonic_mean(self.rounds.iter().map(|r| r.api_streamed)),
            stats::harmonic_mean(self.rounds.iter().map(|r| r.plain_streamed)),
        )
    }

    /// The API's extra machine CPU per row over plain pgbench, and its parts.
    pub(crate) fn machine_split(&self) -> MachineSplit {
        let total = self.api_machine.us - self.pg_machine.us;
        let server = self.api_machine.server_us - self.pg_machine.server_us;
        let clients = self.api_machine.clients_us - self.pg_machine.clients_us;
        let postgres = self.api_machine.postgres_us - self.pg_machine.postgres_us;
        MachineSplit {
            total,
            server,
            clients,
            postgres,
            rest: total - server - clients - postgres,
        }
    }

    /// The median of the rounds' API ÷ reference 5, as [`Self::ratio`] is for plain pgbench.
    pub(crate) fn values_ratio(&self) -> f64 {
        stats::median(self.rounds.iter().map(|r| r.api / r.values).collect())
    }
}

/// The API's extra machine CPU per row over plain pgbench (µs), split by who spent it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MachineSplit {
    /// API minus plain pgbench.
    pub(crate) total: f64,
    /// The server's own CPU per row over the same stretch, API side minus plain side (both decode and route the
    /// rows; what it routes after the last client finished is outside the stretch on both sides).
    pub(crate) server: f64,
    /// The benchmark's API clients minus the pgbench process.
    pub(crate) clients: f64,
    /// Postgres's processes (backends, walsender, background workers): API side minus plain side.
    pub(crate) postgres: f64,
    /// The rest: every other process and the kernel outside them (interrupts, the network's soft interrupts where
    /// the kernel accounts them apart, thread switches).
    pub(crate) rest: f64,
}

/// The API side's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ApiResult {
    /// Rows/s.
    pub(crate) rows_s: f64,
    /// Rows/s written and streamed: the clock stops when the slowest client has finished and the server has routed
    /// the side's last row, whichever is later. The server decodes and routes every side's rows, pgbench's too, and
    /// a side whose clients finish ahead of that work leaves part of it for after their clock stopped: plain
    /// pgbench at 1000 ops left about 40% of the server's CPU for its rows there (2026-12-06), the API about 2%.
    /// Stopping the clock when both are done charges every side the same work (docs/decisions.md 53).
    pub(crate) streamed_rows_s: f64,
    /// Request latency p50, ms.
    pub(crate) p50_ms: f64,
    /// Request latency p99, ms.
    pub(crate) p99_ms: f64,
    /// Server CPU time (user + system) per row written, µs: answering the requests plus decoding and routing the
    /// rows from the replication stream.
    pub(crate) server_us_per_row: f64,
    /// The whole machine's CPU per row while the clients ran.
    pub(crate) machine: PerRow,
}

/// Rounds of a batch size: the API, plain pgbench and reference 5 run one after the other in each round, each
/// going first, second and third in turn, each writing a ninth of the rows per round. Nine rather than five (and
/// rows per side raised to match, so a round is as long as before): one round at batch 100 lasts about a second,
/// and on this shared machine single rounds of one run ranged from 0.63× to 0.96× (2026-12-03), so the median of
/// five moved by ±0.05 from run to run, the size of the gap the target asks about. The median of nine is moved by
/// four disturbed rounds, not by three, and its spread shrinks by about a quarter (docs/decisions.md 30).
pub(crate) const ROUNDS: usize = 9;

/// One reference's figures (pgbench, or reference 4's own client).
#[derive(Debug, Clone, Copy)]
pub(crate) struct PgbenchResult {
    /// Rows/s (tps × batch).
    pub(crate) rows_s: f64,
    /// Rows/s written and streamed, as [`ApiResult::streamed_rows_s`]: pgbench's rows over its time (from its tps)
    /// plus the wait from its exit until the server had routed its rows.
    pub(crate) streamed_rows_s: f64,
    /// Average transaction latency, ms.
    pub(crate) latency_ms: f64,
    /// Server CPU time per row, µs (it decodes and routes pgbench's rows from the replication stream too).
    pub(crate) server_us_per_row: f64,
    /// The whole machine's CPU per row while the reference ran (for pgbench: its whole process, connections
    /// included).
    pub(crate) machine: PerRow,
}

/// The ledger statement the server runs (`server/src/http/batch.rs`), with op_ids generated in Postgres instead
/// of sent as a uuid[] parameter, in ascending order as the server sorts them.
fn ledger_sql(batch: usize) -> String {
    format!(
        "insert into sync_applied_ops (op_id) select u from (select gen_random_uuid() as u from generate_series(1, {batch})) as ids order by u on conflict do nothing returning op_id;"
    )
}

/// A request of `batch` annotation inserts. With `sequence = Some((client_id, first_seq))` the batch carries the
/// client's id and numbers its ops from `first_seq` (sequence idempotency); without, the ops go through the
/// per-op ledger.
fn request_body(batch: usize, sequence: Option<(Uuid, i64)>) -> Vec<u8> {
    let mut s = String::with_capacity(batch * 240 + 64);
    s.push('{');
    if let Some((client, _)) = sequence {
        let _ = write!(s, "\"client_id\":\"{client}\",");
    }
    s.push_str("\"ops\":[");
    for i in 0..batch {
        if i > 0 {
            s.push(',');
        }
        let seq = sequence
            .map(|(_, first)| format!("\"seq\":{},", first + i as i64))
            .unwrap_or_default();
        let _ = write!(
            s,
            "{{\"op_id\":\"{}\",{seq}\"table\":\"annotations\",\"kind\":\"insert\",\"row\":{{\"id\":\"{}\",\"kind\":\"note\",\"body\":\"{BODY}\",\"page\":1,\"geometry\":{{\"x\":1}}}}}}",
            Uuid::new_v4(),
            Uuid::new_v4()
        );
    }
    s.push_str("]}");
    s.into_bytes()
}

/// One client's keep-alive HTTP/1.1 connection to the server: hyper's client connection, no pool and no middleware.
///
/// Why not reqwest (as the other benchmarks use): the clients share the 2 cores with the server and Postgres, so
/// whatever the load generator spends is taken from the side it measures. pgbench, on the other side, is a lean C
/// client. reqwest (pool, redirect and decompression layers, one more task hand-off per request) cost ~0.8–1.1 µs of
/// client CPU per row at batch 100, this connection ~0.4–0.6 µs (docs/decisions.md 30).
struct Connection {
    send: hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>,
    host: String,
    authorization: String,
}

impl Connection {
    /// Connects to `base` (`http://127.0.0.1:<port>`) as the bearer of `token`.
    async fn open(base: &str, token: &str) -> anyhow::Result<Self> {
        let addr = base
            .strip_prefix("http://")
            .context("base is not http://")?;
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        tcp.set_nodelay(true)?;
        let (send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .context("HTTP/1.1 handshake")?;
        // Drives the connection; ends when `send` is dropped or the server closes it.
        tokio::spawn(conn);
        Ok(Self {
            send,
            host: addr.to_owned(),
            authorization: format!("Bearer {token}"),
        })
    }

    /// `POST /v1/batch` with `body`; the answer must be 200 and is read fully, as a client would.
    async fn post(&mut self, body: Vec<u8>) -> anyhow::Result<()> {
        use http_body_util::BodyExt;
        let request = hyper::Request::post("/v1/batch")
            .header("host", &self.host)
            .header("authorization", &self.authorization)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body)))?;
        let exchange = async {
            self.send.ready().await?;
            let response = self.send.send_request(request).await?;
            let status = response.status();
            let bytes = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(Duration::from_secs(60), exchange)
            .await
            .context("POST /v1/batch took longer than 60 s")?
            .context("POST /v1/batch")?;
        if status != 200 {
            bail!(
                "POST /v1/batch answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(())
    }
}

/// Waits until the server has decoded and routed everything written so far, and returns the count of routed
/// changes ([`Env::routed_changes`]) the server will have reached once it has also routed the side's `rows` (the
/// side's clock waits for it, [`Env::wait_routed`]). The server decodes every write to a synced table, whoever made
/// it; without this, a side would start while the server still decodes the previous side's rows and pay for them.
async fn settle(env: &Env, rows: usize) -> anyhow::Result<u64> {
    let sql = env.sql().await?;
    let lsn = crate::env::current_lsn(&sql).await?;
    env.wait_server_caught_up(&sql, &lsn, Duration::from_secs(300))
        .await?;
    Ok(env.routed_changes().await? + rows as u64)
}

/// Sends `per_client` requests of `batch` ops from each of 4 clients (4 fresh users), after 2 warm-up requests
/// each; `sequence` puts every client on sequence idempotency (its own client_id, seq from 1).
pub(crate) async fn api(
    env: &Env,
    batch: usize,
    per_client: usize,
    sequence: bool,
) -> anyhow::Result<ApiResult> {
    api_run(env, batch, per_client, sequence)
        .await
        .map(|(r, _)| r)
}

/// [`api`], also returning every request's latency (ms).
async fn api_run(
    env: &Env,
    batch: usize,
    per_client: usize,
    sequence: bool,
) -> anyhow::Result<(ApiResult, Vec<f64>)> {
    // Each client's 2 warm-up requests and its measured ones.
    let routed = settle(env, (2 + per_client) * batch * CLIENTS).await?;
    let base = env.base();
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let token = env.token(Uuid::new_v4());
        let base = base.clone();
        let start = start.clone();
        // Bodies are built before the clock starts.
        let client_id = Uuid::new_v4();
        let mut next_seq = 1;
        let mut body = || {
            let seq = sequence.then_some((client_id, next_seq));
            next_seq += batch as i64;
            request_body(batch, seq)
        };
        let warmup: Vec<Vec<u8>> = (0..2).map(|_| body()).collect();
        let bodies: Vec<Vec<u8>> = (0..per_client).map(|_| body()).collect();
        tasks.push(tokio::spawn(async move {
            let mut connection = Connection::open(&base, &token).await?;
            for body in warmup {
                connection.post(body).await?;
            }
            start.wait().await;
            let mut latencies = Vec::with_capacity(bodies.len());
            for body in bodies {
                let t = Instant::now();
                connection.post(body).await?;
                latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok((latencies, Instant::now()))
        }));
    }
    let timed = timed(env, &start, tasks, routed, "API write clients").await?;
    let mut latencies: Vec<f64> = timed.outputs.into_iter().flatten().collect();
    let rows = (per_client * batch * CLIENTS) as f64;
    let (p50, _, p99) = stats::summary(&mut latencies);
    Ok((
        ApiResult {
            rows_s: rows / timed.secs,
            streamed_rows_s: rows / timed.streamed_secs,
            p50_ms: p50,
            p99_ms: p99,
            server_us_per_row: timed.server_cpu * 1e6 / rows,
            machine: PerRow::of(timed.machine, rows),
        },
        latencies,
    ))
}

/// A benchmark client: waits at the start barrier, then ends with its output and the instant it finished.
type ClientTask<T> = tokio::task::JoinHandle<anyhow::Result<(T, Instant)>>;

/// What [`timed`] measured.
struct Timed<T> {
    /// Each client's output.
    outputs: Vec<T>,
    /// Seconds until the slowest client finished.
    secs: f64,
    /// Seconds until the slowest client finished and the server had routed the side's rows (see
    /// [`ApiResult::streamed_rows_s`]).
    streamed_secs: f64,
    /// The server's CPU seconds over that time plus routing (the server finishes routing its rows after the last
    /// answer: that counts too).
    server_cpu: f64,
    /// The machine until the slowest client finished.
    machine: Use,
}

/// Starts the clock once every client waits at `start`, then waits (at most 300 s) for them and for the server to
/// route their rows, `routed` changes in all ([`Env::routed_changes`]).
async fn timed<T>(
    env: &Env,
    start: &tokio::sync::Barrier,
    tasks: Vec<ClientTask<T>>,
    routed: u64,
    what: &str,
) -> anyhow::Result<Timed<T>> {
    start.wait().await;
    let began = Instant::now();
    let machine = env.machine_now()?;
    let cpu_before = env.server_cpu_secs()?;
    let mut outputs = Vec::with_capacity(tasks.len());
    let mut ended = began;
    for t in tasks {
        let (output, end) = tokio::time::timeout(Duration::from_secs(300), t)
            .await
            .with_context(|| format!("{what} took longer than 300 s"))???;
        outputs.push(output);
        ended = ended.max(end);
    }
    let secs = (ended - began).as_secs_f64();
    let machine = machine.until(&env.machine_now()?, env.clk_tck);
    // The server has routed the side's rows: its CPU until now is the side's. (The next side settles first.)
    let routed_at = env.wait_routed(routed, Duration::from_secs(300)).await?;
    Ok(Timed {
        outputs,
        secs,
        streamed_secs: (routed_at.max(ended) - began).as_secs_f64(),
        server_cpu: env.server_cpu_secs()? - cpu_before,
        machine,
    })
}

/// Runs one batch size on both sides: `total_rows` rows each, in [`ROUNDS`] interleaved rounds. With
/// `ledger_path`, the API is also measured without `client_id`. The references (pgbench + ledger, the server's
/// SQL) run once, after the rounds, with the rows of one round.
pub(crate) async fn run(
    env: &Env,
    batch: usize,
    total_rows: usize,
    ledger_path: bool,
) -> anyhow::Result<WriteResult> {
    let per_client = (total_rows / (ROUNDS * batch * CLIENTS)).max(1);
    let round_rows = per_client * batch * CLIENTS;

    // Every side writes as 4 users of its own, so each starts from the same state: the annotations primary key is
    // indexed by (owner_id, …), and inserting into an owner's range that an earlier side already filled with 100k
    // random uuids touches far more index pages than inserting into a fresh one.
    let users = || -> Vec<Uuid> { (0..CLIENTS).map(|_| Uuid::new_v4()).collect() };
    let pick = |ids: &[Uuid], cast: &str| {
        let array = ids
            .iter()
            .map(|u| format!("'{u}'"))
            .collect::<Vec<_>>()
            .join(",");
        format!("(array[{array}]{cast})[:client_id + 1]")
    };
    let head = |ids: &[Uuid]| {
        format!(
            "begin;\n\
             select set_config('role', 'deeprecall_user', true), set_config('app.user_id', {}, true), pg_current_xact_id()::text;\n",
            pick(ids, "")
        )
    };
    let plain_insert = format!(
        "insert into annotations (id, kind, body, page, geometry) select gen_random_uuid(), 'note', '{BODY}', 1, '{{\"x\":1}}' from generate_series(1, {batch});\n"
    );

    // Reference 5: the same rows sent with the statement, as a client that has them would send them to Postgres
    // (ids generated by Postgres as in plain pgbench: a pgbench script is the same text every transaction).
    let tuples =
        vec![format!("(gen_random_uuid(), 'note', '{BODY}', 1, '{{\"x\":1}}')"); batch].join(", ");
    let values_insert =
        format!("insert into annotations (id, kind, body, page, geometry) values {tuples};\n");

    // --- the target: the API (sequence idempotency) and plain pgbench, alternating, with reference 5 ---
    let mut rounds = Vec::with_capacity(ROUNDS);
    let mut latencies = Vec::new();
    let mut pg_latencies = Vec::new();
    let mut api_cpu = 0.0;
    let mut plain_cpu = 0.0;
    let mut plain_latency = 0.0;
    let mut values_latency = 0.0;
    let (mut api_machine, mut plain_machine, mut values_machine) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 0..ROUNDS {
        let script = format!("{}{plain_insert}commit;\n", head(&users()));
        let values_script = format!("{}{values_insert}commit;\n", head(&users()));
        let name = format!("insert-{batch}-{round}");
        let values_name = format!("insert-values-{batch}-{round}");
        // Each side goes first, second and third in turn.
        let mut rates = Round {
            api: 0.0,
            plain: 0.0,
            values: 0.0,
            api_streamed: 0.0,
            plain_streamed: 0.0,
        };
        for side in 0..3 {
            match (round + side) % 3 {
                0 => {
                    let (api, api_latencies) = api_run(env, batch, per_client, true).await?;
                    latencies.extend(api_latencies);
                    api_cpu += api.server_us_per_row / ROUNDS as f64;
                    api_machine.push(api.machine);
                    rates.api = api.rows_s;
                    rates.api_streamed = api.streamed_rows_s;
                }
                1 => {
                    let (plain, plain_latencies) =
                        pgbench(env, &script, &name, batch, per_client).await?;
                    pg_latencies.extend(plain_latencies);
                    plain_cpu += plain.server_us_per_row / ROUNDS as f64;
                    plain_latency += plain.latency_ms / ROUNDS as f64;
                    plain_machine.push(plain.machine);
                    rates.plain = plain.rows_s;
                    rates.plain_streamed = plain.streamed_rows_s;
                }
                _ => {
                    let (values, _) =
                        pgbench(env, &values_script, &values_name, batch, per_client).await?;
                    values_latency += values.latency_ms / ROUNDS as f64;
                    values_machine.push(values.machine);
                    rates.values = values.rows_s;
                }
            }
        }
        rounds.push(rates);
    }
    // Over all rounds: rows ÷ seconds, the harmonic mean of the rates as every round writes the same rows; latencies
    // pooled.
    let api_rows_s = stats::harmonic_mean(rounds.iter().map(|r| r.api));
    let pg_rows_s = stats::harmonic_mean(rounds.iter().map(|r| r.plain));
    let values_rows_s = stats::harmonic_mean(rounds.iter().map(|r| r.values));
    let (api_p50, _, api_p99) = stats::summary(&mut latencies);
    let (pg_p50, _, pg_p99) = stats::summary(&mut pg_latencies);

    let api_ledger = if ledger_path {
        Some(api(env, batch, per_client, false).await?)
    } else {
        None
    };

    // --- references: pgbench + per-op ledger, pgbench running the server's SQL ---
    let ledger = pgbench(
        env,
        &format!(
            "{}{}\n{plain_insert}commit;\n",
            head(&users()),
            ledger_sql(batch)
        ),
        &format!("insert-ledger-{batch}"),
        batch,
        per_client,
    )
    .await?
    .0;
    // The server's statements on the sequence path (server/src/http/batch/execute.rs and plan.rs), with the
    // arrays built in SQL instead of bound as binary parameters.
    let sql = env.sql().await?;
    let has_clients: bool = sql
        .query_one(
            "select to_regprocedure('deeprecall_claim_seq(uuid, bigint, bigint)') is not null",
            &[],
        )
        .await?
        .get(0);
    let server_sql = if has_clients {
        let owners = users();
        let clients = users();
        for (owner, client) in owners.iter().zip(&clients) {
            register_client(&sql, owner, client).await?;
        }
        let client = pick(&clients, "::uuid[]");
        // deeprecall_claim_seq locks the client's row, checks and advances its seq (sql/0003); the server calls it
        // with the batch's first and last seq, pgbench reads the current one in the same statement.
        let script = format!(
            "{head}select deeprecall_claim_seq(c.client_id, c.last_seq + 1, c.last_seq + {batch}) \
             from sync_clients c where c.client_id = {client};\n\
             insert into annotations (id, kind, body, page, geometry) select u.id, u.kind, u.body, u.page, u.geometry \
             from (select unnest((select array_agg(gen_random_uuid()) from generate_series(1, {batch}))) as id, \
             unnest(array_fill('note'::text, array[{batch}])) as kind, unnest(array_fill('{BODY}'::text, array[{batch}])) as body, \
             unnest(array_fill(1, array[{batch}])) as page, unnest(array_fill('{{\"x\":1}}'::jsonb, array[{batch}])) as geometry) as u;\n\
             commit;\n",
            head = head(&owners)
        );
        Some(
            pgbench(
                env,
                &script,
                &format!("insert-seq-{batch}"),
                batch,
                per_client,
            )
            .await?
            .0,
        )
    } else {
        None
    };
    let server_statements = match server_sql {
        Some(_) => Some(server_statements(env, batch, per_client).await?),
        None => None,
    };
    Ok(WriteResult {
        rows: round_rows * ROUNDS,
        api_rows_s,
        api_p50_ms: api_p50,
        api_p99_ms: api_p99,
        api_server_us_per_row: api_cpu,
        pg_server_us_per_row: plain_cpu,
        pg_rows_s,
        pg_latency_ms: plain_latency,
        pg_p50_ms: pg_p50,
        pg_p99_ms: pg_p99,
        ledger,
        server_sql,
        server_statements,
        api_ledger,
        api_machine: PerRow::mean(api_machine.into_iter()),
        pg_machine: PerRow::mean(plain_machine.into_iter()),
        values_machine: PerRow::mean(values_machine.into_iter()),
        rounds,
        values_rows_s,
        values_latency_ms: values_latency,
    })
}

/// Creates `client`'s sequence row for `owner` (last seq 0), as the server does on a client's first batch.
async fn register_client(
    sql: &tokio_postgres::Client,
    owner: &Uuid,
    client: &Uuid,
) -> anyhow::Result<()> {
    sql.execute(
        "insert into sync_clients (owner_id, client_id, last_seq) values ($1, $2, 0)",
        &[owner, client],
    )
    .await?;
    Ok(())
}

/// The server's statements on the sequence path for `batch` annotation inserts (server/src/db/mod.rs `run_scoped`,
/// http/batch/execute.rs and plan.rs): the role switch, the claim, the insert over binary arrays (columns in table
/// order, as the planner orders them).
const HEAD_SQL: &str = "select pg_current_xact_id()::text, set_config('role', $1, true), set_config('app.user_id', $2, true)";
const CLAIM_SQL: &str = "select deeprecall_claim_seq($1, $2, $3)";
const INSERT_SQL: &str = "insert into \"public\".\"annotations\" (\"id\", \"page\", \"kind\", \"geometry\", \"body\") \
     select u.\"id\", u.\"page\", u.\"kind\", u.\"geometry\", u.\"body\" \
     from (select unnest($1::uuid[]) as \"id\", unnest($2::int4[]) as \"page\", unnest($3::text[]) as \"kind\", \
     unnest($4::jsonb[]) as \"geometry\", unnest($5::text[]) as \"body\") as u";

/// One transaction's parameters for [`INSERT_SQL`].
struct Arrays {
    ids: Vec<Uuid>,
    pages: Vec<i32>,
    kinds: Vec<&'static str>,
    geometry: Vec<serde_json::Value>,
    bodies: Vec<&'static str>,
}

/// Reference 4: 4 connections as 4 fresh users, each running `per_client` transactions of `batch` rows with the
/// server's statements, pipelined and with binary parameters as the server sends them; parameters are built before
/// the clock starts, as the API's bodies are. Rows/s = rows / wall time of the slowest client; latency is the mean
/// per transaction.
async fn server_statements(
    env: &Env,
    batch: usize,
    per_client: usize,
) -> anyhow::Result<PgbenchResult> {
    let routed = settle(env, per_client * batch * CLIENTS).await?;
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let (user, client_id) = (Uuid::new_v4(), Uuid::new_v4());
        let sql = env.sql().await?;
        register_client(&sql, &user, &client_id).await?;
        let transactions: Vec<Arrays> = (0..per_client)
            .map(|_| Arrays {
                ids: (0..batch).map(|_| Uuid::new_v4()).collect(),
                pages: vec![1; batch],
                kinds: vec!["note"; batch],
                geometry: vec![serde_json::json!({"x": 1}); batch],
                bodies: vec![BODY; batch],
            })
            .collect();
        let start = start.clone();
        tasks.push(tokio::spawn(async move {
            let (head, claim, insert) = futures::try_join!(
                sql.prepare(HEAD_SQL),
                sql.prepare(CLAIM_SQL),
                sql.prepare(INSERT_SQL)
            )?;
            let user = user.to_string();
            start.wait().await;
            let mut last_seq = 0i64;
            for t in &transactions {
                let (first, last) = (last_seq + 1, last_seq + batch as i64);
                last_seq = last;
                let head_params: [&(dyn ToSql + Sync); 2] = [&"deeprecall_user", &user];
                let claim_params: [&(dyn ToSql + Sync); 3] = [&client_id, &first, &last];
                let insert_params: [&(dyn ToSql + Sync); 5] =
                    [&t.ids, &t.pages, &t.kinds, &t.geometry, &t.bodies];
                // One round trip: every message is queued on the first poll, as the server's run_scoped does.
                let (begun, head, claimed, inserted, committed) = futures::join!(
                    sql.batch_execute("begin"),
                    sql.query_one(&head, &head_params),
                    sql.query(&claim, &claim_params),
                    sql.execute(&insert, &insert_params),
                    sql.batch_execute("commit")
                );
                begun?;
                head?;
                claimed?;
                anyhow::ensure!(
                    inserted? == batch as u64,
                    "reference 4 inserted too few rows"
                );
                committed?;
            }
            anyhow::Ok(((), Instant::now()))
        }));
    }
    let timed = timed(env, &start, tasks, routed, "reference 4").await?;
    let rows = (per_client * batch * CLIENTS) as f64;
    Ok(PgbenchResult {
        rows_s: rows / timed.secs,
        streamed_rows_s: rows / timed.streamed_secs,
        latency_ms: timed.secs * 1000.0 / per_client as f64,
        server_us_per_row: timed.server_cpu * 1e6 / rows,
        machine: PerRow::of(timed.machine, rows),
    })
}

/// Records `ops` more ops the way a long-lived deployment has them: rows in the per-op ledger (spread over 1,000
/// owners, applied over the last day) and a `sync_clients` row per owner. Superuser, one statement each.
pub(crate) async fn record_ops(env: &Env, ops: usize) -> anyhow::Result<()> {
    let sql = env.sql().await?;
    let owners: Vec<Uuid> = (0..1000).map(|_| Uuid::new_v4()).collect();
    sql.execute(
        "insert into sync_applied_ops (owner_id, op_id, applied_at)
         select ($1::uuid[])[1 + i % 1000], gen_random_uuid(), now() - (i % 86400) * interval '1 second'
           from generate_series(1, $2::int) as i",
        &[&owners, &(ops as i32)],
    )
    .await?;
    if sql
        .query_one("select to_regclass('sync_clients') is not null", &[])
        .await?
        .get::<_, bool>(0)
    {
        sql.execute(
            "insert into sync_clients (owner_id, client_id, last_seq)
             select o, gen_random_uuid(), $2 from unnest($1::uuid[]) as o",
            &[&owners, &((ops / 1000) as i64)],
        )
        .await?;
    }
    sql.batch_execute("vacuum analyze sync_applied_ops").await?;
    Ok(())
}

/// Runs `script` with `pgbench -n -c 4 -j 2`, `per_client` transactions per client; returns its figures and every
/// transaction's latency (ms) from its per-transaction log (`-l`).
async fn pgbench(
    env: &Env,
    script: &str,
    name: &str,
    batch: usize,
    per_client: usize,
) -> anyhow::Result<(PgbenchResult, Vec<f64>)> {
    let rows = per_client * CLIENTS * batch;
    let routed = settle(env, rows).await?;
    let cpu_before = env.server_cpu_secs()?;
    let script_path = env.scratch.join(format!("{name}.sql"));
    std::fs::write(&script_path, script)?;
    // pgbench writes one log file per thread: `<prefix>.<pid>` and `<prefix>.<pid>.<thread>`.
    let log_prefix = format!("pgbench-log-{name}");
    let machine = env.machine_now()?;
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        env.pg_tool("pgbench")
            .arg("-l")
            .arg(format!(
                "--log-prefix={}",
                env.scratch.join(&log_prefix).display()
            ))
            .args(["-n", "-c", &CLIENTS.to_string(), "-j", "2", "-t"])
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
    let exited = Instant::now();
    let machine = machine.until(&env.machine_now()?, env.clk_tck);
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
    let routed_at = env.wait_routed(routed, Duration::from_secs(300)).await?;
    let secs = rows as f64 / (tps * batch as f64);
    let streamed_secs = secs + routed_at.saturating_duration_since(exited).as_secs_f64();
    let cpu = env.server_cpu_secs()? - cpu_before;
    let latencies = read_pgbench_logs(&env.scratch, &log_prefix)?;
    if latencies.len() != per_client * CLIENTS {
        bail!(
            "pgbench ({name}) logged {} transactions, expected {}",
            latencies.len(),
            per_client * CLIENTS
        );
    }
    Ok((
        PgbenchResult {
            rows_s: tps * batch as f64,
            streamed_rows_s: rows as f64 / streamed_secs,
            latency_ms: parse_after(&stdout, "latency average = ").unwrap_or(0.0),
            server_us_per_row: cpu * 1e6 / rows as f64,
            machine: PerRow::of(machine, rows as f64),
        },
        latencies,
    ))
}

/// Every transaction's latency (ms) from the log files `dir/<prefix>.*`, which it then removes. A line is
/// `client_id transaction_no time script_no time_epoch time_us …`, `time` being the latency in µs.
fn read_pgbench_logs(dir: &std::path::Path, prefix: &str) -> anyhow::Result<Vec<f64>> {
    let prefix = format!("{prefix}.");
    let mut latencies = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_log = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&prefix));
        if !is_log {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let micros: f64 = line
                .split_whitespace()
                .nth(2)
                .and_then(|t| t.parse().ok())
                .with_context(|| format!("unexpected pgbench log line {line:?}"))?;
            latencies.push(micros / 1000.0);
        }
        std::fs::remove_file(&path)?;
    }
    Ok(latencies)
}

/// The number right after `key` on the first line containing it.
fn parse_after(text: &str, key: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.contains(key))?;
    let rest = &line[line.find(key)? + key.len()..];
    rest.split_whitespace().next()?.parse().ok()
}
