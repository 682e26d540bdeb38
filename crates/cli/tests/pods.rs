//! `trellis up --mode pods` end to end (needs root; see `netns::can_run`):
//! unmodified clients in pods call services by name with no proxy
//! settings, through their sidecars, and `down` leaves nothing behind.

mod netns;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use trellis_testkit::eventually_blocking;
use trellis_testkit::process::alive;
use trellis_testkit::prometheus::Metrics;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// A server-speaks-first TCP service: greets, then answers one line.
const GREETER: &str = r#"
import os, socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(os.environ["PORT"]))); s.listen(64)
def serve(c):
    try:
        c.sendall(b"220 greeter ready\r\n")
        line = c.makefile("rb").readline().strip()
        c.sendall(b"250 got " + line + b"\r\n")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// Talks to a server-speaks-first service: prints its greeting and reply.
const SMTP_CLIENT: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = c.makefile("rb")
print(f.readline().decode().strip())
c.sendall(b"HELO pods\r\n")
print(f.readline().decode().strip())
"#;

/// One DNS query over UDP to any address (the pod's rules send port 53 to
/// the sidecar): prints "rcode ancount".
const DIG: &str = r#"
import socket, struct, sys
name, qtype = sys.argv[1], {"A": 1, "AAAA": 28}[sys.argv[2]]
q = struct.pack(">HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
q += struct.pack(">HH", qtype, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
s.sendto(q, ("10.0.0.53", 53))
r = s.recv(512)
_, flags, _, an, _, _ = struct.unpack(">HHHHHH", r[:12])
print(flags & 0xf, an)
"#;

const URLLIB: &str = r#"
import json, sys, urllib.request
r = urllib.request.urlopen(sys.argv[1], timeout=10)
print(r.status, json.load(r)["service"])
"#;

fn mesh_yaml() -> String {
    format!(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata: {{name: default}}
spec: {{mtls: strict}}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: catalog}}
spec:
  selector: {{app: catalog}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: greeter}}
spec:
  selector: {{app: greeter}}
  ports: [{{name: smtp, port: 2525, protocol: tcp}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: greeter-detected}}
spec:
  selector: {{app: greeter}}
  ports: [{{name: smtp, port: 2526}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: client}}
spec:
  selector: {{app: client}}
  ports: [{{name: http, port: 8080}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: catalog
  labels: {{app: catalog}}
spec:
  replicas: 2
  command: [trellis, demo-app]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: greeter
  labels: {{app: greeter}}
spec:
  port: 2525
  command: [python3, -c, {greeter:?}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: client
  labels: {{app: client}}
spec:
  command: [trellis, demo-app]
"#,
        greeter = GREETER
    )
}

fn small_mesh_yaml() -> &'static str {
    r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 8080}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: catalog
  labels: {app: catalog}
spec:
  command: [trellis, demo-app]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: client
  labels: {app: client}
spec:
  command: [trellis, demo-app]
"#
}

