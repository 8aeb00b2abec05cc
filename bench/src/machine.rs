//! What the benchmark reads from `/proc`: a process's CPU time, state and resident memory, and the whole machine's
//! CPU time from `/proc/stat`: what every process spent (the server, the Postgres backends and
//! walsender, the clients, the kernel on their behalf) and how long the cores sat idle, over one side of a write
//! round. The server's own CPU (`Env::server_cpu_secs`) says what the server costs; this says what a row costs the
//! machine altogether, so the API's extra can be split into the server's share, its clients' share, Postgres's
//! share (every process of the cluster, [`postgres_totals`]) and the rest (the kernel outside those processes:
//! interrupts and soft interrupts, where the kernel accounts them apart; any other process).

use anyhow::Context;

/// Cumulative counters at one instant, in clock ticks (`USER_HZ`).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Snapshot {
    /// user + nice + system + irq + softirq, summed over the cores.
    busy: u64,
    /// idle + iowait, summed over the cores.
    idle: u64,
    /// Time the hypervisor ran someone else while a core had work (steal).
    steal: u64,
    /// User + system time of this process and of its waited-for children: the load generator, whether it is this
    /// process's clients (the API, reference 4) or a pgbench run (a child, waited for at its end).
    clients: u64,
    /// CPU ticks and minor page faults of every Postgres process ([`postgres_totals`]), when a postmaster was
    /// given.
    postgres: PostgresTotals,
    /// User + system time of the server, when given.
    server: u64,
}

/// The processes a [`Snapshot`] reads besides the machine and this process.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Watched {
    /// The cluster's postmaster.
    pub(crate) postmaster: u32,
    /// The server.
    pub(crate) server: u32,
}

impl Snapshot {
    /// The machine now, and the `watched` processes when given.
    pub(crate) fn now(watched: Option<Watched>) -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat")?;
        let (busy, idle, steal) = parse_cpu_line(stat.lines().next().unwrap_or_default())
            .context("no aggregate `cpu` line in /proc/stat")?;
        let me = process_ticks("self")?;
        Ok(Self {
            busy,
            idle,
            steal,
            clients: me.own + me.children,
            postgres: watched
                .map(|w| postgres_totals(w.postmaster))
                .transpose()?
                .unwrap_or_default(),
            server: watched
                .map(|w| process_ticks(w.server).map(|t| t.own))
                .transpose()?
                .unwrap_or(0),
        })
    }

    /// What the machine did from `self` to `later`, `clk_tck` ticks per second.
    pub(crate) fn until(&self, later: &Self, clk_tck: f64) -> Use {
        let busy = later.busy.saturating_sub(self.busy) as f64;
        let idle = later.idle.saturating_sub(self.idle) as f64;
        let steal = later.steal.saturating_sub(self.steal) as f64;
        let total = busy + idle + steal;
        Use {
            busy_secs: busy / clk_tck,
            idle_share: if total > 0.0 { idle / total } else { 0.0 },
            clients_secs: later.clients.saturating_sub(self.clients) as f64 / clk_tck,
            postgres_secs: later.postgres.ticks.saturating_sub(self.postgres.ticks) as f64
                / clk_tck,
            postgres_faults: later.postgres.faults.saturating_sub(self.postgres.faults) as f64,
            server_secs: later.server.saturating_sub(self.server) as f64 / clk_tck,
        }
    }
}

/// One process's CPU time in clock ticks, and its minor page faults, from `/proc/<pid>/stat`.
pub(crate) struct ProcessTicks {
    /// Its own user + system time (utime + stime).
    pub(crate) own: u64,
    /// Its waited-for children's user + system time (cutime + cstime).
    pub(crate) children: u64,
    /// Its own minor page faults (minflt).
    own_faults: u64,
    /// Its waited-for children's minor page faults (cminflt).
    children_faults: u64,
}

/// The fields of `/proc/<pid>/stat` from field 3 (the state) on. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last ") ".
fn stat_fields(pid: impl std::fmt::Display) -> anyhow::Result<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").context("malformed /proc stat")?.1;
    Ok(rest.split_whitespace().map(str::to_owned).collect())
}

/// [`ProcessTicks`] of `pid` (a number, or `self`).
pub(crate) fn process_ticks(pid: impl std::fmt::Display) -> anyhow::Result<ProcessTicks> {
    ProcessTicks::of(&stat_fields(pid)?)
}

impl ProcessTicks {
    /// From the fields [`stat_fields`] returns: minflt and cminflt are fields 10 and 11, utime, stime, cutime and
    /// cstime fields 14 to 17.
    fn of(fields: &[String]) -> anyhow::Result<Self> {
        let tick = |i: usize| -> anyhow::Result<u64> {
            Ok(fields.get(i).context("short /proc stat")?.parse()?)
        };
        Ok(Self {
            own: tick(11)? + tick(12)?,
            children: tick(13)? + tick(14)?,
            own_faults: tick(7)?,
            children_faults: tick(8)?,
        })
    }
}

