//! Resilience through a whole mesh: outlier detection with retries, the
//! retry budget against a retry storm, circuit breaking, and active health
//! checks.

mod traffic_common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use http::StatusCode;
use traffic_common::{catalog_counter, catalog_with, load, policy, Client};
use trellis_e2e::{metric_sum, wait_config, wait_proxy_endpoints};
use trellis_testkit::{assert_eventually, eventually};

const OUTLIER: &str = r#"
  loadBalancer: {type: round-robin}
  outlierDetection:
    consecutive5xxErrors: 5
    baseEjectionTime: 2s
    maxEjectionPercent: 50
  retry: {attempts: 2, codes: [503]}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outlier_detection_and_retries_hide_a_failing_endpoint_and_readmit_it_healed() {
    let (_mesh, replicas, frontend) = catalog_with(&policy(OUTLIER), 4).await;
    let bad = &replicas[0];
    bad.app.behaviour.fail_with.store(503, Ordering::SeqCst);
    let mut client = Client::new(frontend.outbound_addr);
    client.get("http://catalog:8080/").await;
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 4).await;
    let before = bad.app.hits();

    let l = load(frontend.outbound_addr, "http://catalog:8080/", 1000, 4).await;
    let bad_hits = bad.app.hits() - before;
    let ejections = catalog_counter(&frontend, "trellis_outlier_ejections_total").await;
    println!(
        "outlier detection: {:.2}% success over 1000 requests, the failing endpoint got {bad_hits} tries, {ejections} ejections, {:?}",
        l.ok_share() * 100.0,
        l.elapsed
    );
    assert!(l.ok_share() >= 0.995, "success {:.4}", l.ok_share());
    assert!(ejections >= 1.0);
    // Round robin alone would have sent it 250 of the 1000.
    assert!(bad_hits < 100, "the failing endpoint got {bad_hits} tries");

    // Healed, it comes back once its ejection is over.
    bad.app.behaviour.fail_with.store(0, Ordering::SeqCst);
    eventually(
        "the healed endpoint serves again",
        Duration::from_secs(20),
        || async {
            let l = load(frontend.outbound_addr, "http://catalog:8080/", 40, 2).await;
            (l.share_of("catalog-0") > 0.0)
                .then_some(())
                .ok_or("not yet")
        },
    )
    .await;
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 400, 4).await;
    assert_eq!(l.ok_share(), 1.0);
    let share = l.share_of("catalog-0");
    assert!((0.15..=0.35).contains(&share), "readmitted share {share}");
}

const STORM: &str = r#"
  retry:
    attempts: 3
    codes: [503]
    backoff: 1ms
    budget: {ratio: 0.2, minRetriesPerSecond: 1, ttl: 10s}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_caps_a_retry_storm() {
    let (mesh, replicas, frontend) = catalog_with(&policy(STORM), 2).await;
    for r in &replicas {
        r.app.behaviour.fail_with.store(503, Ordering::SeqCst);
    }

    let n = 500;
    let l = load(frontend.outbound_addr, "http://catalog:8080/", n, 4).await;
    assert_eq!(l.count(StatusCode::SERVICE_UNAVAILABLE), n);
    let tries = replicas.iter().map(|r| r.app.hits()).sum::<u64>() as usize;
    let retries = tries - n;
    // 0.2 × 500 + 1/s × 10s = 110 (a few more if callers race on the last ones).
    println!(
        "retry storm: {n} requests made {retries} retries (without the budget: {})",
        3 * n
    );
    assert!(retries <= 110 + 8, "{retries} retries");
    assert!(
        retries >= 100,
        "the budget allows its share: {retries} retries"
    );
    let exhausted = catalog_counter(&frontend, "trellis_retry_budget_exhausted_total").await;
    assert!(exhausted >= 300.0, "{exhausted}");
    let mut client = Client::new(frontend.outbound_addr);
    let answer = client.get("http://catalog:8080/").await;
    assert!(answer.flags().contains("URX"), "{:?}", answer.headers);

    // `trellis stat --traffic` shows the same figures.
    let api = trellis::client::Api::new(&mesh.http_addr.to_string(), "test")
        .unwrap()
        .with_token(mesh.admin_token());
    let (rows, unreachable) = trellis::traffic_stat::collect(&api).await.unwrap();
    assert!(unreachable.is_empty(), "{unreachable:?}");
    print!("{}", trellis::traffic_stat::traffic_table(&rows));
    let row = rows.iter().find(|r| r.service == "catalog").unwrap();
    // The last request above may have had one more retry.
    assert!((retries..=retries + 1).contains(&(row.retries as usize)));
    assert!(row.budget_exhausted >= exhausted);
}

