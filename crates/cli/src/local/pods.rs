//! `trellis up --mode pods`: every Workload replica is a pod, its own
//! network namespace on a bridge, running its app and its sidecar. The
//! pod's redirect rules (`trellis init`) send the app's outbound TCP, its
//! DNS and the inbound TCP through the sidecar, so apps need no proxy
//! settings: `curl http://catalog:8080/` just works.
//!
//! The control plane runs on the host: its proxy API on the bridge's
//! gateway address, its HTTP API on the host's loopback only.
//! The record of processes is `run.json` as in process mode; the network
//! is in `pods.json` (see `podnet`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use trellis_proxy::transparent;
use trellis_resource::Resource;

use super::mesh::{remove_state_dirs, stop_state, STOPPING};
use super::plan::{self, Replica};
use super::podnet::{self, Pod, PodNet};
use super::process::{self, Running, Spec};
use super::state::{Addresses, ControlInfo, ProcessInfo, Role, RunState};
use crate::cli::{ExecArgs, Global};
use crate::client::{Api, ApplyAnswer};
use crate::http::HttpClient;

pub struct Options {
    pub data_dir: PathBuf,
    pub detach: bool,
    pub timeout: Duration,
    /// `--subnet`; omitted: a free /24 in 10.200.0.0-10.249.255.0.
    pub subnet: Option<String>,
}

/// A pods-mode mesh owned by this process.
pub struct PodMesh {
    pub state: RunState,
    pub net: PodNet,
    data_dir: PathBuf,
    replicas: Vec<(Replica, Pod)>,
    workloads: usize,
    children: Vec<Running>,
}

/// The sidecar's listeners inside every pod: the defaults of the SPEC.
fn pod_addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

impl PodMesh {
    /// Validates, creates the network, starts everything and waits until
    /// every replica serves. On error nothing is left: no process, no link,
    /// no namespace.
    pub async fn start(
        loaded: Vec<(Resource, trellis_resource::Source)>,
        opts: &Options,
    ) -> anyhow::Result<PodMesh> {
        podnet::check_host()?;
        let (resources, sources): (Vec<Resource>, Vec<_>) = loaded.into_iter().unzip();
        if let Err(e) = trellis_resource::validate_apply(&resources, &sources, &[]) {
            anyhow::bail!(
                "nothing was started:\n{}",
                crate::resources::indent(&e.to_string())
            );
        }
        prepare_data_dir(&opts.data_dir)?;

        // Each replica's app listens on its Workload's port, the sidecar on
        // the default ports: every pod has the whole port range to itself.
        let mut ports = Vec::new();
        for r in &resources {
            let Some(w) = r.as_workload() else { continue };
            for _ in 0..w.replicas {
                ports.extend([
                    w.port,
                    transparent::INBOUND_PORT,
                    transparent::OUTBOUND_PORT,
                    transparent::ADMIN_PORT,
                ]);
            }
        }
        let replicas = plan::replicas(&resources, &ports);
        let workloads = resources
            .iter()
            .filter(|r| r.as_workload().is_some())
            .count();

        let routes = podnet::host_routes()?;
        let id = podnet::run_id();
        let subnet = podnet::choose_subnet(
            opts.subnet.as_deref(),
            &routes,
            replicas.len(),
            u32::from_str_radix(&id, 16).unwrap_or(0),
        )?;
        let gateway = subnet.host(1).expect("a subnet with room has a gateway");
        let mut pods = Vec::new();
        for (k, r) in replicas.iter().enumerate() {
            let ip = subnet
                .host(2 + k as u32)
                .expect("choose_subnet checked the room");
            pods.push(Pod {
                netns: format!("trellis-{id}-{k}"),
                veth: format!("trv{id}n{k}"),
                ip,
                workload: r.workload.clone(),
                namespace: r.namespace.clone(),
                replica: r.replica,
                instance: r.instance.clone(),
            });
        }
        let net = PodNet {
            bridge: format!("trb{id}"),
            id,
            subnet,
            gateway,
            pods: pods.clone(),
        };
        // Recorded before anything exists, so a crash at any point leaves
        // a record that `down` cleans up from.
        net.write(&opts.data_dir)?;

        let free = plan::free_ports(2).context("finding free ports for the control plane")?;
        // The HTTP API stays on the host's loopback: pods reach only the
        // proxy API (on the gateway), never the API that holds the keys.
        let http = pod_addr(Ipv4Addr::LOCALHOST, free[0]);
        let grpc = pod_addr(gateway, free[1]);
        let mut mesh = PodMesh {
            state: RunState {
                control: ControlInfo { pid: 0, http, grpc },
                processes: Vec::new(),
            },
            net,
            data_dir: opts.data_dir.clone(),
            replicas: replicas.into_iter().zip(pods).collect(),
            workloads,
            children: Vec::new(),
        };
        match mesh.start_all(&resources, opts).await {
            Ok(()) => Ok(mesh),
            Err(e) => {
                eprintln!("start-up failed: stopping and removing what was started");
                mesh.stop();
                Err(e)
            }
        }
    }

