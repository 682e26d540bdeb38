//! Helpers for Trellis tests: waiting for a condition instead of sleeping,
//! free ports, a tiny HTTP/1.1 client that can go through an explicit HTTP
//! proxy (as an app behind a sidecar does), reading Prometheus text
//! ([`prometheus`]) and processes ([`process`]), and common resource YAML
//! ([`yaml`]).
#![forbid(unsafe_code)]

pub mod process;
pub mod prometheus;
pub mod yaml;

use std::fmt::Debug;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;

/// How long `assert_eventually!` waits when not told otherwise. Generous,
/// because CI machines are small and shared.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// How often `eventually` and `assert_eventually!` poll.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// What one try of [`eventually`] gave: a value, or why there is none yet.
pub trait Outcome {
    type Value;
    fn into_result(self) -> Result<Self::Value, String>;
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.ok_or_else(|| "None".to_string())
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    type Value = T;
    fn into_result(self) -> Result<T, String> {
        self.map_err(|e| format!("{e:?}"))
    }
}

/// Calls `f` every 20ms until it gives `Some`/`Ok`, and returns that value.
/// Panics after `timeout`, naming `what` and the last error.
pub async fn eventually<F, Fut, T>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future,
    Fut::Output: Outcome<Value = T>,
{
    let deadline = Instant::now() + timeout;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match f().await.into_result() {
            Ok(v) => return v,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!(
                        "{what}: not true after {timeout:?} ({tries} tries); last error: {last}"
                    );
                }
            }
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for tests without a runtime: calls `f` every 20ms until it
/// gives `Some`/`Ok`, and panics after `timeout`.
pub fn eventually_blocking<T, O: Outcome<Value = T>>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> O,
) -> T {
    let deadline = Instant::now() + timeout;
    let mut tries = 0u32;
    loop {
        tries += 1;
        match f().into_result() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not true after {timeout:?} ({tries} tries); last error: {last}")
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

/// Asserts that a boolean expression becomes true, re-evaluating it every
/// 20ms. The expression may use `.await`. Forms:
///
/// ```ignore
/// assert_eventually!(counter.load(SeqCst) == 3);
/// assert_eventually!(ready(&addr).await, "proxy at {addr} never became ready");
/// assert_eventually!(timeout = Duration::from_secs(30), ready(&addr).await);
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (timeout = $timeout:expr, $cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $timeout, $cond, "{}", stringify!($cond))
    };
    (timeout = $timeout:expr, $cond:expr, $($arg:tt)+) => {{
        let timeout: ::std::time::Duration = $timeout;
        let deadline = ::std::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if ::std::time::Instant::now() >= deadline {
                panic!("not true after {:?}: {}", timeout, format!($($arg)+));
            }
            ::tokio::time::sleep($crate::POLL_INTERVAL).await;
        }
    }};
    ($cond:expr $(,)?) => {
        $crate::assert_eventually!(timeout = $crate::DEFAULT_TIMEOUT, $cond)
    };
    ($cond:expr, $($arg:tt)+) => {
        $crate::assert_eventually!(timeout = $crate::DEFAULT_TIMEOUT, $cond, $($arg)+)
    };
}

/// A port on 127.0.0.1 that was free a moment ago. Another process may take
/// it before the caller binds it; binding port 0 directly is better where
/// the code under test allows it.
pub fn free_port() -> u16 {
    free_addr().port()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
}

/// GETs `url` over HTTP/1.1, through `proxy` when given (the request is then
/// sent in absolute form to the proxy, as an app with `HTTP_PROXY` does).
/// Panics on a connection or protocol error; see [`try_http_get`].
pub async fn http_get(url: &str, proxy: Option<SocketAddr>) -> (StatusCode, Bytes) {
    match try_http_get(url, proxy).await {
        Ok(r) => r,
        Err(e) => panic!("GET {url} (proxy {proxy:?}): {e:#}"),
    }
}

/// [`http_get`] that returns errors, for use inside [`eventually`].
pub async fn try_http_get(
    url: &str,
    proxy: Option<SocketAddr>,
) -> anyhow::Result<(StatusCode, Bytes)> {
    let resp = http_request(Method::GET, url, &[], Bytes::new(), proxy).await?;
    Ok((resp.status(), resp.into_body()))
}

/// One HTTP/1.1 request on a fresh connection, with a 10s limit. Headers are
/// `(name, value)` pairs; `Host` is set from the URL unless given.
pub async fn http_request(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: Bytes,
    proxy: Option<SocketAddr>,
) -> anyhow::Result<http::Response<Bytes>> {
    let uri: Uri = url.parse()?;
    let host = uri
        .host()
        .ok_or_else(|| anyhow::anyhow!("{url}: no host"))?
        .to_string();
    let port = uri.port_u16().unwrap_or(80);
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();

    let fut = async move {
        let stream = match proxy {
            Some(p) => tokio::net::TcpStream::connect(p).await?,
            None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
        };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });

        // A proxy needs the absolute form; a server gets the origin form.
        let target = if proxy.is_some() {
            uri.clone()
        } else {
            uri.path_and_query()
                .map(|p| p.as_str())
                .unwrap_or("/")
                .parse::<Uri>()?
        };
        let mut req = Request::builder().method(method).uri(target);
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host")) {
            req = req.header(http::header::HOST, authority);
        }
        for (n, v) in headers {
            req = req.header(*n, *v);
        }
        let resp = sender.send_request(req.body(Full::new(body))?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok::<_, anyhow::Error>(http::Response::from_parts(parts, body))
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .map_err(|_| anyhow::anyhow!("{url}: no answer within 10s"))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn eventually_returns_first_success() {
        let n = AtomicU32::new(0);
        let v = eventually("counter reaches 3", Duration::from_secs(5), || async {
            let v = n.fetch_add(1, Ordering::SeqCst) + 1;
            if v >= 3 {
                Ok(v)
            } else {
                Err(format!("only {v}"))
            }
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "never: not true after")]
    async fn eventually_panics_with_last_error() {
        eventually("never", Duration::from_millis(50), || async { None::<()> }).await;
    }

    #[test]
    fn eventually_blocking_waits_for_the_condition() {
        let mut n = 0;
        let v = eventually_blocking("n reaches 3", Duration::from_secs(5), || {
            n += 1;
            (n >= 3).then_some(n)
        });
        assert_eq!(v, 3);
        let r = std::panic::catch_unwind(|| {
            eventually_blocking("never", Duration::from_millis(50), || Err::<(), _>("no"))
        });
        let msg = r.unwrap_err().downcast::<String>().unwrap();
        assert!(msg.starts_with("never: not true after"), "{msg}");
        assert!(msg.ends_with("last error: \"no\""), "{msg}");
    }

    #[tokio::test]
    async fn assert_eventually_polls() {
        let n = AtomicU32::new(0);
        assert_eventually!(n.fetch_add(1, Ordering::SeqCst) >= 2);
        assert_eventually!(
            timeout = Duration::from_secs(1),
            async { true }.await,
            "trivially"
        );
    }

    #[tokio::test]
    async fn http_get_talks_to_a_server_directly_and_through_a_proxy() {
        use hyper::service::service_fn;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                        // Echo the request target so the test sees its form.
                        let target = req.uri().to_string();
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from(target),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let (status, body) = http_get(&format!("http://{addr}/a?b=1"), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body, "/a?b=1");
        let (_, body) = http_get("http://catalog:8080/items", Some(addr)).await;
        assert_eq!(body, "http://catalog:8080/items");
    }
}
