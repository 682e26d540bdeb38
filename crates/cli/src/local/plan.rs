//! What a local mesh runs for each Workload replica: its ports, the app's
//! command line and environment, and the proxy's flags (which placements
//! adjust, see `runner::Placement`).
//! Pure functions of the resources and the chosen ports, so they are
//! tested without starting anything.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};

use trellis_resource::{Resource, DEFAULT_NAMESPACE};

/// Loopback: in process mode every port of the mesh is local.
pub const LOCALHOST: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Ports of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicaPorts {
    pub app: u16,
    pub inbound: u16,
    pub outbound: u16,
    pub admin: u16,
}

impl ReplicaPorts {
    pub fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((LOCALHOST, port))
    }
}

/// One replica of one Workload.
#[derive(Clone, Debug, PartialEq)]
pub struct Replica {
    pub workload: String,
    pub namespace: String,
    pub replica: u32,
    /// Unique in the mesh: `<workload>-<n>`, plus `.<namespace>` outside
    /// `default` so that equal names in two namespaces do not clash.
    pub instance: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: Option<String>,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub ports: ReplicaPorts,
}

pub fn instance_name(workload: &str, namespace: &str, replica: u32) -> String {
    if namespace == DEFAULT_NAMESPACE {
        format!("{workload}-{replica}")
    } else {
        format!("{workload}-{replica}.{namespace}")
    }
}

/// Every replica of every Workload in `resources`, with ports taken in
/// order from `ports` (four per replica).
pub fn replicas(resources: &[Resource], ports: &[u16]) -> Vec<Replica> {
    let mut ports = ports.chunks_exact(4);
    let mut out = Vec::new();
    for r in resources {
        let Some(w) = r.as_workload() else { continue };
        for n in 0..w.replicas {
            let p = ports.next().expect("four ports per replica");
            out.push(Replica {
                workload: r.metadata.name.clone(),
                namespace: r.metadata.namespace.clone(),
                replica: n,
                instance: instance_name(&r.metadata.name, &r.metadata.namespace, n),
                labels: r.metadata.labels.clone(),
                service_account: w.service_account.clone(),
                command: w.command.clone(),
                env: w.env.clone(),
                ports: ReplicaPorts {
                    app: p[0],
                    inbound: p[1],
                    outbound: p[2],
                    admin: p[3],
                },
            });
        }
    }
    out
}

/// How many replicas the Workloads of `resources` ask for.
pub fn replica_count(resources: &[Resource]) -> usize {
    resources
        .iter()
        .filter_map(|r| r.as_workload())
        .map(|w| w.replicas as usize)
        .sum()
}

/// `n` distinct ports that were free on 127.0.0.1 a moment ago. All are
/// held open until all are found, so none is handed out twice; another
/// process may still take one before its user binds it, which then fails
/// start-up with the port named.
pub fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    free_ports_besides(n, &[])
}

/// `free_ports`, none of them in `taken`: ports an earlier call handed out
/// are free again once its listeners close, and the kernel may offer them
/// once more.
pub fn free_ports_besides(n: usize, taken: &[u16]) -> std::io::Result<Vec<u16>> {
    let mut held = Vec::with_capacity(n);
    let mut ports = Vec::with_capacity(n);
    // Bounded: each offer of a taken port is one more try.
    for _ in 0..n + taken.len() + 64 {
        if ports.len() == n {
            break;
        }
        let l = TcpListener::bind((LOCALHOST, 0))?;
        let port = l.local_addr()?.port();
        held.push(l);
        if !taken.contains(&port) {
            ports.push(port);
        }
    }
    if ports.len() < n {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("found {} of {n} free ports on 127.0.0.1", ports.len()),
        ));
    }
    Ok(ports)
}

/// Replaces every `${PORT}`.
pub fn expand_port(s: &str, port: u16) -> String {
    s.replace("${PORT}", &port.to_string())
}

/// The program of a command: a leading `trellis` means this very binary,
/// so resource files can run `trellis demo-app` wherever Trellis is built.
pub fn program(command0: &str, self_exe: &Path) -> PathBuf {
    if command0 == "trellis" {
        self_exe.to_path_buf()
    } else {
        PathBuf::from(command0)
    }
}

