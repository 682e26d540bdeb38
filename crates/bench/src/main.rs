//! `trellis-scale`: the control-plane scale benchmark of issue 7.
//!
//! Against a real `trellis control` process on loopback it measures
//!
//! 1. **propagation**: E simulated endpoint proxies over M Services, then N
//!    simulated client proxies that follow a few Services each; the time
//!    from an apply to the last client acking the Config that carries it,
//!    for a change every proxy sees (the Mesh) and for a change only one
//!    Service's subscribers see (an HTTPRoute);
//! 2. **one proxy's RSS as the mesh grows**: a real `trellis proxy` whose
//!    app calls 3 services, while the mesh has M = 10, 100, 1,000 Services.
//!
//! It writes Markdown and JSON (see `bench/scale` and docs/performance.md).

mod fake;
mod report;
mod sys;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use serde::Serialize;
use serde_json::{json, Value};
use trellis_api::v1::Register;

use fake::{Fleet, Role};
use sys::{
    cpu_seconds, free_port, http, http_as, memory_kb, monotonic_seconds, wait_http_ok, Proc,
};

#[derive(Parser, Debug, Clone, Serialize)]
#[command(
    name = "trellis-scale",
    about = "Trellis control-plane scale benchmark (issue 7)"
)]
pub struct Args {
    /// The `trellis` binary to benchmark (default: next to this program).
    #[arg(long)]
    pub trellis: Option<PathBuf>,
    /// Small sizes for a CI smoke step (figures printed, nothing asserted).
    #[arg(long)]
    pub smoke: bool,
    /// Where to write `<UTC date>-scale[-smoke].md` and `.json`.
    #[arg(long, default_value = "bench/results")]
    pub out: PathBuf,
    /// Client proxy counts N, measured in turn (default 100,500,1000,2000; smoke 50).
    #[arg(long, value_delimiter = ',')]
    pub proxies: Vec<usize>,
    /// Services M in the propagation part (default 1000; smoke 100).
    #[arg(long)]
    pub services: Option<usize>,
    /// Endpoint registrations E, spread evenly over the Services (default 10000; smoke 500).
    #[arg(long)]
    pub endpoints: Option<usize>,
    /// Services each client proxy follows.
    #[arg(long, default_value_t = 3)]
    pub subscriptions: usize,
    /// Measurements of each kind of change at each N.
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Kinds of change measured: `mesh` (every proxy sees it), `route` (one
    /// Service's subscribers). Only `route` makes a profile of a route change
    /// alone.
    #[arg(long, value_delimiter = ',', default_values_t = [Change::Mesh, Change::Route])]
    pub changes: Vec<Change>,
    /// Mesh sizes M for the proxy-RSS part (default 10,100,1000; smoke 10,100).
    #[arg(long, value_delimiter = ',')]
    pub rss_services: Vec<usize>,
    /// Endpoints of each Service in the proxy-RSS part (default 10; smoke 5).
    #[arg(long)]
    pub rss_endpoints_per_service: Option<usize>,
    /// Requests the real proxy sends to its 3 services at each M (default 300; smoke 90).
    #[arg(long)]
    pub requests: Option<usize>,
    /// Fresh proxies measured at each M.
    #[arg(long, default_value_t = 3)]
    pub rss_repeats: usize,
    /// Simulated proxy streams per HTTP/2 connection.
    #[arg(long, default_value_t = 200)]
    pub streams_per_conn: usize,
    /// Registrations in flight at once.
    #[arg(long, default_value_t = 256)]
    pub in_flight: usize,
    /// Deadline for one propagation measurement, seconds.
    #[arg(long, default_value_t = 120)]
    pub deadline: u64,
    /// Deadline for registering a batch of simulated proxies, seconds.
    #[arg(long, default_value_t = 900)]
    pub setup_deadline: u64,
    /// Skip the propagation part.
    #[arg(long)]
    pub skip_propagation: bool,
    /// Skip the proxy-RSS part.
    #[arg(long)]
    pub skip_rss: bool,
    /// File name stem (default `<UTC date>-scale[-smoke]`).
    #[arg(long)]
    pub name: Option<String>,
}

/// A kind of change `measure` makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Mesh,
    Route,
}

impl Change {
    fn name(self) -> &'static str {
        match self {
            Change::Mesh => "mesh",
            Change::Route => "route",
        }
    }
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The sizes in force, after defaults.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub mode: &'static str,
    pub proxies: Vec<usize>,
    pub services: usize,
    pub endpoints: usize,
    pub subscriptions: usize,
    pub repeats: usize,
    pub rss_services: Vec<usize>,
    pub rss_endpoints_per_service: usize,
    pub requests: usize,
    pub rss_repeats: usize,
    pub streams_per_conn: usize,
}

