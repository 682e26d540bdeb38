//! The dashboard: self-contained, safe by default, and showing services
//! and the service graph in a real browser (Debian's headless `chromium`).
//! Screenshots land in `target/screenshots/`.
//!
//! The browser test is skipped with a message where chromium is not
//! installed, and always runs under CI (scripts/test installs it).

mod observe_common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use observe_common::*;
use trellis_e2e::TestMesh;
use trellis_testkit::eventually;

async fn fetch(mesh: &TestMesh, path: &str, host: &str) -> (u16, http::HeaderMap, String) {
    let auth = mesh.auth_header();
    let resp = trellis_testkit::http_request(
        http::Method::GET,
        &format!("http://{}{path}", mesh.http_addr),
        &[("host", host), ("authorization", &auth)],
        bytes::Bytes::new(),
        None,
    )
    .await
    .unwrap();
    (
        resp.status().as_u16(),
        resp.headers().clone(),
        String::from_utf8_lossy(resp.body()).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_is_self_contained_and_refuses_foreign_hosts() {
    let mesh = TestMesh::start().await;
    let local = format!("127.0.0.1:{}", mesh.http_addr.port());
    for path in ["/", "/dashboard.js", "/dashboard.css"] {
        let (status, headers, body) = fetch(&mesh, path, &local).await;
        assert_eq!(status, 200, "{path}");
        let csp = headers["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'none'") && csp.contains("script-src 'self'"),
            "{csp}"
        );
        assert_eq!(headers["x-frame-options"], "DENY");
        assert_eq!(headers["x-content-type-options"], "nosniff");
        // Nothing is fetched from elsewhere: the only URL is the SVG namespace.
        let urls: Vec<&str> = body
            .match_indices("http")
            .map(|(i, _)| &body[i..(i + 30).min(body.len())])
            .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
            .filter(|u| !u.starts_with("http://www.w3.org/2000/svg"))
            .collect();
        assert!(urls.is_empty(), "{path} refers to {urls:?}");
    }
    // DNS rebinding: a foreign name is refused, for the page and for any
    // request, even one with a valid credential (names other than loopback
    // and the bound address must be listed with --http-host).
    let (status, _, _) = fetch(&mesh, "/", "evil.example").await;
    assert_eq!(status, 403);
    let (status, _, _) = fetch(&mesh, "/api/v1/services", "control.internal").await;
    assert_eq!(status, 403);
    let (status, _, _) = fetch(&mesh, "/api/v1/services", &local).await;
    assert_eq!(status, 200);
}

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir.canonicalize().unwrap()
}

/// Runs headless chromium on `url` with `extra` flags; returns stdout.
async fn chromium(bin: &PathBuf, url: &str, extra: &[String]) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
        "--window-size=1400,1000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .args(extra)
    .arg(url)
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finishes within 90s")
        .expect("chromium runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_services_and_the_graph_in_chromium() {
    let Some(bin) = tool("chromium") else { return };
    let mesh = TestMesh::start().await;
    let t = three_tier(&mesh, &observe_common::mesh("  tracing: {sampling: 1.0}")).await;
    // Traffic that keeps flowing while the browser looks.
    let url = format!("http://{}/", t.frontend.app);
    let load = tokio::spawn(async move {
        loop {
            let _ = get(&url, &[]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    eventually("stat sees traffic", Duration::from_secs(15), || async {
        let s = mesh.get_json("/api/v1/edges?window=1m").await;
        (s["edges"].as_array().map(|e| e.len()).unwrap_or(0) >= 2)
            .then_some(())
            .ok_or("no edges yet")
    })
    .await;

    // The browser logs in from the link's fragment, as `trellis demo`'s
    // link does, with a credential that can read but not write.
    let viewer = mesh.api_token(trellis_control::auth::Role::Viewer).await;
    let base = format!("http://127.0.0.1:{}/", mesh.http_addr.port());
    let unauthenticated = chromium(&bin, &base, &["--dump-dom".into()]).await;
    assert!(
        !unauthenticated.contains("data-service=\"frontend\"")
            && unauthenticated.contains("sign in needed"),
        "no data without a credential, and the page asks for one:\n{unauthenticated}"
    );
    let base = format!("{base}#token={viewer}");
    let dom = chromium(&bin, &base, &["--dump-dom".into()]).await;
    for service in ["frontend", "catalog", "reviews"] {
        assert!(
            dom.contains(&format!("data-service=\"{service}\"")),
            "the services table lists {service}:\n{dom}"
        );
    }
    assert!(dom.contains("<svg"), "the graph is drawn:\n{dom}");
    assert!(
        dom.contains("data-name=\"catalog\""),
        "catalog is in the graph"
    );
    assert!(
        dom.contains("data-from=\"default/frontend\" data-to=\"default/catalog\""),
        "the graph has the frontend → catalog edge:\n{dom}"
    );
    assert!(dom.contains("data-from=\"default/catalog\" data-to=\"default/reviews\""));
    assert!(!dom.contains("control plane unreachable"));

    let shots = screenshots();
    let overview = shots.join("dashboard.png");
    let service = shots.join("dashboard-service.png");
    let _ = std::fs::remove_file(&overview);
    let _ = std::fs::remove_file(&service);
    chromium(
        &bin,
        &base,
        &[format!("--screenshot={}", overview.display())],
    )
    .await;
    chromium(
        &bin,
        &format!("{base}&/service/default/catalog"),
        &[format!("--screenshot={}", service.display())],
    )
    .await;
    let dom = chromium(
        &bin,
        &format!("{base}&/service/default/catalog"),
        &["--dump-dom".into()],
    )
    .await;
    assert!(
        dom.contains("data-trace="),
        "the service page lists recent traces:\n{dom}"
    );
    for shot in [&overview, &service] {
        let size = std::fs::metadata(shot).map(|m| m.len()).unwrap_or(0);
        assert!(
            size > 10_000,
            "{} is a real screenshot ({size} bytes)",
            shot.display()
        );
        println!("screenshot: {}", shot.display());
    }
    load.abort();
}
