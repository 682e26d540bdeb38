//! Child processes of a local mesh: starting each in its own process group
//! with its output in a log file, telling whether a recorded pid is still
//! the same process, and stopping groups gently then firmly.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("{name}: creating its log {log}: {source}")]
    Log {
        name: String,
        log: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{name}: cannot start {program:?}: {source}{hint}")]
    Spawn {
        name: String,
        program: String,
        hint: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What to start.
#[derive(Clone, Debug)]
pub struct Spec {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
    /// Ask the kernel to SIGTERM the child when the process that started it
    /// dies, so a killed foreground `up` leaves nothing behind. Off for
    /// `--detach`, whose children must outlive the CLI.
    pub die_with_parent: bool,
}

/// A started child.
#[derive(Debug)]
pub struct Running {
    pub name: String,
    pub child: Child,
    pub pid: u32,
    pub start_time: u64,
    pub log: PathBuf,
}

/// Starts `spec` in a new session (and so a new process group, whose id is
/// its pid), with stdin closed and stdout and stderr appended to its log.
pub fn spawn(spec: &Spec) -> Result<Running, ProcessError> {
    let log_err = |source| ProcessError::Log {
        name: spec.name.clone(),
        log: spec.log.clone(),
        source,
    };
    if let Some(dir) = spec.log.parent() {
        std::fs::create_dir_all(dir).map_err(log_err)?;
    }
    let out = File::create(&spec.log).map_err(log_err)?;
    let err = out.try_clone().map_err(log_err)?;

    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let die_with_parent = spec.die_with_parent;
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe calls are allowed; setsid and prctl are, and
    // nothing here allocates or takes locks.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            // A new session: Ctrl-C in the terminal reaches only the CLI,
            // which then stops children in order, and `down` can signal the
            // whole group (an app's own children included).
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            if die_with_parent && libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        name: spec.name.clone(),
        program: spec.program.display().to_string(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            ": is it installed and on PATH?"
        } else {
            ""
        },
        source,
    })?;
    let pid = child.id();
    // The start time is set at fork, so it is there even before exec.
    let start_time = stat(pid).map(|s| s.start_time).unwrap_or(0);
    Ok(Running {
        name: spec.name.clone(),
        child,
        pid,
        start_time,
        log: spec.log.clone(),
    })
}

/// The fields of /proc/PID/stat that matter here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stat {
    pub state: char,
    pub pgrp: i32,
    pub start_time: u64,
}

pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Parses /proc/PID/stat. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted from the last `)`.
fn parse_stat(text: &str) -> Option<Stat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `fields[0]` is field 3 (state), so field N is `fields[N - 3]`.
    Some(Stat {
        state: fields.first()?.chars().next()?,
        pgrp: fields.get(5 - 3)?.parse().ok()?,
        start_time: fields.get(22 - 3)?.parse().ok()?,
    })
}

/// Whether `pid` is alive and still the process that started at
/// `start_time` (not a later one that reuses the pid). Zombies count as gone.
pub fn is_running(pid: u32, start_time: u64) -> bool {
    stat(pid).is_some_and(|s| s.start_time == start_time && !matches!(s.state, 'Z' | 'X'))
}

/// The last `n` lines of a log, for error messages; for a Rust panic, its
/// message rather than the end of the backtrace that follows it.
pub fn log_tail(log: &Path, n: usize) -> String {
    let text = std::fs::read(log).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let end = match lines.iter().rposition(|l| l.contains("panicked at")) {
        Some(panic) => (panic + 3).min(lines.len()),
        None => lines.len(),
    };
    lines[end.saturating_sub(n)..end].join("\n")
}

/// Sends `signal` to the process group of `pid` when `pid` leads one (as
/// the children of `spawn` do), else to `pid` alone.
fn signal(pid: u32, sig: libc::c_int) {
    let Ok(raw) = i32::try_from(pid) else { return };
    let target = match stat(pid) {
        Some(s) if s.pgrp == raw => -raw,
        _ => raw,
    };
    // SAFETY: kill(2) has no memory-safety preconditions.
    #[allow(unsafe_code)]
    unsafe {
        libc::kill(target, sig);
    }
}

