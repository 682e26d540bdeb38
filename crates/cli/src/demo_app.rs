//! `trellis demo-app`: the small HTTP service of the demo, tests and
//! benchmarks. It answers every request with JSON that says who answered
//! (service, version, instance), what it saw (path, headers) and what its
//! own downstream calls returned, so a test can see routing, header
//! handling and call chains through the mesh from one response.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HOST};
use http::{HeaderMap, HeaderName, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rand::Rng;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::cli::DemoAppArgs;
use crate::duration::parse_duration;
use crate::http::HttpClient;

/// Trace headers the app copies from a request onto its downstream calls,
/// as an instrumented app would, so that traces join up across hops.
const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    "baggage",
    "x-request-id",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// The delay before answering.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniform between the two bounds.
    Range(Duration, Duration),
}

impl Latency {
    /// `50ms`, or `10ms-50ms`.
    pub fn parse(s: &str) -> Result<Latency, String> {
        match s.split_once('-') {
            None => parse_duration(s).map(Latency::Fixed),
            Some((lo, hi)) => {
                let (lo, hi) = (parse_duration(lo)?, parse_duration(hi)?);
                if lo > hi {
                    return Err(format!("{s:?}: the lower bound is above the upper one"));
                }
                Ok(Latency::Range(lo, hi))
            }
        }
    }

    fn sample(self) -> Duration {
        match self {
            Latency::Fixed(d) => d,
            Latency::Range(lo, hi) if lo == hi => lo,
            Latency::Range(lo, hi) => rand::rng().random_range(lo..=hi),
        }
    }
}

/// What the demo app does; see `trellis demo-app --help`.
#[derive(Clone, Debug)]
pub struct DemoAppConfig {
    pub service: String,
    pub version: String,
    pub instance: String,
    pub calls: Vec<String>,
    pub latency: Option<Latency>,
    pub error_rate: f64,
    pub error_code: StatusCode,
    /// Request headers copied onto downstream calls, besides trace headers.
    pub propagate: Vec<HeaderName>,
    pub call_timeout: Duration,
    /// `HTTP_PROXY` for the downstream calls (empty: none).
    pub http_proxy: String,
    pub no_proxy: String,
}

impl DemoAppConfig {
    /// A config that answers as `service` and makes no calls.
    pub fn new(service: impl Into<String>) -> Self {
        DemoAppConfig {
            service: service.into(),
            version: String::new(),
            instance: default_instance(),
            calls: Vec::new(),
            latency: None,
            error_rate: 0.0,
            error_code: StatusCode::SERVICE_UNAVAILABLE,
            propagate: Vec::new(),
            call_timeout: Duration::from_secs(5),
            http_proxy: String::new(),
            no_proxy: String::new(),
        }
    }

    /// From the command line and the process environment (proxy variables).
    pub fn from_args(args: &DemoAppArgs) -> anyhow::Result<Self> {
        let env = |lower: &str, upper: &str| {
            std::env::var(lower)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| std::env::var(upper).ok())
                .unwrap_or_default()
        };
        for url in &args.calls {
            let uri: http::Uri = url
                .parse()
                .map_err(|e| anyhow::anyhow!("--call {url:?}: {e}"))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                anyhow::bail!(
                    "--call {url:?}: expected an http:// URL, e.g. http://catalog:8080/items"
                );
            }
        }
        let propagate = args
            .propagate
            .iter()
            .map(|h| {
                HeaderName::try_from(h.as_str())
                    .map_err(|_| anyhow::anyhow!("--propagate {h:?}: not a header name"))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(DemoAppConfig {
            service: args.name.clone().unwrap_or_else(|| "demo-app".to_string()),
            version: args.version.clone().unwrap_or_default(),
            instance: args.instance.clone().unwrap_or_else(default_instance),
            calls: args.calls.clone(),
            latency: args.latency,
            error_rate: args.error_rate,
            error_code: StatusCode::from_u16(args.error_code).map_err(|_| {
                anyhow::anyhow!("--error-code {}: not an HTTP status", args.error_code)
            })?,
            propagate,
            call_timeout: args.call_timeout,
            http_proxy: env("http_proxy", "HTTP_PROXY"),
            no_proxy: env("no_proxy", "NO_PROXY"),
        })
    }
}

/// `HOSTNAME-PID`, unique enough on one machine and readable in answers.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}-{}", std::process::id())
}

/// The answer to every request but `/echo` and `/healthz`.
#[derive(Debug, Serialize)]
struct Answer<'a> {
    service: &'a str,
    version: &'a str,
    instance: &'a str,
    path: &'a str,
    headers: BTreeMap<String, String>,
    calls: Vec<Call>,
}

