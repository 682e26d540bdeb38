//! Trellis on a real Kubernetes cluster (`scripts/k8s-cluster`: kubelet,
//! containerd, kube-proxy, CoreDNS; docs/dev/k8s-test-cluster.md).
//!
//! One test runs the suite in order on one install, as the README says:
//! `scripts/image`, `trellis install --crds | kubectl apply -f -`,
//! `trellis install | kubectl apply -f -`, then the demo app as ordinary
//! Deployments in `dev` and `prod` (tests/kubernetes/apps.yaml). Each case
//! prints its figures (`figure:` lines) and the suite ends with a table of
//! cases; it fails when any case failed, after running them all.
//!
//! It needs root and the cluster's binaries (`scripts/k8s-cluster build`).
//! Outside CI it skips, saying why, without them; it uses a running cluster
//! as it is and starts (and afterwards stops) one otherwise. Under
//! `CI=true` it never skips: it starts the cluster itself and stops it at
//! the end, also when a case fails.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use trellis_testkit::process::in_ci;

#[path = "kubernetes/harness.rs"]
mod harness;
use harness::*;
#[path = "kubernetes/grpc.rs"]
mod grpc;
#[path = "kubernetes/observe.rs"]
mod observe;

const APPS: &str = include_str!("kubernetes/apps.yaml");

struct Suite {
    cluster: Cluster,
    image: String,
    rt: tokio::runtime::Runtime,
    results: Vec<(String, Result<String, String>)>,
}

impl Suite {
    fn case(
        &mut self,
        name: &str,
        f: impl FnOnce(&Cluster, &tokio::runtime::Runtime, &str) -> anyhow::Result<String>,
    ) {
        // TRELLIS_K8S_CASES=word,word runs the setup and the cases whose
        // names hold a word (for working on one case; CI runs them all).
        if let Ok(only) = std::env::var("TRELLIS_K8S_CASES") {
            let setup = self.results.len() < 2;
            if !setup && !only.split(',').any(|w| !w.is_empty() && name.contains(w)) {
                eprintln!("=== case: {name}: not selected by TRELLIS_K8S_CASES");
                return;
            }
        }
        eprintln!("=== case: {name}");
        let started = Instant::now();
        let r = f(&self.cluster, &self.rt, &self.image).map_err(|e| format!("{e:#}"));
        match &r {
            Ok(figures) => eprintln!(
                "figure: {name}: {figures} ({:.0}s)",
                started.elapsed().as_secs_f64()
            ),
            Err(e) => eprintln!("FAILED: {name}: {e}"),
        }
        self.results.push((name.to_string(), r));
    }
}

/// Installs as the README says, with the proxy-only sidecar image
/// (`trellis install --proxy-image`, as docs/kubernetes.md advises).
fn install(c: &Cluster, image_tar: &Path, proxy: (&Path, &str)) -> anyhow::Result<String> {
    script("k8s-cluster", &["load", &image_tar.display().to_string()])?;
    script("k8s-cluster", &["load", &proxy.0.display().to_string()])?;
    // Start from nothing: an earlier run's objects, then the README's steps.
    for ns in ["dev", "prod", "plain"] {
        let _ = c.kubectl(&[
            "delete",
            "namespace",
            ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=120s",
        ]);
    }
    let old = c.trellis(&["uninstall"])?;
    let _ = c.kubectl_in(
        &["delete", "--ignore-not-found", "--wait=true", "-f", "-"],
        &old,
    );
    let t = Instant::now();
    let crds = c.trellis(&["install", "--crds"])?;
    c.kubectl_in(&["apply", "-f", "-"], &crds)?;
    c.kubectl(&[
        "wait",
        "--for=condition=Established",
        "crd/trafficpolicies.trellis.dev",
        "crd/httproutes.gateway.networking.k8s.io",
        "--timeout=60s",
    ])?;
    let cp = c.trellis(&["install", "--proxy-image", proxy.1])?;
    c.kubectl_in(&["apply", "-f", "-"], &cp)?;
    c.rollout("trellis-system", "trellis-control")?;
    let ready = t.elapsed();
    // As the README says: `trellis check --kubernetes` before deploying.
    // It passes once the API server reaches the new webhook through its
    // Service (kube-proxy programs it a moment after the pods are ready)
    // and trusts it (the control plane sets the caBundle).
    until(
        "trellis check --kubernetes passes",
        Duration::from_secs(60),
        || c.trellis(&["check", "--kubernetes"]),
    )?;
    Ok(format!(
        "CRDs established and control plane (2 replicas) ready {:.1}s after `trellis install --crds | kubectl apply -f -`; `trellis check --kubernetes` passing after {:.1}s; sidecars from {}",
        ready.as_secs_f64(),
        t.elapsed().as_secs_f64(),
        proxy.1
    ))
}

