//! Load balancers through a whole mesh: the default balancer (peak-EWMA)
//! shares load fairly between equal replicas from a cold start, with one
//! caller or several, gives a replica added under load its share within
//! seconds, and sends a slow replica far less than round robin does;
//! ring-hash stickiness and how few keys move when an endpoint leaves;
//! zone-aware routing with failover. Shares are asserted, never timings.

mod traffic_common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use traffic_common::{
    caller, catalog_counter, catalog_with, load, policy, replica, Client, Replica,
};
use trellis_e2e::yaml::service;
use trellis_e2e::{wait_proxy_endpoints, TestMesh};

const RING_HASH: &str = r#"
  loadBalancer: {type: ring-hash, hashOn: {header: x-user}}
"#;

/// GETs catalog's cart as user `key`; the instance that answered.
async fn cart(client: &mut Client, key: &str) -> String {
    let a = client
        .send(
            Method::GET,
            "http://catalog:8080/cart",
            &[("x-user", key)],
            Bytes::new(),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "user {key}");
    a.instance()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_hash_keeps_each_key_on_one_endpoint_and_moves_few_when_one_leaves() {
    let (mesh, mut replicas, frontend) = catalog_with(&policy(RING_HASH), 5).await;
    let mut client = Client::new(frontend.outbound_addr);
    assert_eq!(
        client.get("http://catalog:8080/").await.status,
        StatusCode::OK
    );
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 5).await;

    let keys: Vec<String> = (0..400).map(|k| format!("user-{k}")).collect();
    let mut owner: HashMap<&str, String> = HashMap::new();
    for round in 0..3 {
        for k in &keys {
            let got = cart(&mut client, k).await;
            let prev = owner.entry(k).or_insert_with(|| got.clone());
            assert_eq!(*prev, got, "{k} moved in round {round}");
        }
    }
    let mut per: HashMap<&str, usize> = HashMap::new();
    for o in owner.values() {
        *per.entry(o.as_str()).or_default() += 1;
    }
    println!("ring-hash: keys per endpoint {per:?}");
    assert_eq!(per.len(), 5, "every endpoint holds keys: {per:?}");

    // catalog-2 leaves: its keys move, no other key does.
    let gone = replicas.remove(2);
    let gone_name = gone.app.instance.clone();
    gone.proxy.shutdown().await;
    mesh.wait_endpoints("catalog", 4).await;
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 4).await;
    let mut moved = 0;
    for k in &keys {
        if cart(&mut client, k).await != owner[k.as_str()] {
            assert_eq!(
                owner[k.as_str()],
                gone_name,
                "{k} moved off a staying endpoint"
            );
            moved += 1;
        }
    }
    let share = moved as f64 / keys.len() as f64;
    println!(
        "ring-hash: removing 1 of 5 endpoints moved {:.1}% of keys",
        share * 100.0
    );
    assert_eq!(
        moved,
        per[gone_name.as_str()],
        "exactly the leaver's keys moved"
    );
    assert!(share <= 0.30, "{moved} of {} keys moved", keys.len());

    // No key: a random endpoint, counted.
    assert_eq!(
        client.get("http://catalog:8080/cart").await.status,
        StatusCode::OK
    );
    let missing = catalog_counter(&frontend, "trellis_hash_key_missing_total").await;
    assert!(missing >= 1.0, "{missing}");
}

const TWO_BALANCERS: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-rr}
spec: {selector: {app: catalog}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog-rr}
spec:
  targetRef: {kind: Service, name: catalog-rr}
  loadBalancer: {type: round-robin}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-ewma}
spec: {selector: {app: catalog}, ports: [{port: 8080}]}
"#;

/// The Service `catalog` with the default balancer, `n` replicas
/// `catalog-0`... and a caller `frontend` that has not called it yet (as a
/// new user's app), once the control plane lists every replica.
async fn default_catalog(n: usize) -> (TestMesh, Vec<Replica>, trellis_proxy::Proxy) {
    catalog_with("", n).await
}

