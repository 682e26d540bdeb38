//! A proxy that protects itself (issue 12, item 3): each finding of the
//! hardening review reproduced against a whole mesh on loopback, and what
//! the proxy does instead. Every test prints its figures; none asserts
//! speed. The HTTP/2 attacks write hand-made frames (`frames`), so that
//! they are paced exactly as the attack needs.
//!
//! `out_of_descriptors_...` runs a proxy in a child process (this test
//! binary again) with a low open-file limit, as crates/proxy/tests/accept.rs
//! does for the accept loop alone.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_e2e::{eventually, Answer, ProxyClient, TestMesh};
use trellis_proxy::limits::Limits;
use trellis_proxy::Proxy;
use trellis_testkit::yaml;

/// How long a test waits for something that must happen (never a figure
/// asserted: a wait ends as soon as its fact holds).
const WAIT: Duration = Duration::from_secs(15);

/// Open descriptors of this process, which runs the proxies under test.
fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

fn rss_mib() -> u64 {
    trellis_testkit::process::rss_bytes(std::process::id()).unwrap_or(0) >> 20
}

/// A mesh with Service `web` (port 8080) served by `app_port` behind a
/// sidecar whose limits `tune` sets.
async fn web(mesh: &TestMesh, app_port: u16, tune: impl FnOnce(&mut Limits)) -> Proxy {
    mesh.apply(&yaml::service("web")).await.expect("apply");
    let mut cfg = mesh.proxy_config("web", &[("app", "web")], app_port);
    tune(&mut cfg.limits);
    let proxy = Proxy::start(cfg).await.expect("proxy starts");
    mesh.wait_endpoints("web", 1).await;
    proxy
}

async fn demo(name: &str) -> u16 {
    trellis_e2e::demo_app(name, "v1", &format!("{name}-0"))
        .await
        .0
}

/// An app that reads each request body whole, then answers 200; it counts
/// requests as they arrive (before their body) and serves HTTP/1.1 and h2c.
async fn counting_app() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let body = req.into_body().collect().await;
                        let status = if body.is_ok() {
                            StatusCode::OK
                        } else {
                            StatusCode::BAD_REQUEST
                        };
                        let mut r = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                        *r.status_mut() = status;
                        Ok::<_, hyper::Error>(r)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, count)
}

fn answer_text(a: &Answer) -> String {
    format!(
        "{} (x-trellis-error: {:?}): {}",
        a.status,
        a.headers.get("x-trellis-error"),
        String::from_utf8_lossy(&a.body)
    )
}

/// Samples this process's descriptors and RSS every 10 ms until dropped,
/// keeping the highest.
struct Peak {
    stop: Arc<AtomicBool>,
    fds: Arc<AtomicUsize>,
    rss: Arc<AtomicU64>,
}