/// What a Postgres cluster's processes have used so far ([`postgres_totals`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PostgresTotals {
    /// CPU time in clock ticks.
    pub(crate) ticks: u64,
    /// Minor page faults: a backend that gives its heap back to the kernel and takes it again shows here
    /// (docs/decisions.md 55).
    pub(crate) faults: u64,
}

/// CPU ticks and minor page faults of a Postgres cluster so far: the postmaster's own and its waited-for
/// children's (every backend that has exited, pgbench's among them: their counts move to the postmaster when it
/// reaps them), plus the own counts of its children still running (backends, walsender, checkpointer, walwriter,
/// autovacuum). A child reaped between reading the postmaster and reading the children would be counted in neither,
/// so the postmaster is read again after them and the whole read repeated if its children's totals moved meanwhile.
pub(crate) fn postgres_totals(postmaster: u32) -> anyhow::Result<PostgresTotals> {
    let mut attempts = 0;
    loop {
        let before = process_ticks(postmaster)?;
        let mut running = PostgresTotals::default();
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may exit while the directory is read: it is then counted in `after.children`, if at all.
            let Ok(fields) = stat_fields(pid) else {
                continue;
            };
            if fields.get(1).and_then(|ppid| ppid.parse::<u32>().ok()) != Some(postmaster) {
                continue;
            }
            if let Ok(t) = ProcessTicks::of(&fields) {
                running.ticks += t.own;
                running.faults += t.own_faults;
            }
        }
        let after = process_ticks(postmaster)?;
        attempts += 1;
        if (after.children, after.children_faults) == (before.children, before.children_faults)
            || attempts == 5
        {
            return Ok(PostgresTotals {
                ticks: after.own + after.children + running.ticks,
                faults: after.own_faults + after.children_faults + running.faults,
            });
        }
    }
}

/// Process `pid` has exited: it is gone, or a zombie (`Z`) until its parent waits for it.
pub(crate) fn has_exited(pid: u32) -> bool {
    stat_fields(pid).map_or(true, |fields| {
        fields.first().is_none_or(|state| state == "Z")
    })
}

/// Resident memory of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub(crate) fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS")?;
    Ok(line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?)
}

/// `(busy, idle, steal)` ticks from the aggregate line `cpu user nice system idle iowait irq softirq steal …`.
fn parse_cpu_line(line: &str) -> Option<(u64, u64, u64)> {
    let mut fields = line.split_whitespace();
    if fields.next()? != "cpu" {
        return None;
    }
    let v: Vec<u64> = fields
        .take(8)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    if v.len() < 5 {
        return None;
    }
    Some((at(0) + at(1) + at(2) + at(5) + at(6), at(3) + at(4), at(7)))
}

/// The machine over one measured stretch.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Use {
    /// CPU seconds of every process, summed over the cores.
    pub(crate) busy_secs: f64,
    /// Share of the cores' time spent idle (including waiting for I/O), 0..1.
    pub(crate) idle_share: f64,
    /// CPU seconds of the load generator: the benchmark process and the children it waited for (pgbench).
    pub(crate) clients_secs: f64,
    /// CPU seconds of the Postgres processes (backends, walsender, background workers).
    pub(crate) postgres_secs: f64,
    /// Minor page faults of the Postgres processes.
    pub(crate) postgres_faults: f64,
    /// CPU seconds of the server.
    pub(crate) server_secs: f64,
}

/// One side's machine cost per row, averaged over the rounds it ran in.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PerRow {
    /// Machine CPU per row written, µs.
    pub(crate) us: f64,
    /// The load generator's CPU per row, µs (the benchmark's own clients, or pgbench).
    pub(crate) clients_us: f64,
    /// Postgres's CPU per row, µs.
    pub(crate) postgres_us: f64,
    /// Postgres's minor page faults per row.
    pub(crate) postgres_faults: f64,
    /// The server's CPU per row over the same stretch, µs.
    pub(crate) server_us: f64,
    /// Idle share of the cores.
    pub(crate) idle_share: f64,
}

impl PerRow {
    pub(crate) fn of(used: Use, rows: f64) -> Self {
        Self {
            us: used.busy_secs * 1e6 / rows,
            clients_us: used.clients_secs * 1e6 / rows,
            postgres_us: used.postgres_secs * 1e6 / rows,
            postgres_faults: used.postgres_faults / rows,
            server_us: used.server_secs * 1e6 / rows,
            idle_share: used.idle_share,
        }
    }