/// Each instance's share of `instances`, for the failure messages.
fn shares(instances: &[String]) -> Vec<(String, f64)> {
    let mut per: HashMap<&str, usize> = HashMap::new();
    for i in instances {
        *per.entry(i.as_str()).or_default() += 1;
    }
    let mut out: Vec<_> = per
        .into_iter()
        .map(|(i, n)| (i.to_string(), n as f64 / instances.len() as f64))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The finding behind this test: two equal replicas behind the default
/// balancer got 312 and 1 of 313 sequential requests, because the first
/// request to each paid the TCP and TLS handshake and was taken for the
/// replica's latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_equal_replicas_share_sequential_requests_from_a_cold_start() {
    let (_mesh, _replicas, frontend) = default_catalog(2).await;
    let mut client = Client::new(frontend.outbound_addr);
    let mut got = Vec::new();
    for _ in 0..300 {
        let a = client.get("http://catalog:8080/").await;
        assert_eq!(a.status, StatusCode::OK);
        got.push(a.instance());
    }
    let shares = shares(&got);
    println!("2 replicas, 300 sequential requests: {shares:?}");
    assert_eq!(shares.len(), 2, "both replicas served: {shares:?}");
    assert!(
        shares.iter().all(|(_, s)| *s >= 0.35),
        "each replica serves at least 35%: {shares:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_equal_replicas_share_the_requests_of_four_concurrent_clients() {
    let (_mesh, _replicas, frontend) = default_catalog(3).await;
    let l = load(frontend.outbound_addr, "http://catalog:8080/", 600, 4).await;
    assert_eq!(l.ok_share(), 1.0);
    let shares = shares(&l.instances);
    println!("3 replicas, 600 requests from 4 clients: {shares:?}");
    assert_eq!(shares.len(), 3, "every replica served: {shares:?}");
    assert!(
        shares.iter().all(|(_, s)| *s >= 0.25),
        "each replica serves at least 25%: {shares:?}"
    );
}

/// Requests sent from `workers` keep-alive clients until stopped: when
/// each was answered, and by which instance.
struct SteadyLoad {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(Instant, String)>>>,
}

impl SteadyLoad {
    fn start(proxy: SocketAddr, url: &str, workers: usize) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, url) = (stop.clone(), url.to_string());
                tokio::spawn(async move {
                    let mut client = Client::new(proxy);
                    let mut out = Vec::new();
                    while !stop.load(Ordering::SeqCst) {
                        let a = client.get(&url).await;
                        assert_eq!(a.status, StatusCode::OK);
                        out.push((Instant::now(), a.instance()));
                    }
                    out
                })
            })
            .collect();
        SteadyLoad { stop, tasks }
    }

    /// Stops, and gives the instances that answered in `from..to`.
    async fn stop(self, from: Instant, to: Instant) -> Vec<String> {
        self.stop.store(true, Ordering::SeqCst);
        let mut got = Vec::new();
        for t in self.tasks {
            got.extend(
                t.await
                    .expect("a load worker")
                    .into_iter()
                    .filter(|(at, _)| (from..to).contains(at))
                    .map(|(_, i)| i),
            );
        }
        got
    }
}

/// A scale-up shows in the load at once: the replica added under steady
/// load serves its share over the 5 s after its endpoint appears in the
/// caller's config (the window is the behaviour: "within 5 s").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_added_under_load_serves_its_share_within_five_seconds() {
    const WINDOW: Duration = Duration::from_secs(5);
    let (mesh, _replicas, frontend) = default_catalog(3).await;
    let url = "http://catalog:8080/";
    let load = SteadyLoad::start(frontend.outbound_addr, url, 4);
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 3).await;

    // The window starts when the caller's config lists the new endpoint,
    // which may be before its proxy is done starting.
    let admin = frontend.admin_addr;
    let appeared = tokio::spawn(async move {
        wait_proxy_endpoints(admin, "catalog", 4).await;
        Instant::now()
    });
    let _added = replica(&mesh, "catalog", "catalog-3", &[]).await;
    let from = appeared.await.expect("the wait for the 4th endpoint");
    tokio::time::sleep_until((from + WINDOW).into()).await;
    let got = load.stop(from, from + WINDOW).await;

    let shares = shares(&got);
    println!(
        "{} requests in the {WINDOW:?} after the 4th replica appeared: {shares:?}",
        got.len()
    );
    let added = got.iter().filter(|i| *i == "catalog-3").count() as f64 / got.len() as f64;
    assert!(
        added >= 0.2,
        "the added replica serves at least 20% from the start: {shares:?}"
    );
}