    async fn start_all(&mut self, resources: &[Resource], opts: &Options) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the trellis binary")?;
        eprintln!(
            "creating bridge {} ({}) and {} pods",
            self.net.bridge,
            self.net.subnet,
            self.replicas.len()
        );
        self.net.create_bridge()?;
        for (_, pod) in &self.replicas {
            self.net.create_pod(pod)?;
            // The pod's redirect rules; the control plane's ports are
            // reached directly (its API and OTLP clients do not mark their
            // sockets).
            let excluded = format!(
                "{},{}",
                self.state.control.http.port(),
                self.state.control.grpc.port()
            );
            podnet::run(&[
                "ip",
                "netns",
                "exec",
                &pod.netns,
                &exe.display().to_string(),
                "init",
                "--exclude-outbound-ports",
                &excluded,
            ])?;
        }

        let (http, grpc) = (self.state.control.http, self.state.control.grpc);
        eprintln!("starting the control plane (http {http}, grpc {grpc})");
        let args = vec![
            "control".to_string(),
            "--data-dir".to_string(),
            self.data_dir.join("control").display().to_string(),
            "--http-addr".to_string(),
            http.to_string(),
            "--grpc-addr".to_string(),
            grpc.to_string(),
        ];
        self.spawn(
            None,
            &exe,
            args,
            vec![],
            "control",
            Role::Control,
            None,
            opts,
        )?;
        self.state.control.pid = self.children[0].pid;
        self.state.processes[0].addresses = Addresses {
            http: Some(http),
            grpc: Some(grpc),
            ..Addresses::default()
        };
        self.state.write(&self.data_dir)?;

