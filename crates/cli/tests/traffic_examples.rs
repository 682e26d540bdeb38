//! The traffic examples: every one is a valid mesh, and the resilience
//! example, run by the real binary, keeps every call up while one instance
//! fails.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{ok, Down};
use trellis_testkit::{eventually, try_http_get};

const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/traffic");

fn examples() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(EXAMPLES)
        .expect("examples/traffic")
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn every_traffic_example_is_a_valid_mesh_with_a_readme() {
    let dirs = examples();
    assert!(dirs.len() >= 5, "{dirs:?}");
    for dir in dirs {
        let (resources, sources): (Vec<_>, Vec<_>) = trellis_resource::load_path_with_sources(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .into_iter()
            .unzip();
        if let Err(e) = trellis_resource::validate_apply::<trellis_resource::Resource>(
            &resources,
            &sources,
            &[],
        ) {
            panic!("{}: {e}", dir.display());
        }
        assert!(
            resources
                .iter()
                .any(|r| r.kind() == trellis_resource::Kind::Workload),
            "{} runs nothing",
            dir.display()
        );
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        assert!(
            readme.contains(&format!("trellis up -f examples/traffic/{name}")),
            "{name}/README.md says how to run it"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_resilience_example_keeps_every_call_up_with_a_broken_instance() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _down = Down(dir);
    let example = format!("{EXAMPLES}/resilience");
    let up = ok(
        dir,
        &[
            "up",
            "-f",
            &example,
            "--mode",
            "process",
            "--detach",
            "--timeout",
            "90s",
        ],
    );
    assert!(up.starts_with("ready: 3 workloads, 5 replicas"), "{up}");
    let ps: serde_json::Value = serde_json::from_str(&ok(dir, &["ps", "-o", "json"])).unwrap();
    let outbound = ps["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "proxy" && p["workload"] == "frontend")
        .and_then(|p| p["addresses"]["outbound"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    eventually(
        "catalog answers through frontend's proxy",
        Duration::from_secs(30),
        || async {
            let (status, _) = try_http_get("http://catalog:8080/", Some(outbound)).await?;
            anyhow::ensure!(status == 200, "status {status}");
            Ok(())
        },
    )
    .await;
    let mut failed = 0;
    for _ in 0..200 {
        let (status, _) = try_http_get("http://catalog:8080/", Some(outbound))
            .await
            .unwrap();
        if status != 200 {
            failed += 1;
        }
    }
    assert_eq!(failed, 0, "calls failed despite retries and ejection");
    // Peak-EWMA already avoids the instance after its first failure; health
    // checks (every 2s, 3 failures) take it out soon after.
    eventually(
        "the broken instance is taken out",
        Duration::from_secs(30),
        || async {
            let rows: serde_json::Value =
                serde_json::from_str(&ok(dir, &["stat", "--traffic", "-o", "json"]))?;
            let catalog = rows
                .as_array()
                .and_then(|a| a.iter().find(|r| r["service"] == "catalog").cloned())
                .unwrap_or_default();
            let out = catalog["ejections"].as_f64().unwrap_or(0.0)
                + catalog["healthCheckFailures"].as_f64().unwrap_or(0.0);
            anyhow::ensure!(out >= 3.0, "not yet: {catalog}");
            Ok(())
        },
    )
    .await;
    for _ in 0..100 {
        let (status, _) = try_http_get("http://catalog:8080/", Some(outbound))
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    let table = ok(dir, &["stat", "--traffic"]);
    assert!(table.starts_with("SERVICE"), "{table}");
    println!("{table}");
}
