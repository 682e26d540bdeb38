//! HTTP/1.1 connections that carry one request at a time, kept idle per
//! worker between requests: to the local app, and to peer proxies with
//! `--peer-http1`.
//!
//! Why not hyper-util's pooled client: per request it hashes a pool key,
//! boxes the response future, and (as the response head comes before the
//! connection is ready again) spawns a task that waits to put the
//! connection back. Here a connection goes back when its response body
//! ends, on the worker that used it, into that worker's own list: no task,
//! no lookup, and a lock that no other thread takes on the data path (the
//! idle sweep only tries it).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use crate::error::ProxyError;
use crate::workers::PerWorker;
use crate::Body;

/// A connection idle for longer than this is closed by the next sweep
/// (and dropped when another one goes back past it).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// An HTTP/1.1 connection for one request at a time, and whether it is
/// mutual TLS.
pub struct H1 {
    pub tx: http1::SendRequest<Body>,
    tls: bool,
    /// Taken from the idle ones (it may have been closed by the other end
    /// meanwhile), not just opened.
    pub reused: bool,
}

impl H1 {
    /// A connection just opened; its task must already run.
    pub fn new(tx: http1::SendRequest<Body>, tls: bool) -> H1 {
        H1 {
            tx,
            tls,
            reused: false,
        }
    }
}

struct Parked {
    c: H1,
    since: Instant,
}

/// Each worker's idle connections to one place, most recently used last.
pub struct Idle {
    lists: PerWorker<Mutex<Vec<Parked>>>,
    /// Past this many, a connection given back is closed.
    max: usize,
}

impl Idle {
    pub fn new(slots: usize, max: usize) -> Idle {
        Idle {
            lists: PerWorker::new(slots, |_| Mutex::new(Vec::new())),
            max,
        }
    }

    /// The most recently used idle connection of this worker's that is
    /// ready (and mutual TLS iff `tls`); closed ones are dropped on the way.
    pub fn take(&self, tls: bool) -> Option<H1> {
        let mut idle = self.lists.get().lock().unwrap_or_else(|e| e.into_inner());
        let mut i = idle.len();
        while i > 0 {
            i -= 1;
            let p = &idle[i];
            if p.c.tx.is_closed() || p.c.tls != tls {
                // What moves here was looked at already.
                idle.swap_remove(i);
            } else if p.c.tx.is_ready() {
                let p = idle.remove(i);
                return Some(H1 {
                    reused: true,
                    ..p.c
                });
            }
            // Else still finishing its last exchange: kept for later.
        }
        None
    }

    /// Keeps a connection whose response has ended for this worker's next
    /// request; drops those at the front idle past `IDLE_TIMEOUT`.
    pub fn give_back(&self, c: H1) {
        if c.tx.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut idle = self.lists.get().lock().unwrap_or_else(|e| e.into_inner());
        expire(&mut idle, now);
        if idle.len() < self.max {
            idle.push(Parked { c, since: now });
        }
    }

    /// Closes every worker's connections idle past `IDLE_TIMEOUT` or
    /// closed by the other end. A list in use just then is left for the
    /// next sweep: the data path never waits for this.
    pub fn sweep(&self) {
        self.sweep_at(Instant::now());
    }

    fn sweep_at(&self, now: Instant) {
        for list in self.lists.iter() {
            if let Ok(mut idle) = list.try_lock() {
                // By age, not only from the front: a list is kept in the
                // order of use only roughly (a closed connection's place
                // goes to the newest one in `take`).
                idle.retain(|p| !p.c.tx.is_closed() && now.duration_since(p.since) <= IDLE_TIMEOUT);
            }
        }
    }

    /// How many connections are idle, over every worker.
    pub fn len(&self) -> usize {
        self.lists
            .iter()
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Sweeps `idle` every `period` until shutdown.
pub async fn sweep_every(
    period: Duration,
    idle: Arc<Idle>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => idle.sweep(),
            _ = crate::http::signalled(&mut shutdown) => return,
        }
    }
}

/// Drops the connections idle past `IDLE_TIMEOUT` at the front of the
/// list, where the oldest mostly are: a pass that stops at the first
/// recent one, for `give_back` on the data path. One behind a newer
/// connection (after `take`'s swap) waits for the sweep.
fn expire(idle: &mut Vec<Parked>, now: Instant) {
    let old = idle
        .iter()
        .take_while(|p| now.duration_since(p.since) > IDLE_TIMEOUT)
        .count();
    if old > 0 {
        idle.drain(..old);
    }
}

/// Opens a plaintext HTTP/1.1 connection to `addr` (the local app) and
/// starts its task on this worker.
pub async fn connect_plain(addr: SocketAddr) -> std::io::Result<H1> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    handshake(TokioIo::new(tcp), addr, false)
        .await
        .map_err(std::io::Error::other)
}