impl Peak {
    fn start() -> Peak {
        let p = Peak {
            stop: Arc::new(AtomicBool::new(false)),
            fds: Arc::new(AtomicUsize::new(fds())),
            rss: Arc::new(AtomicU64::new(rss_mib())),
        };
        let (stop, f, r) = (p.stop.clone(), p.fds.clone(), p.rss.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                f.fetch_max(fds(), Ordering::SeqCst);
                r.fetch_max(rss_mib(), Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        p
    }

    fn read(&self) -> (usize, u64) {
        (self.fds.load(Ordering::SeqCst), self.rss.load(Ordering::SeqCst))
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_the_proxys_own_listener_is_refused_not_looped() {
    let mesh = TestMesh::start().await;
    let app = demo("web").await;
    // Outbound on 0.0.0.0: reached through any local address.
    let mut cfg = mesh.proxy_config("web", &[("app", "web")], app);
    cfg.outbound_addr = ([0, 0, 0, 0], 0).into();
    mesh.apply(&yaml::service("web")).await.expect("apply");
    let proxy = Proxy::start(cfg).await.expect("proxy starts");
    let out: SocketAddr = ([127, 0, 0, 1], proxy.outbound_addr.port()).into();
    let (fds_before, rss_before) = (fds(), rss_mib());
    let peak = Peak::start();
    let mut client = ProxyClient::new(out);
    let port = out.port();
    for url in [
        format!("http://127.0.0.1:{port}/loop"),
        format!("http://127.0.0.2:{port}/loop"),
        format!("http://0.0.0.0:{port}/loop"),
        format!("http://localhost:{port}/loop"),
        format!("http://[::1]:{port}/loop"),
        format!("http://{}/loop", proxy.inbound_addr),
        format!("http://{}/loop", proxy.admin_addr),
    ] {
        let a = client
            .try_send(Method::GET, &url, &[], Bytes::new())
            .await
            .unwrap_or_else(|e| panic!("{url}: {e:#}"));
        eprintln!("{url}: {}", answer_text(&a));
        assert_eq!(a.status, StatusCode::LOOP_DETECTED, "{url}: {}", answer_text(&a));
        assert_eq!(a.headers["x-trellis-error"], "downstream", "{url}");
    }
    // The proxy still serves.
    let a = client
        .send(Method::GET, "http://web:8080/", &[], Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    let (fds_peak, rss_peak) = peak.read();
    eprintln!(
        "self-loop attempts: descriptors {fds_before} -> peak {fds_peak}, RSS {rss_before} MiB -> peak {rss_peak} MiB"
    );
    assert!(
        fds_peak < fds_before + 50,
        "descriptors grew from {fds_before} to {fds_peak}"
    );
    assert!(
        rss_peak < rss_before + 64,
        "RSS grew from {rss_before} to {rss_peak} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loop_through_two_proxies_ends_at_the_hop_limit() {
    // A's --upstream listener sends to B's and B's to A's, both as
    // addresses outside the mesh: neither is the other's own listener.
    let mesh = TestMesh::start().await;
    let (ua, ub) = (trellis_testkit::free_addr(), trellis_testkit::free_addr());
    let mut proxies = Vec::new();
    for (name, listen, to) in [("a", ua, ub), ("b", ub, ua)] {
        let app = demo(name).await;
        let mut cfg = mesh.proxy_config(name, &[("app", name)], app);
        cfg.limits.max_hops = 8;
        cfg.upstreams
            .push(format!("{to}={listen}").parse().expect("an --upstream"));
        proxies.push(Proxy::start(cfg).await.expect("proxy starts"));
    }
    let (fds_before, rss_before) = (fds(), rss_mib());
    let peak = Peak::start();
    let a = trellis_testkit::http_request(
        Method::GET,
        &format!("http://{ua}/loop"),
        &[],
        Bytes::new(),
        None,
    )
    .await
    .expect("an answer");
    let (fds_peak, rss_peak) = peak.read();
    let body = String::from_utf8_lossy(a.body());
    eprintln!(
        "loop through two proxies: {} {body}; descriptors {fds_before} -> peak {fds_peak}, RSS {rss_before} -> peak {rss_peak} MiB",
        a.status()
    );
    assert_eq!(a.status(), StatusCode::LOOP_DETECTED, "{body}");
    assert!(body.contains("x-trellis-hops"), "{body}");
    assert!(fds_peak < fds_before + 100, "descriptors grew to {fds_peak}");
}

/// Connections that send a request's header one byte at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_at_the_header_timeout() {
    const CONNS: usize = 200;
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.header_read_timeout = Duration::from_secs(2)
    })
    .await;
    let open = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..CONNS {
        let mut tcp = TcpStream::connect(proxy.outbound_addr).await.unwrap();
        tcp.write_all(b"GET http://web:8080/ HTTP/1.1\r\nHost: web:8080\r\nX-Slow: ")
            .await
            .unwrap();
        open.fetch_add(1, Ordering::SeqCst);
        let open = open.clone();
        tasks.push(tokio::spawn(async move {
            // A byte every 500 ms for at most 10 s; what came back.
            let mut got = Vec::new();
            let mut buf = [0u8; 512];
            let end = tokio::time::Instant::now() + Duration::from_secs(10);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let closed = loop {
                tokio::select! {
                    r = tcp.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break true,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    },
                    _ = tick.tick() => {
                        if tokio::time::Instant::now() > end {
                            break false;
                        }
                        if tcp.write_all(b"x").await.is_err() {
                            break true;
                        }
                    }
                }
            };
            open.fetch_sub(1, Ordering::SeqCst);
            (closed, String::from_utf8_lossy(&got).to_string())
        }));
    }
    let mut held = Vec::new();
    for s in 1..=4 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        held.push(format!("{s}s: {}", open.load(Ordering::SeqCst)));
    }
    eprintln!("slowloris, {CONNS} connections held after {}", held.join(", "));
    let mut closed = 0;
    let mut answered_408 = 0;
    for t in tasks {
        let (was_closed, got) = t.await.unwrap();
        closed += usize::from(was_closed);
        answered_408 += usize::from(got.starts_with("HTTP/1.1 408"));
    }
    eprintln!("slowloris: {closed} of {CONNS} closed by the proxy, {answered_408} with a 408");
    assert_eq!(closed, CONNS, "slowloris connections held past 10 s");
    assert_eq!(answered_408, CONNS, "each partial request is answered 408");
    let closes = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_connections_closed_by_limit_total",
        &[("listener", "outbound"), ("reason", "header_timeout")],
    )
    .await;
    assert_eq!(closes as usize, CONNS, "counted");
}

