//! The `deeprecall-sync` binary: parses the command line, sets up logging and hands over to the library.

use clap::Parser;
use deeprecall_sync::cli::{Cli, Exit, LogFormat};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    disable_transparent_huge_pages();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cli.worker_threads())
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(deeprecall_sync::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => match e.downcast_ref::<Exit>() {
            Some(Exit(code)) => std::process::ExitCode::from(*code),
            None => {
                // Each cause once: `{e:#}` printed a migration's failure as "… failed: db error: db error: ERROR: …".
                let e: &(dyn std::error::Error + 'static) = e.as_ref();
                eprintln!("error: {}", deeprecall_sync::error::Chain(e));
                std::process::ExitCode::FAILURE
            }
        },
    }
}

/// mimalloc asks the kernel for transparent huge pages on its memory (`madvise(MADV_HUGEPAGE)`), and returns freed
/// ranges to it shortly after; every later touch of such a range then faults in and zeroes a whole 2 MiB page. On
/// the live path, which allocates and frees many small buffers per row, that zeroing took over half the server's CPU
/// while it drained a replication backlog (`perf`: `clear_page_erms` under `do_huge_pmd_anonymous_page`), and read
/// throughput fell to 0.65x of `pg_recvlogical`; without huge pages it is 0.93-1.05x (docs/decisions.md 28). The
/// flag covers the whole process, whatever the system's THP mode; set before the runtime's threads allocate much.
fn disable_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("warning: could not disable transparent huge pages for this process: {e}");
    }
}

/// The log filter when RUST_LOG is not set. `pgwire_replication` is off: its one line above DEBUG is an ERROR
/// ("replication worker terminated with error") for every replication session that ends, which the replicator
/// already logs itself with what it does about it: one WARN for a standby (whose session ends every 0.5 s while
/// another process holds the slot, which made an ERROR line every 0.5 s), a WARN per retry, or an ERROR when it stops.
const DEFAULT_LOG_FILTER: &str = "info,tokio_postgres=warn,pgwire_replication=off";

/// Logs go to stderr (stdout is for what a command prints: tokens, `check` reports, `tail` frames), filtered by
/// RUST_LOG, by default [`DEFAULT_LOG_FILTER`].
fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        // One object per line: timestamp, level, target, the event's fields at the top level (`message`, …), the
        // innermost span as `span` and all enclosing spans as `spans` (the request span carries `request_id`).
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}