impl Plan {
    fn from(a: &Args) -> Plan {
        let s = a.smoke;
        let or = |v: &Vec<usize>, full: &[usize], smoke: &[usize]| {
            if !v.is_empty() {
                v.clone()
            } else if s {
                smoke.to_vec()
            } else {
                full.to_vec()
            }
        };
        Plan {
            mode: if s { "smoke" } else { "full" },
            proxies: or(&a.proxies, &[100, 500, 1000, 2000], &[50]),
            services: a.services.unwrap_or(if s { 100 } else { 1000 }),
            endpoints: a.endpoints.unwrap_or(if s { 500 } else { 10_000 }),
            subscriptions: a.subscriptions,
            repeats: a.repeats.unwrap_or(if s { 2 } else { 3 }),
            rss_services: or(&a.rss_services, &[10, 100, 1000], &[10, 100]),
            rss_endpoints_per_service: a.rss_endpoints_per_service.unwrap_or(if s {
                5
            } else {
                10
            }),
            requests: a.requests.unwrap_or(if s { 90 } else { 300 }),
            rss_repeats: a.rss_repeats.max(1),
            streams_per_conn: a.streams_per_conn,
        }
    }
}

/// Registering a batch of simulated proxies.
#[derive(Debug, Clone, Serialize)]
pub struct SetupStep {
    pub what: String,
    pub added: usize,
    pub streams_total: usize,
    pub connections: usize,
    pub seconds: f64,
    /// Until the control plane was idle again (it still processes acks).
    pub settle_seconds: f64,
    pub cp_cpu_seconds: f64,
    pub cp_rss_kb: u64,
    pub cp_hwm_kb: u64,
}

/// One apply and who acked it when.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Propagation {
    pub n: usize,
    /// `mesh` (every proxy sees it) or `route` (one Service's subscribers).
    pub change: &'static str,
    pub run: usize,
    pub expected_clients: usize,
    pub acked_clients: usize,
    pub expected_endpoints: usize,
    pub acked_endpoints: usize,
    /// The apply's HTTP round trip.
    pub apply_ms: f64,
    /// From the start of the apply to the first/median/99th/last client ack.
    pub first_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub last_ms: Option<f64>,
    /// To the last ack of every stream that had to get it (clients and endpoints).
    pub all_last_ms: Option<f64>,
    pub client_config_bytes: Option<usize>,
    pub endpoint_config_bytes: Option<usize>,
    /// From the apply until the control plane's CPU went idle again.
    pub cp_busy_s: f64,
    /// The control plane's CPU from the apply until it was idle again.
    pub cp_cpu_s: f64,
    /// Its CPU per second while idle, just before the apply (timers and
    /// keepalives of 12,000 streams): what it would have used anyway.
    pub cp_idle_cpu_per_s: f64,
    /// `cp_cpu_s` less the idle rate over the same time: the change's own.
    pub cp_change_cpu_s: f64,
    pub timed_out: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RssPoint {
    pub services: usize,
    pub endpoints: usize,
    pub run: usize,
    pub requests: usize,
    pub ok: usize,
    pub rss_kb: u64,
    pub hwm_kb: u64,
    /// Bytes of the proxy's `/config` (admin) after the requests.
    pub admin_config_bytes: usize,
    /// Services in it.
    pub config_services: usize,
    pub cp_rss_kb: u64,
}

#[derive(Debug, Default, Serialize)]
pub struct Results {
    pub env: BTreeMap<String, Value>,
    pub setup: Vec<SetupStep>,
    pub propagation: Vec<Propagation>,
    pub cp_after_run: Option<SetupStep>,
    pub rss_setup: Vec<SetupStep>,
    pub rss: Vec<RssPoint>,
    pub notes: Vec<String>,
}

/// A running `trellis control` with its HTTP and gRPC addresses, and its
/// admin token (for the API).
struct ControlPlane {
    proc: Proc,
    http: SocketAddr,
    grpc: SocketAddr,
    admin: String,
}

