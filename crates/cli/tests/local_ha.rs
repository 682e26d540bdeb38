//! `trellis up --control-replicas 3 --store etcd`: a local etcd cluster
//! and three control plane replicas on it, listed by `ps`; the sidecars
//! serve on when the replica they are connected to is killed; `down`
//! stops everything, etcd included. Needs etcd (`scripts/test-peers
//! etcd`); skips without it, except under CI=true.

mod common;

use std::process::Command;
use std::time::Duration;

use trellis_testkit::{eventually, try_http_get};

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo");

/// `trellis --data-dir DIR ARGS...` with `up`'s etcd; its stdout.
fn run(dir: &std::path::Path, etcd: &std::path::Path, args: &[&str]) -> String {
    common::ok_with(dir, args, &[("TRELLIS_ETCD", etcd)])
}

#[tokio::test(flavor = "multi_thread")]
async fn up_runs_control_replicas_on_a_local_etcd_cluster() {
    let Some(etcd) =
        trellis_testkit::etcd::binary("up_runs_control_replicas_on_a_local_etcd_cluster")
    else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _down = common::Down(dir);

    let up = run(
        dir,
        &etcd,
        &[
            "up",
            "-f",
            DEMO,
            "--mode",
            "process",
            "--detach",
            "--timeout",
            "90s",
            "--control-replicas",
            "3",
            "--store",
            "etcd",
        ],
    );
    assert!(
        up.trim_end()
            .ends_with("(3 replicas on a 3-member etcd cluster)"),
        "{up}"
    );

    let ps: serde_json::Value =
        serde_json::from_str(&run(dir, &etcd, &["ps", "-o", "json"])).unwrap();
    let procs = ps["processes"].as_array().unwrap();
    let role =
        |r: &str| -> Vec<&serde_json::Value> { procs.iter().filter(|p| p["role"] == r).collect() };
    assert_eq!(role("control").len(), 3, "{ps}");
    assert_eq!(role("etcd").len(), 3, "{ps}");
    assert!(procs.iter().all(|p| p["state"] == "running"), "{ps}");
    let frontend = procs
        .iter()
        .find(|p| p["role"] == "proxy" && p["workload"] == "frontend")
        .unwrap();
    let outbound = frontend["addresses"]["outbound"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let through_the_mesh = || async {
        let (status, body) = try_http_get("http://frontend:8080/", Some(outbound)).await?;
        let v: serde_json::Value = serde_json::from_slice(&body)?;
        anyhow::ensure!(
            status == 200 && v["calls"][0]["status"] == 200,
            "status {status}: {v}"
        );
        Ok(())
    };
    eventually(
        "frontend answers through the mesh",
        Duration::from_secs(30),
        through_the_mesh,
    )
    .await;

    // Every sidecar starts with the first replica: kill -9 it. They move
    // to another, and every request is still answered.
    let first = role("control")
        .into_iter()
        .find(|p| p["name"] == "control")
        .unwrap();
    let pid = first["pid"].as_u64().unwrap() as u32;
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    for i in 0..50 {
        through_the_mesh()
            .await
            .unwrap_or_else(|e| panic!("request {i} after the kill: {e}"));
    }
    let admin = frontend["addresses"]["admin"].as_str().unwrap();
    eventually(
        "frontend's sidecar is connected to another replica",
        Duration::from_secs(30),
        || async {
            let (_, body) = try_http_get(&format!("http://{admin}/config"), None).await?;
            let c: serde_json::Value = serde_json::from_slice(&body)?;
            let replica = c["controlPlane"]["replica"].as_str().unwrap_or_default();
            let grpc = first["addresses"]["grpc"].as_str().unwrap_or_default();
            anyhow::ensure!(
                c["controlPlane"]["connected"] == true && replica != grpc,
                "{}",
                c["controlPlane"]
            );
            Ok(())
        },
    )
    .await;
    through_the_mesh().await.unwrap();

    let pids: Vec<u32> = procs
        .iter()
        .map(|p| p["pid"].as_u64().unwrap() as u32)
        .collect();
    run(dir, &etcd, &["down"]);
    for pid in pids {
        assert!(
            !trellis_testkit::process::alive(pid),
            "pid {pid} still runs after down"
        );
    }
    assert!(!dir.join("etcd").exists(), "down removes etcd's data");
}
