//! JSON access logs: one parseable line per request and hop, with the
//! listed fields, written off the request path.

mod observe_common;

use std::time::Duration;

use observe_common::*;
use serde_json::Value;
use trellis_e2e::TestMesh;
use trellis_testkit::eventually;

const FIELDS: &[&str] = &[
    "time",
    "traceId",
    "spanId",
    "direction",
    "sourceIdentity",
    "sourceWorkload",
    "destinationIdentity",
    "destinationService",
    "destinationWorkload",
    "method",
    "authority",
    "path",
    "protocol",
    "route",
    "status",
    "durationMs",
    "bytesReceived",
    "bytesSent",
    "responseFlags",
    "tls",
];

fn lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_lines_are_json_with_the_listed_fields() {
    let mesh = TestMesh::start().await;
    let dir = mesh.dir.path().join("logs");
    let pattern = dir.join("{workload}.log");
    let t = three_tier(
        &mesh,
        &observe_common::mesh(&format!("  accessLog: {{path: '{}'}}", pattern.display())),
    )
    .await;
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let n = 20;
    for i in 0..n {
        let (status, _) = get(
            &format!("http://{}/page/{i}", t.frontend.app),
            &[("traceparent", &format!("00-{trace}-b7ad6b7169203331-01"))],
        )
        .await;
        assert_eq!(status, 200);
    }
    let catalog_log = dir.join("catalog.log");
    let entries = eventually(
        "catalog's log has both directions",
        Duration::from_secs(10),
        || {
            let e = lines(&catalog_log);
            async move {
                let inbound = e.iter().filter(|l| l["direction"] == "inbound").count();
                let outbound = e.iter().filter(|l| l["direction"] == "outbound").count();
                (inbound >= n && outbound >= n)
                    .then_some(e)
                    .ok_or(format!("{inbound} inbound, {outbound} outbound"))
            }
        },
    )
    .await;
    for e in &entries {
        for f in FIELDS {
            assert!(e.get(*f).is_some(), "field {f} missing in {e}");
        }
    }
    let inbound = entries
        .iter()
        .find(|e| e["direction"] == "inbound")
        .unwrap();
    assert_eq!(inbound["traceId"], trace);
    assert_eq!(inbound["method"], "GET");
    assert_eq!(inbound["path"], "/items");
    assert_eq!(inbound["status"], 200);
    assert_eq!(inbound["sourceWorkload"], "frontend");
    assert_eq!(inbound["destinationService"], "catalog");
    assert_eq!(inbound["destinationWorkload"], "catalog");
    assert_eq!(inbound["responseFlags"], "-");
    assert!(inbound["bytesSent"].as_u64().unwrap() > 0, "{inbound}");
    assert!(inbound["destinationIdentity"]
        .as_str()
        .unwrap()
        .starts_with("spiffe://"));
    assert!(inbound["time"].as_str().unwrap().ends_with('Z'));
    let outbound = entries
        .iter()
        .find(|e| e["direction"] == "outbound")
        .unwrap();
    assert_eq!(outbound["destinationService"], "reviews");
    assert_eq!(outbound["authority"], "reviews:8080");

    // A failing upstream is flagged.
    t.reviews.proxy.shutdown().await;
    mesh.wait_endpoints("reviews", 0).await;
    let (_, _) = get(&format!("http://{}/", t.frontend.app), &[]).await;
    let flagged = eventually("a flagged line", Duration::from_secs(10), || {
        let e = lines(&catalog_log);
        async move {
            e.into_iter()
                .find(|l| l["direction"] == "outbound" && l["status"].as_u64().unwrap_or(0) >= 500)
                .ok_or("none yet")
        }
    })
    .await;
    assert_ne!(flagged["responseFlags"], "-", "{flagged}");
}
