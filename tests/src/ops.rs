//! Helpers for the operator-facing tests (issue 10): the server binary as a subprocess, a Postgres cluster that
//! speaks TLS with certificates made by the test, and a server started against an arbitrary DATABASE_URL.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use deeprecall_sync::pgcluster::{ClusterOptions, LocalCluster};

/// The `deeprecall-sync` binary, built on first use (`cargo build -p deeprecall-sync --bin deeprecall-sync` into
/// the target directory this test runs from). A test crate cannot depend on another package's binary, and running
/// the real binary is the point of the tests that use it.
pub fn server_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test executable path");
        // <target>/<profile>/deps/<test>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("test executable in <target>/<profile>/deps");
        let target_dir = profile_dir.parent().expect("target dir");
        let cargo = std::env::var("CARGO")
            .ok()
            .or_else(|| option_env!("CARGO").map(str::to_owned))
            .unwrap_or_else(|| "cargo".to_owned());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "deeprecall-sync",
            "--bin",
            "deeprecall-sync",
        ])
        .arg("--target-dir")
        .arg(target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "cargo build of deeprecall-sync failed");
        let bin = profile_dir.join("deeprecall-sync");
        assert!(bin.is_file(), "{} missing after the build", bin.display());
        bin
    })
    .clone()
}

/// What a finished subprocess left.
#[derive(Debug)]
pub struct Finished {
    /// Exit code (None: killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

/// Runs `deeprecall-sync <args>` with `env` added (and DATABASE_URL and friends from the test's own environment
/// removed), on a blocking thread.
pub async fn run_bin(args: &[&str], env: &[(&str, &str)]) -> Finished {
    let bin = server_bin();
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new(bin);
        cmd.args(&args).stdin(std::process::Stdio::null());
        for (k, _) in std::env::vars() {
            if k == "DATABASE_URL" || k.starts_with("DEEPRECALL_") || k == "RUST_LOG" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(env);
        let out = cmd.output().expect("running deeprecall-sync");
        Finished {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    })
    .await
    .expect("subprocess task")
}

/// Certificates made for one test: a CA, a server certificate it signed, and an unrelated second CA.
pub struct TestPki {
    /// The CA that signed the server's certificate (PEM).
    pub ca_pem: String,
    /// Another CA that signed nothing the server presents (PEM).
    pub other_ca_pem: String,
    /// The server's certificate (PEM).
    pub server_cert_pem: String,
    /// The server's private key (PEM).
    pub server_key_pem: String,
}

fn make_ca(name: &str) -> rcgen::CertifiedIssuer<'static, rcgen::KeyPair> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("ca key"))
        .expect("self-signed CA")
}

impl TestPki {
    /// A CA and a server certificate for `names` (DNS names only).
    pub fn new(names: &[&str]) -> Self {
        let ca = make_ca("deeprecall test CA");
        let other = make_ca("some other CA");
        let mut params = rcgen::CertificateParams::new(
            names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>(),
        )
        .expect("server params");
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().copied().unwrap_or("db"),
        );
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let key = rcgen::KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        Self {
            ca_pem: ca.pem(),
            other_ca_pem: other.pem(),
            server_cert_pem: cert.pem(),
            server_key_pem: key.serialize_pem(),
        }
    }
}

/// A throwaway cluster that accepts only TLS connections (`hostssl` lines only in its pg_hba.conf), with the
/// test's certificates, and the test database created. The CA files for clients are in [`TlsCluster::dir`].
pub struct TlsCluster {
    /// The cluster (listens on 127.0.0.1).
    pub cluster: LocalCluster,
    /// The certificates.
    pub pki: TestPki,
    /// Holds `ca.pem` and `other-ca.pem` for clients.
    pub dir: tempfile::TempDir,
}

