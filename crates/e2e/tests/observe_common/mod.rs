//! Shared by the observe_* tests: a three-tier mesh (frontend → catalog →
//! reviews) whose apps call each other through their sidecars, as real
//! apps with `HTTP_PROXY` do.
#![allow(dead_code)]

use std::net::SocketAddr;

use tokio::net::TcpListener;
use trellis::demo_app::{self, DemoAppConfig};
use trellis_e2e::{yaml, TestMesh};
use trellis_proxy::Proxy;

pub use trellis_e2e::yaml::mesh;

/// The three Services, `app: NAME` each, on port 8080.
pub fn services() -> String {
    ["frontend", "catalog", "reviews"]
        .map(yaml::service)
        .join("---\n")
}

pub struct Tier {
    pub proxy: Proxy,
    /// Where the app listens (callers outside the mesh can reach it).
    pub app: SocketAddr,
}

pub struct ThreeTier {
    pub frontend: Tier,
    pub catalog: Tier,
    pub reviews: Tier,
}

/// Starts `name`'s app (calling `calls` through its sidecar) and sidecar.
pub async fn tier(
    mesh: &TestMesh,
    name: &str,
    calls: &[&str],
    cfg: impl FnOnce(&mut DemoAppConfig),
) -> Tier {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let app = listener.local_addr().expect("addr");
    let proxy = mesh
        .sidecar(name, &[("app", name), ("version", "v1")], app.port())
        .await;
    let mut c = DemoAppConfig::new(name);
    c.version = "v1".into();
    c.instance = format!("{name}-0");
    c.calls = calls.iter().map(|s| s.to_string()).collect();
    c.http_proxy = format!("http://{}", proxy.outbound_addr);
    cfg(&mut c);
    tokio::spawn(async move {
        let _ = demo_app::serve(listener, c).await;
    });
    Tier { proxy, app }
}

/// frontend → catalog → reviews, with `mesh_yaml` applied first.
pub async fn three_tier(mesh: &TestMesh, mesh_yaml: &str) -> ThreeTier {
    mesh.apply(&format!("{mesh_yaml}---\n{}", services()))
        .await
        .expect("apply");
    let reviews = tier(mesh, "reviews", &[], |_| {}).await;
    let catalog = tier(mesh, "catalog", &["http://reviews:8080/reviews"], |_| {}).await;
    let frontend = tier(mesh, "frontend", &["http://catalog:8080/items"], |_| {}).await;
    for svc in ["catalog", "reviews", "frontend"] {
        mesh.wait_endpoints(svc, 1).await;
    }
    ThreeTier {
        frontend,
        catalog,
        reviews,
    }
}

/// GET `url` directly (not through a proxy) with extra headers.
pub async fn get(url: &str, headers: &[(&str, &str)]) -> (http::StatusCode, serde_json::Value) {
    let resp =
        trellis_testkit::http_request(http::Method::GET, url, headers, bytes::Bytes::new(), None)
            .await
            .expect("request");
    let body: serde_json::Value =
        serde_json::from_slice(resp.body()).unwrap_or(serde_json::Value::Null);
    (resp.status(), body)
}

/// Whether tests that need an installed tool must run: under CI they
/// must; elsewhere they skip with a message when it is missing.
pub fn tool(name: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        if trellis_testkit::process::in_ci() {
            panic!("{name} is not installed, and CI must run this test: scripts/test installs it (apt-get install {name})");
        }
        eprintln!("SKIPPED: {name} is not installed (scripts/test installs it as root; CI always runs this test)");
    }
    found
}

/// The app's JSON answer holds the headers it got, and its calls' answers.
pub fn header<'a>(answer: &'a serde_json::Value, name: &str) -> Option<&'a str> {
    answer["headers"][name].as_str()
}
