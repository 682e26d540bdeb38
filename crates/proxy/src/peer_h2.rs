//! The HTTP/2 connection to a peer proxy (and to the local app, see
//! `inputs::AppH2`), driven with the `h2` crate directly rather than
//! through hyper's client.
//!
//! Why: hyper's HTTP/2 client hands each request to the connection's
//! dispatch task over a channel, and that task spawns one more task per
//! request (`SendWhen`) to wait for the response and hand it back over a
//! oneshot: per request a task allocated and scheduled and three
//! hand-offs, 2–4% of the client-side proxy's CPU in the profiles of
//! docs/performance.md. Here the request's own task opens the stream and
//! awaits the response. What hyper did besides is done here too: a
//! request body goes out at once as far as it is there (its last chunk
//! with the request's head, in one write, where hyper waited for the new
//! stream's window and sent it in a second), and only the rest (a
//! stream, or a body waiting for the window) is piped by a task of its
//! own; received data is given back to the flow-control window as it is
//! read; and the connection is pinged to find a peer that went away
//! without closing it.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::header::CONTENT_LENGTH;
use http::{HeaderValue, Method, Request, Response};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::http::{BoxError, Coalesce};
use crate::Body;

/// The connection's settings, as hyper's client had them.
pub struct Settings {
    pub stream_window: u32,
    pub conn_window: u32,
    pub max_header_list: u32,
    /// A ping goes out this often, and the connection is closed when its
    /// answer takes longer than this again (None: no pings).
    pub keep_alive: Option<Duration>,
}

/// Streams opened before the peer's SETTINGS say how many it allows
/// (hyper's default: the least the spec lets a peer advertise).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Data queued per stream before its sender waits (hyper's default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams this side may reset for errors of the peer's before the
/// connection is closed (hyper's default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// One HTTP/2 connection to a peer, shared by the requests of one worker.
/// Cloning it is cheap; the connection closes when its task ends.
#[derive(Clone)]
pub struct H2 {
    tx: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
}

impl H2 {
    /// Runs the HTTP/2 handshake over `io` and spawns the connection's task
    /// (with its pings) on the calling runtime.
    pub async fn handshake<T>(io: T, settings: &Settings, peer: String) -> Result<H2, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, mut conn) = h2::client::Builder::new()
            .initial_window_size(settings.stream_window)
            .initial_connection_window_size(settings.conn_window)
            .max_header_list_size(settings.max_header_list)
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = conn.ping_pong();
        let keep_alive = settings.keep_alive;
        let done = closed.clone();
        tokio::spawn(async move {
            let pings = async {
                let (Some(mut ping), Some(keep_alive)) = (ping, keep_alive) else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(keep_alive).await;
                    let pong = tokio::time::timeout(keep_alive, ping.ping(h2::Ping::opaque()));
                    match pong.await {
                        Ok(Ok(_)) => {}
                        Ok(Err(e)) => return format!("ping failed: {e}"),
                        Err(_) => return format!("no answer to a ping within {keep_alive:?}"),
                    }
                }
            };
            tokio::select! {
                ended = &mut conn => if let Err(e) = ended {
                    tracing::debug!(peer, error = %e, "connection to peer closed");
                },
                why = pings => tracing::debug!(peer, "closing the connection to a peer: {why}"),
            }
            done.store(true, Ordering::Release);
        });
        Ok(H2 { tx, closed })
    }

    /// Whether the connection has ended (or failed a request for a reason
    /// that ends it): the next request should open another.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends a request (its URI absolute, its hop-by-hop headers removed)
    /// and waits for the response's head. A request body is sent at once
    /// as far as it is there; the rest goes on in a task of its own (see
    /// `Pipe::start`), after the response's head has come too (a gRPC
    /// stream sends while it receives), until the stream is reset. If this
    /// future is dropped before the head comes, that task is aborted and
    /// the stream reset.
    pub async fn send(&mut self, req: Request<Body>) -> Result<Response<Body>, SendError> {
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        if let Some(len) = body.size_hint().exact() {
            if len != 0 || has_payload_semantics(head.method()) {
                head.headers_mut()
                    .entry(CONTENT_LENGTH)
                    .or_insert_with(|| HeaderValue::from(len));
            }
        }
        // A CONNECT's stream stays open both ways (as hyper's).
        let eos = body.is_end_stream() && head.method() != Method::CONNECT;
        // No `poll_ready` first: each request sends on its own clone of the
        // worker's handle (`Endpoint::h2`), and `h2` lets a handle with no
        // stream of its own waiting queue one past the peer's stream limit,
        // where it waits for a slot as hyper's would.
        let (response, stream) = match self.tx.send_request(head, eos) {
            Ok(sent) => sent,
            Err(e) => {
                // The connection is going or gone: the stream never opened.
                let gone = e.is_go_away() || e.is_io();
                if gone {
                    self.closed.store(true, Ordering::Release);
                }
                return Err(SendError {
                    error: e,
                    unprocessed: gone,
                });
            }
        };
        let pipe = if eos {
            None
        } else {
            Pipe::new(body, stream).start().await
        };
        // Drops the body's pipe if the response never comes (this future
        // was dropped: a timeout, the caller gone), which resets the stream.
        let mut guard = AbortOnDrop(pipe);
        let resp = response.await;
        if resp.is_ok() {
            // The head came: the body goes on being sent as the stream lasts.
            guard.0 = None;
        }
        let resp = resp.map_err(|e| {
            if e.is_go_away() || e.is_io() {
                self.closed.store(true, Ordering::Release);
            }
            SendError {
                unprocessed: e.is_reset()
                    && e.is_remote()
                    && e.reason() == Some(Reason::REFUSED_STREAM),
                error: e,
            }
        })?;
        let length = content_length(resp.headers());
        Ok(resp.map(|recv| {
            Coalesce::new(Received {
                recv,
                data_done: false,
                remaining: length,
            })
            .map_err(BoxError::from)
            .boxed_unsync()
        }))
    }
}

