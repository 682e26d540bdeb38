//! The GRPCRoute case: real gRPC on the cluster. grpc-go's interop server
//! (tools/peers/grpc-echo) runs as two versions behind the Service `echo`,
//! and ghz (the gRPC load tool) runs as a Job in an injected namespace. Both
//! are built from Go modules by scripts/test-peers (scripts/test exports
//! their paths) and put in one small image here.

use std::path::Path;
use std::process::Command;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use trellis_testkit::prometheus::Metrics;

use super::harness::*;

/// Calls per ghz run.
const CALLS: u64 = 200;
/// The Service port the gRPC backends listen on.
const PORT: u16 = 50051;

/// A test peer's binary: from scripts/test's environment, else built now.
fn peer(env: &str, name: &str) -> anyhow::Result<String> {
    if let Some(path) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(path.to_string_lossy().into_owned());
    }
    let out = script("test-peers", &[name])?;
    out.lines()
        .last()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("scripts/test-peers {name} printed no path"))
}

/// Builds and loads the image of ghz and grpc-echo; returns its reference.
fn image(dir: &Path) -> anyhow::Result<String> {
    let ghz = peer("TRELLIS_GHZ", "ghz")?;
    let echo = peer("TRELLIS_GRPC_ECHO", "grpc-echo")?;
    let tar = dir.join("grpc-peers.tar");
    let out = Command::new("python3")
        .arg(repo().join("tools/k8s/mkimage.py"))
        .arg("--out")
        .arg(&tar)
        .args(["--name", "trellis.local/grpc-peers", "--tag-prefix", "test"])
        .args(["--add-elf", &format!("{ghz}:/usr/local/bin/ghz")])
        .args(["--add-elf", &format!("{echo}:/usr/local/bin/grpc-echo")])
        .args(["--user", "app:1000"])
        .output()
        .context("running tools/k8s/mkimage.py")?;
    if !out.status.success() {
        bail!(
            "mkimage.py for the gRPC peers: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let reference = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    script("k8s-cluster", &["load", &tar.display().to_string()])?;
    Ok(reference)
}

fn backends(image: &str) -> String {
    let mut out = String::new();
    for v in ["v1", "v2"] {
        out.push_str(&format!(
            r#"{{"apiVersion":"apps/v1","kind":"Deployment","metadata":{{"name":"echo-{v}","namespace":"prod"}},
  "spec":{{"replicas":1,"selector":{{"matchLabels":{{"app":"echo","version":"{v}"}}}},
    "template":{{"metadata":{{"labels":{{"app":"echo","version":"{v}"}}}},
      "spec":{{"serviceAccountName":"backend","securityContext":{{"runAsUser":1000,"runAsGroup":1000}},
        "containers":[{{"name":"app","image":"{image}","imagePullPolicy":"Never",
          "command":["/usr/local/bin/grpc-echo"],"args":["-addr","0.0.0.0:{PORT}"],
          "ports":[{{"containerPort":{PORT}}}]}}]}}}}}}}}
---
{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"echo-{v}","namespace":"prod"}},
  "spec":{{"selector":{{"app":"echo","version":"{v}"}},"ports":[{{"name":"grpc","port":{PORT},"targetPort":{PORT}}}]}}}}
---
"#
        ));
    }
    out.push_str(&format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"echo","namespace":"prod"}},
  "spec":{{"selector":{{"app":"echo"}},"ports":[{{"name":"grpc","port":{PORT},"targetPort":{PORT}}}]}}}}
"#
    ));
    out
}

/// EmptyCall goes to v2; every other method (UnaryCall, and the reflection
/// ghz asks first) to v1.
fn route() -> String {
    format!(
        r#"{{"apiVersion":"gateway.networking.k8s.io/v1","kind":"GRPCRoute",
  "metadata":{{"name":"echo-by-method","namespace":"prod"}},
  "spec":{{"parentRefs":[{{"group":"","kind":"Service","name":"echo","port":{PORT}}}],
    "rules":[
      {{"matches":[{{"method":{{"service":"grpc.testing.TestService","method":"EmptyCall"}}}}],
        "backendRefs":[{{"name":"echo-v2","port":{PORT}}}]}},
      {{"backendRefs":[{{"name":"echo-v1","port":{PORT}}}]}}]}}}}"#
    )
}

/// The inbound requests a backend's sidecar has counted.
fn inbound(c: &Cluster, rt: &tokio::runtime::Runtime, version: &str) -> anyhow::Result<f64> {
    let pods = c.pods("prod", &format!("app=echo,version={version}"))?;
    let ip = pods
        .first()
        .and_then(|p| p["status"]["podIP"].as_str())
        .ok_or_else(|| anyhow!("no echo-{version} pod IP"))?;
    let (_, body) = rt.block_on(trellis_testkit::try_http_get(
        &format!("http://{ip}:15000/metrics"),
        None,
    ))?;
    let metrics = Metrics::parse(&String::from_utf8_lossy(&body))?;
    Ok(metrics.sum("trellis_requests_total", &[("direction", "inbound")]))
}

