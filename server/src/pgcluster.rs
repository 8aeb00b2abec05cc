//! A local PostgreSQL cluster started from the installed server binaries.
//!
//! Used by `deeprecall-sync dev` (a persistent cluster under `./.deeprecall/`) and by the integration tests (a
//! throwaway cluster in a temp dir, stopped and removed on drop, even when the test panics).
//!
//! Why by hand: `pgtemp` shells out to `sudo` as root and hangs on shutdown; `postgresql_embedded` downloads
//! binaries, and this machine has no internet. What we need is small: initdb once, write a settings file, pg_ctl
//! start/stop. `initdb` refuses to run as root, so as root every command runs as the `postgres` system user
//! (created by Debian's postgresql package) through `runuser`, on a directory that user owns.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

/// Error starting or stopping a local cluster; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// No PostgreSQL server binaries were found.
    #[error(
        "no PostgreSQL server binaries found (looked at `pg_config --bindir`, PATH and /usr/lib/postgresql/*/bin); \
         install them, e.g. `apt-get install postgresql-15` on Debian/Ubuntu, or set DATABASE_URL to an existing server"
    )]
    NoBinaries,
    /// Running as root, but there is no unprivileged `postgres` user to run the server as.
    #[error(
        "running as root, and initdb refuses root: create a `postgres` system user (Debian's postgresql package does) \
         or run as an unprivileged user"
    )]
    NoUnprivilegedUser,
    /// A command failed.
    #[error("`{command}` failed: {detail}")]
    Command {
        /// The command line.
        command: String,
        /// Its stderr / exit status.
        detail: String,
    },
    /// Another process (a second `dev`) has this cluster open.
    #[error(
        "another deeprecall-sync process uses the cluster in {0} (a second `dev` on the same --data-dir); stop it, \
         or give this one another --data-dir"
    )]
    InUse(String),
    /// File system error.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClusterError {
    let context = context.into();
    move |source| ClusterError::Io { context, source }
}

/// Appends the line that includes `deeprecall.conf` (our settings, rewritten at every start so that upgrades of
/// this code apply to existing dev clusters too) to `data`'s postgresql.conf, unless it is there already.
fn include_our_settings(data: &Path) -> Result<(), ClusterError> {
    const INCLUDE: &str = "include_if_exists = 'deeprecall.conf'";
    let conf = data.join("postgresql.conf");
    let mut text =
        std::fs::read_to_string(&conf).map_err(io_err(format!("reading {}", conf.display())))?;
    if text.lines().any(|l| l.trim() == INCLUDE) {
        return Ok(());
    }
    text.push_str(&format!("\n{INCLUDE}\n"));
    std::fs::write(&conf, text).map_err(io_err(format!("writing {}", conf.display())))
}

/// How the cluster should behave; tests trade durability for speed.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// `fsync=off`, `initdb --no-sync`: for throwaway clusters only.
    pub ephemeral: bool,
    /// Extra `postgresql.conf` lines.
    pub extra_settings: Vec<(String, String)>,
}

impl ClusterOptions {
    /// A throwaway cluster's options (`ephemeral` on, no extra settings).
    pub fn ephemeral() -> Self {
        Self {
            ephemeral: true,
            ..Self::default()
        }
    }
}

/// The superuser every local cluster is created with.
pub const SUPERUSER: &str = "postgres";

/// The environment variable glibc reads its tunables from.
pub const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES";

