//! Serving one HTTP connection (HTTP/1.1 and HTTP/2, detected) on any
//! listener, held to the proxy's `Limits`: hyper's own settings, and what
//! hyper does not do itself.
//!
//! - Header-read timeout: a new connection's first request, and an HTTP/1
//!   request once its first byte came, must have sent the whole header in
//!   time; else a 408 (HTTP/1, when part of a request came) and a close.
//!   hyper's own header timer is off: it also runs while a keep-alive
//!   connection waits, so it could not tell a slow client from an idle one.
//! - Idle timeouts: no request in flight for `http1_idle_timeout` (close)
//!   or `http2_idle_timeout` (GOAWAY); dead HTTP/2 peers by PING.
//! - Premature resets: a stream the client resets within a second of
//!   opening, before or while it is answered, costs the proxy (and often
//!   the app) a request for nothing; paced one at a time they pass hyper's
//!   guard against bursts of them. When more than half of a window of
//!   `http2_reset_flood_streams` streams end so, new streams get 503
//!   without reaching the app, the connection gets GOAWAY and is closed
//!   within a second.
//! - Header limits, the same on every hop (see `limits`): 431, the
//!   client's error.
//! - HEAD: an answer the proxy makes itself has no content, so that its
//!   HTTP/2 stream ends with its headers (RFC 9110 §9.3.2).
//!
//! One `ConnState` per connection, shared by the I/O wrapper (`Watched`,
//! which sees bytes arrive), the service (which sees requests begin and
//! end) and the loop that serves it (which keeps the one timer).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::error::{ProxyError, Source};
use crate::http::{empty, signalled, BoxError};
use crate::inputs::Inputs;
use crate::limits::{HeaderLimits, Limits};
use crate::listener::{Blame, Closed, ConnMetrics, Kind};
use crate::Body;

/// HTTP/2 windows of connections that carry many callers' streams (to and
/// from peer proxies, and the local app's): fixed and large, rather than
/// hyper's adaptive ones that start at 64 KiB. h2 closes a connection
/// (GOAWAY ENHANCE_YOUR_CALM, "too_many_data_frames") when the small DATA
/// frames it holds unread cost more than half its connection window, and
/// at 64 KiB a few slow readers of a stream of small gRPC messages reach
/// that and take every other call on the connection down with them.
/// Half of 32 MiB holds about ten streams' full 1 MiB windows of 100-byte
/// frames, unread.
pub const SHARED_STREAM_WINDOW: u32 = 1024 * 1024;
pub const SHARED_CONN_WINDOW: u32 = 32 * 1024 * 1024;

/// The largest response header section the proxy takes from a peer or the
/// app over HTTP/2: what hyper takes from an HTTP/1 app (its read buffer),
/// so an answer that passes one way passes the other.
pub const MAX_RESPONSE_HEADERS: u32 = 8192 + 4096 * 100;

/// A stream reset by its client within this of opening is premature
/// (Envoy's `premature_reset_min_stream_lifetime_seconds`).
const PREMATURE: Duration = Duration::from_secs(1);
/// How long a connection closed for a reset flood (but a peer proxy's:
/// the drain grace), or for being idle, may take to finish what is in
/// flight after its GOAWAY.
const FLOOD_GRACE: Duration = Duration::from_secs(1);
const IDLE_GRACE: Duration = Duration::from_secs(5);

const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nconnection: close\r\ncontent-length: 0\r\n\r\n";

/// Who is on the other end, which decides header limits and HTTP/2
/// settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hop {
    /// The local app, or an admin client: the first hop.
    App,
    /// Plaintext on the inbound listener (permissive or disabled mTLS):
    /// maybe a peer proxy, so with room for what proxies add.
    Plain,
    /// A peer proxy that proved its identity with mutual TLS.
    Peer,
}

impl Hop {
    fn headers(self, limits: &Limits) -> HeaderLimits {
        limits.headers(self != Hop::App)
    }
}