/// A request the peer did not answer, and whether it may have seen it.
#[derive(Debug)]
pub struct SendError {
    pub error: h2::Error,
    /// The peer's app cannot have seen the request, so any request, even
    /// a POST, may be sent again: it never went out (the connection was
    /// gone), or the peer refused its stream (REFUSED_STREAM, which
    /// RFC 9113 section 8.7 says is sent only before any processing; a
    /// peer over its stream limit does so for streams opened before its
    /// SETTINGS came). A GOAWAY's reset is not counted: `h2` gives streams
    /// the peer did process the same error when the connection then ends.
    pub unprocessed: bool,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for SendError {}

struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

/// Whether a method's request says what a body means, so that an empty
/// one is worth a `content-length: 0` (RFC 9110, section 8.6).
fn has_payload_semantics(m: &Method) -> bool {
    !matches!(
        *m,
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    )
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// A request body on its way to the peer: sent as the peer's flow control
/// allows, until it ends or the peer resets the stream. A body that fails
/// resets the stream, so the peer does not take it for a whole one.
struct Pipe {
    body: Body,
    tx: SendStream<Bytes>,
    /// A chunk taken from the body and waiting for room in the window.
    waiting: Option<(Bytes, bool)>,
}

impl Pipe {
    fn new(body: Body, tx: SendStream<Bytes>) -> Pipe {
        Pipe {
            body,
            tx,
            waiting: None,
        }
    }

    /// Sends what the body has ready; a body that is not done by then
    /// (a stream, or a large one waiting for the window) goes on in a task
    /// of its own. A unary call's body is usually all there at once: no
    /// task (as hyper does it).
    async fn start(mut self) -> Option<tokio::task::AbortHandle> {
        let first = poll_fn(|cx| Poll::Ready(self.poll(cx))).await;
        match first {
            Poll::Ready(Ok(())) => None,
            Poll::Ready(Err(e)) => {
                tracing::debug!(error = %e, "sending a request body to a peer failed");
                None
            }
            Poll::Pending => Some(
                tokio::spawn(async move {
                    if let Err(e) = poll_fn(|cx| self.poll(cx)).await {
                        tracing::debug!(error = %e, "sending a request body to a peer failed");
                    }
                })
                .abort_handle(),
            ),
        }
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        poll_pipe(&mut self.body, &mut self.tx, &mut self.waiting, cx)
    }
}

fn poll_pipe(
    body: &mut Body,
    tx: &mut SendStream<Bytes>,
    waiting: &mut Option<(Bytes, bool)>,
    cx: &mut Context<'_>,
) -> Poll<Result<(), BoxError>> {
    loop {
        // Registered first, so that a reset wakes this task whatever else
        // it waits for.
        if let Poll::Ready(reason) = tx.poll_reset(cx) {
            let reason = reason?;
            return Poll::Ready(Err(format!("the peer reset the stream: {reason}").into()));
        }
        if let Some((data, eos)) = waiting.take() {
            while tx.capacity() == 0 {
                match tx.poll_capacity(cx) {
                    Poll::Pending => {
                        *waiting = Some((data, eos));
                        return Poll::Pending;
                    }
                    Poll::Ready(Some(Ok(0))) => {}
                    Poll::Ready(Some(Ok(_))) => break,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                    Poll::Ready(None) => {
                        return Poll::Ready(Err("the stream closed while sending its body".into()))
                    }
                }
            }
            tx.send_data(data, eos)?;
            if eos {
                return Poll::Ready(Ok(()));
            }
            continue;
        }
        // The next frame before any capacity is claimed: a claim held
        // while the body has nothing to send could starve other streams
        // of the connection's window (hyper #4003).
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(None) => {
                tx.send_data(Bytes::new(), true)?;
                return Poll::Ready(Ok(()));
            }
            Poll::Ready(Some(Err(e))) => {
                tx.send_reset(Reason::INTERNAL_ERROR);
                return Poll::Ready(Err(e));
            }
            Poll::Ready(Some(Ok(f))) => f,
        };
        match frame.into_data() {
            Ok(data) => {
                let eos = body.is_end_stream();
                if data.is_empty() || eos {
                    // The last chunk goes at once, whatever the window:
                    // it is in memory already, and `h2` sends it as the
                    // window allows. Waiting for capacity would split it
                    // from the request's head: `h2` gives none to a stream
                    // until its connection task has opened it, so the body
                    // would follow in a write (a TLS record, a wake-up of
                    // the peer) and a task of its own.
                    tx.send_data(data, eos)?;
                    if eos {
                        return Poll::Ready(Ok(()));
                    }
                } else {
                    // A claim of one byte; `send_data` raises it to the
                    // chunk's length.
                    tx.reserve_capacity(1);
                    *waiting = Some((data, eos));
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    tx.reserve_capacity(0);
                    tx.send_trailers(trailers)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// A response body from the peer. Data read is given back to the
/// stream's and the connection's windows at once.
struct Received {
    recv: RecvStream,
    data_done: bool,
    /// What the `content-length` says is still to come.
    remaining: Option<u64>,
}

impl http_body::Body for Received {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let me = &mut *self;
        if !me.data_done {
            match me.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = me.recv.flow_control().release_capacity(data.len());
                    if let Some(r) = &mut me.remaining {
                        *r = r.saturating_sub(data.len() as u64);
                    }
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => {
                    // A reset with NO_ERROR or CANCEL after the body: the
                    // peer is done with its side, the response is whole
                    // (as hyper reads it). `h2` checks the data against the
                    // content-length itself.
                    return match e.reason() {
                        Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Poll::Ready(None),
                        _ => Poll::Ready(Some(Err(e))),
                    };
                }
                Poll::Ready(None) => me.data_done = true,
            }
        }
        match me.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(t)) => Poll::Ready(t.map(|t| Ok(Frame::trailers(t)))),
            Poll::Ready(Err(e)) => match e.reason() {
                Some(Reason::NO_ERROR) | Some(Reason::CANCEL) => Poll::Ready(None),
                _ => Poll::Ready(Some(Err(e))),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match self.remaining {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use http_body_util::StreamBody;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use std::future::Future;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::mpsc;

    fn settings(keep_alive: Duration) -> Settings {
        Settings {
            stream_window: 65_535,
            conn_window: 1 << 20,
            max_header_list: 16 << 10,
            keep_alive: Some(keep_alive),
        }
    }

    /// An HTTP/2 server that answers each request with `answer`.
    async fn serve<F, Fut>(answer: F) -> std::net::SocketAddr
    where
        F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Response<Body>> + Send + 'static,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let answer = answer.clone();
                let svc = hyper::service::service_fn(move |req| {
                    let f = answer(req);
                    async move { Ok::<_, std::convert::Infallible>(f.await) }
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc),
                );
            }
        });
        addr
    }

    /// An HTTP/2 server for one connection, served by `svc`, that takes
    /// at most `streams` streams at once (hyper's default when None).
    async fn serve_one<S>(svc: S, streams: Option<u32>) -> std::net::SocketAddr
    where
        S: hyper::service::HttpService<hyper::body::Incoming, ResBody = Body> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError>,
    {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let mut server = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            if let Some(n) = streams {
                server.max_concurrent_streams(n);
            }
            let _ = server.serve_connection(TokioIo::new(tcp), svc).await;
        });
        addr
    }

