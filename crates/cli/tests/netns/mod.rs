//! Helpers for tests that need root and network namespaces (ztunnel's
//! `tests/namespaced.rs` style): they create their own namespaces with
//! names unique to the test run, send traffic only there and to loopback,
//! and delete everything on drop.
#![allow(dead_code)]

use std::process::{Child, Command, Output, Stdio};

/// Whether this test may run: root and `ip netns` work. Not root: skip with
/// a message, except under CI=true, where skipping would hide a failure.
pub fn can_run(test: &str) -> bool {
    let root = trellis_testkit::process::is_root();
    let ci = trellis_testkit::process::in_ci();
    let tools = ["ip", "nft"]
        .iter()
        .filter(|t| {
            Command::new(t)
                .arg("-V")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_err()
        })
        .map(|t| t.to_string())
        .collect::<Vec<_>>();
    let why = if !root {
        Some("needs root (network namespaces and nftables)".to_string())
    } else if !tools.is_empty() {
        Some(format!(
            "needs {} (install iproute2 and nftables; scripts/test does as root)",
            tools.join(", ")
        ))
    } else {
        None
    };
    match why {
        None => true,
        Some(w) if ci => panic!("{test}: {w}; under CI=true this test must run, not skip"),
        Some(w) => {
            eprintln!("skipping {test}: {w}");
            false
        }
    }
}

/// A name unique to this process and call, short enough for an interface
/// name (15 bytes).
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let r: u32 = rand_u32() & 0xfff;
    format!("{prefix}{:x}{r:03x}{n}", std::process::id() & 0xffff)
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

/// Runs a command and returns its output, panicking with stderr on failure.
pub fn sh(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{:?} failed: {}{}",
        args,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn run(args: &[&str]) -> Output {
    Command::new(args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {:?}: {e}", args))
}

/// A network namespace that is deleted (with its links) on drop.
pub struct Netns {
    pub name: String,
    children: Vec<Child>,
}

impl Netns {
    pub fn new(prefix: &str) -> Netns {
        let name = unique(prefix);
        sh(&["ip", "netns", "add", &name]);
        let ns = Netns {
            name,
            children: Vec::new(),
        };
        ns.exec(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `ip netns exec NAME ARGS...`, which must succeed.
    pub fn exec(&self, args: &[&str]) -> String {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend(args);
        sh(&v)
    }

    pub fn exec_output(&self, args: &[&str]) -> Output {
        let mut v = vec!["ip", "netns", "exec", &self.name];
        v.extend(args);
        run(&v)
    }

    /// Starts a long-running command inside; killed on drop.
    pub fn spawn(&mut self, args: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn in netns");
        self.children.push(child);
    }

    pub fn spawn_cmd(&mut self, mut cmd: Command) -> u32 {
        let child = cmd.spawn().expect("spawn");
        let id = child.id();
        self.children.push(child);
        id
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting the namespace removes its veth ends and rules.
        let _ = run(&["ip", "netns", "del", &self.name]);
    }
}

/// Two namespaces joined by a veth pair: `a` gets 10.X.Y.1/24, `b` .2.
pub struct Pair {
    pub a: Netns,
    pub b: Netns,
    pub a_ip: String,
    pub b_ip: String,
}

pub fn pair() -> Pair {
    let a = Netns::new("tra");
    let b = Netns::new("trb");
    let va = unique("va");
    let vb = unique("vb");
    // A /24 in 10.200-254.x.0 unlikely to be on the host: the namespaces
    // have no route to the host anyway, so nothing leaves them.
    let x = 200 + (rand_u32() % 50);
    let y = rand_u32() % 250;
    let a_ip = format!("10.{x}.{y}.1");
    let b_ip = format!("10.{x}.{y}.2");
    sh(&[
        "ip", "link", "add", &va, "type", "veth", "peer", "name", &vb,
    ]);
    sh(&["ip", "link", "set", &va, "netns", &a.name]);
    sh(&["ip", "link", "set", &vb, "netns", &b.name]);
    a.exec(&["ip", "addr", "add", &format!("{a_ip}/24"), "dev", &va]);
    b.exec(&["ip", "addr", "add", &format!("{b_ip}/24"), "dev", &vb]);
    a.exec(&["ip", "link", "set", &va, "up"]);
    b.exec(&["ip", "link", "set", &vb, "up"]);
    Pair { a, b, a_ip, b_ip }
}