fn deploy_apps(c: &Cluster, image: &str) -> anyhow::Result<String> {
    let t = Instant::now();
    c.kubectl_in(&["apply", "-f", "-"], &APPS.replace("IMAGE", image))?;
    for (ns, d) in [
        ("dev", "frontend"),
        ("prod", "frontend"),
        ("prod", "backend-v1"),
        ("prod", "backend-v2"),
        ("plain", "web"),
    ] {
        c.rollout(ns, d)?;
    }
    // Available pods are not yet Services the host reaches: kube-proxy
    // programs the new ClusterIPs a moment later.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    for front in [dev_front(c)?, prod_front(c)?] {
        until(&format!("{front} answers"), Duration::from_secs(30), || {
            rt.block_on(call(&front))
                .backend
                .map(|_| ())
                .ok_or_else(|| anyhow!("not yet"))
        })?;
    }
    Ok(format!(
        "5 Deployments available {:.1}s after apply",
        t.elapsed().as_secs_f64()
    ))
}

fn injection(c: &Cluster, image: &str) -> anyhow::Result<String> {
    let mut injected = 0;
    for ns in ["dev", "prod"] {
        for pod in c.pods(ns, "app")? {
            let inits = init_names(&pod);
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            if inits.first().map(String::as_str) != Some("trellis-init")
                || inits.get(1).map(String::as_str) != Some("trellis-proxy")
            {
                bail!(
                    "{ns}/{name} lacks trellis-init then trellis-proxy: init containers {inits:?}"
                );
            }
            let proxy = &pod["spec"]["initContainers"][1];
            // Both run the proxy-only image the install named.
            for c in [proxy, &pod["spec"]["initContainers"][0]] {
                let img = c["image"].as_str().unwrap_or_default();
                if !img.starts_with("trellis.local/trellis-proxy:") {
                    bail!("{ns}/{name}: {} runs {img}, not the proxy image", c["name"]);
                }
            }
            if proxy["restartPolicy"] != "Always" {
                bail!(
                    "{ns}/{name}: trellis-proxy is not a native sidecar: {}",
                    proxy["restartPolicy"]
                );
            }
            let init = &pod["spec"]["initContainers"][0];
            let caps = &init["securityContext"]["capabilities"]["add"];
            if init["securityContext"]["privileged"] == true
                || caps != &serde_json::json!(["NET_ADMIN", "NET_RAW"])
            {
                bail!("{ns}/{name}: trellis-init is privileged or has capabilities {caps}");
            }
            injected += 1;
        }
    }
    // The app's own probe runs through the proxy, and passes.
    let backend = c.pods("prod", "app=backend,version=v1")?;
    let probe = &backend
        .first()
        .ok_or_else(|| anyhow!("no backend-v1 pod"))?["spec"]["containers"][0]["readinessProbe"]
        ["httpGet"];
    if probe["path"] != "/app-health/app/readiness" || probe["port"] != 15000 {
        bail!("backend-v1's readiness probe was not rewritten to the proxy: {probe}");
    }
    let ready = backend.iter().all(|p| {
        p["status"]["containerStatuses"]
            .as_array()
            .is_some_and(|a| a.iter().all(|c| c["ready"] == true))
    });
    if !ready {
        bail!("backend-v1's app containers are not Ready through /app-health");
    }
    let plain = c.pods("plain", "app=web")?;
    let untouched = plain.iter().all(|p| {
        init_names(p).is_empty() && p["spec"]["containers"].as_array().map_or(0, Vec::len) == 1
    });
    if plain.is_empty() || !untouched {
        bail!("the pod of the uninjected namespace plain was changed: {plain:?}");
    }
    // A Job completes: the native sidecar does not keep its pod running.
    let job = format!(
        r#"{{"apiVersion":"batch/v1","kind":"Job","metadata":{{"name":"once","namespace":"dev"}},
        "spec":{{"backoffLimit":0,"template":{{"spec":{{"restartPolicy":"Never",
        "securityContext":{{"runAsUser":1000}},
        "containers":[{{"name":"once","image":"{image}","imagePullPolicy":"Never","args":["--version"]}}]}}}}}}}}"#
    );
    let _ = c.kubectl(&[
        "-n",
        "dev",
        "delete",
        "job",
        "once",
        "--ignore-not-found",
        "--wait=true",
    ]);
    let t = Instant::now();
    c.kubectl_in(&["apply", "-f", "-"], &job)?;
    c.kubectl(&[
        "-n",
        "dev",
        "wait",
        "--for=condition=Complete",
        "job/once",
        "--timeout=120s",
    ])?;
    let job_pod = c.pods("dev", "job-name=once")?;
    let job_injected = job_pod.first().map(init_names).unwrap_or_default();
    if !job_injected.contains(&"trellis-proxy".to_string()) {
        bail!("the Job's pod was not injected: {job_injected:?}");
    }
    Ok(format!(
        "{injected} pods in dev+prod with trellis-init + native trellis-proxy (NET_ADMIN/NET_RAW only); backend-v1's httpGet readiness probe rewritten to :15000/app-health/app/readiness and Ready; plain/web untouched (1 container, no init); injected Job complete in {:.1}s",
        t.elapsed().as_secs_f64()
    ))
}

