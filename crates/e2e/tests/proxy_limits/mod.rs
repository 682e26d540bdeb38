//! Time and count limits of the proxy's listeners (issue 12, item 3):
//! slowloris and idle floods, idle HTTP/1 and HTTP/2 connections, HTTP/2
//! concurrent streams, and the egress timeouts. Part of the
//! `security_proxy` test binary, whose helpers it uses.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_e2e::attack::{frames, held_app};
use trellis_e2e::{eventually, ProxyClient, TestMesh};

use super::{answer_text, closed_by_limit, demo, flood, web, WAIT};

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
    eprintln!(
        "slowloris, {CONNS} connections held after {}",
        held.join(", ")
    );
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
    let closes = closed_by_limit(&proxy, "outbound", "header_timeout").await;
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

    let (shed, held) = flood(proxy.outbound_addr, FLOOD, Duration::from_secs(1)).await;
    eprintln!(
        "idle flood: {FLOOD} connections past one served, cap {CAP}: {shed} shed, {} held",
        held.len()
    );
    assert!(
        // The cap holds the connection served before, and CAP - 1 more.
        shed > FLOOD - CAP,
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
    for mut tcp in held {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(WAIT, tcp.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            "an idle connection was held"
        );
    }
    let mut fresh = ProxyClient::new(proxy.outbound_addr);
    let a = fresh.send(Method::GET, url, &[], Bytes::new()).await;
    assert_eq!(a.status, StatusCode::OK, "{}", answer_text(&a));
}

/// An HTTP/1 keep-alive connection with no request in flight is closed at
/// the idle timeout (not held until the client goes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_connection_is_closed_at_the_idle_timeout() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.http1_idle_timeout = Duration::from_secs(1);
        // Longer than the wait: only the idle timeout can close it.
        l.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut tcp = TcpStream::connect(proxy.outbound_addr).await.unwrap();
    tcp.write_all(b"GET http://web:8080/ HTTP/1.1\r\nHost: web:8080\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let ended = tokio::time::timeout(WAIT, tcp.read_to_end(&mut got)).await;
    let got = String::from_utf8_lossy(&got);
    eprintln!(
        "idle HTTP/1 connection after one answer: {}, closed {}",
        got.lines().next().unwrap_or(""),
        ended.is_ok()
    );
    assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    assert!(ended.is_ok(), "an idle keep-alive connection was held");
    let closes = closed_by_limit(&proxy, "outbound", "idle").await;
    assert_eq!(closes, 1.0, "counted");
}

/// An HTTP/2 connection with no stream open gets GOAWAY (NO_ERROR) at the
/// idle timeout and is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http2_connection_gets_goaway_at_the_idle_timeout() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.http2_idle_timeout = Duration::from_secs(1);
        l.header_read_timeout = Duration::from_secs(60);
    })
    .await;
    let mut conn = frames::Conn::open(proxy.outbound_addr).await;
    conn.write(&frames::headers(1, "web:8080", true))
        .await
        .unwrap();
    let closed = conn.closed(WAIT).await;
    eprintln!(
        "idle HTTP/2 connection after one stream: GOAWAY {:?}, closed {closed}",
        conn.goaway()
    );
    assert_eq!(
        conn.goaway(),
        Some((1, 0)),
        "GOAWAY NO_ERROR after stream 1"
    );
    assert!(closed, "an idle HTTP/2 connection was held");
    let closes = closed_by_limit(&proxy, "outbound", "idle").await;
    assert_eq!(closes, 1.0, "counted");
}

/// An HTTP/2 client that opens a connection and never sends a request is
/// sent GOAWAY at the header-read timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_without_a_request_is_closed_at_the_header_timeout() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.header_read_timeout = Duration::from_secs(1);
    })
    .await;
    let mut conn = frames::Conn::open(proxy.outbound_addr).await;
    let closed = conn.closed(WAIT).await;
    eprintln!(
        "HTTP/2 connection without a request: GOAWAY {:?}, closed {closed}",
        conn.goaway()
    );
    assert!(conn.goaway().is_some(), "no GOAWAY");
    assert!(closed, "a connection without a request was held");
    let closes = closed_by_limit(&proxy, "outbound", "header_timeout").await;
    assert_eq!(closes, 1.0, "counted");
}

/// The limit on open streams is advertised, and a stream past it is
/// refused (REFUSED_STREAM) while the others stay open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_the_concurrent_limit_are_refused() {
    const LIMIT: u32 = 4;
    let mesh = TestMesh::start().await;
    let (app, reached) = held_app().await;
    let proxy = web(&mesh, app, |l| l.http2_max_concurrent_streams = LIMIT).await;
    let mut conn = frames::Conn::open(proxy.outbound_addr).await;
    let advertised = eventually("the proxy's SETTINGS", WAIT, || async {
        conn.max_concurrent_streams()
    })
    .await;
    assert_eq!(advertised, LIMIT);
    // LIMIT streams held open by the app, then one more.
    for n in 0..LIMIT {
        conn.write(&frames::headers(2 * n + 1, "web:8080", true))
            .await
            .unwrap();
    }
    eventually("the app holds every stream", WAIT, || async {
        (reached.load(Ordering::SeqCst) >= u64::from(LIMIT)).then_some(())
    })
    .await;
    let past = 2 * LIMIT + 1;
    conn.write(&frames::headers(past, "web:8080", true))
        .await
        .unwrap();
    let resets = eventually("a reset", WAIT, || async {
        let r = conn.resets();
        (!r.is_empty()).then_some(r)
    })
    .await;
    eprintln!(
        "HTTP/2 streams, limit {LIMIT} advertised {advertised}: {} reached the app, resets {resets:?}",
        reached.load(Ordering::SeqCst)
    );
    assert_eq!(resets, vec![(past, frames::REFUSED_STREAM)]);
}

