//! The host side of pods mode: one bridge per run, one network namespace
//! per replica joined to it by a veth pair, and the record of them in
//! `DATA_DIR/pods.json`, written before anything is created so that
//! `trellis down` can remove it all, also after a crash.
//!
//! Names carry a random run id (`trb<id>`, `trellis-<id>-<n>`, `trv<id>n<n>`),
//! so several meshes, and parallel tests, never share a link or namespace.
//! Nothing is changed on the host besides these links and namespaces and
//! `/etc/netns/<ns>/resolv.conf` (which `ip netns exec` mounts over the
//! pod's /etc/resolv.conf): no host firewall rules, no sysctls.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

pub const FILE: &str = "pods.json";

/// An IPv4 network, `addr/len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
        let len: u8 = len.parse().ok()?;
        if len > 32 {
            return None;
        }
        let addr: Ipv4Addr = ip.parse().ok()?;
        let c = Cidr { addr, len };
        Some(Cidr {
            addr: Ipv4Addr::from(u32::from(addr) & c.mask()),
            len,
        })
    }

    fn mask(&self) -> u32 {
        if self.len == 0 {
            0
        } else {
            u32::MAX << (32 - self.len)
        }
    }

    pub fn overlaps(&self, other: &Cidr) -> bool {
        let m = self.mask() & other.mask();
        u32::from(self.addr) & m == u32::from(other.addr) & m
    }

    /// The `n`th address of the network (1 = the gateway).
    pub fn host(&self, n: u32) -> Option<Ipv4Addr> {
        let size = 1u64 << (32 - u32::from(self.len));
        // Not the network address nor the broadcast address.
        (u64::from(n) >= 1 && u64::from(n) < size - 1)
            .then(|| Ipv4Addr::from(u32::from(self.addr) + n))
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// One pod: a replica's namespace and its link.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Pod {
    pub netns: String,
    /// The host end of the veth pair (the pod end is `eth0` inside).
    pub veth: String,
    pub ip: Ipv4Addr,
    pub workload: String,
    pub namespace: String,
    pub replica: u32,
    pub instance: String,
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
/// Present while a Trellis run turned IPv4 forwarding on.
const FORWARD_MARKER: &str = "/run/trellis-ip-forward";
/// Every run's bridge is named `trb<id>`.
const BRIDGE_PREFIX: &str = "trb";

/// What a pods-mode run created on the host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PodNet {
    pub id: String,
    pub bridge: String,
    pub subnet: Cidr,
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
}

#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    #[error("pods mode needs root (network namespaces, links, nftables): run `sudo trellis up --mode pods`, or use --mode process")]
    NotRoot,
    #[error("pods mode needs `{0}` on PATH: install {1}, or use --mode process")]
    Missing(&'static str, &'static str),
    #[error("--subnet {0}: expected an IPv4 CIDR such as 10.123.0.0/24")]
    BadSubnet(String),
    #[error("--subnet {subnet} overlaps the host route {route}: choose a free one with --subnet")]
    Overlap { subnet: Cidr, route: String },
    #[error(
        "--subnet {0} has room for {1} pods, and the mesh has {2} replicas: choose a larger one"
    )]
    TooSmall(Cidr, u32, usize),
    #[error("no free /24 in 10.200.0.0-10.249.255.0 besides the host's routes: choose one with --subnet")]
    NoFreeSubnet,
    #[error("`{cmd}` failed: {err}")]
    Command { cmd: String, err: String },
}