fn identity(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let calls = rt.block_on(async {
        let mut out = Vec::new();
        for _ in 0..20 {
            out.push(call(&front).await);
        }
        out
    });
    let mut seen = BTreeMap::new();
    for call in &calls {
        let Some(b) = &call.backend else {
            bail!("a call failed: {:?}", call.error);
        };
        let id = b["headers"]["x-trellis-peer-identity"]
            .as_str()
            .unwrap_or("(none)")
            .to_string();
        *seen.entry(id).or_insert(0) += 1;
    }
    let want = "spiffe://trellis.local/ns/dev/sa/frontend";
    if seen.keys().collect::<Vec<_>>() != vec![want] {
        bail!("the backend saw identities {seen:?}, want only {want}");
    }
    // The backend's proxy holds a certificate for its own ServiceAccount.
    let pod = c.pods("prod", "app=backend,version=v1")?;
    let ip = pod
        .first()
        .and_then(|p| p["status"]["podIP"].as_str())
        .ok_or_else(|| anyhow!("no backend pod IP"))?
        .to_string();
    let certs = rt.block_on(trellis_testkit::try_http_get(
        &format!("http://{ip}:15000/certs"),
        None,
    ))?;
    let certs = String::from_utf8_lossy(&certs.1).into_owned();
    if !certs.contains("spiffe://trellis.local/ns/prod/sa/backend") {
        bail!("the backend proxy's /certs does not name its SA identity: {certs}");
    }
    Ok(format!(
        "20/20 calls dev/frontend → backend.prod.svc.cluster.local over mTLS; callee saw {want} on all; backend certificate spiffe://trellis.local/ns/prod/sa/backend"
    ))
}

