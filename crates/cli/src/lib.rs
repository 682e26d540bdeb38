//! The `trellis` binary: one CLI for the control plane, the sidecar proxy,
//! the local mesh of `trellis up`, the demo, and kubectl-like resource
//! management. `main.rs` only parses and calls [`run`].
//!
//! Unsafe code is denied except in `local::process`, which needs libc to
//! start children in their own session and to signal process groups.
#![deny(unsafe_code)]

pub mod cli;
pub mod client;
pub mod dashboard;
pub mod demo;
pub mod demo_app;
pub mod duration;
pub mod http;
pub mod identity_cmd;
/// `trellis init` (the pod's redirect rules) lives with the proxy, which
/// the proxy-only binary shares.
pub use trellis_proxy::cli::init;
pub mod kube_cmd;
pub mod kube_control;
pub mod kube_observe;
pub mod local;
pub mod memory;
pub mod observe;
pub mod observe_live;
pub mod resources;
pub mod servers;
pub mod signals;
pub mod table;
pub mod traffic_stat;

use std::process::ExitCode;

use cli::{Cli, Command};

/// Runs one command. Errors are for `main` to print; an `ExitCode` other
/// than success is a failure the command already explained.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match &cli.command {
        Command::Demo(args) => demo::run(args).await,
        Command::Up(args) => local::up(g, args).await,
        Command::Down => local::down(g),
        Command::Exec(args) => local::exec(g, args),
        Command::Ps => local::ps(g),
        Command::Control(args) => servers::control(g, args).await,
        Command::Proxy(args) => servers::proxy(g, args).await,
        Command::Apply(args) => resources::apply(g, args).await,
        Command::Get(args) => resources::get(g, args).await,
        Command::Delete(args) => resources::delete(g, args).await,
        Command::Describe(args) => resources::describe(g, args).await,
        Command::Stat(args) if args.traffic => traffic_stat::stat(g, args).await,
        Command::Stat(args) => observe::stat(g, args).await,
        Command::Trace(args) => observe_live::trace(g, args).await,
        Command::Edges(args) => observe_live::edges(g, args).await,
        Command::Tap(args) => observe_live::tap(g, args).await,
        Command::Top(args) => observe_live::top(g, args).await,
        Command::Dashboard(args) => dashboard::run(g, args).await,
        Command::Check(a) if a.kubernetes => kube_cmd::check(g, a).await,
        Command::Check(_) => observe::check(g).await,
        Command::DemoApp(args) => demo_app::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Token(t) => identity_cmd::token(g, &t.command).await,
        Command::Ca(c) => identity_cmd::ca(g, &c.command).await,
        Command::Init(a) => init::run(a),
        Command::Install(a) => kube_cmd::install(g, a).await,
        Command::Uninstall(a) => kube_cmd::uninstall(g, a),
        Command::Inject(a) => kube_cmd::inject(a).await,
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); colours only
/// on a terminal, since the processes of `trellis up` log to files.
pub use trellis_proxy::cli::init_logging;
