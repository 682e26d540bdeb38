//! etcd for tests: finding the binary (`scripts/test-peers etcd` builds
//! it) and running members or whole clusters as child processes, each
//! with its own data dir, on addresses the test gives (loopback, or a
//! network namespace the test made).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The etcd binary: `$TRELLIS_ETCD`, else what `scripts/test-peers etcd`
/// cached, else the Kubernetes harness's. `None` (the test skips, saying
/// why) when there is none; under `CI=true` that is a failure instead.
pub fn binary(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("TRELLIS_ETCD")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .or_else(|| cached("/var/cache/trellis/peers", "etcd-"))
        .or_else(|| cached("/var/cache/trellis/k8s", "v"));
    match found {
        Some(p) => Some(p),
        None if crate::process::in_ci() => panic!(
            "{test}: no etcd binary: build it with `scripts/test-peers etcd` (scripts/test does) or set TRELLIS_ETCD; under CI=true this test must run"
        ),
        None => {
            eprintln!("skipping {test}: no etcd binary (build one with `scripts/test-peers etcd`, or set TRELLIS_ETCD)");
            None
        }
    }
}

/// `<dir>/<prefix>*/etcd`, the newest by name.
fn cached(dir: &str, prefix: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path().join("etcd"))
        .filter(|p| p.is_file())
        .collect();
    found.sort();
    found.pop()
}

/// One member of a cluster.
pub struct Member {
    pub name: String,
    /// `http://IP:PORT`.
    pub client_url: String,
    pub peer_url: String,
    data_dir: PathBuf,
    /// What runs the member (e.g. `ip netns exec NS`), before the binary.
    wrap: Vec<String>,
    initial_cluster: String,
    bin: PathBuf,
    child: Option<Child>,
}

impl Member {
    fn spawn(&mut self, state: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data_dir.with_extension("log"))
            .expect("etcd log");
        let mut cmd = match self.wrap.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        cmd.args([
            "--name",
            &self.name,
            "--data-dir",
            &self.data_dir.display().to_string(),
            "--listen-client-urls",
            &self.client_url,
            "--advertise-client-urls",
            &self.client_url,
            "--listen-peer-urls",
            &self.peer_url,
            "--initial-advertise-peer-urls",
            &self.peer_url,
            "--initial-cluster",
            &self.initial_cluster,
            "--initial-cluster-state",
            state,
            "--initial-cluster-token",
            "trellis-test",
            // Quick elections, for tests that kill members.
            "--heartbeat-interval",
            "50",
            "--election-timeout",
            "500",
            "--log-level",
            "warn",
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("etcd log"))
        .stderr(log);
        self.child = Some(cmd.spawn().expect("starting etcd"));
    }

    /// `kill -9`.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on its data dir, as a member of the same cluster.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn("existing");
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Its log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.with_extension("log")).unwrap_or_default()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of members, one per `(ip, client port, peer port, wrap)`.
pub struct Cluster {
    pub members: Vec<Member>,
}

impl Cluster {
    pub fn start(bin: &Path, dir: &Path, places: &[(String, u16, u16, Vec<String>)]) -> Cluster {
        std::fs::create_dir_all(dir).expect("the cluster's folder");
        let initial: Vec<String> = places
            .iter()
            .enumerate()
            .map(|(i, (ip, _, peer, _))| format!("m{i}=http://{ip}:{peer}"))
            .collect();
        let initial = initial.join(",");
        let mut members: Vec<Member> = places
            .iter()
            .enumerate()
            .map(|(i, (ip, client, peer, wrap))| Member {
                name: format!("m{i}"),
                client_url: format!("http://{ip}:{client}"),
                peer_url: format!("http://{ip}:{peer}"),
                data_dir: dir.join(format!("m{i}")),
                wrap: wrap.clone(),
                initial_cluster: initial.clone(),
                bin: bin.to_path_buf(),
                child: None,
            })
            .collect();
        for m in &mut members {
            m.spawn("new");
        }
        Cluster { members }
    }

    /// One member on loopback, on free ports.
    pub fn single(bin: &Path, dir: &Path) -> Cluster {
        Self::start(
            bin,
            dir,
            &[(
                "127.0.0.1".into(),
                crate::free_port(),
                crate::free_port(),
                Vec::new(),
            )],
        )
    }

    /// The members' client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until every running member says it is healthy (it has a
    /// leader and serves reads).
    pub async fn wait_healthy(&self, timeout: Duration) {
        for m in &self.members {
            if m.child.is_none() {
                continue;
            }
            let url = format!("{}/health", m.client_url);
            crate::eventually(&format!("etcd member {} healthy", m.name), timeout, || {
                let url = url.clone();
                async move {
                    match crate::try_http_get(&url, None).await {
                        Ok((status, body))
                            if status == 200 && String::from_utf8_lossy(&body).contains("true") =>
                        {
                            Some(())
                        }
                        _ => None,
                    }
                }
            })
            .await;
        }
    }
}