/// How long a SIGKILLed process may take to be gone: the kernel tears
/// down its threads and memory after `kill` returns, and a process blocked
/// on disk I/O (etcd's fsync) dies only when that finishes.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// Stops each `(pid, start_time)` that still runs: SIGTERM to its group,
/// up to `grace` to exit, then SIGKILL, and waits until each is gone (up
/// to `KILL_WAIT` more), so that a caller that returns has stopped them.
/// Returns how many were running.
pub fn stop_all(procs: &[(u32, u64)], grace: Duration) -> usize {
    let running: Vec<(u32, u64)> = procs
        .iter()
        .copied()
        .filter(|&(pid, st)| is_running(pid, st))
        .collect();
    for &(pid, _) in &running {
        signal(pid, libc::SIGTERM);
    }
    let any_running = || running.iter().any(|&(p, s)| is_running(p, s));
    let wait_until = |deadline: Instant| {
        while Instant::now() < deadline && any_running() {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_until(Instant::now() + grace);
    for &(pid, st) in &running {
        if is_running(pid, st) {
            signal(pid, libc::SIGKILL);
        }
    }
    wait_until(Instant::now() + KILL_WAIT);
    running.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_stat_with_odd_names() {
        let line = "4242 (my (odd) app) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(Stat {
                state: 'S',
                pgrp: 4242,
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    /// `sh -c SCRIPT` with `env`, logging to DIR/logs/NAME.log.
    fn sh(dir: &Path, name: &str, script: &str, env: &[(&str, &str)]) -> Spec {
        Spec {
            name: name.into(),
            program: "sh".into(),
            args: vec!["-c".into(), script.into()],
            env: env.iter().map(|&(k, v)| (k.into(), v.into())).collect(),
            log: dir.join(format!("logs/{name}.log")),
            die_with_parent: true,
        }
    }

    /// Waits up to 5 s for the last line of `running`'s log to hold `text`.
    fn wait_for_log(running: &Running, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !log_tail(&running.log, 1).contains(text) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn spawns_in_own_group_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let spec = sh(
            dir.path(),
            "sleeper",
            "echo started $GREETING; exec sleep 30",
            &[("GREETING", "hi")],
        );
        let mut running = spawn(&spec).unwrap();
        assert!(is_running(running.pid, running.start_time));
        assert!(
            !is_running(running.pid, running.start_time + 1),
            "another start time is another process"
        );
        assert_eq!(stat(running.pid).unwrap().pgrp as u32, running.pid);
        wait_for_log(&running, "started hi");
        assert_eq!(log_tail(&running.log, 5), "started hi");

        assert_eq!(
            stop_all(&[(running.pid, running.start_time)], Duration::from_secs(5)),
            1
        );
        running.child.wait().unwrap();
        assert!(!is_running(running.pid, running.start_time));
        assert_eq!(
            stop_all(&[(running.pid, running.start_time)], Duration::from_secs(1)),
            0
        );
    }

    #[test]
    fn a_process_that_ignores_sigterm_is_killed_and_gone_on_return() {
        let dir = tempfile::tempdir().unwrap();
        // An ignored signal stays ignored across exec: sleep ignores TERM.
        let spec = sh(
            dir.path(),
            "stubborn",
            "trap '' TERM; echo ready; exec sleep 30",
            &[],
        );
        let mut running = spawn(&spec).unwrap();
        wait_for_log(&running, "ready");
        let started = Instant::now();
        assert_eq!(
            stop_all(
                &[(running.pid, running.start_time)],
                Duration::from_millis(300)
            ),
            1
        );
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "it waited out the grace for SIGTERM"
        );
        // Checked before reaping: a zombie is gone, a dying process is not.
        assert!(
            !is_running(running.pid, running.start_time),
            "still running when stop_all returned"
        );
        let status = running.child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    }

    #[test]
    fn log_tail_prefers_a_panic_message() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        std::fs::write(&log, "a\nb\nc\n").unwrap();
        assert_eq!(log_tail(&log, 2), "b\nc");
        std::fs::write(
            &log,
            "start\nthread 'main' panicked at src/x.rs:1:1:\nboom\nnote: x\nstack backtrace:\n  0: f\n",
        )
        .unwrap();
        assert_eq!(
            log_tail(&log, 3),
            "thread 'main' panicked at src/x.rs:1:1:\nboom\nnote: x"
        );
        assert_eq!(log_tail(&dir.path().join("missing.log"), 3), "");
    }

    #[test]
    fn missing_program_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            name: "web-0".into(),
            program: "no-such-program-trellis".into(),
            args: vec![],
            env: vec![],
            log: dir.path().join("web-0.log"),
            die_with_parent: true,
        };
        let err = spawn(&spec).unwrap_err().to_string();
        assert!(err.contains("web-0") && err.contains("on PATH"), "{err}");
    }
}
