//! Pods mode: every Workload replica is a pod, its own network namespace
//! on a bridge, running its app and its sidecar. The pod's redirect rules
//! (`trellis init`) send the app's outbound TCP, its DNS and the inbound
//! TCP through the sidecar, so apps need no proxy settings:
//! `curl http://catalog:8080/` just works. The sidecar's ports, mark and
//! DNS are the pod contract of `trellis_proxy::pod`.
//!
//! The control plane runs on the host: its proxy API on the bridge's
//! gateway address, its HTTP API on the host's loopback only.
//! The record of processes is `run.json` as in process mode; the network
//! is in `pods.json` (see `podnet`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use trellis_proxy::pod;
use trellis_resource::Resource;

use super::plan::{self, Replica};
use super::podnet::{self, Pod, PodNet};
use super::runner::{Layout, Placement, ReplicaAddrs};
use super::state::ControlInfo;
use crate::cli::{ExecArgs, Global};

/// The placement of pods mode: the network of the run, and the
/// nameservers its sidecars forward names outside the mesh to.
pub struct Pods {
    net: PodNet,
    upstreams: Vec<SocketAddr>,
}

impl Pods {
    fn pod(&self, k: usize) -> &Pod {
        &self.net.pods[k]
    }
}

impl Placement for Pods {
    /// `--subnet`; omitted: a free /24 in 10.200.0.0-10.249.255.0.
    type Args = Option<String>;

    const DETACHED: &'static str = "`trellis ps` lists it, `trellis exec WORKLOAD -- CMD` runs in a pod, `trellis down` removes it";

    fn check_host() -> anyhow::Result<()> {
        Ok(podnet::check_host()?)
    }

    fn clear_leftovers(data_dir: &Path) -> anyhow::Result<()> {
        let removed = podnet::cleanup(data_dir)?;
        if !removed.is_empty() {
            eprintln!("removed what an earlier run left: {}", removed.join(", "));
        }
        Ok(())
    }

