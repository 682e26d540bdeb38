//! HTTPRoute and GRPCRoute through a whole mesh: header matches, weighted
//! splits, redirects, rewrites, mirrors, and gRPC method matches.

mod traffic_common;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use traffic_common::{caller, replica, Client};
use trellis_e2e::TestMesh;
use trellis_testkit::assert_eventually;

const CATALOG: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec: {selector: {app: catalog, version: v1}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec: {selector: {app: catalog, version: v2}, ports: [{port: 8080}]}
"#;

const CANARY: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-canary}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: catalog-v2, port: 8080}]
  - backendRefs:
    - {name: catalog-v1, port: 8080, weight: 80}
    - {name: catalog-v2, port: 8080, weight: 20}
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_match_takes_every_flagged_request_and_a_split_holds_within_four_percent() {
    let mesh = TestMesh::start().await;
    mesh.apply(CATALOG).await.expect("apply");
    mesh.apply(CANARY).await.expect("apply route");
    let _v1 = replica(&mesh, "catalog", "catalog-v1-0", &[("version", "v1")]).await;
    let _v2 = replica(&mesh, "catalog", "catalog-v2-0", &[("version", "v2")]).await;
    let frontend = caller(&mesh, "frontend", &[]).await;
    mesh.wait_endpoints("catalog-v1", 1).await;
    mesh.wait_endpoints("catalog-v2", 1).await;

    let mut client = Client::new(frontend.outbound_addr);
    for i in 0..500 {
        let a = client
            .send(
                Method::GET,
                "http://catalog:8080/items",
                &[("x-canary", "yes")],
                Bytes::new(),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK);
        assert_eq!(a.instance(), "catalog-v2-0", "flagged request {i}");
    }
    let mut v2 = 0;
    for _ in 0..2000 {
        let a = client.get("http://catalog:8080/items").await;
        assert_eq!(a.status, StatusCode::OK);
        if a.instance() == "catalog-v2-0" {
            v2 += 1;
        }
    }
    let share = v2 as f64 / 2000.0;
    println!("80/20 split: v2 got {:.1}% of 2000 requests", share * 100.0);
    assert!(
        (0.16..=0.24).contains(&share),
        "v2 got {share:.3} of traffic, want 0.20 ± 0.04"
    );
}

const FILTERS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-filters}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: shop.example.org
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}
        statusCode: 301
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: catalog.internal
        path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}
    backendRefs: [{name: catalog, port: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_answer_at_the_caller_and_rewrites_reach_the_app() {
    let mesh = TestMesh::start().await;
    mesh.apply(CATALOG).await.expect("apply");
    mesh.apply(FILTERS).await.expect("apply route");
    let catalog = replica(&mesh, "catalog", "catalog-0", &[]).await;
    let frontend = caller(&mesh, "frontend", &[]).await;
    mesh.wait_endpoints("catalog", 1).await;
    let mut client = Client::new(frontend.outbound_addr);

    let a = client.get("http://catalog:8080/old/items?page=2").await;
    assert_eq!(a.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(
        a.headers["location"],
        "http://shop.example.org:8080/new/items?page=2"
    );
    assert_eq!(catalog.app.hits(), 0, "a redirect never reaches the app");

    let a = client.get("http://catalog:8080/api/items?page=2").await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = catalog.app.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path_and_query, "/v2/items?page=2");
    assert_eq!(seen[0].headers["host"], "catalog.internal");
}

const MIRROR: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: shadow}
spec: {selector: {app: shadow}, ports: [{port: 8080}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-mirror}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 50}}
    backendRefs: [{name: catalog, port: 8080}]
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 8080}}}
    backendRefs: [{name: catalog, port: 8080}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_get_copies_without_changing_or_delaying_the_primary() {
    let mesh = TestMesh::start().await;
    mesh.apply(CATALOG).await.expect("apply");
    mesh.apply(MIRROR).await.expect("apply mirror");
    let catalog = replica(&mesh, "catalog", "catalog-0", &[]).await;
    let shadow = replica(&mesh, "shadow", "shadow-0", &[]).await;
    // The mirror is broken and answers nothing while held: the primary
    // must not notice.
    shadow
        .app
        .behaviour
        .fail_with
        .store(500, std::sync::atomic::Ordering::SeqCst);
    shadow.app.hold();
    let frontend = caller(&mesh, "frontend", &[]).await;
    mesh.wait_endpoints("catalog", 1).await;
    mesh.wait_endpoints("shadow", 1).await;
    let mut client = Client::new(frontend.outbound_addr);

    let mut slowest = Duration::ZERO;
    for i in 0..200 {
        let t = std::time::Instant::now();
        let a = client
            .send(
                Method::POST,
                &format!("http://catalog:8080/orders/{i}"),
                &[("content-type", "application/json")],
                Bytes::from(format!("{{\"order\":{i}}}")),
            )
            .await;
        slowest = slowest.max(t.elapsed());
        assert_eq!(
            a.status,
            StatusCode::OK,
            "{}",
            String::from_utf8_lossy(&a.body)
        );
        assert_eq!(a.instance(), "catalog-0");
        assert_eq!(a.flags(), "");
    }
    println!("mirror: slowest primary answer {slowest:?} while the mirror answers nothing");
    // Every primary was answered while the mirror held every copy it got.
    assert_eventually!(
        shadow.app.in_flight() == 200,
        "the mirror holds {} of 200 copies",
        shadow.app.in_flight()
    );
    assert_eq!(shadow.app.hits(), 200);
    let copy = shadow
        .app
        .seen()
        .into_iter()
        .find(|s| s.path_and_query == "/orders/7")
        .expect("the copy of /orders/7");
    assert_eq!(copy.method, Method::POST);
    assert_eq!(copy.body, Bytes::from("{\"order\":7}"));
    assert_eq!(catalog.app.hits(), 200);

    // A 50% mirror gets about half. (First let the held copies finish: at
    // most 256 may be out at once, and the rest would be dropped.)
    shadow.app.release();
    assert_eventually!(shadow.app.in_flight() == 0);
    for _ in 0..1000 {
        assert_eq!(
            client.get("http://catalog:8080/half").await.status,
            StatusCode::OK
        );
    }
    let mirrored = |outcome: &'static str| {
        let admin = frontend.admin_addr;
        async move {
            trellis_e2e::metric_sum(
                admin,
                "trellis_mirrored_requests_total",
                &[("destination_service", "shadow"), ("outcome", outcome)],
            )
            .await as u64
        }
    };
    let half = trellis_testkit::eventually(
        "every copy sent reaches the mirror",
        Duration::from_secs(15),
        || async {
            let sent = mirrored("sent").await - 200;
            let arrived = shadow.app.hits() - 200;
            (arrived == sent)
                .then_some(sent)
                .ok_or(format!("{arrived} of {sent} arrived"))
        },
    )
    .await;
    println!("50% mirror: {half} copies of 1000 requests");
    assert_eq!(mirrored("dropped").await, 0);
    assert!((420..=580).contains(&half), "{half} copies of 1000 at 50%");
}