/// Serves one connection until it ends, shutdown drains it, or a limit
/// closes it (counted under `kind`).
pub async fn serve_connection<I, F, Fut>(
    io: I,
    inputs: &Inputs,
    kind: Kind,
    hop: Hop,
    mut shutdown: watch::Receiver<bool>,
    handler: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let limits = &inputs.cfg.limits;
    let metrics = &inputs.metrics.conns;
    let state = Arc::new(ConnState::new(limits));
    let headers = hop.headers(limits);
    let svc = {
        let (state, metrics) = (state.clone(), metrics.clone());
        hyper::service::service_fn(move |req: Request<Incoming>| {
            let stream = Stream::begin(state.clone(), req.version() == Version::HTTP_2);
            answer(req, stream, headers, kind, metrics.clone(), handler.clone())
        })
    };
    let builder = builder(limits, hop);
    let io = Watched {
        io,
        state: state.clone(),
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let timer = tokio::time::sleep_until(Instant::now());
    tokio::pin!(timer);
    state.arm(timer.as_mut(), state.deadline().0);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = signalled(&mut shutdown) => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = state.flood.notified() => {
                metrics.closed_by_limit(kind, Closed::reset_flood);
                tracing::info!(listener = %kind, "closing an HTTP/2 connection whose client resets most of its streams as soon as it opens them (--http2-reset-flood-streams)");
                conn.as_mut().graceful_shutdown();
                // A peer proxy's connection carries other callers' streams
                // too: they get the drain grace to finish.
                let grace = if hop == Hop::Peer { inputs.cfg.drain_grace } else { FLOOD_GRACE };
                break bounded(conn.as_mut(), grace).await;
            }
            // A request ended, or an HTTP/1 request began, whose timeout
            // is due before the timer.
            _ = state.rearm.notified() => state.arm(timer.as_mut(), state.deadline().0),
            _ = timer.as_mut() => {
                let (at, expiry) = state.deadline();
                if at > now_ms() {
                    state.arm(timer.as_mut(), at);
                    continue;
                }
                match expiry {
                    Expiry::Header if !state.http2.load(Ordering::Relaxed) => {
                        metrics.closed_by_limit(kind, Closed::header_timeout);
                        // A client that sent part of a request is told
                        // why, as HTTP/1 allows, unless the proxy is
                        // still writing to it.
                        let partial = state.head_since.load(Ordering::Relaxed) != 0;
                        if partial && !state.write_blocked.load(Ordering::Relaxed) {
                            state.answer_408.store(true, Ordering::Relaxed);
                        }
                        return;
                    }
                    Expiry::Header | Expiry::Idle => {
                        let reason = if expiry == Expiry::Idle { Closed::idle } else { Closed::header_timeout };
                        metrics.closed_by_limit(kind, reason);
                        conn.as_mut().graceful_shutdown();
                        break bounded(conn.as_mut(), IDLE_GRACE).await;
                    }
                    Expiry::Recheck => state.arm(timer.as_mut(), now_ms() + state.timeouts.header),
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(listener = %kind, error = %e, "connection ended with an error");
    }
}

/// Awaits a connection draining after its GOAWAY for at most `grace`.
async fn bounded<C>(conn: Pin<&mut C>, grace: Duration) -> Result<(), BoxError>
where
    C: Future<Output = Result<(), BoxError>>,
{
    tokio::time::timeout(grace, conn).await.unwrap_or(Ok(()))
}

fn builder(limits: &Limits, hop: Hop) -> auto::Builder<TokioExecutor> {
    let headers = hop.headers(limits);
    let mut b = auto::Builder::new(TokioExecutor::new());
    let mut h1 = b.http1();
    h1.preserve_header_case(false)
        .half_close(false)
        .timer(TokioTimer::new())
        .header_read_timeout(None);
    // hyper takes 100 headers unless told (and then allocates them on the
    // heap): tell it only when the limit differs.
    if headers.count != 100 {
        h1.max_headers(headers.count);
    }
    // Room for the request line (up to hyper's 64 KiB) on top of the
    // headers; hyper's default buffer (~400 KiB) is larger than that for
    // the default limits.
    let buf = headers.bytes as usize + 64 * 1024 + 8 * 1024;
    if buf > 8192 + 4096 * 100 {
        h1.max_buf_size(buf);
    }
    let mut h2 = b.http2();
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(limits.http2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.http2_max_pending_accept_reset_streams)
        .max_header_list_size(headers.bytes)
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    match hop {
        Hop::App | Hop::Peer => {
            h2.initial_stream_window_size(SHARED_STREAM_WINDOW)
                .initial_connection_window_size(SHARED_CONN_WINDOW);
        }
        Hop::Plain => {
            h2.adaptive_window(true);
        }
    }
    if hop == Hop::Peer {
        // A peer proxy's connection lives long and carries every request
        // between two proxies, so the `h2` crate's lifetime cap on streams
        // it had to reset for a protocol error (1,024, a defence against
        // peers that provoke resets) is lifted: an app that answers before
        // reading a whole request body makes the stream end early, the
        // caller's last body frame then arrives for a stream already
        // forgotten, and at that cap the shared connection, with every
        // call on it, would be torn down with ENHANCE_YOUR_CALM. The
        // premature-reset rule still holds.
        h2.max_local_error_reset_streams(None);
    }
    b
}

/// One request: header limits, the handler, HEAD, counting; the answer's
/// body carries the request's `Stream` until it is done.
async fn answer<F, Fut>(
    req: Request<Incoming>,
    stream: Stream,
    headers: HeaderLimits,
    kind: Kind,
    metrics: ConnMetrics,
    handler: F,
) -> Result<Response<Tracked>, std::convert::Infallible>
where
    F: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Response<Body>>,
{
    let head = req.method() == Method::HEAD;
    let mut resp = if stream.state.flooded.load(Ordering::Relaxed) {
        ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Source::Downstream,
            "this connection resets most of its streams as soon as it opens them, and is being closed: open a new one",
        )
        .into_response()
    } else if let Err((bytes, count)) = headers.check(req.headers()) {
        ProxyError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Source::Downstream,
            format!(
                "the request's headers are too large: {count} headers, {bytes} bytes counted as HTTP/2 does (name + value + 32 each); the limit is {} headers and {} bytes (--max-request-headers, --max-request-headers-kb)",
                headers.count, headers.bytes
            ),
        )
        .into_response()
    } else {
        handler(req).await
    };
    if head && !resp.body().is_end_stream() {
        *resp.body_mut() = empty();
    }
    if let Some(blame) = resp.headers().get("x-trellis-error").and_then(blame) {
        metrics.proxy_error(kind, blame, resp.status().as_u16());
    }
    Ok(resp.map(|inner| Tracked {
        inner,
        stream: Some(stream),
    }))
}