impl ControlPlane {
    async fn start(trellis: &Path, dir: &Path, name: &str) -> anyhow::Result<ControlPlane> {
        let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let data = dir.join(format!("{name}-data"));
        let mut proc = Proc::spawn(
            name,
            trellis,
            &[
                "control".into(),
                "--data-dir".into(),
                data.display().to_string(),
                "--http-addr".into(),
                http.to_string(),
                "--grpc-addr".into(),
                grpc.to_string(),
            ],
            &[],
            dir.join(format!("{name}.log")),
        )?;
        wait_http_ok(http, "/readyz", Duration::from_secs(30), &mut proc).await?;
        let admin = std::fs::read_to_string(data.join("admin-token"))
            .context("the control plane's admin token")?
            .trim()
            .to_string();
        progress!("{name} (pid {}) on http {http}, grpc {grpc}", proc.pid());
        Ok(ControlPlane {
            proc,
            http,
            grpc,
            admin,
        })
    }

    fn pid(&self) -> u32 {
        self.proc.pid()
    }

    async fn apply(&self, resources: &Value) -> anyhow::Result<()> {
        let body = resources.to_string();
        let a = http_as(
            self.http,
            "POST",
            "/api/v1/apply",
            "localhost",
            Some(&self.admin),
            Some(("application/json", &body)),
            Duration::from_secs(60),
        )
        .await?;
        if !(200..300).contains(&a.status) {
            bail!("apply refused ({}): {}", a.status, a.body);
        }
        Ok(())
    }

    /// A join token for `sa` that grants the label `app=<app>` (proxies
    /// may claim only the labels their token grants).
    async fn token(&self, sa: &str, app: &str) -> anyhow::Result<String> {
        let body = json!({"namespace": "default", "serviceAccount": sa, "ttl": "24h", "labels": {"app": app}})
            .to_string();
        let a = http_as(
            self.http,
            "POST",
            "/api/v1/tokens",
            "localhost",
            Some(&self.admin),
            Some(("application/json", &body)),
            Duration::from_secs(10),
        )
        .await?;
        let v: Value = serde_json::from_str(&a.body).context("token answer")?;
        match v["token"].as_str() {
            Some(t) if a.status == 200 => Ok(t.to_string()),
            _ => bail!("token refused ({}): {}", a.status, a.body),
        }
    }

    fn step(
        &self,
        what: String,
        added: usize,
        fleet: &Fleet,
        t: f64,
        settle: f64,
        cpu: f64,
    ) -> SetupStep {
        let (rss, hwm) = memory_kb(self.pid());
        SetupStep {
            what,
            added,
            streams_total: fleet.started(),
            connections: fleet.connections(),
            seconds: t,
            settle_seconds: settle,
            cp_cpu_seconds: cpu,
            cp_rss_kb: rss,
            cp_hwm_kb: hwm,
        }
    }
}

fn service(name: &str, app: &str) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": {"app": app}, "ports": [{"name": "http", "port": 8080, "protocol": "http"}]},
    })
}

fn endpoint_register(i: usize, service: &str, token: &str) -> Register {
    Register {
        instance: format!("ep-{i}"),
        workload: service.to_string(),
        namespace: "default".into(),
        labels: [("app".to_string(), service.to_string())].into(),
        service_account: "bench-ep".into(),
        // Never dialled: no app calls these services through a real proxy.
        inbound_addr: format!("127.0.0.1:{}", 20_000 + i % 40_000),
        admin_addr: String::new(),
        app_port: 8080,
        subscriptions: Vec::new(),
        running_version: 0,
        token: token.to_string(),
    }
}

/// Waits until the process has used less than 5% of a core for 0.5 s;
/// returns the seconds from `since` to the start of that idle stretch.
async fn settle(pid: u32, since: Instant, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    let step = Duration::from_millis(250);
    let mut idle_since: Option<Instant> = None;
    let mut quiet = 0;
    loop {
        let start = Instant::now();
        let c0 = cpu_seconds(pid);
        tokio::time::sleep(step).await;
        let used = cpu_seconds(pid) - c0;
        if used < 0.05 * step.as_secs_f64() {
            idle_since.get_or_insert(start);
            quiet += 1;
            if quiet >= 2 {
                break;
            }
        } else {
            idle_since = None;
            quiet = 0;
        }
        if Instant::now() >= deadline {
            progress!("  control plane still busy after {timeout:?}; going on");
            idle_since = Some(Instant::now());
            break;
        }
    }
    idle_since
        .unwrap_or_else(Instant::now)
        .saturating_duration_since(since)
        .as_secs_f64()
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    Some(sorted[i.min(sorted.len() - 1)])
}

/// The services client `i` follows.
fn client_subscriptions(i: usize, subs: usize, m: usize) -> Vec<usize> {
    (0..subs).map(|j| (i * subs + j) % m).collect()
}