fn trellis(dir: &Path, args: &[&str]) -> Output {
    Command::new("timeout")
        .arg("120")
        .arg(TRELLIS)
        .args(args)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run trellis")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `trellis exec WORKLOAD -- CMD` (bounded), its stdout.
fn exec(dir: &Path, target: &str, cmd: &[&str]) -> (bool, String) {
    let mut args = vec!["exec", target, "--", "timeout", "30"];
    args.extend(cmd);
    let out = trellis(dir, &args);
    (
        out.status.success(),
        format!("{}{}", text(&out.stdout), text(&out.stderr)),
    )
}

/// A pods-mode mesh in its own temporary data dir, taken down on drop
/// even when an assertion fails.
struct Up {
    tmp: tempfile::TempDir,
}

impl Up {
    fn start(yaml: &str) -> Up {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("mesh.yaml"), yaml).unwrap();
        let out = trellis(
            tmp.path(),
            &["up", "-f", "mesh.yaml", "--mode", "pods", "--detach"],
        );
        let up = Up { tmp };
        assert!(
            out.status.success() && text(&out.stdout).starts_with("ready: "),
            "up failed:\n{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
        up
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn pods(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir().join(".trellis/pods.json")).unwrap())
            .unwrap()
    }

    fn run(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.dir().join(".trellis/run.json")).unwrap())
            .unwrap()
    }

    fn pod_ip(&self, instance: &str) -> String {
        self.pods()["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["instance"] == instance)
            .unwrap()["ip"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn down(&self) -> String {
        let out = trellis(self.dir(), &["down"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        let _ = trellis(self.dir(), &["down"]);
    }
}

/// Everything on the host that carries the run's id.
fn leftovers(id: &str) -> Vec<String> {
    let mut left = Vec::new();
    let ns = netns::sh(&["ip", "netns", "list"]);
    left.extend(ns.lines().filter(|l| l.contains(id)).map(str::to_string));
    let links = netns::sh(&["ip", "-br", "link"]);
    left.extend(links.lines().filter(|l| l.contains(id)).map(str::to_string));
    // The run's egress NAT table on the host.
    let tables = netns::sh(&["nft", "list", "tables"]);
    left.extend(
        tables
            .lines()
            .filter(|l| l.contains(id))
            .map(str::to_string),
    );
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        left.extend(
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(id)),
        );
    }
    left
}

/// The sum of `name` over the label sets with every `(label, value)`.
fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    Metrics::parse(text)
        .unwrap_or_else(|e| panic!("/metrics: {e:#}\n{text}"))
        .sum(name, labels)
}

fn metrics(ip: &str) -> String {
    let out = Command::new("curl")
        .args(["-s", "-m", "5", &format!("http://{ip}:15000/metrics")])
        .output()
        .unwrap();
    text(&out.stdout)
}

#[test]
fn apps_in_pods_call_services_by_name_through_their_sidecars() {
    if !netns::can_run("apps_in_pods_call_services_by_name_through_their_sidecars") {
        return;
    }
    let up = Up::start(&mesh_yaml());
    let d = up.dir();
    let id = up.pods()["id"].as_str().unwrap().to_string();

    // curl by the plain name, no proxy settings anywhere.
    for _ in 0..3 {
        let (ok, out) = exec(
            d,
            "client",
            &["curl", "-s", "-m", "10", "http://catalog:8080/items"],
        );
        assert!(ok && out.contains("\"service\": \"catalog\""), "{out}");
        assert!(
            out.contains("x-trellis-peer-identity"),
            "went through the mesh: {out}"
        );
    }
    // HTTP/2 with prior knowledge (what gRPC clients speak): the preface is
    // detected on the redirected connection.
    let (ok, out) = exec(
        d,
        "client",
        &[
            "curl",
            "-s",
            "-m",
            "10",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "http://catalog:8080/h2",
        ],
    );
    assert!(ok && out.trim() == "2 200", "{out}");
    // Python urllib with the full name.
    let (ok, out) = exec(
        d,
        "client",
        &[
            "python3",
            "-c",
            URLLIB,
            "http://catalog.default.svc.trellis.local:8080/x",
        ],
    );
    assert!(ok && out.trim() == "200 catalog", "{out}");

    // A server-speaks-first protocol: declared `tcp`, and detected (the
    // client stays silent until the greeting comes).
    for (svc, port) in [("greeter", "2525"), ("greeter-detected", "2526")] {
        let (ok, out) = exec(d, "client", &["python3", "-c", SMTP_CLIENT, svc, port]);
        assert!(ok, "{svc}: {out}");
        assert_eq!(out.trim(), "220 greeter ready\n250 got HELO pods", "{svc}");
    }

    // The sidecar's DNS: a VIP for mesh names, an empty answer for AAAA,
    // NXDOMAIN for a missing service, /etc/hosts for names outside the mesh.
    let dig = |name: &str, t: &str| exec(d, "client", &["python3", "-c", DIG, name, t]).1;
    assert_eq!(dig("catalog", "A").trim(), "0 1");
    assert_eq!(dig("catalog.default", "A").trim(), "0 1");
    assert_eq!(dig("catalog", "AAAA").trim(), "0 0");
    assert_eq!(dig("no-such-service", "A").trim(), "3 0");
    assert_eq!(dig("localhost", "A").trim(), "0 1");
    let (_, vip) = exec(d, "client", &["getent", "ahostsv4", "catalog"]);
    assert!(vip.starts_with("240.240."), "{vip}");
    // The same VIP the control plane shows.
    let vip = vip.split_whitespace().next().unwrap().to_string();
    let described = text(&trellis(d, &["describe", "svc", "catalog"]).stdout);
    assert!(described.contains(&format!("VIP: {vip}")), "{described}");
    let (ok, _) = exec(d, "client", &["getent", "hosts", "no-such-service"]);
    assert!(!ok, "a missing name does not resolve");

    // An address outside the mesh (a listener on the host, at the bridge's
    // gateway) passes through the sidecar as egress.
    let gw = up.pods()["gateway"].as_str().unwrap().to_string();
    let host = std::net::TcpListener::bind((gw.as_str(), 0)).unwrap();
    let host_port = host.local_addr().unwrap().port().to_string();
    let server = std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        let (mut c, _) = host.accept().unwrap();
        c.write_all(b"220 host\r\n").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(c.try_clone().unwrap())
            .read_line(&mut line)
            .unwrap();
        c.write_all(format!("250 got {}\r\n", line.trim()).as_bytes())
            .unwrap();
    });
    let (ok, out) = exec(
        d,
        "client",
        &["python3", "-c", SMTP_CLIENT, &gw, &host_port],
    );
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "220 host\n250 got HELO pods");
    server.join().unwrap();

    // The sidecars carried it: the client's outbound and catalog's inbound.
    let client = metrics(&up.pod_ip("client-0"));
    let egress = metric_sum(
        &client,
        "trellis_tcp_connections_opened_total",
        &[("destination_service", &gw)],
    );
    assert!(
        egress >= 1.0,
        "egress through the sidecar: {egress}\n{client}"
    );
    let out_http = metric_sum(
        &client,
        "trellis_requests_total",
        &[
            ("direction", "outbound"),
            ("destination_service", "catalog"),
        ],
    );
    assert!(
        out_http >= 4.0,
        "client outbound requests to catalog: {out_http}\n{client}"
    );
    let tcp: f64 = ["greeter", "greeter-detected"]
        .map(|svc| {
            metric_sum(
                &client,
                "trellis_tcp_connections_opened_total",
                &[("destination_service", svc)],
            )
        })
        .iter()
        .sum();
    assert!(tcp >= 2.0, "client TCP connections to the greeters: {tcp}");
    let inbound: f64 = ["catalog-0", "catalog-1"]
        .iter()
        .map(|i| {
            metric_sum(
                &metrics(&up.pod_ip(i)),
                "trellis_requests_total",
                &[("direction", "inbound"), ("tls", "true")],
            )
        })
        .sum();
    assert!(inbound >= 4.0, "catalog inbound mTLS requests: {inbound}");

    // Pods reach beyond the host through the run's masquerade table, with
    // forwarding on while it runs.
    let tables = netns::sh(&["nft", "list", "tables"]);
    assert!(tables.contains(&format!("trellis-egress-{id}")), "{tables}");
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
            .unwrap()
            .trim(),
        "1"
    );

    // After down: no namespace, link, bridge, resolv.conf or NAT table of
    // this run, and no process.
    let pids: Vec<u64> = up.run()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap())
        .collect();
    let said = up.down();
    assert!(said.contains("bridge trb"), "{said}");
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert!(!d.join(".trellis/pods.json").exists());
    for pid in pids {
        assert!(!alive(pid as u32), "process {pid} still runs after down");
    }
    assert!(up.down().contains("nothing to stop"));
}