fn blame(v: &http::HeaderValue) -> Option<Blame> {
    match v.as_bytes() {
        b"downstream" => Some(Blame::downstream),
        b"upstream" => Some(Blame::upstream),
        b"internal" => Some(Blame::internal),
        _ => None,
    }
}

/// The clock of `ConnState`: milliseconds since the first connection, from
/// 1 (0 means "not set").
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    base().elapsed().as_millis() as u64 + 1
}

fn at_ms(ms: u64) -> Instant {
    base() + Duration::from_millis(ms.saturating_sub(1))
}

/// What a connection's timer ends, when it fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expiry {
    Header,
    Idle,
    /// Requests are in flight: nothing ends; look again later.
    Recheck,
}

/// A connection's timeouts, in ms.
struct Timeouts {
    header: u64,
    http1_idle: u64,
    http2_idle: u64,
}

/// One connection's life, as its parts see it.
struct ConnState {
    timeouts: Timeouts,
    opened: u64,
    /// When the timer is set to fire (ms); `rearm` wakes the serving loop
    /// to set it earlier.
    armed: AtomicU64,
    rearm: Notify,
    /// Requests in flight (answers whose body is not done included).
    active: AtomicU32,
    /// When the last request in flight ended (ms).
    idle_since: AtomicU64,
    /// When the first byte of an HTTP/1 request's header arrived (ms), or
    /// 0 while none is coming.
    head_since: AtomicU64,
    requests: AtomicU64,
    /// The client spoke HTTP/2 (its preface, or a request).
    http2: AtomicBool,
    first_read: AtomicBool,
    /// The premature-reset window: streams ended, and those reset early.
    window: u32,
    ended: AtomicU32,
    premature: AtomicU32,
    flooded: AtomicBool,
    flood: Notify,
    /// The last write could not go out whole: something of hyper's is
    /// still unsent, so nothing may be written around it.
    write_blocked: AtomicBool,
    answer_408: AtomicBool,
}

impl ConnState {
    fn new(l: &Limits) -> ConnState {
        let now = now_ms();
        let ms = |d: Duration| d.as_millis() as u64;
        ConnState {
            timeouts: Timeouts {
                header: ms(l.header_read_timeout),
                http1_idle: ms(l.http1_idle_timeout),
                http2_idle: ms(l.http2_idle_timeout),
            },
            opened: now,
            armed: AtomicU64::new(u64::MAX),
            rearm: Notify::new(),
            active: AtomicU32::new(0),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            http2: AtomicBool::new(false),
            first_read: AtomicBool::new(false),
            window: l.http2_reset_flood_streams,
            ended: AtomicU32::new(0),
            premature: AtomicU32::new(0),
            flooded: AtomicBool::new(false),
            flood: Notify::new(),
            write_blocked: AtomicBool::new(false),
            answer_408: AtomicBool::new(false),
        }
    }