    /// The mean of `rounds` (each round writes the same rows per side).
    pub(crate) fn mean(rounds: impl ExactSizeIterator<Item = Self>) -> Self {
        let n = rounds.len().max(1) as f64;
        rounds.fold(Self::default(), |acc, r| Self {
            us: acc.us + r.us / n,
            clients_us: acc.clients_us + r.clients_us / n,
            postgres_us: acc.postgres_us + r.postgres_us / n,
            postgres_faults: acc.postgres_faults + r.postgres_faults / n,
            server_us: acc.server_us + r.server_us / n,
            idle_share: acc.idle_share + r.idle_share / n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_line() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        assert_eq!(
            parse_cpu_line("cpu  100 5 50 1000 20 3 7 11 0 0"),
            Some((165, 1020, 11))
        );
        // Old kernels stop after iowait or irq.
        assert_eq!(parse_cpu_line("cpu 1 2 3 4 5"), Some((6, 9, 0)));
        assert_eq!(parse_cpu_line("cpu0 1 2 3 4 5 6 7 8"), None);
        assert_eq!(parse_cpu_line("cpu 1 2 x 4 5"), None);
    }

    #[test]
    fn this_process_and_the_machine_are_read() {
        let before = Snapshot::now(None).unwrap();
        // Spin until both counters move: this process's time by several ticks and the machine's busy time at all.
        // The two are kept differently (a process's time from its precise run time, the machine's from samples at
        // each tick), so one tick of this process can show before any busy tick does; a CI run once read 0.01 s
        // here with the machine's busy time unmoved. Bounded, for a starved test machine.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut x = 0u64;
        let moved = |now: &Snapshot| now.clients >= before.clients + 5 && now.busy > before.busy;
        while !moved(&Snapshot::now(None).unwrap()) && std::time::Instant::now() < deadline {
            for _ in 0..100_000 {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        }
        let used = before.until(&Snapshot::now(None).unwrap(), 100.0);
        assert!(used.clients_secs > 0.0, "{used:?}");
        assert!(used.busy_secs > 0.0, "{used:?}");
        assert!((0.0..=1.0).contains(&used.idle_share), "{used:?}");
    }

    #[test]
    fn shares_and_means() {
        let a = Snapshot {
            busy: 100,
            idle: 50,
            steal: 0,
            clients: 10,
            postgres: PostgresTotals {
                ticks: 40,
                faults: 1_000,
            },
            server: 20,
        };
        let b = Snapshot {
            busy: 280,
            idle: 70,
            steal: 0,
            clients: 15,
            postgres: PostgresTotals {
                ticks: 140,
                faults: 6_000,
            },
            server: 70,
        };
        let used = a.until(&b, 100.0);
        assert!((used.busy_secs - 1.8).abs() < 1e-9);
        assert!((used.idle_share - 0.1).abs() < 1e-9);
        assert!((used.clients_secs - 0.05).abs() < 1e-9);
        assert!((used.postgres_secs - 1.0).abs() < 1e-9);
        let per_row = PerRow::of(used, 100_000.0);
        assert!((per_row.us - 18.0).abs() < 1e-9);
        assert!((per_row.postgres_us - 10.0).abs() < 1e-9);
        assert!((per_row.postgres_faults - 0.05).abs() < 1e-9);
        let mean = PerRow::mean(
            [
                per_row,
                PerRow {
                    us: 22.0,
                    clients_us: 0.0,
                    postgres_us: 4.0,
                    postgres_faults: 0.15,
                    server_us: 1.0,
                    idle_share: 0.3,
                },
            ]
            .into_iter(),
        );
        assert!((mean.us - 20.0).abs() < 1e-9);
        assert!((mean.idle_share - 0.2).abs() < 1e-9);
        assert!((mean.postgres_us - 7.0).abs() < 1e-9);
        assert!((mean.postgres_faults - 0.1).abs() < 1e-9);
        assert!((mean.server_us - 3.0).abs() < 1e-9);
    }

    /// A process tree's time is counted while a child runs and after it was reaped, and not twice: this process
    /// stands in for the postmaster, a shell spinning for a while for a backend.
    #[test]
    fn a_process_tree_is_counted_running_and_reaped() {
        let me = std::process::id();
        let tree = |ticks: ProcessTicks| ticks.own + ticks.children;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 1000000 ]; do i=$((i+1)); done"])
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        let running = postgres_totals(me).unwrap().ticks;
        let reaped_so_far = tree(process_ticks(me).unwrap());
        // The running child's time is found by the scan of /proc (other tests' threads may add own time meanwhile,
        // which only raises the second read).
        assert!(
            running > reaped_so_far,
            "{running} with the child running, {reaped_so_far} without it"
        );
        child.wait().unwrap();
        let reaped = postgres_totals(me).unwrap().ticks;
        let after = tree(process_ticks(me).unwrap());
        assert!(
            process_ticks(me).unwrap().children > 0,
            "the child's time moved to this process"
        );
        // No running child is left, so the tree is this process's own and reaped time, counted once.
        assert!(
            reaped <= after && after - reaped < 50,
            "{reaped} against {after}"
        );
    }
}