#[derive(Debug, Serialize)]
struct Call {
    url: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    body: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

struct State {
    cfg: DemoAppConfig,
    client: HttpClient,
}

/// Serves HTTP/1.1 and HTTP/2 (prior knowledge) on `listener` until the
/// task is dropped.
pub async fn serve(listener: TcpListener, cfg: DemoAppConfig) -> anyhow::Result<()> {
    serve_until(listener, cfg, std::future::pending()).await
}

/// How long requests in flight at shutdown may take to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves until `shutdown`; then stops accepting, lets the requests in
/// flight finish (for at most `DRAIN`) and closes idle connections, as a
/// well-behaved app does on SIGTERM (a rolling restart then loses nothing).
pub async fn serve_until(
    listener: TcpListener,
    cfg: DemoAppConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    let client = HttpClient::with_proxy(&cfg.http_proxy, &cfg.no_proxy)?;
    let state = Arc::new(State { cfg, client });
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = &mut shutdown => break,
        };
        let (stream, _) = match accepted {
            Ok(conn) => conn,
            // Out of file descriptors and the like: back off, keep serving.
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
            let state = state.clone();
            async move {
                let head = req.method() == http::Method::HEAD;
                let mut resp = handle(&state, req).await;
                // A HEAD answer has no content (RFC 9110 §9.3.2); over
                // HTTP/2 its stream must end with the headers.
                if head {
                    *resp.body_mut() = Full::new(Bytes::new());
                }
                Ok::<_, Infallible>(resp)
            }
        });
        let conn = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), svc)
                .into_owned(),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("requests still in flight after {DRAIN:?}; stopping anyway");
    }
    Ok(())
}

async fn handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let cfg = &state.cfg;
    match req.uri().path() {
        "/healthz" => return text(StatusCode::OK, "ok\n"),
        "/echo" => {
            let content_type = req.headers().get(CONTENT_TYPE).cloned();
            return match req.into_body().collect().await {
                Ok(body) => {
                    let mut resp = Response::new(Full::new(body.to_bytes()));
                    if let Some(ct) = content_type {
                        resp.headers_mut().insert(CONTENT_TYPE, ct);
                    }
                    resp
                }
                Err(e) => text(StatusCode::BAD_REQUEST, &format!("reading the body: {e}\n")),
            };
        }
        _ => {}
    }

    if let Some(latency) = cfg.latency {
        tokio::time::sleep(latency.sample()).await;
    }
    let failed = cfg.error_rate > 0.0 && rand::rng().random_bool(cfg.error_rate);
    let calls = if failed {
        Vec::new()
    } else {
        let forwarded = forwarded_headers(req.headers(), &cfg.propagate);
        futures::future::join_all(cfg.calls.iter().map(|url| call(state, url, &forwarded))).await
    };

    let mut headers = BTreeMap::new();
    for (name, value) in req.headers() {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        headers
            .entry(name.as_str().to_string())
            .and_modify(|v: &mut String| {
                v.push_str(", ");
                v.push_str(&value);
            })
            .or_insert(value);
    }
    // HTTP/2 carries the host in the URI, not a header; show it the same
    // way for both so tests need not care which protocol was used.
    if let Some(authority) = req.uri().authority() {
        headers
            .entry(HOST.as_str().to_string())
            .or_insert_with(|| authority.to_string());
    }

    let answer = Answer {
        service: &cfg.service,
        version: &cfg.version,
        instance: &cfg.instance,
        path: req.uri().path(),
        headers,
        calls,
    };
    let status = if failed {
        cfg.error_code
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_vec_pretty(&answer).unwrap_or_default();
    body.push(b'\n');
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_else(|_| text(StatusCode::INTERNAL_SERVER_ERROR, "building the answer\n"))
}

