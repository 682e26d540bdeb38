//! A small pooled HTTP/1.1 client that can send its requests through an
//! explicit HTTP proxy, as an app behind a Trellis sidecar does: requests
//! then go in absolute form (`GET http://catalog:8080/items`) to the proxy.
//! Used by the demo app's downstream calls, the demo's load generator and
//! the control-plane API client.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    // The cause is in the message, not a `#[source]`: hyper's own messages
    // ("client error (Connect)") say little, and their root cause ("Connection
    // refused") is what a user needs, once.
    #[error("{url}: {}", root_cause(.cause))]
    Request {
        url: String,
        cause: Box<hyper_util::client::legacy::Error>,
    },
    #[error("{url}: reading the answer: {}", root_cause(.cause))]
    Body { url: String, cause: hyper::Error },
    #[error("proxy {0:?}: expected http://HOST:PORT or HOST:PORT")]
    BadProxy(String),
    #[error("{0:?} is not an http:// URL")]
    BadUrl(String),
}

impl HttpError {
    /// Whether the peer could not be reached at all (as opposed to a peer
    /// that answered badly), so callers can say "is it running?".
    /// Why, in the fewest words: the root cause of a failed request.
    pub fn reason(&self) -> String {
        match self {
            HttpError::Request { cause, .. } => root_cause(cause.as_ref()),
            e => e.to_string(),
        }
    }

    pub fn is_connect(&self) -> bool {
        matches!(self, HttpError::Request { cause, .. } if cause.is_connect())
    }
}

/// The innermost cause of an error, which is where the useful words are.
pub fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut e = e;
    while let Some(next) = e.source() {
        e = next;
    }
    e.to_string()
}

/// Where requests go: straight to their host, or through a proxy.
#[derive(Clone)]
pub struct HttpClient {
    direct: Client<HttpConnector, Full<Bytes>>,
    proxied: Option<Proxied>,
}

#[derive(Clone)]
struct Proxied {
    client: Client<ProxyConnector, Full<Bytes>>,
    no_proxy: Vec<String>,
}

impl HttpClient {
    /// A client that never uses a proxy.
    pub fn direct() -> Self {
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        HttpClient {
            direct: Client::builder(TokioExecutor::new()).build(http),
            proxied: None,
        }
    }

    /// A client that sends requests through `proxy` (`http://HOST:PORT` or
    /// `HOST:PORT`), except to hosts that `no_proxy` lists (comma separated,
    /// exact host or domain suffix, `*` for all); an empty `proxy` means none.
    pub fn with_proxy(proxy: &str, no_proxy: &str) -> Result<Self, HttpError> {
        let mut client = Self::direct();
        let proxy = proxy.trim();
        if proxy.is_empty() {
            return Ok(client);
        }
        let authority = proxy
            .strip_prefix("http://")
            .unwrap_or(proxy)
            .trim_end_matches('/');
        let ok = authority
            .parse::<http::uri::Authority>()
            .is_ok_and(|a| a.port_u16().is_some());
        if !ok || authority.contains('/') {
            return Err(HttpError::BadProxy(proxy.to_string()));
        }
        client.proxied = Some(Proxied {
            client: Client::builder(TokioExecutor::new()).build(ProxyConnector {
                authority: authority.to_string(),
            }),
            no_proxy: no_proxy
                .split(',')
                .map(|s| s.trim().trim_start_matches('.').to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
        });
        Ok(client)
    }

    /// A client configured like curl: `http_proxy`, else `HTTP_PROXY`;
    /// `no_proxy`, else `NO_PROXY`.
    pub fn from_env() -> Result<Self, HttpError> {
        let var = |lower: &str, upper: &str| {
            std::env::var(lower)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| std::env::var(upper).ok())
                .unwrap_or_default()
        };
        Self::with_proxy(
            &var("http_proxy", "HTTP_PROXY"),
            &var("no_proxy", "NO_PROXY"),
        )
    }

    fn uses_proxy(&self, uri: &Uri) -> Option<&Client<ProxyConnector, Full<Bytes>>> {
        let p = self.proxied.as_ref()?;
        let host = uri.host()?.to_ascii_lowercase();
        let excluded = p.no_proxy.iter().any(|n| {
            n == "*"
                || host == *n
                || host
                    .strip_suffix(n.as_str())
                    .is_some_and(|h| h.ends_with('.'))
        });
        (!excluded).then_some(&p.client)
    }

    /// Sends `req` and reads the whole answer, within `timeout`.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Response<Bytes>, HttpError> {
        let url = req.uri().to_string();
        let fut = async {
            let resp = match self.uses_proxy(req.uri()) {
                Some(c) => c.request(req).await,
                None => self.direct.request(req).await,
            }
            .map_err(|cause| HttpError::Request {
                url: url.clone(),
                cause: Box::new(cause),
            })?;
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.map_err(|cause| HttpError::Body {
                url: url.clone(),
                cause,
            })?;
            Ok(Response::from_parts(parts, body.to_bytes()))
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| HttpError::Timeout {
                url: url.clone(),
                timeout,
            })?
    }

    pub async fn get(&self, url: &str, timeout: Duration) -> Result<Response<Bytes>, HttpError> {
        let req = Request::get(url)
            .body(Full::new(Bytes::new()))
            .map_err(|_| HttpError::BadUrl(url.to_string()))?;
        self.send(req, timeout).await
    }
}

/// Connects every request to the proxy, and tells hyper-util so (it then
/// keeps the request target in absolute form).
#[derive(Clone)]
struct ProxyConnector {
    authority: String,
}

impl tower::Service<Uri> for ProxyConnector {
    type Response = ProxiedIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<ProxiedIo, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _dst: Uri) -> Self::Future {
        let authority = self.authority.clone();
        Box::pin(async move {
            let stream = TcpStream::connect(authority.as_str()).await?;
            stream.set_nodelay(true)?;
            Ok(ProxiedIo(TokioIo::new(stream)))
        })
    }
}

/// A connection to a proxy.
struct ProxiedIo(TokioIo<TcpStream>);

impl Connection for ProxiedIo {
    fn connected(&self) -> Connected {
        Connected::new().proxy(true)
    }
}

impl hyper::rt::Read for ProxiedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for ProxiedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_settings() {
        assert!(HttpClient::with_proxy("http://127.0.0.1:15001", "").is_ok());
        assert!(HttpClient::with_proxy("127.0.0.1:15001/", "").is_ok());
        assert!(HttpClient::with_proxy("http://127.0.0.1", "").is_err());
        assert!(HttpClient::with_proxy("http://a:1/x", "").is_err());
        let c =
            HttpClient::with_proxy("http://127.0.0.1:15001", "localhost, .example.com").unwrap();
        let uses = |u: &str| c.uses_proxy(&u.parse().unwrap()).is_some();
        assert!(uses("http://catalog:8080/"));
        assert!(!uses("http://localhost:8080/"));
        assert!(!uses("http://api.example.com/"));
        assert!(uses("http://notexample.com/"));
        assert!(HttpClient::direct()
            .uses_proxy(&"http://a/".parse().unwrap())
            .is_none());
    }
}
