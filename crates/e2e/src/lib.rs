//! A whole mesh in one process on loopback, for tests: a control plane in
//! a temporary data dir, demo apps, and a sidecar per app.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use trellis::demo_app::{self, DemoAppConfig};
use trellis_control::{ControlConfig, ControlPlane};
use trellis_proxy::{Proxy, ProxyConfig, Upstream};

pub use trellis_testkit::{assert_eventually, eventually};

pub struct TestMesh {
    pub dir: tempfile::TempDir,
    pub control: Option<ControlPlane>,
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
}

impl TestMesh {
    pub async fn start() -> TestMesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = ControlConfig::new(dir.path().join("control"));
        cfg.http_addr = ([127, 0, 0, 1], 0).into();
        cfg.grpc_addr = ([127, 0, 0, 1], 0).into();
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
        cfg
    }

    pub async fn sidecar(&self, workload: &str, labels: &[(&str, &str)], app_port: u16) -> Proxy {
        Proxy::start(self.proxy_config(workload, labels, app_port))
            .await
            .expect("proxy starts")
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
        let fut = sender.send_request(req.body(Full::new(Bytes::new()))?);
        let resp = tokio::time::timeout(Duration::from_secs(10), fut).await??;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
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

/// Reads one counter's sum over all label sets matching every `filter`
/// (`name="value"` fragments) from a proxy's `/metrics`.
pub async fn metric_sum(admin: SocketAddr, metric: &str, filters: &[&str]) -> f64 {
    let (_, body) = trellis_testkit::http_get(&format!("http://{admin}/metrics"), None).await;
    let text = String::from_utf8_lossy(&body);
    text.lines()
        .filter(|l| {
            l.starts_with(metric)
                && (l[metric.len()..].starts_with('{') || l[metric.len()..].starts_with(' '))
        })
        .filter(|l| filters.iter().all(|f| l.contains(f)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
