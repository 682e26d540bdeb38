//! A local mesh in process mode: the control plane, then each Workload
//! replica's app and sidecar, as child processes of this CLI, recorded in
//! `run.json`. Start-up is all or nothing: if any part fails, everything
//! started so far is stopped again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context;
use trellis_resource::{Resource, Source};

use super::plan::{self, Replica, ReplicaPorts};
use super::process::{self, Running, Spec};
use super::state::{Addresses, ControlInfo, ProcessInfo, Role, RunState};
use crate::client::{Api, ApplyAnswer};
use crate::http::HttpClient;

/// Marks a `trellis down` in progress, so a foreground `up` does not
/// report the processes it stops as failures.
pub const STOPPING: &str = "stopping";

/// How long processes get to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

pub struct Options {
    pub data_dir: PathBuf,
    /// Children outlive the CLI (no parent-death signal).
    pub detach: bool,
    /// Limit for the control plane, then for the workloads, to be ready.
    pub timeout: Duration,
}

/// A running local mesh, owned by this process.
pub struct Mesh {
    pub state: RunState,
    pub data_dir: PathBuf,
    pub replicas: Vec<Replica>,
    pub workloads: usize,
    children: Vec<Running>,
    /// Children already reported as exited while the mesh runs.
    reported: Vec<u32>,
}

impl Mesh {
    /// Validates `resources`, starts everything and waits until every
    /// replica serves. On error, nothing is left running.
    pub async fn start(loaded: Vec<(Resource, Source)>, opts: &Options) -> anyhow::Result<Mesh> {
        let (resources, sources): (Vec<Resource>, Vec<Source>) = loaded.into_iter().unzip();
        if let Err(e) = trellis_resource::validate_apply(&resources, &sources, &[]) {
            anyhow::bail!(
                "nothing was started:\n{}",
                crate::resources::indent(&e.to_string())
            );
        }
        prepare_data_dir(&opts.data_dir)?;

        let n_replicas = plan::replica_count(&resources);
        let ports =
            plan::free_ports(2 + 4 * n_replicas).context("finding free ports on 127.0.0.1")?;
        let replicas = plan::replicas(&resources, &ports[2..]);
        let workloads = resources
            .iter()
            .filter(|r| r.as_workload().is_some())
            .count();
        let http = ReplicaPorts::addr(ports[0]);
        let grpc = ReplicaPorts::addr(ports[1]);

        let mut mesh = Mesh {
            state: RunState {
                control: ControlInfo { pid: 0, http, grpc },
                processes: Vec::new(),
            },
            data_dir: opts.data_dir.clone(),
            replicas,
            workloads,
            children: Vec::new(),
            reported: Vec::new(),
        };
        match mesh.start_all(&resources, opts).await {
            Ok(()) => Ok(mesh),
            Err(e) => {
                eprintln!("start-up failed: stopping what was started");
                mesh.stop();
                Err(e)
            }
        }
    }

    async fn start_all(&mut self, resources: &[Resource], opts: &Options) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("finding the trellis binary")?;
        let (http, grpc) = (self.state.control.http, self.state.control.grpc);

        eprintln!("starting the control plane (http {http}, grpc {grpc})");
        let control_dir = self.data_dir.join("control");
        let args = vec![
            "control".to_string(),
            "--data-dir".to_string(),
            control_dir.display().to_string(),
            "--http-addr".to_string(),
            http.to_string(),
            "--grpc-addr".to_string(),
            grpc.to_string(),
        ];
        self.spawn(&exe, args, vec![], "control", Role::Control, None, opts)?;
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