fn forwarded_headers(incoming: &HeaderMap, extra: &[HeaderName]) -> HeaderMap {
    let mut out = HeaderMap::new();
    let names = TRACE_HEADERS
        .iter()
        .map(|n| HeaderName::from_static(n))
        .chain(extra.iter().cloned());
    for name in names {
        for value in incoming.get_all(&name) {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

async fn call(state: &State, url: &str, headers: &HeaderMap) -> Call {
    let mut req = Request::get(url);
    if let Some(h) = req.headers_mut() {
        h.extend(headers.clone());
    }
    let result = match req.body(Full::new(Bytes::new())) {
        Ok(req) => state
            .client
            .send(req, state.cfg.call_timeout)
            .await
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    match result {
        Ok(resp) => {
            let body = serde_json::from_slice(resp.body()).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(resp.body()).into_owned())
            });
            Call {
                url: url.to_string(),
                status: Some(resp.status().as_u16()),
                body: Some(body),
                error: None,
            }
        }
        Err(error) => {
            tracing::debug!(url, %error, "call failed");
            Call {
                url: url.to_string(),
                status: None,
                body: None,
                error: Some(error),
            }
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// `trellis demo-app`.
pub async fn run(args: &DemoAppArgs) -> anyhow::Result<()> {
    let cfg = DemoAppConfig::from_args(args)?;
    let addr = args
        .listen
        .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], args.port)));
    let listener = TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!("listening on {addr}: {e}: is the port taken? pick another with --port")
    })?;
    let addr = listener.local_addr()?;
    tracing::info!(
        %addr,
        service = %cfg.service,
        version = %cfg.version,
        instance = %cfg.instance,
        calls = ?cfg.calls,
        proxy = %cfg.http_proxy,
        "demo app serving"
    );
    serve_until(listener, cfg, crate::signals::shutdown()).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_testkit::{http_get, http_request};

    async fn start(cfg: DemoAppConfig) -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, cfg));
        addr
    }

    fn json(body: &[u8]) -> serde_json::Value {
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn parses_latency() {
        assert_eq!(
            Latency::parse("50ms"),
            Ok(Latency::Fixed(Duration::from_millis(50)))
        );
        assert_eq!(
            Latency::parse("10ms-50ms"),
            Ok(Latency::Range(
                Duration::from_millis(10),
                Duration::from_millis(50)
            ))
        );
        assert!(Latency::parse("50ms-10ms").is_err());
        assert!(Latency::parse("soon").is_err());
        let d = Latency::parse("10ms-20ms").unwrap().sample();
        assert!(d >= Duration::from_millis(10) && d <= Duration::from_millis(20));
    }

    #[tokio::test]
    async fn answers_with_the_documented_shape() {
        let mut cfg = DemoAppConfig::new("catalog");
        cfg.version = "v2".into();
        cfg.instance = "catalog-v2-0".into();
        let addr = start(cfg).await;
        let resp = http_request(
            http::Method::GET,
            &format!("http://{addr}/items?x=1"),
            &[("x-user", "ann")],
            Bytes::new(),
            None,
        )
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let v = json(resp.body());
        let keys: Vec<_> = v.as_object().unwrap().keys().cloned().collect();
        assert_eq!(keys.len(), 6, "{v}");
        assert_eq!(v["service"], "catalog");
        assert_eq!(v["version"], "v2");
        assert_eq!(v["instance"], "catalog-v2-0");
        assert_eq!(v["path"], "/items");
        assert_eq!(v["headers"]["x-user"], "ann");
        assert_eq!(v["headers"]["host"], addr.to_string());
        assert_eq!(v["calls"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn calls_downstream_and_reports_answers_and_errors() {
        let reviews = start(DemoAppConfig::new("reviews")).await;
        let dead = trellis_testkit::free_addr();
        let mut cfg = DemoAppConfig::new("catalog");
        cfg.calls = vec![format!("http://{reviews}/r"), format!("http://{dead}/")];
        cfg.call_timeout = Duration::from_secs(2);
        let catalog = start(cfg).await;

        let resp = http_request(
            http::Method::GET,
            &format!("http://{catalog}/"),
            &[(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )],
            Bytes::new(),
            None,
        )
        .await
        .unwrap();
        let v = json(resp.body());
        let calls = v["calls"].as_array().unwrap();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["url"], format!("http://{reviews}/r"));
        assert_eq!(calls[0]["status"], 200);
        assert_eq!(calls[0]["body"]["service"], "reviews");
        assert_eq!(calls[0]["body"]["path"], "/r");
        assert!(
            calls[0]["body"]["headers"]["traceparent"].is_string(),
            "trace headers are copied onto calls"
        );
        assert!(calls[1]["error"].is_string());
        assert!(calls[1].get("status").is_none());
    }

    #[tokio::test]
    async fn calls_go_through_http_proxy_in_absolute_form() {
        // A stand-in proxy: another demo app, which reports the target it
        // received; hyper's server exposes an absolute-form target as the URI.
        let proxy = start(DemoAppConfig::new("proxy")).await;
        let mut cfg = DemoAppConfig::new("frontend");
        cfg.calls = vec!["http://catalog:8080/items".into()];
        cfg.http_proxy = format!("http://{proxy}");
        let frontend = start(cfg).await;
        let (_, body) = http_get(&format!("http://{frontend}/"), None).await;
        let v = json(&body);
        let call = &v["calls"][0];
        assert_eq!(call["status"], 200, "{v}");
        assert_eq!(call["body"]["service"], "proxy");
        assert_eq!(call["body"]["path"], "/items");
        assert_eq!(call["body"]["headers"]["host"], "catalog:8080");
    }

    #[tokio::test]
    async fn errors_latency_echo_and_health() {
        let mut cfg = DemoAppConfig::new("flaky");
        cfg.error_rate = 1.0;
        cfg.error_code = StatusCode::BAD_GATEWAY;
        cfg.latency = Some(Latency::Fixed(Duration::from_millis(30)));
        let addr = start(cfg).await;

        let started = std::time::Instant::now();
        let (status, body) = http_get(&format!("http://{addr}/"), None).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert_eq!(json(&body)["service"], "flaky");
        assert!(started.elapsed() >= Duration::from_millis(30));

        let (status, body) = http_get(&format!("http://{addr}/healthz"), None).await;
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));

        let resp = http_request(
            http::Method::POST,
            &format!("http://{addr}/echo"),
            &[("content-type", "text/plain")],
            Bytes::from_static(b"hello"),
            None,
        )
        .await
        .unwrap();
        assert_eq!(resp.body(), "hello");
        assert_eq!(resp.headers()[CONTENT_TYPE], "text/plain");
    }

    #[tokio::test]
    async fn speaks_h2c() {
        let addr = start(DemoAppConfig::new("h2")).await;
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = Request::get(format!("http://{addr}/h2"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v = json(&body);
        assert_eq!(v["path"], "/h2");
        assert_eq!(v["headers"]["host"], addr.to_string());
    }
}
