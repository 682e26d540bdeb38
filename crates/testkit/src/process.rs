//! What tests read of processes (through the `procfs` crate, as the proxy
//! and the benchmark do), and of the environment they run in.

use procfs::process::{ProcState, Process};
use procfs::WithCurrentSystemInfo;

/// Resident memory of process `pid`, in bytes (`None` when it is gone).
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let stat = Process::new(pid as i32).ok()?.stat().ok()?;
    Some(stat.rss_bytes().get())
}

/// Whether process `pid` exists and has not exited (a zombie has).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = Process::new(pid as i32).and_then(|p| p.stat()) else {
        return false;
    };
    !matches!(stat.state(), Ok(ProcState::Zombie | ProcState::Dead))
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    Process::myself()
        .and_then(|p| p.status())
        .is_ok_and(|s| s.euid == 0)
}

/// Whether this is a CI run (`CI` set and not `false`): tests that skip
/// for a missing tool or privilege must run there instead.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_and_a_reaped_child() {
        let me = std::process::id();
        assert!(alive(me));
        assert!(
            rss_bytes(me).unwrap() > 1 << 20,
            "a test binary uses > 1 MiB"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert!(!alive(pid), "a reaped child is gone");
        assert_eq!(rss_bytes(pid), None);
    }
}
