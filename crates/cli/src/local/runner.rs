//! The local mesh runner of `trellis up` and `trellis demo`: the steps
//! every placement shares (validate, prepare the data dir, start the
//! control plane — one, or replicas on a local etcd cluster — and wait for
//! it, apply, mint each sidecar's join token,
//! start each replica's app and sidecar, wait until they serve, then run,
//! stop or detach), with what differs between host processes and pods
//! behind [`Placement`]. Every child is recorded in `run.json` as it
//! starts. Start-up is all or nothing: if any part fails, everything
//! started or created so far is stopped and removed again.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use trellis_resource::{Resource, Source};

use super::etcd::{self, MemberAddrs};
use super::plan::{self, Replica};
use super::process::{self, Running, Spec};
use super::state::{Addresses, ControlInfo, ProcessInfo, Role, RunState};
use crate::client::{Api, ApplyAnswer};
use crate::http::HttpClient;

/// Marks a `trellis down` in progress, so a foreground `up` does not
/// report the processes it stops as failures.
pub const STOPPING: &str = "stopping";

/// How long processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Join tokens of a local mesh live as long as the mesh is likely to: the
/// proxies use them at every reconnect and certificate renewal.
const LOCAL_TOKEN_TTL: &str = "8760h";

/// Lines of a log shown when its process exits during start-up.
const LOG_TAIL_LINES: usize = 15;

pub struct Options {
    pub data_dir: PathBuf,
    /// Children outlive the CLI (no parent-death signal).
    pub detach: bool,
    /// Limit for the control plane, then for the workloads, to be ready.
    pub timeout: Duration,
    /// Control plane replicas (more than one needs `etcd`).
    pub control_replicas: usize,
    /// Run a local etcd cluster as the control plane's store.
    pub etcd: bool,
}

/// The key-encryption key the replicas of a local mesh share.
const KEK_FILE: &str = "kek";

/// Where one replica's app and sidecar are reached, as `ps` shows them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReplicaAddrs {
    pub app: SocketAddr,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
}

/// The mesh as a placement lays it out, before anything runs.
pub struct Layout<P> {
    pub placement: P,
    pub replicas: Vec<Replica>,
    /// The control plane's HTTP and gRPC addresses.
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

/// Where a local mesh's replicas run: what differs between host processes
/// (`host::Host`) and network-namespace pods (`pods::Pods`). Methods that
/// take `k` are about the `k`th replica of the layout.
pub trait Placement: Sized {
    /// What the placement needs besides the resources (pods: `--subnet`).
    type Args;

    /// What `up --detach` says about the commands for a mesh in the
    /// background.
    const DETACHED: &'static str;

    /// Fails, saying what to do, when this host cannot run the placement;
    /// called before anything is done.
    fn check_host() -> anyhow::Result<()> {
        Ok(())
    }

    /// Removes what an earlier run of this placement left in `data_dir`.
    fn clear_leftovers(_data_dir: &Path) -> anyhow::Result<()> {
        Ok(())
    }

    /// Lays out the replicas of `resources` and the control plane. Whatever
    /// the placement will create on the host is recorded in `data_dir`
    /// before it exists, so `down` can remove it after a crash.
    fn lay_out(
        resources: &[Resource],
        data_dir: &Path,
        args: Self::Args,
    ) -> anyhow::Result<Layout<Self>>;

    /// Creates what the replicas run in, before the control plane starts
    /// (it may listen there); `controls` are its replicas.
    fn create(&mut self, _exe: &Path, _controls: &[ControlInfo]) -> anyhow::Result<()> {
        Ok(())
    }

    /// The command line that runs `program args` for replica `k`.
    fn command(&self, k: usize, program: PathBuf, args: Vec<String>) -> (PathBuf, Vec<String>);

    /// The app's environment, on top of the CLI's own.
    fn app_env(&self, r: &Replica) -> Vec<(String, String)>;

