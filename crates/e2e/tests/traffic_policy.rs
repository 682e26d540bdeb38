//! TrafficPolicy's request-level settings through a whole mesh: fault
//! injection and the local rate limit; and impossible or conflicting
//! policies refused at apply while the running config keeps serving.

mod traffic_common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::StatusCode;
use traffic_common::{catalog_counter, catalog_with, load, policy, Client};
use trellis_e2e::metric_sum;

const ABORT: &str = r#"
  faultInjection:
    abort: {percent: 10, httpStatus: 503}
"#;

const DELAY: &str = r#"
  faultInjection:
    delay: {percent: 50, fixedDelay: 100ms}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_injection_aborts_and_delays_about_the_configured_share() {
    let (mesh, replicas, frontend) = catalog_with(&policy(ABORT), 1).await;
    let catalog = &replicas[0];

    let mut client = Client::new(frontend.outbound_addr);
    let (mut aborted, n) = (0, 2000);
    for _ in 0..n {
        let a = client.get("http://catalog:8080/").await;
        match a.status {
            StatusCode::OK => assert_eq!(a.flags(), ""),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(a.flags(), "FI");
                aborted += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    let share = aborted as f64 / n as f64;
    println!(
        "fault injection: {:.1}% of {n} aborted (10% configured)",
        share * 100.0
    );
    assert!((0.07..=0.13).contains(&share), "aborted {share:.3}");
    assert_eq!(
        catalog.app.hits() as usize,
        n - aborted,
        "aborted requests never leave"
    );
    let counted = metric_sum(
        frontend.admin_addr,
        "trellis_faults_injected_total",
        &[("destination_service", "catalog"), ("fault", "abort")],
    )
    .await;
    assert_eq!(counted as usize, aborted);

    // A new policy replaces the old one: delays instead of aborts.
    mesh.apply(&policy(DELAY)).await.expect("apply delay");
    trellis_testkit::eventually("the delay policy runs", Duration::from_secs(10), || async {
        let l = load(frontend.outbound_addr, "http://catalog:8080/", 20, 20).await;
        (l.ok_share() == 1.0).then_some(()).ok_or("aborts still")
    })
    .await;
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 800, 40).await;
    assert_eq!(l.ok_share(), 1.0);
    let delayed = l
        .latencies
        .iter()
        .filter(|d| **d >= Duration::from_millis(100))
        .count() as f64
        / 800.0;
    println!(
        "fault injection: {:.1}% of 800 delayed by 100ms (50% configured)",
        delayed * 100.0
    );
    assert!((0.4..=0.6).contains(&delayed), "delayed {delayed:.3}");
}

const RATE_LIMIT: &str = r#"
  localRateLimit: {requestsPerSecond: 50, burst: 10}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_of_50_rps_under_a_200_rps_burst_passes_about_50_rps() {
    let (_mesh, replicas, frontend) = catalog_with(&policy(RATE_LIMIT), 1).await;
    let catalog = &replicas[0];
    let proxy = frontend.outbound_addr;
    assert_eq!(
        Client::new(proxy).get("http://catalog:8080/").await.status,
        StatusCode::OK
    );

    // 200 requests per second for 3 seconds, each on its own connection.
    let results = Arc::new(Mutex::new(Vec::new()));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    let mut tasks = Vec::new();
    for _ in 0..600 {
        tick.tick().await;
        let results = results.clone();
        tasks.push(tokio::spawn(async move {
            let a = Client::new(proxy).get("http://catalog:8080/").await;
            results.lock().unwrap().push((a.status, a.flags()));
        }));
    }
    let offered_for = started.elapsed();
    for t in tasks {
        t.await.unwrap();
    }
    let results = std::mem::take(&mut *results.lock().unwrap());
    let passed = results.iter().filter(|(s, _)| *s == StatusCode::OK).count();
    let limited = results
        .iter()
        .filter(|(s, f)| *s == StatusCode::TOO_MANY_REQUESTS && f == "RL")
        .count();
    let secs = offered_for.as_secs_f64();
    let rate = (passed as f64 - 10.0) / secs;
    println!(
        "rate limit: {} offered over {secs:.2}s, {passed} passed ({rate:.1}/s after the burst of 10), {limited} got 429",
        results.len()
    );
    assert_eq!(passed + limited, 600);
    assert!(
        (45.0..=56.0).contains(&rate),
        "{rate:.1} requests per second passed"
    );
    assert_eq!(catalog.app.hits() as usize, passed + 1);
    let counted = catalog_counter(&frontend, "trellis_rate_limited_total").await;
    assert_eq!(counted as usize, limited);
}

const GOOD: &str = r#"
  loadBalancer: {type: round-robin}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_or_conflicting_policies_are_refused_and_the_running_config_stays() {
    let (mesh, _replicas, frontend) = catalog_with(&policy(GOOD), 2).await;

    let cases: [(&str, String, &str); 6] = [
        (
            "maxEjectionPercent over 100",
            policy(GOOD).replace(
                "loadBalancer: {type: round-robin}",
                "outlierDetection: {maxEjectionPercent: 101}",
            ),
            "spec.outlierDetection.maxEjectionPercent",
        ),
        (
            "a second TrafficPolicy for catalog",
            policy(GOOD).replace("metadata: {name: catalog}", "metadata: {name: catalog-2}"),
            "already has a TrafficPolicy",
        ),
        (
            "all weights zero",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: zero}
spec:
  parentRefs: [{name: catalog}]
  rules: [{backendRefs: [{name: catalog, weight: 0}]}]
"#
            .into(),
            "weight 0",
        ),
        (
            "a regular expression that does not compile",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: regex}
spec:
  parentRefs: [{name: catalog}]
  rules: [{matches: [{path: {type: RegularExpression, value: "/items/(["}}], backendRefs: [{name: catalog}]}]
"#
            .into(),
            "not a valid regular expression",
        ),
        (
            "a mirror to a missing Service",
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror}
spec:
  parentRefs: [{name: catalog}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: nosuch}}}]
    backendRefs: [{name: catalog}]
"#
            .into(),
            "Service default/nosuch does not exist",
        ),
        (
            "ring-hash without a key",
            policy(GOOD).replace("type: round-robin", "type: ring-hash"),
            "ring-hash needs a key",
        ),
    ];
    for (what, yaml, reason) in &cases {
        let err = mesh
            .apply(yaml)
            .await
            .expect_err(&format!("{what} is refused"));
        assert!(err.contains(reason), "{what}: {err}");
        println!(
            "refused, {what}: {}",
            err.lines().last().unwrap_or_default()
        );
    }
    // Nothing of it took effect: the stored policy is the good one, and
    // round robin still alternates.
    let stored = mesh
        .get_json("/api/v1/resources/TrafficPolicy/default/catalog")
        .await;
    assert_eq!(stored["spec"]["loadBalancer"]["type"], "round-robin");
    let routes = mesh.get_json("/api/v1/resources/HTTPRoute").await;
    assert_eq!(routes["items"].as_array().map(Vec::len), Some(0));
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 100, 1).await;
    assert_eq!(l.ok_share(), 1.0);
    assert!((0.4..=0.6).contains(&l.share_of("catalog-0")));
}