    /// When the timer should fire next (ms), and what ends then.
    fn deadline(&self) -> (u64, Expiry) {
        let header = self.timeouts.header;
        if self.active.load(Ordering::Relaxed) > 0 {
            return (now_ms() + header, Expiry::Recheck);
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            return (self.opened + header, Expiry::Header);
        }
        let http2 = self.http2.load(Ordering::Relaxed);
        let head = self.head_since.load(Ordering::Relaxed);
        if !http2 && head != 0 {
            return (head + header, Expiry::Header);
        }
        let since = self.idle_since.load(Ordering::Relaxed);
        (since + self.idle_timeout(), Expiry::Idle)
    }

    fn idle_timeout(&self) -> u64 {
        if self.http2.load(Ordering::Relaxed) {
            self.timeouts.http2_idle
        } else {
            self.timeouts.http1_idle
        }
    }

    /// Sets the timer to fire at `at` (ms).
    fn arm(&self, timer: Pin<&mut tokio::time::Sleep>, at: u64) {
        self.armed.store(at, Ordering::Relaxed);
        timer.reset(at_ms(at));
    }

    /// Something is due at `at` (ms): wakes the serving loop when the
    /// timer is set later than that (a timeout shorter than the one the
    /// timer waits for), and only then, so that the common case costs a
    /// load.
    fn due(&self, at: u64) {
        if at < self.armed.load(Ordering::Relaxed) {
            self.rearm.notify_one();
        }
    }

    fn on_read(&self, bytes: &[u8]) {
        if !self.first_read.swap(true, Ordering::Relaxed)
            && bytes.len() >= 3
            && b"PRI * HTTP/2.0".starts_with(&bytes[..bytes.len().min(14)])
        {
            self.http2.store(true, Ordering::Relaxed);
        }
        if !self.http2.load(Ordering::Relaxed)
            && self.active.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            let now = now_ms();
            self.head_since.store(now, Ordering::Relaxed);
            self.due(now + self.timeouts.header);
        }
    }

    /// A stream ended; `premature` when its client reset it early.
    fn stream_ended(&self, premature: bool) {
        let premature_now = if premature {
            self.premature.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.premature.load(Ordering::Relaxed)
        };
        let ended = self.ended.fetch_add(1, Ordering::Relaxed) + 1;
        if ended < self.window {
            return;
        }
        // A window is full: judge it and start the next.
        self.ended.store(0, Ordering::Relaxed);
        self.premature.store(0, Ordering::Relaxed);
        if u64::from(premature_now) * 2 > u64::from(ended)
            && !self.flooded.swap(true, Ordering::Relaxed)
        {
            self.flood.notify_one();
        }
    }
}

/// One request on a connection, from its header until its answer's body
/// is done or dropped.
struct Stream {
    state: Arc<ConnState>,
    opened: Instant,
    http2: bool,
    answered: bool,
}

impl Stream {
    fn begin(state: Arc<ConnState>, http2: bool) -> Stream {
        state.active.fetch_add(1, Ordering::Relaxed);
        state.requests.fetch_add(1, Ordering::Relaxed);
        state.head_since.store(0, Ordering::Relaxed);
        if http2 {
            state.http2.store(true, Ordering::Relaxed);
        }
        Stream {
            state,
            opened: Instant::now(),
            http2,
            answered: false,
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if self.state.active.fetch_sub(1, Ordering::Relaxed) == 1 {
            let now = now_ms();
            self.state.idle_since.store(now, Ordering::Relaxed);
            self.state.due(now + self.state.idle_timeout());
        }
        if self.http2 {
            let premature = !self.answered && self.opened.elapsed() < PREMATURE;
            self.state.stream_ended(premature);
        }
    }
}

/// An answer's body, which ends its request's `Stream` when it is done
/// (answered) or dropped before (reset).
pub struct Tracked {
    inner: Body,
    stream: Option<Stream>,
}

impl Tracked {
    fn done(&mut self) {
        if let Some(mut s) = self.stream.take() {
            s.answered = true;
        }
    }
}

impl http_body::Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.done(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.done(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.done();
        }
    }
}

