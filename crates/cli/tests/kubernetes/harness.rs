//! The Kubernetes suite's harness: the cluster (started and stopped by
//! `scripts/k8s-cluster`), kubectl and trellis runs, and load through the
//! demo app's frontends.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use trellis_testkit::process::is_root;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_trellis");
/// The proxy-only binary of the sidecar image (`scripts/image --proxy`).
pub(crate) const PROXY_BIN: &str = env!("CARGO_BIN_EXE_trellis-proxy");

pub(crate) fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("TRELLIS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/trellis".into())
}

/// Why the suite cannot run here, if it cannot.
pub(crate) fn cannot_run() -> Option<String> {
    if !is_root() {
        return Some(
            "needs root (the cluster mounts, makes network namespaces and cgroups)".into(),
        );
    }
    let kube = cache_dir().join("k8s/v1.37.2");
    for bin in ["kube-apiserver", "kubelet", "kubectl", "etcd"] {
        if !kube.join(bin).exists() {
            return Some(format!(
                "no cluster binaries in {} (`scripts/k8s-cluster build` makes them, ~40 min once)",
                kube.display()
            ));
        }
    }
    None
}

pub(crate) fn script(name: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(repo().join("scripts").join(name))
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running scripts/{name}"))?;
    if !out.status.success() {
        bail!("scripts/{name} {} failed: {}", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The running cluster; stops it on drop when the suite started it.
pub(crate) struct Cluster {
    pub(crate) started: bool,
    pub(crate) kubeconfig: PathBuf,
    pub(crate) kubectl: PathBuf,
}

impl Cluster {
    pub(crate) fn up() -> anyhow::Result<Cluster> {
        // Every component running, not only a node object that still says
        // Ready: a cluster half stopped (its API server and etcd left, no
        // kubelet) passed for running, and the suite waited on it forever.
        // `up` cleans such a cluster up before it starts one.
        let running = script("k8s-cluster", &["status"])
            .map(|s| s.contains(": Ready") && !s.contains("not running"))
            .unwrap_or(false);
        let started = !running;
        if started {
            script("k8s-cluster", &["up"])?;
        }
        let env = script("k8s-cluster", &["env"])?;
        let mut kubeconfig = None;
        let mut path = None;
        for line in env.lines() {
            let line = line.trim_start_matches("export ");
            if let Some(v) = line.strip_prefix("KUBECONFIG=") {
                kubeconfig = Some(PathBuf::from(v.trim_matches(['"', '\''])));
            }
            if let Some(v) = line.strip_prefix("PATH=") {
                path = v
                    .trim_matches(['"', '\''])
                    .split(':')
                    .next()
                    .map(PathBuf::from);
            }
        }
        let kubeconfig =
            kubeconfig.ok_or_else(|| anyhow!("k8s-cluster env printed no KUBECONFIG: {env}"))?;
        let kubectl = path
            .map(|p| p.join("kubectl"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| cache_dir().join("k8s/v1.37.2/kubectl"));
        Ok(Cluster {
            started,
            kubeconfig,
            kubectl,
        })
    }

    pub(crate) fn command(
        &self,
        program: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> anyhow::Result<String> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", program.display()))?;
        if let Some(input) = stdin {
            use std::io::Write as _;
            child.stdin.take().unwrap().write_all(input.as_bytes())?;
        }
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} {}: {}{}",
                program.file_name().unwrap_or_default().to_string_lossy(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    pub(crate) fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        self.command(&self.kubectl.clone(), args, None)
    }

    pub(crate) fn kubectl_in(&self, args: &[&str], stdin: &str) -> anyhow::Result<String> {
        self.command(&self.kubectl.clone(), args, Some(stdin))
    }

    pub(crate) fn trellis(&self, args: &[&str]) -> anyhow::Result<String> {
        self.command(Path::new(BIN), args, None)
    }

    /// `trellis ARGS -o json`, parsed.
    pub(crate) fn trellis_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.trellis(&all)?)?)
    }

    pub(crate) fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.kubectl(&all)?)?)
    }

    pub(crate) fn cluster_ip(&self, ns: &str, svc: &str) -> anyhow::Result<String> {
        self.kubectl(&[
            "-n",
            ns,
            "get",
            "svc",
            svc,
            "-o",
            "jsonpath={.spec.clusterIP}",
        ])
    }

    pub(crate) fn pods(&self, ns: &str, selector: &str) -> anyhow::Result<Vec<Value>> {
        let list = self.json(&["-n", ns, "get", "pods", "-l", selector])?;
        Ok(list["items"].as_array().cloned().unwrap_or_default())
    }

    pub(crate) fn rollout(&self, ns: &str, deploy: &str) -> anyhow::Result<()> {
        self.kubectl(&[
            "-n",
            ns,
            "rollout",
            "status",
            &format!("deploy/{deploy}"),
            "--timeout=180s",
        ])?;
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.started {
            if let Err(e) = script("k8s-cluster", &["down"]) {
                eprintln!("stopping the cluster: {e:#}");
            }
        }
    }
}

