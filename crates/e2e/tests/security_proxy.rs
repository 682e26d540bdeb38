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
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_e2e::attack::{banner_app, counting_app, fds, frames, rss_mib, streaming_app, Peak};
use trellis_e2e::{eventually, Answer, ProxyClient, TestMesh};
use trellis_proxy::limits::Limits;
use trellis_proxy::listener::BindError;
use trellis_proxy::{Proxy, StartError};
use trellis_testkit::yaml;

mod proxy_limits;

/// How long a test waits for something that must happen (never a figure
/// asserted: a wait ends as soon as its fact holds).
const WAIT: Duration = Duration::from_secs(15);

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

/// Opens `n` connections to `addr`; returns how many the server reset
/// (before the connect returned, or within `wait`), and the others.
async fn flood(addr: SocketAddr, n: usize, wait: Duration) -> (usize, Vec<TcpStream>) {
    let mut conns = Vec::new();
    for _ in 0..n {
        conns.push(TcpStream::connect(addr).await);
    }
    let reads = conns.into_iter().map(|tcp| async move {
        let mut tcp = tcp.ok()?;
        let mut b = [0u8; 1];
        match tokio::time::timeout(wait, tcp.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => None,
            _ => Some(tcp),
        }
    });
    let held: Vec<TcpStream> = futures::future::join_all(reads)
        .await
        .into_iter()
        .flatten()
        .collect();
    (n - held.len(), held)
}

/// Connections `proxy`'s `listener` closed for `reason`
/// (`trellis_connections_closed_by_limit_total`).
async fn closed_by_limit(proxy: &Proxy, listener: &str, reason: &str) -> f64 {
    trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_connections_closed_by_limit_total",
        &[("listener", listener), ("reason", reason)],
    )
    .await
}

async fn demo(name: &str) -> u16 {
    trellis_e2e::demo_app(name, "v1", &format!("{name}-0"))
        .await
        .0
}

fn answer_text(a: &Answer) -> String {
    format!(
        "{} (x-trellis-error: {:?}): {}",
        a.status,
        a.headers.get("x-trellis-error"),
        String::from_utf8_lossy(&a.body)
    )
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
        assert_eq!(
            a.status,
            StatusCode::LOOP_DETECTED,
            "{url}: {}",
            answer_text(&a)
        );
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
    let apps = [demo("a").await, demo("b").await];
    // Each must know the other's address before either binds: free ports,
    // chosen again when another process takes one in between.
    let mut attempts = 0;
    let (ua, _proxies) = 'bind: loop {
        attempts += 1;
        let (ua, ub) = (trellis_testkit::free_addr(), trellis_testkit::free_addr());
        let mut proxies = Vec::new();
        for ((name, listen, to), app) in [("a", ua, ub), ("b", ub, ua)].into_iter().zip(apps) {
            let mut cfg = mesh.proxy_config(name, &[("app", name)], app);
            cfg.limits.max_hops = 8;
            cfg.upstreams
                .push(format!("{to}={listen}").parse().expect("an --upstream"));
            match Proxy::start(cfg).await {
                Ok(p) => proxies.push(p),
                Err(StartError::Bind(BindError::Taken { .. })) if attempts < 5 => continue 'bind,
                Err(e) => panic!("proxy {name} starts: {e}"),
            }
        }
        break (ua, proxies);
    };
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
    assert!(
        fds_peak < fds_before + 100,
        "descriptors grew to {fds_peak}"
    );
}

/// Paced rapid reset: one HEADERS and its RST_STREAM per write, each stream
/// taken by the proxy (and sent on through the mesh to the app) before its
/// reset arrives. Against the outbound listener (h2c), whose requests go
/// on to a peer proxy at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paced_rapid_reset_is_answered_with_goaway() {
    const NO_ERROR: u32 = 0x0;
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    const STREAMS: u32 = 3000;
    let mesh = TestMesh::start().await;
    let (app, reached) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    // The route to web is known before the attack.
    let a = ProxyClient::new(proxy.outbound_addr)
        .send(Method::GET, "http://web:8080/", &[], Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    let before = reached.count();
    let mut conn = frames::Conn::open(proxy.outbound_addr).await;
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
    let reached = reached.count() - before;
    eprintln!(
        "paced rapid reset: {sent} streams sent, {reached} reached the app, GOAWAY {goaway:?}, closed {closed}"
    );
    let (_, code) = goaway.unwrap_or_else(|| panic!("no GOAWAY after {sent} reset streams"));
    assert!(closed, "the connection stayed open");
    assert!(sent < STREAMS, "all {sent} streams were taken");
    assert!(reached <= 600, "{reached} reset streams reached the app");
    let counted = closed_by_limit(&proxy, "outbound", "reset_flood").await;
    match code {
        // The premature-reset rule's GOAWAY, counted.
        NO_ERROR => assert_eq!(counted, 1.0, "a reset flood is counted"),
        // On a loaded machine the proxy may take streams more slowly than
        // they are reset: then h2's guard against streams reset before
        // they are taken (--http2-max-pending-accept-reset-streams) ends
        // the connection first, which is as good.
        ENHANCE_YOUR_CALM => {
            eprintln!("paced rapid reset ended by the pending-accept reset limit")
        }
        other => panic!("GOAWAY with error code {other}"),
    }
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
            w.extend(frames::frame(
                frames::CONTINUATION,
                0,
                1,
                b"\x10\x03x-a\x01a",
            ));
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
    assert_eq!(reached.count(), 0);
}