/// Runs ghz as a Job in prod (its pod gets the sidecar) and returns its
/// JSON report.
fn ghz(c: &Cluster, image: &str, name: &str, method: &str, data: &str) -> anyhow::Result<Value> {
    let args = serde_json::json!([
        "--insecure",
        "--call",
        format!("grpc.testing.TestService/{method}"),
        "-d",
        data,
        "-n",
        CALLS.to_string(),
        "-c",
        "4",
        "--connections",
        "1",
        "--timeout",
        "10s",
        "-O",
        "json",
        format!("echo.prod.svc.cluster.local:{PORT}"),
    ]);
    let job = format!(
        r#"{{"apiVersion":"batch/v1","kind":"Job","metadata":{{"name":"{name}","namespace":"prod"}},
  "spec":{{"backoffLimit":0,"template":{{"spec":{{"restartPolicy":"Never","serviceAccountName":"frontend",
    "securityContext":{{"runAsUser":1000,"runAsGroup":1000}},
    "containers":[{{"name":"ghz","image":"{image}","imagePullPolicy":"Never",
      "command":["/usr/local/bin/ghz"],"args":{args}}}]}}}}}}}}"#
    );
    let _ = c.kubectl(&[
        "-n",
        "prod",
        "delete",
        "job",
        name,
        "--ignore-not-found",
        "--wait=true",
    ]);
    c.kubectl_in(&["apply", "-f", "-"], &job)?;
    let waited = c.kubectl(&[
        "-n",
        "prod",
        "wait",
        "--for=condition=Complete",
        &format!("job/{name}"),
        "--timeout=120s",
    ]);
    let logs = c
        .kubectl(&["-n", "prod", "logs", &format!("job/{name}"), "-c", "ghz"])
        .unwrap_or_else(|e| format!("(no logs: {e:#})"));
    waited.with_context(|| format!("ghz Job {name}: {logs}"))?;
    // The log holds stdout and stderr: the report is the line (or the end
    // of a line, after a progress bar) that parses as ghz's JSON.
    let report: Value = logs
        .lines()
        .filter_map(|l| l.find("{\"").map(|at| &l[at..]))
        .find_map(|l| {
            serde_json::from_str::<Value>(l)
                .ok()
                .filter(|v| v.get("count").is_some())
        })
        .ok_or_else(|| anyhow!("ghz {name} printed no JSON report: {logs}"))?;
    let ok = report["statusCodeDistribution"]["OK"].as_u64().unwrap_or(0);
    if ok != CALLS {
        bail!(
            "ghz {method}: {ok} of {CALLS} calls OK; status codes {}, errors {}",
            report["statusCodeDistribution"],
            report["errorDistribution"]
        );
    }
    Ok(report)
}

/// The p99 latency of a ghz report, in ms (ghz reports nanoseconds).
fn p99_ms(report: &Value) -> f64 {
    report["latencyDistribution"]
        .as_array()
        .and_then(|a| a.iter().find(|d| d["percentage"] == 99))
        .and_then(|d| d["latency"].as_f64())
        .map_or(f64::NAN, |ns| ns / 1e6)
}

pub(crate) fn grpc_route(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let tmp = tempfile::tempdir()?;
    let image = image(tmp.path())?;
    c.kubectl_in(&["apply", "-f", "-"], &backends(&image))?;
    for d in ["echo-v1", "echo-v2"] {
        c.rollout("prod", d)?;
    }
    c.kubectl_in(&["apply", "-f", "-"], &route())?;
    route_condition(
        c,
        ("grpcroute", "prod", "echo-by-method"),
        "Accepted",
        "True",
    )?;

    let (v1, v2) = (inbound(c, rt, "v1")?, inbound(c, rt, "v2")?);
    let unary = ghz(
        c,
        &image,
        "ghz-unary",
        "UnaryCall",
        r#"{"response_size":10}"#,
    )?;
    let (v1_unary, v2_unary) = (inbound(c, rt, "v1")? - v1, inbound(c, rt, "v2")? - v2);
    let empty = ghz(c, &image, "ghz-empty", "EmptyCall", "{}")?;
    let (v1_empty, v2_empty) = (
        inbound(c, rt, "v1")? - v1 - v1_unary,
        inbound(c, rt, "v2")? - v2 - v2_unary,
    );

    for name in ["ghz-unary", "ghz-empty"] {
        let _ = c.kubectl(&["-n", "prod", "delete", "job", name, "--ignore-not-found"]);
    }
    c.kubectl(&["-n", "prod", "delete", "grpcroute", "echo-by-method"])?;

    // v1 also answers ghz's reflection calls, so it sees at least CALLS
    // UnaryCalls and a few more; v2 sees exactly the EmptyCalls.
    let calls = CALLS as f64;
    if v2_unary != 0.0 || v1_unary < calls {
        bail!("UnaryCall ×{CALLS}: echo-v1 counted {v1_unary} inbound requests, echo-v2 {v2_unary}; want ≥ {CALLS} and 0");
    }
    if v2_empty != calls || v1_empty >= calls {
        bail!("EmptyCall ×{CALLS}: echo-v1 counted {v1_empty} inbound requests, echo-v2 {v2_empty}; want < {CALLS} (reflection only) and {CALLS}");
    }
    Ok(format!(
        "ghz Jobs in prod through both sidecars: UnaryCall {CALLS}/{CALLS} OK → echo-v1 ({v1_unary} inbound incl. reflection, echo-v2 0), EmptyCall {CALLS}/{CALLS} OK → echo-v2 ({v2_empty}, echo-v1 {v1_empty} reflection only); p99 {:.1} / {:.1} ms",
        p99_ms(&unary),
        p99_ms(&empty),
    ))
}
