//! `trellis stat` figures agree with what was sent; `edges` says who calls
//! whom; `tap` streams request metadata to admins only.

mod observe_common;

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use observe_common::*;
use serde_json::Value;
use trellis_e2e::TestMesh;
use trellis_testkit::eventually;

fn row<'a>(answer: &'a Value, name: &str) -> Option<&'a Value> {
    answer["rows"]
        .as_array()?
        .iter()
        .find(|r| r["name"] == name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stat_agrees_with_what_was_sent_and_edges_name_the_callers() {
    let mesh = TestMesh::start().await;
    let t = three_tier(&mesh, &observe_common::mesh("  tracing: {sampling: 0.1}")).await;
    let n = 400u64;
    let started = std::time::Instant::now();
    for i in 0..n {
        let (status, _) = get(&format!("http://{}/p/{i}", t.frontend.app), &[]).await;
        assert_eq!(status, 200);
    }
    let sent_for = started.elapsed();
    for (kind, name) in [
        ("service", "catalog"),
        ("service", "reviews"),
        ("workload", "catalog"),
    ] {
        let answer = eventually(
            &format!("stat {kind}/{name} counts every request"),
            Duration::from_secs(15),
            || async {
                let a = mesh
                    .get_json(&format!("/api/v1/stat?kind={kind}&window=1m"))
                    .await;
                let got = row(&a, name)
                    .and_then(|r| r["requests"].as_u64())
                    .unwrap_or(0);
                (got >= n).then_some(a).ok_or(format!("{got} of {n}"))
            },
        )
        .await;
        let r = row(&answer, name).unwrap();
        let got = r["requests"].as_u64().unwrap();
        let off = (got as f64 - n as f64).abs() / n as f64;
        println!(
            "stat {kind}/{name}: sent {n}, stat says {got} ({:.2}% off), rps {:.1} (sent at {:.1}/s), success {}, p99 {}ms",
            off * 100.0,
            r["rps"].as_f64().unwrap(),
            n as f64 / sent_for.as_secs_f64(),
            r["successRate"],
            r["p99Ms"],
        );
        assert!(off <= 0.05, "stat {kind}/{name}: {got} requests, sent {n}");
        assert_eq!(r["successRate"], 1.0);
        assert!(r["p50Ms"].as_f64().unwrap() > 0.0);
    }
    // Route rows are measured at the caller: frontend's calls to catalog.
    let to_catalog = eventually(
        "a route row for catalog",
        Duration::from_secs(15),
        || async {
            let routes = mesh.get_json("/api/v1/stat?kind=route&window=1m").await;
            routes["rows"]
                .as_array()
                .and_then(|rows| rows.iter().find(|r| r["service"] == "catalog").cloned())
                .filter(|r| r["requests"].as_u64() >= Some(n))
                .ok_or(format!("{routes}"))
        },
    )
    .await;
    let off = (to_catalog["requests"].as_f64().unwrap() - n as f64).abs() / n as f64;
    assert!(off <= 0.05, "{to_catalog}");

    let edges = mesh.get_json("/api/v1/edges?window=1m").await;
    let edge = |from: &str, to: &str| {
        edges["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["sourceWorkload"] == from && e["destinationService"] == to)
            .cloned()
            .unwrap_or_else(|| panic!("no edge {from} -> {to} in {edges:#}"))
    };
    let fc = edge("frontend", "catalog");
    assert_eq!(fc["requests"].as_u64(), Some(n));
    assert!(fc["sourceIdentities"][0]
        .as_str()
        .unwrap()
        .ends_with("/ns/default/sa/frontend"));
    assert!(fc["destinationIdentities"][0]
        .as_str()
        .unwrap()
        .ends_with("/ns/default/sa/catalog"));
    assert!(fc["mtls"].is_string());
    edge("catalog", "reviews");
}

/// Opens a tap; yields the streamed lines.
async fn open_tap(
    mesh: &TestMesh,
    query: &str,
    token: Option<&str>,
) -> Result<tokio::sync::mpsc::Receiver<Value>, (u16, String)> {
    let tcp = tokio::net::TcpStream::connect(mesh.http_addr)
        .await
        .unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = http::Request::get(format!("/api/v1/tap?{query}"))
        .header("host", mesh.http_addr.to_string());
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let mut body = resp.into_body();
    if status != 200 {
        let b = body.collect().await.unwrap().to_bytes();
        return Err((status, String::from_utf8_lossy(&b).to_string()));
    }
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    tokio::spawn(async move {
        let _sender = sender;
        let mut buf = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(d) = frame.data_ref() {
                buf.extend_from_slice(d);
            }
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                if let Ok(v) = serde_json::from_slice::<Value>(&line) {
                    if tx.send(v).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Ok(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tap_streams_metadata_to_admins_only() {
    let mesh = TestMesh::start().await;
    let t = three_tier(&mesh, &observe_common::mesh("  tracing: {sampling: 0.0}")).await;
    let token = std::fs::read_to_string(mesh.dir.path().join("control").join("admin-token"))
        .expect("the control plane writes an admin token");

    let refused = open_tap(&mesh, "workload=catalog", None)
        .await
        .expect_err("refused");
    assert_eq!(refused.0, 401, "{}", refused.1);
    let refused = open_tap(&mesh, "workload=catalog", Some("not-the-token"))
        .await
        .expect_err("refused");
    assert_eq!(refused.0, 401);
    let missing = open_tap(&mesh, "workload=nope", Some(token.trim()))
        .await
        .expect_err("no proxy");
    assert_eq!(missing.0, 404, "{}", missing.1);

    let mut rx = open_tap(&mesh, "workload=catalog&path=/items", Some(token.trim()))
        .await
        .expect("tap opens");
    let hello = rx.recv().await.expect("hello");
    assert_eq!(hello["proxies"], 1, "{hello}");
    // The proxy starts tapping once the TapStart reaches it.
    let mut events = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while events.len() < 5 && tokio::time::Instant::now() < deadline {
        let (status, _) = get(&format!("http://{}/", t.frontend.app), &[]).await;
        assert_eq!(status, 200);
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(150), rx.recv()).await {
            events.push(e);
        }
    }
    assert!(events.len() >= 5, "{events:#?}");
    for e in &events {
        assert_eq!(e["workload"], "catalog", "{e}");
        assert!(e["path"].as_str().unwrap().starts_with("/items"), "{e}");
        assert!(e.get("body").is_none());
        assert_eq!(e["direction"], "inbound");
        assert_eq!(e["status"], 200);
        assert_eq!(e["traceId"].as_str().unwrap().len(), 32);
    }
    // Closing the client stops the tap on every proxy (TapStop).
    drop(rx);
}
