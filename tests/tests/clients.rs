//! The JavaScript suites under clients/, run by `cargo test --workspace` so that the README's test command runs
//! every test: the TypeScript client (unit tests, and end to end in headless Chromium), the unmodified Electric
//! client against `/v1/shape`, and the admin page in headless Chromium. Each suite starts its own server binary
//! (built here) and Postgres (`clients/test-server.mjs`).
//!
//! They need Node.js 20 with npm, the npm registry (`npm ci`) and Debian's `chromium` (`.ci/run` installs what is
//! missing; the suites' own scripts install chromium when run as root). Without them these tests fail, and say
//! what is missing: they are tests, not optional extras.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

/// One suite at a time: two browser suites side by side on two cores only make each other slow.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the repository")
        .to_path_buf()
}

fn run_suite(script: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for (tool, hint) in [
        ("node", "Node.js 20 (Debian: apt-get install nodejs)"),
        ("npm", "npm (Debian: apt-get install npm)"),
    ] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(found, "{script} needs {tool}: install {hint}");
    }
    let bin = deeprecall_tests::ops::server_bin();
    let status = Command::new("bash")
        .arg(repo_root().join(script))
        .current_dir(repo_root())
        .env("DEEPRECALL_BIN", &bin)
        .status()
        .unwrap_or_else(|e| panic!("running {script}: {e}"));
    assert!(
        status.success(),
        "{script} failed ({status}); its output is above"
    );
}

#[test]
fn typescript_client_unit_and_browser_tests() {
    run_suite("clients/typescript/run-tests.sh");
}

#[test]
fn unmodified_electric_client_against_the_shape_api() {
    run_suite("clients/electric-compat/run.sh");
}

#[test]
fn admin_page_in_a_browser() {
    run_suite("clients/admin-e2e/run.sh");
}