fn split(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let route = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute",
      "metadata":{"name":"backend-split","namespace":"prod"},
      "spec":{"parentRefs":[{"group":"","kind":"Service","name":"backend","port":80}],
        "rules":[{"backendRefs":[{"name":"backend-v1","port":80,"weight":90},{"name":"backend-v2","port":80,"weight":10}]}]}}"#;
    c.kubectl_in(&["apply", "-f", "-"], route)?;
    let front = dev_front(c)?;
    route_condition(
        c,
        ("httproute", "prod", "backend-split"),
        "Accepted",
        "True",
    )?;
    // The dev frontend's proxy has the route once its config names it.
    let ip = c
        .pods("dev", "app=frontend")?
        .first()
        .and_then(|p| p["status"]["podIP"].as_str().map(String::from))
        .ok_or_else(|| anyhow!("no dev/frontend pod IP"))?;
    until(
        "the dev frontend's proxy has the route",
        Duration::from_secs(30),
        || {
            let (_, body) = rt.block_on(trellis_testkit::try_http_get(
                &format!("http://{ip}:15000/config"),
                None,
            ))?;
            let body = String::from_utf8_lossy(&body).into_owned();
            if body.contains("backend-split") {
                Ok(())
            } else {
                bail!("config {body}")
            }
        },
    )?;
    let total = 2000usize;
    let counts = rt.block_on(async {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        let mut failed = 0usize;
        let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(16));
        let mut tasks = Vec::new();
        for _ in 0..total {
            let permit = sem.clone().acquire_owned().await.unwrap();
            let front = front.clone();
            tasks.push(tokio::spawn(async move {
                let r = call(&front).await;
                drop(permit);
                r
            }));
        }
        for t in tasks {
            match t.await.unwrap().backend {
                Some(b) => {
                    *counts
                        .entry(b["version"].as_str().unwrap_or("?").to_string())
                        .or_insert(0) += 1
                }
                None => failed += 1,
            }
        }
        (counts, failed)
    });
    let (counts, failed) = counts;
    let v2 = *counts.get("v2").unwrap_or(&0) as f64 / total as f64 * 100.0;
    let v1 = *counts.get("v1").unwrap_or(&0) as f64 / total as f64 * 100.0;
    c.kubectl(&["-n", "prod", "delete", "httproute", "backend-split"])?;
    if failed > 0 || (v1 - 90.0).abs() > 4.0 || (v2 - 10.0).abs() > 4.0 {
        bail!("{total} requests: {counts:?}, {failed} failed; want 90/10 within ±4 %");
    }
    Ok(format!(
        "{total} requests: v1 {v1:.1} %, v2 {v2:.1} % (want 90/10 ±4), 0 failed"
    ))
}

fn authz(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let policy = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"AuthorizationPolicy",
      "metadata":{"name":"prod-only","namespace":"prod"},
      "spec":{"targetRef":{"kind":"Service","name":"backend"},"action":"ALLOW",
        "rules":[{"from":[{"namespaces":["prod"]}]}]}}"#;
    c.kubectl_in(&["apply", "-f", "-"], policy)?;
    let (dev, prod) = (dev_front(c)?, prod_front(c)?);
    let r = until(
        "dev → prod refused with 403",
        Duration::from_secs(30),
        || {
            let d = rt.block_on(call(&dev));
            let p = rt.block_on(call(&prod));
            if d.status == Some(403) && p.status == Some(200) {
                Ok((d, p))
            } else {
                bail!(
                    "dev got {:?} {:?}, prod got {:?} {:?}",
                    d.status,
                    d.error,
                    p.status,
                    p.error
                )
            }
        },
    );
    // Then 20 more of each, all as the policy says.
    let tally = rt.block_on(async {
        let mut t = (0, 0);
        for _ in 0..20 {
            if call(&dev).await.status == Some(403) {
                t.0 += 1;
            }
            if call(&prod).await.status == Some(200) {
                t.1 += 1;
            }
        }
        t
    });
    c.kubectl(&["-n", "prod", "delete", "authorizationpolicy", "prod-only"])?;
    // The next cases call from dev again: once the policy is gone everywhere.
    until(
        "dev → prod allowed again",
        Duration::from_secs(30),
        || {
            let d = rt.block_on(call(&dev));
            if d.status == Some(200) {
                Ok(())
            } else {
                bail!("dev got {:?} {:?}", d.status, d.error)
            }
        },
    )?;
    r?;
    if tally != (20, 20) {
        bail!(
            "of 20 each: dev refused {} times with 403, prod allowed {} times",
            tally.0,
            tally.1
        );
    }
    Ok("AuthorizationPolicy ALLOW from namespace prod: dev/frontend → prod/backend 403 on 21/21, prod/frontend → prod/backend 200 on 21/21".into())
}

