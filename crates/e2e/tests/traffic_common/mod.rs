//! Helpers shared by the traffic_* tests: an app whose behaviour a test
//! switches at run time, a keep-alive client that returns headers, and
//! concurrent load with latency figures.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use trellis_e2e::TestMesh;
use trellis_testkit::eventually;

/// What an [`App`] does; tests flip these while it runs.
#[derive(Default)]
pub struct Behaviour {
    /// Answer every request (but `/healthz`) with this status (0: 200).
    pub fail_with: AtomicU16,
    /// Answer `/healthz` with 503.
    pub unhealthy: AtomicBool,
    /// Delay before answering, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests received, `/healthz` excluded.
    pub hits: AtomicU64,
    pub health_hits: AtomicU64,
    /// Requests being answered now, and the most there ever were.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    /// Path, method, headers and body of the last requests (up to 1000).
    pub seen: Mutex<Vec<Seen>>,
}

#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A test app on 127.0.0.1 answering JSON `{"instance", "path"}`.
pub struct App {
    pub instance: String,
    pub port: u16,
    pub behaviour: Arc<Behaviour>,
}

impl App {
    pub async fn start(instance: &str) -> App {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let behaviour = Arc::new(Behaviour::default());
        let (b, name) = (behaviour.clone(), instance.to_string());
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (b, name) = (b.clone(), name.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (b, name) = (b.clone(), name.clone());
                        async move { Ok::<_, Infallible>(answer(&b, &name, req).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        App {
            instance: instance.to_string(),
            port,
            behaviour,
        }
    }

    pub fn hits(&self) -> u64 {
        self.behaviour.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.behaviour.seen.lock().unwrap().clone()
    }
}

async fn answer(b: &Behaviour, name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if path == "/healthz" {
        b.health_hits.fetch_add(1, Ordering::SeqCst);
        let status = if b.unhealthy.load(Ordering::SeqCst) {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        let mut r = Response::new(Full::new(Bytes::from_static(b"ok")));
        *r.status_mut() = status;
        return r;
    }
    b.hits.fetch_add(1, Ordering::SeqCst);
    let now = b.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    b.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let r = respond(b, name, path, req).await;
    b.in_flight.fetch_sub(1, Ordering::SeqCst);
    r
}

async fn respond(
    b: &Behaviour,
    name: &str,
    path: String,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    {
        let mut seen = b.seen.lock().unwrap();
        if seen.len() < 1000 {
            seen.push(Seen {
                method: parts.method.clone(),
                path_and_query: parts
                    .uri
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default(),
                headers: parts.headers.clone(),
                body,
            });
        }
    }
    let delay = b.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let fail = b.fail_with.load(Ordering::SeqCst);
    let json = serde_json::json!({"instance": name, "path": path}).to_string();
    let mut r = Response::new(Full::new(Bytes::from(json)));
    if fail != 0 {
        *r.status_mut() = StatusCode::from_u16(fail).unwrap();
    }
    r
}

/// An app with a sidecar whose labels are `app=<app>` plus `extra`.
pub struct Replica {
    pub app: App,
    pub proxy: trellis_proxy::Proxy,
}

pub async fn replica(
    mesh: &TestMesh,
    app: &str,
    instance: &str,
    extra: &[(&str, &str)],
) -> Replica {
    let a = App::start(instance).await;
    let mut labels = vec![("app", app)];
    labels.extend_from_slice(extra);
    let proxy = mesh.sidecar(instance, &labels, a.port).await;
    Replica { app: a, proxy }
}

/// A caller: an app-less sidecar (its app port is never called).
pub async fn caller(mesh: &TestMesh, name: &str, labels: &[(&str, &str)]) -> trellis_proxy::Proxy {
    let mut all = vec![("app", name)];
    all.extend_from_slice(labels);
    mesh.sidecar(name, &all, 9).await
}

/// Waits until the control plane lists `n` endpoints for `service`.
pub async fn wait_endpoints(mesh: &TestMesh, service: &str, n: usize) {
    eventually(
        &format!("{service} has {n} endpoints"),
        Duration::from_secs(10),
        || async {
            let services = mesh.get_json("/api/v1/services").await;
            let count = services
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == service))
                .and_then(|s| s["endpoints"].as_array().map(|e| e.len()))
                .unwrap_or(0);
            (count == n)
                .then_some(())
                .ok_or(format!("{count} endpoints"))
        },
    )
    .await;
}

/// Waits until the proxy with this admin address runs a config in which
/// `service` has `n` endpoints (the app must have called it once).
pub async fn wait_proxy_endpoints(admin: SocketAddr, service: &str, n: usize) {
    eventually(
        &format!("the caller's proxy sees {n} endpoints of {service}"),
        Duration::from_secs(10),
        || async {
            let (_, body) =
                trellis_testkit::http_get(&format!("http://{admin}/config"), None).await;
            let cfg: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let count = cfg["services"]
                .as_array()
                .and_then(|a| a.iter().find(|s| s["name"] == service))
                .and_then(|s| s["endpoints"].as_array().map(|e| e.len()))
                .unwrap_or(0);
            (count == n)
                .then_some(())
                .ok_or(format!("{count} endpoints"))
        },
    )
    .await;
}

/// An HTTP/1.1 keep-alive client of an explicit proxy that returns whole
/// responses, headers included.
pub struct Client {
    proxy: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn instance(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["instance"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn flags(&self) -> String {
        self.headers
            .get("x-trellis-flags")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

impl Client {
    pub fn new(proxy: SocketAddr) -> Self {
        Client {
            proxy,
            sender: None,
        }
    }

    pub async fn get(&mut self, url: &str) -> Answer {
        self.send(Method::GET, url, &[], Bytes::new()).await
    }

    pub async fn send(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Answer {
        match self.try_send(method, url, headers, body).await {
            Ok(a) => a,
            Err(e) => panic!("{url} through {}: {e:#}", self.proxy),
        }
    }

    pub async fn try_send(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> anyhow::Result<Answer> {
        let uri: Uri = url.parse()?;
        if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
            let tcp = tokio::net::TcpStream::connect(self.proxy).await?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        sender.ready().await?;
        let mut req = Request::builder().method(method).uri(uri.clone()).header(
            http::header::HOST,
            uri.authority().map(|a| a.as_str()).unwrap_or(""),
        );
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let fut = sender.send_request(req.body(Full::new(body))?);
        let resp = tokio::time::timeout(Duration::from_secs(10), fut).await??;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

/// Results of [`load`]: per request, its status, instance and latency.
pub struct Load {
    pub statuses: Vec<StatusCode>,
    pub instances: Vec<String>,
    pub latencies: Vec<Duration>,
    pub elapsed: Duration,
}

impl Load {
    pub fn ok_share(&self) -> f64 {
        self.statuses.iter().filter(|s| s.is_success()).count() as f64 / self.statuses.len() as f64
    }

    pub fn count(&self, status: StatusCode) -> usize {
        self.statuses.iter().filter(|s| **s == status).count()
    }

    /// The latency at quantile `q` (0 to 1).
    pub fn quantile(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() as f64 * q).ceil() as usize).clamp(1, l.len()) - 1]
    }

    pub fn share_of(&self, instance: &str) -> f64 {
        self.instances.iter().filter(|i| *i == instance).count() as f64
            / self.instances.len() as f64
    }
}

/// Sends `total` GETs of `url` through `proxy` from `workers` keep-alive
/// connections at once.
pub async fn load(proxy: SocketAddr, url: &str, total: usize, workers: usize) -> Load {
    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, url) = (next.clone(), url.to_string());
        tasks.push(tokio::spawn(async move {
            let mut client = Client::new(proxy);
            let mut out = Vec::new();
            while next.fetch_add(1, Ordering::SeqCst) < total as u64 {
                let t = Instant::now();
                let a = client.get(&url).await;
                out.push((a.status, a.instance(), t.elapsed()));
            }
            out
        }));
    }
    let mut l = Load {
        statuses: vec![],
        instances: vec![],
        latencies: vec![],
        elapsed: Duration::ZERO,
    };
    for t in tasks {
        for (s, i, d) in t.await.unwrap() {
            l.statuses.push(s);
            l.instances.push(i);
            l.latencies.push(d);
        }
    }
    l.elapsed = started.elapsed();
    l
}