const POOL: &str = r#"
  connectionPool: {maxRequests: 4}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_pool_limit_requests_fail_fast_with_a_flag() {
    let (_mesh, replicas, frontend) = catalog_with(&policy(POOL), 1).await;
    let slow = &replicas[0];
    let mut client = Client::new(frontend.outbound_addr);
    assert_eq!(
        client.get("http://catalog:8080/").await.status,
        StatusCode::OK
    );

    // 20 at once against a limit of 4 requests in flight, while the app
    // holds every request it gets: the 16 past the limit can only be
    // answered by a refusal, and are, before any slot frees up.
    slow.app.hold();
    let burst = tokio::spawn(load(frontend.outbound_addr, "http://catalog:8080/", 20, 20));
    let rejections = || {
        metric_sum(
            frontend.admin_addr,
            "trellis_circuit_breaker_rejections_total",
            &[("destination_service", "catalog"), ("limit", "requests")],
        )
    };
    eventually(
        "16 of 20 are refused while 4 are held",
        Duration::from_secs(10),
        || async {
            let (held, refused) = (slow.app.in_flight(), rejections().await);
            (held == 4 && refused == 16.0)
                .then_some(())
                .ok_or(format!("{held} held, {refused} refused"))
        },
    )
    .await;
    assert!(!burst.is_finished(), "the held requests are still waiting");
    slow.app.release();
    let l = burst.await.unwrap();
    let ok = l.count(StatusCode::OK);
    let refused = l.count(StatusCode::SERVICE_UNAVAILABLE);
    let fastest_refusal = l
        .statuses
        .iter()
        .zip(&l.latencies)
        .filter(|(s, _)| **s == StatusCode::SERVICE_UNAVAILABLE)
        .map(|(_, d)| *d)
        .min()
        .unwrap_or_default();
    println!("circuit breaking: {ok} served, {refused} refused (fastest in {fastest_refusal:?})");
    assert_eq!((ok, refused), (4, 16));
    assert_eq!(slow.app.behaviour.max_in_flight.load(Ordering::SeqCst), 4);
    assert_eq!(rejections().await as usize, refused);

    // The flag tells the caller why.
    slow.app.hold();
    let busy = tokio::spawn(load(frontend.outbound_addr, "http://catalog:8080/", 4, 4));
    assert_eventually!(slow.app.in_flight() == 4);
    let a = client.get("http://catalog:8080/").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(a.flags(), "UO");
    slow.app.release();
    assert_eq!(busy.await.unwrap().ok_share(), 1.0);
}

const HEALTH: &str = r#"
  loadBalancer: {type: round-robin}
  healthCheck: {path: /healthz, interval: 200ms, timeout: 500ms, healthyThreshold: 2, unhealthyThreshold: 2}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_health_checks_take_an_endpoint_out_and_back() {
    let (_mesh, replicas, frontend) = catalog_with(&policy(HEALTH), 3).await;
    let url = "http://catalog:8080/";
    load(frontend.outbound_addr, url, 3, 1).await;
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 3).await;
    assert_eventually!(replicas
        .iter()
        .all(|r| r.app.behaviour.health_hits.load(Ordering::SeqCst) >= 2));

    // catalog-0 answers requests but says it is unhealthy.
    replicas[0]
        .app
        .behaviour
        .unhealthy
        .store(true, Ordering::SeqCst);
    eventually(
        "catalog-0 is taken out",
        Duration::from_secs(10),
        || async {
            let l = load(frontend.outbound_addr, url, 30, 1).await;
            (l.share_of("catalog-0") == 0.0)
                .then_some(())
                .ok_or("still served")
        },
    )
    .await;
    let l = load(frontend.outbound_addr, url, 300, 3).await;
    assert_eq!(l.ok_share(), 1.0);
    assert_eq!(l.share_of("catalog-0"), 0.0);
    let fails = metric_sum(
        frontend.admin_addr,
        "trellis_health_checks_total",
        &[("destination_service", "catalog"), ("result", "fail")],
    )
    .await;
    assert!(fails >= 2.0, "{fails}");
    // The caller's /config shows why.
    let (_, body) =
        trellis_testkit::http_get(&format!("http://{}/config", frontend.admin_addr), None).await;
    let cfg: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let catalog = cfg["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "catalog")
        .unwrap();
    assert_eq!(catalog["loadBalancer"], "round-robin");
    assert_eq!(
        catalog["trafficPolicy"]["spec"]["healthCheck"]["path"],
        "/healthz"
    );
    for ep in catalog["endpoints"].as_array().unwrap() {
        let failing = ep["workload"] == "catalog-0";
        assert_eq!(ep["failingHealthChecks"], failing, "{ep}");
    }

    replicas[0]
        .app
        .behaviour
        .unhealthy
        .store(false, Ordering::SeqCst);
    eventually("catalog-0 is back", Duration::from_secs(10), || async {
        let l = load(frontend.outbound_addr, url, 30, 1).await;
        (l.share_of("catalog-0") > 0.0)
            .then_some(())
            .ok_or("not yet")
    })
    .await;
}