/// The HTTP/1.1 handshake over `io` (no bytes are exchanged) and the
/// connection's task, spawned on this worker.
pub async fn handshake<I>(io: I, addr: SocketAddr, tls: bool) -> hyper::Result<H1>
where
    I: hyper::rt::Read + hyper::rt::Write + Send + Unpin + 'static,
{
    let (tx, conn) = http1::Builder::new().handshake::<_, Body>(io).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(%addr, error = %e, "HTTP/1.1 connection closed");
        }
    });
    Ok(H1::new(tx, tls))
}

/// Puts `req` in origin form for an HTTP/1.1 connection: the path and
/// query as its target, and the authority it had (an HTTP/2 request's)
/// as Host.
pub fn origin_form<B>(req: &mut Request<B>) {
    let uri = std::mem::take(req.uri_mut());
    let mut parts = uri.into_parts();
    if let Some(a) = parts.authority.take() {
        let host = a.as_str().rsplit_once('@').map_or(a.as_str(), |(_, h)| h);
        if let Ok(host) = http::HeaderValue::from_str(host) {
            req.headers_mut().insert(http::header::HOST, host);
        }
    }
    *req.uri_mut() = match parts.path_and_query {
        Some(pq) => Uri::from(pq),
        None => Uri::from_static("/"),
    };
    *req.version_mut() = http::Version::HTTP_11;
}

/// Why `send` failed.
pub enum Failed {
    /// Opening a new connection (after a reused one turned out closed).
    Connect(ProxyError),
    /// The exchange itself.
    Send(hyper::Error),
}

/// Sends one request over `c`; the connection goes back to `idle` when
/// the response has ended. A reused connection the other end closed while
/// it was idle (its keep-alive ran out) takes nothing: the request goes
/// once more, over a new connection from `reconnect`, as if it had been
/// the first.
pub async fn send<F, Fut>(
    idle: &Arc<Idle>,
    mut c: H1,
    mut req: Request<Body>,
    reconnect: F,
) -> Result<Response<Body>, Failed>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<H1, ProxyError>>,
{
    let mut reconnect = Some(reconnect);
    loop {
        match c.tx.try_send_request(req).await {
            Ok(resp) => {
                let (parts, body) = resp.into_parts();
                let mut body = GiveBack {
                    inner: body,
                    back: Some((idle.clone(), c)),
                };
                if body.inner.is_end_stream() {
                    // Nobody may poll a body that has nothing to send.
                    body.give_back();
                }
                let body = crate::http::Coalesce::new(body)
                    .map_err(crate::http::BoxError::from)
                    .boxed_unsync();
                return Ok(Response::from_parts(parts, body));
            }
            Err(mut e) => match (
                e.take_message(),
                c.reused.then(|| reconnect.take()).flatten(),
            ) {
                (Some(unsent), Some(reconnect)) => {
                    req = unsent;
                    // Boxed: rare, and large (see `Endpoint::h2`).
                    c = Box::pin(reconnect()).await.map_err(Failed::Connect)?;
                }
                _ => return Err(Failed::Send(e.into_error())),
            },
        }
    }
}

/// A response body from a pooled HTTP/1.1 connection, which goes back to
/// the idle ones once the body has ended (and is closed with it if the
/// body breaks off or is dropped before its end).
struct GiveBack {
    inner: Incoming,
    back: Option<(Arc<Idle>, H1)>,
}

impl GiveBack {
    fn give_back(&mut self) {
        if let Some((idle, c)) = self.back.take() {
            idle.give_back(c);
        }
    }
}

