//! The client of the control plane's HTTP API (docs/dev/contracts.md), and
//! how the CLI finds the control plane and its credential.
//!
//! The control plane: `--server`, then `TRELLIS_SERVER` (both through
//! clap), then the mesh that `trellis up` runs for `--data-dir`, then the
//! default address of a hand-run `trellis control`. The credential:
//! `--token-file`, then `TRELLIS_TOKEN`, then the local mesh's own admin
//! token — only when talking to that mesh, so it never goes elsewhere.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::TcpStream;

use crate::cli::Global;
use crate::http::HttpError;
use crate::local::state::RunState;

const TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15080";
/// The control plane's admin token inside its data dir.
const ADMIN_TOKEN_FILE: &str = "admin-token";
/// The environment variable that holds a credential (the token itself).
pub const TOKEN_ENV: &str = "TRELLIS_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach the control plane at {server} ({found}): {}\n  is it running? start a local mesh with `trellis up -f FILE --detach`, or pass --server URL", .cause.reason())]
    Unreachable {
        server: String,
        found: String,
        cause: HttpError,
    },
    #[error(transparent)]
    Http(HttpError),
    #[error("{0}")]
    NotFound(String),
    #[error("{}", refused(.message, .details))]
    Refused {
        status: StatusCode,
        message: String,
        details: Vec<ErrorDetail>,
    },
    #[error("{what}: unexpected answer from the control plane: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "--server {0:?}: expected a URL such as http://127.0.0.1:15080 or https://cp.example:15080"
    )]
    BadServer(String),
    #[error("cannot read the credential in {path}: {source}")]
    TokenFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{server} is https: give the CA that signed its certificate with --ca-file FILE or TRELLIS_CA_FILE (for a certificate from the mesh CA: the control plane's <data-dir>/ca/roots.pem)")]
    NoCa { server: String },
    #[error("--ca-file {path}: {reason}")]
    BadCa { path: PathBuf, reason: String },
}

/// One problem the control plane found with a resource.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(default)]
pub struct ErrorDetail {
    pub file: String,
    pub document: usize,
    pub line: Option<usize>,
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Same shape as trellis_resource::ResourceError, so local and
        // server-side errors read alike.
        let e = trellis_resource::ResourceError {
            file: self.file.clone(),
            document: self.document,
            line: self.line,
            field: self.field.clone(),
            reason: self.reason.clone(),
        };
        write!(f, "{e}")
    }
}

fn refused(message: &str, details: &[ErrorDetail]) -> String {
    let mut out = message.to_string();
    for d in details {
        // Some messages already hold their only detail.
        if message.contains(&d.to_string()) {
            continue;
        }
        out.push_str("\n  ");
        out.push_str(&d.to_string());
    }
    out
}

#[derive(Deserialize)]
struct ErrorBody {
    error: String,
    #[serde(default)]
    details: Vec<ErrorDetail>,
}

/// A control plane to talk to, and the credential to show it.
#[derive(Clone)]
pub struct Api {
    base: String,
    /// Where the address came from, for error messages.
    found: String,
    token: Option<String>,
    /// A credential renewed while the Api is in use (`--kubernetes`: the
    /// ServiceAccount token, made again before it expires); sent instead
    /// of `token`.
    renewed: Option<Arc<std::sync::RwLock<String>>>,
    client: Client<Connector, Full<Bytes>>,
}

/// The admin token of the control plane that `trellis up` runs in
/// `data_dir` (it makes it on start, mode 0600).
pub fn local_admin_token(data_dir: &Path) -> Result<String, ApiError> {
    read_token(&data_dir.join("control").join(ADMIN_TOKEN_FILE))
}

fn read_token(path: &Path) -> Result<String, ApiError> {
    std::fs::read_to_string(path)
        .map(|t| t.trim().to_string())
        .map_err(|source| ApiError::TokenFile {
            path: path.to_path_buf(),
            source,
        })
}

