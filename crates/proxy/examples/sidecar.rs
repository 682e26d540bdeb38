//! A proxy-only binary: the sidecar without the control plane, the CLI,
//! the Kubernetes client and the dashboard that share the `trellis`
//! binary. It exists to measure what that sharing costs an idle proxy in
//! resident memory (docs/performance.md, "Memory"); `trellis proxy` is
//! the sidecar users run.
//!
//! ```text
//! cargo build --release -p trellis-proxy --example sidecar
//! target/release/examples/sidecar CONTROL_PLANE WORKLOAD APP_PORT TOKEN_FILE \
//!     INBOUND OUTBOUND ADMIN CACHE_DIR
//! ```
//!
//! The join token pins the CA. It starts the proxy as `trellis proxy` does
//! with those flags (same allocator, same runtime) and runs until SIGINT or SIGTERM.

use std::process::ExitCode;

use trellis_proxy::{Proxy, ProxyConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const USAGE: &str =
    "usage: sidecar CONTROL_PLANE WORKLOAD APP_PORT TOKEN_FILE INBOUND OUTBOUND ADMIN CACHE_DIR";

fn config(args: &[String]) -> Result<ProxyConfig, String> {
    let [control_plane, workload, app_port, token_file, inbound, outbound, admin, cache] = args
    else {
        return Err(USAGE.to_string());
    };
    let addr = |s: &String| s.parse().map_err(|e| format!("{s:?}: {e}"));
    let mut cfg = ProxyConfig::new(
        control_plane.clone(),
        workload.clone(),
        app_port.parse().map_err(|e| format!("{app_port:?}: {e}"))?,
    );
    cfg.namespace = "default".to_string();
    cfg.token_file = Some(token_file.into());
    cfg.inbound_addr = addr(inbound)?;
    cfg.outbound_addr = addr(outbound)?;
    cfg.admin_addr = addr(admin)?;
    cfg.cache_dir = Some(cache.into());
    cfg.validate().map_err(|e| e.to_string())?;
    Ok(cfg)
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let cfg = match config(&args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("sidecar: {e}");
            return ExitCode::from(64);
        }
    };
    let proxy = match Proxy::start(cfg).await {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sidecar: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    proxy.shutdown().await;
    ExitCode::SUCCESS
}
