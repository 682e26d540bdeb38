//! The local etcd cluster of `trellis up --store etcd`: three members as
//! child processes on loopback, each with its own data dir under
//! `DATA_DIR/etcd`, for control plane replicas to share.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Members of the local cluster: a majority survives one member's loss.
pub const MEMBERS: usize = 3;

/// One member's addresses.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MemberAddrs {
    pub client: SocketAddr,
    pub peer: SocketAddr,
}

/// The etcd binary: `$TRELLIS_ETCD`, else `etcd` on PATH, else the one
/// `scripts/test-peers etcd` built.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TRELLIS_ETCD").map(PathBuf::from) {
        if p.is_file() {
            return Ok(p);
        }
        anyhow::bail!("TRELLIS_ETCD={} is not a file", p.display());
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
    });
    if let Some(p) = on_path {
        return Ok(p);
    }
    let mut cached: Vec<PathBuf> = std::fs::read_dir("/var/cache/trellis/peers")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("etcd-"))
        .map(|e| e.path().join("etcd"))
        .filter(|p| p.is_file())
        .collect();
    cached.sort();
    cached.pop().ok_or_else(|| {
        anyhow::anyhow!(
            "--store etcd runs a local etcd cluster, and no etcd binary was found: install etcd 3.5 or later (Debian: `apt-get install etcd-server`; or `scripts/test-peers etcd` in a Trellis checkout) or set TRELLIS_ETCD"
        )
    })
}

/// The flags of member `i` of a cluster of `members`.
pub fn member_args(i: usize, members: &[MemberAddrs], data_dir: &Path) -> Vec<String> {
    let initial: Vec<String> = members
        .iter()
        .enumerate()
        .map(|(k, m)| format!("m{k}=http://{}", m.peer))
        .collect();
    let me = members[i];
    vec![
        "--name".into(),
        format!("m{i}"),
        "--data-dir".into(),
        data_dir.join(format!("m{i}")).display().to_string(),
        "--listen-client-urls".into(),
        format!("http://{}", me.client),
        "--advertise-client-urls".into(),
        format!("http://{}", me.client),
        "--listen-peer-urls".into(),
        format!("http://{}", me.peer),
        "--initial-advertise-peer-urls".into(),
        format!("http://{}", me.peer),
        "--initial-cluster".into(),
        initial.join(","),
        "--initial-cluster-state".into(),
        "new".into(),
        "--initial-cluster-token".into(),
        "trellis-local".into(),
        // Room for applies of many resources in one transaction.
        "--max-txn-ops".into(),
        "4096".into(),
        "--log-level".into(),
        "warn".into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_know_each_other() {
        let m = |c: u16, p: u16| MemberAddrs {
            client: SocketAddr::from(([127, 0, 0, 1], c)),
            peer: SocketAddr::from(([127, 0, 0, 1], p)),
        };
        let members = [m(1, 2), m(3, 4), m(5, 6)];
        let args = member_args(1, &members, Path::new("/d/etcd"));
        let flag = |f: &str| args[args.iter().position(|a| a == f).unwrap() + 1].clone();
        assert_eq!(flag("--name"), "m1");
        assert_eq!(flag("--data-dir"), "/d/etcd/m1");
        assert_eq!(flag("--listen-client-urls"), "http://127.0.0.1:3");
        assert_eq!(
            flag("--initial-cluster"),
            "m0=http://127.0.0.1:2,m1=http://127.0.0.1:4,m2=http://127.0.0.1:6"
        );
    }
}
