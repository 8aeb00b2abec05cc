//! Process signals.

/// Resolves on Ctrl-C (SIGINT) or SIGTERM.
pub async fn signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = unix_signal(tokio::signal::unix::SignalKind::terminate());
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}

/// Resolves on SIGINT, SIGTERM or SIGHUP: for `dev`, run in a terminal. Its terminal closing (an SSH session
/// dropped) sends SIGHUP, whose default action ended the process at once and left its local Postgres running (a
/// Postgres started by `pg_ctl` is in a session of its own, so the hangup does not reach it). `serve` keeps the
/// default: under `nohup` a handler would replace the ignored disposition and stop a server meant to outlive its
/// terminal.
///
/// Under `nohup` (SIGHUP ignored when the process starts) the hangup stays ignored: a handler would replace that
/// disposition and stop a `dev` its user meant to outlive the terminal.
pub async fn signal_or_hangup() {
    if hangup_ignored() {
        return signal().await;
    }
    let hangup = unix_signal(tokio::signal::unix::SignalKind::hangup());
    tokio::select! {
        () = signal() => {},
        () = hangup => {},
    }
}

/// Resolves on the first `kind` signal (never, if its handler cannot be installed).
async fn unix_signal(kind: tokio::signal::unix::SignalKind) {
    match tokio::signal::unix::signal(kind) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending::<()>().await,
    }
}

/// Whether SIGHUP is ignored by this process (bit 0 of `SigIgn` in /proc/self/status: `nohup` sets it). Read
/// before any handler is installed, as [`signal_or_hangup`] does: a handler clears it.
fn hangup_ignored() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("SigIgn:"))
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
        })
        .is_some_and(|mask| mask & 1 != 0)
}

/// Resolves once `flag` is true (or its sender is gone). Holds no borrow across the await, so the future is Send.
pub async fn until_true(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}