/// Idle connections past the listener's cap are shed at once; connections
/// it holds keep being served; idle ones go at the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_flood_is_shed_past_the_cap_and_served_connections_go_on() {
    const CAP: usize = 100;
    const FLOOD: usize = 300;
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.max_connections = CAP;
        l.header_read_timeout = Duration::from_secs(3);
    })
    .await;
    let mut client = ProxyClient::new(proxy.outbound_addr);
    let url = "http://web:8080/";
    let first = client.send(Method::GET, url, &[], Bytes::new()).await;
    assert_eq!(first.status, StatusCode::OK, "{}", answer_text(&first));

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        flood.push(TcpStream::connect(proxy.outbound_addr).await.unwrap());
    }
    // A shed connection is closed at once: its read ends within a second.
    let reads = flood.into_iter().map(|mut tcp| async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(1), tcp.read(&mut b)).await;
        (matches!(r, Ok(Ok(0)) | Ok(Err(_))), tcp)
    });
    let results = futures::future::join_all(reads).await;
    let shed = results.iter().filter(|(s, _)| *s).count();
    eprintln!("idle flood: {FLOOD} connections past one served, cap {CAP}: {shed} shed, {} held", FLOOD - shed);
    assert!(
        shed >= FLOOD - CAP + 1,
        "{shed} of {FLOOD} shed with a cap of {CAP}"
    );
    let counted = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_connections_shed_total",
        &[("listener", "outbound"), ("reason", "cap")],
    )
    .await;
    assert_eq!(counted as usize, shed, "every shed connection is counted");

    // The connection served before the flood is served on.
    let again = client.send(Method::GET, url, &[], Bytes::new()).await;
    assert_eq!(again.status, StatusCode::OK, "{}", answer_text(&again));

    // The idle ones are closed at the header timeout; then new clients
    // get in again.
    let held: Vec<TcpStream> = results.into_iter().filter(|(s, _)| !*s).map(|(_, t)| t).collect();
    for mut tcp in held {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(WAIT, tcp.read(&mut b)).await;
        assert!(matches!(r, Ok(Ok(0)) | Ok(Err(_))), "an idle connection was held");
    }
    let mut fresh = ProxyClient::new(proxy.outbound_addr);
    let a = fresh.send(Method::GET, url, &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
}