impl Api {
    /// Finds the control plane and the credential as SPEC.md says.
    pub fn discover(global: &Global) -> anyhow::Result<Api> {
        Api::discover_with(global, std::env::var(TOKEN_ENV).ok())
    }

    /// `discover`, with the value of `TRELLIS_TOKEN` given (tests).
    fn discover_with(global: &Global, env_token: Option<String>) -> anyhow::Result<Api> {
        let local = RunState::read(&global.data_dir)?;
        let (server, found) = match (&global.server, &local) {
            (Some(server), _) => (
                server.clone(),
                "from --server or TRELLIS_SERVER".to_string(),
            ),
            (None, Some(state)) => (
                state.control_url(),
                format!("the mesh of `trellis up` in {}", global.data_dir.display()),
            ),
            (None, None) => (
                DEFAULT_SERVER.to_string(),
                format!("the default; no mesh runs in {}", global.data_dir.display()),
            ),
        };
        let mut api = Api::with_ca(&server, &found, global.ca_file.as_deref())?;
        let env = env_token.filter(|t| !t.trim().is_empty());
        api.token = if let Some(path) = &global.token_file {
            Some(read_token(path)?)
        } else if let Some(t) = env {
            Some(t.trim().to_string())
        } else {
            // The local mesh's own token goes to the local mesh only.
            match &local {
                Some(state) if api.base == state.control_url() => {
                    match local_admin_token(&global.data_dir) {
                        Ok(t) => Some(t),
                        Err(ApiError::TokenFile { path, source })
                            if source.kind() == std::io::ErrorKind::PermissionDenied =>
                        {
                            anyhow::bail!(
                                "the local mesh's credential {} is not readable ({source}): run as the user who started the mesh (root, for pods mode), or give --token-file FILE",
                                path.display()
                            )
                        }
                        Err(_) => None,
                    }
                }
                _ => None,
            }
        };
        Ok(api)
    }

    /// `server` is a URL, or HOST:PORT (plain HTTP).
    pub fn new(server: &str, found: &str) -> Result<Api, ApiError> {
        Api::with_ca(server, found, None)
    }

    /// Like `new`; an https:// server is trusted if `ca_file` signed it.
    pub fn with_ca(server: &str, found: &str, ca_file: Option<&Path>) -> Result<Api, ApiError> {
        let server = server.trim().trim_end_matches('/');
        let base = if server.contains("://") {
            server.to_string()
        } else {
            format!("http://{server}")
        };
        let uri = base
            .parse::<Uri>()
            .ok()
            .filter(|u| u.host().is_some())
            .ok_or_else(|| ApiError::BadServer(server.to_string()))?;
        let tls = match (uri.scheme_str(), ca_file) {
            (Some("http"), _) => None,
            (Some("https"), Some(ca)) => {
                let bad = |reason: String| ApiError::BadCa {
                    path: ca.to_path_buf(),
                    reason,
                };
                let pem = std::fs::read_to_string(ca).map_err(|e| bad(e.to_string()))?;
                Some(tls_connector(&pem).map_err(bad)?)
            }
            (Some("https"), None) => return Err(ApiError::NoCa { server: base }),
            _ => return Err(ApiError::BadServer(server.to_string())),
        };
        Ok(Api {
            base,
            found: found.to_string(),
            token: None,
            renewed: None,
            client: Client::builder(TokioExecutor::new()).build(Connector {
                tls,
                server_name: None,
            }),
        })
    }