/// Peak-EWMA learns that one endpoint is slow and sends it at most 5% of
/// the requests, where round robin sends it a quarter. The latencies each
/// gives are printed, not asserted: timings belong in bench/.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_ewma_sends_a_slow_endpoint_far_less_than_round_robin() {
    let mesh = TestMesh::start().await;
    mesh.apply(TWO_BALANCERS).await.expect("apply");
    let mut replicas = Vec::new();
    for i in 0..4 {
        replicas.push(replica(&mesh, "catalog", &format!("catalog-{i}"), &[]).await);
    }
    replicas[0]
        .app
        .behaviour
        .delay_ms
        .store(200, Ordering::SeqCst);
    let frontend = caller(&mesh, "frontend", &[]).await;
    mesh.wait_endpoints("catalog-rr", 4).await;
    mesh.wait_endpoints("catalog-ewma", 4).await;

    let mut shares = Vec::new();
    for svc in ["catalog-rr", "catalog-ewma"] {
        let url = format!("http://{svc}:8080/");
        // Warm up: discovery, connections, and the latency estimates.
        let warm = load(frontend.outbound_addr, &url, 100, 8).await;
        assert_eq!(warm.ok_share(), 1.0);
        wait_proxy_endpoints(frontend.admin_addr, svc, 4).await;
        let l = load(frontend.outbound_addr, &url, 800, 8).await;
        assert_eq!(l.ok_share(), 1.0, "{svc}");
        let slow = l.share_of("catalog-0");
        println!(
            "{svc}: p50 {:?}, p99 {:?}, slow endpoint share {:.1}%",
            l.quantile(0.5),
            l.quantile(0.99),
            slow * 100.0
        );
        shares.push(slow);
    }
    let (rr, ewma) = (shares[0], shares[1]);
    assert!(
        (0.2..=0.3).contains(&rr),
        "round robin gives each of 4 endpoints a quarter, the slow one {rr:.3}"
    );
    assert!(
        ewma <= 0.05,
        "peak-EWMA sent the slow endpoint {ewma:.3} of requests, round robin {rr:.3}"
    );
}

const ZONED: &str = r#"
  loadBalancer: {type: round-robin}
  outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}
  retry: {attempts: 2, codes: [500]}
  locality: {failoverThreshold: 0.7}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traffic_stays_in_the_callers_zone_until_too_few_there_are_healthy() {
    const ZONE: &str = "topology.trellis.dev/zone";
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    mesh.apply(&policy(ZONED)).await.expect("apply policy");
    let a0 = replica(&mesh, "catalog", "catalog-a0", &[(ZONE, "a")]).await;
    let _a1 = replica(&mesh, "catalog", "catalog-a1", &[(ZONE, "a")]).await;
    let _b0 = replica(&mesh, "catalog", "catalog-b0", &[(ZONE, "b")]).await;
    let _b1 = replica(&mesh, "catalog", "catalog-b1", &[(ZONE, "b")]).await;
    let frontend = caller(&mesh, "frontend", &[(ZONE, "a")]).await;
    mesh.wait_endpoints("catalog", 4).await;
    let url = "http://catalog:8080/";
    assert_eq!(
        load(frontend.outbound_addr, url, 1, 1).await.ok_share(),
        1.0
    );
    wait_proxy_endpoints(frontend.admin_addr, "catalog", 4).await;

    let l = load(frontend.outbound_addr, url, 300, 4).await;
    assert_eq!(l.ok_share(), 1.0);
    let zone_a = l.share_of("catalog-a0") + l.share_of("catalog-a1");
    println!(
        "locality: {:.1}% of requests stayed in zone a",
        zone_a * 100.0
    );
    assert_eq!(
        zone_a, 1.0,
        "every request stays in zone a while it is healthy"
    );

    // One of the two zone-a endpoints fails and is ejected: 50% healthy is
    // under the 70% threshold, so traffic spreads over both zones.
    a0.app.behaviour.fail_with.store(500, Ordering::SeqCst);
    let l = load(frontend.outbound_addr, url, 300, 4).await;
    assert_eq!(l.ok_share(), 1.0, "retries hide the failing endpoint");
    let l = load(frontend.outbound_addr, url, 300, 4).await;
    let zone_b = l.share_of("catalog-b0") + l.share_of("catalog-b1");
    println!(
        "locality: after failover {:.1}% went to zone b",
        zone_b * 100.0
    );
    assert!((0.5..0.8).contains(&zone_b), "zone b got {zone_b:.2}");
    let failovers = catalog_counter(&frontend, "trellis_locality_failovers_total").await;
    assert!(failovers >= 300.0, "{failovers}");
}