        let replicas = self.replicas.clone();
        eprintln!(
            "starting {} replicas of {} workloads",
            replicas.len(),
            self.workloads
        );
        for r in &replicas {
            let Some(cmd0) = r.command.first() else {
                anyhow::bail!(
                    "workload {}: `command` is empty: name the program to run",
                    r.workload
                );
            };
            let app_addr = ReplicaPorts::addr(r.ports.app);
            self.spawn(
                &plan::program(cmd0, &exe),
                r.app_args(),
                r.app_env(),
                &r.instance,
                Role::App,
                Some(r),
                opts,
            )?;
            self.last().addresses.app = Some(app_addr);

            // Each sidecar gets a join token for exactly its identity.
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
                .with_context(|| format!("writing {}", path.display()))?;
            self.spawn(
                &exe,
                r.proxy_args(grpc, &self.data_dir),
                vec![],
                &format!("{}-proxy", r.instance),
                Role::Proxy,
                Some(r),
                opts,
            )?;
            self.last().addresses = Addresses {
                admin: Some(ReplicaPorts::addr(r.ports.admin)),
                inbound: Some(ReplicaPorts::addr(r.ports.inbound)),
                outbound: Some(ReplicaPorts::addr(r.ports.outbound)),
                app: Some(app_addr),
                ..Addresses::default()
            };
        }
        self.state.write(&self.data_dir)?;
        self.wait_for_replicas(opts.timeout).await
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        &mut self,
        program: &Path,
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
            program: program.to_path_buf(),
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

    /// Fails naming the first child that exited, with its log's last lines.
    fn check_children(&mut self) -> anyhow::Result<()> {
        for c in &mut self.children {
            if let Ok(Some(status)) = c.child.try_wait() {
                anyhow::bail!(
                    "{} exited during start-up ({status}); the end of {}:\n{}",
                    c.name,
                    c.log.display(),
                    indent(&process::log_tail(&c.log, 15))
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
            for r in &self.replicas {
                let app = tokio::net::TcpStream::connect(ReplicaPorts::addr(r.ports.app))
                    .await
                    .is_ok();
                let url = format!("http://{}/ready", ReplicaPorts::addr(r.ports.admin));
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
        format!(
            "ready: {} workloads, {} replicas; control plane {}",
            self.workloads,
            self.replicas.len(),
            self.state.control_url()
        )
    }

    pub fn control_http(&self) -> SocketAddr {
        self.state.control.http
    }

    /// Runs until Ctrl-C or SIGTERM, or until everything was stopped from
    /// elsewhere (`trellis down`).
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
    /// them and removes `run.json`.
    pub fn stop(mut self) {
        stop_state(&self.state);
        for c in &mut self.children {
            let _ = c.child.try_wait();
        }
        let _ = RunState::remove(&self.data_dir);
        let _ = remove_state_dirs(&self.data_dir);
    }

    /// Lets the children run on after this process exits (`--detach`).
    pub fn detach(self) {
        drop(self.children);
    }
}

/// Stops the processes `state` records that still run: workloads, then
/// the control plane, so proxies do not spend their drain reconnecting.
/// Returns how many were running.
pub fn stop_state(state: &RunState) -> usize {
    let pids = |control: bool| -> Vec<(u32, u64)> {
        state
            .processes
            .iter()
            .filter(|p| (p.role == Role::Control) == control)
            .map(|p| (p.pid, p.start_time))
            .collect()
    };
    process::stop_all(&pids(false), STOP_GRACE) + process::stop_all(&pids(true), STOP_GRACE)
}

/// Refuses to start over a running mesh; clears what a previous one left.
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
    let _ = std::fs::remove_file(dir.join(STOPPING));
    // A fresh store and caches: the mesh is what the files say, not what
    // an earlier run left behind.
    remove_state_dirs(dir)?;
    std::fs::create_dir_all(dir.join("logs"))
        .with_context(|| format!("creating {}", dir.display()))?;
    Ok(())
}

/// Removes the control plane's store and the proxies' caches; logs stay,
/// for reading after the fact.
pub fn remove_state_dirs(dir: &Path) -> anyhow::Result<()> {
    for sub in ["control", "cache"] {
        let p = dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
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

#[cfg(test)]
mod tests {
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
        let err = prepare_data_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("trellis down"), "{err}");

        // The same pid with another start time is a stale record.
        let mut stale = state.clone();
        stale.processes[0].start_time += 1;
        stale.write(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path().join("cache/x")).unwrap();
        prepare_data_dir(dir.path()).unwrap();
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

/// Join tokens of a local mesh live as long as the mesh is likely to: the
/// proxies use them at every reconnect and certificate renewal.
const LOCAL_TOKEN_TTL: &str = "8760h";

#[derive(serde::Deserialize)]
struct TokenAnswer {
    token: String,
}