struct Part1 {
    cp: ControlPlane,
    fleet: Fleet,
    client_token: String,
    clients: usize,
    services: usize,
    endpoints: usize,
    mark: u64,
}

impl Part1 {
    async fn add_clients(
        &mut self,
        to: usize,
        plan: &Plan,
        args: &Args,
    ) -> anyhow::Result<SetupStep> {
        let from = self.clients;
        let t0 = Instant::now();
        let c0 = cpu_seconds(self.cp.pid());
        for i in from..to {
            let subs = client_subscriptions(i, plan.subscriptions, self.services)
                .into_iter()
                .map(|k| format!("default/svc-{k}"))
                .collect();
            let reg = Register {
                instance: format!("client-{i}"),
                workload: "bench-client".into(),
                namespace: "default".into(),
                labels: [("app".to_string(), "bench-client".to_string())].into(),
                service_account: "bench-client".into(),
                inbound_addr: format!("127.0.0.1:{}", 60_000 + i % 5_000),
                admin_addr: String::new(),
                app_port: 8080,
                subscriptions: subs,
                running_version: 0,
                token: self.client_token.clone(),
            };
            self.fleet.start(reg, Role::Client).await?;
        }
        self.fleet
            .wait_ready(
                self.endpoints + to,
                Duration::from_secs(args.setup_deadline),
            )
            .await?;
        let t = t0.elapsed().as_secs_f64();
        let settle_s = settle(self.cp.pid(), t0, Duration::from_secs(args.setup_deadline)).await;
        self.clients = to;
        let cpu = cpu_seconds(self.cp.pid()) - c0;
        progress!(
            "  {} client proxies registered in {t:.2}s (control plane idle after {settle_s:.2}s)",
            to - from
        );
        Ok(self.cp.step(
            format!("clients to N={to}"),
            to - from,
            &self.fleet,
            t,
            settle_s,
            cpu,
        ))
    }

    /// Subscribers of `svc-k` among the clients.
    fn subscribers(&self, k: usize, subs: usize) -> usize {
        (0..self.clients)
            .filter(|&i| client_subscriptions(i, subs, self.services).contains(&k))
            .count()
    }

