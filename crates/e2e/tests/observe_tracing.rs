//! Distributed tracing through three services: the spans of every hop
//! chain to the caller's `traceparent`, B3 is read (and written back),
//! the caller's sampling decision is kept, bad headers start a new trace,
//! and a dead collector fails no request and holds no memory: its spans
//! are dropped and counted. (The latency figures with a dead collector are
//! printed, not asserted: timings belong in bench/.)

mod observe_common;

use std::time::{Duration, Instant};

use observe_common::*;
use serde_json::Value;
use trellis_e2e::{metric_sum, TestMesh};
use trellis_testkit::eventually;

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// Waits until the control plane keeps `n` spans of `trace`.
async fn wait_spans(mesh: &TestMesh, trace: &str, n: usize) -> Vec<Value> {
    eventually(
        &format!("trace {trace} has {n} spans"),
        Duration::from_secs(15),
        || async {
            let (status, body) = mesh.get(&format!("/api/v1/traces/{trace}")).await;
            if status != 200 {
                return Err(format!("{status}"));
            }
            let v: Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
            let spans = v["spans"].as_array().cloned().unwrap_or_default();
            if spans.len() >= n {
                Ok(spans)
            } else {
                Err(format!("{} spans", spans.len()))
            }
        },
    )
    .await
}