/// glibc's malloc settings for a local cluster's Postgres (docs/decisions.md 55, docs/operations.md "The memory
/// allocator"). With glibc's defaults, a backend that has never freed a block of 128 kB or more gives the top of
/// its heap back to the kernel whenever more than 128 kB is free there (`brk` down) and takes it again in the next
/// transaction that needs it (`brk` up, a page fault for every 4 kB touched again): the server's pooled
/// connections, after serving one-row batches, paid about 65,000 more page faults each over a sweep of 100-op
/// batches, some 2 µs of Postgres CPU per row written. glibc raises both thresholds by itself once such a block is
/// freed (its "dynamic mmap threshold"); setting them at start gives every backend that state from its first
/// transaction. A backend then keeps at most 8 MB of freed memory at the top of its heap; allocations of 4 MB or
/// more are still mapped and unmapped on their own. Other C libraries ignore the variable.
pub const MALLOC_TUNABLES: &str =
    "glibc.malloc.mmap_threshold=4194304:glibc.malloc.trim_threshold=8388608";

/// The `GLIBC_TUNABLES` a local cluster's Postgres starts with: our own environment's, when it has one (whoever
/// set it chose), else [`MALLOC_TUNABLES`].
pub fn postgres_glibc_tunables() -> String {
    std::env::var(GLIBC_TUNABLES).unwrap_or_else(|_| MALLOC_TUNABLES.to_owned())
}

/// A running local cluster. Dropping it stops Postgres (fast shutdown).
#[derive(Debug)]
pub struct LocalCluster {
    base: PathBuf,
    bindir: PathBuf,
    run_as: Option<(String, u32, u32)>,
    port: u16,
    password: String,
    running: bool,
    ephemeral: bool,
    // An exclusive lock on `<base>/deeprecall.lock` for as long as this value lives (the kernel drops it when the
    // process ends, however it ends): a second process that opened the same directory would stop this one's
    // Postgres and start it again on another port under it.
    _lock: std::fs::File,
    // Held so a temporary base directory is removed after Postgres has stopped (fields drop after `drop`).
    _temp: Option<tempfile_dir::TempDir>,
}

/// A temp directory removed on drop, without a dependency on the `tempfile` crate in the server binary.
mod tempfile_dir {
    use std::path::{Path, PathBuf};

    /// Owns a directory and removes it on drop.
    #[derive(Debug)]
    pub(super) struct TempDir(PathBuf);

    impl TempDir {
        pub(super) fn new(prefix: &str) -> std::io::Result<Self> {
            let base = std::env::temp_dir();
            for _ in 0..16 {
                let path = base.join(format!("{prefix}{:016x}", rand::random::<u64>()));
                match std::fs::create_dir(&path) {
                    Ok(()) => return Ok(Self(path)),
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e),
                }
            }
            Err(std::io::Error::other("could not create a unique temp dir"))
        }

