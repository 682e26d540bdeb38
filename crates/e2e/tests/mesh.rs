//! Whole-mesh behaviour on loopback: control plane, sidecars and demo apps
//! in this process.

use std::collections::HashMap;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_e2e::yaml::service;
use trellis_e2e::{
    admin_config, demo_app, instance_of, metric_sum, wait_config, ProxyClient, TestMesh,
};

const ROUND_ROBIN_CATALOG: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: catalog
  annotations: {trellis.dev/load-balancer: round-robin}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 8080}]
"#;

const SPLIT: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec:
  selector: {app: catalog, version: v1}
  ports: [{port: 8080}]
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec:
  selector: {app: catalog, version: v2}
  ports: [{port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-split}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
  - backendRefs:
    - {name: catalog-v1, port: 8080, weight: 90}
    - {name: catalog-v2, port: 8080, weight: 10}
"#;

/// Starts `n` catalog replicas with sidecars; returns the sidecars.
async fn catalog_replicas(mesh: &TestMesh, version: &str, n: usize) -> Vec<trellis_proxy::Proxy> {
    let mut proxies = Vec::new();
    for i in 0..n {
        let instance = format!("catalog-{version}-{i}");
        let (port, _app) = demo_app("catalog", version, &instance).await;
        proxies.push(
            mesh.sidecar(&instance, &[("app", "catalog"), ("version", version)], port)
                .await,
        );
    }
    proxies
}

/// Sends `n` GETs of `url` and asserts each is answered 200.
async fn all_ok(client: &mut ProxyClient, url: &str, n: usize) {
    for i in 0..n {
        let (status, body) = client.get(url).await.unwrap();
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, StatusCode::OK, "request {i} of {url}: {body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_reach_the_app_through_both_sidecars() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let catalog = catalog_replicas(&mesh, "v1", 1).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, body) = client.get("http://catalog:8080/items?x=1").await.unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(answer["service"], "catalog");
    assert_eq!(answer["path"], "/items");
    // The app sees the Host its caller used, and no internal header.
    let headers = answer["headers"].as_object().unwrap();
    assert_eq!(
        headers.get("host").and_then(|h| h.as_str()),
        Some("catalog:8080")
    );
    // The app learns the caller's verified identity, and nothing else of the mesh's.
    assert_eq!(
        headers
            .get("x-trellis-peer-identity")
            .and_then(|h| h.as_str()),
        Some("spiffe://trellis.local/ns/default/sa/frontend")
    );
    assert!(
        headers
            .keys()
            .all(|k| !k.starts_with("x-trellis") || k == "x-trellis-peer-identity"),
        "{headers:?}"
    );

    // Every authority form names the same service.
    for url in [
        "http://catalog.default:8080/",
        "http://catalog.default.svc.trellis.local:8080/",
    ] {
        let (status, _) = client.get(url).await.unwrap();
        assert_eq!(status, StatusCode::OK, "{url}");
    }

    // Both sidecars counted the requests.
    let out = metric_sum(
        frontend.admin_addr,
        "trellis_requests_total",
        &[
            ("direction", "outbound"),
            ("destination_service", "catalog"),
            ("status_code", "200"),
        ],
    )
    .await;
    assert_eq!(out, 3.0);
    let inbound = metric_sum(
        catalog[0].admin_addr,
        "trellis_requests_total",
        &[
            ("direction", "inbound"),
            ("source_workload", "frontend"),
            ("status_code", "200"),
        ],
    )
    .await;
    assert_eq!(inbound, 3.0);

    // A name that is not a service gets a clear 503, and the proxy lives on.
    let (status, body) = client.get("http://nosuch:8080/").await.unwrap();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(String::from_utf8_lossy(&body).contains("no service default/nosuch"));
    let (status, _) = client.get("http://catalog:8080/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_over_three_replicas() {
    let mesh = TestMesh::start().await;
    mesh.apply(ROUND_ROBIN_CATALOG).await.expect("apply");
    let _catalog = catalog_replicas(&mesh, "v1", 3).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 3).await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        let (status, body) = client.get("http://catalog:8080/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        *counts.entry(instance_of(&body)).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (instance, n) in &counts {
        assert!(
            (60..=141).contains(n),
            "{instance} got {n} of 300 (want 20-47%): {counts:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_split_lands_within_four_percent() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    mesh.apply(SPLIT).await.expect("apply split");
    let _v1 = catalog_replicas(&mesh, "v1", 1).await;
    let _v2 = catalog_replicas(&mesh, "v2", 1).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog-v1", 1).await;
    mesh.wait_endpoints("catalog-v2", 1).await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let mut v2 = 0;
    for _ in 0..2000 {
        let (status, body) = client.get("http://catalog:8080/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if answer["version"] == "v2" {
            v2 += 1;
        }
    }
    let share = v2 as f64 / 2000.0;
    assert!(
        (0.06..=0.14).contains(&share),
        "v2 got {share:.3} of traffic, want 0.10 ± 0.04"
    );
    let routed = metric_sum(
        frontend.admin_addr,
        "trellis_requests_total",
        &[("route", "catalog-split")],
    )
    .await;
    assert_eq!(routed, 2000.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_serves_while_the_control_plane_is_down() {
    let mut mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let _catalog = catalog_replicas(&mesh, "v1", 2).await;
    let (fport, _f) = demo_app("frontend", "v1", "frontend-0").await;
    let frontend = mesh
        .sidecar("frontend", &[("app", "frontend")], fport)
        .await;
    mesh.wait_endpoints("catalog", 2).await;
    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client.get("http://catalog:8080/").await.unwrap();
    assert_eq!(status, StatusCode::OK);

    mesh.stop_control().await;
    all_ok(&mut client, "http://catalog:8080/", 200).await;

    // A proxy restarted meanwhile starts from its cache and serves.
    frontend.shutdown().await;
    let cfg = mesh.proxy_config("frontend", &[("app", "frontend")], fport);
    let restarted = trellis_proxy::Proxy::start(cfg)
        .await
        .expect("starts from its cache");
    let mut client = ProxyClient::new(restarted.outbound_addr);
    all_ok(&mut client, "http://catalog:8080/", 50).await;

    // The control plane comes back and the proxy catches up with a change.
    mesh.restart_control().await;
    let before = admin_config(restarted.admin_addr).await.unwrap()["version"]
        .as_u64()
        .unwrap();
    mesh.apply(SPLIT).await.expect("apply split");
    wait_config(
        restarted.admin_addr,
        "the restarted proxy gets the route applied after the control plane came back",
        |v| {
            v["version"].as_u64().unwrap() > before
                && v["services"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|s| s["name"] == "catalog-v1")
        },
    )
    .await;
}

#[tokio::test]
async fn a_proxy_without_control_plane_or_cache_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let unused = trellis_testkit::free_addr();
    let mut cfg = trellis_proxy::ProxyConfig::new(unused.to_string(), "lonely", 1);
    cfg.inbound_addr = ([127, 0, 0, 1], 0).into();
    cfg.outbound_addr = ([127, 0, 0, 1], 0).into();
    cfg.admin_addr = ([127, 0, 0, 1], 0).into();
    cfg.cache_dir = Some(dir.path().to_path_buf());
    let err = match trellis_proxy::Proxy::start_with_timeout(cfg, Duration::from_secs(1)).await {
        Ok(_) => panic!("a proxy with nothing to serve must not start"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("cannot reach the control plane"), "{err}");
    assert!(err.contains("no cached config"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_apply_leaves_the_running_config_serving() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let _catalog = catalog_replicas(&mesh, "v1", 1).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    // A route to a service that does not exist, and a misspelt field.
    let bad = SPLIT.replace("name: catalog-v2, port", "name: catalog-v9, port");
    let err = mesh
        .apply(&bad)
        .await
        .expect_err("a route to a missing service is refused");
    assert!(err.contains("catalog-v9"), "{err}");
    let typo = service("catalog").replace("selector:", "selectr:");
    let err = mesh
        .apply(&typo)
        .await
        .expect_err("a misspelt field is refused");
    assert!(err.contains("selectr"), "{err}");

    // Nothing of the refused applies took effect: catalog-v1 (in the same
    // apply as the bad route) does not exist and catalog still routes.
    let services = mesh.get_json("/api/v1/resources/services").await;
    let names: Vec<_> = services["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["metadata"]["name"].clone())
        .collect();
    assert_eq!(names, vec![serde_json::json!("catalog")]);
    let mut client = ProxyClient::new(frontend.outbound_addr);
    for _ in 0..20 {
        let (status, _) = client.get("http://catalog:8080/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tcp_echoes_through_an_upstream_listener() {
    let mesh = TestMesh::start().await;
    mesh.apply(
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: echo}
spec:
  selector: {app: echo}
  ports: [{port: 7000, protocol: tcp}]
"#,
    )
    .await
    .expect("apply");
    // A server-speaks-first echo server: greets, then echoes each line.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                s.write_all(b"220 echo ready\r\n").await.unwrap();
                let mut buf = [0u8; 1024];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => s.write_all(&buf[..n]).await.unwrap(),
                    }
                }
            });
        }
    });
    let _echo_proxy = mesh.sidecar("echo", &[("app", "echo")], echo_port).await;
    let (cport, _c) = demo_app("client", "v1", "client-0").await;
    let client = mesh
        .sidecar_with_upstream("client", cport, "echo", 7000)
        .await;
    mesh.wait_endpoints("echo", 1).await;

    let mut s = tokio::net::TcpStream::connect(client.upstream_addrs[0])
        .await
        .unwrap();
    let mut greeting = [0u8; 16];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut greeting))
        .await
        .expect("the server's greeting arrives though the client said nothing")
        .unwrap();
    assert_eq!(&greeting, b"220 echo ready\r\n");
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.into_split();
    let expected = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut got))
        .await
        .expect("echo completes")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "echoed bytes differ");
    let opened = metric_sum(
        client.admin_addr,
        "trellis_tcp_connections_opened_total",
        &[("destination_service", "echo")],
    )
    .await;
    assert_eq!(opened, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_fails_alone() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let _catalog = catalog_replicas(&mesh, "v1", 1).await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    // Garbage, then a request with no target, then a peer that hangs up mid-request.
    let mut s = tokio::net::TcpStream::connect(frontend.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client
        .request(Method::GET, "/relative", &[("host", "")])
        .await
        .unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let mut s = tokio::net::TcpStream::connect(frontend.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"POST http://catalog:8080/ HTTP/1.1\r\nhost: catalog:8080\r\ncontent-length: 100\r\n\r\nhalf")
        .await
        .unwrap();
    drop(s);

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client.get("http://catalog:8080/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
}

/// With `--peer-http1`, an HTTP/1 caller's requests go to the peer proxy
/// over HTTP/1.1 connections that are pooled per worker: sequential
/// requests reuse one, concurrent ones get one each, and one the peer
/// closed while idle is replaced without a failed request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_callers_reach_peers_over_pooled_http1_connections() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let (port, _app) = demo_app("catalog", "v1", "catalog-v1-0").await;
    let mut cfg = mesh.proxy_config("catalog-v1-0", &[("app", "catalog")], port);
    cfg.limits.http1_idle_timeout = Duration::from_millis(500);
    let catalog = trellis_proxy::Proxy::start(cfg)
        .await
        .expect("proxy starts");
    let (fport, _f) = demo_app("frontend", "v1", "frontend-0").await;
    let mut cfg = mesh.proxy_config("frontend", &[("app", "frontend")], fport);
    cfg.peer_http1 = true;
    let frontend = trellis_proxy::Proxy::start(cfg)
        .await
        .expect("proxy starts");
    mesh.wait_endpoints("catalog", 1).await;

    let open = || async {
        metric_sum(
            catalog.admin_addr,
            "trellis_connections_open",
            &[("listener", "inbound")],
        )
        .await
    };
    let mut client = ProxyClient::new(frontend.outbound_addr);
    let mut call = async |i: usize| {
        let (status, body) = client.get("http://catalog:8080/items").await.unwrap();
        assert_eq!(
            status,
            StatusCode::OK,
            "request {i}: {}",
            String::from_utf8_lossy(&body)
        );
        let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let headers = &answer["headers"];
        assert_eq!(headers["host"], "catalog:8080");
        assert_eq!(
            headers["x-trellis-peer-identity"],
            "spiffe://trellis.local/ns/default/sa/frontend"
        );
    };
    call(0).await;
    // The first request's connection, and the HTTP/2 connection the
    // warm-up opens on each of the frontend's two workers once it knows
    // the Service (HTTP/2 callers use those).
    let settled = || async {
        trellis_testkit::eventually(
            "the warm-up's connections",
            Duration::from_secs(10),
            || async { (open().await == 3.0).then_some(()) },
        )
        .await
    };
    settled().await;
    for i in 1..20 {
        call(i).await;
    }
    assert_eq!(
        open().await,
        3.0,
        "20 sequential requests over one connection"
    );

    // Four callers at once.
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let addr = frontend.outbound_addr;
        tasks.push(tokio::spawn(async move {
            let mut c = ProxyClient::new(addr);
            for _ in 0..10 {
                let (status, _) = c.get("http://catalog:8080/").await.unwrap();
                assert_eq!(status, StatusCode::OK);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // Reused: far fewer connections than the 40 requests (a connection
    // given back a moment before its next request may not be ready yet,
    // so a few more than one per caller may open).
    let after = open().await;
    assert!((3.0..=14.0).contains(&after), "{after} open");

    // The peer closes the idle ones (--http1-idle-timeout): the next
    // request opens a new connection and does not fail.
    trellis_testkit::eventually(
        "idle connections closed",
        Duration::from_secs(10),
        || async { (open().await == 2.0).then_some(()) },
    )
    .await;
    call(20).await;
    let failed = metric_sum(
        frontend.admin_addr,
        "trellis_requests_total",
        &[("direction", "outbound"), ("status_code", "502")],
    )
    .await;
    assert_eq!(failed, 0.0);
}
