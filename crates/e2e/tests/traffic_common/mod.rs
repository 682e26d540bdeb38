//! Helpers shared by the traffic_* tests: an app whose behaviour a test
//! switches at run time, a keep-alive client that panics on errors, and
//! concurrent load with latency figures.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::watch;
use trellis_e2e::{Answer, ProxyClient, TestMesh};

/// What an [`App`] does; tests flip these while it runs.
#[derive(Default)]
pub struct Behaviour {
    /// While true, requests (but `/healthz`) wait before answering: a test
    /// holds them to fill a limit, then lets them go with [`App::release`].
    pub hold: watch::Sender<bool>,
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

    /// Requests being answered (or held) now.
    pub fn in_flight(&self) -> u64 {
        self.behaviour.in_flight.load(Ordering::SeqCst)
    }

    /// Holds every request from now on until [`release`](Self::release).
    pub fn hold(&self) {
        self.behaviour.hold.send_replace(true);
    }

    /// Answers the held requests, and holds no more.
    pub fn release(&self) {
        self.behaviour.hold.send_replace(false);
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
    let _ = b.hold.subscribe().wait_for(|held| !held).await;
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

/// The TrafficPolicy `catalog` for the Service `catalog`, with `spec`
/// (lines indented by two) besides its targetRef.
pub fn policy(spec: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: catalog}}\n\
         spec:\n  targetRef: {{kind: Service, name: catalog}}\n{}\n",
        spec.trim_matches('\n')
    )
}

/// The usual stage of a traffic test: the Service `catalog` with
/// `resources` applied (none when empty), `n` replicas `catalog-0`... and an app-less caller
/// `frontend`, once the control plane lists every replica. Keep all three
/// for the whole test: dropping the mesh stops the control plane, and
/// dropping a replica or the caller stops its sidecar.
pub async fn catalog_with(
    resources: &str,
    n: usize,
) -> (TestMesh, Vec<Replica>, trellis_proxy::Proxy) {
    let mesh = TestMesh::start().await;
    mesh.apply(&trellis_e2e::yaml::service("catalog"))
        .await
        .expect("apply the Service");
    if !resources.trim().is_empty() {
        mesh.apply(resources).await.expect("apply the resources");
    }
    let mut replicas = Vec::new();
    for i in 0..n {
        replicas.push(replica(&mesh, "catalog", &format!("catalog-{i}"), &[]).await);
    }
    let frontend = caller(&mesh, "frontend", &[]).await;
    mesh.wait_endpoints("catalog", n).await;
    (mesh, replicas, frontend)
}

/// A counter of the caller's proxy about the Service `catalog`.
pub async fn catalog_counter(caller: &trellis_proxy::Proxy, name: &str) -> f64 {
    trellis_e2e::metric_sum(
        caller.admin_addr,
        name,
        &[("destination_service", "catalog")],
    )
    .await
}

/// A caller: an app-less sidecar (its app port is never called).
pub async fn caller(mesh: &TestMesh, name: &str, labels: &[(&str, &str)]) -> trellis_proxy::Proxy {
    let mut all = vec![("app", name)];
    all.extend_from_slice(labels);
    mesh.sidecar(name, &all, 9).await
}

/// A keep-alive client of an explicit proxy whose `get` panics on a
/// connection or protocol error (a status is not an error); the rest is
/// [`ProxyClient`]'s.
pub struct Client(ProxyClient);

impl Client {
    pub fn new(proxy: SocketAddr) -> Self {
        Client(ProxyClient::new(proxy))
    }

    pub async fn get(&mut self, url: &str) -> Answer {
        self.0.send(Method::GET, url, &[], Bytes::new()).await
    }
}

impl std::ops::Deref for Client {
    type Target = ProxyClient;
    fn deref(&self) -> &ProxyClient {
        &self.0
    }
}

impl std::ops::DerefMut for Client {
    fn deref_mut(&mut self) -> &mut ProxyClient {
        &mut self.0
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