    /// The flags of replica `k`'s `trellis proxy`; `grpc` holds every
    /// control plane replica's proxy API.
    fn proxy_args(
        &self,
        k: usize,
        r: &Replica,
        grpc: &[SocketAddr],
        data_dir: &Path,
    ) -> Vec<String>;

    fn addrs(&self, k: usize, r: &Replica) -> ReplicaAddrs;

    /// Whether replica `k`'s app (process `pid`) accepts connections.
    fn app_serves(&self, k: usize, r: &Replica, pid: u32) -> impl Future<Output = bool>;

    /// What the `ready:` line adds about where the replicas run.
    fn describe(&self) -> String {
        String::new()
    }

    /// Removes what `create` made (and its record), whatever exists of it;
    /// after the processes stopped.
    fn remove(&self, _data_dir: &Path) {}
}

/// A running local mesh, owned by this process.
pub struct Runner<P> {
    pub state: RunState,
    /// Every control plane replica (the first is `state.control`).
    pub controls: Vec<ControlInfo>,
    /// The local etcd cluster's members, when there is one.
    pub etcd: Vec<MemberAddrs>,
    pub data_dir: PathBuf,
    pub replicas: Vec<Replica>,
    pub workloads: usize,
    placement: P,
    children: Vec<Running>,
    /// Children already reported as exited while the mesh runs.
    reported: Vec<u32>,
}

impl<P: Placement> Runner<P> {
    /// Validates `loaded`, starts everything and waits until every replica
    /// serves. On error, nothing is left running or created.
    pub async fn start(
        loaded: Vec<(Resource, Source)>,
        opts: &Options,
        args: P::Args,
    ) -> anyhow::Result<Runner<P>> {
        P::check_host()?;
        let (resources, sources): (Vec<Resource>, Vec<Source>) = loaded.into_iter().unzip();
        if let Err(e) = trellis_resource::validate_apply::<trellis_resource::Resource>(
            &resources,
            &sources,
            &[],
        ) {
            anyhow::bail!(
                "nothing was started:\n{}",
                crate::resources::indent(&e.to_string())
            );
        }
        prepare_data_dir::<P>(&opts.data_dir)?;
        let layout = P::lay_out(&resources, &opts.data_dir, args)?;
        let workloads = resources
            .iter()
            .filter(|r| r.as_workload().is_some())
            .count();
        // Replicas after the first: the HTTP API on loopback, the proxy
        // API where the placement put the first one's.
        let extra = opts.control_replicas.saturating_sub(1);
        let members = if opts.etcd { etcd::MEMBERS } else { 0 };
        // Not one the layout already gave a proxy or an app.
        let taken: Vec<u16> = [layout.http.port(), layout.grpc.port()]
            .into_iter()
            .chain(layout.replicas.iter().flat_map(|r| {
                let p = &r.ports;
                [p.app, p.inbound, p.outbound, p.admin]
            }))
            .collect();
        let ports = plan::free_ports_besides(2 * extra + 2 * members, &taken)
            .context("finding free ports for the control plane")?;
        let first = ControlInfo {
            pid: 0,
            http: layout.http,
            grpc: layout.grpc,
        };
        let mut controls = vec![first.clone()];
        for k in 0..extra {
            controls.push(ControlInfo {
                pid: 0,
                http: plan::ReplicaPorts::addr(ports[2 * k]),
                grpc: SocketAddr::new(layout.grpc.ip(), ports[2 * k + 1]),
            });
        }
        let etcd = (0..members)
            .map(|i| MemberAddrs {
                client: plan::ReplicaPorts::addr(ports[2 * extra + 2 * i]),
                peer: plan::ReplicaPorts::addr(ports[2 * extra + 2 * i + 1]),
            })
            .collect();
        let mut runner = Runner {
            state: RunState {
                control: first,
                processes: Vec::new(),
            },
            controls,
            etcd,
            data_dir: opts.data_dir.clone(),
            replicas: layout.replicas,
            workloads,
            placement: layout.placement,
            children: Vec::new(),
            reported: Vec::new(),
        };
        match runner.start_all(&resources, opts).await {
            Ok(()) => Ok(runner),
            Err(e) => {
                eprintln!("start-up failed: stopping and removing what was started");
                runner.stop();
                Err(e)
            }
        }
    }

