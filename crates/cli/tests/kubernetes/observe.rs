//! The observability commands with `--kubernetes`: `stat`, `edges`,
//! `trace`, `tap`, `get` and `dashboard` against every control-plane
//! replica through port-forwards, and the Roles that grant them.

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;

use super::harness::*;

const FRONTEND_ID: &str = "spiffe://trellis.local/ns/dev/sa/frontend";

pub(crate) fn observe(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    // Known traffic: 300 calls dev/frontend → prod/backend, and one with a
    // trace id of ours, sampled.
    let calls = rt.block_on(async {
        let mut ok = 0;
        for _ in 0..300 {
            ok += usize::from(call(&front).await.backend.is_some());
        }
        ok
    });
    if calls != 300 {
        bail!("{} of 300 calls failed before observing", 300 - calls);
    }
    let trace_id = format!("{:032x}", std::process::id() as u128 * 7919 + 0x5eed);
    let traceparent = format!("00-{trace_id}-00f067aa0ba902b7-01");
    let (status, _) = rt
        .block_on(async {
            trellis_testkit::http_request(
                http::Method::GET,
                &format!("http://{front}/"),
                &[("traceparent", traceparent.as_str())],
                bytes::Bytes::new(),
                None,
            )
            .await
            .map(|r| (r.status(), ()))
        })
        .context("the traced call")?;
    if status != 200 {
        bail!("the traced call answered {status}");
    }

    // stat: the rows of both replicas, merged; sidecars report every 10 s.
    let started = Instant::now();
    let backend = until(
        "stat --kubernetes counts the 300 calls",
        Duration::from_secs(60),
        || {
            let v = c.trellis_json(&["stat", "--kubernetes", "-n", "prod", "--window", "2m"])?;
            let row = v["rows"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["name"] == "backend"))
                .cloned()
                .ok_or_else(|| anyhow!("no backend row: {v}"))?;
            if row["requests"].as_f64().unwrap_or(0.0) < 300.0 {
                bail!("backend row {row}");
            }
            Ok(row)
        },
    )?;
    let stat_after = started.elapsed();
    if backend["tlsShare"].as_f64() != Some(1.0) || backend["p99Ms"].as_f64().is_none() {
        bail!("backend row not all mTLS, or no p99: {backend}");
    }
    let table = c.trellis(&["stat", "--kubernetes", "-n", "prod", "--window", "2m"])?;
    if !table.contains("prod/backend") || !table.starts_with("NAME") {
        bail!("stat table: {table}");
    }

    // edges: who calls whom, with identities.
    let edges = c.trellis_json(&["edges", "--kubernetes", "--window", "2m"])?;
    let edge = edges["edges"]
        .as_array()
        .and_then(|e| {
            e.iter().find(|e| {
                e["sourceNamespace"] == "dev"
                    && e["sourceWorkload"] == "frontend"
                    && e["destinationService"] == "backend"
            })
        })
        .cloned()
        .ok_or_else(|| anyhow!("no edge dev/frontend → prod/backend: {edges}"))?;
    if edge["mtls"] != "mtls"
        || !edge["sourceIdentities"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i == FRONTEND_ID))
    {
        bail!("edge dev/frontend → backend: {edge}");
    }

    // trace: our trace, its spans joined from the replicas that keep them.
    let spans = until(
        "trace show --kubernetes has our trace",
        Duration::from_secs(60),
        || {
            let v = c.trellis_json(&["trace", "show", &trace_id, "--kubernetes"])?;
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            let services: std::collections::BTreeSet<&str> =
                spans.iter().filter_map(|s| s["service"].as_str()).collect();
            // The frontend's and the backend's sidecars each send their spans
            // to the replica they are connected to.
            if services.len() < 2 {
                bail!("spans of {services:?}: {}", spans.len());
            }
            Ok(spans.len())
        },
    )?;
    let listed = c.trellis(&["trace", "list", "--kubernetes", "--limit", "50"])?;
    if !listed.contains(&trace_id) {
        bail!("trace list --kubernetes does not list {trace_id}: {listed}");
    }

    // tap: live events from prod's sidecars while traffic flows (whichever
    // replica each is connected to).
    let load = rt.spawn(steady(front.clone(), 20, Duration::from_secs(15)));
    let tapped = c.trellis(&[
        "tap",
        "-n",
        "prod",
        "--kubernetes",
        "--max",
        "40",
        "--duration",
        "12s",
        "-o",
        "json",
    ]);
    let _ = rt.block_on(load);
    let tapped = tapped?;
    let events: Vec<Value> = tapped
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let inbound = events
        .iter()
        .filter(|e| e["direction"] == "inbound" && e["sourceIdentity"] == FRONTEND_ID)
        .count();
    if inbound == 0 {
        bail!("tap --kubernetes saw no inbound call from {FRONTEND_ID}: {tapped}");
    }

    // get: resources as every replica holds them.
    let got = c.trellis(&["get", "service", "-n", "prod", "--kubernetes"])?;
    if !got.contains("backend") {
        bail!("get service --kubernetes: {got}");
    }

    let dashboard = dashboard(c, rt)?;
    let rbac = roles(c)?;
    Ok(format!(
        "stat: prod/backend {:.0} requests in 2m, mTLS {:.0} %, p99 {:.2} ms, counted {:.1}s after the calls; \
         edge dev/frontend → prod/backend mtls from {FRONTEND_ID}; trace {trace_id}: {spans} spans; \
         tap: {} events, {inbound} inbound from dev/frontend; {dashboard}; {rbac}",
        backend["requests"].as_f64().unwrap_or(0.0),
        backend["tlsShare"].as_f64().unwrap_or(0.0) * 100.0,
        backend["p99Ms"].as_f64().unwrap_or(0.0),
        stat_after.as_secs_f64(),
        events.len(),
    ))
}

