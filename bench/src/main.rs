//! deeprecall-bench: measures deeprecall-sync side by side with what PostgreSQL itself does on the same machine
//! in the same run, and reports each figure as a ratio (BENCHMARKS.md).
//!
//! ```text
//! cargo run --release -p deeprecall-bench              # full run, writes BENCHMARKS.md
//! cargo run --release -p deeprecall-bench -- --quick   # smoke-sized, writes BENCHMARKS-quick.md
//! cargo run --release -p deeprecall-bench -- --quick --no-write   # CI: writes nothing
//! ```
//!
//! It builds the server in release mode, starts a throwaway Postgres 15 cluster (durable settings) and the
//! server as a child process, measures, prints a table and tears everything down (also on error).

mod env;
mod live;
mod load;
mod memory;
mod read;
mod snapshot;
mod stats;
mod write;
mod ws;

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::Parser;

use env::Env;

/// Benchmark deeprecall-sync against PostgreSQL's own tools on this machine.
#[derive(Debug, Parser)]
#[command(name = "deeprecall-bench", version, about)]
struct Args {
    /// Smoke-test sizes (about 10x smaller); writes BENCHMARKS-quick.md instead of BENCHMARKS.md.
    #[arg(long)]
    quick: bool,
    /// Write no file (print the table only).
    #[arg(long)]
    no_write: bool,
    /// Run only these measurements (for investigating one; implies --no-write).
    #[arg(long, value_delimiter = ',', value_parser = ["write", "snapshot", "read", "live", "memory"])]
    only: Vec<String>,
}

impl Args {
    fn wants(&self, phase: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == phase)
    }
}

/// Sizes of one run.
#[derive(Debug, Clone)]
struct Sizes {
    /// (batch size, rows per side).
    write: Vec<(usize, usize)>,
    read_users: usize,
    read_rows: usize,
    probe_rate: f64,
    probe_secs: f64,
    /// Idle users in the "1k connected" latency stage.
    mid_idle: usize,
    /// Idle users in the "10k connected" latency stage and the large fan-out stage.
    big_idle: usize,
    fanout_rows: usize,
    memory: Vec<usize>,
    snapshot_rows: usize,
}

/// Active (reading) users in the latency and fan-out stages beyond the first.
const ACTIVE: usize = 10;

impl Sizes {
    fn full() -> Self {
        Self {
            write: vec![(1, 4_000), (100, 100_000), (1000, 100_000)],
            read_users: 1000,
            read_rows: 200_000,
            probe_rate: 50.0,
            probe_secs: 5.0,
            mid_idle: 990,
            big_idle: 10_000,
            fanout_rows: 20_000,
            memory: vec![10_000, 50_000],
            snapshot_rows: 100_000,
        }
    }

    fn quick() -> Self {
        Self {
            write: vec![(1, 400), (100, 10_000), (1000, 10_000)],
            read_users: 100,
            read_rows: 20_000,
            probe_rate: 50.0,
            probe_secs: 2.0,
            mid_idle: 90,
            big_idle: 1000,
            fanout_rows: 2_000,
            memory: vec![1_000, 5_000],
            snapshot_rows: 10_000,
        }
    }
}

/// One line of the table.
#[derive(Debug, Clone)]
struct Row {
    measure: String,
    ours: String,
    pg: String,
    ratio: String,
    target: String,
    met: Option<bool>,
}

impl Row {
    fn new(measure: impl Into<String>, ours: impl Into<String>, pg: impl Into<String>) -> Self {
        Self {
            measure: measure.into(),
            ours: ours.into(),
            pg: pg.into(),
            ratio: "—".into(),
            target: "—".into(),
            met: None,
        }
    }

    fn ratio(mut self, ratio: f64, target: &str, met: bool) -> Self {
        self.ratio = format!("{ratio:.2}×");
        self.target = target.into();
        self.met = Some(met);
        self
    }

    fn target(mut self, target: &str, met: bool) -> Self {
        self.target = target.into();
        self.met = Some(met);
        self
    }
}