    async fn start_all(&mut self, resources: &[Resource], opts: &Options) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the trellis binary")?;
        self.placement.create(&exe, &self.controls)?;
        if !self.etcd.is_empty() {
            self.start_etcd(opts)?;
        }
        let api = self.start_control(&exe, opts).await?;
        let answer: ApplyAnswer = api
            .post("/api/v1/apply", &resources)
            .await
            .context("applying the resources")?;
        eprintln!(
            "control plane ready; applied {} resources",
            answer.results.len()
        );

        let replicas = self.replicas.clone();
        eprintln!(
            "starting {} replicas of {} workloads",
            replicas.len(),
            self.workloads
        );
        for (k, r) in replicas.iter().enumerate() {
            let Some(cmd0) = r.command.first() else {
                anyhow::bail!(
                    "workload {}: `command` is empty: name the program to run",
                    r.workload
                );
            };
            let addrs = self.placement.addrs(k, r);
            let (program, args) =
                self.placement
                    .command(k, plan::program(cmd0, &exe), r.app_args());
            let env = self.placement.app_env(r);
            self.spawn(program, args, env, &r.instance, Role::App, Some(r), opts)?;
            self.last().addresses.app = Some(addrs.app);

            self.mint_token(&api, r).await?;
            let grpc: Vec<SocketAddr> = self.controls.iter().map(|c| c.grpc).collect();
            let args = self.placement.proxy_args(k, r, &grpc, &self.data_dir);
            let (program, args) = self.placement.command(k, exe.clone(), args);
            let name = format!("{}-proxy", r.instance);
            self.spawn(program, args, vec![], &name, Role::Proxy, Some(r), opts)?;
            self.last().addresses = Addresses {
                admin: Some(addrs.admin),
                inbound: Some(addrs.inbound),
                outbound: Some(addrs.outbound),
                app: Some(addrs.app),
                ..Addresses::default()
            };
            self.state.write(&self.data_dir)?;
        }
        self.wait_for_replicas(opts.timeout).await
    }

    /// Starts the etcd members; the control plane replicas wait for them.
    fn start_etcd(&mut self, opts: &Options) -> anyhow::Result<()> {
        let bin = etcd::binary()?;
        let dir = self.data_dir.join("etcd");
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        eprintln!(
            "starting a local etcd cluster of {} members ({})",
            self.etcd.len(),
            bin.display()
        );
        for i in 0..self.etcd.len() {
            let args = etcd::member_args(i, &self.etcd, &dir);
            self.spawn(
                bin.clone(),
                args,
                vec![],
                &format!("etcd-{i}"),
                Role::Etcd,
                None,
                opts,
            )?;
            self.last().addresses = Addresses {
                client: Some(self.etcd[i].client),
                peer: Some(self.etcd[i].peer),
                ..Addresses::default()
            };
        }
        Ok(self.state.write(&self.data_dir)?)
    }

