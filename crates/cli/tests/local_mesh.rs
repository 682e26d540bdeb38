//! The real `trellis` binary running a local mesh in process mode: `up
//! --detach`, traffic through a sidecar, the API commands against it, `ps`,
//! `exec`, then `down`, and that nothing is left running.

mod common;

use std::time::Duration;

use common::{ok, text, trellis, Down, BIN};
use trellis_testkit::{eventually, try_http_get};

const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/demo");

fn alive(pid: u64) -> bool {
    trellis_testkit::process::alive(pid as u32)
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_traffic_then_down_stops_everything() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _down = Down(dir);

    let up = ok(
        dir,
        &[
            "up",
            "-f",
            DEMO,
            "--mode",
            "process",
            "--detach",
            "--timeout",
            "90s",
        ],
    );
    assert!(
        up.starts_with("ready: 4 workloads, 5 replicas; control plane http://127.0.0.1:"),
        "{up}"
    );

    let ps: serde_json::Value = serde_json::from_str(&ok(dir, &["ps", "-o", "json"])).unwrap();
    let procs = ps["processes"].as_array().unwrap();
    assert_eq!(
        procs.len(),
        1 + 2 * 5,
        "the control plane, and an app and a proxy per replica"
    );
    for p in procs {
        assert_eq!(p["state"], "running", "{p}");
    }
    let pids: Vec<u64> = procs.iter().map(|p| p["pid"].as_u64().unwrap()).collect();
    assert!(pids.iter().all(|&p| alive(p)));
    let frontend_proxy = procs
        .iter()
        .find(|p| p["role"] == "proxy" && p["workload"] == "frontend")
        .unwrap();
    let outbound = frontend_proxy["addresses"]["outbound"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    // frontend -> catalog (v1 or v2) -> reviews, each hop through sidecars.
    let answer: serde_json::Value = eventually(
        "frontend answers through the mesh",
        Duration::from_secs(30),
        || async {
            let (status, body) = try_http_get("http://frontend:8080/", Some(outbound)).await?;
            anyhow::ensure!(
                status == 200,
                "status {status}: {}",
                String::from_utf8_lossy(&body)
            );
            let v: serde_json::Value = serde_json::from_slice(&body)?;
            let catalog = &v["calls"][0];
            anyhow::ensure!(catalog["status"] == 200, "catalog call: {catalog}");
            anyhow::ensure!(
                catalog["body"]["calls"][0]["status"] == 200,
                "reviews call: {catalog}"
            );
            Ok(v)
        },
    )
    .await;
    assert_eq!(answer["service"], "frontend");
    assert_eq!(answer["instance"], "frontend-0");
    assert_eq!(answer["calls"][0]["body"]["service"], "catalog");
    assert_eq!(
        answer["calls"][0]["body"]["calls"][0]["body"]["service"],
        "reviews"
    );

    // The API commands find the control plane through run.json.
    let services = ok(dir, &["get", "svc"]);
    assert!(services.starts_with("NAMESPACE"), "{services}");
    assert!(services.contains("catalog-v2"), "{services}");
    let route = ok(dir, &["get", "route", "catalog-split", "-o", "json"]);
    let route: serde_json::Value = serde_json::from_str(&route).unwrap();
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][1]["weight"], 10);
    let described = ok(dir, &["describe", "svc", "reviews"]);
    assert!(described.contains("Endpoints (2):"), "{described}");
    let check = ok(dir, &["check"]);
    assert!(
        check.contains("✔ control plane") && !check.contains('✘'),
        "{check}"
    );
    ok(dir, &["stat", "-o", "json"]);

    // exec runs a command behind a replica's sidecar.
    let env = ok(
        dir,
        &["exec", "reviews/1", "--", "sh", "-c", "echo $HTTP_PROXY"],
    );
    let reviews_1 = procs
        .iter()
        .find(|p| p["role"] == "proxy" && p["workload"] == "reviews" && p["replica"] == 1)
        .unwrap();
    assert_eq!(
        env.trim(),
        format!(
            "http://{}",
            reviews_1["addresses"]["outbound"].as_str().unwrap()
        )
    );
    let status = trellis(dir, &["exec", "frontend", "--", "sh", "-c", "exit 7"]).status;
    assert_eq!(status.code(), Some(7));
    let missing = trellis(dir, &["exec", "reviews/3", "--", "true"]);
    assert!(text(&missing.stderr).contains("workload reviews has no replica 3"));

    // A second `up` on the same folder is refused.
    let again = trellis(dir, &["up", "-f", DEMO, "--mode", "process", "--detach"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("trellis down"),
        "{}",
        text(&again.stderr)
    );

    let down = ok(dir, &["down"]);
    assert!(down.starts_with("stopped 11 processes"), "{down}");
    for &pid in &pids {
        assert!(!alive(pid), "pid {pid} still runs after down");
    }
    assert!(!dir.join("run.json").exists());
    assert!(ok(dir, &["down"]).starts_with("nothing to stop"));
    let ps = ok(dir, &["ps", "-o", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&ps).unwrap()["processes"],
        serde_json::json!([])
    );
}