/// Runs a command that must succeed.
pub fn run(args: &[&str]) -> Result<String, PodNetError> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| PodNetError::Command {
            cmd: args.join(" "),
            err: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(PodNetError::Command {
            cmd: args.join(" "),
            err: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Root, `ip` and `nft`: what pods mode needs, with what to do if not.
pub fn check_host() -> Result<(), PodNetError> {
    if !crate::init::is_root() {
        return Err(PodNetError::NotRoot);
    }
    for (tool, pkg) in [("ip", "iproute2"), ("nft", "nftables")] {
        let found = Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        if !found {
            return Err(PodNetError::Missing(tool, pkg));
        }
    }
    Ok(())
}

/// The IPv4 networks the host routes (every table), as `ip` prints them.
pub fn host_routes() -> Result<Vec<(Cidr, String)>, PodNetError> {
    let json = run(&["ip", "-4", "-j", "route", "show", "table", "all"])?;
    let routes: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap_or_default();
    Ok(routes
        .iter()
        .filter_map(|r| {
            let dst = r.get("dst")?.as_str()?;
            // The default route covers everything; it is not a conflict.
            if dst == "default" {
                return None;
            }
            Some((Cidr::parse(dst)?, dst.to_string()))
        })
        .collect())
}

/// `wanted`, checked against the host's routes, or a free /24.
pub fn choose_subnet(
    wanted: Option<&str>,
    routes: &[(Cidr, String)],
    replicas: usize,
    seed: u32,
) -> Result<Cidr, PodNetError> {
    let check = |c: Cidr| -> Result<Cidr, PodNetError> {
        if let Some((_, r)) = routes.iter().find(|(r, _)| r.overlaps(&c)) {
            return Err(PodNetError::Overlap {
                subnet: c,
                route: r.clone(),
            });
        }
        Ok(c)
    };
    if let Some(w) = wanted {
        let c = Cidr::parse(w).ok_or_else(|| PodNetError::BadSubnet(w.to_string()))?;
        let room = if c.len >= 31 {
            0
        } else {
            (1u32 << (32 - u32::from(c.len))) - 3
        };
        if (room as usize) < replicas {
            return Err(PodNetError::TooSmall(c, room, replicas));
        }
        return check(c);
    }
    // /24s in 10.200.0.0/13-ish, starting from a random one.
    const N: u32 = 50 * 256;
    for i in 0..N {
        let k = (seed + i) % N;
        let c = Cidr {
            addr: Ipv4Addr::new(10, 200 + (k / 256) as u8, (k % 256) as u8, 0),
            len: 24,
        };
        if replicas <= 253 && check(c).is_ok() {
            return Ok(c);
        }
    }
    Err(PodNetError::NoFreeSubnet)
}

impl PodNet {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<Option<PodNet>> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(t) => Ok(Some(serde_json::from_slice(&t).with_context(|| {
                format!(
                    "{} is damaged: remove its links and namespaces by hand, then delete it",
                    path.display()
                )
            })?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Write + rename: a crash never leaves half a record.
    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        let path = Self::path(data_dir);
        let tmp = data_dir.join(format!(".{FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .and_then(|_| std::fs::rename(&tmp, &path))
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Creates the bridge with the gateway address.
    pub fn create_bridge(&self) -> Result<(), PodNetError> {
        run(&["ip", "link", "add", &self.bridge, "type", "bridge"])?;
        run(&[
            "ip",
            "addr",
            "add",
            &format!("{}/{}", self.gateway, self.subnet.len),
            "dev",
            &self.bridge,
        ])?;
        run(&["ip", "link", "set", &self.bridge, "up"])?;
        self.enable_egress()
    }

    /// The nftables table of this run's egress NAT on the host.
    pub fn egress_table(&self) -> String {
        format!("trellis-egress-{}", self.id)
    }

    /// Lets pods reach beyond the host: traffic from the subnet that leaves
    /// by another interface is masqueraded, and forwarding is on. Both are
    /// undone by `remove` (forwarding only if Trellis turned it on and no
    /// other run still needs it).
    fn enable_egress(&self) -> Result<(), PodNetError> {
        let table = self.egress_table();
        let subnet = self.subnet.to_string();
        run(&["nft", "add", "table", "ip", &table])?;
        run(&[
            "nft",
            "add",
            "chain",
            "ip",
            &table,
            "postrouting",
            "{",
            "type",
            "nat",
            "hook",
            "postrouting",
            "priority",
            "100",
            ";",
            "policy",
            "accept",
            ";",
            "}",
        ])?;
        run(&[
            "nft",
            "add",
            "rule",
            "ip",
            &table,
            "postrouting",
            "ip",
            "saddr",
            &subnet,
            "oifname",
            "!=",
            &self.bridge,
            "masquerade",
        ])?;
        run(&[
            "nft", "add", "chain", "ip", &table, "forward", "{", "type", "filter", "hook",
            "forward", "priority", "0", ";", "policy", "accept", ";", "}",
        ])?;
        run(&[
            "nft",
            "add",
            "rule",
            "ip",
            &table,
            "forward",
            "iifname",
            &self.bridge,
            "accept",
        ])?;
        run(&[
            "nft",
            "add",
            "rule",
            "ip",
            &table,
            "forward",
            "oifname",
            &self.bridge,
            "ct",
            "state",
            "established,related",
            "accept",
        ])?;
        let forwarding = std::fs::read_to_string(IP_FORWARD).unwrap_or_default();
        if forwarding.trim() == "0" {
            // Remembered on the host (not per run), so that the last run
            // to go turns it off again.
            std::fs::write(FORWARD_MARKER, b"trellis turned ip_forward on\n")
                .and_then(|_| std::fs::write(IP_FORWARD, b"1"))
                .map_err(|e| PodNetError::Command {
                    cmd: format!("writing {IP_FORWARD}"),
                    err: e.to_string(),
                })?;
        }
        Ok(())
    }

    /// Creates a pod's namespace (loopback up), its veth pair on the
    /// bridge, its address and default route, and its resolv.conf.
    pub fn create_pod(&self, pod: &Pod) -> Result<(), PodNetError> {
        let ns = pod.netns.as_str();
        let peer = format!("{}p", pod.veth);
        run(&["ip", "netns", "add", ns])?;
        run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
        run(&[
            "ip", "link", "add", &pod.veth, "type", "veth", "peer", "name", &peer,
        ])?;
        run(&["ip", "link", "set", &peer, "netns", ns])?;
        run(&["ip", "-n", ns, "link", "set", &peer, "name", "eth0"])?;
        run(&[
            "ip",
            "-n",
            ns,
            "addr",
            "add",
            &format!("{}/{}", pod.ip, self.subnet.len),
            "dev",
            "eth0",
        ])?;
        run(&["ip", "-n", ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "link", "set", &pod.veth, "master", &self.bridge])?;
        run(&["ip", "link", "set", &pod.veth, "up"])?;
        run(&[
            "ip",
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &self.gateway.to_string(),
        ])?;
        let dir = PathBuf::from("/etc/netns").join(ns);
        std::fs::create_dir_all(&dir)
            .and_then(|_| {
                std::fs::write(
                    dir.join("resolv.conf"),
                    trellis_proxy::pod::resolv_conf(self.gateway),
                )
            })
            .map_err(|e| PodNetError::Command {
                cmd: format!("writing {}/resolv.conf", dir.display()),
                err: e.to_string(),
            })?;
        Ok(())
    }

    /// Removes everything recorded, whatever exists of it: processes still
    /// in a namespace (an app's own children), the namespaces (and with
    /// them their veth pairs and rules), links left on the host, the
    /// bridge and the resolv.conf folders. Returns what it removed.
    pub fn remove(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for pod in &self.pods {
            let ns = pod.netns.as_str();
            if netns_exists(ns) {
                // Processes that run on in the namespace would keep it (and
                // its veth) alive after `ip netns del`.
                if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
                    for pid in pids.split_whitespace() {
                        let _ = run(&["kill", "-KILL", pid]);
                    }
                }
                if run(&["ip", "netns", "del", ns]).is_ok() {
                    removed.push(format!("netns {ns}"));
                }
            }
            if link_exists(&pod.veth) && run(&["ip", "link", "del", &pod.veth]).is_ok() {
                removed.push(format!("link {}", pod.veth));
            }
            let dir = PathBuf::from("/etc/netns").join(ns);
            if dir.exists() && std::fs::remove_dir_all(&dir).is_ok() {
                removed.push(dir.display().to_string());
            }
        }
        if link_exists(&self.bridge) && run(&["ip", "link", "del", &self.bridge]).is_ok() {
            removed.push(format!("bridge {}", self.bridge));
        }
        let table = self.egress_table();
        if run(&["nft", "list", "table", "ip", &table]).is_ok()
            && run(&["nft", "delete", "table", "ip", &table]).is_ok()
        {
            removed.push(format!("nftables table ip {table}"));
        }
        let other_runs = std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with(BRIDGE_PREFIX))
            })
            .unwrap_or(false);
        if !other_runs
            && Path::new(FORWARD_MARKER).exists()
            && std::fs::write(IP_FORWARD, b"0").is_ok()
        {
            let _ = std::fs::remove_file(FORWARD_MARKER);
            removed.push("ip_forward (back to 0)".to_string());
        }
        removed
    }
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// A short random run id (hex), for names unique per run. An id whose
/// bridge or first namespace already exists is skipped: cleanup removes
/// what the record names, so it must never name another run's links.
pub fn run_id() -> String {
    loop {
        let id = format!("{:05x}", rand::random::<u32>() & 0xf_ffff);
        let taken = link_exists(&format!("trb{id}"))
            || netns_exists(&format!("trellis-{id}-0"))
            || std::fs::read_dir("/sys/class/net")
                .map(|d| {
                    d.flatten()
                        .any(|e| e.file_name().to_string_lossy().contains(&id))
                })
                .unwrap_or(false);
        if !taken {
            return id;
        }
    }
}

/// Removes what `data_dir`'s pods.json records, then the record. Nothing
/// recorded is fine.
pub fn cleanup(data_dir: &Path) -> anyhow::Result<Vec<String>> {
    let Some(net) = PodNet::read(data_dir)? else {
        return Ok(Vec::new());
    };
    let removed = net.remove();
    let _ = std::fs::remove_file(PodNet::path(data_dir));
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn cidrs_parse_overlap_and_number_hosts() {
        assert_eq!(c("10.1.2.3/24").to_string(), "10.1.2.0/24");
        assert!(c("10.1.0.0/16").overlaps(&c("10.1.5.0/24")));
        assert!(!c("10.1.0.0/24").overlaps(&c("10.1.1.0/24")));
        assert_eq!(c("10.1.2.0/24").host(1), Some(Ipv4Addr::new(10, 1, 2, 1)));
        assert_eq!(c("10.1.2.0/24").host(255), None);
        assert_eq!(Cidr::parse("10.1.2.0/33"), None);
        assert_eq!(Cidr::parse("x/24"), None);
    }

    #[test]
    fn subnets_avoid_host_routes() {
        let routes = vec![(c("10.200.0.0/16"), "10.200.0.0/16".to_string())];
        let err = choose_subnet(Some("10.200.3.0/24"), &routes, 2, 0).unwrap_err();
        assert!(
            err.to_string()
                .contains("overlaps the host route 10.200.0.0/16"),
            "{err}"
        );
        let auto = choose_subnet(None, &routes, 2, 0).unwrap();
        assert!(!auto.overlaps(&routes[0].0), "{auto}");
        assert!(matches!(
            choose_subnet(Some("10.9.9.0/30"), &[], 2, 0),
            Err(PodNetError::TooSmall(..))
        ));
        assert!(choose_subnet(Some("nonsense"), &[], 2, 0).is_err());
    }
}