impl Replica {
    /// The app's argv, `${PORT}` expanded.
    pub fn app_args(&self) -> Vec<String> {
        self.command
            .iter()
            .skip(1)
            .map(|a| expand_port(a, self.ports.app))
            .collect()
    }

    /// The app's environment, on top of the CLI's own.
    pub fn app_env(&self) -> Vec<(String, String)> {
        let proxy = format!("http://{}", ReplicaPorts::addr(self.ports.outbound));
        let mut env = vec![
            ("PORT".to_string(), self.ports.app.to_string()),
            (
                "SERVICE".to_string(),
                self.labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| self.workload.clone()),
            ),
            (
                "VERSION".to_string(),
                self.labels.get("version").cloned().unwrap_or_default(),
            ),
            ("INSTANCE".to_string(), self.instance.clone()),
            ("WORKLOAD".to_string(), self.workload.clone()),
            ("NAMESPACE".to_string(), self.namespace.clone()),
        ];
        // The app's traffic goes through its sidecar, even to 127.0.0.1: a
        // NO_PROXY inherited from the user's shell would bypass it.
        env.extend([
            ("HTTP_PROXY".to_string(), proxy.clone()),
            ("http_proxy".to_string(), proxy),
            ("NO_PROXY".to_string(), String::new()),
            ("no_proxy".to_string(), String::new()),
        ]);
        // Last, so what the Workload says wins.
        env.extend(
            self.env
                .iter()
                .map(|(k, v)| (k.clone(), expand_port(v, self.ports.app))),
        );
        env
    }

    /// The identity's service account: explicit, else the `app` label, else
    /// the workload's name (as `trellis proxy` decides it).
    pub fn effective_service_account(&self) -> String {
        self.service_account
            .clone()
            .or_else(|| self.labels.get("app").cloned())
            .unwrap_or_else(|| self.workload.clone())
    }

    /// Where `up` writes this replica's join token (mode 0600).
    pub fn token_path(&self, data_dir: &Path) -> std::path::PathBuf {
        data_dir.join("tokens").join(&self.instance)
    }

    /// The flags of `trellis proxy` for this replica, its inbound and admin
    /// listeners on `listen` (the outbound one is for the app alone, so on
    /// loopback).
    pub fn proxy_args(&self, grpc: &[SocketAddr], data_dir: &Path, listen: IpAddr) -> Vec<String> {
        let grpc: Vec<String> = grpc.iter().map(SocketAddr::to_string).collect();
        let addr = |ip: IpAddr, p: u16| SocketAddr::new(ip, p).to_string();
        let mut args = vec![
            "proxy".to_string(),
            "--control-plane".to_string(),
            grpc.join(","),
            "--workload".to_string(),
            self.workload.clone(),
            "--namespace".to_string(),
            self.namespace.clone(),
            "--app-port".to_string(),
            self.ports.app.to_string(),
            "--inbound-addr".to_string(),
            addr(listen, self.ports.inbound),
            "--outbound-addr".to_string(),
            addr(LOCALHOST.into(), self.ports.outbound),
            "--admin-addr".to_string(),
            addr(listen, self.ports.admin),
            "--cache-dir".to_string(),
            data_dir
                .join("cache")
                .join(&self.instance)
                .display()
                .to_string(),
            "--instance".to_string(),
            self.instance.clone(),
            "--token-file".to_string(),
            self.token_path(data_dir).display().to_string(),
        ];
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            args.extend(["--labels".to_string(), labels.join(",")]);
        }
        if let Some(sa) = &self.service_account {
            args.extend(["--service-account".to_string(), sa.clone()]);
        }
        args
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workloads() -> Vec<Resource> {
        trellis_resource::parse_documents(
            "w.yaml",
            r#"
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: catalog-v2, labels: {app: catalog, version: v2}}
spec:
  replicas: 2
  command: [trellis, demo-app, --listen, "127.0.0.1:${PORT}"]
  env: {GREETING: "port ${PORT}", NO_PROXY: "localhost"}
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: tool, namespace: ops}
spec:
  serviceAccount: robot
  command: [./tool]
