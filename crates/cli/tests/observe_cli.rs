//! `trellis trace list|show -o json`, `edges` and `tap` against a real
//! control plane: the JSON that scripts rely on, with a viewer credential
//! from `TRELLIS_TOKEN`, and tap's refusal without a tap credential.

use std::process::Command;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use trellis_control::{ControlConfig, ControlPlane};

const BIN: &str = env!("CARGO_BIN_EXE_trellis");

fn span(id: u8, parent: Option<u8>, start: u64) -> Span {
    Span {
        trace_id: vec![0xab; 16],
        span_id: vec![id; 8],
        parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
        name: format!("GET s{id}"),
        kind: 2,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 2_000_000,
        ..Default::default()
    }
}

/// Runs the CLI against `server`, with `token` in `TRELLIS_TOKEN` (or none).
fn trellis(server: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(BIN);
    match token {
        Some(t) => cmd.env("TRELLIS_TOKEN", t),
        None => cmd.env_remove("TRELLIS_TOKEN"),
    };
    let out = cmd
        .args(args)
        .args(["--server", server])
        .env("TRELLIS_SERVER", server)
        .current_dir(std::env::temp_dir())
        .output()
        .expect("trellis runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A control plane on loopback, its HTTP API's URL, and a viewer token.
async fn control_with_viewer(dir: &tempfile::TempDir) -> (ControlPlane, String, String) {
    let mut cfg = ControlConfig::new(dir.path().join("control"));
    cfg.http_addr = ([127, 0, 0, 1], 0).into();
    cfg.grpc_addr = ([127, 0, 0, 1], 0).into();
    let control = ControlPlane::start(cfg)
        .await
        .expect("control plane starts");
    let server = format!("http://{}", control.http_addr);
    let (viewer, _) = control
        .auth()
        .create(trellis_control::auth::Role::Viewer, None, "test")
        .await
        .unwrap();
    (control, server, viewer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_edges_and_tap_commands() {
    let dir = tempfile::tempdir().unwrap();
    let (control, server, viewer) = control_with_viewer(&dir).await;
    // Leaked: the closures below run on blocking threads and need 'static.
    let viewer = &*Box::leak(viewer.into_boxed_str());

    // Spans from an app, over OTLP/HTTP.
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![KeyValue {
                    key: "service.name".into(),
                    value: Some(AnyValue {
                        value: Some(any_value::Value::StringValue("shop".into())),
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span(1, None, 1_000), span(2, Some(1), 2_000)],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let resp = trellis_testkit::http_request(
        http::Method::POST,
        &format!("{server}/v1/traces"),
        &[
            ("content-type", "application/x-protobuf"),
            (
                "authorization",
                &format!("Bearer {}", control.admin_token()),
            ),
        ],
        req.encode_to_vec().into(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);

    let server2 = server.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        trellis(&server2, Some(viewer), &["trace", "list", "-o", "json"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = "ab".repeat(16);
    assert_eq!(v["traces"][0]["traceId"], id, "{v}");
    assert_eq!(v["traces"][0]["rootService"], "shop");

    let server2 = server.clone();
    let id2 = id.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        trellis(
            &server2,
            Some(viewer),
            &["trace", "show", &id2, "-o", "json"],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let spans = v["spans"].as_array().unwrap();
    assert_eq!(spans.len(), 2);
    assert_eq!(spans[0]["spanId"], "01".repeat(8));
    assert_eq!(spans[0]["parentSpanId"], "");
    assert_eq!(spans[1]["parentSpanId"], "01".repeat(8));

    let server2 = server.clone();
    let (ok, out, _) = tokio::task::spawn_blocking(move || {
        trellis(&server2, Some(viewer), &["trace", "show", &id])
    })
    .await
    .unwrap();
    assert!(ok);
    assert!(
        out.contains("\n  GET s2"),
        "the child is indented under its parent:\n{out}"
    );

    let server2 = server.clone();
    let (ok, out, err) = tokio::task::spawn_blocking(move || {
        trellis(&server2, Some(viewer), &["edges", "-o", "json"])
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v["edges"].is_array());

    // No credential: refused, saying what to do.
    let server2 = server.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        trellis(
            &server2,
            None,
            &["--data-dir", "/nonexistent", "tap", "--duration", "1s"],
        )
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(
        err.contains("needs a credential") && err.contains("trellis token create"),
        "{err}"
    );
    // A viewer may read, not tap.
    let server2 = server.clone();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        trellis(&server2, Some(viewer), &["tap", "--duration", "1s"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("needs the tap role"), "{err}");
    // A wrong token in --token-file (which wins over TRELLIS_TOKEN): refused.
    let bad = dir.path().join("bad-token");
    std::fs::write(&bad, "nope").unwrap();
    let server2 = server.clone();
    let bad2 = bad.display().to_string();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        trellis(
            &server2,
            Some(viewer),
            &["tap", "--token-file", &bad2, "--duration", "1s"],
        )
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(err.contains("not a Trellis API token"), "{err}");
    control.shutdown().await;
}

/// `trellis dashboard`: the page on loopback, its API relayed with the
/// CLI's credential once the browser shows the link's secret; other
/// Hosts (DNS rebinding) and requests without the secret are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_relays_with_the_clis_credential_behind_the_links_secret() {
    use std::io::BufRead as _;
    let dir = tempfile::tempdir().unwrap();
    let (control, server, viewer) = control_with_viewer(&dir).await;
    let mut child = Command::new(BIN)
        .args(["dashboard", "--server", &server])
        .env("TRELLIS_TOKEN", &viewer)
        .current_dir(std::env::temp_dir())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("trellis dashboard runs");
    let stdout = child.stdout.take().unwrap();
    let link = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|l| l.contains("#token="))
    })
    .await
    .unwrap()
    .expect("the dashboard prints its link");
    let (base, secret) = link.trim().split_once("/#token=").unwrap();
    assert!(base.starts_with("http://127.0.0.1:"), "{link}");
    let get = |path: &str, headers: Vec<(&'static str, String)>| {
        let url = format!("{base}{path}");
        async move {
            let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
            trellis_testkit::http_request(http::Method::GET, &url, &h, Default::default(), None)
                .await
                .unwrap()
        }
    };
    let bearer = || vec![("authorization", format!("Bearer {secret}"))];

    let page = get("/", vec![]).await;
    assert_eq!(page.status(), 200);
    assert!(String::from_utf8_lossy(page.body()).contains("dashboard.js"));
    let csp = page.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");

    assert_eq!(get("/api/v1/services", vec![]).await.status(), 401);
    let wrong = vec![("authorization", format!("Bearer {}", viewer))];
    assert_eq!(get("/api/v1/services", wrong).await.status(), 401);
    let mut rebound = bearer();
    rebound.push(("host", "evil.example:80".to_string()));
    assert_eq!(get("/api/v1/services", rebound).await.status(), 403);

    let stat = get("/api/v1/stat?kind=service&window=30s", bearer()).await;
    assert_eq!(stat.status(), 200);
    let v: serde_json::Value = serde_json::from_slice(stat.body()).unwrap();
    assert!(v["rows"].is_array(), "{v}");
    // The control plane's own errors come through with their status.
    let missing = get(&format!("/api/v1/traces/{}", "cd".repeat(16)), bearer()).await;
    assert_eq!(missing.status(), 404);
    // Only the routes the page reads are relayed: no writes, no tokens.
    assert_eq!(get("/api/v1/tokens", bearer()).await.status(), 404);
    // The viewer credential cannot tap: the control plane's refusal.
    assert_eq!(get("/api/v1/tap", bearer()).await.status(), 403);

    let _ = child.kill();
    let _ = child.wait();
    control.shutdown().await;
}
