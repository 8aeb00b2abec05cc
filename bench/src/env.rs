//! The benchmark's environment: a throwaway Postgres cluster, the release server as a child process, tokens,
//! and what `/proc` says about the server.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use deeprecall_sync::auth::{AuthConfig, KeySource};
use deeprecall_sync::pgcluster::{
    ClusterOptions, LocalCluster, free_port, random_token, run_after_process_exits, shell_quote,
};
use uuid::Uuid;

/// The database the server and the benchmark use.
pub(crate) const DATABASE: &str = "deeprecall";
/// The server's replication slot (its default).
pub(crate) const SERVER_SLOT: &str = "deeprecall_sync";
/// The server's publication.
pub(crate) const PUBLICATION: &str = "deeprecall_sync";

/// A running server process.
#[derive(Debug)]
pub(crate) struct ServerProc {
    child: tokio::process::Child,
    /// Its process id.
    pub(crate) pid: u32,
}

/// Everything the measurements share. Dropping it kills the server and stops the cluster (in that order).
#[derive(Debug)]
pub(crate) struct Env {
    // Field order is drop order: server before cluster.
    server: Option<ServerProc>,
    /// The cluster (Postgres 15 from the installed binaries).
    pub(crate) cluster: LocalCluster,
    /// Token minting (same secret as the server's).
    pub(crate) auth: AuthConfig,
    secret: String,
    /// Port the server listens on (127.0.0.1).
    pub(crate) port: u16,
    server_bin: PathBuf,
    /// Scratch directory (pgbench scripts), removed on drop.
    pub(crate) scratch: PathBuf,
    /// Clock ticks per second for /proc CPU times.
    pub(crate) clk_tck: f64,
    /// How long making the WAL segments took ([`prepare_wal`]).
    pub(crate) wal_warmup: Duration,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

/// `Drop` stops the server and the cluster and removes the scratch directory when the benchmark ends or fails, but a
/// Ctrl-C, SIGTERM or SIGKILL ends the process without it: the cluster (its own process group, so even Ctrl-C does not
/// reach it) then ran on with 512 MB of shared buffers and 4 GiB of WAL made ready in /tmp, and a killed run's server
/// kept retrying it. A detached shell does the same cleanup once this process has gone, whichever way. It checks once
/// a second, not more often: it runs beside every measurement.
fn clean_up_after_a_kill(cluster: &LocalCluster, port: u16, scratch: &Path) -> anyhow::Result<()> {
    // Every server this run starts listens here. `[-]` keeps the pattern from matching this shell's own command line.
    let server = format!("'[-]-listen 127[.]0[.]0[.]1:{port}( |$)'");
    let script = format!(
        "pkill -TERM -f {server}; i=0; \
         while pgrep -f {server} >/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done; \
         pkill -KILL -f {server}; {}; rm -rf {}",
        cluster.teardown_script(),
        shell_quote(scratch)
    );
    run_after_process_exits(std::process::id(), Duration::from_secs(1), &script)
        .context("starting the benchmark's cleanup watcher")
}

/// Raises RLIMIT_NOFILE (inherited by the server child): to `want` when allowed (root may raise the hard limit),
/// else the soft limit to the hard one. Returns the resulting soft limit.
pub(crate) fn raise_nofile(want: u64) -> u64 {
    use rlimit::Resource;
    let (soft, hard) = rlimit::getrlimit(Resource::NOFILE).unwrap_or((1024, 1024));
    if soft >= want {
        return soft;
    }
    if rlimit::setrlimit(Resource::NOFILE, want, want.max(hard)).is_ok() {
        return want;
    }
    rlimit::increase_nofile_limit(want).unwrap_or(soft)
}

/// The workspace root (this crate's parent directory).
pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Builds the server in release mode and returns its path (next to this executable).
pub(crate) fn build_server() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "deeprecall-sync",
            "--bin",
            "deeprecall-sync",
        ])
        .current_dir(workspace_root())
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("cargo build of the server failed: {status}");
    }
    let exe = std::env::current_exe().context("locating the benchmark executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    let bin = dir.join("deeprecall-sync");
    if !bin.is_file() {
        bail!(
            "{} not found (run the benchmark with `cargo run --release -p deeprecall-bench`)",
            bin.display()
        );
    }
    Ok(bin)
}