/// Paced rapid reset: one HEADERS and its RST_STREAM per write, each stream
/// taken by the proxy (and sent on to the app) before its reset arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_is_answered_with_goaway() {
    const STREAMS: u32 = 3000;
    let mesh = TestMesh::start().await;
    mesh.apply(&yaml::mesh("{mtls: permissive}")).await.unwrap();
    let (app, reached) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    mesh.wait_mesh_synced().await;
    let mut conn = frames::Conn::open(proxy.inbound_addr).await;
    let mut sent = 0;
    for n in 0..STREAMS {
        let id = 2 * n + 1;
        let mut w = frames::headers(id, "web:8080", true);
        w.extend(frames::rst_stream(id, frames::CANCEL));
        if conn.goaway().is_some() || conn.write(&w).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let closed = conn.closed(WAIT).await;
    let goaway = conn.goaway();
    let reached = reached.load(Ordering::SeqCst);
    eprintln!(
        "paced rapid reset: {sent} streams sent, {reached} reached the app, GOAWAY {goaway:?}, closed {closed}"
    );
    assert!(goaway.is_some(), "no GOAWAY after {sent} reset streams");
    assert!(closed, "the connection stayed open");
    assert!(sent < STREAMS, "all {sent} streams were taken");
    assert!(reached <= 600, "{reached} reset streams reached the app");
    let counted = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_connections_closed_by_limit_total",
        &[("listener", "inbound"), ("reason", "reset_flood")],
    )
    .await;
    assert_eq!(counted, 1.0);
}

/// A header block that never ends (CONTINUATION after CONTINUATION).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_continuation_flood_is_refused() {
    const FRAMES: usize = 100_000;
    let mesh = TestMesh::start().await;
    mesh.apply(&yaml::mesh("{mtls: permissive}")).await.unwrap();
    let (app, reached) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    mesh.wait_mesh_synced().await;
    let mut conn = frames::Conn::open(proxy.inbound_addr).await;
    let mut w = frames::headers(1, "web:8080", false);
    let mut sent = 0;
    while sent < FRAMES {
        for _ in 0..100 {
            // Each a literal header `x-a: a`, never indexed.
            w.extend(frames::frame(frames::CONTINUATION, 0, 1, b"\x10\x03x-a\x01a"));
        }
        sent += 100;
        if conn.goaway().is_some() || conn.write(&w).await.is_err() {
            break;
        }
        w.clear();
    }
    let closed = conn.closed(WAIT).await;
    eprintln!(
        "CONTINUATION flood: {sent} frames written, GOAWAY {:?}, closed {closed}",
        conn.goaway()
    );
    assert!(closed, "the connection stayed open");
    assert!(sent < FRAMES, "all {sent} CONTINUATION frames were read");
    assert_eq!(reached.load(Ordering::SeqCst), 0);
}

/// A request whose chunked body breaks off is the client's fault: 400,
/// counted as downstream, on the mesh path and on the way out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_a_client_error() {
    let mesh = TestMesh::start().await;
    let (app, _) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    for target in ["web:8080".to_string(), format!("127.0.0.1:{app}")] {
        let mut tcp = TcpStream::connect(proxy.outbound_addr).await.unwrap();
        let head = format!(
            "POST http://{target}/upload HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // Let the request reach the app before the body breaks.
        tokio::time::sleep(Duration::from_millis(200)).await;
        tcp.write_all(b"zz\r\nnot a chunk\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        eprintln!("broken chunked body to {target}: {}", got.lines().next().unwrap_or(""));
        assert!(got.starts_with("HTTP/1.1 400 "), "{target}: {got}");
        assert!(got.contains("x-trellis-error: downstream"), "{target}: {got}");
    }
    let downstream = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_proxy_errors_total",
        &[("source", "downstream"), ("status_code", "400")],
    )
    .await;
    assert_eq!(downstream, 2.0);
}

/// The same header limits on every hop: what the first proxy lets through,
/// the second does too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_the_first_hop_takes_crosses_the_mesh() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |_| {}).await;
    let mut client = ProxyClient::new(proxy.outbound_addr);
    let url = "http://web:8080/";
    let big = "a".repeat(16 * 1024);
    let a = client
        .send(Method::GET, url, &[("x-big", &big)], Bytes::new())
        .await;
    eprintln!("16 KiB header across the mesh: {}", a.status);
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    // Just within the default 60 KiB (name + value + 32 per header).
    let near = "a".repeat(60 * 1024 - 1024);
    let a = client
        .send(Method::GET, url, &[("x-big", &near)], Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    // Past it: refused by the first hop, as the client's error.
    let over = "a".repeat(61 * 1024);
    let mut fresh = ProxyClient::new(proxy.outbound_addr);
    let a = fresh
        .send(Method::GET, url, &[("x-big", &over)], Bytes::new())
        .await;
    eprintln!("61 KiB header: {}", answer_text(&a));
    assert_eq!(a.status, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE);
    assert_eq!(a.headers["x-trellis-error"], "downstream");
}

