//! A whole mesh in one process on loopback, for tests: a control plane in
//! a temporary data dir, demo apps, and a sidecar per app; and the waits
//! that tell when the mesh has converged (endpoints listed, configs acked),
//! so tests wait for facts rather than sleep.
#![forbid(unsafe_code)]

pub mod attack;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use trellis::demo_app::{self, DemoAppConfig};
use trellis_control::{ControlConfig, ControlPlane};
use trellis_proxy::{Proxy, ProxyConfig, Upstream};

pub use trellis_testkit::{assert_eventually, eventually, yaml};

/// How long the mesh may take to converge after a change: generous, since
/// CI machines are small and shared; a wait ends as soon as its fact holds.
pub const CONVERGE: Duration = Duration::from_secs(15);

pub struct TestMesh {
    pub dir: tempfile::TempDir,
    pub control: Option<ControlPlane>,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
}

impl TestMesh {
    pub async fn start() -> TestMesh {
        Self::start_with(|_| {}).await
    }

    /// [`TestMesh::start`] with the control plane's config changed by `f`.
    pub async fn start_with(f: impl FnOnce(&mut ControlConfig)) -> TestMesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ControlConfig::new(dir.path().join("control"));
        cfg.http_addr = ([127, 0, 0, 1], 0).into();
        cfg.grpc_addr = ([127, 0, 0, 1], 0).into();
        f(&mut cfg);
        let control = ControlPlane::start(cfg)
            .await
            .expect("control plane starts");
        TestMesh {
            http_addr: control.http_addr,
            grpc_addr: control.grpc_addr,
            control: Some(control),
            dir,
        }
    }

    /// Stops the control plane (as if it crashed: proxies lose their stream).
    pub async fn stop_control(&mut self) {
        if let Some(c) = self.control.take() {
            c.shutdown().await;
        }
    }

    /// Starts the control plane again on the same data dir and ports.
    pub async fn restart_control(&mut self) {
        let mut cfg = ControlConfig::new(self.dir.path().join("control"));
        cfg.http_addr = self.http_addr;
        cfg.grpc_addr = self.grpc_addr;
        let control = eventually(
            "control plane restarts on its old ports",
            Duration::from_secs(10),
            || ControlPlane::start(cfg.clone()),
        )
        .await;
        self.control = Some(control);
    }

    /// The control plane's admin credential (its `admin-token` file, which
    /// survives restarts): what every API call of the harness sends.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control").join("admin-token"))
            .expect("the control plane writes its admin token on start")
            .trim()
            .to_string()
    }

    /// A new API credential of `role`, without expiry.
    pub async fn api_token(&self, role: trellis_control::auth::Role) -> String {
        let control = self
            .control
            .as_ref()
            .expect("the control plane makes tokens");
        let (token, _) = control
            .auth()
            .create(role, None, "test")
            .await
            .expect("a token is made");
        token
    }

    /// `Authorization: Bearer <admin token>`, for requests tests make.
    pub fn auth_header(&self) -> String {
        format!("Bearer {}", self.admin_token())
    }

    /// POSTs YAML to the apply endpoint; Err holds the error body.
    pub async fn apply(&self, yaml: &str) -> Result<serde_json::Value, String> {
        let auth = self.auth_header();
        let resp = trellis_testkit::http_request(
            Method::POST,
            &format!("http://{}/api/v1/apply", self.http_addr),
            &[
                ("content-type", "application/yaml"),
                ("authorization", &auth),
            ],
            Bytes::from(yaml.to_string()),
            None,
        )
        .await
        .map_err(|e| e.to_string())?;
        let body = String::from_utf8_lossy(resp.body()).to_string();
        if resp.status() != StatusCode::OK {
            return Err(format!("{}: {body}", resp.status()));
        }
        serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let (status, body) = self.get(path).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body).expect("JSON")
    }

    /// GETs an API path with the admin credential.
    pub async fn get(&self, path: &str) -> (StatusCode, Bytes) {
        let auth = self.auth_header();
        let url = format!("http://{}{path}", self.http_addr);
        let resp = trellis_testkit::http_request(
            Method::GET,
            &url,
            &[("authorization", &auth)],
            Bytes::new(),
            None,
        )
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e:#}"));
        (resp.status(), resp.into_body())
    }

    /// How many endpoints the control plane lists for `namespace/service`.
    pub async fn endpoint_count(&self, namespace: &str, service: &str) -> usize {
        let services = self.get_json("/api/v1/services").await;
        services
            .as_array()
            .and_then(|a| {
                a.iter()
                    .find(|s| s["name"] == service && s["namespace"] == namespace)
            })
            .and_then(|s| s["endpoints"].as_array().map(|e| e.len()))
            .unwrap_or(0)
    }

    /// Waits until the control plane lists `n` endpoints of `service` (in
    /// `default`).
    pub async fn wait_endpoints(&self, service: &str, n: usize) {
        self.wait_endpoints_in("default", service, n).await
    }

    /// [`wait_endpoints`](Self::wait_endpoints) in `namespace`.
    pub async fn wait_endpoints_in(&self, namespace: &str, service: &str, n: usize) {
        eventually(
            &format!("{namespace}/{service} has {n} endpoints"),
            CONVERGE,
            || async {
                let count = self.endpoint_count(namespace, service).await;
                (count == n)
                    .then_some(())
                    .ok_or(format!("{count} endpoints"))
            },
        )
        .await
    }

    /// Waits until every proxy the control plane lists has acked the newest
    /// config it was sent, runs it (its admin `/config` shows that
    /// version), and `pred` holds for that config. The control plane's
    /// `GET /api/v1/proxies` gives each proxy's sent and acked versions.
    pub async fn wait_synced(&self, what: &str, pred: impl Fn(&Value) -> bool) {
        eventually(what, CONVERGE, || async {
            let proxies = self.get_json("/api/v1/proxies").await;
            let proxies = proxies.as_array().cloned().unwrap_or_default();
            if proxies.is_empty() {
                return Err("no proxy is connected".to_string());
            }
            for p in &proxies {
                let name = p["instance"].as_str().unwrap_or("?");
                let acked = p["ackedVersion"].as_u64();
                if p["sentVersion"].as_u64() != acked {
                    return Err(format!(
                        "{name} was sent config {} and acked {acked:?} (last error: {})",
                        p["sentVersion"], p["lastError"]
                    ));
                }
                let admin: SocketAddr = p["adminAddr"]
                    .as_str()
                    .and_then(|a| a.parse().ok())
                    .ok_or(format!("{name} has no admin address: {p}"))?;
                let config = admin_config(admin).await?;
                if config["version"].as_u64() != acked {
                    return Err(format!(
                        "{name} runs config {} but acked {acked:?}",
                        config["version"]
                    ));
                }
                if !pred(&config) {
                    return Err(format!("{name} runs config {acked:?}: {config}"));
                }
            }
            Ok(())
        })
        .await
    }

    /// Waits until every proxy runs the Mesh now stored: after an apply
    /// that changed the Mesh, the proxies have taken it.
    pub async fn wait_mesh_synced(&self) {
        let meshes = self.get_json("/api/v1/resources/meshes").await;
        let want = meshes["items"]
            .as_array()
            .and_then(|m| m.first())
            .map(|m| m["spec"].clone())
            .unwrap_or_else(|| serde_json::json!({}));
        self.wait_synced(&format!("every proxy runs the Mesh {want}"), |c| {
            c["mesh"] == want
        })
        .await
    }

    pub fn cache_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join("cache").join(name)
    }

    /// Writes a join token for `namespace`/`service_account` that grants
    /// `labels` to a file (as `trellis token create` would) and returns its
    /// path.
    pub fn token_file(
        &self,
        namespace: &str,
        service_account: &str,
        labels: &BTreeMap<String, String>,
    ) -> PathBuf {
        let labels_part: Vec<String> = labels
            .iter()
            .map(|(k, v)| format!("{k}={v}").replace('/', "_"))
            .collect();
        let path = self.dir.path().join("tokens").join(format!(
            "{namespace}-{service_account}-{}",
            labels_part.join(",")
        ));
        if !path.exists() {
            let control = self
                .control
                .as_ref()
                .expect("the control plane makes tokens");
            let grant = trellis_identity::token::Grant::new(namespace, service_account)
                .with_labels(labels.clone());
            let (token, _) = control
                .identity()
                .create_token(&grant, Duration::from_secs(3600));
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("token dir");
            std::fs::write(&path, token).expect("token file");
        }
        path
    }

    /// A sidecar config for `workload` with labels, on free loopback ports,
    /// with a join token for its service account.
    pub fn proxy_config(
        &self,
        workload: &str,
        labels: &[(&str, &str)],
        app_port: u16,
    ) -> ProxyConfig {
        self.proxy_config_in("default", workload, labels, app_port)
    }

    /// [`proxy_config`] for a workload in `namespace`.
    pub fn proxy_config_in(
        &self,
        namespace: &str,
        workload: &str,
        labels: &[(&str, &str)],
        app_port: u16,
    ) -> ProxyConfig {
        let mut cfg = ProxyConfig::new(self.grpc_addr.to_string(), workload, app_port);
        cfg.namespace = namespace.to_string();
        cfg.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>();
        cfg.token_file = Some(self.token_file(&cfg.namespace, &cfg.service_account(), &cfg.labels));
        cfg.inbound_addr = ([127, 0, 0, 1], 0).into();
        cfg.outbound_addr = ([127, 0, 0, 1], 0).into();
        cfg.admin_addr = ([127, 0, 0, 1], 0).into();
        cfg.cache_dir = Some(self.cache_dir(&format!("{namespace}-{workload}")));
        cfg.drain_grace = Duration::from_secs(2);
        // The data path on worker threads, as `trellis proxy` runs it.
        cfg.workers = 2;
        cfg
    }

    pub async fn sidecar(&self, workload: &str, labels: &[(&str, &str)], app_port: u16) -> Proxy {
        Proxy::start(self.proxy_config(workload, labels, app_port))
            .await
            .expect("proxy starts")
    }

    /// The demo app `name` (version v1, instance `name-0`) with its sidecar,
    /// labelled `app: name`; the app runs until the test ends.
    pub async fn demo_sidecar(&self, name: &str) -> Proxy {
        let (port, _app) = demo_app(name, "v1", &format!("{name}-0")).await;
        self.sidecar(name, &[("app", name)], port).await
    }

    /// A sidecar for a workload in `namespace`.
    pub async fn sidecar_in(
        &self,
        namespace: &str,
        workload: &str,
        labels: &[(&str, &str)],
        app_port: u16,
    ) -> Proxy {
        Proxy::start(self.proxy_config_in(namespace, workload, labels, app_port))
            .await
            .expect("proxy starts")
    }

    /// A sidecar with one `--upstream` listener on a free port.
    pub async fn sidecar_with_upstream(
        &self,
        workload: &str,
        app_port: u16,
        service: &str,
        port: u16,
    ) -> Proxy {
        let mut cfg = self.proxy_config(workload, &[("app", workload)], app_port);
        cfg.upstreams.push(Upstream {
            service: service.to_string(),
            port,
            listen: ([127, 0, 0, 1], 0).into(),
        });
        Proxy::start(cfg).await.expect("proxy starts")
    }
}

