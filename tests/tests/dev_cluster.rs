//! The `dev` command's local cluster: one process at a time per data directory.

use deeprecall_sync::pgcluster::{self, ClusterError, ClusterOptions, LocalCluster};

#[test]
fn a_second_process_on_the_same_cluster_directory_is_refused() {
    // Two `dev` runs on one --data-dir: the second used to stop the first one's Postgres and start it again on
    // another port, leaving the first serving against a port nobody listened on.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    let first = LocalCluster::open_or_init(dir.path(), &options).expect("first open");
    match LocalCluster::open_or_init(dir.path(), &options) {
        Err(e @ ClusterError::InUse(_)) => {
            assert!(e.to_string().contains("--data-dir"), "{e}");
        }
        other => panic!("a second open of the same cluster was not refused: {other:?}"),
    }
    // Once the first lets go, the directory can be used again.
    drop(first);
    LocalCluster::open_or_init(dir.path(), &options).expect("open after the first closed");
}

#[test]
fn a_port_taken_between_its_choice_and_postgres_binding_it_is_replaced() {
    // A free port is chosen by binding port 0 and letting it go; until Postgres binds it, any process may take it
    // (a test run's own outgoing connections draw their local ports from the same range). Postgres then exits with
    // "could not create any TCP/IP sockets", which failed a CI run's test binary at its cluster's start.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let taken_port = taken.local_addr().unwrap().port();
    let mut cluster = LocalCluster::open_or_init(dir.path(), &options).expect("open");
    let mut first = true;
    cluster
        .start_with_ports(&options, || {
            if std::mem::take(&mut first) {
                Ok(taken_port)
            } else {
                deeprecall_sync::pgcluster::free_port()
            }
        })
        .expect("start on the next port");
    assert_ne!(cluster.port(), taken_port);
    assert!(!first, "the taken port was not tried first");
    drop(taken);
}