    /// Starts the control plane (every replica) and waits until each is
    /// ready; the API of the first.
    async fn start_control(&mut self, exe: &Path, opts: &Options) -> anyhow::Result<Api> {
        let store_args: Vec<String> = if self.etcd.is_empty() {
            Vec::new()
        } else {
            let kek = self.data_dir.join(KEK_FILE);
            if !kek.exists() {
                let mut key = [0u8; 32];
                rand::Rng::fill(&mut rand::rng(), &mut key);
                trellis_identity::write_secret(&kek, &key)
                    .with_context(|| format!("writing {}", kek.display()))?;
            }
            let endpoints: Vec<String> = self
                .etcd
                .iter()
                .map(|m| format!("http://{}", m.client))
                .collect();
            vec![
                "--store".into(),
                "etcd".into(),
                "--etcd-endpoints".into(),
                endpoints.join(","),
                "--kek-file".into(),
                kek.display().to_string(),
            ]
        };
        let mut started = Vec::new();
        for k in 0..self.controls.len() {
            let ControlInfo { http, grpc, .. } = self.controls[k].clone();
            // The first keeps the name and folder of a single control plane,
            // where the CLI finds the local mesh's admin token.
            let name = if k == 0 {
                "control".to_string()
            } else {
                format!("control-{k}")
            };
            eprintln!("starting the control plane {name} (http {http}, grpc {grpc})");
            let mut args = vec![
                "control".to_string(),
                "--data-dir".to_string(),
                self.data_dir.join(&name).display().to_string(),
                "--http-addr".to_string(),
                http.to_string(),
                "--grpc-addr".to_string(),
                grpc.to_string(),
            ];
            args.extend(store_args.iter().cloned());
            self.spawn(
                exe.to_path_buf(),
                args,
                vec![],
                &name,
                Role::Control,
                None,
                opts,
            )?;
            let pid = self.children.last().expect("just spawned").pid;
            self.controls[k].pid = pid;
            self.last().addresses = Addresses {
                http: Some(http),
                grpc: Some(grpc),
                ..Addresses::default()
            };
            started.push(self.children.len() - 1);
        }
        self.state.control.pid = self.controls[0].pid;
        self.state.write(&self.data_dir)?;

        let deadline = Instant::now() + opts.timeout;
        for (k, c) in self.controls.clone().iter().enumerate() {
            let api = Api::new(
                &format!("http://{}", c.http),
                "the control plane this `up` started",
            )?;
            loop {
                self.check_children()?;
                if api.ok("/readyz").await.unwrap_or(false) {
                    break;
                }
                if Instant::now() > deadline {
                    anyhow::bail!(
                        "the control plane was not ready within {:?}: see {}",
                        opts.timeout,
                        self.children[started[k]].log.display()
                    );
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let api = Api::new(
            &self.state.control_url(),
            "the control plane this `up` started",
        )?;
        Ok(api.with_token(crate::client::local_admin_token(&self.data_dir)?))
    }

    /// A join token for exactly the replica's identity, in its token file.
    async fn mint_token(&self, api: &Api, r: &Replica) -> anyhow::Result<()> {
        let token: TokenAnswer = api
            .post(
                "/api/v1/tokens",
                &serde_json::json!({
                    "namespace": r.namespace,
                    "serviceAccount": r.effective_service_account(),
                    "labels": r.labels,
                    "ttl": LOCAL_TOKEN_TTL,
                }),
            )
            .await
            .with_context(|| format!("making a join token for {}", r.instance))?;
        let path = r.token_path(&self.data_dir);
        std::fs::create_dir_all(path.parent().expect("tokens live in a folder"))?;
        trellis_identity::write_secret(&path, token.token.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        program: PathBuf,
        args: Vec<String>,
        env: Vec<(String, String)>,
        name: &str,
        role: Role,
        replica: Option<&Replica>,
        opts: &Options,
    ) -> anyhow::Result<()> {
        let log = self.data_dir.join("logs").join(format!("{name}.log"));
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

    /// Fails naming the first child that exited, with its exit status and
    /// its log's last lines.
    fn check_children(&mut self) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Ok(Some(status)) = c.child.try_wait() {
                anyhow::bail!(
                    "{} exited during start-up ({status}); the end of {}:\n{}",
                    c.name,
                    c.log.display(),
                    indent(&process::log_tail(&c.log, LOG_TAIL_LINES))
                );
            }
        }
        Ok(())
    }

    /// Waits until each app accepts connections and each proxy's /ready
    /// answers 200, printing progress when it changes.
    async fn wait_for_replicas(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let client = HttpClient::direct();
        let deadline = Instant::now() + timeout;
        let total = self.replicas.len();
        let mut shown = usize::MAX;
        loop {
            self.check_children()?;
            let mut waiting = Vec::new();
            for (k, r) in self.replicas.iter().enumerate() {
                let pid = self
                    .children
                    .iter()
                    .find(|c| c.name == r.instance)
                    .map(|c| c.pid);
                let app = match pid {
                    Some(pid) => self.placement.app_serves(k, r, pid).await,
                    None => false,
                };
                let url = format!("http://{}/ready", self.placement.addrs(k, r).admin);
                let proxy = client
                    .get(&url, Duration::from_secs(1))
                    .await
                    .is_ok_and(|resp| resp.status().is_success());
                match (app, proxy) {
                    (true, true) => {}
                    (false, true) => waiting.push(format!("{} (app)", r.instance)),
                    (true, false) => waiting.push(format!("{} (proxy)", r.instance)),
                    (false, false) => waiting.push(format!("{} (app, proxy)", r.instance)),
                }
            }
            if waiting.is_empty() {
                return Ok(());
            }
            if waiting.len() != shown {
                shown = waiting.len();
                eprintln!(
                    "waiting for workloads: {}/{total} replicas ready; waiting for {}",
                    total - waiting.len(),
                    summarize(&waiting)
                );
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "not ready within {timeout:?}: {}; see their logs in {}",
                    summarize(&waiting),
                    self.data_dir.join("logs").display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The line `up` prints once everything serves.
    pub fn ready_line(&self) -> String {
        let ha = match (self.controls.len(), self.etcd.len()) {
            (1, 0) => String::new(),
            (n, 0) => format!(" ({n} replicas)"),
            (n, m) => format!(" ({n} replicas on a {m}-member etcd cluster)"),
        };
        format!(
            "ready: {} workloads, {} replicas{}; control plane {}{ha}",
            self.workloads,
            self.replicas.len(),
            self.placement.describe(),
            self.state.control_url()
        )
    }

    pub fn control_http(&self) -> SocketAddr {
        self.state.control.http
    }

    /// Runs until Ctrl-C or SIGTERM, or until everything was stopped from
    /// elsewhere (`trellis down`), reporting children that exit.
    pub async fn wait(&mut self) {
        let shutdown = crate::signals::shutdown();
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {}
            }
            if self.poll_exits() {
                return;
            }
        }
    }

    /// Reports each child that exited since the last call (once), and
    /// tells whether the mesh is gone: every child exited, or `run.json`
    /// was removed by `trellis down`.
    pub fn poll_exits(&mut self) -> bool {
        if !RunState::path(&self.data_dir).exists() || self.data_dir.join(STOPPING).exists() {
            eprintln!("the mesh is being stopped by `trellis down`");
            return true;
        }
        for c in &mut self.children {
            if self.reported.contains(&c.pid) {
                continue;
            }
            if let Ok(Some(status)) = c.child.try_wait() {
                self.reported.push(c.pid);
                eprintln!("{} exited ({status}): see {}", c.name, c.log.display());
            }
        }
        if self.reported.len() == self.children.len() {
            eprintln!("every process of the mesh has exited");
            return true;
        }
        false
    }

    /// Stops every child (workloads first, the control plane last), reaps
    /// them, removes what the placement created, `run.json`, the store and
    /// the caches.
    pub fn stop(mut self) {
        stop_state(&self.state);
        for c in &mut self.children {
            let _ = c.child.try_wait();
        }
        self.placement.remove(&self.data_dir);
        let _ = RunState::remove(&self.data_dir);
        let _ = remove_state_dirs(&self.data_dir);
    }

    /// Lets the children run on after this process exits (`--detach`).
    pub fn detach(self) {
        drop(self.children);
    }
}

/// Stops the processes `state` records that still run: workloads, then
/// the control plane, so proxies do not spend their drain reconnecting,
/// then etcd, which the control plane's replicas use until they stop.
/// etcd's members stop one after another: a leader that is stopped hands
/// its leadership to a follower it still reaches, and waits out its
/// request timeout (7 s) if that follower stops at the same moment; one
/// at a time, each hands over at once, and the last has no one to reach.
/// Returns how many were running.
pub fn stop_state(state: &RunState) -> usize {
    let pids = |roles: &[Role]| -> Vec<(u32, u64)> {
        state
            .processes
            .iter()
            .filter(|p| roles.contains(&p.role))
            .map(|p| (p.pid, p.start_time))
            .collect()
    };
    process::stop_all(&pids(&[Role::App, Role::Proxy]), STOP_GRACE)
        + process::stop_all(&pids(&[Role::Control]), STOP_GRACE)
        + pids(&[Role::Etcd])
            .into_iter()
            .map(|member| process::stop_all(&[member], STOP_GRACE))
            .sum::<usize>()
}

/// Refuses to start over a running mesh; clears what a previous one left.
fn prepare_data_dir<P: Placement>(dir: &Path) -> anyhow::Result<()> {
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
    P::clear_leftovers(dir)?;
    let _ = std::fs::remove_file(dir.join(STOPPING));
    // A fresh store and caches: the mesh is what the files say, not what
    // an earlier run left behind.
    remove_state_dirs(dir)?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// Removes the control plane's store (its replicas', and the local etcd
/// cluster's), the shared key-encryption key and the proxies' caches; logs
/// stay, for reading after the fact.
pub fn remove_state_dirs(dir: &Path) -> anyhow::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    for entry in entries {
        let p = entry?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let ours = matches!(name, "control" | "cache" | "etcd")
            || name
                .strip_prefix("control-")
                .is_some_and(|n| n.parse::<u16>().is_ok());
        if ours && p.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        } else if name == KEK_FILE && p.is_file() {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

fn summarize(items: &[String]) -> String {
    const SHOWN: usize = 4;
    if items.len() <= SHOWN {
        items.join(", ")
    } else {
        format!(
            "{} and {} more",
            items[..SHOWN].join(", "),
            items.len() - SHOWN
        )
    }
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  | {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: String,
}

#[cfg(test)]
mod tests {
    use super::super::host::Host;
    use super::*;

    #[test]
    fn refuses_to_start_over_a_running_mesh() {
        let dir = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let state = RunState {
            control: ControlInfo {
                pid: me,
                http: "127.0.0.1:1".parse().unwrap(),
                grpc: "127.0.0.1:2".parse().unwrap(),
            },
            processes: vec![ProcessInfo {
                name: "control".into(),
                role: Role::Control,
                workload: None,
                namespace: None,
                replica: None,
                pid: me,
                start_time: process::stat(me).unwrap().start_time,
                addresses: Addresses::default(),
                log: "control.log".into(),
            }],
        };
        state.write(dir.path()).unwrap();
        let err = prepare_data_dir::<Host>(dir.path())
            .unwrap_err()
            .to_string();
        assert!(err.contains("trellis down"), "{err}");

        // The same pid with another start time is a stale record.
        let mut stale = state.clone();
        stale.processes[0].start_time += 1;
        stale.write(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("cache/x")).unwrap();
        prepare_data_dir::<Host>(dir.path()).unwrap();
        assert!(!RunState::path(dir.path()).exists());
        assert!(!dir.path().join("cache").exists());
        assert!(dir.path().join("logs").is_dir());
    }

    #[test]
    fn summarizes_long_lists() {
        let items: Vec<String> = (0..6).map(|i| format!("w-{i}")).collect();
        assert_eq!(summarize(&items[..2]), "w-0, w-1");
        assert_eq!(summarize(&items), "w-0, w-1, w-2, w-3 and 2 more");
    }
}
