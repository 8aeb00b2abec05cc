//! Where a test's database lives.
//!
//! Most tests share one PostgreSQL cluster per test binary, each in a database of its own copied from a migrated
//! template (`create database … template`), with its own replication slot: `initdb` and the migrations run once
//! per binary instead of once per test, and a test still sees nothing of another's rows, publication or slot.
//! The database and its slots are dropped when the test ends (also when it panics); the cluster goes away with the
//! process, through a reaper that stops it as soon as the test binary has exited (even if it was killed).
//!
//! Tests that restart or reconfigure Postgres itself (`alter system`, crash, restart) ask for a cluster of their
//! own (`EnvOptions::own_cluster`), as the migration tests do (`start_cluster`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use deeprecall_sync::pgcluster::{ClusterOptions, LocalCluster};

/// The migrated database every shared test database is copied from.
const TEMPLATE: &str = "deeprecall_template";

static SHARED: tokio::sync::OnceCell<LocalCluster> = tokio::sync::OnceCell::const_new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(1);

/// A test's database and the cluster it is in.
#[derive(Debug)]
pub enum TestDb {
    /// A database of its own in the binary's shared cluster (dropped with its slots when this is dropped).
    Shared {
        /// The shared cluster.
        cluster: &'static LocalCluster,
        /// The database.
        name: String,
    },
    /// A cluster of its own (stopped and removed when this is dropped).
    Own {
        /// The cluster.
        cluster: LocalCluster,
        /// The database.
        name: String,
    },
}

impl TestDb {
    /// A migrated database in the shared cluster.
    pub async fn shared() -> Self {
        let cluster = shared_cluster().await;
        let name = format!("deeprecall_{}", NEXT_DB.fetch_add(1, Ordering::Relaxed));
        let admin = super::connect(&cluster.url("postgres")).await;
        // The template may still show the setup connection for a moment after it closed (55006): retry.
        let mut tries = 0;
        loop {
            match admin
                .batch_execute(&format!("create database {name} template {TEMPLATE}"))
                .await
            {
                Ok(()) => break,
                Err(_) if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("create database {name}: {e}"),
            }
        }
        Self::Shared { cluster, name }
    }

    /// A cluster of its own with an empty (not migrated) database.
    pub async fn own(name: &str) -> Self {
        let cluster = start_cluster_blocking().await;
        let admin = super::connect(&cluster.url("postgres")).await;
        admin
            .batch_execute(&format!("create database {name}"))
            .await
            .expect("create database");
        Self::Own {
            cluster,
            name: name.to_owned(),
        }
    }

    /// The cluster.
    pub fn cluster(&self) -> &LocalCluster {
        match self {
            Self::Shared { cluster, .. } => cluster,
            Self::Own { cluster, .. } => cluster,
        }
    }

    /// The cluster, for restarting it: only a cluster of the test's own.
    pub fn own_cluster_mut(&mut self) -> &mut LocalCluster {
        match self {
            Self::Own { cluster, .. } => cluster,
            Self::Shared { .. } => panic!(
                "this test restarts or reconfigures Postgres: start it with EnvOptions {{ own_cluster: true, .. }}"
            ),
        }
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        match self {
            Self::Shared { name, .. } | Self::Own { name, .. } => name,
        }
    }

    /// Superuser URL of the database.
    pub fn url(&self) -> String {
        self.cluster().url(self.name())
    }

    /// A replication slot name unique in the cluster (slot names are cluster-wide).
    pub fn slot_name(&self) -> String {
        match self {
            Self::Shared { name, .. } => format!("sync_{name}"),
            Self::Own { .. } => deeprecall_sync::live::DEFAULT_SLOT.to_owned(),
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Self::Shared { cluster, name } = self else {
            return;
        };
        // In the background: the test's runtime is shutting down its server, whose connections (the walsender among
        // them) must be gone before the slot and the database can be dropped.
        let url = cluster.url("postgres");
        let name = std::mem::take(name);
        let _ = std::thread::Builder::new()
            .name(format!("drop {name}"))
            .spawn(move || {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(drop_database(&url, &name));
            });
    }
}

/// Terminates the database's sessions, drops its replication slots, then the database; retried while the
/// server's connections wind down.
async fn drop_database(url: &str, name: &str) {
    let Ok(config) = deeprecall_sync::db::parse_config(url) else {
        return;
    };
    let Ok((client, conn)) = config.connect(tokio_postgres::NoTls).await else {
        return;
    };
    tokio::spawn(conn);
    for _ in 0..300 {
        let _ = client
            .execute(
                "select pg_terminate_backend(pid) from pg_stat_activity
                  where datname = $1 and pid <> pg_backend_pid()",
                &[&name],
            )
            .await;
        let _ = client
            .execute(
                "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                  where database = $1 and not active",
                &[&name],
            )
            .await;
        if client
            .batch_execute(&format!("drop database if exists {name} with (force)"))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn start_cluster_blocking() -> LocalCluster {
    tokio::task::spawn_blocking(|| LocalCluster::start_temporary(&ClusterOptions::ephemeral()))
        .await
        .expect("cluster task")
        .expect("starting a throwaway Postgres cluster")
}

/// The binary's shared cluster, started (with the migrated template) by the first test that asks.
async fn shared_cluster() -> &'static LocalCluster {
    SHARED
        .get_or_init(|| async {
            let cluster = start_cluster_blocking().await;
            cluster
                .reap_when_process_exits(std::process::id())
                .expect("starting the cluster reaper");
            let admin = super::connect(&cluster.url("postgres")).await;
            admin
                .batch_execute(&format!("create database {TEMPLATE}"))
                .await
                .expect("create template database");
            let mut client = super::connect(&cluster.url(TEMPLATE)).await;
            deeprecall_sync::db::migrate::migrate(&mut client)
                .await
                .expect("migrating the template database");
            drop(client);
            cluster
        })
        .await
}
