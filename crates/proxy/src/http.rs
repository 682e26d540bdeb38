//! HTTP plumbing shared by both directions: bodies (boxed, their small
//! frames coalesced, a client's broken body told apart), hop-by-hop
//! headers, the internal headers between proxies, and upgrades. Serving a
//! connection is `server`'s.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri};
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::error::ProxyError;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Set by the outbound proxy when it carries an HTTP/1 request over HTTP/2,
/// so the inbound proxy speaks HTTP/1 to the app again.
pub const ORIG_PROTO: HeaderName = HeaderName::from_static("x-trellis-orig-proto");
/// `namespace/workload` of the calling proxy (to be replaced by the peer's
/// verified identity once mTLS is in).
pub const SOURCE: HeaderName = HeaderName::from_static("x-trellis-source");
/// `namespace/service` the caller addressed.
pub const DESTINATION: HeaderName = HeaderName::from_static("x-trellis-destination");
/// Internal headers that must never reach an app.
pub const INTERNAL: [HeaderName; 3] = [ORIG_PROTO, SOURCE, DESTINATION];

/// A body received, to be sent on: its small frames that are ready
/// together go as one (see `Coalesce`).
pub fn boxed(b: Incoming) -> Body {
    Coalesce::new(b).map_err(BoxError::from).boxed_unsync()
}

/// A client's request body, to be sent on: as `boxed`, and when it breaks
/// (bad chunked framing, a reset), `fault` says so, so that the failure of
/// the request it was sent with is put down to the client, not the
/// upstream.
pub fn request_body(b: Incoming, fault: &BodyFault) -> Body {
    let fault = fault.clone();
    Coalesce::new(b)
        .map_err(move |e| {
            fault.0.store(true, Ordering::Relaxed);
            BoxError::from(e)
        })
        .boxed_unsync()
}

/// Whether a client's request body broke while it was sent on.
#[derive(Clone, Debug, Default)]
pub struct BodyFault(Arc<AtomicBool>);