/// Runs a demo app on a free loopback port.
pub async fn demo_app(service: &str, version: &str, instance: &str) -> (u16, JoinHandle<()>) {
    let mut cfg = DemoAppConfig::new(service);
    cfg.version = version.to_string();
    cfg.instance = instance.to_string();
    run_app(cfg).await
}

pub async fn run_app(cfg: DemoAppConfig) -> (u16, JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        let _ = demo_app::serve(listener, cfg).await;
    });
    (port, task)
}

/// An HTTP/1.1 client that keeps one connection to an explicit proxy, as an
/// app with `HTTP_PROXY` does.
pub struct ProxyClient {
    proxy: SocketAddr,
    sender: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

/// A whole response, headers included.
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    /// The `instance` field of a demo or test app's JSON answer.
    pub fn instance(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["instance"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// The response flags the caller's proxy set (`x-trellis-flags`).
    pub fn flags(&self) -> String {
        self.headers
            .get("x-trellis-flags")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }
}

impl ProxyClient {
    pub fn new(proxy: SocketAddr) -> Self {
        ProxyClient {
            proxy,
            sender: None,
        }
    }

    pub async fn get(&mut self, url: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.request(Method::GET, url, &[]).await
    }

    pub async fn request(
        &mut self,
        method: Method,
        url: &str,
        headers: &[(&str, &str)],
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let a = self.try_send(method, url, headers, Bytes::new()).await?;
        Ok((a.status, a.body))
    }

    /// One request on the kept connection (a new one when it was closed),
    /// with a 10s limit.
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

    /// [`try_send`](Self::try_send) that panics on a connection or
    /// protocol error.
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
}

/// The `instance` field of a demo app's JSON answer.
pub fn instance_of(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_else(|e| {
        panic!(
            "demo-app answer is JSON ({e}): {}",
            String::from_utf8_lossy(body)
        )
    });
    v["instance"].as_str().unwrap_or_default().to_string()
}

/// The sum of `metric` over the label sets that carry every `(label,
/// value)` in `labels`, from a proxy's `/metrics`.
pub async fn metric_sum(admin: SocketAddr, metric: &str, labels: &[(&str, &str)]) -> f64 {
    trellis_testkit::prometheus::scrape(admin)
        .await
        .sum(metric, labels)
}

/// The config a proxy runs, from its admin `/config`.
pub async fn admin_config(admin: SocketAddr) -> Result<Value, String> {
    let (status, body) = trellis_testkit::try_http_get(&format!("http://{admin}/config"), None)
        .await
        .map_err(|e| format!("{e:#}"))?;
    if status != StatusCode::OK {
        return Err(format!("GET /config on {admin}: {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("/config is not JSON: {e}"))
}

/// How many endpoints of `service` a proxy's config (from `/config`) holds.
pub fn config_endpoints(config: &Value, service: &str) -> usize {
    config["services"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == service))
        .and_then(|s| s["endpoints"].as_array().map(|e| e.len()))
        .unwrap_or(0)
}

/// Waits until the proxy with this admin address runs a config for which
/// `pred` holds, and returns that config.
pub async fn wait_config(admin: SocketAddr, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
    eventually(what, CONVERGE, || async {
        let config = admin_config(admin).await?;
        if pred(&config) {
            Ok(config)
        } else {
            Err(config.to_string())
        }
    })
    .await
}

/// Waits until the proxy with this admin address runs a config in which
/// `service` has `n` endpoints (its app must have called it once).
pub async fn wait_proxy_endpoints(admin: SocketAddr, service: &str, n: usize) {
    wait_config(
        admin,
        &format!("the proxy at {admin} sees {n} endpoints of {service}"),
        |c| config_endpoints(c, service) == n,
    )
    .await;
}
