//! The HA chaos suite: three "hosts" (network namespaces, each with its
//! own address on a bridge the test creates in a namespace of its own),
//! each running a member of one etcd cluster and a control plane replica
//! on it (`trellis control --store etcd`). A client sidecar on host 0
//! calls the Service `api`, served by sidecars on hosts 1 and 2; every
//! proxy knows all three replicas and starts with its own host's.
//!
//! Under steady load (`LOAD_RPS` for `TRELLIS_HA_SECONDS`, default 60 s,
//! per scenario) each failure must cost zero requests: `kill -9` of
//! replicas, a rolling restart of every replica, `kill -9` of an etcd
//! member, a rolling restart (drain) of the serving proxies, the loss of
//! etcd's majority (applies fail with a clear error, and converge once it
//! is back), and a host cut off from every control plane (it serves on,
//! and catches up once healed). The figures (failovers, propagation across
//! replicas, catch-up times) are printed; speed is not asserted.
//!
//! Needs root, `ip`, `nft`, `curl`, `python3` and etcd (`scripts/test-peers
//! etcd`); skips without them, except under CI=true.

mod netns;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netns::{sh, unique, Netns};
use serde_json::Value;
use trellis_testkit::eventually_blocking;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");
const HOSTS: usize = 3;
const LOAD_RPS: u32 = 50;
const WAIT: Duration = Duration::from_secs(30);
const HTTP: &str = "127.0.0.1:15080";
const ADMIN: &str = "127.0.0.1:15000";

/// Sends `rps` requests a second for `secs` seconds through the sidecar's
/// outbound listener (four workers, each on a kept-alive connection, on a
/// fixed schedule: a late request is sent at once, so the count is exact),
/// and prints one JSON line: sent, ok, failures (up to 20 described).
const LOAD: &str = r#"
import http.client, json, sys, threading, time
rps, secs, url = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
workers, lock, res = 4, threading.Lock(), {"sent": 0, "ok": 0, "failed": 0, "failures": []}
start = time.monotonic()
def fail(t, what):
    with lock:
        res["failed"] += 1
        if len(res["failures"]) < 20: res["failures"].append("%.2fs %s" % (t, what))
def worker(w):
    conn, n, total = None, 0, int(rps * secs / workers)
    while n < total:
        at = start + (n * workers + w) / rps
        d = at - time.monotonic()
        if d > 0: time.sleep(d)
        n += 1
        t = time.monotonic() - start
        try:
            if conn is None: conn = http.client.HTTPConnection("127.0.0.1", 15001, timeout=10)
            conn.request("GET", url, headers={"Host": "api:8080"})
            r = conn.getresponse(); body = r.read()
            with lock: res["sent"] += 1
            if r.status == 200:
                with lock: res["ok"] += 1
            else:
                fail(t, "status %d: %s" % (r.status, body[:200]))
            if r.getheader("connection", "").lower() == "close": conn.close(); conn = None
        except Exception as e:
            with lock: res["sent"] += 1
            fail(t, repr(e)); conn = None
ts = [threading.Thread(target=worker, args=(w,)) for w in range(workers)]
for t in ts: t.start()
for t in ts: t.join()
res["seconds"] = time.monotonic() - start
print(json.dumps(res))
"#;