impl Env {
    /// Starts the cluster (durable settings), creates the database, and starts the server.
    pub(crate) async fn start(server_bin: PathBuf) -> anyhow::Result<Self> {
        let options = ClusterOptions {
            ephemeral: false,
            extra_settings: vec![
                ("shared_buffers".into(), "'512MB'".into()),
                ("max_connections".into(), "300".into()),
                ("max_wal_senders".into(), "20".into()),
                ("max_replication_slots".into(), "20".into()),
                ("max_wal_size".into(), "'4GB'".into()),
                // Keep as many finished WAL segments for reuse as the benchmark writes between checkpoints; with
                // `prepare_wal` below, no segment is created while anything is measured (see there).
                ("min_wal_size".into(), "'4GB'".into()),
            ],
        };
        let cluster = tokio::task::spawn_blocking(move || LocalCluster::start_temporary(&options))
            .await?
            .context("starting the throwaway Postgres cluster")?;
        let admin = connect(&cluster.url("postgres")).await?;
        admin
            .batch_execute(&format!("create database {DATABASE}"))
            .await
            .context("creating the database")?;
        let wal_warmup = prepare_wal(&admin).await?;
        drop(admin);
        let secret = random_token(48);
        let auth = AuthConfig::new(
            vec![KeySource::Secret(secret.clone().into_bytes())],
            None,
            None,
            "role".into(),
            "admin".into(),
        )?;
        let scratch = std::env::temp_dir().join(format!("deeprecall-bench-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&scratch)?;
        let clk_tck = std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(100.0);
        let port = free_port()?;
        clean_up_after_a_kill(&cluster, port, &scratch)?;
        let mut env = Self {
            server: None,
            cluster,
            auth,
            secret,
            port,
            server_bin,
            scratch,
            clk_tck,
            wal_warmup,
        };
        env.spawn_server().await?;
        Ok(env)
    }

    /// The database URL (superuser).
    pub(crate) fn db_url(&self) -> String {
        self.cluster.url(DATABASE)
    }

    /// A new superuser connection to the database.
    pub(crate) async fn sql(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.db_url()).await
    }

    /// `http://127.0.0.1:<port>`.
    pub(crate) fn base(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A token for `user`, valid for a day.
    pub(crate) fn token(&self, user: Uuid) -> String {
        self.auth
            .mint(user, false, 86_400)
            .expect("the benchmark's auth config has a secret")
    }

    /// The running server's pid.
    pub(crate) fn server_pid(&self) -> anyhow::Result<u32> {
        self.server
            .as_ref()
            .map(|s| s.pid)
            .context("the server is not running")
    }

    /// Spawns the server and waits (at most 60 s) until `/readyz` answers 200. Returns the spawn instant.
    pub(crate) async fn spawn_server(&mut self) -> anyhow::Result<Instant> {
        if self.server.is_some() {
            bail!("the server is already running");
        }
        let mut cmd = tokio::process::Command::new(&self.server_bin);
        cmd.arg("serve")
            .arg("--database-url")
            .arg(self.db_url())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--jwt-secret")
            .arg(&self.secret)
            .args([
                "--migrate",
                "--max-connections",
                "200000",
                "--max-ops-per-batch",
                "1000",
                "--pool-size",
                "16",
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let spawned = Instant::now();
        let child = cmd.spawn().context("spawning deeprecall-sync")?;
        let pid = child.id().context("server pid")?;
        self.server = Some(ServerProc { child, pid });
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .build()?;
        let url = format!("{}/readyz", self.base());
        let deadline = spawned + Duration::from_secs(60);
        loop {
            if let Some(s) = self.server.as_mut()
                && let Some(status) = s.child.try_wait()?
            {
                self.server = None;
                bail!("deeprecall-sync exited during startup: {status}");
            }
            if let Ok(r) = http.get(&url).send().await
                && r.status() == 200
            {
                return Ok(spawned);
            }
            if Instant::now() > deadline {
                bail!("deeprecall-sync did not become ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Sends SIGTERM (graceful shutdown) and waits up to 30 s for the process to exit, then kills it.
    pub(crate) async fn stop_server(&mut self) -> anyhow::Result<()> {
        let Some(mut s) = self.server.take() else {
            return Ok(());
        };
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &s.pid.to_string()])
            .status();
        match tokio::time::timeout(Duration::from_secs(30), s.child.wait()).await {
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = s.child.kill().await;
                bail!("deeprecall-sync did not exit within 30 s of SIGTERM (killed)")
            }
        }
    }

    /// An admin token and an HTTP client for the server's admin endpoints, for one call or a whole wait.
    fn admin(&self) -> anyhow::Result<Admin> {
        Ok(Admin {
            token: self
                .auth
                .mint(Uuid::new_v4(), true, 600)
                .context("no admin token")?,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?,
            base: self.base(),
        })
    }

    /// `GET <path>` on the server with an admin token: the body as text, whatever the status.
    async fn admin_get(&self, path: &str) -> anyhow::Result<String> {
        self.admin()?.get(path).await
    }

    /// Changes the server has decoded from its slot and routed so far (`/v1/admin/stats`, `stream.changes_total`):
    /// every row written to a synced table is one.
    pub(crate) async fn routed_changes(&self) -> anyhow::Result<u64> {
        let text = self.admin_get("/v1/admin/stats").await?;
        changes_total(&text)
    }

    /// Waits (at most `limit`) until the server has routed `target` changes in all ([`Self::routed_changes`]),
    /// polling every 5 ms, and returns when it saw them. One admin token and HTTP client for the whole wait.
    pub(crate) async fn wait_routed(
        &self,
        target: u64,
        limit: Duration,
    ) -> anyhow::Result<Instant> {
        let admin = &self.admin()?;
        self.poll_server(
            &format!("it to route {target} changes"),
            limit,
            Duration::from_millis(5),
            || async move { Ok(changes_total(&admin.get("/v1/admin/stats").await?)? >= target) },
        )
        .await
    }

    /// Calls `done` every `every` until it says yes, and returns when it did; fails after `limit`, or at once if
    /// the server exits meanwhile (`waiting_for` names what it waits for, in the error).
    async fn poll_server<F, Fut>(
        &self,
        waiting_for: &str,
        limit: Duration,
        every: Duration,
        mut done: F,
    ) -> anyhow::Result<Instant>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<bool>>,
    {
        let deadline = Instant::now() + limit;
        loop {
            if done().await? {
                return Ok(Instant::now());
            }
            if self.server_exited() {
                bail!("deeprecall-sync exited while the benchmark waited for {waiting_for}");
            }
            if Instant::now() > deadline {
                bail!("the benchmark waited {limit:?} for {waiting_for}, in vain");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// `GET /v1/admin/replication` (admin token) as text, for diagnostics.
    pub(crate) async fn replication_stats(&self) -> String {
        self.admin_get("/v1/admin/replication")
            .await
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// Stream connections the server holds open (`/v1/admin/stats`, `stream.connections`).
    pub(crate) async fn stream_connections(&self) -> anyhow::Result<u64> {
        let text = self.admin_get("/v1/admin/stats").await?;
        serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|stats| stats["stream"]["connections"].as_u64())
            .with_context(|| format!("no stream.connections in /v1/admin/stats: {text}"))
    }

    /// The cluster's postmaster: the first line of its `postmaster.pid`.
    pub(crate) fn postmaster_pid(&self) -> anyhow::Result<u32> {
        let path = self.cluster.base_dir().join("data").join("postmaster.pid");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        text.lines()
            .next()
            .and_then(|pid| pid.trim().parse().ok())
            .with_context(|| format!("no pid in {}", path.display()))
    }

    /// The machine now, with the cluster's and the server's processes.
    pub(crate) fn machine_now(&self) -> anyhow::Result<crate::machine::Snapshot> {
        crate::machine::Snapshot::now(Some(crate::machine::Watched {
            postmaster: self.postmaster_pid()?,
            server: self.server_pid()?,
        }))
    }

    /// Server CPU seconds so far (user + system).
    pub(crate) fn server_cpu_secs(&self) -> anyhow::Result<f64> {
        let ticks = crate::machine::process_ticks(self.server_pid()?)?;
        Ok(ticks.own as f64 / self.clk_tck)
    }

    /// The server this benchmark started has exited (it is a zombie until waited for, or gone): a wait for it to
    /// catch up then fails at once instead of after its limit.
    fn server_exited(&self) -> bool {
        self.server
            .as_ref()
            .is_some_and(|server| crate::machine::has_exited(server.pid))
    }

    /// Server resident memory in KiB.
    pub(crate) fn server_rss_kib(&self) -> anyhow::Result<u64> {
        crate::machine::rss_kib(self.server_pid()?)
    }

    /// Waits (at most `limit`) until the server's slot has confirmed `lsn`: everything before it was routed.
    pub(crate) async fn wait_server_caught_up(
        &self,
        client: &tokio_postgres::Client,
        lsn: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        self.poll_server(
            &format!("its slot to reach {lsn}"),
            limit,
            Duration::from_millis(20),
            || async {
                let row = client
                    .query_one(
                        // No row yet right after the server started (its replicator creates the slot): not caught up.
                        "select coalesce(bool_or(confirmed_flush_lsn >= $2::text::pg_lsn), false)
                           from pg_replication_slots where slot_name = $1",
                        &[&SERVER_SLOT, &lsn],
                    )
                    .await?;
                Ok(row.get::<_, bool>(0))
            },
        )
        .await
        .map(|_| ())
    }

    /// `PGPASSWORD`-style environment and `-h/-p/-U` arguments for the Postgres client tools.
    pub(crate) fn pg_tool(&self, tool: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new(self.cluster.bindir().join(tool));
        cmd.env("PGPASSWORD", self.cluster.password())
            .env_remove("PGSERVICE")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        cmd
    }

    /// A libpq conninfo string for the database (password from PGPASSWORD).
    pub(crate) fn conninfo(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={DATABASE}",
            self.cluster.port()
        )
    }
}

/// WAL segments made before anything is measured (`min_wal_size` ÷ 16 MiB).
pub(crate) const PREPARED_WAL_SEGMENTS: u32 = 256;

/// Makes the cluster's WAL segments once, before the server (and its slot) exists, so that no benchmark pays for
/// a new one.
///
/// A fresh cluster has almost no WAL segments. Until a checkpoint has finished and renamed old segments for
/// reuse, every 16 MiB of WAL makes the committing backend create the next segment: 16 MiB of zeros
/// (`wal_init_zero`), an fsync and a rename, while every other commit waits for it. On this machine, at 100 rows
/// per transaction (a new segment every 0.4 s), that stalled every client at once, on whichever side was running,
/// for 50-170 ms at about a third of the switches. It was the whole of the write benchmark's p99 tail: in one
/// traced run (2026-12-03), 40 of the 41 stalls of requests or transactions over 25 ms had a segment switch
/// inside them. A deployment's long-running cluster reuses its segments, so a benchmark
/// that creates them while it measures reports a tail that production does not have. Here each round writes one
/// WAL record and switches segments (`pg_logical_emit_message` writes it at once, outside a transaction; no slot
/// exists yet to decode it); the checkpoint then keeps the finished segments for reuse (`min_wal_size`).
async fn prepare_wal(admin: &tokio_postgres::Client) -> anyhow::Result<Duration> {
    let started = Instant::now();
    for _ in 0..PREPARED_WAL_SEGMENTS {
        admin
            .batch_execute(
                "select pg_logical_emit_message(false, 'deeprecall-bench-wal', '');
                 select pg_switch_wal();",
            )
            .await
            .context("preparing WAL segments")?;
    }
    admin
        .batch_execute("checkpoint")
        .await
        .context("checkpoint after preparing WAL segments")?;
    Ok(started.elapsed())
}

/// Connects with tokio-postgres (no TLS) and drives the connection in a task.
pub(crate) async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, conn) = tokio::time::timeout(
        Duration::from_secs(30),
        tokio_postgres::connect(url, tokio_postgres::NoTls),
    )
    .await
    .context("connecting to Postgres timed out")?
    .context("connecting to Postgres")?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(client)
}

/// `pg_current_wal_lsn()` as text.
pub(crate) async fn current_lsn(client: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(client
        .query_one("select pg_current_wal_lsn()::text", &[])
        .await?
        .get(0))
}

/// What the admin endpoints are called with ([`Env::admin`]).
struct Admin {
    token: String,
    client: reqwest::Client,
    /// The server's base URL.
    base: String,
}

impl Admin {
    /// `GET <path>`: the body as text, whatever the status.
    async fn get(&self, path: &str) -> anyhow::Result<String> {
        Ok(self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await?
            .text()
            .await?)
    }
}

/// `stream.changes_total` of a `/v1/admin/stats` answer.
fn changes_total(stats: &str) -> anyhow::Result<u64> {
    serde_json::from_str::<serde_json::Value>(stats)
        .ok()
        .and_then(|stats| stats["stream"]["changes_total"].as_u64())
        .with_context(|| format!("no stream.changes_total in /v1/admin/stats: {stats}"))
}