    async fn measure(
        &mut self,
        change: &'static str,
        run: usize,
        plan: &Plan,
        args: &Args,
    ) -> anyhow::Result<Propagation> {
        self.mark += 1;
        let mark = self.mark;
        let (resources, needle, expected_clients, expected_endpoints) = if change == "mesh" {
            let ttl = format!("{}m", 20_000 + mark);
            (
                json!([{
                    "apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
                    "metadata": {"name": "default"},
                    "spec": {"certificateTTL": ttl},
                }]),
                format!("\"{ttl}\""),
                self.clients,
                self.endpoints,
            )
        } else {
            // A Service that has subscribers, a different one each time.
            let span = self.services.min(self.clients * plan.subscriptions).max(1);
            let k = (mark as usize * 7919 + 13) % span;
            let tag = format!("mark-{mark}");
            (
                json!([{
                    "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
                    "metadata": {"name": format!("bench-{mark}"),
                                 "annotations": {"bench.trellis.dev/mark": tag}},
                    "spec": {
                        "parentRefs": [{"kind": "Service", "name": format!("svc-{k}")}],
                        "rules": [{
                            "matches": [{"path": {"type": "PathPrefix", "value": format!("/m{mark}")}}],
                            "backendRefs": [{"name": format!("svc-{k}"), "port": 8080}],
                        }],
                    },
                }]),
                format!("\"{tag}\""),
                self.subscribers(k, plan.subscriptions),
                0,
            )
        };
        let shared = self.fleet.shared.clone();
        shared.set_needle(mark, needle);
        // What the control plane uses while idle, to tell the change's own
        // CPU from the rest of the window.
        let (i0, idle_t0) = (cpu_seconds(self.cp.pid()), Instant::now());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let idle_rate = (cpu_seconds(self.cp.pid()) - i0) / idle_t0.elapsed().as_secs_f64();
        let c0 = cpu_seconds(self.cp.pid());
        let t0 = Instant::now();
        let mono0 = monotonic_seconds();
        self.cp.apply(&resources).await?;
        let apply = t0.elapsed();
        let deadline = t0 + Duration::from_secs(args.deadline);
        let mut timed_out = false;
        loop {
            let (eps, clients) = shared.count(mark);
            if clients >= expected_clients && eps >= expected_endpoints {
                break;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                progress!(
                    "  timed out: {clients}/{expected_clients} clients, {eps}/{expected_endpoints} endpoints acked"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let busy = settle(self.cp.pid(), t0, Duration::from_secs(args.deadline)).await;
        let cpu = cpu_seconds(self.cp.pid()) - c0;
        let window = t0.elapsed().as_secs_f64();
        let mono1 = monotonic_seconds();
        shared.clear_needle();
        let hits = shared.take_hits(mark);
        let mut client_ms: Vec<f64> = hits
            .iter()
            .filter(|h| h.role == Role::Client)
            .map(|h| ms(h.at - t0))
            .collect();
        client_ms.sort_by(f64::total_cmp);
        let all_last = hits
            .iter()
            .map(|h| ms(h.at - t0))
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        let bytes = |r: Role| hits.iter().filter(|h| h.role == r).map(|h| h.bytes).max();
        let p = Propagation {
            n: self.clients,
            change,
            run,
            expected_clients,
            acked_clients: client_ms.len(),
            expected_endpoints,
            acked_endpoints: hits.iter().filter(|h| h.role == Role::Endpoint).count(),
            apply_ms: ms(apply),
            first_ms: client_ms.first().copied(),
            p50_ms: percentile(&client_ms, 50.0),
            p99_ms: percentile(&client_ms, 99.0),
            last_ms: client_ms.last().copied(),
            all_last_ms: all_last,
            client_config_bytes: bytes(Role::Client),
            endpoint_config_bytes: bytes(Role::Endpoint),
            cp_busy_s: busy,
            cp_cpu_s: cpu,
            cp_idle_cpu_per_s: idle_rate,
            cp_change_cpu_s: (cpu - idle_rate * window).max(0.0),
            timed_out,
        };
        let f = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.1}"));
        progress!(
            "  N={} {change} #{run}: {}/{} clients acked, p50 {} ms, last {} ms (all streams {} ms), cp busy {:.2}s, cpu {:.1} ms ({:.1} ms of it the change's, {:.1} ms/s idle; perf window {mono0:.6},{mono1:.6})",
            self.clients,
            p.acked_clients,
            expected_clients,
            f(p.p50_ms),
            f(p.last_ms),
            f(p.all_last_ms),
            busy,
            cpu * 1000.0,
            p.cp_change_cpu_s * 1000.0,
            idle_rate * 1000.0,
        );
        Ok(p)
    }
}

async fn propagation(
    args: &Args,
    plan: &Plan,
    trellis: &Path,
    dir: &Path,
    res: &mut Results,
) -> anyhow::Result<()> {
    progress!(
        "part 1: propagation, M={} services, E={} endpoints, N={:?} clients",
        plan.services,
        plan.endpoints,
        plan.proxies
    );
    let cp = ControlPlane::start(trellis, dir, "control-propagation").await?;
    // One join token per service: each grants its endpoints that app label.
    let mut ep_tokens = Vec::with_capacity(plan.services);
    for k in 0..plan.services {
        ep_tokens.push(cp.token("bench-ep", &format!("svc-{k}")).await?);
    }
    let client_token = cp.token("bench-client", "bench-client").await?;
    let services: Vec<Value> = (0..plan.services)
        .map(|k| service(&format!("svc-{k}"), &format!("svc-{k}")))
        .collect();
    cp.apply(&Value::Array(services)).await?;
    progress!("applied {} Services", plan.services);
    let mut fleet = Fleet::new(cp.grpc.to_string(), plan.streams_per_conn, args.in_flight);
    let t0 = Instant::now();
    let c0 = cpu_seconds(cp.pid());
    let per = plan.endpoints.div_ceil(plan.services.max(1)).max(1);
    let mut last_report = Instant::now();
    for i in 0..plan.endpoints {
        let k = (i / per) % plan.services.max(1);
        fleet
            .start(
                endpoint_register(i, &format!("svc-{k}"), &ep_tokens[k]),
                Role::Endpoint,
            )
            .await?;
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            progress!(
                "  endpoints: {} started, {} registered",
                i + 1,
                fleet
                    .shared
                    .ready
                    .load(std::sync::atomic::Ordering::Relaxed)
            );
        }
    }
    fleet
        .wait_ready(plan.endpoints, Duration::from_secs(args.setup_deadline))
        .await?;
    let t = t0.elapsed().as_secs_f64();
    let settle_s = settle(cp.pid(), t0, Duration::from_secs(args.setup_deadline)).await;
    let cpu = cpu_seconds(cp.pid()) - c0;
    progress!(
        "{} endpoint proxies registered in {t:.2}s over {} connections (control plane idle after {settle_s:.2}s)",
        plan.endpoints,
        fleet.connections()
    );
    res.setup.push(cp.step(
        format!("endpoints E={}", plan.endpoints),
        plan.endpoints,
        &fleet,
        t,
        settle_s,
        cpu,
    ));
    let mut p1 = Part1 {
        cp,
        fleet,
        client_token,
        clients: 0,
        services: plan.services,
        endpoints: plan.endpoints,
        mark: 0,
    };
    let run_c0 = cpu_seconds(p1.cp.pid());
    for &n in &plan.proxies {
        if n < p1.clients {
            continue;
        }
        progress!("N={n}: registering {} more client proxies", n - p1.clients);
        let step = p1.add_clients(n, plan, args).await?;
        res.setup.push(step);
        for run in 1..=plan.repeats {
            for change in &args.changes {
                let m = p1.measure(change.name(), run, plan, args).await?;
                res.propagation.push(m);
                p1.cp.proc.check_alive()?;
            }
        }
    }
    let cpu = cpu_seconds(p1.cp.pid()) - run_c0;
    res.cp_after_run = Some(
        p1.cp
            .step("after the run".into(), 0, &p1.fleet, 0.0, 0.0, cpu),
    );
    let failed = p1
        .fleet
        .shared
        .failed
        .load(std::sync::atomic::Ordering::Relaxed);
    if failed > 0 {
        res.notes.push(format!(
            "{failed} simulated streams failed during the run; first error: {}",
            p1.fleet
                .shared
                .first_error
                .lock()
                .unwrap()
                .clone()
                .unwrap_or_default()
        ));
    }
    p1.fleet.shutdown().await;
    let mut cp = p1.cp;
    cp.proc.stop();
    Ok(())
}

/// A real `trellis proxy` started on free ports.
struct RealProxy {
    proc: Proc,
    outbound: SocketAddr,
    admin: SocketAddr,
}

#[allow(clippy::too_many_arguments)]
async fn start_proxy(
    trellis: &Path,
    dir: &Path,
    cp: &ControlPlane,
    name: &str,
    app: &str,
    token_file: &Path,
    app_port: u16,
) -> anyhow::Result<RealProxy> {
    let inbound: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let outbound: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let args: Vec<String> = [
        "proxy",
        "--control-plane",
        &cp.grpc.to_string(),
        "--workload",
        app,
        "--namespace",
        "default",
        "--labels",
        &format!("app={app}"),
        "--service-account",
        app,
        "--token-file",
        &token_file.display().to_string(),
        "--app-port",
        &app_port.to_string(),
        "--inbound-addr",
        &inbound.to_string(),
        "--outbound-addr",
        &outbound.to_string(),
        "--admin-addr",
        &admin.to_string(),
        "--advertise-addr",
        "127.0.0.1",
        "--cache-dir",
        &dir.join(format!("{name}-cache")).display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut proc = Proc::spawn(name, trellis, &args, &[], dir.join(format!("{name}.log")))?;
    wait_http_ok(admin, "/ready", Duration::from_secs(30), &mut proc).await?;
    Ok(RealProxy {
        proc,
        outbound,
        admin,
    })
}

async fn proxy_rss(
    args: &Args,
    plan: &Plan,
    trellis: &Path,
    dir: &Path,
    res: &mut Results,
) -> anyhow::Result<()> {
    progress!(
        "part 2: one proxy's RSS while the mesh has M={:?} services ({} endpoints each), its app calling 3",
        plan.rss_services,
        plan.rss_endpoints_per_service
    );
    let cp = ControlPlane::start(trellis, dir, "control-rss").await?;
    for sa in ["backend", "client"] {
        std::fs::write(dir.join(format!("{sa}.token")), cp.token(sa, sa).await?)?;
    }
    // The backend: demo-app behind a real proxy, the one endpoint of the 3
    // called services.
    let app_port = free_port()?;
    let mut app = Proc::spawn(
        "demo-app",
        trellis,
        &[
            "demo-app".into(),
            "--listen".into(),
            format!("127.0.0.1:{app_port}"),
            "--name".into(),
            "backend".into(),
        ],
        &[],
        dir.join("demo-app.log"),
    )?;
    let app_addr: SocketAddr = format!("127.0.0.1:{app_port}").parse()?;
    wait_http_ok(app_addr, "/", Duration::from_secs(15), &mut app).await?;
    let _backend = start_proxy(
        trellis,
        dir,
        &cp,
        "proxy-backend",
        "backend",
        &dir.join("backend.token"),
        app_port,
    )
    .await?;
    let called = ["called-0", "called-1", "called-2"];
    let mut fleet = Fleet::new(cp.grpc.to_string(), plan.streams_per_conn, args.in_flight);
    let mut have = 0; // filler services so far
    let mut eps = 0;
    for &m in &plan.rss_services {
        let want = m.saturating_sub(called.len());
        // Services first, then their endpoints.
        let mut resources: Vec<Value> = called.iter().map(|n| service(n, "backend")).collect();
        resources.extend((have..want).map(|k| service(&format!("svc-{k}"), &format!("svc-{k}"))));
        cp.apply(&Value::Array(resources)).await?;
        // Tokens before the clock starts: one per service, as in part 1.
        let mut ep_tokens = Vec::new();
        for k in have..want {
            ep_tokens.push(cp.token("bench-ep", &format!("svc-{k}")).await?);
        }
        let t0 = Instant::now();
        let c0 = cpu_seconds(cp.pid());
        let added_from = eps;
        for (k, token) in (have..want).zip(&ep_tokens) {
            for _ in 0..plan.rss_endpoints_per_service {
                fleet
                    .start(
                        endpoint_register(eps, &format!("svc-{k}"), token),
                        Role::Endpoint,
                    )
                    .await?;
                eps += 1;
            }
        }
        fleet
            .wait_ready(eps, Duration::from_secs(args.setup_deadline))
            .await?;
        let t = t0.elapsed().as_secs_f64();
        let settle_s = settle(cp.pid(), t0, Duration::from_secs(args.setup_deadline)).await;
        let cpu = cpu_seconds(cp.pid()) - c0;
        have = want.max(have);
        progress!(
            "M={m}: {} services, {eps} simulated endpoints (+{} in {t:.2}s)",
            have + called.len(),
            eps - added_from
        );
        res.rss_setup
            .push(cp.step(format!("M={m}"), eps - added_from, &fleet, t, settle_s, cpu));
        for run in 1..=plan.rss_repeats {
            let name = format!("proxy-client-m{m}-{run}");
            let mut px = start_proxy(
                trellis,
                dir,
                &cp,
                &name,
                "client",
                &dir.join("client.token"),
                free_port()?,
            )
            .await?;
            let mut ok = 0;
            for i in 0..plan.requests {
                let svc = called[i % called.len()];
                let url = format!("http://{svc}:8080/bench/{i}");
                match http(
                    px.outbound,
                    "GET",
                    &url,
                    &format!("{svc}:8080"),
                    None,
                    Duration::from_secs(10),
                )
                .await
                {
                    Ok(a) if a.status == 200 => ok += 1,
                    Ok(a) if ok == 0 && i < 3 => {
                        progress!("  {svc}: {} {}", a.status, a.body.trim())
                    }
                    Err(e) if ok == 0 && i < 3 => progress!("  {svc}: {e}"),
                    _ => {}
                }
            }
            // Let the proxy finish what the requests started (pools, stats).
            tokio::time::sleep(Duration::from_secs(1)).await;
            px.proc.check_alive()?;
            let (rss, hwm) = memory_kb(px.proc.pid());
            let config = http(
                px.admin,
                "GET",
                "/config",
                "localhost",
                None,
                Duration::from_secs(10),
            )
            .await
            .map(|a| a.body)
            .unwrap_or_default();
            let config_services = serde_json::from_str::<Value>(&config)
                .ok()
                .and_then(|v| v["services"].as_array().map(|a| a.len()))
                .unwrap_or(0);
            progress!(
                "  proxy #{run}: {ok}/{} requests ok, RSS {:.1} MB (peak {:.1} MB), /config {} bytes, {config_services} services",
                plan.requests,
                rss as f64 / 1024.0,
                hwm as f64 / 1024.0,
                config.len()
            );
            res.rss.push(RssPoint {
                services: have + called.len(),
                endpoints: eps + 1,
                run,
                requests: plan.requests,
                ok,
                rss_kb: rss,
                hwm_kb: hwm,
                admin_config_bytes: config.len(),
                config_services,
                cp_rss_kb: memory_kb(cp.pid()).0,
            });
            px.proc.stop();
        }
    }
    fleet.shutdown().await;
    Ok(())
}

fn trellis_binary(args: &Args) -> anyhow::Result<PathBuf> {
    let path = match &args.trellis {
        Some(p) => p.clone(),
        None => std::env::current_exe()?
            .parent()
            .map(|d| d.join("trellis"))
            .context("no directory for this program")?,
    };
    if !path.is_file() {
        bail!(
            "{} not found: build it (cargo build --release -p trellis) or pass --trellis",
            path.display()
        );
    }
    Ok(path)
}

fn utc_date() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!("{y:04}-{m:02}-{d:02}")
}

fn env_facts(plan: &Plan, trellis: &Path, fd_limit: u64) -> BTreeMap<String, Value> {
    let cmd = |c: &str, a: &[&str]| {
        std::process::Command::new(c)
            .args(a)
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(": ").nth(1))
        .unwrap_or("?")
        .to_string();
    let mut env = BTreeMap::new();
    env.insert("date".into(), json!(utc_date()));
    env.insert("mode".into(), json!(plan.mode));
    env.insert(
        "plan".into(),
        serde_json::to_value(plan).unwrap_or_default(),
    );
    env.insert(
        "nproc".into(),
        json!(std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)),
    );
    env.insert("cpu".into(), json!(cpu));
    env.insert("kernel".into(), json!(cmd("uname", &["-r"])));
    env.insert(
        "trellis_commit".into(),
        json!(cmd("git", &["rev-parse", "--short", "HEAD"])),
    );
    env.insert("trellis".into(), json!(trellis.display().to_string()));
    env.insert("fd_limit".into(), json!(fd_limit));
    env.insert("load_start".into(), json!(sys::load_average()));
    env
}