const RETRY_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: orders
  annotations: {trellis.dev/retry-non-idempotent: "ANNOTATION"}
spec:
  parentRefs: [{name: catalog}]
  rules:
  - backendRefs: [{name: catalog}]
    timeouts: {backendRequest: 200ms}
    retry: {attempts: 2, codes: [503], backoff: 1ms}
"#;

/// The route, allowing POST retries or not, and round robin for catalog.
fn retry_route(allow_posts: bool) -> String {
    let route = RETRY_ROUTE.replace("ANNOTATION", &allow_posts.to_string());
    format!(
        "{route}---\n{}",
        policy("  loadBalancer: {type: round-robin}")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posts_are_retried_only_when_the_route_allows_and_slow_tries_time_out() {
    use bytes::Bytes;
    use http::Method;

    let (mesh, replicas, frontend) = catalog_with(&retry_route(false), 2).await;
    let (bad, good) = (&replicas[0], &replicas[1]);
    bad.app.behaviour.fail_with.store(503, Ordering::SeqCst);
    let mut client = Client::new(frontend.outbound_addr);
    let post = |i: usize| {
        (
            Method::POST,
            format!("http://catalog:8080/orders/{i}"),
            Bytes::from(format!("order {i}")),
        )
    };
    client.get("http://catalog:8080/").await;
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 2).await;

    // Not allowed: a POST that reached the failing instance fails.
    let mut failed = 0;
    for i in 0..40 {
        let (m, url, body) = post(i);
        let a = client.send(m, &url, &[], body).await;
        if a.status == StatusCode::SERVICE_UNAVAILABLE {
            failed += 1;
        }
    }
    assert!((10..=30).contains(&failed), "{failed} of 40 POSTs failed");
    // GETs are idempotent: all retried to success.
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 40, 1).await;
    assert_eq!(l.ok_share(), 1.0);

    // Allowed: every POST succeeds, its body sent again intact.
    mesh.apply(&retry_route(true)).await.expect("apply route");
    wait_config(
        frontend.admin_addr,
        "the caller's proxy runs the route that allows POST retries",
        |c| {
            c["services"].as_array().is_some_and(|services| {
                services
                    .iter()
                    .flat_map(|s| s["routes"].as_array())
                    .flatten()
                    .any(|r| {
                        r["metadata"]["annotations"]["trellis.dev/retry-non-idempotent"] == "true"
                    })
            })
        },
    )
    .await;
    for i in 0..40 {
        let (m, url, body) = post(100 + i);
        let a = client.send(m, &url, &[], body).await;
        assert_eq!(a.status, StatusCode::OK, "POST {i}");
    }
    let retried = bad
        .app
        .seen()
        .into_iter()
        .filter(|s| s.path_and_query == "/orders/120")
        .count()
        + good
            .app
            .seen()
            .into_iter()
            .filter(|s| s.path_and_query == "/orders/120")
            .count();
    assert!((1..=2).contains(&retried));
    let copy = good
        .app
        .seen()
        .into_iter()
        .find(|s| s.path_and_query == "/orders/120")
        .expect("the good instance got order 120");
    assert_eq!(copy.body, Bytes::from("order 120"));

    // A try slower than backendRequest (200ms) is abandoned and retried:
    // the slow instance gets tries, yet never answers one (held, it would
    // answer 200 once released).
    bad.app.behaviour.fail_with.store(0, Ordering::SeqCst);
    bad.app.hold();
    let tries_before = bad.app.hits();
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 20, 1).await;
    assert_eq!(l.ok_share(), 1.0);
    assert_eq!(l.share_of("catalog-1"), 1.0);
    assert!(
        bad.app.hits() > tries_before,
        "no try reached the slow instance"
    );
    println!(
        "per-try timeout: slowest of 20 answers in {:?}",
        l.quantile(1.0)
    );
    bad.app.release();
}