impl http_body::Body for GiveBack {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, hyper::Error>>> {
        let frame = std::task::ready!(std::pin::Pin::new(&mut self.inner).poll_frame(cx));
        match &frame {
            None => self.give_back(),
            Some(Ok(_)) if self.inner.is_end_stream() => self.give_back(),
            Some(Ok(_)) => {}
            Some(Err(_)) => self.back = None,
        }
        std::task::Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An HTTP/1.1 server that answers each request with `body`; with
    /// `close_after`, it closes each connection after that many answers
    /// without saying so (as a keep-alive timeout does). Counts the
    /// connections it accepted.
    async fn server(close_after: Option<usize>) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    return;
                };
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    let mut answered = 0;
                    loop {
                        let n = match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        seen.extend_from_slice(&buf[..n]);
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&seen[..end]).to_string();
                            seen.drain(..end + 4);
                            let host = head
                                .lines()
                                .find_map(|l| l.strip_prefix("host: "))
                                .unwrap_or("-")
                                .to_string();
                            let target = head.split(' ').nth(1).unwrap_or("-").to_string();
                            let body = format!("{host} {target}");
                            let resp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if tcp.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                            answered += 1;
                            if Some(answered) == close_after {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    /// Sends a GET for `uri` through `idle` (reusing an idle connection
    /// when there is one); the status and body.
    async fn get(idle: &Arc<Idle>, addr: SocketAddr, uri: &str) -> (u16, String) {
        let c = match idle.take(false) {
            Some(c) => c,
            None => connect_plain(addr).await.unwrap(),
        };
        let mut req = Request::get(uri).body(crate::http::empty()).unwrap();
        origin_form(&mut req);
        let connect = || async move {
            connect_plain(addr)
                .await
                .map_err(|e| ProxyError::upstream_connect(addr, e))
        };
        let resp = match send(idle, c, req, connect).await {
            Ok(r) => r,
            Err(Failed::Connect(e)) => panic!("connect: {e}"),
            Err(Failed::Send(e)) => panic!("send: {e}"),
        };
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_connection_goes_back_when_its_response_ends_and_is_reused() {
        let (addr, accepted) = server(None).await;
        let idle = Arc::new(Idle::new(1, 8));
        for _ in 0..3 {
            let (status, body) = get(&idle, addr, "http://app.ns:8080/a?b=c").await;
            assert_eq!(status, 200);
            // Origin form, with the authority as Host.
            assert_eq!(body, "app.ns:8080 /a?b=c");
            assert_eq!(idle.len(), 1, "the connection is idle again");
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connection_the_app_closed_is_replaced() {
        // Each connection answers once, then closes.
        let (addr, accepted) = server(Some(1)).await;
        let idle = Arc::new(Idle::new(1, 8));
        assert_eq!(get(&idle, addr, "/one").await.0, 200);
        // Whether the idle connection's task has seen the close yet (it is
        // dropped) or not (the request, unsent, goes over a new one), the
        // next request succeeds on a new connection.
        for round in 2..=4 {
            let (status, body) = get(&idle, addr, "/again").await;
            assert_eq!((status, body.as_str()), (200, "- /again"));
            assert_eq!(accepted.load(Ordering::SeqCst), round);
        }
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = server(None).await;
        let idle = Arc::new(Idle::new(1, 8));
        let c = connect_plain(addr).await.unwrap();
        let mut req = Request::get("/").body(crate::http::empty()).unwrap();
        origin_form(&mut req);
        let resp = match send(&idle, c, req, || async { unreachable!() }).await {
            Ok(r) => r,
            Err(_) => panic!("send failed"),
        };
        drop(resp);
        assert!(idle.is_empty(), "half-read connections are not reused");
        assert_eq!(get(&idle, addr, "/").await.0, 200);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn past_the_maximum_a_connection_given_back_is_closed() {
        let (addr, _) = server(None).await;
        let idle = Arc::new(Idle::new(1, 2));
        for _ in 0..3 {
            idle.give_back(connect_plain(addr).await.unwrap());
        }
        assert_eq!(idle.len(), 2);
    }

    #[tokio::test]
    async fn the_sweep_closes_connections_idle_past_the_timeout() {
        let (addr, _) = server(None).await;
        let idle = Arc::new(Idle::new(2, 8));
        idle.give_back(connect_plain(addr).await.unwrap());
        idle.give_back(connect_plain(addr).await.unwrap());
        idle.sweep();
        assert_eq!(idle.len(), 2, "recently used ones stay");
        idle.sweep_at(Instant::now() + IDLE_TIMEOUT + Duration::from_secs(1));
        assert!(idle.is_empty());
    }

    #[tokio::test]
    async fn the_sweep_closes_old_connections_behind_newer_ones() {
        let (addr, _) = server(None).await;
        let idle = Arc::new(Idle::new(1, 8));
        idle.give_back(connect_plain(addr).await.unwrap());
        idle.give_back(connect_plain(addr).await.unwrap());
        // Out of the order of use, as `take`'s swap leaves a list: the
        // newer connection first.
        let now = Instant::now();
        idle.lists.get().lock().unwrap()[1].since = now - IDLE_TIMEOUT * 2;
        idle.sweep_at(now);
        assert_eq!(idle.len(), 1, "the old one is closed, the new one stays");
        let kept = idle.lists.get().lock().unwrap()[0].since;
        assert!(now.duration_since(kept) < IDLE_TIMEOUT);
    }

    #[test]
    fn origin_form_moves_the_authority_to_host_without_user_info() {
        let mut req = Request::get("http://user@svc.ns:81/p?q").body(()).unwrap();
        *req.version_mut() = http::Version::HTTP_2;
        origin_form(&mut req);
        assert_eq!(req.uri(), "/p?q");
        assert_eq!(req.headers()[http::header::HOST], "svc.ns:81");
        assert_eq!(req.version(), http::Version::HTTP_11);
        // No authority: the Host the client sent stays.
        let mut req = Request::get("/x").header("host", "h").body(()).unwrap();
        origin_form(&mut req);
        assert_eq!(req.uri(), "/x");
        assert_eq!(req.headers()[http::header::HOST], "h");
    }
}
