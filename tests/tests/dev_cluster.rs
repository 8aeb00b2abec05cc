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