/// A request whose chunked body breaks off is the client's fault: 400,
/// counted as downstream, on the mesh path and on the way out of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_chunked_body_is_a_client_error() {
    let mesh = TestMesh::start().await;
    let (app, seen) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    for (n, target) in ["web:8080".to_string(), format!("127.0.0.1:{app}")]
        .into_iter()
        .enumerate()
    {
        let mut tcp = TcpStream::connect(proxy.outbound_addr).await.unwrap();
        let head = format!(
            "POST http://{target}/upload HTTP/1.1\r\nHost: {target}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // The request reaches the app before the body breaks.
        let want = n as u64 + 1;
        eventually("the request reaches the app", WAIT, || async {
            (seen.count() >= want).then_some(())
        })
        .await;
        tcp.write_all(b"zz\r\nnot a chunk\r\n\r\n").await.unwrap();
        let mut got = Vec::new();
        let _ = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
        let got = String::from_utf8_lossy(&got);
        eprintln!(
            "broken chunked body to {target}: {}",
            got.lines().next().unwrap_or("")
        );
        assert!(got.starts_with("HTTP/1.1 400 "), "{target}: {got}");
        assert!(
            got.contains("x-trellis-error: downstream"),
            "{target}: {got}"
        );
    }
    let downstream = trellis_e2e::metric_sum(
        proxy.admin_addr,
        "trellis_proxy_errors_total",
        &[
            ("listener", "outbound"),
            ("source", "downstream"),
            ("status_code", "400"),
        ],
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
        (
            "the demo app through the mesh",
            proxy.outbound_addr,
            "web:8080",
            200,
        ),
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
        let body = resp.into_body().collect().await.map(|b| b.to_bytes());
        eprintln!(
            "HEAD over h2c, {what}: {status}, body {:?}",
            body.as_ref().map(|b| b.len())
        );
        assert_eq!(status, want, "{what}");
        let body = body.unwrap_or_else(|e| panic!("{what}: the stream did not end cleanly: {e}"));
        assert!(body.is_empty(), "{what}");
    }
}

/// Server-streaming gRPC through the mesh, the benchmark's shape: 64
/// calls of 10 small messages over 4 client connections, whose clients
/// read nothing until every call has its headers (slow readers). The
/// messages wait in the caller's proxy, on the one connection to the
/// server's proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_grpc_with_slow_readers_does_not_break_the_peer_connection() {
    let errors = stream_through_the_mesh(10, Duration::ZERO).await;
    assert!(
        errors.is_empty(),
        "{} calls failed: {errors:?}",
        errors.len()
    );
}

/// The same with 100 messages per call, 1 ms apart: no proxy can send
/// them as one frame, so thousands of small frames wait unread on the
/// connection between the proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_of_small_frames_between_proxies_does_not_break_the_connection() {
    let errors = stream_through_the_mesh(100, Duration::from_millis(1)).await;
    assert!(
        errors.is_empty(),
        "{} calls failed: {errors:?}",
        errors.len()
    );
}