        pub(super) fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl LocalCluster {
    /// A throwaway cluster in a new temp directory on a free port, removed on drop.
    pub fn start_temporary(options: &ClusterOptions) -> Result<Self, ClusterError> {
        let temp =
            tempfile_dir::TempDir::new("deeprecall-pg-").map_err(io_err("creating temp dir"))?;
        let mut cluster = Self::open_or_init(temp.path(), options)?;
        cluster._temp = Some(temp);
        cluster.start(options)?;
        Ok(cluster)
    }

    /// Opens the cluster under `base` (running initdb the first time) without starting it.
    pub fn open_or_init(base: &Path, options: &ClusterOptions) -> Result<Self, ClusterError> {
        let bindir = find_bindir()?;
        let run_as = unprivileged_user()?;
        std::fs::create_dir_all(base).map_err(io_err(format!("creating {}", base.display())))?;
        let base = base
            .canonicalize()
            .map_err(io_err(format!("resolving {}", base.display())))?;
        if let Some((_, uid, gid)) = &run_as {
            std::os::unix::fs::chown(&base, Some(*uid), Some(*gid))
                .map_err(io_err(format!("chown {}", base.display())))?;
        }
        let lock_path = base.join("deeprecall.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io_err(format!("opening {}", lock_path.display())))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(ClusterError::InUse(base.display().to_string()));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(io_err(format!("locking {}", lock_path.display()))(e));
            }
        }
        let password_file = base.join("superuser-password");
        let fresh = !base.join("data").join("PG_VERSION").exists();
        let password = if fresh {
            let password = random_token(24);
            // Created owner-only from the first byte (a leftover from a failed init is truncated, then restricted).
            {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&password_file)
                    .and_then(|mut f| f.write_all(format!("{password}\n").as_bytes()))
                    .map_err(io_err(format!("writing {}", password_file.display())))?;
            }
            restrict_permissions(&password_file, run_as.as_ref())?;
            password
        } else {
            std::fs::read_to_string(&password_file)
                .map_err(io_err(format!("reading {}", password_file.display())))?
                .trim()
                .to_owned()
        };
        let cluster = Self {
            base,
            bindir,
            run_as,
            port: 0,
            password,
            running: false,
            ephemeral: options.ephemeral,
            _lock: lock,
            _temp: None,
        };
        if fresh {
            cluster.initdb(options)?;
        }
        Ok(cluster)
    }

    /// Creates the cluster in `data.initdb` and renames it to `data` once it is complete and configured, so that
    /// `data` is either a whole cluster or absent. `dev` stopped while initdb ran (Ctrl-C reaches initdb too, but
    /// a SIGTERM or SIGKILL of `dev` alone does not) left a `data` that initdb had finished without our
    /// `include_if_exists` line (every later start on Postgres's default port 5432, failing), or, with initdb
    /// killed as well, a `data` with a PG_VERSION and half a cluster, taken for a cluster by every later run.
    fn initdb(&self, options: &ClusterOptions) -> Result<(), ClusterError> {
        let data = self.base.join("data");
        // An empty `data` that exists already (made by hand, a mounted volume, a symlink to one) is initialised in
        // place, as before: it may not be renamed onto. Anything else in it is not ours to delete.
        let in_place = data.exists();
        if in_place
            && !std::fs::read_dir(&data)
                .map(|mut entries| entries.next().is_none())
                .unwrap_or(false)
        {
            return Err(ClusterError::Io {
                context: format!(
                    "{} exists but holds no cluster (no PG_VERSION): remove it, or choose another --data-dir",
                    data.display()
                ),
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        if in_place && let Some((_, uid, gid)) = &self.run_as {
            // initdb runs as that user and must own the directory (a symlink's target).
            std::os::unix::fs::chown(&data, Some(*uid), Some(*gid))
                .map_err(io_err(format!("chown {}", data.display())))?;
        }
        let building = if in_place {
            data.clone()
        } else {
            self.base.join("data.initdb")
        };
        if !in_place && building.exists() {
            // What an interrupted run left: it is rebuilt whole.
            std::fs::remove_dir_all(&building)
                .map_err(io_err(format!("removing {}", building.display())))?;
        }
        let mut args: Vec<String> = vec![
            "-D".into(),
            building.display().to_string(),
            "-U".into(),
            SUPERUSER.into(),
            "--auth=scram-sha-256".into(),
            format!(
                "--pwfile={}",
                self.base.join("superuser-password").display()
            ),
            "--encoding=UTF8".into(),
            "--locale=C.UTF-8".into(),
        ];
        if options.ephemeral {
            args.push("--no-sync".into());
        }
        self.run_tool("initdb", &args)?;
        include_our_settings(&building)?;
        if in_place {
            return Ok(());
        }
        std::fs::rename(&building, &data).map_err(io_err(format!(
            "renaming {} to {}",
            building.display(),
            data.display()
        )))
    }

    /// Starts Postgres on a free loopback port and waits until it accepts connections.
    pub fn start(&mut self, options: &ClusterOptions) -> Result<(), ClusterError> {
        // A stale postmaster.pid from a crash is handled by Postgres itself; a live one means it is running.
        if self.status_running()? {
            self.stop()?;
        }
        // A cluster made by an earlier version may lack the line (its initdb was interrupted before it was added).
        include_our_settings(&self.base.join("data"))?;
        // The port is free when `free_port` closes its listener, not necessarily when Postgres binds it a few
        // milliseconds later: any process may take it meanwhile (an outgoing connection's local port comes from
        // the same range, and a test run opens thousands). Postgres then exits with "could not create any TCP/IP
        // sockets"; a new port is tried, a few times, instead of failing a test run or `dev` on that race.
        self.start_with_ports(options, free_port)
    }

    /// [`Self::start`] on the ports `next_port` gives, tried in turn while Postgres finds the port taken (at most
    /// five); public for the test that takes the first one.
    #[doc(hidden)]
    pub fn start_with_ports(
        &mut self,
        options: &ClusterOptions,
        mut next_port: impl FnMut() -> Result<u16, ClusterError>,
    ) -> Result<(), ClusterError> {
        const ATTEMPTS: usize = 5;
        for attempt in 1.. {
            let log_before = std::fs::metadata(self.log_path()).map_or(0, |m| m.len());
            match self.start_on(next_port()?, options) {
                Err(e) if attempt < ATTEMPTS && self.port_was_taken(log_before) => {
                    tracing::warn!(port = self.port, error = %e, "the cluster's port was taken; trying another");
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Whether the log written since `log_before` (its length before a start) says the port was taken.
    fn port_was_taken(&self, log_before: u64) -> bool {
        let text = std::fs::read(self.log_path()).unwrap_or_default();
        let new = text.get(log_before as usize..).unwrap_or_default();
        String::from_utf8_lossy(new).contains("could not create any TCP/IP sockets")
    }

    fn start_on(&mut self, port: u16, options: &ClusterOptions) -> Result<(), ClusterError> {
        let data = self.base.join("data");
        self.port = port;
        let mut conf = String::new();
        let mut settings: Vec<(String, String)> = vec![
            ("port".into(), self.port.to_string()),
            ("listen_addresses".into(), "'127.0.0.1'".into()),
            // No unix socket: its path length is limited and a temp dir may be deep; TCP on loopback is enough.
            ("unix_socket_directories".into(), "''".into()),
            // Logical replication for the live stream (see docs/operations.md).
            ("wal_level".into(), "logical".into()),
            ("max_wal_senders".into(), "20".into()),
            ("max_replication_slots".into(), "20".into()),
            ("max_connections".into(), "200".into()),
            ("logging_collector".into(), "off".into()),
        ];
        if options.ephemeral {
            settings.push(("fsync".into(), "off".into()));
            settings.push(("full_page_writes".into(), "off".into()));
        }
        settings.extend(options.extra_settings.iter().cloned());
        for (k, v) in &settings {
            let _ = writeln!(conf, "{k} = {v}");
        }
        let conf_path = data.join("deeprecall.conf");
        std::fs::write(&conf_path, conf)
            .map_err(io_err(format!("writing {}", conf_path.display())))?;
        if let Some((_, uid, gid)) = &self.run_as {
            std::os::unix::fs::chown(&conf_path, Some(*uid), Some(*gid))
                .map_err(io_err(format!("chown {}", conf_path.display())))?;
        }
        self.pg_ctl_start().map_err(|e| match e {
            ClusterError::Command { command, detail } => ClusterError::Command {
                command,
                detail: format!(
                    "{detail}\n--- {}:\n{}",
                    self.log_path().display(),
                    self.log_tail()
                ),
            },
            other => other,
        })?;
        self.running = true;
        Ok(())
    }

    fn status_running(&self) -> Result<bool, ClusterError> {
        let data = self.base.join("data");
        let out = self.command(
            "pg_ctl",
            &["-D".into(), data.display().to_string(), "status".into()],
        )?;
        Ok(out.status.success())
    }

    /// Stops Postgres (fast shutdown: running transactions are rolled back, data is safe).
    pub fn stop(&mut self) -> Result<(), ClusterError> {
        let data = self.base.join("data");
        self.run_tool(
            "pg_ctl",
            &[
                "-D".into(),
                data.display().to_string(),
                "-m".into(),
                "fast".into(),
                "-w".into(),
                "stop".into(),
            ],
        )?;
        self.running = false;
        Ok(())
    }

    /// Stops Postgres abruptly (as if it crashed); it recovers from WAL at the next start.
    pub fn kill(&mut self) -> Result<(), ClusterError> {
        let data = self.base.join("data");
        self.run_tool(
            "pg_ctl",
            &[
                "-D".into(),
                data.display().to_string(),
                "-m".into(),
                "immediate".into(),
                "-w".into(),
                "stop".into(),
            ],
        )?;
        self.running = false;
        Ok(())
    }

    /// Starts a stopped cluster again on the same port (clients reconnect to the same URL).
    pub fn restart_same_port(&mut self) -> Result<(), ClusterError> {
        self.pg_ctl_start()?;
        self.running = true;
        Ok(())
    }

    /// `pg_ctl start` with the settings file as written, waiting (at most 60 s) until Postgres accepts connections.
    /// The postmaster, and so every backend it forks, gets [`postgres_glibc_tunables`] ([`Self::command`]).
    fn pg_ctl_start(&self) -> Result<(), ClusterError> {
        let data = self.base.join("data");
        let args = [
            "-D".to_string(),
            data.display().to_string(),
            "-l".into(),
            self.log_path().display().to_string(),
            "-w".into(),
            "-t".into(),
            "60".into(),
            "start".into(),
        ];
        self.run_tool("pg_ctl", &args)
    }

    /// Stops this cluster (immediately) and removes its base directory as soon as process `pid` has exited,
    /// from a detached shell. For test harnesses that keep one cluster for a whole test binary in a static, which
    /// is never dropped: the cluster then goes away with the process, even when it panics or is killed.
    pub fn reap_when_process_exits(&self, pid: u32) -> Result<(), ClusterError> {
        run_after_process_exits(pid, Duration::from_millis(200), &self.teardown_script())
            .map_err(io_err("starting the cluster reaper"))
    }

    /// A shell command that stops this cluster (immediately, as its owner) and removes its base directory; it does
    /// nothing harmful when the cluster is already gone. For a caller's own [`run_after_process_exits`] that has
    /// more to clean up than the cluster.
    pub fn teardown_script(&self) -> String {
        let pg_ctl = shell_quote(&self.bindir.join("pg_ctl"));
        let run_as = match &self.run_as {
            Some((user, _, _)) => format!("runuser -u {user} -- "),
            None => String::new(),
        };
        format!(
            "{run_as}{pg_ctl} -D {} -m immediate -w stop >/dev/null 2>&1; rm -rf {}",
            shell_quote(&self.base.join("data")),
            shell_quote(&self.base)
        )
    }

    /// The port Postgres listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{SUPERUSER}:{}@127.0.0.1:{}/{database}",
            self.password, self.port
        )
    }

    /// The superuser's password (generated at initdb, kept in the base directory).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// The directory holding `data/`, the log and the password file.
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// The server binaries in use.
    pub fn bindir(&self) -> &Path {
        &self.bindir
    }

    /// Path of the server log.
    pub fn log_path(&self) -> PathBuf {
        self.base.join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Runs `tool` (as the cluster's owner when we are root) with [`postgres_glibc_tunables`] in its environment:
    /// the postmaster `pg_ctl start` runs inherits it, and so does every backend; for the other tools it changes
    /// nothing that matters.
    fn command(&self, tool: &str, args: &[String]) -> Result<Output, ClusterError> {
        let program = self.bindir.join(tool);
        let mut cmd = match &self.run_as {
            Some((user, _, _)) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(&program);
                c
            }
            None => Command::new(&program),
        };
        cmd.args(args)
            .env(GLIBC_TUNABLES, postgres_glibc_tunables())
            .stdin(std::process::Stdio::null());
        // pg_ctl's postmaster inherits our stdout/stderr otherwise, and a test harness waiting for EOF would hang.
        cmd.stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd.output()
            .map_err(io_err(format!("running {}", program.display())))
    }

    fn run_tool(&self, tool: &str, args: &[String]) -> Result<(), ClusterError> {
        let out = self.command(tool, args)?;
        if out.status.success() {
            Ok(())
        } else {
            Err(ClusterError::Command {
                command: format!("{tool} {}", args.join(" ")),
                detail: format!(
                    "{}{}{}",
                    out.status,
                    if out.stderr.is_empty() { "" } else { ": " },
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            })
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        // A throwaway cluster stops immediately: a fast shutdown would wait for every logical walsender's client
        // to confirm the end of WAL, and in a test that client may be on the very thread blocked here.
        let result = match (self.running, self.ephemeral) {
            (false, _) => Ok(()),
            (true, true) => self.kill(),
            (true, false) => self.stop(),
        };
        if let Err(e) = result {
            eprintln!("warning: stopping local Postgres failed: {e}");
        }
    }
}

/// Finds the PostgreSQL server binaries: `pg_config --bindir`, then PATH, then `/usr/lib/postgresql/*/bin`
/// (newest version first). A directory counts only if it has `initdb`, `pg_ctl` and `postgres`.
pub fn find_bindir() -> Result<PathBuf, ClusterError> {
    let has_server = |dir: &Path| {
        ["initdb", "pg_ctl", "postgres"]
            .iter()
            .all(|t| dir.join(t).is_file())
    };
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if has_server(&dir) {
                return Ok(dir);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, dir)| dir)
        .ok_or(ClusterError::NoBinaries)
}

/// As root: the `postgres` user's name, uid and gid. Otherwise None (run as ourselves).
fn unprivileged_user() -> Result<Option<(String, u32, u32)>, ClusterError> {
    let me = std::fs::metadata("/proc/self").map_err(io_err("reading /proc/self"))?;
    if me.uid() != 0 {
        return Ok(None);
    }
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(io_err("reading /etc/passwd"))?;
    for line in passwd.lines() {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.first() == Some(&"postgres") && fields.len() > 3 {
            let uid = fields[2]
                .parse()
                .map_err(|_| ClusterError::NoUnprivilegedUser)?;
            let gid = fields[3]
                .parse()
                .map_err(|_| ClusterError::NoUnprivilegedUser)?;
            return Ok(Some(("postgres".to_owned(), uid, gid)));
        }
    }
    Err(ClusterError::NoUnprivilegedUser)
}

fn restrict_permissions(
    path: &Path,
    run_as: Option<&(String, u32, u32)>,
) -> Result<(), ClusterError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io_err(format!("chmod {}", path.display())))?;
    if let Some((_, uid, gid)) = run_as {
        std::os::unix::fs::chown(path, Some(*uid), Some(*gid))
            .map_err(io_err(format!("chown {}", path.display())))?;
    }
    Ok(())
}

/// A free TCP port on 127.0.0.1 (bound then released; Postgres takes it a moment later).
pub fn free_port() -> Result<u16, ClusterError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io_err("finding a free port"))?;
    let port = listener
        .local_addr()
        .map_err(io_err("finding a free port"))?
        .port();
    Ok(port)
}

/// A random alphanumeric string (passwords, secrets for dev).
pub fn random_token(len: usize) -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

/// `path` as one single-quoted shell word.
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

/// Runs `script` from a detached `sh` once process `pid` has exited, checking every `poll`. The shell has a process
/// group of its own, so a Ctrl-C to the watched process's group does not stop it before it has run: what a process
/// started (a cluster, a server, a scratch directory) goes away with it even when it is killed, which no `Drop`
/// survives.
pub fn run_after_process_exits(pid: u32, poll: Duration, script: &str) -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    Command::new("sh")
        .arg("-c")
        .arg(format!(
            "while kill -0 {pid} 2>/dev/null; do sleep {}; done; {script}",
            poll.as_secs_f64()
        ))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .map(drop)
}