/// HEAD answered by the proxy itself, and by the demo app, over h2c: the
/// answer ends its stream (a HEAD response has no content).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_over_http2_ends_its_stream() {
    let mesh = TestMesh::start().await;
    let app = demo("web").await;
    let proxy = web(&mesh, app, |_| {}).await;
    let app_addr: SocketAddr = ([127, 0, 0, 1], app).into();
    for (what, addr, authority, want) in [
        ("the proxy's own 503", proxy.outbound_addr, "nosuch:80", 503),
        ("the demo app", app_addr, "web:8080", 200),
        ("the demo app through the mesh", proxy.outbound_addr, "web:8080", 200),
    ] {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut tx, conn) = hyper::client::conn::http2::handshake::<_, _, Empty<Bytes>>(
            TokioExecutor::new(),
            TokioIo::new(tcp),
        )
        .await
        .unwrap();
        tokio::spawn(conn);
        let req = Request::head(format!("http://{authority}/"))
            .body(Empty::new())
            .unwrap();
        let resp = tx.send_request(req).await.expect("an answer");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await;
        eprintln!("HEAD over h2c, {what}: {status}, body {:?}", body.as_ref().map(|b| b.to_bytes().len()));
        assert_eq!(status, want, "{what}");
        let body = body.unwrap_or_else(|e| panic!("{what}: the stream did not end cleanly: {e}"));
        assert!(body.to_bytes().is_empty(), "{what}");
    }
}

/// Server-streaming gRPC through the mesh: 64 calls of 10 small messages
/// over 4 client connections, whose clients read nothing until every
/// call has its headers (slow readers). The messages wait in the
/// caller's proxy, on the one connection to the server's proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_grpc_with_slow_readers_does_not_break_the_peer_connection() {
    const CALLS: usize = 64;
    const CONNS: usize = 4;
    let mesh = TestMesh::start().await;
    mesh.apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: stream}\n\
         spec:\n  selector: {app: stream}\n  ports: [{port: 50051, protocol: grpc}]\n",
    )
    .await
    .unwrap();
    let app = streaming_app().await;
    let _server = mesh.sidecar("stream", &[("app", "stream")], app).await;
    mesh.wait_endpoints("stream", 1).await;
    let client_proxy = mesh
        .sidecar_with_upstream("client", demo("client").await, "stream", 50051)
        .await;
    let upstream = client_proxy.upstream_addrs[0];
    let mut senders = Vec::new();
    for _ in 0..CONNS {
        let tcp = TcpStream::connect(upstream).await.unwrap();
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            // Room for one message per call: the rest waits in the proxies.
            .initial_stream_window_size(150)
            .handshake::<_, Full<Bytes>>(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        senders.push(tx);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(CALLS));
    let mut calls = Vec::new();
    for i in 0..CALLS {
        let mut tx = senders[i % CONNS].clone();
        let barrier = barrier.clone();
        calls.push(tokio::spawn(async move {
            let req = Request::post("http://stream:50051/test.Stream/Ten")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
                .unwrap();
            let resp = tokio::time::timeout(WAIT, tx.send_request(req)).await;
            barrier.wait().await;
            let resp = resp.map_err(|_| "no headers".to_string())?.map_err(|e| e.to_string())?;
            let body = tokio::time::timeout(WAIT, resp.into_body().collect())
                .await
                .map_err(|_| "no body".to_string())?
                .map_err(|e| format!("{e:?}"))?;
            let status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
            let len = body.to_bytes().len();
            if len != 10 * 100 || status.as_ref().is_none_or(|s| s != "0") {
                return Err(format!("{len} bytes, grpc-status {status:?}"));
            }
            Ok::<_, String>(())
        }));
    }
    let mut errors = Vec::new();
    for c in calls {
        if let Err(e) = c.await.unwrap() {
            errors.push(e);
        }
    }
    eprintln!(
        "streaming gRPC, {CALLS} calls x 10 x 100 B over {CONNS} connections with slow readers: {} failed {:?}",
        errors.len(),
        errors.first()
    );
    assert!(errors.is_empty(), "{} of {CALLS} calls failed: {errors:?}", errors.len());
}

