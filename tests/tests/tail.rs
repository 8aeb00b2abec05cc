//! `deeprecall-sync tail` against a running server: what it prints and when it ends.

use std::time::Duration;

use deeprecall_tests::TestEnv;
use deeprecall_tests::ops::server_bin;
use tokio::io::{AsyncBufReadExt, BufReader};
use uuid::Uuid;

fn tail(env: &TestEnv, tables: &[&str]) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(server_bin());
    command
        .args([
            "tail",
            "--url",
            &env.base,
            "--token",
            &env.token(Uuid::new_v4()),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    for table in tables {
        command.args(["--table", table]);
    }
    command
}

#[tokio::test]
async fn tail_ends_when_the_server_refuses_every_subscription() {
    // It printed the refusal of `--table nosuch` and then waited for ever, watching nothing.
    let env = TestEnv::start().await;
    let out = tokio::time::timeout(Duration::from_secs(60), tail(&env, &["nosuch"]).output())
        .await
        .expect("tail --table nosuch did not end")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains(r#""type":"error""#), "{stdout}");
    assert!(stderr.contains("unknown_table"), "{stderr}");

    // With one subscription the server took, it keeps watching, after the refusal of the other (and a table
    // named twice is subscribed once, not refused as a duplicate).
    let mut child = tail(&env, &["works", "nosuch", "works"]).spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let refusal = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains(r#""type":"error""#) {
                return line;
            }
        }
        panic!("tail ended without printing the refusal");
    })
    .await
    .expect("no refusal printed");
    assert!(refusal.contains("nosuch"), "{refusal}");
    let ended = tokio::time::timeout(Duration::from_secs(3), child.wait()).await;
    assert!(
        ended.is_err(),
        "tail ended with a live subscription: {ended:?}"
    );
}