fn control_plane_loss(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let victim = c.pods("trellis-system", "app.kubernetes.io/name=trellis-control")?;
    let victim = victim
        .first()
        .and_then(|p| p["metadata"]["name"].as_str())
        .ok_or_else(|| anyhow!("no control-plane pod"))?
        .to_string();
    let load = rt.spawn(steady(front, 50, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(10));
    c.kubectl(&[
        "-n",
        "trellis-system",
        "delete",
        "pod",
        &victim,
        "--wait=false",
    ])?;
    c.rollout("trellis-system", "trellis-control")?;
    let calls = rt.block_on(load)?;
    no_failures(&calls)?;
    Ok(format!(
        "{} requests at 50 rps over 60 s, control-plane pod {victim} deleted at 10 s: 0 failed",
        calls.len()
    ))
}

/// `kill -9` of a control-plane process (the container's own, through the
/// cluster's containerd) while 50 requests a second flow: none fails.
fn control_plane_kill(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let pods = c.pods("trellis-system", "app.kubernetes.io/name=trellis-control")?;
    let pod = pods
        .first()
        .ok_or_else(|| anyhow!("no control-plane pod"))?;
    let name = pod["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let id = pod["status"]["containerStatuses"][0]["containerID"]
        .as_str()
        .and_then(|s| s.strip_prefix("containerd://"))
        .ok_or_else(|| anyhow!("no containerd container ID on {name}"))?
        .to_string();
    let restarts = |c: &Cluster| -> anyhow::Result<i64> {
        let p = c.json(&["-n", "trellis-system", "get", "pod", &name])?;
        Ok(p["status"]["containerStatuses"][0]["restartCount"]
            .as_i64()
            .unwrap_or(0))
    };
    let before = restarts(c)?;
    let state = std::env::var("TRELLIS_K8S_DIR").unwrap_or_else(|_| "/var/lib/trellis-k8s".into());
    let load = rt.spawn(steady(front, 50, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(10));
    let out = Command::new("ctr")
        .args([
            "--address",
            &format!("{state}/containerd/containerd.sock"),
            "--namespace",
            "k8s.io",
        ])
        .args(["tasks", "kill", "--signal", "SIGKILL", &id])
        .output()?;
    if !out.status.success() {
        bail!("ctr tasks kill: {}", String::from_utf8_lossy(&out.stderr));
    }
    until(
        "the killed control plane restarted",
        Duration::from_secs(60),
        || {
            if restarts(c)? > before {
                Ok(())
            } else {
                bail!("restartCount still {before}")
            }
        },
    )?;
    let calls = rt.block_on(load)?;
    c.rollout("trellis-system", "trellis-control")?;
    no_failures(&calls)?;
    Ok(format!(
        "{} requests at 50 rps over 60 s, SIGKILL of the control-plane process of {name} at 10 s (restarted by the kubelet): 0 failed",
        calls.len()
    ))
}

/// Every control-plane replica down: existing pods keep serving (from
/// their proxies' last config), and a pod created meanwhile (refused by a
/// webhook that fails closed, as with `--ha`, and retried by its
/// ReplicaSet) comes up with its sidecar once a replica is back.
fn control_plane_down(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let policy = |p: &str| {
        format!(
            r#"[{{"op":"replace","path":"/webhooks/0/failurePolicy","value":"{p}"}},{{"op":"replace","path":"/webhooks/1/failurePolicy","value":"{p}"}}]"#
        )
    };
    let webhook = [
        "patch",
        "mutatingwebhookconfiguration",
        "trellis-sidecar-injector",
        "--type=json",
        "-p",
    ];
    let mut args = webhook.to_vec();
    let fail = policy("Fail");
    args.push(&fail);
    c.kubectl(&args)?;
    let result = (|| -> anyhow::Result<String> {
        c.kubectl(&[
            "-n",
            "trellis-system",
            "scale",
            "deploy/trellis-control",
            "--replicas=0",
        ])?;
        until(
            "every control-plane pod gone",
            Duration::from_secs(90),
            || {
                let left = c
                    .pods("trellis-system", "app.kubernetes.io/name=trellis-control")?
                    .len();
                if left == 0 {
                    Ok(())
                } else {
                    bail!("{left} left")
                }
            },
        )?;
        let load = rt.spawn(steady(front.clone(), 50, Duration::from_secs(20)));
        c.kubectl(&["-n", "prod", "scale", "deploy/backend-v2", "--replicas=2"])?;
        let calls = rt.block_on(load)?;
        let failed = failures(&calls);
        let pods_meanwhile = c.pods("prod", "app=backend,version=v2")?.len();
        let back = Instant::now();
        c.kubectl(&[
            "-n",
            "trellis-system",
            "scale",
            "deploy/trellis-control",
            "--replicas=2",
        ])?;
        c.rollout("trellis-system", "trellis-control")?;
        let cp_ready = back.elapsed();
        c.rollout("prod", "backend-v2")?;
        let pod_ready = back.elapsed();
        let pods = c.pods("prod", "app=backend,version=v2")?;
        let injected = pods
            .iter()
            .filter(|p| init_names(p).contains(&"trellis-proxy".to_string()))
            .count();
        if !failed.is_empty() {
            bail!(
                "{} of {} requests failed while the control plane was down: {:?}",
                failed.len(),
                calls.len(),
                &failed[..failed.len().min(5)]
            );
        }
        if pods_meanwhile != 1 {
            bail!("{pods_meanwhile} backend-v2 pods while the control plane was down (want the old one only: the new one must wait for its sidecar)");
        }
        if pods.len() != 2 || injected != 2 {
            bail!("after the control plane came back: {} backend-v2 pods, {injected} with the sidecar", pods.len());
        }
        Ok(format!(
            "control plane at 0 replicas: {} requests at 50 rps over 20 s, 0 failed; the new backend-v2 pod waited, then was Ready with its sidecar {:.1}s after scaling the control plane back ({:.1}s for the control plane itself)",
            calls.len(),
            pod_ready.as_secs_f64(),
            cp_ready.as_secs_f64()
        ))
    })();
    let mut args = webhook.to_vec();
    let ignore = policy("Ignore");
    args.push(&ignore);
    let _ = c.kubectl(&args);
    let _ = c.kubectl(&[
        "-n",
        "trellis-system",
        "scale",
        "deploy/trellis-control",
        "--replicas=2",
    ]);
    let _ = c.kubectl(&["-n", "prod", "scale", "deploy/backend-v2", "--replicas=1"]);
    c.rollout("trellis-system", "trellis-control")?;
    result
}

fn rolling_restart(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let load = rt.spawn(steady(front, 50, Duration::from_secs(60)));
    std::thread::sleep(Duration::from_secs(5));
    c.kubectl(&[
        "-n",
        "prod",
        "rollout",
        "restart",
        "deploy/backend-v1",
        "deploy/backend-v2",
    ])?;
    c.rollout("prod", "backend-v1")?;
    c.rollout("prod", "backend-v2")?;
    let calls = rt.block_on(load)?;
    no_failures(&calls)?;
    Ok(format!("{} requests at 50 rps over 60 s across a rolling restart of backend-v1 and backend-v2: 0 failed", calls.len()))
}

fn scale_out(c: &Cluster, rt: &tokio::runtime::Runtime) -> anyhow::Result<String> {
    let front = dev_front(c)?;
    let before: Vec<String> = c
        .pods("prod", "app=backend,version=v1")?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .collect();
    c.kubectl(&["-n", "prod", "scale", "deploy/backend-v1", "--replicas=4"])?;
    c.rollout("prod", "backend-v1")?;
    let ready_at = Instant::now();
    let new: Vec<String> = c
        .pods("prod", "app=backend,version=v1")?
        .iter()
        .filter_map(|p| p["metadata"]["name"].as_str().map(String::from))
        .filter(|n| !before.contains(n))
        .collect();
    if new.len() != 2 {
        bail!("scaling 2 → 4 made {new:?}");
    }
    let mut first_seen: BTreeMap<String, Duration> = BTreeMap::new();
    rt.block_on(async {
        while ready_at.elapsed() < Duration::from_secs(10) && first_seen.len() < new.len() {
            let calls: Vec<Call> = futures_join(&front, 10).await;
            for b in calls.into_iter().filter_map(|c| c.backend) {
                let inst = b["instance"].as_str().unwrap_or_default();
                if let Some(n) = new.iter().find(|n| inst.starts_with(n.as_str())) {
                    first_seen.entry(n.clone()).or_insert(ready_at.elapsed());
                }
            }
        }
    });
    c.kubectl(&["-n", "prod", "scale", "deploy/backend-v1", "--replicas=2"])?;
    let slowest = first_seen.values().max().copied();
    match slowest {
        Some(s) if first_seen.len() == 2 && s <= Duration::from_secs(5) => Ok(format!(
            "backend-v1 2 → 4: both new pods answered within {:.2}s of the rollout being available ({first_seen:?})",
            s.as_secs_f64()
        )),
        _ => bail!("new pods first seen after rollout: {first_seen:?} (want both within 5 s)"),
    }
}

fn bad_input(c: &Cluster) -> anyhow::Result<String> {
    let bad = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"TrafficPolicy",
      "metadata":{"name":"bad","namespace":"prod"},
      "spec":{"targetRef":{"kind":"Service","name":"backend"},"loadBalancer":{"type":"fastest"}}}"#;
    let err = match c.kubectl_in(&["apply", "-f", "-"], bad) {
        Ok(out) => {
            let _ = c.kubectl(&["-n", "prod", "delete", "trafficpolicy", "bad"]);
            bail!("an invalid TrafficPolicy was accepted: {out}")
        }
        Err(e) => format!("{e:#}"),
    };
    if !err.contains("spec.loadBalancer") {
        bail!("the refusal does not name the field path spec.loadBalancer...: {err}");
    }
    let route = r#"{"apiVersion":"gateway.networking.k8s.io/v1","kind":"HTTPRoute",
      "metadata":{"name":"to-nowhere","namespace":"prod"},
      "spec":{"parentRefs":[{"group":"","kind":"Service","name":"backend","port":80}],
        "rules":[{"backendRefs":[{"name":"missing","port":80}]}]}}"#;
    c.kubectl_in(&["apply", "-f", "-"], route)?;
    let cond = route_condition(
        c,
        ("httproute", "prod", "to-nowhere"),
        "ResolvedRefs",
        "False",
    );
    c.kubectl(&["-n", "prod", "delete", "httproute", "to-nowhere"])?;
    let cond = cond?;
    let refusal = err
        .lines()
        .find(|l| l.contains("spec.loadBalancer"))
        .unwrap_or(&err)
        .trim()
        .to_string();
    Ok(format!(
        "TrafficPolicy refused: {refusal}; route to Service missing: ResolvedRefs=False reason {} ({})",
        cond["reason"], cond["message"]
    ))
}

fn check(c: &Cluster) -> anyhow::Result<String> {
    let ok = c
        .trellis(&["check", "--kubernetes"])
        .context("trellis check --kubernetes after install")?;
    // A pod that started before its namespace opted in has no sidecar:
    // named, with what to do.
    c.kubectl(&["label", "namespace", "plain", "trellis.dev/inject=enabled"])?;
    let missing = c.trellis(&["check", "--kubernetes"]);
    c.kubectl(&["label", "namespace", "plain", "trellis.dev/inject-"])?;
    let missing = match missing {
        Ok(out) => bail!("check passed with a pod without its sidecar: {out}"),
        Err(e) => format!("{e:#}"),
    };
    if !missing.contains("pod plain/web-") {
        bail!("check did not name the pod without its sidecar: {missing}");
    }
    // A webhook whose caBundle is not the mesh CA's: named.
    let patch = r#"[{"op":"replace","path":"/webhooks/0/clientConfig/caBundle","value":"LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJJRENDLS0tLS1FTkQgQ0VSVElGSUNBVEUtLS0tLQo="}]"#;
    c.kubectl(&[
        "patch",
        "mutatingwebhookconfiguration",
        "trellis-sidecar-injector",
        "--type=json",
        "-p",
        patch,
    ])?;
    let broken = c.trellis(&["check", "--kubernetes"]);
    let broken = match broken {
        Ok(out) => bail!("check passed with a wrong webhook caBundle: {out}"),
        Err(e) => format!("{e:#}"),
    };
    if !broken.to_lowercase().contains("cabundle") {
        bail!("check did not name the webhook's caBundle: {broken}");
    }
    // The control plane puts it right again (every 30 s).
    until("check passes again", Duration::from_secs(60), || {
        c.trellis(&["check", "--kubernetes"])
    })?;
    let first = |s: &str, pat: &str| {
        s.lines()
            .find(|l| l.contains(pat))
            .unwrap_or("")
            .trim()
            .to_string()
    };
    Ok(format!(
        "passes after install ({} lines); missing sidecar: \"{}\"; wrong caBundle: \"{}\"; passes again once the control plane restored it",
        ok.lines().count(),
        first(&missing, "plain/web-"),
        first(&broken.to_lowercase(), "cabundle"),
    ))
}

#[test]
fn kubernetes_suite() {
    if let Some(why) = cannot_run() {
        if in_ci() {
            panic!("CI=true: the Kubernetes suite must run, but {why}");
        }
        eprintln!("skipped: the Kubernetes suite {why}");
        return;
    }
    let cluster = Cluster::up().expect("the test cluster starts (scripts/k8s-cluster up)");
    let tmp = tempfile::tempdir().unwrap();
    let tar = tmp.path().join("trellis-image.tar");
    let image = script(
        "image",
        &["--binary", BIN, "--out", &tar.display().to_string()],
    )
    .expect("scripts/image")
    .lines()
    .last()
    .unwrap_or_default()
    .to_string();
    let proxy_tar = tmp.path().join("trellis-proxy-image.tar");
    let proxy_image = script(
        "image",
        &[
            "--proxy",
            "--binary",
            PROXY_BIN,
            "--out",
            &proxy_tar.display().to_string(),
        ],
    )
    .expect("scripts/image --proxy")
    .lines()
    .last()
    .unwrap_or_default()
    .to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut s = Suite {
        cluster,
        image,
        rt,
        results: Vec::new(),
    };
    s.case("install as the README says", |c, _, _| {
        install(c, &tar, (&proxy_tar, &proxy_image))
    });
    s.case("demo app in dev and prod", |c, _, image| {
        deploy_apps(c, image)
    });
    s.case("injection", |c, _, image| injection(c, image));
    s.case("mTLS and SPIFFE ServiceAccount identity", |c, rt, _| {
        identity(c, rt)
    });
    s.case("HTTPRoute 90/10 split", |c, rt, _| split(c, rt));
    s.case("GRPCRoute by method (ghz)", |c, rt, _| {
        grpc::grpc_route(c, rt)
    });
    s.case("AuthorizationPolicy dev → prod", |c, rt, _| authz(c, rt));
    s.case(
        "stat, edges, trace, tap, get, dashboard --kubernetes",
        |c, rt, _| observe::observe(c, rt),
    );
    s.case("control-plane pod deleted under load", |c, rt, _| {
        control_plane_loss(c, rt)
    });
    s.case("control-plane process kill -9 under load", |c, rt, _| {
        control_plane_kill(c, rt)
    });
    s.case("every control-plane replica down", |c, rt, _| {
        control_plane_down(c, rt)
    });
    s.case("rolling restart of the backend under load", |c, rt, _| {
        rolling_restart(c, rt)
    });
    s.case("scale 2 → 4", |c, rt, _| scale_out(c, rt));
    s.case("trellis check --kubernetes", |c, _, _| check(c));
    s.case("bad input", |c, _, _| bad_input(c));

    eprintln!("\n=== Kubernetes suite");
    let mut failed = 0;
    for (name, r) in &s.results {
        match r {
            Ok(fig) => eprintln!("PASS {name}: {fig}"),
            Err(e) => {
                failed += 1;
                eprintln!("FAIL {name}: {e}");
            }
        }
    }
    assert_eq!(
        failed,
        0,
        "{failed} of {} Kubernetes cases failed (see above)",
        s.results.len()
    );
}
