//! For the security tests: apps that count what reaches them, hand-made
//! HTTP/2 frames for attacks a conforming client will not make, and
//! readings of this process (which runs the proxies under test).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Open descriptors of this process.
pub fn fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Resident memory of this process, in MiB.
pub fn rss_mib() -> u64 {
    trellis_testkit::process::rss_bytes(std::process::id()).unwrap_or(0) >> 20
}

/// What reached an app: a count, and each request's path.
#[derive(Clone, Default)]
pub struct Seen {
    count: Arc<AtomicU64>,
    paths: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }

    pub fn paths(&self) -> Vec<String> {
        self.paths.lock().unwrap().clone()
    }
}

/// An app that reads each request body whole, then answers 200 (400 when
/// the body breaks); it counts requests as they arrive (before their
/// body) and serves HTTP/1.1 and h2c.
pub async fn counting_app() -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Seen::default();
    let s = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let s = s.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    s.count.fetch_add(1, Ordering::SeqCst);
                    s.paths.lock().unwrap().push(req.uri().path().to_string());
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
    (port, seen)
}

/// An h2c app that answers every call with `messages` 100-byte DATA
/// frames (a gRPC message each), `gap` apart (so that no proxy can send
/// them as one, unless zero), and `grpc-status: 0`.
pub async fn streaming_app(messages: usize, gap: Duration) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                    let frames = futures::stream::unfold(0, move |n| async move {
                        if n > messages {
                            return None;
                        }
                        if n > 0 && !gap.is_zero() {
                            tokio::time::sleep(gap).await;
                        }
                        let frame = if n < messages {
                            let mut m = vec![0u8, 0, 0, 0, 95];
                            m.extend([7u8; 95]);
                            Frame::data(Bytes::from(m))
                        } else {
                            let mut t = http::HeaderMap::new();
                            t.insert("grpc-status", "0".parse().unwrap());
                            Frame::trailers(t)
                        };
                        Some((Ok::<_, std::convert::Infallible>(frame), n + 1))
                    });
                    let mut r = Response::new(StreamBody::new(frames));
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

/// An app (HTTP/1.1 and h2c) that takes every request and never answers
/// it; it counts the requests.
pub async fn held_app() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicU64::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    futures::future::pending::<Result<Response<Full<Bytes>>, hyper::Error>>()
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, count)
}

/// A server-speaks-first app: writes a banner on accept, counts accepts.
pub async fn banner_app() -> (u16, Arc<AtomicU64>) {
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

/// Samples this process's descriptors and RSS every 10 ms until dropped,
/// keeping the highest.
pub struct Peak {
    stop: Arc<AtomicBool>,
    fds: Arc<AtomicUsize>,
    rss: Arc<AtomicU64>,
}

impl Peak {
    pub fn start() -> Peak {
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

    /// The highest descriptors and RSS (MiB) seen so far.
    pub fn read(&self) -> (usize, u64) {
        (
            self.fds.load(Ordering::SeqCst),
            self.rss.load(Ordering::SeqCst),
        )
    }
}

impl Drop for Peak {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Hand-made HTTP/2 frames.
pub mod frames {
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

    /// `GET http://authority/`, END_STREAM; END_HEADERS when `end`.
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

    pub const REFUSED_STREAM: u32 = 0x7;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;

    /// What the server sent that the attacks look at.
    #[derive(Default)]
    struct Received {
        goaway: Option<(u32, u32)>,
        max_concurrent_streams: Option<u32>,
        resets: Vec<(u32, u32)>,
    }

    /// A client connection whose reader answers SETTINGS and PING and
    /// notes the server's SETTINGS, RST_STREAMs, GOAWAY and the close.
    pub struct Conn {
        write: Arc<tokio::sync::Mutex<tokio::net::tcp::OwnedWriteHalf>>,
        seen: Arc<Mutex<Received>>,
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
            let seen = Arc::new(Mutex::new(Received::default()));
            let (w, g) = (write.clone(), seen.clone());
            let reader = tokio::spawn(async move {
                let mut head = [0u8; 9];
                while read.read_exact(&mut head).await.is_ok() {
                    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                    let mut payload = vec![0u8; len];
                    if read.read_exact(&mut payload).await.is_err() {
                        break;
                    }
                    let stream = u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff;
                    let answer = match (head[3], head[4] & 0x1) {
                        (SETTINGS, 0) => {
                            for s in payload.chunks_exact(6) {
                                if u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS {
                                    g.lock().unwrap().max_concurrent_streams =
                                        Some(u32::from_be_bytes(s[2..6].try_into().unwrap()));
                                }
                            }
                            Some(frame(SETTINGS, 0x1, 0, &[]))
                        }
                        (RST_STREAM, _) if payload.len() == 4 => {
                            let code = u32::from_be_bytes(payload[..].try_into().unwrap());
                            g.lock().unwrap().resets.push((stream, code));
                            None
                        }
                        (PING, 0) => Some(frame(PING, 0x1, 0, &payload)),
                        (GOAWAY, _) if payload.len() >= 8 => {
                            let last = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                            let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                            g.lock().unwrap().goaway = Some((last & 0x7fff_ffff, code));
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
                seen,
                reader: Some(reader),
            }
        }

        pub async fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
            self.write.lock().await.write_all(bytes).await
        }

        /// The last GOAWAY received, as (last stream id, error code).
        pub fn goaway(&self) -> Option<(u32, u32)> {
            self.seen.lock().unwrap().goaway
        }

        /// The server's SETTINGS_MAX_CONCURRENT_STREAMS, once received.
        pub fn max_concurrent_streams(&self) -> Option<u32> {
            self.seen.lock().unwrap().max_concurrent_streams
        }

        /// The streams the server reset, as (stream id, error code).
        pub fn resets(&self) -> Vec<(u32, u32)> {
            self.seen.lock().unwrap().resets.clone()
        }

        /// Whether the server closed the connection within `wait`.
        pub async fn closed(&mut self, wait: Duration) -> bool {
            let reader = self.reader.take().expect("closed() once");
            tokio::time::timeout(wait, reader).await.is_ok()
        }
    }
}