/// `trellis dashboard --kubernetes`: the link's secret opens the merged
/// API on loopback; without it, 401.
fn dashboard(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let mut child = Command::new(BIN)
        .args(["dashboard", "--kubernetes"])
        .env("KUBECONFIG", &c.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("trellis dashboard --kubernetes")?;
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().unwrap();
    let mut child = Kill(child);
    // The link is printed once the replicas are reached (EOF if it failed).
    let link = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains("#token="))
        .ok_or_else(|| {
            anyhow!(
                "trellis dashboard printed no link; exit {:?}",
                child.0.try_wait()
            )
        })?;
    let (base, secret) = link
        .trim()
        .split_once("/#token=")
        .ok_or_else(|| anyhow!("link {link}"))?;
    let get = |path: &str, auth: Option<String>| {
        let url = format!("{base}{path}");
        rt.block_on(async move {
            let bearer = auth.map(|s| format!("Bearer {s}"));
            let headers: Vec<(&str, &str)> = bearer
                .as_deref()
                .map(|b| vec![("authorization", b)])
                .unwrap_or_default();
            trellis_testkit::http_request(
                http::Method::GET,
                &url,
                &headers,
                bytes::Bytes::new(),
                None,
            )
            .await
        })
    };
    let page = get("/", None)?;
    let refused = get("/api/v1/stat?kind=service&window=2m", None)?;
    let stat = get(
        "/api/v1/stat?kind=service&window=2m",
        Some(secret.to_string()),
    )?;
    let body: Value = serde_json::from_slice(stat.body())?;
    let backend = body["rows"]
        .as_array()
        .and_then(|r| {
            r.iter()
                .find(|r| r["namespace"] == "prod" && r["name"] == "backend")
        })
        .cloned();
    if page.status() != 200 || refused.status() != 401 || stat.status() != 200 || backend.is_none()
    {
        bail!(
            "dashboard: page {}, API without the secret {}, with it {} {body}",
            page.status(),
            refused.status(),
            stat.status()
        );
    }
    Ok(format!(
        "dashboard: page 200, API 401 without the link's secret, 200 with it (prod/backend {} requests)",
        backend.unwrap()["requests"]
    ))
}

/// A user with no rights is told which Role to ask for; the Role
/// `trellis-viewer` lets it stat but not tap.
fn roles(c: &Cluster) -> anyhow::Result<String> {
    let _ = c.kubectl(&[
        "-n",
        "default",
        "delete",
        "serviceaccount",
        "observer",
        "--ignore-not-found",
    ]);
    let _ = c.kubectl(&[
        "-n",
        "trellis-system",
        "delete",
        "rolebinding",
        "observer-viewer",
        "--ignore-not-found",
    ]);
    c.kubectl(&["-n", "default", "create", "serviceaccount", "observer"])?;
    let token = c.kubectl(&[
        "-n",
        "default",
        "create",
        "token",
        "observer",
        "--duration",
        "1h",
    ])?;
    let mut config: Value =
        serde_json::from_str(&c.kubectl(&["config", "view", "--raw", "--minify", "-o", "json"])?)?;
    config["users"][0]["user"] = serde_json::json!({"token": token.trim()});
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("observer.kubeconfig");
    std::fs::write(&file, serde_json::to_vec(&config)?)?;
    let file = file.display().to_string();
    let as_observer = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--kubernetes", "--kubeconfig", &file]);
        c.trellis(&all)
    };
    let nothing = match as_observer(&["stat", "-n", "prod"]) {
        Ok(out) => bail!("a user without the Role got stat: {out}"),
        Err(e) => format!("{e:#}"),
    };
    if !nothing.contains("trellis-viewer") {
        bail!("the refusal does not name the Role to ask for: {nothing}");
    }
    c.kubectl(&[
        "-n",
        "trellis-system",
        "create",
        "rolebinding",
        "observer-viewer",
        "--role",
        "trellis-viewer",
        "--serviceaccount",
        "default:observer",
    ])?;
    until(
        "the Role trellis-viewer grants stat",
        Duration::from_secs(30),
        || as_observer(&["stat", "-n", "prod", "--window", "2m"]),
    )?;
    let tap = match as_observer(&["tap", "-n", "prod", "--max", "1", "--duration", "3s"]) {
        Ok(out) => bail!("trellis-viewer alone got a tap: {out}"),
        Err(e) => format!("{e:#}"),
    };
    c.kubectl(&[
        "-n",
        "trellis-system",
        "delete",
        "rolebinding",
        "observer-viewer",
    ])?;
    c.kubectl(&["-n", "default", "delete", "serviceaccount", "observer"])?;
    if !tap.contains("trellis-tap") {
        bail!("the tap refusal does not name the Role trellis-tap: {tap}");
    }
    let line = |s: &str, pat: &str| {
        let l = s.lines().find(|l| l.contains(pat)).unwrap_or_default();
        // What the user reads: from `error:` on.
        l[l.find("error:").unwrap_or(0)..]
            .trim()
            .chars()
            .take(160)
            .collect::<String>()
    };
    Ok(format!(
        "no Role: \"{}\"; Role trellis-viewer: stat works, tap refused: \"{}\"",
        line(&nothing, "trellis-viewer"),
        line(&tap, "trellis-tap"),
    ))
}