async fn run(args: Args, dir: PathBuf) -> anyhow::Result<()> {
    let plan = Plan::from(&args);
    let trellis = trellis_binary(&args)?;
    let fd_limit = sys::raise_fd_limit();
    let need = plan
        .endpoints
        .max(plan.rss_services.iter().max().copied().unwrap_or(0) * plan.rss_endpoints_per_service)
        + plan.proxies.iter().max().copied().unwrap_or(0);
    progress!(
        "{} mode; trellis {}; open-file limit {fd_limit}",
        plan.mode,
        trellis.display()
    );
    if (fd_limit as usize) < need / plan.streams_per_conn.max(1) + 1000 {
        bail!("the open-file limit {fd_limit} is too low");
    }
    std::fs::create_dir_all(&dir)?;
    let mut res = Results {
        env: env_facts(&plan, &trellis, fd_limit),
        ..Default::default()
    };
    let own_c0 = cpu_seconds(std::process::id());
    let t0 = Instant::now();
    let mut outcome = Ok(());
    if !args.skip_rss {
        outcome = proxy_rss(&args, &plan, &trellis, &dir, &mut res).await;
    }
    if outcome.is_ok() && !args.skip_propagation {
        outcome = propagation(&args, &plan, &trellis, &dir, &mut res).await;
    }
    if let Err(e) = &outcome {
        // Keep the logs of a failed run for a look.
        progress!("failed: {e:#}; logs kept in {}", dir.display());
        return outcome;
    }
    let _ = std::fs::remove_dir_all(&dir);
    res.env
        .insert("load_end".into(), json!(sys::load_average()));
    res.env.insert(
        "bench_cpu_seconds".into(),
        json!(cpu_seconds(std::process::id()) - own_c0),
    );
    res.env
        .insert("wall_seconds".into(), json!(t0.elapsed().as_secs_f64()));
    let name = args.name.clone().unwrap_or_else(|| {
        format!(
            "{}-scale{}",
            utc_date(),
            if args.smoke { "-smoke" } else { "" }
        )
    });
    std::fs::create_dir_all(&args.out)?;
    let md = report::markdown(&plan, &res);
    let md_path = args.out.join(format!("{name}.md"));
    let json_path = args.out.join(format!("{name}.json"));
    std::fs::write(&md_path, &md)?;
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&json!({"args": args, "results": res}))? + "\n",
    )?;
    println!("{md}");
    progress!("wrote {} and {}", md_path.display(), json_path.display());
    Ok(())
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = sys::since_start();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-scale: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let dir = std::env::temp_dir().join(format!("trellis-scale.{}", std::process::id()));
    let mut interrupted = false;
    let result = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        tokio::select! {
            r = run(args, dir.clone()) => r,
            _ = tokio::signal::ctrl_c() => { interrupted = true; Err(anyhow::anyhow!("interrupted")) }
            _ = term.recv() => { interrupted = true; Err(anyhow::anyhow!("terminated")) }
        }
    });
    // Dropping the runtime drops every task, and with them the processes.
    drop(rt);
    if interrupted {
        let _ = std::fs::remove_dir_all(&dir);
    }
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("trellis-scale: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