    /// An https:// `server` reached at its address but checked as
    /// `server_name` against the CA roots `roots_pem` (a control-plane
    /// replica through a port-forward: its certificate names its Service).
    pub fn with_roots(
        server: &str,
        found: &str,
        roots_pem: &str,
        server_name: &str,
    ) -> anyhow::Result<Api> {
        let tls = tls_connector(roots_pem)
            .map_err(|reason| anyhow::anyhow!("the control plane's CA roots: {reason}"))?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|_| anyhow::anyhow!("{server_name:?} is not a TLS server name"))?;
        Ok(Api {
            base: server.trim_end_matches('/').to_string(),
            found: found.to_string(),
            token: None,
            renewed: None,
            client: Client::builder(TokioExecutor::new()).build(Connector {
                tls: Some(tls),
                server_name: Some(name),
            }),
        })
    }

    /// Sends `token` as the credential.
    pub fn with_token(mut self, token: impl Into<String>) -> Api {
        self.token = Some(token.into());
        self
    }

    /// Sends what `token` holds at each request as the credential.
    pub fn with_renewed_token(mut self, token: Arc<std::sync::RwLock<String>>) -> Api {
        self.renewed = Some(token);
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// The credential, if any (the dashboard link of `demo` carries one).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<Request<Full<Bytes>>, ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = &self.renewed {
            let t = t.read().unwrap_or_else(|e| e.into_inner());
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        } else if let Some(t) = &self.token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        req.body(Full::new(body.unwrap_or_default()))
            .map_err(|_| ApiError::BadServer(self.base.clone()))
    }

    /// Sends a request; the answer's head, its body still streaming.
    async fn start(&self, req: Request<Full<Bytes>>) -> Result<Response<Incoming>, ApiError> {
        let url = req.uri().to_string();
        let resp = tokio::time::timeout(TIMEOUT, self.client.request(req))
            .await
            .map_err(|_| {
                ApiError::Http(HttpError::Timeout {
                    url: url.clone(),
                    timeout: TIMEOUT,
                })
            })?;
        resp.map_err(|cause| {
            let e = HttpError::Request {
                url,
                cause: Box::new(cause),
            };
            if e.is_connect() {
                ApiError::Unreachable {
                    server: self.base.clone(),
                    found: self.found.clone(),
                    cause: e,
                }
            } else {
                ApiError::Http(e)
            }
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let req = self.request(method, path, body)?;
        let url = req.uri().to_string();
        let resp = self.start(req).await?;
        let status = resp.status();
        let body = tokio::time::timeout(TIMEOUT, resp.into_body().collect())
            .await
            .map_err(|_| {
                ApiError::Http(HttpError::Timeout {
                    url: url.clone(),
                    timeout: TIMEOUT,
                })
            })?
            .map_err(|cause| ApiError::Http(HttpError::Body { url, cause }))?;
        Ok((status, body.to_bytes()))
    }

    /// GETs a streaming answer (tap): the body is read by the caller for as
    /// long as it likes; a refusal becomes an error.
    pub async fn stream(&self, path: &str) -> Result<Incoming, ApiError> {
        let req = self.request(Method::GET, path, None)?;
        let url = req.uri().to_string();
        let resp = self.start(req).await?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|cause| ApiError::Http(HttpError::Body { url, cause }))?
            .to_bytes();
        Err(error_from(&Method::GET, path, status, &body))
    }

    /// Sends a request and decodes a JSON answer; 4xx/5xx become errors.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<T, ApiError> {
        let (status, body) = self.send(method.clone(), path, body).await?;
        if !status.is_success() {
            return Err(error_from(&method, path, status, &body));
        }
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode {
            what: format!("{method} {path}"),
            source,
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(Method::GET, path, None).await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<T, ApiError> {
        let body = serde_json::to_vec(body).expect("request bodies serialize");
        self.call(Method::POST, path, Some(body.into())).await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.call(Method::DELETE, path, None).await
    }

    /// Whether `path` answers 200 (for /healthz and /readyz).
    pub async fn ok(&self, path: &str) -> Result<bool, ApiError> {
        let (status, _) = self.send(Method::GET, path, None).await?;
        Ok(status == StatusCode::OK)
    }
}

/// The error an answer of `status` carries (`{"error", "details"}`).
fn error_from(method: &Method, path: &str, status: StatusCode, body: &[u8]) -> ApiError {
    let (message, details) = match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => (e.error, e.details),
        Err(_) => (String::from_utf8_lossy(body).trim().to_string(), Vec::new()),
    };
    let message = if message.is_empty() {
        format!("{method} {path}: {status}")
    } else {
        message
    };
    if status == StatusCode::NOT_FOUND {
        ApiError::NotFound(message)
    } else {
        ApiError::Refused {
            status,
            message,
            details,
        }
    }
}