#[test]
fn a_failing_app_fails_up_and_leaves_nothing_running() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let _down = Down(dir);
    let file = dir.join("broken.yaml");
    std::fs::write(
        &file,
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: broken}
spec:
  command: [sh, -c, "echo cannot open the database; exit 3"]
"#,
    )
    .unwrap();
    let out = trellis(
        dir,
        &[
            "up",
            "-f",
            file.to_str().unwrap(),
            "--mode",
            "process",
            "--detach",
            "--timeout",
            "60s",
        ],
    );
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("broken-0 exited during start-up (exit status: 3)"),
        "{err}"
    );
    assert!(err.contains("cannot open the database"), "{err}");
    assert!(!dir.join("run.json").exists(), "a failed up cleans up");
}

#[test]
fn commands_without_a_mesh_say_what_to_do() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let out = trellis(dir, &["exec", "web", "--", "true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("no mesh is running here"),
        "{}",
        text(&out.stderr)
    );
    assert!(ok(dir, &["down"]).starts_with("nothing to stop"));

    // Pods mode refuses a bad subnet (as root) or says it needs root.
    let pods = trellis(
        dir,
        &["up", "-f", DEMO, "--mode", "pods", "--subnet", "nonsense"],
    );
    assert!(!pods.status.success());
    let err = text(&pods.stderr);
    assert!(
        err.contains("--subnet \"nonsense\"")
            || err.contains("--subnet nonsense")
            || err.contains("needs root"),
        "{err}"
    );

    let token = trellis(
        dir,
        &[
            "token",
            "create",
            "--namespace",
            "default",
            "--service-account",
            "web",
        ],
    );
    // Tokens come from a control plane; without one the CLI says how to get one.
    assert!(!token.status.success());
    assert!(
        text(&token.stderr).contains("trellis up") || text(&token.stderr).contains("--server"),
        "{}",
        text(&token.stderr)
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: x}]\n",
    )
    .unwrap();
    let out = trellis(
        dir,
        &[
            "apply",
            "-f",
            bad.to_str().unwrap(),
            "--server",
            "http://127.0.0.1:1",
        ],
    );
    let err = text(&out.stderr);
    assert!(
        err.contains("bad.yaml") && err.contains("spec.ports[0].port"),
        "{err}"
    );
}

#[test]
fn demo_runs_with_load_and_cleans_up() {
    let child = std::process::Command::new(BIN)
        .args(["demo", "--duration", "5s"])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running trellis demo");
    let data_dir = std::env::temp_dir().join(format!("trellis-demo-{}", child.id()));
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.starts_with("ready: 4 workloads, 5 replicas"),
        "{stdout}"
    );
    // The hints find the demo's control plane and its credential.
    assert!(
        stdout.contains(&format!("trellis stat --data-dir {}", data_dir.display())),
        "{stdout}"
    );
    // The dashboard link logs the browser in, in the fragment.
    assert!(stdout.contains("/#token=trellis-api."), "{stdout}");
    // The last redraw shows traffic on every service, all of it served.
    let last = stdout.rsplit("NAME ").next().unwrap();
    for service in ["frontend", "catalog", "catalog-v1", "reviews"] {
        assert!(
            last.lines().any(|l| l.starts_with(service)),
            "{service} missing:\n{stdout}"
        );
    }
    let load = stdout.lines().rfind(|l| l.starts_with("load: ")).unwrap();
    assert!(
        load.ends_with(" 0 failed") && !load.contains(" 0 ok"),
        "{load}"
    );
    assert!(!data_dir.exists(), "the demo removes its folder");
}