/// An h2c app that answers every call with ten 100-byte DATA frames (a
/// gRPC message each) and `grpc-status: 0`.
async fn streaming_app() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req: Request<Incoming>| async {
                    let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> =
                        Vec::new();
                    for _ in 0..10 {
                        let mut m = vec![0u8, 0, 0, 0, 95];
                        m.extend([7u8; 95]);
                        frames.push(Ok(Frame::data(Bytes::from(m))));
                    }
                    let mut t = http::HeaderMap::new();
                    t.insert("grpc-status", "0".parse().unwrap());
                    frames.push(Ok(Frame::trailers(t)));
                    let mut r = Response::new(StreamBody::new(futures::stream::iter(frames)));
                    r.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    Ok::<_, hyper::Error>(r)
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    port
}

/// Permissive mode: plaintext that says nothing is not carried to the app
/// unless the app's Service declares the port `tcp` (a server-speaks-first
/// protocol), when it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_plaintext_is_closed_unless_the_service_declares_tcp() {
    const SILENT: usize = 20;
    let mesh = TestMesh::start().await;
    mesh.apply(&yaml::mesh("{mtls: permissive}")).await.unwrap();
    let (app, accepted) = banner_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    mesh.wait_mesh_synced().await;
    let mut silent = Vec::new();
    for _ in 0..SILENT {
        silent.push(TcpStream::connect(proxy.inbound_addr).await.unwrap());
    }
    for mut tcp in silent {
        let mut got = Vec::new();
        let r = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
        assert!(r.is_ok(), "a silent plaintext client was held");
        assert!(got.is_empty(), "a silent client got {:?}", String::from_utf8_lossy(&got));
    }
    let carried = accepted.load(Ordering::SeqCst);
    let closed = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_connections_closed_by_limit_total",
        &[("listener", "inbound"), ("reason", "detect_timeout")],
    )
    .await;
    eprintln!("{SILENT} silent plaintext clients: {carried} carried to the app, {closed} closed");
    assert_eq!(carried, 0, "silent clients reached the app");
    assert_eq!(closed as usize, SILENT);

    // A Service that declares its port tcp: the banner comes through.
    let (app2, accepted2) = banner_app().await;
    mesh.apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: smtp}\n\
         spec:\n  selector: {app: smtp}\n  ports: [{port: 25, protocol: tcp}]\n",
    )
    .await
    .unwrap();
    let smtp = mesh.sidecar("smtp", &[("app", "smtp")], app2).await;
    mesh.wait_endpoints("smtp", 1).await;
    let banner = eventually("a silent client gets the app's banner", WAIT, || async {
        let mut tcp = TcpStream::connect(smtp.inbound_addr).await.map_err(|e| e.to_string())?;
        let mut b = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut b))
            .await
            .map_err(|_| "nothing".to_string())?
            .map_err(|e| e.to_string())?;
        (n > 0)
            .then(|| String::from_utf8_lossy(&b[..n]).to_string())
            .ok_or_else(|| "closed".to_string())
    })
    .await;
    assert!(banner.starts_with("220 "), "{banner}");
    assert!(accepted2.load(Ordering::SeqCst) >= 1);
}

/// A server-speaks-first app: writes a banner on accept, counts accepts.
async fn banner_app() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            seen.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = tcp.write_all(b"220 ready\r\n").await;
                let mut sink = Vec::new();
                let _ = tcp.read_to_end(&mut sink).await;
            });
        }
    });
    (port, count)
}

const CHILD: &str = "TRELLIS_SECURITY_PROXY_CHILD";
const CHILD_TEST: &str = "out_of_descriptors_the_proxy_sheds_new_connections_and_serves_the_ones_it_has";
/// The child proxy's open-file limit.
const NOFILE: usize = 256;

