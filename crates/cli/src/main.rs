use std::process::ExitCode;

use clap::Parser;

/// mimalloc: its per-thread free lists make the request path's small
/// allocations cheaper than glibc malloc (about a fifth less proxy CPU per
/// request in `bench/run`). Built with `no_thp`: with transparent huge pages
/// its first arena alone made an idle proxy 16 MB larger. docs/performance.md
/// has the figures.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Memory a large change freed goes back to the kernel when the
        // threads run out of work, not at the next change (`memory`).
        .on_thread_park(trellis::memory::on_park)
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run()),
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> ExitCode {
    let cli = trellis::cli::Cli::parse();
    if cli.command.prints_for_a_pipe() {
        restore_sigpipe();
    }
    trellis::init_logging();
    match trellis::run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Lets `trellis ps | head` end quietly, as any Unix tool does, instead of
/// panicking on a closed stdout. Only for the commands that print and exit:
/// servers keep Rust's ignored SIGPIPE so a peer that hangs up yields an
/// error on that socket rather than killing the process.
fn restore_sigpipe() {
    // SAFETY: signal(2) with SIG_DFL installs no handler code; it only
    // changes the process-wide disposition, once, at start-up.
    #[allow(unsafe_code)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