        let api = Api::new(
            &self.state.control_url(),
            "the control plane this `up` started",
        )?;
        let deadline = Instant::now() + opts.timeout;
        loop {
            self.check_children()?;
            if api.ok("/readyz").await.unwrap_or(false) {
                break;
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the control plane was not ready within {:?}: see {}",
                    opts.timeout,
                    self.children[0].log.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let api = api.with_token(crate::client::local_admin_token(&self.data_dir)?);
        let answer: ApplyAnswer = api
            .post("/api/v1/apply", &resources)
            .await
            .context("applying the resources")?;
        eprintln!(
            "control plane ready; applied {} resources",
            answer.results.len()
        );

        // Names outside the mesh: the sidecars ask the host's nameservers.
        let upstreams = trellis_proxy::dns::system_nameservers(
            &std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default(),
        );
        let replicas = self.replicas.clone();
        for (r, pod) in &replicas {
            let Some(cmd0) = r.command.first() else {
                anyhow::bail!(
                    "workload {}: `command` is empty: name the program to run",
                    r.workload
                );
            };
            // No proxy settings: the pod's rules do the routing.
            let env: Vec<(String, String)> = r
                .app_env()
                .into_iter()
                .filter(|(k, _)| {
                    !k.eq_ignore_ascii_case("http_proxy") && !k.eq_ignore_ascii_case("no_proxy")
                })
                .collect();
            self.spawn(
                Some(&pod.netns),
                &plan::program(cmd0, &exe),
                r.app_args(),
                env,
                &r.instance,
                Role::App,
                Some(r),
                opts,
            )?;
            self.last().addresses.app = Some(pod_addr(pod.ip, r.ports.app));

            let token: TokenAnswer = api
                .post(
                    "/api/v1/tokens",
                    &serde_json::json!({
                        "namespace": r.namespace,
                        "serviceAccount": r.effective_service_account(),
                        "labels": r.labels,
                        "ttl": "8760h",
                    }),
                )
                .await
                .with_context(|| format!("making a join token for {}", r.instance))?;
            let path = r.token_path(&self.data_dir);
            std::fs::create_dir_all(path.parent().expect("tokens live in a folder"))?;
            trellis_identity::write_secret(&path, token.token.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            let args = proxy_args(r, pod, grpc, &self.data_dir, &upstreams);
            self.spawn(
                Some(&pod.netns),
                &exe,
                args,
                vec![],
                &format!("{}-proxy", r.instance),
                Role::Proxy,
                Some(r),
                opts,
            )?;
            self.last().addresses = Addresses {
                admin: Some(pod_addr(pod.ip, transparent::ADMIN_PORT)),
                inbound: Some(pod_addr(pod.ip, transparent::INBOUND_PORT)),
                outbound: Some(pod_addr(Ipv4Addr::LOCALHOST, transparent::OUTBOUND_PORT)),
                app: Some(pod_addr(pod.ip, r.ports.app)),
                ..Addresses::default()
            };
            self.state.write(&self.data_dir)?;
        }
        self.wait_for_replicas(opts.timeout).await
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        netns: Option<&str>,
        program: &Path,
        args: Vec<String>,
        env: Vec<(String, String)>,
        name: &str,
        role: Role,
        replica: Option<&Replica>,
        opts: &Options,
    ) -> anyhow::Result<()> {
        let log = self.data_dir.join("logs").join(format!("{name}.log"));
        // `ip netns exec` enters the namespace (and mounts the pod's
        // resolv.conf), then execs the program: the pid stays the program's.
        let (program, args) = match netns {
            Some(ns) => {
                let mut a = vec![
                    "netns".to_string(),
                    "exec".to_string(),
                    ns.to_string(),
                    program.display().to_string(),
                ];
                a.extend(args);
                (PathBuf::from("ip"), a)
            }
            None => (program.to_path_buf(), args),
        };
        let running = process::spawn(&Spec {
            name: name.to_string(),
            program,
            args,
            env,
            log: log.clone(),
            die_with_parent: !opts.detach,
        })?;
        self.state.processes.push(ProcessInfo {
            name: name.to_string(),
            role,
            workload: replica.map(|r| r.workload.clone()),
            namespace: replica.map(|r| r.namespace.clone()),
            replica: replica.map(|r| r.replica),
            pid: running.pid,
            start_time: running.start_time,
            addresses: Addresses::default(),
            log,
        });
        self.children.push(running);
        Ok(())
    }

    fn last(&mut self) -> &mut ProcessInfo {
        self.state.processes.last_mut().expect("just pushed")
    }

    fn check_children(&mut self) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Ok(Some(status)) = c.child.try_wait() {
                anyhow::bail!(
                    "{} exited during start-up ({status}); the end of {}:\n{}",
                    c.name,
                    c.log.display(),
                    crate::resources::indent(&process::log_tail(&c.log, 15))
                );
            }
        }
        Ok(())
    }

