//! `run.json`: what a `trellis up` runs, so that `down`, `ps`, `exec` and
//! the API commands can find it from another shell, and so that a crashed
//! `up` can still be cleaned up.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::process;

pub const FILE: &str = "run.json";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({source}): stop what it ran by hand, then delete it")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    pub control: ControlInfo,
    pub processes: Vec<ProcessInfo>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ControlInfo {
    pub pid: u32,
    pub http: SocketAddr,
    pub grpc: SocketAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Control,
    App,
    Proxy,
    /// A member of the local etcd cluster (`up --store etcd`).
    Etcd,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Control => "control",
            Role::App => "app",
            Role::Proxy => "proxy",
            Role::Etcd => "etcd",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Unique in the mesh, and the name of its log file.
    pub name: String,
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<u32>,
    pub pid: u32,
    /// Field 22 of /proc/PID/stat: tells this process from a later one that
    /// reuses its pid.
    pub start_time: u64,
    pub addresses: Addresses,
    pub log: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Addresses {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inbound: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbound: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<SocketAddr>,
    /// An etcd member's client and peer addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<SocketAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<SocketAddr>,
}

impl ProcessInfo {
    /// Whether the recorded process is still the one running under its pid.
    pub fn is_running(&self) -> bool {
        process::is_running(self.pid, self.start_time)
    }

    /// `WORKLOAD/N` for replicas, the name otherwise.
    pub fn target(&self) -> String {
        match (&self.workload, self.replica) {
            (Some(w), Some(n)) => format!("{w}/{n}"),
            _ => self.name.clone(),
        }
    }
}

impl RunState {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// The state of the mesh in `data_dir`, or `None` when there is none.
    pub fn read(data_dir: &Path) -> Result<Option<RunState>, StateError> {
        let path = Self::path(data_dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Writes through a temporary file and a rename, so a reader never sees
    /// half a file.
    pub fn write(&self, data_dir: &Path) -> Result<(), StateError> {
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!(".{FILE}.tmp"));
        let text = serde_json::to_vec_pretty(self).expect("run state serializes");
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    pub fn remove(data_dir: &Path) -> Result<(), StateError> {
        let path = Self::path(data_dir);
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Write { path, source }),
        }
    }

    pub fn control_url(&self) -> String {
        format!("http://{}", self.control.http)
    }

    /// Whether any recorded process still runs.
    pub fn any_running(&self) -> bool {
        self.processes.iter().any(ProcessInfo::is_running)
    }

    /// The replicas of the workloads, in the order they were started.
    pub fn apps(&self) -> impl Iterator<Item = &ProcessInfo> {
        self.processes.iter().filter(|p| p.role == Role::App)
    }

    /// The proxy of replica `replica` of `workload` (in `namespace` when
    /// given, else the only workload of that name).
    pub fn proxy_of(
        &self,
        workload: &str,
        namespace: Option<&str>,
        replica: u32,
    ) -> Option<&ProcessInfo> {
        self.processes.iter().find(|p| {
            p.role == Role::Proxy
                && p.workload.as_deref() == Some(workload)
                && p.replica == Some(replica)
                && namespace.is_none_or(|ns| p.namespace.as_deref() == Some(ns))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RunState {
        let http: SocketAddr = "127.0.0.1:41000".parse().unwrap();
        let grpc: SocketAddr = "127.0.0.1:41001".parse().unwrap();
        RunState {
            control: ControlInfo {
                pid: 10,
                http,
                grpc,
            },
            processes: vec![
                ProcessInfo {
                    name: "control".into(),
                    role: Role::Control,
                    workload: None,
                    namespace: None,
                    replica: None,
                    pid: 10,
                    start_time: 1234,
                    addresses: Addresses {
                        http: Some(http),
                        grpc: Some(grpc),
                        ..Addresses::default()
                    },
                    log: "logs/control.log".into(),
                },
                ProcessInfo {
                    name: "web-0-proxy".into(),
                    role: Role::Proxy,
                    workload: Some("web".into()),
                    namespace: Some("default".into()),
                    replica: Some(0),
                    pid: 11,
                    start_time: 1240,
                    addresses: Addresses {
                        admin: Some("127.0.0.1:41002".parse().unwrap()),
                        inbound: Some("127.0.0.1:41003".parse().unwrap()),
                        outbound: Some("127.0.0.1:41004".parse().unwrap()),
                        app: Some("127.0.0.1:41005".parse().unwrap()),
                        ..Addresses::default()
                    },
                    log: "logs/web-0-proxy.log".into(),
                },
            ],
        }
    }

    #[test]
    fn round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RunState::read(dir.path()).unwrap(), None);
        let state = sample();
        state.write(dir.path()).unwrap();
        assert_eq!(RunState::read(dir.path()).unwrap(), Some(state.clone()));

        let json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(RunState::path(dir.path())).unwrap()).unwrap();
        assert_eq!(json["control"]["http"], "127.0.0.1:41000");
        assert_eq!(json["processes"][1]["role"], "proxy");
        assert_eq!(json["processes"][1]["start_time"], 1240);
        assert_eq!(
            json["processes"][1]["addresses"]["outbound"],
            "127.0.0.1:41004"
        );

        assert!(state.proxy_of("web", None, 0).is_some());
        assert!(state.proxy_of("web", Some("shop"), 0).is_none());
        assert!(state.proxy_of("web", None, 1).is_none());
        assert_eq!(state.control_url(), "http://127.0.0.1:41000");

        RunState::remove(dir.path()).unwrap();
        RunState::remove(dir.path()).unwrap();
        assert_eq!(RunState::read(dir.path()).unwrap(), None);
    }

    #[test]
    fn damaged_file_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(RunState::path(dir.path()), "{").unwrap();
        let err = RunState::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }
}