#[test]
fn two_meshes_coexist_and_a_crashed_one_is_cleaned_up() {
    if !netns::can_run("two_meshes_coexist_and_a_crashed_one_is_cleaned_up") {
        return;
    }
    let a = Up::start(small_mesh_yaml());
    let b = Up::start(small_mesh_yaml());
    let (ida, idb) = (
        a.pods()["id"].as_str().unwrap().to_string(),
        b.pods()["id"].as_str().unwrap().to_string(),
    );
    assert_ne!(ida, idb);
    assert_ne!(a.pods()["subnet"], b.pods()["subnet"]);
    for m in [&a, &b] {
        let (ok, out) = exec(
            m.dir(),
            "client",
            &["curl", "-s", "-m", "10", "http://catalog:8080/"],
        );
        assert!(ok && out.contains("\"service\": \"catalog\""), "{out}");
    }

    // Mesh b "crashes": every process it started is killed at once.
    let pids: Vec<u32> = b.run()["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect();
    for pid in &pids {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
    eventually_blocking(
        "every process of mesh b is gone",
        Duration::from_secs(10),
        || {
            pids.iter()
                .find(|pid| alive(**pid))
                .map_or(Ok(()), |pid| Err(format!("{pid} still runs")))
        },
    );
    let said = b.down();
    assert!(said.contains(&format!("bridge trb{idb}")), "{said}");
    assert_eq!(leftovers(&idb), Vec::<String>::new());

    // Mesh a is untouched by b's removal.
    let (ok, out) = exec(
        a.dir(),
        "client",
        &["curl", "-s", "-m", "10", "http://catalog:8080/"],
    );
    assert!(ok && out.contains("\"service\": \"catalog\""), "{out}");
    a.down();
    assert_eq!(leftovers(&ida), Vec::<String>::new());
}

#[test]
fn bad_input_is_refused_and_leaves_nothing() {
    if !netns::can_run("bad_input_is_refused_and_leaves_nothing") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    std::fs::write(d.join("mesh.yaml"), small_mesh_yaml()).unwrap();

    // A subnet that overlaps a host route (loopback is always routed).
    let out = trellis(
        d,
        &[
            "up",
            "-f",
            "mesh.yaml",
            "--mode",
            "pods",
            "--subnet",
            "127.0.0.0/24",
        ],
    );
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(err.contains("overlaps the host route 127.0.0.0/8"), "{err}");
    assert!(!d.join(".trellis/pods.json").exists());

    // A pod whose app exits at once: `up` names it, shows its log, and
    // removes everything it had created.
    let exits = small_mesh_yaml().replace(
        "command: [trellis, demo-app]\n---",
        "command: [sh, -c, \"echo giving up; exit 3\"]\n---",
    );
    assert_ne!(exits, small_mesh_yaml());
    std::fs::write(d.join("mesh.yaml"), exits).unwrap();
    let out = trellis(d, &["up", "-f", "mesh.yaml", "--mode", "pods", "--detach"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    // As in process mode: the name, the exit status and the log's end.
    assert!(
        err.contains("catalog-0 exited during start-up (exit status: 3)")
            && err.contains("  | giving up"),
        "{err}"
    );
    let id = err
        .split("creating bridge trb")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .expect("the bridge's name in the output")
        .to_string();
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert!(!d.join(".trellis/pods.json").exists());
    assert!(!d.join(".trellis/run.json").exists());
}

/// A foreground `up` in pods mode, stopped (SIGTERM, then `down`) on drop.
struct Foreground {
    tmp: tempfile::TempDir,
    up: std::process::Child,
    stderr: std::path::PathBuf,
}

impl Foreground {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        // Not yet reaped, so the pid is still this child's.
        if let Ok(None) = self.up.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.up.id().to_string()])
                .status();
            let _ = self.up.wait();
        }
        let _ = trellis(self.tmp.path(), &["down"]);
    }
}