/// Everything a run produced.
#[derive(Debug, Default)]
struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
    failures: Vec<String>,
}

fn fmt_rate(x: f64) -> String {
    if x >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else {
        format!("{x:.0}")
    }
}

fn ms3((a, b, c): (f64, f64, f64)) -> String {
    format!("{a:.1} / {b:.1} / {c:.1} ms")
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let limit = if args.quick {
        Duration::from_secs(8 * 60)
    } else {
        Duration::from_secs(20 * 60)
    };
    let result = runtime.block_on(async {
        match tokio::time::timeout(limit, run(&args)).await {
            Ok(r) => r,
            Err(_) => Err(anyhow::anyhow!(
                "the benchmark exceeded its {limit:?} limit and was stopped"
            )),
        }
    });
    // Child processes are killed and the cluster stopped by the drops inside `run`; shut the runtime down
    // without waiting for stray tasks.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs every measurement; Ok(false) when some measurement failed (the others still ran).
async fn run(args: &Args) -> anyhow::Result<bool> {
    let sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    let started = Instant::now();
    let server_bin = tokio::task::spawn_blocking(env::build_server).await??;
    let nofile = env::raise_nofile(200_000);
    let mut report = Report::default();
    report.notes.push(format!(
        "RLIMIT_NOFILE raised to {nofile} (inherited by the server)."
    ));
    eprintln!("[bench] starting Postgres and deeprecall-sync");
    let mut env = Env::start(server_bin).await?;
    let pg_version = std::process::Command::new(env.cluster.bindir().join("postgres"))
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "unknown".into());

    if args.wants("write") {
        phase(&mut report, "write path", write_phase(&env, &sizes)).await;
        ensure_server(&mut env, &mut report).await;
    }
    if args.wants("snapshot") {
        phase(&mut report, "snapshot", snapshot_phase(&env, &sizes)).await;
        ensure_server(&mut env, &mut report).await;
    }
    if args.wants("read") {
        phase(
            &mut report,
            "read throughput",
            throughput_phase(&mut env, &sizes),
        )
        .await;
        ensure_server(&mut env, &mut report).await;
    }
    if args.wants("live") {
        phase(&mut report, "latency and fan-out", live_phase(&env, &sizes)).await;
        ensure_server(&mut env, &mut report).await;
    }
    if args.wants("memory") {
        phase(
            &mut report,
            "memory",
            memory_phase(&mut env, &sizes, nofile),
        )
        .await;
    }

    let elapsed = started.elapsed();
    if let Err(e) = env.stop_server().await {
        report.notes.push(format!("stopping the server: {e:#}"));
    }
    drop(env);

    let table = render_table(&report.rows);
    println!("\n{table}");
    for n in &report.notes {
        println!("- {n}");
    }
    for f in &report.failures {
        println!("FAILED: {f}");
    }
    println!("total time: {:.0} s", elapsed.as_secs_f64());
    if !args.no_write && args.only.is_empty() {
        let file = if args.quick {
            "BENCHMARKS-quick.md"
        } else {
            "BENCHMARKS.md"
        };
        let path = env::workspace_root().join(file);
        let doc = render_doc(args, &sizes, &report, &table, &pg_version, elapsed);
        std::fs::write(&path, doc)?;
        println!("wrote {}", path.display());
    }
    Ok(report.failures.is_empty())
}

async fn phase(
    report: &mut Report,
    name: &str,
    f: impl std::future::Future<Output = anyhow::Result<(Vec<Row>, Vec<String>)>>,
) {
    eprintln!("[bench] {name}");
    let began = Instant::now();
    match f.await {
        Ok((rows, notes)) => {
            report.rows.extend(rows);
            report.notes.extend(notes);
        }
        Err(e) => {
            eprintln!("[bench] {name} failed: {e:#}");
            report.failures.push(format!("{name}: {e:#}"));
        }
    }
    eprintln!("[bench] {name}: {:.1} s", began.elapsed().as_secs_f64());
}

