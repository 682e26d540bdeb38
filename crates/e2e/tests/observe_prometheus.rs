//! A real Prometheus (Debian's `prometheus`) finds every proxy through the
//! control plane's HTTP service discovery and answers PromQL about the
//! traffic sent: a count, a success ratio and a histogram quantile.
//!
//! Needs the `prometheus` binary: skipped with a message where it is not
//! installed, always run under CI (scripts/test installs it).

mod observe_common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use observe_common::*;
use serde_json::Value;
use trellis_e2e::TestMesh;
use trellis_testkit::eventually;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn query(prom: &str, q: &str) -> Result<Vec<Value>, String> {
    let url = format!(
        "http://{prom}/api/v1/query?query={}",
        q.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    );
    let (status, body) = trellis_testkit::try_http_get(&url, None)
        .await
        .map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

fn scalar(result: &[Value]) -> Option<f64> {
    result.first()?["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_discovers_every_proxy_and_answers_promql() {
    let Some(prometheus) = tool("prometheus") else {
        return;
    };
    let mesh = TestMesh::start().await;
    mesh.apply(&format!(
        "{}---\n{}",
        observe_common::mesh("  tracing: {sampling: 0.0}"),
        services()
    ))
    .await
    .expect("apply");
    // reviews fails a fifth of its requests.
    let _reviews = tier(&mesh, "reviews", &[], |c| c.error_rate = 0.2).await;
    let _catalog = tier(&mesh, "catalog", &["http://reviews:8080/reviews"], |_| {}).await;
    let frontend = tier(&mesh, "frontend", &["http://catalog:8080/items"], |_| {}).await;
    for svc in ["catalog", "reviews", "frontend"] {
        mesh.wait_endpoints(svc, 1).await;
    }

    // Prometheus discovers the proxies with a read-only credential.
    let viewer = mesh.api_token(trellis_control::auth::Role::Viewer).await;
    let dir = mesh.dir.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
             scrape_configs:\n\
             - job_name: trellis-proxies\n  \
               http_sd_configs: [{{url: 'http://{}/api/v1/prometheus/targets', refresh_interval: 1s, \
               authorization: {{type: Bearer, credentials: '{}'}}}}]\n",
            mesh.http_addr,
            viewer,
        ),
    )
    .unwrap();
    let listen = trellis_testkit::free_addr();
    let child = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={listen}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus starts");
    let _prom = KillOnDrop(child);
    let prom = listen.to_string();

    // Every proxy is found and scraped, with the SD labels.
    let targets = eventually(
        "prometheus scrapes 3 proxies",
        Duration::from_secs(30),
        || async {
            let r = query(&prom, "up{job=\"trellis-proxies\"} == 1").await?;
            (r.len() == 3)
                .then_some(r.clone())
                .ok_or(format!("{} up: {r:?}", r.len()))
        },
    )
    .await;
    let mut workloads: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["metric"]["workload"].as_str())
        .collect();
    workloads.sort();
    assert_eq!(workloads, ["catalog", "frontend", "reviews"]);
    assert!(targets
        .iter()
        .all(|t| t["metric"]["namespace"] == "default"));

    let n = 300u64;
    let mut failed = 0u64;
    for _ in 0..n {
        let (status, answer) = get(&format!("http://{}/", frontend.app), &[]).await;
        assert_eq!(status, 200, "{answer}");
        let reviews_status = answer["calls"][0]["body"]["calls"][0]["status"]
            .as_u64()
            .unwrap_or(0);
        if reviews_status == 0 || reviews_status >= 500 {
            failed += 1;
        }
        // Spread over several scrapes (1s apart), so that rate() sees the
        // counters grow.
        tokio::time::sleep(Duration::from_millis(12)).await;
    }
    let count =
        "sum(trellis_requests_total{direction=\"inbound\",destination_service=\"catalog\"})";
    let got = eventually(
        "prometheus counts every request",
        Duration::from_secs(30),
        || async {
            let v = scalar(&query(&prom, count).await?).unwrap_or(0.0);
            (v >= n as f64).then_some(v).ok_or(format!("{v} of {n}"))
        },
    )
    .await;
    assert_eq!(got, n as f64, "{count}");

    let ratio_q = "sum(trellis_requests_total{direction=\"inbound\",destination_service=\"reviews\",status_code!~\"5..\"}) / sum(trellis_requests_total{direction=\"inbound\",destination_service=\"reviews\"})";
    let expected = (n - failed) as f64 / n as f64;
    let ratio = eventually(
        "the success ratio of reviews",
        Duration::from_secs(15),
        || async {
            let v = scalar(&query(&prom, ratio_q).await?).unwrap_or(-1.0);
            ((v - expected).abs() < 1e-9)
                .then_some(v)
                .ok_or(format!("{v}, expected {expected}"))
        },
    )
    .await;

    let p99_q = "histogram_quantile(0.99, sum by (le) (rate(trellis_request_duration_seconds_bucket{direction=\"inbound\",destination_service=\"catalog\"}[5m])))";
    let p99 = eventually("a p99", Duration::from_secs(15), || async {
        scalar(&query(&prom, p99_q).await?)
            .filter(|v| v.is_finite())
            .ok_or("none yet".to_string())
    })
    .await;
    assert!(p99 > 0.0 && p99 < 1.0, "p99 {p99}s");
    let stat = mesh.get_json("/api/v1/stat?kind=service&window=5m").await;
    let stat_p99 = stat["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "catalog")
        .and_then(|r| r["p99Ms"].as_f64())
        .unwrap();
    println!(
        "prometheus: count {got} (sent {n}), reviews success ratio {ratio:.4} (apps saw {expected:.4}), catalog p99 {:.2}ms (trellis stat p99 {stat_p99:.2}ms)",
        p99 * 1000.0
    );
}