/// A TLS client that trusts the roots in `pem`; the error is the reason.
fn tls_connector(pem: &str) -> Result<tokio_rustls::TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in trellis_identity::certs::certs_from_pem(pem).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    if roots.is_empty() {
        return Err("no certificate in it".into());
    }
    let cfg = rustls::ClientConfig::builder_with_provider(trellis_identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// Connects to the control plane: plain TCP, or TLS checked against the
/// CA the user gave, as the URL's host or as `server_name`.
#[derive(Clone)]
struct Connector {
    tls: Option<tokio_rustls::TlsConnector>,
    server_name: Option<rustls::pki_types::ServerName<'static>>,
}

impl tower::Service<Uri> for Connector {
    type Response = ApiIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = Result<ApiIo, std::io::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Self::Future {
        let tls = self.tls.clone();
        let server_name = self.server_name.clone();
        Box::pin(async move {
            let invalid = |what: &str| {
                std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
            };
            let host = dst
                .host()
                .ok_or_else(|| invalid("no host in the URL"))?
                .trim_matches(['[', ']'])
                .to_string();
            let port = dst
                .port_u16()
                .unwrap_or(if tls.is_some() { 443 } else { 80 });
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            match tls {
                None => Ok(ApiIo::Plain(TokioIo::new(tcp))),
                Some(tls) => {
                    let name = match server_name {
                        Some(name) => name,
                        None => rustls::pki_types::ServerName::try_from(host)
                            .map_err(|_| invalid("the host is not a valid TLS server name"))?,
                    };
                    Ok(ApiIo::Tls(Box::new(TokioIo::new(
                        tls.connect(name, tcp).await?,
                    ))))
                }
            }
        })
    }
}

/// A connection to the control plane.
enum ApiIo {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>>),
}