async fn ensure_server(env: &mut Env, report: &mut Report) {
    if env.server_pid().is_err()
        && let Err(e) = env.spawn_server().await
    {
        report
            .failures
            .push(format!("restarting the server: {e:#}"));
    }
}

async fn write_phase(env: &Env, sizes: &Sizes) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    for &(batch, total) in &sizes.write {
        let r = write::run(env, batch, total).await?;
        let ratio = r.api_rows_s / r.pg_rows_s;
        rows.push(
            Row::new(
                format!(
                    "batch write, {batch} op(s)/request, 4 clients: rows/s (p50 / p99 request)"
                ),
                format!(
                    "{} ({:.1} / {:.1} ms)",
                    fmt_rate(r.api_rows_s),
                    r.api_p50_ms,
                    r.api_p99_ms
                ),
                format!(
                    "{} (pgbench, avg {:.1} ms)",
                    fmt_rate(r.pg_rows_s),
                    r.pg_latency_ms
                ),
            )
            .ratio(ratio, "≥ 0.7×", ratio >= 0.7),
        );
        notes.push(format!("write batch {batch}: {} rows per side.", r.rows));
    }
    Ok((rows, notes))
}

async fn snapshot_phase(env: &Env, sizes: &Sizes) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let r = snapshot::run(env, sizes.snapshot_rows).await?;
    let ratio = r.api_secs / r.copy_secs;
    Ok((
        vec![
            Row::new(
                format!("initial snapshot, {} rows, one subscriber: time", r.rows),
                format!("{:.0} ms", r.api_secs * 1e3),
                format!("{:.0} ms (COPY TO STDOUT)", r.copy_secs * 1e3),
            )
            .ratio(ratio, "≤ 2×", ratio <= 2.0),
        ],
        vec![format!(
            "snapshot: best of 3 each; COPY produced {:.1} MB of text, the stream JSON frames of 500 rows.",
            r.copy_bytes as f64 / 1e6
        )],
    ))
}

async fn throughput_phase(env: &mut Env, sizes: &Sizes) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let r = read::throughput(env, sizes.read_users, sizes.read_rows).await?;
    let api = r.rows as f64 / r.api_secs;
    let pg = r.rows as f64 / r.pg_secs;
    let ratio = api / pg;
    Ok((
        vec![
            Row::new(
                format!(
                    "read throughput, {} rows backlog, {} subscribers: rows/s delivered",
                    r.rows, r.users
                ),
                format!("{} ({:.2} s)", fmt_rate(api), r.api_secs),
                format!("{} (pg_recvlogical, {:.2} s)", fmt_rate(pg), r.pg_secs),
            )
            .ratio(ratio, "≥ 0.6×", ratio >= 0.6),
        ],
        vec![format!(
            "read throughput: {} of {} clients got a final up_to_date at shutdown; {} subscriptions got must_refetch on resume (counted rows then came from a snapshot).",
            r.final_offsets, r.users, r.refetches
        )],
    ))
}