    /// Each sidecar's /ready (through the pod's IP; the admin port is not
    /// redirected) and each app listening in its namespace.
    async fn wait_for_replicas(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = HttpClient::direct();
        let deadline = Instant::now() + timeout;
        let mut shown = usize::MAX;
        loop {
            self.check_children()?;
            let mut waiting = Vec::new();
            for (r, pod) in &self.replicas {
                let app_pid = self
                    .state
                    .processes
                    .iter()
                    .find(|p| p.role == Role::App && p.name == r.instance)
                    .map(|p| p.pid);
                let app = app_pid.is_some_and(|pid| listening(pid, r.ports.app));
                let url = format!("http://{}/ready", pod_addr(pod.ip, transparent::ADMIN_PORT));
                let proxy = client
                    .get(&url, Duration::from_secs(1))
                    .await
                    .is_ok_and(|resp| resp.status().is_success());
                if !(app && proxy) {
                    waiting.push(format!(
                        "{} ({})",
                        r.instance,
                        match (app, proxy) {
                            (false, true) => "app",
                            (true, false) => "proxy",
                            _ => "app, proxy",
                        }
                    ));
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if waiting.len() != shown {
                shown = waiting.len();
                eprintln!(
                    "waiting for pods: {}/{} ready; waiting for {}",
                    self.replicas.len() - waiting.len(),
                    self.replicas.len(),
                    waiting.join(", ")
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "not ready within {timeout:?}: {}; see their logs in {}",
                    waiting.join(", "),
                    self.data_dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn ready_line(&self) -> String {
        format!(
            "ready: {} workloads, {} replicas in pods on {} ({}); control plane {}",
            self.workloads,
            self.replicas.len(),
            self.net.bridge,
            self.net.subnet,
            self.state.control_url()
        )
    }

    /// Runs until Ctrl-C/SIGTERM, or until `trellis down` removed the mesh.
    pub async fn wait(&mut self) {
        let shutdown = crate::signals::shutdown();
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            if !RunState::path(&self.data_dir).exists() || self.data_dir.join(STOPPING).exists() {
                eprintln!("the mesh is being stopped by `trellis down`");
                return;
            }
        }
    }

    /// Stops every process, removes the network and the state.
    pub fn stop(mut self) {
        stop_state(&self.state);
        for c in &mut self.children {
            let _ = c.child.try_wait();
        }
        self.net.remove();
        let _ = std::fs::remove_file(PodNet::path(&self.data_dir));
        let _ = RunState::remove(&self.data_dir);
        let _ = remove_state_dirs(&self.data_dir);
    }

    pub fn detach(self) {
        drop(self.children);
    }
}

/// The sidecar's flags inside a pod.
fn proxy_args(
    r: &Replica,
    pod: &Pod,
    grpc: SocketAddr,
    data_dir: &Path,
    upstreams: &[SocketAddr],
) -> Vec<String> {
    let mut args: Vec<String> = [
        "proxy",
        "--control-plane",
        &grpc.to_string(),
        "--workload",
        &r.workload,
        "--namespace",
        &r.namespace,
        "--app-port",
        &r.ports.app.to_string(),
        "--inbound-addr",
        &format!("0.0.0.0:{}", transparent::INBOUND_PORT),
        "--outbound-addr",
        &format!("127.0.0.1:{}", transparent::OUTBOUND_PORT),
        // Reachable from the host (up's readiness checks, stat, Prometheus).
        "--admin-addr",
        &format!("0.0.0.0:{}", transparent::ADMIN_PORT),
        "--advertise-addr",
        &pod.ip.to_string(),
        "--cache-dir",
        &data_dir
            .join("cache")
            .join(&r.instance)
            .display()
            .to_string(),
        "--instance",
        &r.instance,
        "--token-file",
        &r.token_path(data_dir).display().to_string(),
        "--transparent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for u in upstreams {
        args.extend(["--dns-upstream".to_string(), u.to_string()]);
    }
    if !r.labels.is_empty() {
        let labels: Vec<String> = r.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        args.extend(["--labels".to_string(), labels.join(",")]);
    }
    if let Some(sa) = &r.service_account {
        args.extend(["--service-account".to_string(), sa.clone()]);
    }
    args
}

/// Whether a TCP socket listens on `port` in the network namespace of
/// `pid` (its /proc/PID/net/tcp lists that namespace's sockets).
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .map(|t| listens_on(&t, port))
            .unwrap_or(false)
    })
}

fn listens_on(proc_net_tcp: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    proc_net_tcp.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // local_address is field 1, st (0A = LISTEN) field 3.
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Clears what a previous run left; refuses to start over a running mesh.
fn prepare_data_dir(dir: &Path) -> anyhow::Result<()> {
    if let Some(old) = RunState::read(dir)? {
        if old.any_running() {
            anyhow::bail!(
                "a mesh already runs in {} (control plane {}): stop it with `trellis down --data-dir {}`",
                dir.display(),
                old.control_url(),
                dir.display()
            );
        }
        RunState::remove(dir)?;
    }
    let removed = podnet::cleanup(dir)?;
    if !removed.is_empty() {
        eprintln!("removed what an earlier run left: {}", removed.join(", "));
    }
    let _ = std::fs::remove_file(dir.join(STOPPING));
    remove_state_dirs(dir)?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// `trellis up --mode pods`.
pub async fn up(
    global: &Global,
    args: &crate::cli::UpArgs,
    subnet: Option<String>,
) -> anyhow::Result<ExitCode> {
    let loaded = crate::resources::load(&args.file)?;
    let opts = Options {
        data_dir: global.data_dir.clone(),
        detach: args.detach,
        timeout: args.timeout,
        subnet,
    };
    let mut mesh = PodMesh::start(loaded, &opts).await?;
    println!("{}", mesh.ready_line());
    if args.detach {
        eprintln!(
            "running in the background: `trellis ps` lists it, `trellis exec WORKLOAD -- CMD` runs in a pod, `trellis down` removes it (--data-dir {})",
            global.data_dir.display()
        );
        mesh.detach();
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("press Ctrl-C to stop");
    mesh.wait().await;
    eprintln!("stopping");
    mesh.stop();
    Ok(ExitCode::SUCCESS)
}

/// `trellis exec` in pods mode: CMD inside the replica's namespace.
/// `None` when the mesh of `data_dir` is not in pods mode.
pub fn exec(
    global: &Global,
    args: &ExecArgs,
    workload: &str,
    replica: u32,
) -> anyhow::Result<Option<ExitCode>> {
    let Some(net) = PodNet::read(&global.data_dir)? else {
        return Ok(None);
    };
    let ns = global.namespace.as_deref();
    let pod = net.pods.iter().find(|p| {
        p.workload == workload && p.replica == replica && ns.is_none_or(|ns| p.namespace == ns)
    });
    let Some(pod) = pod else {
        let n = net.pods.iter().filter(|p| p.workload == workload).count();
        if n == 0 {
            anyhow::bail!(
                "no workload {workload} in the mesh of {}: `trellis ps` lists them",
                global.data_dir.display()
            );
        }
        anyhow::bail!(
            "workload {workload} has no replica {replica}: it has {n} (0 to {})",
            n - 1
        );
    };
    if !podnet::netns_exists(&pod.netns) {
        anyhow::bail!(
            "the pod of {workload}/{replica} ({}) is gone: run `trellis down`, then `up` again",
            pod.netns
        );
    }
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &pod.netns])
        .args(&args.command)
        .status()
        .map_err(|e| anyhow::anyhow!("cannot run `ip netns exec`: {e}"))?;
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    Ok(Some(ExitCode::from(u8::try_from(code).unwrap_or(1))))
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_net_tcp_listeners() {
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n\
   1: 0100007F:3A98 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0\n";
        assert!(listens_on(t, 8080));
        assert!(!listens_on(t, 15000), "established, not listening");
        assert!(!listens_on(t, 80));
    }

    #[test]
    fn sidecars_in_pods_are_transparent_and_reachable_from_the_host() {
        let r = Replica {
            workload: "catalog".into(),
            namespace: "default".into(),
            replica: 0,
            instance: "catalog-0".into(),
            labels: [("app".to_string(), "catalog".to_string())].into(),
            service_account: None,
            command: vec!["trellis".into()],
            env: Default::default(),
            ports: plan::ReplicaPorts {
                app: 8080,
                inbound: 15006,
                outbound: 15001,
                admin: 15000,
            },
        };
        let pod = Pod {
            netns: "trellis-x-0".into(),
            veth: "trvxn0".into(),
            ip: Ipv4Addr::new(10, 200, 1, 2),
            workload: "catalog".into(),
            namespace: "default".into(),
            replica: 0,
            instance: "catalog-0".into(),
        };
        let a = proxy_args(
            &r,
            &pod,
            "10.200.1.1:4000".parse().unwrap(),
            Path::new("/d"),
            &["10.0.0.2:53".parse().unwrap()],
        );
        let s = a.join(" ");
        assert!(s.contains("--transparent"), "{s}");
        assert!(s.contains("--admin-addr 0.0.0.0:15000"), "{s}");
        assert!(s.contains("--advertise-addr 10.200.1.2"), "{s}");
        assert!(s.contains("--dns-upstream 10.0.0.2:53"), "{s}");
        assert!(s.contains("--control-plane 10.200.1.1:4000"), "{s}");
    }
}
