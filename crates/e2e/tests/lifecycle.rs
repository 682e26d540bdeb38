//! Endpoints coming and going, graceful shutdown, upgrades, and the
//! figures behind `trellis stat`.

mod traffic_common;

use std::time::Duration;

use http::StatusCode;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use traffic_common::App;
use trellis::demo_app::DemoAppConfig;
use trellis_e2e::yaml::service;
use trellis_e2e::{demo_app, instance_of, run_app, wait_proxy_endpoints, ProxyClient, TestMesh};
use trellis_testkit::eventually;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_leaves_when_its_proxy_stops() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.unwrap();
    let (p0, _a0) = demo_app("catalog", "v1", "catalog-0").await;
    let (p1, _a1) = demo_app("catalog", "v1", "catalog-1").await;
    let c0 = mesh.sidecar("catalog-0", &[("app", "catalog")], p0).await;
    let c1 = mesh.sidecar("catalog-1", &[("app", "catalog")], p1).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 2).await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client.get("http://catalog:8080/").await.unwrap();
    assert_eq!(status, StatusCode::OK);

    c0.shutdown().await;
    mesh.wait_endpoints("catalog", 1).await;
    // The caller's proxy learns it too: every request now lands on catalog-1.
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 1).await;
    for _ in 0..100 {
        let (status, body) = client.get("http://catalog:8080/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        assert_eq!(instance_of(&body), "catalog-1");
    }
    drop(c1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_requests_in_flight() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.unwrap();
    // The app holds the request until the test lets it go; the grace
    // period is far longer than this test may take.
    let app = App::start("catalog-slow").await;
    app.hold();
    let mut cfg = mesh.proxy_config("catalog-0", &[("app", "catalog")], app.port);
    cfg.drain_grace = Duration::from_secs(600);
    let catalog = trellis_proxy::Proxy::start(cfg)
        .await
        .expect("proxy starts");
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    let outbound = frontend.outbound_addr;
    let request =
        tokio::spawn(async move { ProxyClient::new(outbound).get("http://catalog:8080/").await });
    trellis_testkit::assert_eventually!(
        catalog.in_flight() == 1 && app.in_flight() == 1,
        "the request never reached the catalog app"
    );
    let inbound = catalog.inbound_addr;
    let shutdown = tokio::spawn(catalog.shutdown());
    // The listener closes at once: nothing new is accepted...
    trellis_testkit::assert_eventually!(tokio::net::TcpStream::connect(inbound).await.is_err());
    // ...while the request in flight keeps shutdown waiting.
    assert!(!shutdown.is_finished(), "shutdown left a request in flight");
    app.release();
    let (status, body) = request
        .await
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    // Shutdown ends with the request, not with the 600s grace period.
    tokio::time::timeout(trellis_e2e::CONVERGE, shutdown)
        .await
        .expect("shutdown ends once no request is in flight")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrades_pass_through() {
    let mesh = TestMesh::start().await;
    mesh.apply(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: chat}
spec:
  selector: {app: chat}
  ports: [{port: 80}]
"#,
    )
    .await
    .unwrap();
    // A server that answers an Upgrade with 101, then echoes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut s = BufReader::new(s);
                let mut upgrade = false;
                loop {
                    let mut line = String::new();
                    if s.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    upgrade |= line.to_ascii_lowercase().starts_with("upgrade: websocket");
                    if line == "\r\n" {
                        break;
                    }
                }
                if !upgrade {
                    let _ = s
                        .get_mut()
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = s
                    .get_mut()
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 256];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            let _ = s.get_mut().write_all(&buf[..n]).await;
                        }
                    }
                }
            });
        }
    });
    let _chat = mesh.sidecar("chat", &[("app", "chat")], port).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("chat", 1).await;

    let mut s = tokio::net::TcpStream::connect(frontend.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"GET http://chat/socket HTTP/1.1\r\nhost: chat\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n")
        .await
        .unwrap();
    let mut reader = BufReader::new(s);
    let mut status = String::new();
    tokio::time::timeout(Duration::from_secs(10), reader.read_line(&mut status))
        .await
        .expect("an answer")
        .unwrap();
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut s = reader.into_inner();
    for msg in [&b"ping"[..], b"frames both ways"] {
        s.write_all(msg).await.unwrap();
        let mut got = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got))
            .await
            .expect("echo")
            .unwrap();
        assert_eq!(got, msg);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_figures_match_the_traffic_sent() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.unwrap();
    let mut flaky = DemoAppConfig::new("catalog");
    flaky.instance = "catalog-0".into();
    flaky.error_rate = 0.25;
    let (port, _app) = run_app(flaky).await;
    let _catalog = mesh.sidecar("catalog-0", &[("app", "catalog")], port).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let mut failures = 0;
    for _ in 0..400 {
        let (status, _) = client.get("http://catalog:8080/").await.unwrap();
        if status.is_server_error() {
            failures += 1;
        }
    }
    let row = eventually(
        "stat counts all 400 requests",
        Duration::from_secs(15),
        || async {
            let stat = mesh.get_json("/api/v1/stat?kind=service&window=5m").await;
            let row = stat["rows"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["name"] == "catalog"))
                .cloned()
                .ok_or("no catalog row".to_string())?;
            (row["requests"].as_f64() == Some(400.0))
                .then_some(row.clone())
                .ok_or(format!("{row}"))
        },
    )
    .await;
    let success = row["successRate"].as_f64().unwrap();
    let expected = 1.0 - failures as f64 / 400.0;
    assert!(
        (success - expected).abs() < 1e-9,
        "success {success}, sent {expected}"
    );
    assert!(row["p50Ms"].as_f64().unwrap() > 0.0, "{row}");
    assert!(
        row["p99Ms"].as_f64().unwrap() >= row["p50Ms"].as_f64().unwrap(),
        "{row}"
    );
    assert!(row["rps"].as_f64().unwrap() > 0.0, "{row}");
}