async fn live_phase(env: &Env, sizes: &Sizes) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let mut rows = Vec::new();
    let mut notes = Vec::new();
    let mut live = live::Live::start(env).await?;
    let result = async {
        let count = (sizes.probe_rate * sizes.probe_secs) as usize;
        let mut latency_row = |r: &live::LatencyResult, rows: &mut Vec<Row>, last: bool| {
            let ratio = r.api.0 / r.pg.0.max(0.001);
            let mut row = Row::new(
                format!(
                    "commit → client p50 / p95 / p99, {} connected ({} probes at {}/s)",
                    r.connected, r.probes, sizes.probe_rate
                ),
                ms3(r.api),
                format!("{} (pg_recvlogical)", ms3(r.pg)),
            );
            row = if last {
                row.ratio(ratio, "p50 ≤ 3×", ratio <= 3.0)
            } else {
                row.ratio(ratio, "—", true)
            };
            row.met = if last { row.met } else { None };
            rows.push(row);
            if last {
                rows.push(
                    Row::new(
                        format!("commit → client p99, {} connected", r.connected),
                        format!("{:.1} ms", r.api.2),
                        format!("{:.1} ms", r.pg.2),
                    )
                    .target("≤ 25 ms", r.api.2 <= 25.0),
                );
            }
            if r.missing != (0, 0) {
                notes.push(format!(
                    "latency with {} connected: {} probes never reached the client, {} never reached pg_recvlogical.",
                    r.connected, r.missing.0, r.missing.1
                ));
            }
        };
        live.add_active(env, 1).await?;
        let r = live.latency(env, sizes.probe_rate, count).await?;
        latency_row(&r, &mut rows, false);

        live.add_active(env, ACTIVE - 1).await?;
        live.grow_idle(env, ACTIVE).await?;
        let small = live.fanout(env, sizes.fanout_rows).await?;

        live.grow_idle(env, sizes.mid_idle).await?;
        let r = live.latency(env, sizes.probe_rate, count).await?;
        latency_row(&r, &mut rows, false);

        live.grow_idle(env, sizes.big_idle).await?;
        let r = live.latency(env, sizes.probe_rate, count).await?;
        latency_row(&r, &mut rows, true);
        let big = live.fanout(env, sizes.fanout_rows).await?;

        let ratio = big.us_per_change() / small.us_per_change();
        rows.push(
            Row::new(
                format!(
                    "server CPU per routed change, {} rows over {ACTIVE} active users, {} vs {} idle users",
                    big.rows, big.idle, small.idle
                ),
                format!("{:.1} µs ({} idle)", big.us_per_change(), big.idle),
                format!("{:.1} µs ({} idle; baseline, not Postgres)", small.us_per_change(), small.idle),
            )
            .ratio(ratio, "≤ 1.2×", ratio <= 1.2),
        );
        anyhow::Ok(())
    }
    .await;
    let finished = live.finish(env).await;
    result?;
    finished?;
    notes.push("fan-out at 100k idle users: not measured (one 2-core machine cannot hold 100k client and 100k server sockets next to Postgres within the time box).".into());
    Ok((rows, notes))
}

async fn memory_phase(
    env: &mut Env,
    sizes: &Sizes,
    nofile: u64,
) -> anyhow::Result<(Vec<Row>, Vec<String>)> {
    let mut notes = Vec::new();
    // A fresh server, so memory freed by earlier phases does not hide growth.
    env.stop_server().await?;
    env.spawn_server().await?;
    let cap = (nofile as usize).saturating_sub(2_000);
    let targets: Vec<usize> = sizes.memory.iter().map(|&n| n.min(cap)).collect();
    if targets != sizes.memory {
        notes.push(format!(
            "memory: connection counts capped to {targets:?} by RLIMIT_NOFILE {nofile} (the hard limit cannot be raised without CAP_SYS_RESOURCE; the server needs one descriptor per connection)."
        ));
    }
    let r = match memory::run(env, &targets).await {
        Ok(r) => r,
        Err(e) => {
            let stats = env.replication_stats().await;
            return Err(e.context(format!("server replication stats: {stats}")));
        }
    };
    let rows = r
        .points
        .iter()
        .map(|p| {
            Row::new(
                format!(
                    "server memory per idle connection, {} connections",
                    p.connections
                ),
                format!("{:.1} KiB", p.kib_per_conn()),
                "—",
            )
            .target("≤ 10 KiB", p.kib_per_conn() <= 10.0)
        })
        .collect();
    notes.push(format!(
        "memory: baseline RSS {} MiB after 200 warm-up connections; growth {}.",
        r.base_kib / 1024,
        r.points
            .iter()
            .map(|p| format!("{} MiB at {}", p.growth_kib / 1024, p.connections))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok((rows, notes))
}

fn render_table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| measure | deeprecall-sync | postgres | ratio | target | met? |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "—",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} |",
            r.measure, r.ours, r.pg, r.ratio, r.target, met
        );
    }
    s
}

