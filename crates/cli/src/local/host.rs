//! Process mode: every app and sidecar is a process on this host, on free
//! loopback ports; an app reaches the mesh through the `HTTP_PROXY` that
//! points at its sidecar, and so does `trellis exec`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use trellis_resource::Resource;

use super::plan::{self, Replica, ReplicaPorts, LOCALHOST};
use super::runner::{Layout, Placement, ReplicaAddrs};
use super::state::RunState;
use crate::cli::{ExecArgs, Global};

/// The placement of process mode.
pub struct Host;

impl Placement for Host {
    type Args = ();

    const DETACHED: &'static str = "`trellis ps` lists it, `trellis down` stops it";

    fn lay_out(resources: &[Resource], _data_dir: &Path, (): ()) -> anyhow::Result<Layout<Host>> {
        // Two for the control plane, four per replica.
        let n = plan::replica_count(resources);
        let ports = plan::free_ports(2 + 4 * n).context("finding free ports on 127.0.0.1")?;
        Ok(Layout {
            placement: Host,
            replicas: plan::replicas(resources, &ports[2..]),
            http: ReplicaPorts::addr(ports[0]),
            grpc: ReplicaPorts::addr(ports[1]),
        })
    }

    fn command(&self, _k: usize, program: PathBuf, args: Vec<String>) -> (PathBuf, Vec<String>) {
        (program, args)
    }

    fn app_env(&self, r: &Replica) -> Vec<(String, String)> {
        r.app_env()
    }

    fn proxy_args(
        &self,
        _k: usize,
        r: &Replica,
        grpc: &[SocketAddr],
        data_dir: &Path,
    ) -> Vec<String> {
        r.proxy_args(grpc, data_dir, LOCALHOST.into())
    }

    fn addrs(&self, _k: usize, r: &Replica) -> ReplicaAddrs {
        ReplicaAddrs {
            app: ReplicaPorts::addr(r.ports.app),
            admin: ReplicaPorts::addr(r.ports.admin),
            inbound: ReplicaPorts::addr(r.ports.inbound),
            outbound: ReplicaPorts::addr(r.ports.outbound),
        }
    }

    async fn app_serves(&self, _k: usize, r: &Replica, _pid: u32) -> bool {
        tokio::net::TcpStream::connect(ReplicaPorts::addr(r.ports.app))
            .await
            .is_ok()
    }
}

/// `trellis exec` in process mode: CMD with `HTTP_PROXY` pointing at the
/// replica's sidecar.
pub fn exec(
    global: &Global,
    args: &ExecArgs,
    workload: &str,
    replica: u32,
) -> anyhow::Result<ExitCode> {
    let state =
        RunState::read(&global.data_dir)?.ok_or_else(|| anyhow::anyhow!(super::no_mesh(global)))?;
    let ns = global.namespace.as_deref();
    let Some(proxy) = state.proxy_of(workload, ns, replica) else {
        let n = state
            .apps()
            .filter(|p| {
                p.workload.as_deref() == Some(workload)
                    && ns.is_none_or(|ns| p.namespace.as_deref() == Some(ns))
            })
            .count();
        return Err(super::no_replica(global, workload, replica, n));
    };
    if !proxy.is_running() {
        anyhow::bail!(
            "the sidecar of {} is not running: see {}",
            proxy.target(),
            proxy.log.display()
        );
    }
    let outbound = proxy.addresses.outbound.ok_or_else(|| {
        anyhow::anyhow!("run.json has no outbound address for {}", proxy.target())
    })?;
    let url = format!("http://{outbound}");
    let (program, rest) = args.command.split_first().expect("clap requires a command");
    let status = std::process::Command::new(program)
        .args(rest)
        .env("HTTP_PROXY", &url)
        .env("http_proxy", &url)
        .env("NO_PROXY", "")
        .env("no_proxy", "")
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run {program:?}: {e}"))?;
    Ok(super::exit_code(status))
}