fn find<'a>(spans: &'a [Value], service: &str, kind: &str) -> &'a Value {
    spans
        .iter()
        .find(|s| s["service"] == service && s["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} span of {service} in {spans:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_through_three_services_chains_to_the_callers_traceparent() {
    let mesh = TestMesh::start().await;
    // Sampling 0: only the caller's sampled flag makes these traces.
    let t = three_tier(&mesh, &mesh_yaml_sampling(0.0)).await;
    let url = format!("http://{}/", t.frontend.app);
    let traceparent = format!("00-{TRACE}-{PARENT}-01");
    let (status, answer) = get(
        &url,
        &[
            ("traceparent", &traceparent),
            ("tracestate", "vendor=opaque"),
        ],
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // Each app saw the trace and a parent that is the span of the hop before.
    let catalog_answer = &answer["calls"][0]["body"];
    let reviews_answer = &catalog_answer["calls"][0]["body"];
    let catalog_tp = header(catalog_answer, "traceparent").expect("catalog got a traceparent");
    let reviews_tp = header(reviews_answer, "traceparent").expect("reviews got a traceparent");
    assert!(
        catalog_tp.contains(TRACE) && reviews_tp.contains(TRACE),
        "{catalog_tp} {reviews_tp}"
    );
    assert_eq!(header(reviews_answer, "tracestate"), Some("vendor=opaque"));

    let spans = wait_spans(&mesh, TRACE, 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let fe_client = find(&spans, "frontend", "client");
    let cat_server = find(&spans, "catalog", "server");
    let cat_client = find(&spans, "catalog", "client");
    let rev_server = find(&spans, "reviews", "server");
    assert_eq!(fe_client["parentSpanId"], PARENT);
    assert_eq!(cat_server["parentSpanId"], fe_client["spanId"]);
    assert_eq!(cat_client["parentSpanId"], cat_server["spanId"]);
    assert_eq!(rev_server["parentSpanId"], cat_client["spanId"]);
    // The app behind each server span got that span as its parent.
    assert!(
        catalog_tp.contains(cat_server["spanId"].as_str().unwrap()),
        "{catalog_tp}"
    );
    assert!(
        reviews_tp.contains(rev_server["spanId"].as_str().unwrap()),
        "{reviews_tp}"
    );
    // Spans say what happened.
    assert_eq!(cat_server["attributes"]["http.response.status_code"], 200);
    assert_eq!(
        cat_server["attributes"]["trellis.destination.service"],
        "catalog"
    );
    assert_eq!(
        cat_client["attributes"]["trellis.destination.service"],
        "reviews"
    );
    assert_eq!(cat_server["attributes"]["url.path"], "/items");
    assert!(fe_client["attributes"]["trellis.destination.identity"]
        .as_str()
        .unwrap()
        .starts_with("spiffe://"));

    // The list has it, with its root.
    let list = mesh.get_json("/api/v1/traces?service=reviews").await;
    let summary = list["traces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["traceId"] == TRACE)
        .expect("listed");
    assert_eq!(summary["spans"], 4);
    assert_eq!(summary["rootService"], "frontend");

    // An unsampled caller: context still propagates, no spans are kept.
    let unsampled = "11111111111111111111111111111111";
    let (status, answer) = get(
        &url,
        &[("traceparent", &format!("00-{unsampled}-{PARENT}-00"))],
    )
    .await;
    assert_eq!(status, 200);
    let tp = header(&answer["calls"][0]["body"], "traceparent").unwrap();
    assert!(tp.contains(unsampled) && tp.ends_with("-00"), "{tp}");
    // A sampled request after it: each proxy exports its spans in order,
    // so once this one's four spans are kept, any of the unsampled
    // request's would have been too.
    let marker = "55555555555555555555555555555555";
    let (status, _) = get(
        &url,
        &[("traceparent", &format!("00-{marker}-{PARENT}-01"))],
    )
    .await;
    assert_eq!(status, 200);
    wait_spans(&mesh, marker, 4).await;
    let (status, _) = mesh.get(&format!("/api/v1/traces/{unsampled}")).await;
    assert_eq!(status, 404, "an unsampled trace is not exported");
}

fn mesh_yaml_sampling(sampling: f64) -> String {
    mesh(&format!("  tracing: {{sampling: {sampling}}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn b3_is_read_and_written_back_and_bad_headers_start_a_new_trace() {
    let mesh = TestMesh::start().await;
    let t = three_tier(&mesh, &mesh_yaml_sampling(0.0)).await;
    let url = format!("http://{}/", t.frontend.app);

    // B3 single header.
    let b3_trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let (status, answer) = get(&url, &[("b3", &format!("{b3_trace}-e457b5a2e4d86bd1-1"))]).await;
    assert_eq!(status, 200);
    let catalog = &answer["calls"][0]["body"];
    let b3 = header(catalog, "b3").expect("B3 callers get B3 back");
    assert!(b3.starts_with(b3_trace), "{b3}");
    assert!(header(catalog, "traceparent").unwrap().contains(b3_trace));
    let spans = wait_spans(&mesh, b3_trace, 4).await;
    assert_eq!(
        find(&spans, "frontend", "client")["parentSpanId"],
        "e457b5a2e4d86bd1"
    );

    // B3 multi header, 64-bit trace id.
    let (status, answer) = get(
        &url,
        &[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "1"),
        ],
    )
    .await;
    assert_eq!(status, 200);
    let catalog = &answer["calls"][0]["body"];
    assert_eq!(
        header(catalog, "x-b3-traceid"),
        Some("0000000000000000a3ce929d0e0e4736")
    );
    wait_spans(&mesh, "0000000000000000a3ce929d0e0e4736", 4).await;

    // Malformed or hostile: ignored, a new (valid) trace starts, nothing is echoed.
    for bad in [
        "00-zzzz2f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "garbage\u{7f}",
        &format!("00-{TRACE}-{PARENT}-01-extra"),
    ] {
        let Ok(v) = http::HeaderValue::from_str(bad) else {
            continue;
        };
        let (status, answer) = get(&url, &[("traceparent", v.to_str().unwrap())]).await;
        assert_eq!(status, 200, "{bad:?}");
        let tp = header(&answer["calls"][0]["body"], "traceparent").unwrap();
        assert_ne!(tp, bad);
        assert!(
            trellis_proxy::trace::parse_traceparent(tp).is_some(),
            "{tp}"
        );
        assert!(
            !tp.contains("zzzz") && !tp.contains(&"0".repeat(32)),
            "{tp}"
        );
    }
}

/// A collector that accepts connections and never answers.
async fn black_hole() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (addr, task)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

async fn latencies(url: &str, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        let (status, _) = get(url, &[]).await;
        assert_eq!(status, 200);
        out.push(started.elapsed());
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_collector_fails_no_request_and_holds_no_memory() {
    let mesh = TestMesh::start().await;
    let t = three_tier(&mesh, &mesh_yaml_sampling(1.0)).await;
    let url = format!("http://{}/", t.frontend.app);
    latencies(&url, 50).await; // warm up connections
    let base = latencies(&url, 300).await;
    let rss = || trellis_testkit::process::rss_bytes(std::process::id()).unwrap_or(0);
    let dropped = || {
        metric_sum(
            t.catalog.proxy.admin_addr,
            "trellis_proxy_spans_dropped_total",
            &[],
        )
    };

    let (hole, _task) = black_hole().await;
    for (protocol, endpoint) in [
        ("grpc", format!("http://{hole}")),
        ("http/protobuf", format!("http://{hole}/v1/traces")),
    ] {
        mesh.apply(&observe_common::mesh(&format!(
            "  tracing: {{sampling: 1.0, otlpEndpoint: '{endpoint}', otlpProtocol: {protocol}}}"
        )))
        .await
        .expect("apply");
        mesh.wait_mesh_synced().await;
        let (rss_before, dropped_before) = (rss(), dropped().await);
        // Every request is answered (`latencies` asserts 200s) while the
        // spans of enough of them to overflow the export queue many times
        // over go nowhere.
        let dead = latencies(&url, 300).await;
        let dead_more = latencies(&url, 1500).await;
        let (rss_after, dropped_after) = (rss(), dropped().await);
        println!(
            "{protocol}: p50 {:?} -> {:?}, p99 {:?} -> {:?} (then p50 {:?}, p99 {:?} over 1500); RSS {} MB -> {} MB; catalog dropped {} spans",
            percentile(&base, 0.5),
            percentile(&dead, 0.5),
            percentile(&base, 0.99),
            percentile(&dead, 0.99),
            percentile(&dead_more, 0.5),
            percentile(&dead_more, 0.99),
            rss_before >> 20,
            rss_after >> 20,
            dropped_after - dropped_before,
        );
        assert!(
            dropped_after > dropped_before,
            "spans for a dead collector are dropped and counted"
        );
        // Bounded queues: memory does not follow the number of spans.
        assert!(
            rss_after.saturating_sub(rss_before) < 64 << 20,
            "RSS grew {} MB",
            rss_after.saturating_sub(rss_before) >> 20
        );
    }
}

/// An OTLP/gRPC collector that keeps the trace ids it gets.
struct Collector(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

#[tonic::async_trait]
impl opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService
    for Collector
{
    async fn export(
        &self,
        request: tonic::Request<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest,
        >,
    ) -> Result<
        tonic::Response<
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse,
        >,
        tonic::Status,
    > {
        let mut got = self.0.lock().unwrap();
        for rs in &request.get_ref().resource_spans {
            for ss in &rs.scope_spans {
                for s in &ss.spans {
                    got.push(trellis_proxy::trace::hex(&s.trace_id));
                }
            }
        }
        Ok(tonic::Response::new(Default::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_reach_an_otlp_collector_over_grpc_and_http() {
    let mesh = TestMesh::start().await;
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                    Collector(got.clone()),
                ),
            )
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let t = three_tier(
        &mesh,
        &observe_common::mesh(&format!(
            "  tracing: {{sampling: 0.0, otlpEndpoint: 'http://{grpc}'}}"
        )),
    )
    .await;
    let url = format!("http://{}/", t.frontend.app);
    let trace = "22222222222222222222222222222222";
    let (status, _) = get(&url, &[("traceparent", &format!("00-{trace}-{PARENT}-01"))]).await;
    assert_eq!(status, 200);
    eventually(
        "the collector gets 4 spans over gRPC",
        Duration::from_secs(15),
        || async {
            let n = got.lock().unwrap().iter().filter(|t| *t == trace).count();
            (n == 4).then_some(()).ok_or(format!("{n} spans"))
        },
    )
    .await;

    // OTLP/HTTP, to a collector of its own (the control plane's
    // /v1/traces needs a credential, which proxies do not hold).
    let http = http_collector(got.clone()).await;
    mesh.apply(&observe_common::mesh(&format!(
        "  tracing: {{sampling: 0.0, otlpEndpoint: 'http://{http}/v1/traces'}}"
    )))
    .await
    .expect("apply");
    mesh.wait_mesh_synced().await;
    let trace = "33333333333333333333333333333333";
    let (status, _) = get(&url, &[("traceparent", &format!("00-{trace}-{PARENT}-01"))]).await;
    assert_eq!(status, 200);
    eventually(
        "the collector gets 4 spans over HTTP",
        Duration::from_secs(15),
        || async {
            let n = got.lock().unwrap().iter().filter(|t| *t == trace).count();
            (n == 4).then_some(()).ok_or(format!("{n} spans"))
        },
    )
    .await;
}

/// An OTLP/HTTP collector (protobuf, any path) that keeps the trace ids it
/// gets, as `Collector` does for gRPC.
async fn http_collector(
    got: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) -> std::net::SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let got = got.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(
                    move |req: http::Request<hyper::body::Incoming>| {
                        let got = got.clone();
                        async move {
                            let body = req.into_body().collect().await?.to_bytes();
                            if let Ok(r) = <opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest as prost::Message>::decode(body) {
                            let mut got = got.lock().unwrap();
                            for rs in &r.resource_spans {
                                for ss in &rs.scope_spans {
                                    for s in &ss.spans {
                                        got.push(trellis_proxy::trace::hex(&s.trace_id));
                                    }
                                }
                            }
                        }
                            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                                bytes::Bytes::new(),
                            )))
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    addr
}