#[test]
fn a_foreground_up_reports_a_pod_process_that_exits() {
    if !netns::can_run("a_foreground_up_reports_a_pod_process_that_exits") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().to_path_buf();
    std::fs::write(d.join("mesh.yaml"), small_mesh_yaml()).unwrap();
    let stderr = d.join("up.stderr");
    let up = Command::new(TRELLIS)
        .args(["up", "-f", "mesh.yaml", "--mode", "pods"])
        .current_dir(&d)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(d.join("up.stdout")).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut fg = Foreground { tmp, up, stderr };
    eventually_blocking("up is ready", Duration::from_secs(120), || {
        let out = std::fs::read_to_string(d.join("up.stdout")).unwrap_or_default();
        assert!(
            fg.up.try_wait().unwrap().is_none(),
            "up exited:\n{out}{}",
            fg.stderr()
        );
        out.starts_with("ready: ").then_some(())
    });
    let run: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join(".trellis/run.json")).unwrap()).unwrap();
    let pods: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join(".trellis/pods.json")).unwrap()).unwrap();
    let id = pods["id"].as_str().unwrap().to_string();
    let app = run["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "catalog-0")
        .expect("catalog-0 in run.json");
    assert_eq!(app["role"], "app");
    let pid = app["pid"].as_u64().unwrap().to_string();
    netns::sh(&["kill", "-KILL", &pid]);

    // Reported once, with its exit status, and the mesh runs on.
    eventually_blocking("up reports the app", Duration::from_secs(30), || {
        fg.stderr()
            .contains("catalog-0 exited (signal: 9 (SIGKILL)): see ")
            .then_some(())
    });
    assert!(fg.up.try_wait().unwrap().is_none(), "{}", fg.stderr());

    // SIGTERM stops the foreground mesh and removes everything.
    netns::sh(&["kill", "-TERM", &fg.up.id().to_string()]);
    let status = fg.up.wait().unwrap();
    assert!(status.success(), "{status}: {}", fg.stderr());
    assert_eq!(fg.stderr().matches("catalog-0 exited").count(), 1);
    assert_eq!(leftovers(&id), Vec::<String>::new());
    assert!(!d.join(".trellis/run.json").exists());
    assert!(!d.join(".trellis/pods.json").exists());
}