/// A whole proxy at its descriptor limit: new connections are shed (and
/// counted), the connections it has keep being served, and it does not
/// spin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_proxy_sheds_new_connections_and_serves_the_ones_it_has() {
    if let Ok(cfg) = std::env::var(CHILD) {
        return child(&cfg).await;
    }
    const FLOOD: usize = 600;
    let mesh = TestMesh::start().await;
    let _web = web(&mesh, demo("web").await, |_| {}).await;
    let cfg = mesh.proxy_config("client", &[("app", "client")], demo("client").await);
    let mut child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", CHILD_TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD, serde_json::to_string(&cfg).unwrap())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sh runs the child");
    let pid = child.id().expect("a pid");
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let outbound: SocketAddr = read_value(&mut lines, "outbound").await.parse().unwrap();
    let admin: SocketAddr = read_value(&mut lines, "admin").await.parse().unwrap();

    // Connections made before the flood: an app's, and a scraper's.
    let mut app = ProxyClient::new(outbound);
    let url = "http://web:8080/";
    let a = eventually("the child proxy serves", WAIT, || app.try_send(Method::GET, url, &[], Bytes::new())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    let mut scraper = ProxyClient::new(admin);
    let metrics = |page: Answer| {
        trellis_testkit::prometheus::Metrics::parse(&String::from_utf8_lossy(&page.body)).unwrap()
    };
    let scrape_url = format!("http://{admin}/metrics");
    metrics(scraper.send(Method::GET, &scrape_url, &[], Bytes::new()).await);

    let mut flood = Vec::new();
    for _ in 0..FLOOD {
        match TcpStream::connect(outbound).await {
            Ok(t) => flood.push(t),
            Err(e) => panic!("the kernel refused a connection: {e}"),
        }
    }
    // A shed connection is closed soon (within the accept loop's backoff).
    let reads = flood.into_iter().map(|mut tcp| async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut b)).await;
        (matches!(r, Ok(Ok(0)) | Ok(Err(_))), tcp)
    });
    let results = futures::future::join_all(reads).await;
    let shed = results.iter().filter(|(s, _)| *s).count();
    eprintln!("descriptor limit {NOFILE}: {FLOOD} new connections, {shed} shed, {} held", FLOOD - shed);
    assert!(shed >= FLOOD - NOFILE, "only {shed} of {FLOOD} shed at a limit of {NOFILE}");

    // The connections it had are served on.
    for _ in 0..5 {
        let a = app.send(Method::GET, url, &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    }
    let before = metrics(scraper.send(Method::GET, &scrape_url, &[], Bytes::new()).await);
    let counted = before.sum(
        "trellis_connections_shed_total",
        &[("listener", "outbound"), ("reason", "descriptors")],
    );
    assert!(counted as usize >= shed, "{counted} counted, {shed} shed");

    // Holding what it has at the limit, it does not spin.
    let cpu = |p| {
        let s = procfs::process::Process::new(p as i32).unwrap().stat().unwrap();
        (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64
    };
    let cpu_before = cpu(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_used = cpu(pid) - cpu_before;
    let after = metrics(scraper.send(Method::GET, &scrape_url, &[], Bytes::new()).await);
    let errors = |m: &trellis_testkit::prometheus::Metrics| {
        m.sum("trellis_accept_errors_total", &[("listener", "outbound"), ("reason", "descriptors")])
    };
    eprintln!(
        "at the limit for 2 s: {cpu_used:.3} s of CPU, {} failed accepts",
        errors(&after) - errors(&before)
    );
    assert!(errors(&after) - errors(&before) <= 12.0, "the accept loop spins");
    assert!(cpu_used < 0.5, "{cpu_used:.2} s of CPU in 2 s at the descriptor limit");

    // Descriptors come back: new clients are served again.
    drop(results);
    let mut fresh = ProxyClient::new(outbound);
    let a = eventually("a new client is served", WAIT, || fresh.try_send(Method::GET, url, &[], Bytes::new())).await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    drop(child.stdin.take());
    let status = child.wait().await.unwrap();
    assert!(status.success(), "the child failed: {status}");
}

async fn read_value(
    lines: &mut tokio::io::BufReader<tokio::process::ChildStdout>,
    key: &str,
) -> String {
    use tokio::io::AsyncBufReadExt;
    let key = format!("{key} ");
    let mut line = String::new();
    loop {
        line.clear();
        let n = tokio::time::timeout(WAIT, lines.read_line(&mut line))
            .await
            .expect("the child answers")
            .unwrap();
        assert!(n > 0, "the child ended before saying {key}");
        if let Some((_, v)) = line.trim_end().split_once(&key) {
            return v.to_string();
        }
    }
}

/// The child: a proxy with the parent's config, until stdin closes.
async fn child(cfg: &str) {
    let cfg: trellis_proxy::ProxyConfig = serde_json::from_str(cfg).unwrap();
    let proxy = Proxy::start(cfg).await.expect("the child's proxy starts");
    println!("outbound {}", proxy.outbound_addr);
    println!("admin {}", proxy.admin_addr);
    let mut sink = Vec::new();
    let _ = tokio::io::stdin().read_to_end(&mut sink).await;
}

/// Hand-made HTTP/2 frames, for attacks a conforming client library will
/// not make.
mod frames {
    use super::*;

    pub const CONTINUATION: u8 = 0x9;
    pub const CANCEL: u32 = 0x8;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const GOAWAY: u8 = 0x7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend(&len.to_be_bytes()[1..]);
        f.extend([kind, flags]);
        f.extend(stream.to_be_bytes());
        f.extend(payload);
        f
    }

    /// `GET http://authority/`: END_HEADERS, and END_STREAM when `end`.
    pub fn headers(stream: u32, authority: &str, end: bool) -> Vec<u8> {
        // :method GET, :scheme http, :path / (static table), then
        // :authority as a literal without indexing.
        let mut block = vec![0x82, 0x86, 0x84, 0x01, authority.len() as u8];
        block.extend(authority.as_bytes());
        let flags = if end { 0x1 | 0x4 } else { 0x1 };
        frame(HEADERS, flags, stream, &block)
    }

    pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
        frame(RST_STREAM, 0, stream, &code.to_be_bytes())
    }

    /// A client connection whose reader answers SETTINGS and PING and
    /// notes GOAWAY and the close.
    pub struct Conn {
        write: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
        goaway: Arc<std::sync::Mutex<Option<(u32, u32)>>>,
        reader: Option<tokio::task::JoinHandle<()>>,
    }

    impl Conn {
        pub async fn open(addr: SocketAddr) -> Conn {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let (mut read, write) = tcp.into_split();
            let write = Arc::new(tokio::sync::Mutex::new(write));
            let mut preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            preface.extend(frame(SETTINGS, 0, 0, &[]));
            write.lock().await.write_all(&preface).await.unwrap();
            let goaway = Arc::new(std::sync::Mutex::new(None));
            let (w, g) = (write.clone(), goaway.clone());
            let reader = tokio::spawn(async move {
                let mut head = [0u8; 9];
                while read.read_exact(&mut head).await.is_ok() {
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    let answer = match (head[3], head[4] & 0x1) {
                        (SETTINGS, 0) => Some(frame(SETTINGS, 0x1, 0, &[])),
                        (PING, 0) => Some(frame(PING, 0x1, 0, &payload)),
                        (GOAWAY, _) => {
                            let last = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                            *g.lock().unwrap() = Some((last & 0x7fff_ffff, code));
                            None
                        }
                        _ => None,
                    };
                    if let Some(a) = answer {
                        let _ = w.lock().await.write_all(&a).await;
                    }
                }
            });
            Conn {
                write,
                goaway,
                reader: Some(reader),
            }
        }

        pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.write.lock().await.write_all(bytes).await
        }

        /// The GOAWAY received, as (last stream id, error code).
        pub fn goaway(&self) -> Option<(u32, u32)> {
            *self.goaway.lock().unwrap()
        }

        /// Whether the server closed the connection within `wait`.
        pub async fn closed(&mut self, wait: Duration) -> bool {
            let reader = self.reader.take().expect("closed() once");
            tokio::time::timeout(wait, reader).await.is_ok()
        }
    }
}