/// 64 calls over 4 connections of `messages` 100-byte messages each,
/// `gap` apart; the errors of the calls that failed.
async fn stream_through_the_mesh(messages: usize, gap: Duration) -> Vec<String> {
    const CALLS: usize = 64;
    const CONNS: usize = 4;
    let mesh = TestMesh::start().await;
    mesh.apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: stream}\n\
         spec:\n  selector: {app: stream}\n  ports: [{port: 50051, protocol: grpc}]\n",
    )
    .await
    .unwrap();
    let app = streaming_app(messages, gap).await;
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
            let req = Request::post("http://stream:50051/test.Stream/Many")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(Bytes::from_static(&[0, 0, 0, 0, 0])))
                .unwrap();
            let resp = tokio::time::timeout(WAIT, tx.send_request(req)).await;
            barrier.wait().await;
            let resp = resp
                .map_err(|_| "no headers".to_string())?
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let body = tokio::time::timeout(WAIT, resp.into_body().collect())
                .await
                .map_err(|_| "no body".to_string())?
                .map_err(|e| format!("{e:?}"))?;
            let grpc_status = body.trailers().and_then(|t| t.get("grpc-status")).cloned();
            let body = body.to_bytes();
            if body.len() != messages * 100 || grpc_status.as_ref().is_none_or(|s| s != "0") {
                return Err(format!(
                    "{status}, {} bytes, grpc-status {grpc_status:?}: {:?}",
                    body.len(),
                    String::from_utf8_lossy(&body[..body.len().min(200)])
                ));
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
        "streaming gRPC, {CALLS} calls x {messages} x 100 B ({gap:?} apart) over {CONNS} connections with slow readers: {} failed {:?}",
        errors.len(),
        errors.first()
    );
    errors
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
        assert!(
            got.is_empty(),
            "a silent client got {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    let carried = accepted.load(Ordering::SeqCst);
    let closed = closed_by_limit(&proxy, "inbound", "detect_timeout").await;
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
        let mut tcp = TcpStream::connect(smtp.inbound_addr)
            .await
            .map_err(|e| e.to_string())?;
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

const CHILD: &str = "TRELLIS_SECURITY_PROXY_CHILD";
const CHILD_TEST: &str =
    "out_of_descriptors_the_proxy_sheds_new_connections_and_serves_the_ones_it_has";
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
    let url = "http://web:8080/";
    eventually("the child proxy serves", WAIT, || async move {
        let a = ProxyClient::new(outbound)
            .try_send(Method::GET, url, &[], Bytes::new())
            .await?;
        (a.status == StatusCode::OK)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!(answer_text(&a)))
    })
    .await;
    let mut app = ProxyClient::new(outbound);
    let a = app.send(Method::GET, url, &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    let mut scraper = ProxyClient::new(admin);
    let metrics = |page: Answer| {
        trellis_testkit::prometheus::Metrics::parse(&String::from_utf8_lossy(&page.body)).unwrap()
    };
    let scrape_url = format!("http://{admin}/metrics");
    metrics(
        scraper
            .send(Method::GET, &scrape_url, &[], Bytes::new())
            .await,
    );

    // A shed connection is reset soon (within the accept loop's backoff).
    let (shed, held) = flood(outbound, FLOOD, Duration::from_secs(3)).await;
    eprintln!(
        "descriptor limit {NOFILE}: {FLOOD} new connections, {shed} shed, {} held",
        held.len()
    );
    assert!(
        shed >= FLOOD - NOFILE,
        "only {shed} of {FLOOD} shed at a limit of {NOFILE}"
    );

    // The connections it had are served on.
    for _ in 0..5 {
        let a = app.send(Method::GET, url, &[], Bytes::new()).await;
        assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
    }
    let before = metrics(
        scraper
            .send(Method::GET, &scrape_url, &[], Bytes::new())
            .await,
    );
    let counted = before.sum(
        "trellis_connections_shed_total",
        &[("listener", "outbound"), ("reason", "descriptors")],
    );
    assert!(counted as usize >= shed, "{counted} counted, {shed} shed");

    // Holding what it has at the limit, it does not spin.
    let cpu = |p| {
        let s = procfs::process::Process::new(p as i32)
            .unwrap()
            .stat()
            .unwrap();
        (s.utime + s.stime) as f64 / procfs::ticks_per_second() as f64
    };
    let cpu_before = cpu(pid);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_used = cpu(pid) - cpu_before;
    let after = metrics(
        scraper
            .send(Method::GET, &scrape_url, &[], Bytes::new())
            .await,
    );
    let errors = |m: &trellis_testkit::prometheus::Metrics| {
        m.sum(
            "trellis_accept_errors_total",
            &[("listener", "outbound"), ("reason", "descriptors")],
        )
    };
    eprintln!(
        "at the limit for 2 s: {cpu_used:.3} s of CPU, {} failed accepts",
        errors(&after) - errors(&before)
    );
    // The CPU figure is printed, not asserted (no timed assertions): a
    // loop that spins shows in the count of failed accepts.
    assert!(
        errors(&after) - errors(&before) <= 12.0,
        "the accept loop spins"
    );

    // Descriptors come back: new clients are served again.
    drop(held);
    eventually("a new client is served", WAIT, || async move {
        let a = ProxyClient::new(outbound)
            .try_send(Method::GET, url, &[], Bytes::new())
            .await?;
        (a.status == StatusCode::OK)
            .then_some(())
            .ok_or_else(|| anyhow::anyhow!(answer_text(&a)))
    })
    .await;
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

/// Request smuggling (a request hidden in another's body, for a parser
/// that frames it differently): whatever the framing trick, the hidden
/// request never reaches the app, through the outbound listener (the
/// app's own requests) or the inbound one (plaintext, in permissive mode).
/// Each case is refused, or framed one way and its connection closed
/// after the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggled_requests_never_reach_the_app() {
    const HIDDEN: &str = "GET /smuggled HTTP/1.1\r\nHost: web:8080\r\n\r\n";
    let mesh = TestMesh::start().await;
    mesh.apply(&yaml::mesh("{mtls: permissive}")).await.unwrap();
    let (app, seen) = counting_app().await;
    let proxy = web(&mesh, app, |_| {}).await;
    mesh.wait_mesh_synced().await;
    let chunk = format!("{:x}\r\n{HIDDEN}\r\n0\r\n\r\n", HIDDEN.len());
    let cases: Vec<(&str, String, String)> = vec![
        (
            "CL.TE",
            "Content-Length: 6\r\nTransfer-Encoding: chunked\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE.CL",
            "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n".into(),
            chunk.clone(),
        ),
        (
            "TE twice",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE xchunked",
            "Transfer-Encoding: xchunked\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE chunked, identity",
            "Transfer-Encoding: chunked, identity\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE with a tab",
            "Transfer-Encoding:\tchunked\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "TE upper case",
            "Transfer-Encoding: CHUNKED\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "space before colon",
            "Transfer-Encoding : chunked\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "obs-fold value",
            "Transfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "obs-fold header",
            "X-A: b\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "two Content-Lengths",
            "Content-Length: 0\r\nContent-Length: 44\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "Content-Length +",
            "Content-Length: +44\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "Content-Length -",
            "Content-Length: -1\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "Content-Length 0x",
            "Content-Length: 0x2c\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "Content-Length list",
            "Content-Length: 0, 44\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "Content-Length space",
            "Content-Length: 4 4\r\n".into(),
            HIDDEN.into(),
        ),
        (
            "bare LF",
            "Transfer-Encoding: chunked\nContent-Length: 5\n".into(),
            format!("0\n\n{HIDDEN}"),
        ),
        (
            "NUL in TE",
            "Transfer-Encoding: chunked\0\r\nContent-Length: 5\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
        (
            "chunk size overflow",
            "Transfer-Encoding: chunked\r\n".into(),
            format!("fffffffffffffffff1\r\n{HIDDEN}\r\n0\r\n\r\n"),
        ),
        (
            "chunk size 0x",
            "Transfer-Encoding: chunked\r\n".into(),
            format!("0x2c\r\n{HIDDEN}\r\n0\r\n\r\n"),
        ),
        (
            "chunk size with space",
            "Transfer-Encoding: chunked\r\n".into(),
            format!(" 0\r\n\r\n{HIDDEN}"),
        ),
        (
            "chunk extension",
            "Transfer-Encoding: chunked\r\n".into(),
            format!("0;a=\"\r\n\"\r\n\r\n{HIDDEN}"),
        ),
        (
            "chunk bare LF",
            "Transfer-Encoding: chunked\r\n".into(),
            format!("0\n\n{HIDDEN}"),
        ),
        (
            "TE on HTTP/1.0",
            "Transfer-Encoding: chunked\r\n".into(),
            format!("0\r\n\r\n{HIDDEN}"),
        ),
    ];
    let listeners = [
        ("outbound", proxy.outbound_addr, "http://web:8080/a"),
        ("inbound", proxy.inbound_addr, "/a"),
    ];
    let runs = listeners.iter().flat_map(|&(listener, addr, target)| {
        cases.iter().map(move |(name, headers, body)| {
            let version = if *name == "TE on HTTP/1.0" {
                "HTTP/1.0"
            } else {
                "HTTP/1.1"
            };
            let raw = format!("POST {target} {version}\r\nHost: web:8080\r\n{headers}\r\n{body}");
            async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let _ = tcp.write_all(raw.as_bytes()).await;
                let mut got = Vec::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
                let first = String::from_utf8_lossy(&got)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                (listener, name, first)
            }
        })
    });
    let answers = futures::future::join_all(runs).await;
    for (listener, name, first) in &answers {
        eprintln!("smuggling, {listener}, {name}: {first:?}");
    }
    eprintln!("smuggling: {} cases", answers.len());
    let paths = seen.paths();
    eprintln!("the app saw {paths:?}");
    assert!(
        !paths.iter().any(|p| p.contains("smuggled")),
        "a hidden request reached the app: {paths:?}"
    );
    // And the proxy serves on.
    let a = ProxyClient::new(proxy.outbound_addr)
        .send(Method::GET, "http://web:8080/after", &[], Bytes::new())
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
}