    async fn connect(addr: std::net::SocketAddr, keep_alive: Duration) -> H2 {
        let tcp = TcpStream::connect(addr).await.unwrap();
        H2::handshake(tcp, &settings(keep_alive), addr.to_string())
            .await
            .unwrap()
    }

    /// A request body fed chunk by chunk through the returned sender.
    fn channel_body() -> (mpsc::Sender<Bytes>, Body) {
        let (tx, rx) = mpsc::channel::<Bytes>(4);
        let frames = tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, BoxError>(Frame::data(b)));
        (tx, StreamBody::new(frames).boxed_unsync())
    }

    /// Waits for `cond` for at most 5 s.
    async fn until(mut cond: impl FnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if cond() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        cond()
    }

    #[tokio::test]
    async fn the_body_keeps_flowing_both_ways_after_the_response_head() {
        // The server echoes the request body as it comes.
        let addr = serve(|req: Request<hyper::body::Incoming>| async move {
            Response::new(crate::http::boxed(req.into_body()))
        })
        .await;
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        let (tx, body) = channel_body();
        let req = Request::post(format!("http://{addr}/echo"))
            .body(body)
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(5), conn.send(req))
            .await
            .expect("the head comes before the request body ends")
            .unwrap();
        let mut body = resp.into_body();
        for chunk in ["one", "two"] {
            tx.send(Bytes::from(chunk)).await.unwrap();
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .expect("each chunk comes back while the request is open")
                .unwrap()
                .unwrap();
            assert_eq!(frame.into_data().unwrap(), chunk);
        }
        drop(tx);
        let rest = tokio::time::timeout(Duration::from_secs(5), body.collect())
            .await
            .unwrap()
            .unwrap();
        assert!(
            rest.to_bytes().is_empty(),
            "the response ends with the request"
        );
        // A body all there at once (sent without a task of its own).
        let req = Request::post(format!("http://{addr}/echo"))
            .body(crate::http::full("whole"))
            .unwrap();
        let body = conn.send(req).await.unwrap().into_body();
        assert_eq!(body.collect().await.unwrap().to_bytes(), "whole");
        assert!(!conn.is_closed());
    }

    /// More requests than the peer takes streams at once: those over its
    /// limit wait for a slot, none fails.
    #[tokio::test]
    async fn requests_past_the_peers_stream_limit_wait_for_a_slot() {
        let (release, released) = tokio::sync::watch::channel(false);
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let mut released = released.clone();
            let first = req.uri().path() == "/first";
            if !first {
                counted.fetch_add(1, Ordering::SeqCst);
            }
            async move {
                if !first {
                    let _ = released.wait_for(|r| *r).await;
                }
                Ok::<_, std::convert::Infallible>(Response::new(crate::http::empty()))
            }
        });
        let addr = serve_one(svc, Some(1)).await;
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        // Answered at once: once it is, the peer's SETTINGS (its limit)
        // have come. Before them the client may open up to 100 streams,
        // and a peer with a lower limit refuses those past it (as with
        // hyper's client).
        let first = Request::get(format!("http://{addr}/first"))
            .body(crate::http::empty())
            .unwrap();
        assert_eq!(
            conn.send(first).await.unwrap().status(),
            http::StatusCode::OK
        );
        let sends: Vec<_> = (0..3)
            .map(|i| {
                let mut conn = conn.clone();
                tokio::spawn(async move {
                    let req = Request::get(format!("http://{addr}/{i}"))
                        .body(crate::http::empty())
                        .unwrap();
                    conn.send(req).await.map(|r| r.status())
                })
            })
            .collect();
        // The first is at the server; the limit holds the others back.
        tokio::time::timeout(Duration::from_secs(5), async {
            while seen.load(Ordering::SeqCst) == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first request reaches the server");
        assert_eq!(
            seen.load(Ordering::SeqCst),
            1,
            "the peer's limit is one stream"
        );
        release.send(true).unwrap();
        for s in sends {
            let status = tokio::time::timeout(Duration::from_secs(5), s)
                .await
                .expect("a request over the limit is answered once a slot frees")
                .unwrap()
                .expect("a request over the limit waits instead of failing");
            assert_eq!(status, http::StatusCode::OK);
        }
        assert_eq!(seen.load(Ordering::SeqCst), 3);
    }

    /// Streams opened before the peer's SETTINGS, past its limit of one:
    /// the peer refuses them, and each such failure says that the peer
    /// did not process the request (so the forwarder may send it again).
    /// The one stream the peer took is answered.
    #[tokio::test]
    async fn streams_the_peer_refuses_are_reported_unprocessed() {
        let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = seen.clone();
        let svc = hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
            counted.fetch_add(1, Ordering::SeqCst);
            async { Ok::<_, std::convert::Infallible>(Response::new(crate::http::empty())) }
        });
        let addr = serve_one(svc, Some(1)).await;
        let conn = connect(addr, Duration::from_secs(10)).await;
        // One thread, and the three streams opened in one poll before
        // anything else runs: the connection has not read the peer's
        // SETTINGS yet, so it sends all three at once.
        let send = |i: usize| {
            let mut conn = conn.clone();
            async move {
                let req = Request::get(format!("http://{addr}/{i}"))
                    .body(crate::http::empty())
                    .unwrap();
                conn.send(req).await.map(|r| r.status())
            }
        };
        let (a, b, c) = tokio::time::timeout(
            Duration::from_secs(5),
            futures::future::join3(send(0), send(1), send(2)),
        )
        .await
        .expect("every request is answered or refused");
        let mut answered = 0;
        let mut refused = 0;
        for r in [a, b, c] {
            match r {
                Ok(status) => {
                    assert_eq!(status, http::StatusCode::OK);
                    answered += 1;
                }
                Err(e) => {
                    assert_eq!(e.error.reason(), Some(Reason::REFUSED_STREAM), "{e}");
                    assert!(e.unprocessed, "a refused stream was not processed: {e}");
                    refused += 1;
                }
            }
        }
        assert_eq!(seen.load(Ordering::SeqCst), answered);
        assert!(answered >= 1, "the peer takes one stream");
        assert!(
            refused >= 1,
            "the streams past the limit were sent before the peer's SETTINGS came"
        );
        assert!(
            !conn.is_closed(),
            "a refused stream leaves the connection open"
        );
    }

    /// A stream the peer took and then reset is not reported unprocessed:
    /// its app may have seen the request.
    #[tokio::test]
    async fn a_stream_reset_after_the_peer_took_it_is_not_unprocessed() {
        // A service that fails: hyper resets the stream (INTERNAL_ERROR).
        let svc = hyper::service::service_fn(|_req: Request<hyper::body::Incoming>| async {
            Err::<Response<Body>, std::io::Error>(std::io::Error::other("the app broke"))
        });
        let addr = serve_one(svc, None).await;
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        let req = Request::get(format!("http://{addr}/"))
            .body(crate::http::empty())
            .unwrap();
        let e = conn
            .send(req)
            .await
            .expect_err("the peer resets the stream");
        assert!(e.error.is_reset() && e.error.is_remote(), "{e}");
        assert_eq!(e.error.reason(), Some(Reason::INTERNAL_ERROR));
        assert!(!e.unprocessed, "{e}");
    }

    #[tokio::test]
    async fn a_request_dropped_before_its_answer_resets_its_stream() {
        // The server reads the whole body before it answers, and says how
        // reading it ended.
        let (told, mut ended) = mpsc::unbounded_channel::<bool>();
        let addr = serve(move |req: Request<hyper::body::Incoming>| {
            let told = told.clone();
            async move {
                let whole = req.into_body().collect().await.is_ok();
                let _ = told.send(whole);
                Response::new(crate::http::empty())
            }
        })
        .await;
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        let (tx, body) = channel_body();
        tx.send(Bytes::from_static(b"part")).await.unwrap();
        let req = Request::post(format!("http://{addr}/")).body(body).unwrap();
        // Gives up on the answer with the body still open (the sender is
        // held below): the stream must be reset, not left waiting.
        let gave_up = tokio::time::timeout(Duration::from_millis(200), conn.send(req)).await;
        assert!(gave_up.is_err());
        let whole = tokio::time::timeout(Duration::from_secs(5), ended.recv())
            .await
            .expect("the server learns the request is gone")
            .unwrap();
        assert!(!whole, "the server saw the body end in a reset");
        drop(tx);
        // The connection serves the next request.
        let req = Request::get(format!("http://{addr}/"))
            .body(crate::http::empty())
            .unwrap();
        assert_eq!(conn.send(req).await.unwrap().status(), http::StatusCode::OK);
    }

    #[tokio::test]
    async fn a_peer_that_answers_no_ping_is_closed() {
        // Accepts and reads, never writes: not even its SETTINGS.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.unwrap();
            let mut sink = tokio::io::sink();
            let _ = tokio::io::copy(&mut tcp, &mut sink).await;
        });
        let conn = connect(addr, Duration::from_millis(100)).await;
        assert!(!conn.is_closed());
        assert!(
            until(|| conn.is_closed()).await,
            "closed after a ping went unanswered"
        );
    }

    #[tokio::test]
    async fn a_connection_the_peer_closed_is_closed() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = l.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_| async {
                Ok::<_, std::convert::Infallible>(Response::new(crate::http::empty()))
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc);
            tokio::select! {
                _ = conn => {}
                _ = closed => {}
            }
        });
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        let req = Request::get(format!("http://{addr}/"))
            .body(crate::http::empty())
            .unwrap();
        assert_eq!(conn.send(req).await.unwrap().status(), http::StatusCode::OK);
        assert!(!conn.is_closed());
        close.send(()).unwrap();
        assert!(until(|| conn.is_closed()).await);
    }

    /// A connection that counts its writes.
    struct CountWrites(TcpStream, Arc<std::sync::atomic::AtomicUsize>);

    impl AsyncRead for CountWrites {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountWrites {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let n = std::task::ready!(Pin::new(&mut self.0).poll_write(cx, buf))?;
            self.1.fetch_add(1, Ordering::Relaxed);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.0).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_whole_body_goes_out_with_the_request_head_in_one_write() {
        // The peer echoes the body.
        let addr = serve(|req: Request<hyper::body::Incoming>| async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            Response::new(crate::http::full(body))
        })
        .await;
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let tcp = TcpStream::connect(addr).await.unwrap();
        let io = CountWrites(tcp, writes.clone());
        let mut conn = H2::handshake(io, &settings(Duration::from_secs(60)), addr.to_string())
            .await
            .unwrap();
        let post = |body: &'static str| {
            Request::builder()
                .method(Method::POST)
                .uri(format!("http://{addr}/bench.Echo/Call"))
                .body(crate::http::full(body))
                .unwrap()
        };
        // The first call settles the connection (both sides' SETTINGS and
        // their acknowledgements).
        let first = conn.send(post("settle")).await.unwrap().into_body();
        assert_eq!(first.collect().await.unwrap().to_bytes(), "settle");
        for msg in ["one", "two", "three"] {
            let before = writes.load(Ordering::Relaxed);
            let body = conn.send(post(msg)).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), msg);
            // HEADERS and DATA in one write: before, the body waited for
            // the new stream's window and followed in a second one.
            assert_eq!(
                writes.load(Ordering::Relaxed) - before,
                1,
                "writes for {msg}"
            );
        }
    }

    #[tokio::test]
    async fn an_empty_post_says_its_length() {
        let addr = serve(|req: Request<hyper::body::Incoming>| async move {
            let len = req
                .headers()
                .get(CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            Response::new(crate::http::full(len))
        })
        .await;
        let mut conn = connect(addr, Duration::from_secs(10)).await;
        for (method, want) in [(Method::POST, "0"), (Method::GET, "")] {
            let req = Request::builder()
                .method(method)
                .uri(format!("http://{addr}/"))
                .body(crate::http::empty())
                .unwrap();
            let body = conn.send(req).await.unwrap().into_body();
            assert_eq!(body.collect().await.unwrap().to_bytes(), want);
        }
    }
}
