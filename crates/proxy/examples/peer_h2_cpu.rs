//! CPU per request of the two HTTP/2 clients a proxy could use toward a
//! peer: hyper's (`hyper::client::conn::http2`) and `peer_h2::H2` (the
//! `h2` crate driven from the request's task). Client, server and
//! connection run on one thread (as on one proxy worker), so the thread's
//! CPU time per request compares them; rounds alternate, so a noisy
//! machine slows both alike.
//!
//!     cargo run --release -p trellis-proxy --example peer_h2_cpu -- [ROUNDS] [REQUESTS] [CONCURRENCY]

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use trellis_proxy::http::{empty, full, Body};
use trellis_proxy::peer_h2::{Settings, H2};

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

#[derive(Clone)]
enum Client {
    Hyper(hyper::client::conn::http2::SendRequest<Body>),
    Direct(H2),
}

impl Client {
    async fn get(&mut self, uri: &str, body: bool) {
        let method = if body {
            http::Method::POST
        } else {
            http::Method::GET
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .body(if body { full("0123456789") } else { empty() })
            .unwrap();
        let resp = match self {
            Client::Hyper(tx) => tx
                .send_request(req)
                .await
                .unwrap()
                .map(|b| b.boxed_unsync().map_err(Into::into).boxed_unsync()),
            Client::Direct(h2) => h2.send(req).await.unwrap(),
        };
        assert!(resp.status().is_success());
        resp.into_body().collect().await.unwrap();
    }
}

async fn connect(addr: std::net::SocketAddr, direct: bool) -> Client {
    let tcp = TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    if direct {
        let settings = Settings {
            stream_window: 4 << 20,
            conn_window: 16 << 20,
            max_header_list: 64 << 10,
            keep_alive: Some(Duration::from_secs(10)),
        };
        Client::Direct(
            H2::handshake(tcp, &settings, addr.to_string())
                .await
                .unwrap(),
        )
    } else {
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .initial_stream_window_size(4 << 20)
            .initial_connection_window_size(16 << 20)
            .max_header_list_size(64 << 10)
            .handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        Client::Hyper(tx)
    }
}

/// CPU time per request for `requests` sent by `concurrency` tasks.
async fn round(
    addr: std::net::SocketAddr,
    direct: bool,
    body: bool,
    requests: usize,
    concurrency: usize,
) -> f64 {
    let client = connect(addr, direct).await;
    let uri = format!("http://{addr}/");
    // Warm: the connection, the allocator.
    let mut c = client.clone();
    for _ in 0..200 {
        c.get(&uri, body).await;
    }
    let start = thread_cpu();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (mut c, uri) = (client.clone(), uri.clone());
        let n = requests / concurrency;
        tasks.spawn(async move {
            for _ in 0..n {
                c.get(&uri, body).await;
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    (thread_cpu() - start).as_secs_f64() * 1e6 / requests as f64
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse().unwrap())
        .collect();
    let rounds = args.first().copied().unwrap_or(9);
    let requests = args.get(1).copied().unwrap_or(20_000);
    let concurrency = args.get(2).copied().unwrap_or(16);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                tcp.set_nodelay(true).unwrap();
                let svc = hyper::service::service_fn(|req: Request<hyper::body::Incoming>| async move {
                    req.into_body().collect().await.ok();
                    Ok::<_, std::convert::Infallible>(Response::new(full(Bytes::from_static(&[b'x'; 1024]))))
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .initial_stream_window_size(4 << 20)
                        .initial_connection_window_size(16 << 20)
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        for body in [false, true] {
            let (mut hyper, mut direct) = (Vec::new(), Vec::new());
            for _ in 0..rounds {
                hyper.push(round(addr, false, body, requests, concurrency).await);
                direct.push(round(addr, true, body, requests, concurrency).await);
            }
            let what = if body { "POST, 10-byte body" } else { "GET" };
            println!(
                "{what}: CPU µs per request (client, connection and server on one thread), medians of {rounds} alternating rounds of {requests} requests from {concurrency} tasks: hyper's client {:.2}, h2 direct {:.2}",
                median(&mut hyper),
                median(&mut direct)
            );
            println!("  hyper  {hyper:.2?}\n  direct {direct:.2?}");
        }
    });
}