const HEALTH_SERVICES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: health}
spec: {selector: {app: health}, ports: [{port: 50051, protocol: grpc}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: health-v2}
spec: {selector: {app: health, version: v2}, ports: [{port: 50051, protocol: grpc}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: health}
spec:
  targetRef: {kind: Service, name: health}
  loadBalancer: {type: round-robin}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: health-canary}
spec:
  parentRefs: [{kind: Service, name: health}]
  rules:
  - matches:
    - method: {service: grpc.health.v1.Health, method: Check}
      headers: [{name: x-canary, value: "yes"}]
    backendRefs: [{name: health-v2, port: 50051}]
"#;

/// A gRPC health server that reports `catalog` with `status`.
async fn health_server(status: tonic_health::ServingStatus) -> u16 {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter.set_service_status("catalog", status).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_route_matches_method_and_header() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;

    let mesh = TestMesh::start().await;
    mesh.apply(HEALTH_SERVICES).await.expect("apply");
    // v1 says SERVING, v2 NOT_SERVING: the answer tells who served.
    let v1 = health_server(tonic_health::ServingStatus::Serving).await;
    let v2 = health_server(tonic_health::ServingStatus::NotServing).await;
    let _p1 = mesh
        .sidecar("health-v1", &[("app", "health"), ("version", "v1")], v1)
        .await;
    let _p2 = mesh
        .sidecar("health-v2", &[("app", "health"), ("version", "v2")], v2)
        .await;
    mesh.wait_endpoints("health", 2).await;
    mesh.wait_endpoints("health-v2", 1).await;
    let (cport, _c) = trellis_e2e::demo_app("client", "v1", "client-0").await;
    let client_proxy = mesh
        .sidecar_with_upstream("client", cport, "health", 50051)
        .await;
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        client_proxy.upstream_addrs[0]
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = HealthClient::new(channel);
    let check = |canary: bool| {
        let mut req = tonic::Request::new(HealthCheckRequest {
            service: "catalog".into(),
        });
        if canary {
            req.metadata_mut()
                .insert("x-canary", "yes".parse().unwrap());
        }
        req
    };
    for _ in 0..50 {
        let status = client.check(check(true)).await.unwrap().into_inner().status;
        assert_eq!(
            status,
            ServingStatus::NotServing as i32,
            "canary calls go to v2"
        );
    }
    // Without the header no rule matches: the parent's own endpoints, v1
    // and v2 in turn.
    let mut serving = 0;
    for _ in 0..100 {
        let status = client
            .check(check(false))
            .await
            .unwrap()
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            serving += 1;
        }
    }
    assert!(
        (40..=60).contains(&serving),
        "round robin over v1 and v2, yet {serving} of 100 reached v1"
    );
}