impl Connection for ApiIo {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for ApiIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for ApiIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ApiIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ApiIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

// ------------------------------------------------------------ API answers

#[derive(Debug, Deserialize)]
pub struct ApplyAnswer {
    #[serde(default)]
    pub revision: serde_json::Value,
    pub results: Vec<ApplyResult>,
}

#[derive(Debug, Deserialize)]
pub struct ApplyResult {
    pub kind: String,
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    pub action: String,
}

#[derive(Debug, Deserialize)]
pub struct Items<T> {
    pub items: Vec<T>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub vip: Option<String>,
    #[serde(default)]
    pub endpoints: Vec<EndpointInfo>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointInfo {
    pub address: String,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub identity: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyInfo {
    pub instance: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub admin_addr: Option<String>,
    #[serde(default)]
    pub connected_seconds: Option<f64>,
    #[serde(default)]
    pub sent_version: serde_json::Value,
    #[serde(default)]
    pub acked_version: serde_json::Value,
    #[serde(default)]
    pub last_error: Option<String>,
    /// Why the control plane did not send its newest Config (over budget).
    #[serde(default)]
    pub config_withheld: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatAnswer {
    pub window_seconds: f64,
    pub rows: Vec<StatRow>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// For route rows: the service the traffic went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default)]
    pub requests: f64,
    #[serde(default)]
    pub rps: f64,
    pub success_rate: Option<f64>,
    #[serde(rename = "p50Ms")]
    pub p50_ms: Option<f64>,
    #[serde(rename = "p95Ms")]
    pub p95_ms: Option<f64>,
    #[serde(rename = "p99Ms")]
    pub p99_ms: Option<f64>,
    pub tls_share: Option<f64>,
    /// The counts behind the shares and quantiles (what `--kubernetes`
    /// adds up across the control plane's replicas).
    #[serde(default)]
    pub failures: f64,
    #[serde(default)]
    pub tls_requests: f64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub latency_buckets: Vec<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls() {
        assert_eq!(
            Api::new("127.0.0.1:15080", "").unwrap().base(),
            "http://127.0.0.1:15080"
        );
        assert_eq!(Api::new("http://cp:1/", "").unwrap().base(), "http://cp:1");
        // https needs a CA to trust, and says so.
        let err = Api::new("https://cp:1", "").err().unwrap().to_string();
        assert!(err.contains("--ca-file"), "{err}");
        assert!(Api::new("ftp://cp:1", "").is_err());
        assert!(Api::new("", "").is_err());
    }

    #[test]
    fn discovery_prefers_server_then_run_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut global = Global {
            server: None,
            namespace: None,
            output: crate::cli::Output::Table,
            data_dir: dir.path().to_path_buf(),
            token_file: None,
            ca_file: None,
        };
        assert_eq!(Api::discover(&global).unwrap().base(), DEFAULT_SERVER);
        let state = RunState {
            control: crate::local::state::ControlInfo {
                pid: 1,
                http: "127.0.0.1:41000".parse().unwrap(),
                grpc: "127.0.0.1:41001".parse().unwrap(),
            },
            processes: vec![],
        };
        state.write(dir.path()).unwrap();
        assert_eq!(
            Api::discover(&global).unwrap().base(),
            "http://127.0.0.1:41000"
        );
        global.server = Some("http://elsewhere:15080".into());
        assert_eq!(
            Api::discover(&global).unwrap().base(),
            "http://elsewhere:15080"
        );
    }

    #[test]
    fn the_local_mesh_token_goes_to_the_local_mesh_only() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("control")).unwrap();
        std::fs::write(dir.path().join("control").join(ADMIN_TOKEN_FILE), "local\n").unwrap();
        let mut global = Global {
            server: None,
            namespace: None,
            output: crate::cli::Output::Table,
            data_dir: dir.path().to_path_buf(),
            token_file: None,
            ca_file: None,
        };
        let state = RunState {
            control: crate::local::state::ControlInfo {
                pid: 1,
                http: "127.0.0.1:41000".parse().unwrap(),
                grpc: "127.0.0.1:41001".parse().unwrap(),
            },
            processes: vec![],
        };
        state.write(dir.path()).unwrap();
        let token = |g: &Global, env: Option<&str>| {
            Api::discover_with(g, env.map(str::to_string))
                .unwrap()
                .token()
                .map(str::to_string)
        };
        assert_eq!(token(&global, None).as_deref(), Some("local"));
        assert_eq!(token(&global, Some("env")).as_deref(), Some("env"));
        global.server = Some("http://127.0.0.1:41000".into());
        assert_eq!(token(&global, None).as_deref(), Some("local"));
        global.server = Some("http://elsewhere:15080".into());
        assert_eq!(token(&global, None), None);
        assert_eq!(token(&global, Some("env")).as_deref(), Some("env"));
        let file = dir.path().join("mine");
        std::fs::write(&file, "mine\n").unwrap();
        global.token_file = Some(file);
        assert_eq!(token(&global, Some("env")).as_deref(), Some("mine"));
        global.token_file = Some(dir.path().join("missing"));
        assert!(Api::discover_with(&global, None).is_err());
    }

    #[tokio::test]
    async fn unreachable_server_says_what_to_do() {
        let api = Api::new(&trellis_testkit::free_addr().to_string(), "from --server").unwrap();
        let err = api
            .get::<serde_json::Value>("/api/v1/proxies")
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cannot reach the control plane") && err.contains("trellis up"),
            "{err}"
        );
    }
}
