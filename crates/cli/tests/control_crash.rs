//! The control plane's store survives `kill -9`, even in the middle of
//! applies: a restart has every acknowledged resource and a readable store.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use trellis_testkit::{eventually, free_addr, http_request};

struct Control {
    child: Child,
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(
    data_dir: &std::path::Path,
    http: std::net::SocketAddr,
    grpc: std::net::SocketAddr,
) -> Control {
    let child = Command::new(env!("CARGO_BIN_EXE_trellis"))
        .args(["control", "--data-dir"])
        .arg(data_dir)
        .args([
            "--http-addr",
            &http.to_string(),
            "--grpc-addr",
            &grpc.to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("trellis control starts");
    Control { child }
}

fn service(i: usize) -> String {
    format!(
        r#"[{{"apiVersion":"trellis.dev/v1alpha1","kind":"Service","metadata":{{"name":"svc-{i}"}},"spec":{{"selector":{{"app":"svc-{i}"}},"ports":[{{"port":8080}}]}}}}]"#
    )
}

/// The bootstrap admin credential the control plane writes (0600) into
/// its data dir on first start.
fn bearer(data_dir: &std::path::Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(data_dir.join("admin-token"))?;
    Ok(format!("Bearer {}", token.trim()))
}

async fn apply(http: std::net::SocketAddr, auth: &str, body: String) -> anyhow::Result<StatusCode> {
    let resp = http_request(
        Method::POST,
        &format!("http://{http}/api/v1/apply"),
        &[
            ("content-type", "application/json"),
            ("authorization", auth),
        ],
        Bytes::from(body),
        None,
    )
    .await?;
    Ok(resp.status())
}

async fn names(
    http: std::net::SocketAddr,
    data_dir: &std::path::Path,
) -> anyhow::Result<Vec<String>> {
    let auth = bearer(data_dir)?;
    let resp = http_request(
        Method::GET,
        &format!("http://{http}/api/v1/resources/services"),
        &[("authorization", &auth)],
        Bytes::new(),
        None,
    )
    .await?;
    anyhow::ensure!(resp.status() == StatusCode::OK, "status {}", resp.status());
    let v: serde_json::Value = serde_json::from_slice(resp.body())?;
    Ok(v["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["metadata"]["name"].as_str().map(str::to_string))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_apply_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (http, grpc) = (free_addr(), free_addr());
    let mut control = start(dir.path(), http, grpc);
    let data_dir = dir.path().to_path_buf();
    eventually("the control plane answers", Duration::from_secs(20), || {
        names(http, &data_dir)
    })
    .await;
    let auth = bearer(dir.path()).unwrap();

    // Apply one service after another; kill -9 while they are still coming.
    let mut acknowledged = Vec::new();
    for i in 0..40 {
        assert_eq!(
            apply(http, &auth, service(i)).await.unwrap(),
            StatusCode::OK
        );
        acknowledged.push(format!("svc-{i}"));
    }
    // Keep applying from another task so the kill lands mid-stream.
    let writer_auth = auth.clone();
    let writer = tokio::spawn(async move {
        let mut more = Vec::new();
        for i in 40..400 {
            match apply(http, &writer_auth, service(i)).await {
                Ok(StatusCode::OK) => more.push(format!("svc-{i}")),
                _ => break,
            }
        }
        more
    });
    // Let a few of the concurrent applies land, then kill without warning.
    eventually(
        "some concurrent applies land",
        Duration::from_secs(20),
        || async {
            let n = names(http, &data_dir).await?.len();
            anyhow::ensure!(n >= 45, "{n} services");
            Ok(())
        },
    )
    .await;
    control.child.kill().expect("SIGKILL");
    control.child.wait().unwrap();
    acknowledged.extend(writer.await.unwrap());

    let _control = start(dir.path(), http, grpc);
    let after = eventually(
        "the restarted control plane answers",
        Duration::from_secs(20),
        || names(http, &data_dir),
    )
    .await;
    for name in &acknowledged {
        assert!(
            after.contains(name),
            "{name} was acknowledged before the kill but is gone"
        );
    }
    assert!(after.len() >= acknowledged.len());
    // And the store still takes writes.
    assert_eq!(
        apply(http, &auth, service(1000)).await.unwrap(),
        StatusCode::OK
    );
}