impl TlsCluster {
    /// Starts it (server certificate for `localhost`).
    pub async fn start() -> Self {
        let pki = TestPki::new(&["localhost"]);
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("ca.pem"), &pki.ca_pem).expect("ca.pem");
        std::fs::write(dir.path().join("other-ca.pem"), &pki.other_ca_pem).expect("other-ca.pem");
        let server_cert = pki.server_cert_pem.clone();
        let server_key = pki.server_key_pem.clone();
        let cluster = tokio::task::spawn_blocking(move || {
            let mut cluster = LocalCluster::start_temporary(&ClusterOptions::ephemeral())?;
            // Stopped even if the test binary is killed rather than unwinding.
            cluster.reap_when_process_exits(std::process::id())?;
            // Files Postgres reads must belong to the user it runs as (as root: `postgres`, who owns the base
            // directory), and the key must not be readable by others or Postgres refuses to start.
            let base = cluster.base_dir().to_path_buf();
            let owner = std::fs::metadata(&base).expect("base dir");
            let write = |name: &str, text: &str, mode: u32| {
                use std::os::unix::fs::PermissionsExt;
                let path = base.join(name);
                std::fs::write(&path, text).expect("write");
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
                    .expect("chmod");
                std::os::unix::fs::chown(&path, Some(owner.uid()), Some(owner.gid()))
                    .expect("chown");
                path
            };
            let cert = write("server.crt", &server_cert, 0o644);
            let key = write("server.key", &server_key, 0o600);
            let hba = write(
                "pg_hba_tls.conf",
                "# TLS only: a plain-TCP connection finds no line and is refused.\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256\n\
                 hostssl all all ::1/128 scram-sha-256\n",
                0o644,
            );
            let quoted = |p: &Path| format!("'{}'", p.display());
            cluster.start(&ClusterOptions {
                ephemeral: true,
                extra_settings: vec![
                    ("ssl".into(), "on".into()),
                    ("ssl_cert_file".into(), quoted(&cert)),
                    ("ssl_key_file".into(), quoted(&key)),
                    ("hba_file".into(), quoted(&hba)),
                ],
            })?;
            Ok::<_, deeprecall_sync::pgcluster::ClusterError>(cluster)
        })
        .await
        .expect("cluster task")
        .expect("starting a TLS cluster");
        let this = Self { cluster, pki, dir };
        let admin = deeprecall_sync::db::PgTarget::parse(&this.url("postgres", "sslmode=require"))
            .expect("admin url")
            .connect()
            .await
            .expect("connecting over TLS");
        admin
            .batch_execute(&format!("create database {}", crate::DB_NAME))
            .await
            .expect("create database");
        this
    }

    /// The CA that signed the server's certificate.
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A CA that did not.
    pub fn other_ca_path(&self) -> PathBuf {
        self.dir.path().join("other-ca.pem")
    }

    /// A superuser URL for `database` on host `localhost` with the query string `params`.
    pub fn url(&self, database: &str, params: &str) -> String {
        self.url_with_host("localhost", database, params)
    }

    /// Like [`TlsCluster::url`] with another host part (e.g. `127.0.0.1`).
    pub fn url_with_host(&self, host: &str, database: &str, params: &str) -> String {
        format!(
            "postgres://{}:{}@{host}:{}/{database}?{params}",
            deeprecall_sync::pgcluster::SUPERUSER,
            self.cluster.password(),
            self.cluster.port()
        )
    }
}

/// A server started in-process against any DATABASE_URL, listening on 127.0.0.1:0.
pub struct UrlServer {
    /// `http://127.0.0.1:port`.
    pub base: String,
    /// Its address.
    pub addr: SocketAddr,
    /// The running server.
    pub server: deeprecall_sync::cli::Server,
    http: tokio::task::JoinHandle<()>,
}

impl UrlServer {
    /// Migrates and serves `database_url` with the test secret.
    pub async fn start(database_url: &str) -> Self {
        Self::start_on_slot(database_url, deeprecall_sync::live::DEFAULT_SLOT).await
    }

    /// Like [`UrlServer::start`], reading replication slot `slot` (e.g. a `TestEnv`'s, for two servers on one
    /// slot).
    pub async fn start_on_slot(database_url: &str, slot: &str) -> Self {
        let mut options =
            deeprecall_sync::cli::ServerOptions::new(database_url, crate::test_auth());
        options.pool_size = 4;
        options.slot = slot.to_owned();
        let server = deeprecall_sync::cli::start_server(options)
            .await
            .expect("starting the server");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = server.state.clone();
        let signal = server.shutdown_signal();
        let http = tokio::spawn(async move {
            let _ = deeprecall_sync::app::serve(listener, state, signal).await;
        });
        Self {
            base: format!("http://{addr}"),
            addr,
            server,
            http,
        }
    }

    /// A user token.
    pub fn token(&self, user: uuid::Uuid) -> String {
        self.server
            .state
            .auth
            .mint(user, false, 3600)
            .expect("mint")
    }

    /// Shuts down gracefully.
    pub async fn stop(self) {
        self.server.shutdown().await;
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), self.http).await;
    }
}

/// Waits (up to 120 s) until the server at `base` (`http://host:port`) answers `/readyz` with 200: a subprocess
/// started with `serve` or `dev`.
pub async fn until_ready(base: &str) {
    let http = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(format!("{base}/readyz")).send().await
            && r.status().is_success()
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server at {base} did not come up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Picks a free port on 127.0.0.1 (for a subprocess's --listen).
pub fn free_port() -> u16 {
    deeprecall_sync::pgcluster::free_port().expect("free port")
}