/// `wal_level` of the running `cluster`: `logical` only when our settings were included.
async fn wal_level(cluster: &LocalCluster) -> String {
    let client = deeprecall_tests::connect(&cluster.url("postgres")).await;
    client
        .query_one("show wal_level", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn a_cluster_whose_initdb_was_interrupted_is_made_again() {
    // `dev` stopped by SIGTERM or SIGKILL while initdb ran (initdb, not signalled, finished on its own) left a `data`
    // without the line that includes our settings: every later start was on Postgres's default port 5432, and
    // failed. With initdb killed too, half a cluster with a PG_VERSION. A cluster is now built in `data.initdb` and
    // renamed to `data` when complete; what an interrupted run left there is removed and built again.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    let leftover = dir.path().join("data.initdb");
    std::fs::create_dir_all(leftover.join("base")).unwrap();
    std::fs::write(leftover.join("PG_VERSION"), "15\n").unwrap();
    let mut cluster = LocalCluster::open_or_init(dir.path(), &options).expect("open");
    cluster.start(&options).expect("start");
    assert_eq!(wal_level(&cluster).await, "logical");
    assert!(!leftover.exists());
}

#[tokio::test]
async fn a_cluster_made_without_our_settings_line_gets_it_at_start() {
    // A cluster an earlier version left without the line (see above) is repaired when it starts.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    drop(LocalCluster::open_or_init(dir.path(), &options).expect("first open"));
    let conf = dir.path().join("data").join("postgresql.conf");
    let text = std::fs::read_to_string(&conf).unwrap();
    assert!(text.contains("include_if_exists = 'deeprecall.conf'"));
    std::fs::write(
        &conf,
        text.replace("include_if_exists = 'deeprecall.conf'", ""),
    )
    .unwrap();
    let mut cluster = LocalCluster::open_or_init(dir.path(), &options).expect("open");
    cluster.start(&options).expect("start");
    assert_eq!(wal_level(&cluster).await, "logical");
}

/// `deeprecall-sync dev` on a temp dir, through `nohup` if asked, once it is ready; with its postmaster.pid path.
async fn ready_dev(
    dir: &std::path::Path,
    nohup: bool,
) -> (tokio::process::Child, std::path::PathBuf) {
    let listen = format!("127.0.0.1:{}", deeprecall_tests::ops::free_port());
    let bin = deeprecall_tests::ops::server_bin();
    // Through `env --default-signal=HUP` otherwise: the test itself may run under nohup (a CI script started so),
    // whose ignored SIGHUP the child would inherit, and dev then rightly leaves it ignored.
    let mut command = tokio::process::Command::new(if nohup { "nohup" } else { "env" });
    if !nohup {
        command.arg("--default-signal=HUP");
    }
    command.arg(bin);
    let child = command
        .args(["dev", "--data-dir"])
        .arg(dir)
        .args(["--listen", &listen, "--metrics-listen", "off"])
        .env_remove("DATABASE_URL")
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning deeprecall-sync dev");
    deeprecall_tests::ops::until_ready(&format!("http://{listen}")).await;
    let pid_file = dir.join("postgres").join("data").join("postmaster.pid");
    assert!(pid_file.exists(), "dev's Postgres is not running");
    (child, pid_file)
}

fn send(signal: &str, child: &tokio::process::Child) {
    let status = std::process::Command::new("kill")
        .args([signal, &child.id().unwrap().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn dev_stops_its_postgres_when_its_terminal_hangs_up() {
    // SIGHUP (the terminal closed, an SSH session dropped) ended `dev` at once, by the signal's default action, and
    // left its Postgres running: it is in a session of its own, so the hangup did not reach it.
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut child, pid_file) = ready_dev(dir.path(), false).await;
    send("-HUP", &child);
    let exit = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("dev did not exit on SIGHUP")
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert!(
        !pid_file.exists(),
        "dev exited on SIGHUP and left its Postgres running"
    );

    // Under nohup the hangup stays ignored (a handler would replace the ignored disposition): dev keeps serving,
    // and still stops cleanly on SIGTERM.
    let (mut child, pid_file) = ready_dev(dir.path(), true).await;
    send("-HUP", &child);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(2), child.wait()).await;
    assert!(ended.is_err(), "dev under nohup ended on SIGHUP: {ended:?}");
    send("-TERM", &child);
    let exit = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait())
        .await
        .expect("dev did not exit on SIGTERM")
        .unwrap();
    assert!(exit.success(), "{exit}");
    assert!(!pid_file.exists(), "dev left its Postgres running");
}

#[tokio::test]
async fn an_empty_data_directory_made_beforehand_is_initialised_in_place() {
    // A mounted volume or a symlink to one cannot be renamed onto: an empty `data` that exists already gets the
    // cluster in place, as before the cluster was built aside. One that holds anything else is refused.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    let volume = tempfile::tempdir().expect("temp dir");
    std::os::unix::fs::symlink(volume.path(), dir.path().join("data")).unwrap();
    let mut cluster = LocalCluster::open_or_init(dir.path(), &options).expect("open");
    cluster.start(&options).expect("start");
    assert_eq!(wal_level(&cluster).await, "logical");
    assert!(volume.path().join("PG_VERSION").exists());
    drop(cluster);

    let other = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(other.path().join("data")).unwrap();
    std::fs::write(other.path().join("data").join("notes.txt"), "mine").unwrap();
    match LocalCluster::open_or_init(other.path(), &options) {
        Err(e) => assert!(e.to_string().contains("holds no cluster"), "{e}"),
        Ok(_) => panic!("a data directory holding someone's file was initialised"),
    }
    assert!(other.path().join("data").join("notes.txt").exists());
}

#[test]
fn postgres_starts_with_our_malloc_settings_unless_the_environment_has_its_own() {
    // With glibc's default thresholds, a pooled connection that served small transactions returned the top of its
    // heap to the kernel after every larger one and faulted it back in the next (docs/decisions.md 55). The
    // postmaster's environment, which every backend inherits, carries the settings that prevent it.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions::ephemeral();
    let mut cluster = LocalCluster::open_or_init(dir.path(), &options).expect("open");
    cluster.start(&options).expect("start");
    let pid_file = std::fs::read_to_string(dir.path().join("data").join("postmaster.pid"))
        .expect("postmaster.pid");
    let pid = pid_file.lines().next().expect("a pid line").trim();
    let environ =
        std::fs::read(format!("/proc/{pid}/environ")).expect("the postmaster's environment");
    // Ours, unless this test's environment has its own (then that one).
    if std::env::var_os(pgcluster::GLIBC_TUNABLES).is_none() {
        assert_eq!(
            pgcluster::postgres_glibc_tunables(),
            pgcluster::MALLOC_TUNABLES
        );
    }
    // The process's own loader parses the value in place, each `:` becoming a NUL, and /proc shows that block.
    let wanted = format!(
        "{}={}",
        pgcluster::GLIBC_TUNABLES,
        pgcluster::postgres_glibc_tunables()
    );
    let parsed = wanted.replace(':', "\0");
    assert!(
        [wanted.as_bytes(), parsed.as_bytes()]
            .iter()
            .any(|w| environ.windows(w.len()).any(|entry| entry == *w)),
        "the postmaster's environment lacks {wanted}"
    );
}