/// Set in a pod to make this test binary a gRPC server or client there.
const HELPER: &str = "TRELLIS_POD_HELPER";

/// Inside a pod (`TRELLIS_POD_HELPER=grpc-server`): a gRPC health server on
/// 127.0.0.1:$PORT, until killed. Elsewhere: nothing.
#[test]
fn pod_helper_grpc_server() {
    if std::env::var(HELPER).as_deref() != Ok("grpc-server") {
        return;
    }
    let port: u16 = std::env::var("PORT").unwrap().parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let (reporter, service) = tonic_health::server::health_reporter();
        reporter
            .set_service_status("catalog", tonic_health::ServingStatus::Serving)
            .await;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
}

/// Inside a pod (`TRELLIS_POD_HELPER=grpc-client`, `GRPC_TARGET=host:port`):
/// a unary call and the first message of a server stream; prints what it
/// got.
#[test]
fn pod_helper_grpc_client() {
    if std::env::var(HELPER).as_deref() != Ok("grpc-client") {
        return;
    }
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let target = std::env::var("GRPC_TARGET").unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{target}"))
            .unwrap()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(10))
            .connect()
            .await
            .expect("connects");
        let mut client = HealthClient::new(channel);
        let unary = client
            .check(HealthCheckRequest {
                service: "catalog".into(),
            })
            .await
            .expect("unary call")
            .into_inner()
            .status;
        let mut stream = client
            .watch(HealthCheckRequest {
                service: "catalog".into(),
            })
            .await
            .expect("streaming call")
            .into_inner();
        let first = stream
            .message()
            .await
            .expect("a streamed message")
            .expect("not the end")
            .status;
        let missing = client
            .check(HealthCheckRequest {
                service: "nope".into(),
            })
            .await
            .expect_err("an unknown service is an error status")
            .code();
        println!("GRPC unary={unary} stream={first} missing={missing:?}");
    });
}

#[test]
fn grpc_through_pods() {
    if !netns::can_run("grpc_through_pods") {
        return;
    }
    let me = std::env::current_exe().unwrap().display().to_string();
    let yaml = format!(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: health}}
spec:
  selector: {{app: health}}
  ports: [{{port: 50051, protocol: grpc}}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: health
  labels: {{app: health}}
spec:
  port: 50051
  env: {{{HELPER}: grpc-server}}
  command: [{me:?}, pod_helper_grpc_server, --exact, --nocapture, --test-threads, "1"]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: client
  labels: {{app: client}}
spec:
  command: [trellis, demo-app]
"#
    );
    let up = Up::start(&yaml);
    let out = Command::new("timeout")
        .arg("60")
        .arg(TRELLIS)
        .args([
            "exec",
            "client",
            "--",
            &me,
            "pod_helper_grpc_client",
            "--exact",
            "--nocapture",
        ])
        .current_dir(up.dir())
        .env(HELPER, "grpc-client")
        .env("GRPC_TARGET", "health:50051")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let got = text(&out.stdout);
    assert!(
        got.contains("GRPC unary=1 stream=1 missing=NotFound"),
        "{got}{}",
        text(&out.stderr)
    );
    let client = metrics(&up.pod_ip("client-0"));
    let calls = metric_sum(
        &client,
        "trellis_requests_total",
        &[("direction", "outbound"), ("destination_service", "health")],
    );
    assert!(
        calls >= 2.0,
        "gRPC calls through the client's sidecar: {calls}"
    );
    up.down();
}