/// The connection's I/O, watched: bytes of a request header arriving,
/// writes that could not go out, and the 408 owed when it is dropped.
struct Watched<I: AsyncRead + AsyncWrite + Unpin> {
    io: I,
    state: Arc<ConnState>,
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.state.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.state
            .write_blocked
            .store(r.is_pending(), Ordering::Relaxed);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        self.state
            .write_blocked
            .store(r.is_pending(), Ordering::Relaxed);
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.state
            .write_blocked
            .store(r.is_pending(), Ordering::Relaxed);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> Drop for Watched<I> {
    /// Writes the 408 owed, if the socket takes it now: the connection is
    /// closing, so there is no waiting for it.
    fn drop(&mut self) {
        if !self.state.answer_408.load(Ordering::Relaxed) {
            return;
        }
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut io = Pin::new(&mut self.io);
        if let Poll::Ready(Ok(n)) = io.as_mut().poll_write(&mut cx, RESPONSE_408) {
            if n == RESPONSE_408.len() {
                let _ = io.as_mut().poll_flush(&mut cx);
                let _ = io.as_mut().poll_shutdown(&mut cx);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(streams: u32) -> ConnState {
        ConnState::new(&Limits {
            http2_reset_flood_streams: streams,
            ..Limits::default()
        })
    }

    #[test]
    fn a_window_mostly_reset_early_is_a_flood() {
        let s = window(10);
        // Half reset early is not more than half.
        for i in 0..10 {
            s.stream_ended(i % 2 == 0);
        }
        assert!(!s.flooded.load(Ordering::Relaxed));
        // The next window starts afresh: 6 of 10 is a flood.
        for i in 0..10 {
            s.stream_ended(i < 6);
        }
        assert!(s.flooded.load(Ordering::Relaxed));
    }

    #[test]
    fn the_timer_follows_the_connections_life() {
        let l = Limits {
            header_read_timeout: Duration::from_secs(10),
            http1_idle_timeout: Duration::from_secs(300),
            http2_idle_timeout: Duration::from_secs(3600),
            ..Limits::default()
        };
        let s = Arc::new(ConnState::new(&l));
        // Waiting for the first request: the header timeout.
        assert_eq!(s.deadline(), (s.opened + 10_000, Expiry::Header));
        // A request in flight: nothing ends.
        let stream = Stream::begin(s.clone(), false);
        assert_eq!(s.deadline().1, Expiry::Recheck);
        drop(stream);
        // Between requests: idle.
        let (at, expiry) = s.deadline();
        assert_eq!(expiry, Expiry::Idle);
        assert!(at >= s.opened + 300_000);
        // The next request's first bytes: the header timeout again.
        s.on_read(b"GET / HT");
        assert_eq!(s.deadline().1, Expiry::Header);
        // HTTP/2 between streams: its own idle timeout.
        let h2 = Arc::new(ConnState::new(&l));
        h2.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
        drop(Stream::begin(h2.clone(), true));
        h2.on_read(b"\0\0\0\x04\0\0\0\0\0");
        let (at, expiry) = h2.deadline();
        assert_eq!(expiry, Expiry::Idle);
        assert!(at >= h2.opened + 3_600_000);
    }

    /// An idle or header timeout shorter than what the timer waits for
    /// wakes the serving loop; a longer one does not.
    #[tokio::test]
    async fn a_timeout_due_before_the_timer_rearms_it() {
        let l = Limits {
            header_read_timeout: Duration::from_secs(60),
            http1_idle_timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        let s = Arc::new(ConnState::new(&l));
        let timer = tokio::time::sleep(Duration::from_secs(60));
        tokio::pin!(timer);
        s.arm(timer.as_mut(), s.deadline().0);
        drop(Stream::begin(s.clone(), false));
        let woken = tokio::time::timeout(Duration::from_secs(5), s.rearm.notified()).await;
        assert!(
            woken.is_ok(),
            "an idle timeout of 1 s left for a 60 s timer"
        );
        s.arm(timer.as_mut(), s.deadline().0);
        // The next request's header is due in 60 s, after the idle
        // deadline the timer is armed for: no wake.
        s.on_read(b"GET / HT");
        s.due(s.deadline().0);
        let woken = tokio::time::timeout(Duration::from_millis(50), s.rearm.notified()).await;
        assert!(woken.is_err(), "woken for a later deadline");
    }

    #[test]
    fn an_early_reset_is_premature_and_an_answer_is_not() {
        let s = Arc::new(window(2));
        // Dropped unanswered (the client reset it).
        drop(Stream::begin(s.clone(), true));
        // Answered: its body was done.
        let mut t = Tracked {
            inner: crate::http::empty(),
            stream: Some(Stream::begin(s.clone(), true)),
        };
        t.done();
        drop(t);
        assert!(
            !s.flooded.load(Ordering::Relaxed),
            "1 of 2 is not more than half"
        );
        let s = Arc::new(window(2));
        drop(Stream::begin(s.clone(), true));
        drop(Stream::begin(s.clone(), true));
        assert!(s.flooded.load(Ordering::Relaxed));
        assert_eq!(s.active.load(Ordering::Relaxed), 0);
    }
}
