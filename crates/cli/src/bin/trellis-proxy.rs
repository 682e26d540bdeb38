//! `trellis-proxy`: the sidecar alone. It runs `proxy` and `init` exactly
//! as the one `trellis` binary does (the same flags, from
//! `trellis_proxy::cli`), without the control plane, the CLI, the
//! Kubernetes client or the dashboard in its code: an idle sidecar holds
//! about a third less memory (docs/performance.md, "The one binary's
//! cost"). The sidecar image (`scripts/image --proxy`) installs it as
//! `/usr/local/bin/trellis`, so the injected `trellis proxy ...` and
//! `trellis init ...` run it unchanged.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use trellis_proxy::cli::{init, ProxyArgs};

/// mimalloc, built with `no_thp`, as in `trellis` (src/main.rs says why).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis sidecar: the proxy and the pod's redirect rules (a proxy-only build of trellis)"
)]
struct Cli {
    /// The namespace of the proxy's workload (default: `default`).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The sidecar proxy.
    Proxy(Box<ProxyArgs>),
    /// Install a pod's redirect rules (nftables) in this network namespace.
    Init(init::InitArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    trellis_proxy::cli::init_logging();
    let ran = match &cli.command {
        Command::Init(a) => init::run(a),
        Command::Proxy(a) => {
            trellis_proxy::cli::config(cli.namespace.as_deref(), a).and_then(|cfg| {
                trellis_proxy::cli::runtime(&cfg)?.block_on(trellis_proxy::cli::run(cfg))
            })
        }
    };
    ran.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_what_the_injector_passes() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "trellis",
            "proxy",
            "--transparent",
            "--mark",
            "off",
            "--control-plane",
            "trellis-control.trellis-system.svc:15010",
            "--workload",
            "web",
            "--namespace",
            "shop",
            "--service-account",
            "web",
            "--token-file",
            "/t",
            "--app-port",
            "8080",
            "--ca-pin",
            "ab",
        ])
        .unwrap();
        let Command::Proxy(p) = &cli.command else {
            panic!()
        };
        let cfg = trellis_proxy::cli::config(cli.namespace.as_deref(), p).unwrap();
        assert_eq!(
            (cfg.namespace.as_str(), cfg.workload.as_str()),
            ("shop", "web")
        );
        assert!(cfg.transparent.is_some());
        let cli =
            Cli::try_parse_from(["trellis", "init", "--proxy-uid", "1337", "--dry-run"]).unwrap();
        assert!(matches!(cli.command, Command::Init(_)));
        // Nothing else of the one binary is here.
        assert!(Cli::try_parse_from(["trellis", "control"]).is_err());
    }
}