fn machine() -> (String, usize, String) {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned())
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<f64>().ok())
        .map(|k| format!("{:.1} GiB", k / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    (cpu, cores, mem)
}

fn render_doc(
    args: &Args,
    sizes: &Sizes,
    report: &Report,
    table: &str,
    pg_version: &str,
    elapsed: Duration,
) -> String {
    let (cpu, cores, mem) = machine();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let command = if args.quick {
        "cargo run --release -p deeprecall-bench -- --quick"
    } else {
        "cargo run --release -p deeprecall-bench"
    };
    let mut s = String::new();
    let _ = writeln!(s, "# Benchmarks\n");
    if args.quick {
        let _ = writeln!(
            s,
            "**Quick (smoke-sized) run: figures are indicative only; BENCHMARKS.md holds the full run.**\n"
        );
    }
    let _ = writeln!(
        s,
        "deeprecall-sync measured side by side with what PostgreSQL itself does on the same machine, in the same \
         run; each figure is reported as a ratio. Produced by one command (about {:.0} s for this run):\n",
        elapsed.as_secs_f64()
    );
    let _ = writeln!(s, "```\n{command}\n```\n");
    let _ = writeln!(s, "- date: {date}");
    let _ = writeln!(
        s,
        "- CPU: {cpu}, {cores} cores (shared, noisy virtual machine)"
    );
    let _ = writeln!(s, "- memory: {mem}");
    let _ = writeln!(
        s,
        "- PostgreSQL: {pg_version}, throwaway cluster, durable settings (fsync on, synchronous_commit on), shared_buffers 512MB"
    );
    let _ = writeln!(
        s,
        "- server: release build, `serve --pool-size 16 --max-ops-per-batch 1000 --max-connections 200000`, RUST_LOG=warn\n"
    );
    let _ = writeln!(s, "{table}");
    if !report.notes.is_empty() {
        let _ = writeln!(s, "Notes from this run:\n");
        for n in &report.notes {
            let _ = writeln!(s, "- {n}");
        }
        let _ = writeln!(s);
    }
    if !report.failures.is_empty() {
        let _ = writeln!(s, "Failed measurements:\n");
        for f in &report.failures {
            let _ = writeln!(s, "- {f}");
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(s, "{}", method(sizes));
    s
}

fn method(sizes: &Sizes) -> String {
    let writes = sizes
        .write
        .iter()
        .map(|(b, r)| format!("{r} rows at batch {b}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "## Method

Everything runs on one machine: the benchmark process (clients), the server (child process) and Postgres share
the cores, so every figure includes the cost of its own clients. `bench/` is the code; the command above is the
only entry point. It raises RLIMIT_NOFILE (root may raise the hard limit; otherwise the soft limit goes up to the
hard one) before spawning the server, which inherits it. WebSocket clients connect from 127.0.0.2–127.0.0.33 so
ephemeral ports do not run out. Every wait is bounded; on any error the server is killed and the cluster stopped.

- **Write path.** 4 clients, 4 users, each sending `POST /v1/batch` requests back to back (one keep-alive HTTP/1.1
  connection per client) with N `insert` ops on `annotations` (client ids, 100-character `body`, `page`,
  `geometry` `{{\"x\":1}}`); bodies are built before the clock starts; 2 warm-up requests per client are not counted.
  rows/s = rows / wall time of the slowest client; p50/p99 are per request. Postgres side: `pgbench -n -c 4 -j 2`
  with a script of `begin; select set_config('role','deeprecall_user',true), set_config('app.user_id', <user of
  :client_id>, true); insert … select gen_random_uuid(), 'note', <same body>, 1, '{{\"x\":1}}' from
  generate_series(1, N); commit;`, the same 4 users, the same role and RLS policy; rows/s = tps × N. The server
  additionally records each op_id in `sync_applied_ops` (idempotency), parses JSON and answers per op: that is
  the cost being measured. Sizes: {writes}.
- **Read throughput.** {users} users, one WebSocket subscriber each on `annotations` (no `where`), all
  `up_to_date`. A second slot `bench_recv` (pgoutput) is created; the server is stopped with SIGTERM (clients
  receive their final `up_to_date` offset, then close 1001); {rows} rows are inserted in SQL, 100 rows per
  transaction, each transaction for one user round-robin; `pg_current_wal_lsn()` is noted. The server is spawned
  again, every client reconnects (200 at a time) and resumes from its offset; the clock runs from the spawn until
  every client has counted all its rows (rows are counted by scanning frames, not by building objects). Then
  `pg_recvlogical --slot bench_recv --start -o proto_version=1 -o publication_names=deeprecall_sync --endpos
  <lsn> -f /dev/null` is timed. Both drain the same WAL backlog from a cold start (process start, connection,
  decoding); the server additionally routes by owner, converts to JSON and writes to {users} sockets whose
  clients run on the same cores.
- **Commit → client latency.** One writer inserts a 1-row transaction at {rate}/s for {secs} s per stage into
  a random active user (autocommit, superuser, explicit owner); the row's `body` starts with a unique marker
  `probe-NNNNNN-`. Latency = time the marker arrived at a subscriber − time the writer's COMMIT returned (same
  process clock; a marker that arrives before COMMIT returns counts 0). Side by side, `pg_recvlogical -f -` on a
  third slot (`bench_lat`) runs for the whole stage; its stdout (binary pgoutput) is scanned for the same markers.
  Stages: 1 connected user; then {active} active + {mid} idle; then {active} active + {big} idle. Idle users are
  connected, authenticated and subscribed to `annotations` (up to date), and receive nothing. 3 warm-up probes
  per stage are not counted. The p50 ratio (target ≤ 3×) and the absolute p99 (≤ 25 ms) apply to the largest
  stage; smaller stages are shown for context.
- **Fan-out cost.** While {fan} rows (10 per transaction, the {active} active users round-robin, 2 SQL writers)
  flow to the active subscribers, the server's CPU time (utime + stime from `/proc/<pid>/stat`, `getconf
  CLK_TCK`) is read before the load and after the last row arrived; divided by the rows routed. Done with 10 idle
  users and with {big} idle users (same server, same load); the ratio is large ÷ small. 100k idle users was not
  attempted on 2 cores.
- **Memory per idle connection.** On a freshly started server, 200 warm-up idle connections are opened and the
  server's VmRSS (`/proc/<pid>/status`) is the baseline; then idle connections are opened (200 at a time), each
  authenticated with its own user's token and holding one subscription to `boards` (no rows) that reached
  `up_to_date`, up to {mem:?} connections; 2 s later VmRSS is read again. KiB per connection = growth ÷ connections
  opened after the baseline. The client keeps only each TCP socket (the WebSocket state is dropped after
  `up_to_date`).
- **Initial snapshot.** {snap} rows for one user are inserted in SQL; the clock starts once the server's slot has
  confirmed past them (so the snapshot's barrier does not wait for the load to be routed). deeprecall-sync: from
  sending `subscribe` to receiving `up_to_date` with every row counted. Postgres: `COPY (select * from annotations
  where owner_id = '<user>') TO STDOUT` through tokio-postgres `copy_out`, drained. Best of 3 each.

Not measured: fan-out with 100k idle users (2 cores); CPU profiles (`perf` is not available here) — where a
target is missed, the notes above and the table give the observable evidence (timings and `/proc` CPU time).
",
        users = sizes.read_users,
        rows = sizes.read_rows,
        rate = sizes.probe_rate,
        secs = sizes.probe_secs,
        active = ACTIVE,
        mid = sizes.mid_idle,
        big = sizes.big_idle,
        fan = sizes.fanout_rows,
        mem = sizes.memory,
        snap = sizes.snapshot_rows,
    )
}