"#,
        )
        .unwrap()
    }

    #[test]
    fn expands_port() {
        assert_eq!(expand_port("--port=${PORT}", 9000), "--port=9000");
        assert_eq!(expand_port("${PORT}${PORT}", 1), "11");
        assert_eq!(expand_port("$PORT", 1), "$PORT");
    }

    #[test]
    fn plans_replicas_with_ports_env_and_flags() {
        let rs = workloads();
        assert_eq!(replica_count(&rs), 3);
        let ports: Vec<u16> = (9000..9012).collect();
        let plan = replicas(&rs, &ports);
        assert_eq!(plan.len(), 3);
        let r1 = &plan[1];
        assert_eq!(r1.instance, "catalog-v2-1");
        assert_eq!(
            r1.ports,
            ReplicaPorts {
                app: 9004,
                inbound: 9005,
                outbound: 9006,
                admin: 9007
            }
        );
        assert_eq!(r1.app_args(), ["demo-app", "--listen", "127.0.0.1:9004"]);

        let env: BTreeMap<_, _> = r1.app_env().into_iter().collect();
        assert_eq!(env["PORT"], "9004");
        assert_eq!(env["SERVICE"], "catalog");
        assert_eq!(env["VERSION"], "v2");
        assert_eq!(env["INSTANCE"], "catalog-v2-1");
        assert_eq!(env["WORKLOAD"], "catalog-v2");
        assert_eq!(env["NAMESPACE"], "default");
        assert_eq!(env["GREETING"], "port 9004");
        assert_eq!(env["HTTP_PROXY"], "http://127.0.0.1:9006");
        assert_eq!(env["http_proxy"], "http://127.0.0.1:9006");
        assert_eq!(
            env["no_proxy"], "",
            "the shell's no_proxy does not bypass the sidecar"
        );
        assert_eq!(env["NO_PROXY"], "localhost", "the Workload's env wins");

        let args = r1.proxy_args(
            &["127.0.0.1:15010".parse().unwrap()],
            Path::new("/d"),
            LOCALHOST.into(),
        );
        let flag = |f: &str| args[args.iter().position(|a| a == f).unwrap() + 1].clone();
        assert_eq!(args[0], "proxy");
        assert_eq!(flag("--control-plane"), "127.0.0.1:15010");
        assert_eq!(flag("--labels"), "app=catalog,version=v2");
        assert_eq!(flag("--inbound-addr"), "127.0.0.1:9005");
        assert_eq!(flag("--cache-dir"), "/d/cache/catalog-v2-1");
        assert!(!args.contains(&"--service-account".to_string()));

        let tool = &plan[2];
        assert_eq!(tool.instance, "tool-0.ops");
        let env: BTreeMap<_, _> = tool.app_env().into_iter().collect();
        assert_eq!(env["SERVICE"], "tool");
        assert_eq!(env["VERSION"], "");
        let args = tool.proxy_args(
            &[
                "127.0.0.1:1".parse().unwrap(),
                "127.0.0.1:2".parse().unwrap(),
            ],
            Path::new("/d"),
            Ipv4Addr::UNSPECIFIED.into(),
        );
        assert!(args
            .windows(2)
            .any(|w| w == ["--inbound-addr", "0.0.0.0:9009"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--outbound-addr", "127.0.0.1:9010"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--admin-addr", "0.0.0.0:9011"]));
        assert!(args.windows(2).any(|w| w == ["--service-account", "robot"]));
        assert!(args
            .windows(2)
            .any(|w| w == ["--control-plane", "127.0.0.1:1,127.0.0.1:2"]));
        assert!(!args.contains(&"--labels".to_string()));
    }

    #[test]
    fn resolves_trellis_to_itself() {
        let me = Path::new("/opt/bin/trellis-dev");
        assert_eq!(program("trellis", me), me);
        assert_eq!(program("python3", me), PathBuf::from("python3"));
    }

    #[test]
    fn free_ports_besides_never_hands_out_a_taken_port() {
        let first = free_ports(16).unwrap();
        // The first call's listeners are closed: the kernel may offer those
        // ports again, but never to this call.
        for _ in 0..20 {
            let more = free_ports_besides(16, &first).unwrap();
            assert_eq!(more.len(), 16);
            assert!(
                more.iter().all(|p| !first.contains(p)),
                "{more:?} ∩ {first:?}"
            );
        }
    }

    #[test]
    fn free_ports_are_distinct() {
        let ports = free_ports(8).unwrap();
        let unique: std::collections::BTreeSet<_> = ports.iter().collect();
        assert_eq!(unique.len(), 8);
    }
}
