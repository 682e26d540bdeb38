//! HTTP plumbing shared by both directions: body boxing, hop-by-hop
//! headers, the internal headers between proxies, upgrades, and serving a
//! connection with HTTP/1 and HTTP/2.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
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

pub fn boxed(b: Incoming) -> Body {
    b.map_err(BoxError::from).boxed_unsync()
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

/// Removes the headers that belong to one connection, not to the request.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
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
        "keep-alive",
        "proxy-connection",
        "proxy-authorization",
        "transfer-encoding",
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
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
                Err(e) => tracing::debug!(error = %e, "upgrade failed"),
            }
        });
    }
    Ok(resp.map(boxed))
}

/// Serves one connection with HTTP/1 and HTTP/2 (detected), with upgrades.
/// On shutdown the connection drains: HTTP/2 gets a GOAWAY, HTTP/1 closes
/// after the request in flight.
pub async fn serve_connection<I, F, Fut>(
    io: I,
    shutdown: tokio::sync::watch::Receiver<bool>,
    handler: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve(io, shutdown, handler, false).await
}

/// As `serve_connection`, for a peer proxy that proved its identity with
/// mutual TLS. Such a connection lives long and carries every request
/// between two proxies, so the `h2` crate's lifetime cap on streams it had
/// to reset for a protocol error (1,024, a defence against peers that
/// provoke resets) is lifted: an app that answers before reading a whole
/// request body makes the stream end early, the caller's last body frame
/// then arrives for a stream already forgotten, and at that cap the shared
/// connection, with every call on it, would be torn down with
/// ENHANCE_YOUR_CALM. Plaintext connections keep the cap.
pub async fn serve_peer_connection<I, F, Fut>(
    io: I,
    shutdown: tokio::sync::watch::Receiver<bool>,
    handler: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    serve(io, shutdown, handler, true).await
}

async fn serve<I, F, Fut>(
    io: I,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    handler: F,
    authenticated_peer: bool,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + Clone + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let handler = handler.clone();
        async move { Ok::<_, Infallible>(handler(req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .preserve_header_case(false)
        .half_close(false);
    builder.http2().adaptive_window(true);
    if authenticated_peer {
        builder.http2().max_local_error_reset_streams(None);
    }
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = signalled(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "connection ended with an error");
    }
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