impl BodyFault {
    pub fn broke(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Frames below this are merged with the next ones that are ready at once.
const COALESCE_BELOW: usize = 16 * 1024;

/// A body whose small DATA frames that are ready together are sent as one.
/// Frame boundaries mean nothing in HTTP, and fewer, larger frames cost
/// less to send and to hold: the `h2` crate closes a connection whose
/// peer holds too many small frames unread (see `server`), so a stream of
/// small gRPC messages is best sent in as few frames as it can. Nothing
/// waits for more: only frames already there are merged.
pub struct Coalesce<B: http_body::Body> {
    inner: B,
    /// What came after merged data: trailers or an error, sent next.
    held: Option<Result<Frame<Bytes>, B::Error>>,
    done: bool,
}

impl<B: http_body::Body> Coalesce<B> {
    pub fn new(inner: B) -> Self {
        Coalesce {
            inner,
            held: None,
            done: false,
        }
    }
}

impl<B> http_body::Body for Coalesce<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(held) = self.held.take() {
            return Poll::Ready(Some(held));
        }
        if self.done {
            return Poll::Ready(None);
        }
        let first = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => f,
            other => return other,
        };
        let data = match first.into_data() {
            Ok(d) if d.len() < COALESCE_BELOW && !self.inner.is_end_stream() => d,
            Ok(d) => return Poll::Ready(Some(Ok(Frame::data(d)))),
            Err(f) => return Poll::Ready(Some(Ok(f))),
        };
        let mut merged: Option<BytesMut> = None;
        loop {
            let len = merged.as_ref().map_or(data.len(), |m| m.len());
            if len >= COALESCE_BELOW || self.inner.is_end_stream() {
                break;
            }
            match Pin::new(&mut self.inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(more) => merged
                        .get_or_insert_with(|| BytesMut::from(&data[..]))
                        .extend_from_slice(&more),
                    Err(trailers) => {
                        self.held = Some(Ok(trailers));
                        break;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    self.held = Some(Err(e));
                    break;
                }
                Poll::Ready(None) => {
                    self.done = true;
                    break;
                }
                Poll::Pending => break,
            }
        }
        let out = merged.map_or(data, BytesMut::freeze);
        Poll::Ready(Some(Ok(Frame::data(out))))
    }

    fn is_end_stream(&self) -> bool {
        self.held.is_none() && (self.done || self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.held.is_some() || self.done {
            return SizeHint::default();
        }
        self.inner.size_hint()
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

pub fn full(s: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(s.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

pub fn text_response(status: http::StatusCode, s: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(full(s));
    *r.status_mut() = status;
    r
}

/// Awaits `fut`, for at most `limit` when there is one; None when it ran
/// out. The future is pinned by the caller, so that it is laid out once in
/// the caller's state whether or not a limit applies.
pub async fn within<F: std::future::Future>(
    limit: Option<std::time::Duration>,
    fut: Pin<&mut F>,
) -> Option<F::Output> {
    match limit {
        Some(t) => tokio::time::timeout(t, fut).await.ok(),
        None => Some(fut.await),
    }
}

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that are hop-by-hop whatever `connection` says.
fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TE
        || *name == header::UPGRADE
        || *name == header::TRANSFER_ENCODING
        || *name == header::PROXY_AUTHORIZATION
        || *name == KEEP_ALIVE
        || *name == PROXY_CONNECTION
}

/// Removes the headers that belong to one connection, not to the request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most requests carry none: one pass over the names, no lookups.
    if !headers.keys().any(is_hop_by_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(conn) = conn.to_str() {
            for name in conn.split(',').map(str::trim) {
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                headers.remove(name);
            }
        }
    }
    for h in [
        KEEP_ALIVE,
        PROXY_CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(h);
    }
    if !keep_upgrade {
        headers.remove(header::CONNECTION);
        headers.remove(header::UPGRADE);
    }
    // `te: trailers` is how gRPC asks for trailers; any other value is hop-by-hop.
    if headers.get(header::TE).is_some_and(|v| v != "trailers") {
        headers.remove(header::TE);
    }
}

pub fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() <= http::Version::HTTP_11 && req.headers().contains_key(header::UPGRADE)
}

/// `http://authority/path?query`.
pub fn absolute_uri(authority: &str, uri: &Uri) -> Result<Uri, ProxyError> {
    let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(pq)
        .build()
        .map_err(|e| ProxyError::bad_request(format!("bad request target {authority}{pq}: {e}")))
}

/// Forwards an HTTP/1 upgrade (WebSocket and friends) to `addr` on a
/// dedicated connection, then splices the two upgraded streams.
pub async fn forward_upgrade<S>(
    mut req: Request<Incoming>,
    tcp: S,
    idle: std::time::Duration,
) -> Result<Response<Body>, ProxyError>
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let downstream = hyper::upgrade::on(&mut req);
    let (mut tx, conn) = hyper::client::conn::http1::handshake::<_, Body>(TokioIo::new(tcp))
        .await
        .map_err(ProxyError::upstream)?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, true);
    parts.version = http::Version::HTTP_11;
    if let Some(pq) = parts.uri.path_and_query().cloned() {
        parts.uri = Uri::from(pq);
    }
    let mut resp = tx
        .send_request(Request::from_parts(parts, boxed(body)))
        .await
        .map_err(ProxyError::upstream)?;
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            match tokio::try_join!(downstream, upstream) {
                Ok((down, up)) => {
                    let mut down = TokioIo::new(down);
                    let mut up = TokioIo::new(up);
                    crate::splice::splice(&mut down, &mut up, idle).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(boxed))
}

/// Resolves once shutdown is signalled; never if the sender is gone
/// without signalling.
pub async fn signalled(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        if *rx.borrow_and_update() {
            return;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    HeaderName::from_static(k),
                    http::HeaderValue::from_static(v),
                )
            })
            .collect()
    }

    #[test]
    fn hop_by_hop_headers_are_stripped_and_the_rest_kept() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-conn-only"),
            ("x-conn-only", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic eA=="),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("accept", "*/*"),
            ("x-app", "kept"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut left: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["accept", "x-app"]);
    }

    #[test]
    fn te_trailers_and_an_upgrade_that_is_asked_for_are_kept() {
        let mut h = headers(&[
            ("te", "trailers"),
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::TE).unwrap(), "trailers");
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }

    #[test]
    fn a_request_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut h = headers(&[("accept", "*/*"), ("user-agent", "oha"), ("x-b3", "1")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h, before);
    }

    #[tokio::test]
    async fn within_ends_a_future_at_its_limit_and_not_without_one() {
        let slow = std::pin::pin!(tokio::time::sleep(std::time::Duration::from_secs(60)));
        let limit = Some(std::time::Duration::from_millis(10));
        assert_eq!(within(limit, slow).await, None);
        let quick = std::pin::pin!(async { 7 });
        assert_eq!(within(None, quick).await, Some(7));
    }
}