    fn lay_out(
        resources: &[Resource],
        data_dir: &Path,
        subnet: Option<String>,
    ) -> anyhow::Result<Layout<Pods>> {
        // Each replica's app listens on its Workload's port, the sidecar on
        // the pod contract's: every pod has the whole port range to itself.
        let mut ports = Vec::new();
        for r in resources {
            let Some(w) = r.as_workload() else { continue };
            for _ in 0..w.replicas {
                ports.extend([
                    w.port,
                    pod::INBOUND_PORT,
                    pod::OUTBOUND_PORT,
                    pod::ADMIN_PORT,
                ]);
            }
        }
        let replicas = plan::replicas(resources, &ports);

        let routes = podnet::host_routes()?;
        let id = podnet::run_id();
        let subnet = podnet::choose_subnet(
            subnet.as_deref(),
            &routes,
            replicas.len(),
            u32::from_str_radix(&id, 16).unwrap_or(0),
        )?;
        let gateway = subnet.host(1).expect("a subnet with room has a gateway");
        let pods = replicas
            .iter()
            .enumerate()
            .map(|(k, r)| Pod {
                netns: format!("trellis-{id}-{k}"),
                veth: format!("trv{id}n{k}"),
                ip: subnet
                    .host(2 + k as u32)
                    .expect("choose_subnet checked the room"),
                workload: r.workload.clone(),
                namespace: r.namespace.clone(),
                replica: r.replica,
                instance: r.instance.clone(),
            })
            .collect();
        let net = PodNet {
            bridge: format!("trb{id}"),
            id,
            subnet,
            gateway,
            pods,
        };
        // Recorded before anything exists, so a crash at any point leaves
        // a record that `down` cleans up from.
        net.write(data_dir)?;

        let free = plan::free_ports(2).context("finding free ports for the control plane")?;
        Ok(Layout {
            placement: Pods {
                net,
                upstreams: pod::host_nameservers(),
            },
            replicas,
            // The HTTP API stays on the host's loopback: pods reach only the
            // proxy API (on the gateway), never the API that holds the keys.
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, free[0])),
            grpc: SocketAddr::from((gateway, free[1])),
        })
    }

    /// The bridge, then each pod with its redirect rules.
    fn create(&mut self, exe: &Path, control: &ControlInfo) -> anyhow::Result<()> {
        eprintln!(
            "creating bridge {} ({}) and {} pods",
            self.net.bridge,
            self.net.subnet,
            self.net.pods.len()
        );
        self.net.create_bridge()?;
        // The control plane's ports are reached directly (its API and OTLP
        // clients do not mark their sockets).
        let excluded = format!("{},{}", control.http.port(), control.grpc.port());
        for pod in &self.net.pods {
            self.net.create_pod(pod)?;
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
        Ok(())
    }

    /// `ip netns exec` enters the namespace (and mounts the pod's
    /// resolv.conf), then execs the program: the pid stays the program's.
    fn command(&self, k: usize, program: PathBuf, args: Vec<String>) -> (PathBuf, Vec<String>) {
        let mut a = vec![
            "netns".to_string(),
            "exec".to_string(),
            self.pod(k).netns.clone(),
            program.display().to_string(),
        ];
        a.extend(args);
        (PathBuf::from("ip"), a)
    }

    /// No proxy settings: the pod's rules do the routing.
    fn app_env(&self, r: &Replica) -> Vec<(String, String)> {
        r.app_env()
            .into_iter()
            .filter(|(k, _)| {
                !k.eq_ignore_ascii_case("http_proxy") && !k.eq_ignore_ascii_case("no_proxy")
            })
            .collect()
    }

    /// Transparent, advertised at the pod's IP; inbound and admin on every
    /// interface (the admin port is reachable from the host for `up`'s
    /// readiness checks, `stat` and Prometheus).
    fn proxy_args(&self, k: usize, r: &Replica, grpc: SocketAddr, data_dir: &Path) -> Vec<String> {
        let mut args = r.proxy_args(grpc, data_dir, Ipv4Addr::UNSPECIFIED.into());
        args.extend([
            "--advertise-addr".to_string(),
            self.pod(k).ip.to_string(),
            "--transparent".to_string(),
        ]);
        for u in &self.upstreams {
            args.extend(["--dns-upstream".to_string(), u.to_string()]);
        }
        args
    }

    fn addrs(&self, k: usize, r: &Replica) -> ReplicaAddrs {
        let ip = self.pod(k).ip;
        ReplicaAddrs {
            app: SocketAddr::from((ip, r.ports.app)),
            admin: SocketAddr::from((ip, r.ports.admin)),
            inbound: SocketAddr::from((ip, r.ports.inbound)),
            outbound: SocketAddr::from((Ipv4Addr::LOCALHOST, r.ports.outbound)),
        }
    }

    /// Read from the app's own /proc: connecting to the pod's IP would be
    /// redirected to the sidecar.
    async fn app_serves(&self, _k: usize, r: &Replica, pid: u32) -> bool {
        listening(pid, r.ports.app)
    }

    fn describe(&self) -> String {
        format!(" in pods on {} ({})", self.net.bridge, self.net.subnet)
    }

    fn remove(&self, data_dir: &Path) {
        self.net.remove();
        let _ = std::fs::remove_file(PodNet::path(data_dir));
    }
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
        return Err(super::no_replica(global, workload, replica, n));
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
    Ok(Some(super::exit_code(status)))
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

    fn catalog_pod() -> (Pods, Replica) {
        let r = Replica {
            workload: "catalog".into(),
            namespace: "default".into(),
            replica: 0,
            instance: "catalog-0".into(),
            labels: [("app".to_string(), "catalog".to_string())].into(),
            service_account: None,
            command: vec!["trellis".into()],
            env: [("NO_PROXY".to_string(), "x".to_string())].into(),
            ports: plan::ReplicaPorts {
                app: 8080,
                inbound: pod::INBOUND_PORT,
                outbound: pod::OUTBOUND_PORT,
                admin: pod::ADMIN_PORT,
            },
        };
        let subnet = podnet::Cidr::parse("10.200.1.0/24").unwrap();
        let pods = Pods {
            net: PodNet {
                id: "x".into(),
                bridge: "trbx".into(),
                subnet,
                gateway: Ipv4Addr::new(10, 200, 1, 1),
                pods: vec![Pod {
                    netns: "trellis-x-0".into(),
                    veth: "trvxn0".into(),
                    ip: Ipv4Addr::new(10, 200, 1, 2),
                    workload: "catalog".into(),
                    namespace: "default".into(),
                    replica: 0,
                    instance: "catalog-0".into(),
                }],
            },
            upstreams: vec!["10.0.0.2:53".parse().unwrap()],
        };
        (pods, r)
    }

    #[test]
    fn sidecars_in_pods_are_transparent_and_reachable_from_the_host() {
        let (pods, r) = catalog_pod();
        let a = pods.proxy_args(0, &r, "10.200.1.1:4000".parse().unwrap(), Path::new("/d"));
        let s = a.join(" ");
        assert!(s.contains("--transparent"), "{s}");
        assert!(s.contains("--inbound-addr 0.0.0.0:15006"), "{s}");
        assert!(s.contains("--outbound-addr 127.0.0.1:15001"), "{s}");
        assert!(s.contains("--admin-addr 0.0.0.0:15000"), "{s}");
        assert!(s.contains("--advertise-addr 10.200.1.2"), "{s}");
        assert!(s.contains("--dns-upstream 10.0.0.2:53"), "{s}");
        assert!(s.contains("--control-plane 10.200.1.1:4000"), "{s}");
        assert_eq!(
            pods.addrs(0, &r),
            ReplicaAddrs {
                app: "10.200.1.2:8080".parse().unwrap(),
                admin: "10.200.1.2:15000".parse().unwrap(),
                inbound: "10.200.1.2:15006".parse().unwrap(),
                outbound: "127.0.0.1:15001".parse().unwrap(),
            }
        );
    }

    #[test]
    fn apps_run_in_their_pod_without_proxy_settings() {
        let (pods, r) = catalog_pod();
        let (program, args) = pods.command(0, "/bin/app".into(), vec!["-v".into()]);
        assert_eq!(program, PathBuf::from("ip"));
        assert_eq!(args, ["netns", "exec", "trellis-x-0", "/bin/app", "-v"]);
        let env = pods.app_env(&r);
        assert!(
            env.iter()
                .all(|(k, _)| !k.to_lowercase().ends_with("_proxy")),
            "{env:?}"
        );
        assert!(env.contains(&("PORT".to_string(), "8080".to_string())));
        assert_eq!(
            pods.describe(),
            " in pods on trbx (10.200.1.0/24)",
            "the ready line says where the pods are"
        );
    }
}
