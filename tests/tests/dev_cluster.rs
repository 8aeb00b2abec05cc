//! The `dev` command's local cluster: one process at a time per data directory.

use deeprecall_sync::pgcluster::{ClusterError, ClusterOptions, LocalCluster};

#[test]
fn a_second_process_on_the_same_cluster_directory_is_refused() {
    // Two `dev` runs on one --data-dir: the second used to stop the first one's Postgres and start it again on
    // another port, leaving the first serving against a port nobody listened on.
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ClusterOptions {
        ephemeral: true,
        ..Default::default()
    };
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
    let options = ClusterOptions {
        ephemeral: true,
        ..Default::default()
    };
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