fn seconds() -> u64 {
    std::env::var("TRELLIS_HA_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

/// A child process, killed on drop.
struct Proc {
    child: Option<Child>,
    /// How to start it again.
    argv: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
}

impl Proc {
    fn start(argv: Vec<String>, envs: Vec<(String, String)>, log: PathBuf) -> Proc {
        let mut p = Proc {
            child: None,
            argv,
            envs,
            log,
        };
        p.spawn();
        p
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(&self.argv[0])
            .args(&self.argv[1..])
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env(
                "RUST_LOG",
                std::env::var("TRELLIS_HA_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn");
        self.child = Some(child);
    }

    /// `kill -9` (`ip netns exec` execs the program: its pid is the child's).
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            sh(&["kill", "-TERM", &c.id().to_string()]);
            let started = Instant::now();
            eventually_blocking("a stopped process exits", WAIT, || {
                c.try_wait().ok().flatten().ok_or("running")
            });
            println!("    stopped in {:?}", started.elapsed());
        }
    }

    fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    fn tail(&self) -> String {
        let s = std::fs::read(&self.log).unwrap_or_default();
        String::from_utf8_lossy(&s[s.len().saturating_sub(3000)..]).into_owned()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = ["ip", "netns", "exec", ns]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend(args.iter().map(|s| s.to_string()));
    v
}

/// The hosts, the switch they hang on, and what runs on them.
/// Fields drop in order: the processes before their namespaces.
struct Mesh {
    /// The client's sidecar (host 0), then `api`'s (hosts 1, 2).
    proxies: Vec<Proc>,
    _apps: Vec<Proc>,
    controls: Vec<Proc>,
    etcd: Vec<Proc>,
    hosts: Vec<Netns>,
    _switch: Netns,
    ips: Vec<String>,
    dir: PathBuf,
}

impl Mesh {
    fn start(dir: &Path, etcd_bin: &Path) -> Mesh {
        let switch = Netns::new("trsw");
        switch.exec(&["ip", "link", "add", "br0", "type", "bridge"]);
        switch.exec(&["ip", "link", "set", "br0", "up"]);
        let x = 200 + std::process::id() % 50;
        let y = (std::process::id() / 50) % 250;
        let mut hosts = Vec::new();
        let mut ips = Vec::new();
        for i in 0..HOSTS {
            let h = Netns::new("trh");
            let (vs, vh) = (unique("vs"), unique("vh"));
            sh(&[
                "ip", "link", "add", &vs, "type", "veth", "peer", "name", &vh,
            ]);
            sh(&["ip", "link", "set", &vs, "netns", &switch.name]);
            sh(&["ip", "link", "set", &vh, "netns", &h.name]);
            switch.exec(&["ip", "link", "set", &vs, "master", "br0"]);
            switch.exec(&["ip", "link", "set", &vs, "up"]);
            let ip = format!("10.{x}.{y}.{}", i + 1);
            h.exec(&["ip", "addr", "add", &format!("{ip}/24"), "dev", &vh]);
            h.exec(&["ip", "link", "set", &vh, "up"]);
            hosts.push(h);
            ips.push(ip);
        }
        let cluster: Vec<String> = ips
            .iter()
            .enumerate()
            .map(|(i, ip)| format!("m{i}=http://{ip}:2380"))
            .collect();
        let etcd: Vec<Proc> = (0..HOSTS)
            .map(|i| {
                let ip = &ips[i];
                let client = format!("http://{ip}:2379");
                let peer = format!("http://{ip}:2380");
                let data = dir.join(format!("etcd{i}"));
                let argv = in_ns(
                    &hosts[i].name,
                    &[
                        etcd_bin.to_str().unwrap(),
                        "--name",
                        &format!("m{i}"),
                        "--data-dir",
                        data.to_str().unwrap(),
                        "--listen-client-urls",
                        &client,
                        "--advertise-client-urls",
                        &client,
                        "--listen-peer-urls",
                        &peer,
                        "--initial-advertise-peer-urls",
                        &peer,
                        "--initial-cluster",
                        &cluster.join(","),
                        "--initial-cluster-token",
                        "trellis-ha",
                        "--heartbeat-interval",
                        "50",
                        "--election-timeout",
                        "500",
                        "--log-level",
                        "warn",
                    ],
                );
                Proc::start(argv, vec![], dir.join(format!("etcd{i}.log")))
            })
            .collect();
        let mut mesh = Mesh {
            dir: dir.to_path_buf(),
            hosts,
            ips,
            etcd,
            controls: Vec::new(),
            proxies: Vec::new(),
            _apps: Vec::new(),
            _switch: switch,
        };
        for i in 0..HOSTS {
            mesh.wait_etcd(i);
        }
        let kek = dir.join("kek");
        trellis_identity::write_secret(&kek, &[7u8; 32]).unwrap();
        let endpoints: Vec<String> = mesh
            .ips
            .iter()
            .map(|ip| format!("http://{ip}:2379"))
            .collect();
        for i in 0..HOSTS {
            let argv = in_ns(
                &mesh.hosts[i].name,
                &[
                    TRELLIS,
                    "control",
                    "--data-dir",
                    dir.join(format!("c{i}")).to_str().unwrap(),
                    "--store",
                    "etcd",
                    "--etcd-endpoints",
                    &endpoints.join(","),
                    "--kek-file",
                    kek.to_str().unwrap(),
                    "--http-addr",
                    HTTP,
                    "--grpc-addr",
                    &format!("{}:15010", mesh.ips[i]),
                ],
            );
            mesh.controls
                .push(Proc::start(argv, vec![], dir.join(format!("c{i}.log"))));
        }
        for i in 0..HOSTS {
            mesh.wait_control(i);
        }
        mesh
    }

    fn curl(&self, host: usize, url: &str) -> Option<String> {
        let out = self.hosts[host].exec_output(&["curl", "-sf", "--max-time", "2", url]);
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn wait_etcd(&self, i: usize) {
        let url = format!("http://{}:2379/health", self.ips[i]);
        eventually_blocking(&format!("etcd member {i} healthy"), WAIT, || {
            self.curl(i, &url)
                .filter(|b| b.contains("true"))
                .ok_or_else(|| self.etcd[i].tail())
        });
    }

    fn wait_control(&self, i: usize) {
        eventually_blocking(&format!("control plane replica {i} ready"), WAIT, || {
            self.curl(i, &format!("http://{HTTP}/readyz"))
                .ok_or_else(|| self.controls[i].tail())
        });
    }

    /// `trellis ARGS` on host `i` against its replica, as its admin.
    fn cli(&self, i: usize, args: &[&str]) -> std::process::Output {
        let token = self.dir.join(format!("c{i}/admin-token"));
        let mut argv = vec![
            TRELLIS,
            "--server",
            "http://127.0.0.1:15080",
            "--token-file",
            token.to_str().unwrap(),
        ];
        argv.extend(args);
        self.hosts[i].exec_output(&argv)
    }

    /// Applies `yaml` through replica `i`; the CLI's error on failure.
    fn apply(&self, i: usize, yaml: &str) -> Result<(), String> {
        let file = self.dir.join(format!("apply-{}.yaml", unique("a")));
        std::fs::write(&file, yaml).unwrap();
        let out = self.cli(i, &["apply", "-f", file.to_str().unwrap()]);
        out.status.success().then_some(()).ok_or_else(|| {
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    }

    /// A sidecar on host `i` with its app (`trellis demo-app`).
    fn add_workload(&mut self, i: usize, workload: &str) {
        let out = self.cli(
            0,
            &[
                "token",
                "create",
                "--service-account",
                workload,
                "--labels",
                &format!("app={workload}"),
            ],
        );
        assert!(out.status.success(), "{out:?}");
        let token = self.dir.join(format!("{workload}-{i}.token"));
        trellis_identity::write_secret(
            &token,
            String::from_utf8_lossy(&out.stdout).trim().as_bytes(),
        )
        .unwrap();
        let ns = self.hosts[i].name.clone();
        let app = in_ns(&ns, &[TRELLIS, "demo-app", "--listen", "127.0.0.1:8080"]);
        let envs = vec![
            ("SERVICE".to_string(), workload.to_string()),
            ("INSTANCE".to_string(), format!("{workload}-{i}")),
        ];
        self._apps.push(Proc::start(
            app,
            envs,
            self.dir.join(format!("{workload}-{i}-app.log")),
        ));
        // Its own host's replica first, then the others.
        let planes: Vec<String> = (0..HOSTS)
            .map(|k| format!("{}:15010", self.ips[(i + k) % HOSTS]))
            .collect();
        let ip = &self.ips[i];
        let proxy = in_ns(
            &ns,
            &[
                TRELLIS,
                "proxy",
                "--control-plane",
                &planes.join(","),
                "--workload",
                workload,
                "--service-account",
                workload,
                "--labels",
                &format!("app={workload}"),
                "--instance",
                &format!("{workload}-{i}"),
                "--token-file",
                token.to_str().unwrap(),
                "--app-port",
                "8080",
                "--inbound-addr",
                &format!("{ip}:15006"),
                "--advertise-addr",
                ip,
                "--cache-dir",
                self.dir
                    .join(format!("cache-{workload}-{i}"))
                    .to_str()
                    .unwrap(),
                "--drain-grace",
                "5s",
            ],
        );
        self.proxies.push(Proc::start(
            proxy,
            vec![],
            self.dir.join(format!("{workload}-{i}-proxy.log")),
        ));
    }

    /// The config of the sidecar on host `i`.
    fn config(&self, i: usize) -> Option<Value> {
        self.curl(i, &format!("http://{ADMIN}/config"))
            .and_then(|s| serde_json::from_str(&s).ok())
    }

    /// `api` as the client's sidecar (host 0) sees it.
    fn api_view(&self) -> Option<Value> {
        let c = self.config(0)?;
        c["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "api")
            .cloned()
    }

    fn api_endpoints(&self) -> usize {
        self.api_view()
            .and_then(|s| s["endpoints"].as_array().map(Vec::len))
            .unwrap_or(0)
    }

    fn wait_api_endpoints(&self, n: usize) {
        // The client's sidecar subscribes to `api` on its first request.
        let _ = self.hosts[0].exec_output(&[
            "curl",
            "-s",
            "--max-time",
            "5",
            "-x",
            "http://127.0.0.1:15001",
            "http://api:8080/warm",
        ]);
        eventually_blocking(
            &format!("the client sees {n} endpoints of api"),
            WAIT,
            || {
                let got = self.api_endpoints();
                (got == n).then_some(()).ok_or(got)
            },
        );
    }

    /// The replica the sidecar on host `i` is connected to.
    fn connected_to(&self, i: usize) -> Option<String> {
        let c = self.config(i)?;
        (c["controlPlane"]["connected"] == true)
            .then(|| c["controlPlane"]["replica"].as_str().map(str::to_string))
            .flatten()
    }

    /// The load balancer the client's sidecar runs for `api`.
    fn api_balancer(&self) -> Option<String> {
        self.api_view()?["loadBalancer"]
            .as_str()
            .map(str::to_string)
    }

    /// Applies `api`'s TrafficPolicy with `balancer` through replica `via`.
    fn set_balancer(&self, via: usize, balancer: &str) -> Result<(), String> {
        self.apply(via, &policy(balancer))
    }

    /// Applies through `via` and measures until the client's sidecar
    /// (connected to another replica) runs it.
    fn propagate(&self, via: usize, balancer: &str) -> Duration {
        let started = Instant::now();
        self.set_balancer(via, balancer).expect("apply");
        eventually_blocking("the client's sidecar runs the new policy", WAIT, || {
            let got = self.api_balancer();
            (got.as_deref() == Some(balancer)).then_some(()).ok_or(got)
        });
        started.elapsed()
    }
}

fn policy(balancer: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: api\nspec:\n  targetRef:\n    kind: Service\n    name: api\n  loadBalancer:\n    type: {balancer}\n"
    )
}

const SERVICES: &str = "apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: api
spec:
  selector:
    app: api
  ports:
  - name: http
    port: 8080
    protocol: http
";

/// The load's outcome.
#[derive(Debug)]
struct Load {
    sent: u64,
    failed: u64,
    failures: Vec<String>,
    seconds: f64,
}

/// Runs `chaos` under load from host 0; the load's outcome.
fn under_load(mesh: &mut Mesh, name: &str, chaos: impl FnOnce(&mut Mesh, &dyn Fn(u64))) -> Load {
    let secs = seconds();
    println!("== {name}: {LOAD_RPS} rps for {secs} s");
    let rps = LOAD_RPS.to_string();
    let secs_s = secs.to_string();
    let load = Command::new("ip")
        .args(["netns", "exec", &mesh.hosts[0].name, "python3", "-c", LOAD])
        .args([rps.as_str(), secs_s.as_str(), "http://api:8080/chaos"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs the load");
    let started = Instant::now();
    // Waits until `at` seconds into the load: chaos follows a timetable.
    let at = move |s: u64| {
        let due = started + Duration::from_secs(s);
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
    };
    chaos(mesh, &at);
    let out = load.wait_with_output().expect("the load ends");
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{name}: the load's report: {e}: {out:?}"));
    let load = Load {
        sent: v["sent"].as_u64().unwrap(),
        failed: v["failed"].as_u64().unwrap(),
        failures: v["failures"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap_or_default().to_string())
            .collect(),
        seconds: v["seconds"].as_f64().unwrap(),
    };
    println!(
        "   {name}: {} requests in {:.1} s ({:.1} rps), {} failed {:?}",
        load.sent,
        load.seconds,
        load.sent as f64 / load.seconds,
        load.failed,
        load.failures
    );
    load
}

fn assert_no_failures(name: &str, load: &Load) {
    let want = u64::from(LOAD_RPS) * seconds();
    assert_eq!(load.sent, want, "{name}: every scheduled request was sent");
    assert_eq!(
        load.failed, 0,
        "{name}: failed requests: {:?}",
        load.failures
    );
}

/// Which replica (by host) an address `IP:15010` is.
fn host_of(mesh: &Mesh, addr: &str) -> Option<usize> {
    mesh.ips
        .iter()
        .position(|ip| addr.starts_with(&format!("{ip}:")))
}

#[test]
fn replicas_on_etcd_lose_no_request() {
    if !netns::can_run("replicas_on_etcd_lose_no_request") {
        return;
    }
    let Some(etcd) = trellis_testkit::etcd::binary("replicas_on_etcd_lose_no_request") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    println!("logs in {}", dir.path().display());
    let dir = match std::env::var_os("TRELLIS_HA_KEEP") {
        Some(_) => Err(dir.keep()),
        None => Ok(dir),
    };
    let path = match &dir {
        Ok(d) => d.path().to_path_buf(),
        Err(p) => p.clone(),
    };
    let mut mesh = Mesh::start(&path, &etcd);
    mesh.apply(0, SERVICES).expect("apply the Service");
    mesh.set_balancer(0, "round-robin")
        .expect("apply the policy");
    mesh.add_workload(0, "web");
    mesh.add_workload(1, "api");
    mesh.add_workload(2, "api");
    mesh.wait_api_endpoints(2);
    for i in 0..HOSTS {
        let c = mesh.connected_to(i);
        assert_eq!(
            c.as_deref().and_then(|a| host_of(&mesh, a)),
            Some(i),
            "{c:?}"
        );
    }
    let mut figures: Vec<String> = Vec::new();

    // Config applied through one replica reaches proxies of another.
    let mut took = Vec::new();
    for (k, lb) in ["least-request", "round-robin"]
        .iter()
        .cycle()
        .take(10)
        .enumerate()
    {
        took.push(mesh.propagate(1 + k % 2, lb));
    }
    took.sort();
    figures.push(format!(
        "propagation to a proxy on another replica (apply through the CLI until seen; 10 applies): min {:?}, median {:?}, max {:?}",
        took[0], took[5], took[9]
    ));

    // kill -9 of the replicas that the api sidecar on host 1, then the
    // client's sidecar, are connected to.
    let mut failovers = Vec::new();
    let load = under_load(&mut mesh, "kill -9 of replicas", |mesh, at| {
        let t = seconds();
        for (victim, watcher, when) in [(1, 1, t / 6), (0, 0, t / 2)] {
            at(when);
            mesh.controls[victim].kill9();
            let killed = Instant::now();
            eventually_blocking("the proxy fails over to another replica", WAIT, || {
                let c = mesh.connected_to(watcher);
                match c.as_deref().and_then(|a| host_of(mesh, a)) {
                    Some(h) if h != victim => Ok(()),
                    other => Err(other),
                }
            });
            failovers.push(killed.elapsed());
            at(when + t / 6);
            mesh.controls[victim].restart();
            mesh.wait_control(victim);
        }
    });
    figures.push(format!("kill -9 of a replica: {} requests, {} failed; the proxy connected to it was on another replica after {:?}", load.sent, load.failed, failovers));
    assert_no_failures("kill -9 of replicas", &load);
    mesh.wait_api_endpoints(2);

    // A rolling restart of every replica.
    let load = under_load(&mut mesh, "rolling restart of the replicas", |mesh, at| {
        let t = seconds();
        for i in 0..HOSTS {
            at(t * (i as u64 + 1) / 5);
            mesh.controls[i].stop();
            mesh.controls[i].spawn();
            mesh.wait_control(i);
        }
    });
    figures.push(format!(
        "rolling restart of the replicas: {} requests, {} failed",
        load.sent, load.failed
    ));
    assert_no_failures("rolling restart of the replicas", &load);
    mesh.wait_api_endpoints(2);

    // kill -9 of one etcd member; it comes back and rejoins.
    let load = under_load(&mut mesh, "kill -9 of an etcd member", |mesh, at| {
        let t = seconds();
        at(t / 6);
        mesh.etcd[1].kill9();
        // Applies go on with two members of three.
        mesh.set_balancer(2, "least-request")
            .expect("an apply with one member down");
        at(t / 2);
        mesh.etcd[1].spawn();
        mesh.wait_etcd(1);
    });
    figures.push(format!(
        "kill -9 of an etcd member: {} requests, {} failed",
        load.sent, load.failed
    ));
    assert_no_failures("kill -9 of an etcd member", &load);
    mesh.wait_api_endpoints(2);

    // A rolling restart (drain) of the sidecars that serve api.
    let load = under_load(
        &mut mesh,
        "rolling restart of the api sidecars",
        |mesh, at| {
            let t = seconds();
            for (k, p) in [1usize, 2].into_iter().enumerate() {
                at(t * (k as u64 + 1) / 4);
                mesh.proxies[p].stop();
                mesh.proxies[p].spawn();
                mesh.wait_api_endpoints(2);
            }
        },
    );
    figures.push(format!(
        "rolling restart (drain) of the api sidecars: {} requests, {} failed",
        load.sent, load.failed
    ));
    assert_no_failures("rolling restart of the api sidecars", &load);

    // etcd's majority lost: applies fail with a clear error, traffic flows;
    // when it is back, everything converges without a restart.
    let mut converged = Duration::ZERO;
    let load = under_load(&mut mesh, "etcd majority lost", |mesh, at| {
        let t = seconds();
        at(t / 6);
        mesh.etcd[1].kill9();
        mesh.etcd[2].kill9();
        let err = mesh
            .set_balancer(0, "round-robin")
            .expect_err("an apply without a majority");
        assert!(err.contains("majority"), "{err}");
        println!("   apply without a majority: {}", err.trim());
        at(t / 2);
        mesh.etcd[1].spawn();
        mesh.etcd[2].spawn();
        let back = Instant::now();
        eventually_blocking("applies work again", WAIT, || {
            mesh.set_balancer(0, "round-robin")
        });
        eventually_blocking("the client's sidecar converges", WAIT, || {
            let got = mesh.api_balancer();
            (got.as_deref() == Some("round-robin"))
                .then_some(())
                .ok_or(got)
        });
        converged = back.elapsed();
    });
    figures.push(format!("etcd majority lost: {} requests, {} failed; converged {:?} after the members were restarted", load.sent, load.failed, converged));
    assert_no_failures("etcd majority lost", &load);
    mesh.wait_api_endpoints(2);

    // Host 0 cut off from every control plane: it serves on, and catches
    // up once healed.
    let mut caught_up = Duration::ZERO;
    let load = under_load(&mut mesh, "host cut off", |mesh, at| {
        let t = seconds();
        at(t / 6);
        let table = "trellis_ha_cut";
        let cut = format!(
            "table ip {table} {{\n chain out {{ type filter hook output priority 0; policy accept; tcp dport 15010 drop; }}\n chain in {{ type filter hook input priority 0; policy accept; tcp sport 15010 drop; }}\n}}\n"
        );
        let file = mesh.dir.join("cut.nft");
        std::fs::write(&file, cut).unwrap();
        mesh.hosts[0].exec(&["nft", "-f", file.to_str().unwrap()]);
        mesh.set_balancer(1, "least-request")
            .expect("apply while host 0 is cut off");
        at(t / 2);
        assert_eq!(
            mesh.api_balancer().as_deref(),
            Some("round-robin"),
            "host 0 is cut off"
        );
        mesh.hosts[0].exec(&["nft", "delete", "table", "ip", table]);
        let healed = Instant::now();
        eventually_blocking("host 0 catches up", WAIT, || {
            let got = mesh.api_balancer();
            (got.as_deref() == Some("least-request"))
                .then_some(())
                .ok_or(got)
        });
        caught_up = healed.elapsed();
    });
    figures.push(format!("host cut off from every control plane: {} requests, {} failed; caught up {:?} after the cut was healed", load.sent, load.failed, caught_up));
    assert_no_failures("host cut off", &load);

    // The client's sidecar moved between replicas several times (kill -9,
    // rolling restart, the cut) and never got a Config older than the one
    // it ran: versions are consistent across replicas.
    let metrics = mesh
        .curl(0, &format!("http://{ADMIN}/metrics"))
        .expect("the client's sidecar's metrics");
    let counter = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {metrics}"))
    };
    let connects = counter("trellis_proxy_control_plane_connects_total");
    let rejections = counter("trellis_proxy_config_rejections_total");
    figures.push(format!(
        "the client's sidecar connected {connects} times to replicas; configs refused (older than the running one, or invalid): {rejections}"
    ));
    assert!(connects >= 3.0, "{connects} connects");
    assert_eq!(rejections, 0.0, "a replica sent an older config");

    println!("figures:");
    for f in figures {
        println!("  {f}");
    }
}
