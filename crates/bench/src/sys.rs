//! Processes, `/proc` figures, free ports and a tiny HTTP/1.1 client: what
//! the benchmark needs from the machine.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Progress on stderr, with the time since the start.
#[macro_export]
macro_rules! progress {
    ($($arg:tt)*) => {
        eprintln!("[scale {:>7.1}s] {}", $crate::sys::since_start().as_secs_f64(), format!($($arg)*))
    };
}

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

pub fn since_start() -> Duration {
    START.get_or_init(Instant::now).elapsed()
}

/// A free port on 127.0.0.1 (bound then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Raises the open-file limit to its hard limit (children inherit it).
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}

/// Seconds on `CLOCK_MONOTONIC`: the clock `perf record -k CLOCK_MONOTONIC`
/// stamps its samples with, so a change's window can be cut out of a
/// profile of the control plane (`perf report --time START,END`).
pub fn monotonic_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: the call only writes the value passed by pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// User + system CPU seconds of a process (0 when it is gone).
///
/// Read from the process's CPU-time clock (`clock_getcpuclockid`), which
/// counts in nanoseconds: `/proc/<pid>/stat` counts in clock ticks (10 ms),
/// too coarse for a change that costs a few ms. Falls back to the ticks.
pub fn cpu_seconds(pid: u32) -> f64 {
    let mut clock: libc::clockid_t = 0;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: both calls only write the values passed by pointer.
    let ok = unsafe {
        libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) == 0
            && libc::clock_gettime(clock, &mut ts) == 0
    };
    if ok {
        return ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    }
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.stat())
        .map(|s| (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64)
        .unwrap_or(0.0)
}

/// `VmRSS` and `VmHWM` of a process in kB (0 when it is gone).
pub fn memory_kb(pid: u32) -> (u64, u64) {
    procfs::process::Process::new(pid as i32)
        .and_then(|p| p.status())
        .map(|s| (s.vmrss.unwrap_or(0), s.vmhwm.unwrap_or(0)))
        .unwrap_or((0, 0))
}

/// The one-minute load average.
pub fn load_average() -> String {
    use procfs::Current;
    procfs::LoadAverage::current()
        .map(|l| format!("{:.2}", l.one))
        .unwrap_or_else(|_| "?".to_string())
}

/// A child process that is killed (and reaped) when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `program args...` with stdout and stderr in `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        env: &[(&str, String)],
        log: PathBuf,
    ) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start {}", program.display()))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log, for error messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(8)..].join("\n")
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}): {}", self.name, self.tail());
        }
        Ok(())
    }

    /// SIGTERM, then SIGKILL after a grace period; reaps it.
    pub fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An HTTP/1.1 answer.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
/// `target` is a path, or an absolute URL when `addr` is an HTTP proxy.
pub async fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: &str,
    body: Option<(&str, &str)>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    http_as(addr, method, target, host, None, body, timeout).await
}

/// `http` with `Authorization: Bearer <token>` when given (the control
/// plane's API needs a credential).
pub async fn http_as(
    addr: SocketAddr,
    method: &str,
    target: &str,
    host: &str,
    token: Option<&str>,
    body: Option<(&str, &str)>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    tokio::time::timeout(timeout, async {
        let mut s = TcpStream::connect(addr).await?;
        let _ = s.set_nodelay(true);
        let (ctype, body) = body.unwrap_or(("application/json", ""));
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{auth}\
             Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        s.write_all(body.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        parse_answer(&raw)
    })
    .await
    .map_err(|_| anyhow!("{method} {target} on {addr}: no answer within {timeout:?}"))?
}

fn parse_answer(raw: &[u8]) -> anyhow::Result<Answer> {
    let text = String::from_utf8_lossy(raw);
    let (head, rest) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("incomplete HTTP answer ({} bytes)", raw.len()))?;
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line: {}", head.lines().next().unwrap_or("")))?;
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(rest)
    } else {
        rest.to_string()
    };
    Ok(Answer { status, body })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

/// Polls `GET path` on `addr` until it answers 200, within `timeout`.
pub async fn wait_http_ok(
    addr: SocketAddr,
    path: &str,
    timeout: Duration,
    proc: &mut Proc,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        proc.check_alive()?;
        if let Ok(a) = http(addr, "GET", path, "localhost", None, Duration::from_secs(2)).await {
            if a.status == 200 {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not answer 200 on {path} within {timeout:?}: {}",
                proc.name,
                proc.tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_time_is_counted_finer_than_clock_ticks() {
        let me = std::process::id();
        let before = cpu_seconds(me);
        // About 3 ms of work: less than one clock tick.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed() < std::time::Duration::from_millis(3) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let used = cpu_seconds(me) - before;
        assert!(used > 0.0005 && used < 1.0, "{used} s for 3 ms of work");
        // Another process's clock, in finer steps than the ticks of
        // /proc/<pid>/stat (a multiple of 10 ms there).
        let mut child = Command::new("sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done; sleep 30",
            ])
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut used = 0.0;
        while used < 0.05 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            used = cpu_seconds(child.id());
        }
        child.kill().ok();
        child.wait().ok();
        assert!(used >= 0.05, "the busy child used {used} s");
        let ticks = used * 100.0;
        assert!(
            (ticks - ticks.round()).abs() > 1e-9,
            "{used} s is a whole number of clock ticks"
        );
    }

    #[test]
    fn reads_this_process_and_nothing_of_a_gone_one() {
        let me = std::process::id();
        let (rss, hwm) = memory_kb(me);
        assert!(rss > 1024 && hwm >= rss, "{rss} kB resident, {hwm} kB peak");
        assert!(cpu_seconds(me) >= 0.0);
        let mut child = Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        assert_eq!(memory_kb(gone), (0, 0));
        assert_eq!(cpu_seconds(gone), 0.0);
        assert!(load_average().parse::<f32>().is_ok());
    }
}
