//! Waiting for the signals that ask a process to stop.

use tokio::signal::unix::{signal, SignalKind};

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown() {
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            // Without a SIGTERM handler Ctrl-C still works; say why
            // `kill` would end the process abruptly.
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