/// A call outside the mesh whose server takes the request and never
/// answers: 504 at the egress request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_call_without_an_answer_is_504() {
    let mesh = TestMesh::start().await;
    let (outside, reached) = held_app().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.egress_request_timeout = Duration::from_secs(1)
    })
    .await;
    let url = format!("http://127.0.0.1:{outside}/slow");
    let mut client = ProxyClient::new(proxy.outbound_addr);
    let sent = client.try_send(Method::GET, &url, &[], Bytes::new());
    let a = tokio::time::timeout(WAIT, sent)
        .await
        .expect("an answer: the call was held")
        .expect("an answer");
    eprintln!("egress call held by its server: {}", answer_text(&a));
    assert_eq!(reached.load(Ordering::SeqCst), 1, "the request was sent");
    assert_eq!(a.status, StatusCode::GATEWAY_TIMEOUT, "{}", answer_text(&a));
    assert_eq!(a.headers["x-trellis-error"], "upstream");
}

/// A call outside the mesh to a server that does not complete the TCP
/// handshake (its accept queue is full): 502 at the connect timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_connect_that_hangs_is_502() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.connect_timeout = Duration::from_secs(1)
    })
    .await;
    // A listener that never accepts, with an accept queue of one: once it
    // holds a connection, the kernel drops further SYNs and a connect
    // hangs.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 1], 0).into()).unwrap();
    let full = socket.listen(0).unwrap();
    let addr = full.local_addr().unwrap();
    let mut queued = Vec::new();
    while let Ok(Ok(tcp)) =
        tokio::time::timeout(Duration::from_millis(500), TcpStream::connect(addr)).await
    {
        queued.push(tcp);
        assert!(queued.len() < 16, "the accept queue never filled");
    }
    let url = format!("http://{addr}/");
    let mut client = ProxyClient::new(proxy.outbound_addr);
    let sent = client.try_send(Method::GET, &url, &[], Bytes::new());
    let a = tokio::time::timeout(WAIT, sent)
        .await
        .expect("an answer: the connect was held")
        .expect("an answer");
    eprintln!(
        "egress connect to a full accept queue ({} queued): {}",
        queued.len(),
        answer_text(&a)
    );
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{}", answer_text(&a));
    assert_eq!(a.headers["x-trellis-error"], "upstream");
    assert!(
        String::from_utf8_lossy(&a.body).contains("connect timed out"),
        "{}",
        answer_text(&a)
    );
}

/// Slowloris after a good request: on a keep-alive connection, the next
/// request's header is held to the header-read timeout from its first
/// byte, not to the (longer) idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_second_request_on_a_keepalive_connection_is_408() {
    let mesh = TestMesh::start().await;
    let proxy = web(&mesh, demo("web").await, |l| {
        l.header_read_timeout = Duration::from_secs(1)
    })
    .await;
    let mut tcp = TcpStream::connect(proxy.outbound_addr).await.unwrap();
    tcp.write_all(b"HEAD http://web:8080/ HTTP/1.1\r\nHost: web:8080\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, tcp.read(&mut buf))
            .await
            .expect("the first answer")
            .unwrap();
        assert!(n > 0, "closed before the first answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(
        got.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&got)
    );
    // The attack's shape, not a wait: the client pauses between requests
    // past the header timeout, so the connection is idle (5 min) when the
    // slow header starts.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tcp.write_all(b"GET http://web:8080/ HTTP/1.1\r\nHost: web:8080\r\nX-Slow: ")
        .await
        .unwrap();
    // A byte every 300 ms until the proxy closes, for at most WAIT.
    let mut second = Vec::new();
    let end = tokio::time::Instant::now() + WAIT;
    let mut tick = tokio::time::interval(Duration::from_millis(300));
    let closed = loop {
        tokio::select! {
            r = tcp.read(&mut buf) => match r {
                Ok(0) | Err(_) => break true,
                Ok(n) => second.extend_from_slice(&buf[..n]),
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
    let second = String::from_utf8_lossy(&second);
    eprintln!(
        "slow second request on a keep-alive connection: closed {closed}, {:?}",
        second.lines().next()
    );
    assert!(closed, "a slow second request was held past {WAIT:?}");
    assert!(second.starts_with("HTTP/1.1 408 "), "{second}");
}