/// What one request through the dev (or prod) frontend saw.
#[derive(Debug)]
pub(crate) struct Call {
    /// The backend's answer, when the whole chain answered 200.
    pub(crate) backend: Option<Value>,
    /// Otherwise, what went wrong.
    pub(crate) error: Option<String>,
    /// The backend call's status, when it answered.
    pub(crate) status: Option<u64>,
}

pub(crate) async fn call(front: &str) -> Call {
    let url = format!("http://{front}/");
    match trellis_testkit::try_http_get(&url, None).await {
        Err(e) => Call {
            backend: None,
            error: Some(format!("frontend: {e:#}")),
            status: None,
        },
        Ok((code, _)) if code != 200 => Call {
            backend: None,
            error: Some(format!("frontend answered {code}")),
            status: None,
        },
        Ok((_, body)) => {
            let v: Value = serde_json::from_slice(&body).unwrap_or_default();
            let c = &v["calls"][0];
            let status = c["status"].as_u64();
            if status == Some(200) {
                Call {
                    backend: Some(c["body"].clone()),
                    error: None,
                    status,
                }
            } else {
                Call {
                    backend: None,
                    error: Some(format!("backend call: {}", c)),
                    status,
                }
            }
        }
    }
}

/// Steady load at `rps` for `duration`; every answer, in order of sending.
pub(crate) async fn steady(front: String, rps: u32, duration: Duration) -> Vec<(Duration, Call)> {
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    let mut tasks = Vec::new();
    while start.elapsed() < duration {
        tick.tick().await;
        let front = front.clone();
        let at = start.elapsed();
        tasks.push(tokio::spawn(async move { (at, call(&front).await) }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a load task"));
    }
    out
}

/// Ok when no call failed; else the count and the first five failures.
pub(crate) fn no_failures(calls: &[(Duration, Call)]) -> anyhow::Result<()> {
    let failed = failures(calls);
    if failed.is_empty() {
        return Ok(());
    }
    bail!(
        "{} of {} requests failed: {:?}",
        failed.len(),
        calls.len(),
        &failed[..failed.len().min(5)]
    )
}

pub(crate) fn failures(calls: &[(Duration, Call)]) -> Vec<String> {
    calls
        .iter()
        .filter_map(|(at, c)| {
            c.error
                .as_ref()
                .map(|e| format!("{:.1}s: {e}", at.as_secs_f64()))
        })
        .collect()
}

pub(crate) fn dev_front(c: &Cluster) -> anyhow::Result<String> {
    Ok(format!("{}:80", c.cluster_ip("dev", "frontend")?))
}

pub(crate) fn prod_front(c: &Cluster) -> anyhow::Result<String> {
    Ok(format!("{}:80", c.cluster_ip("prod", "frontend")?))
}

pub(crate) fn init_names(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `f` every 200 ms until it gives Ok, for at most `limit`.
pub(crate) fn until<T>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() > limit => bail!("{what}: not true after {limit:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// Waits until a route's first parent carries condition `kind` with
/// `status` ("True"/"False"), as the control plane writes it; returns the
/// condition.
pub(crate) fn route_condition(
    c: &Cluster,
    route: (&str, &str, &str),
    kind: &str,
    status: &str,
) -> anyhow::Result<Value> {
    let (resource, ns, name) = route;
    until(
        &format!("{kind}={status} on {resource} {ns}/{name}"),
        Duration::from_secs(60),
        || {
            let r = c.json(&["-n", ns, "get", resource, name])?;
            r["status"]["parents"][0]["conditions"]
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .find(|x| x["type"] == kind && x["status"] == status)
                        .cloned()
                })
                .ok_or_else(|| anyhow!("status {}", r["status"]))
        },
    )
}

/// `n` calls at once.
pub(crate) async fn futures_join(front: &str, n: usize) -> Vec<Call> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let f = front.to_string();
        tasks.push(tokio::spawn(async move { call(&f).await }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("a call task"));
    }
    out
}
