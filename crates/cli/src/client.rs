//! The client of the control plane's HTTP API (docs/dev/contracts.md), and
//! how the CLI finds the control plane: `--server`, then `TRELLIS_SERVER`
//! (both through clap), then the mesh that `trellis up` runs for
//! `--data-dir`, then the default address of a hand-run `trellis control`.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::cli::Global;
use crate::http::{HttpClient, HttpError};
use crate::local::state::RunState;

const TIMEOUT: Duration = Duration::from_secs(15);
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:15080";

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
    #[error("--server {0:?}: expected a URL such as http://127.0.0.1:15080")]
    BadServer(String),
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

/// A control plane to talk to.
#[derive(Clone)]
pub struct Api {
    base: String,
    /// Where the address came from, for error messages.
    found: String,
    http: HttpClient,
}

impl Api {
    /// Finds the control plane as SPEC.md says.
    pub fn discover(global: &Global) -> anyhow::Result<Api> {
        if let Some(server) = &global.server {
            return Ok(Api::new(server, "from --server or TRELLIS_SERVER")?);
        }
        if let Some(state) = RunState::read(&global.data_dir)? {
            let found = format!("the mesh of `trellis up` in {}", global.data_dir.display());
            return Ok(Api::new(&state.control_url(), &found)?);
        }
        Ok(Api::new(
            DEFAULT_SERVER,
            &format!("the default; no mesh runs in {}", global.data_dir.display()),
        )?)
    }

    /// `server` is a URL, or HOST:PORT.
    pub fn new(server: &str, found: &str) -> Result<Api, ApiError> {
        let server = server.trim().trim_end_matches('/');
        let base = if server.contains("://") {
            server.to_string()
        } else {
            format!("http://{server}")
        };
        let ok = base
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme_str() == Some("http") && u.host().is_some());
        if !ok {
            return Err(ApiError::BadServer(server.to_string()));
        }
        Ok(Api {
            base,
            found: found.to_string(),
            http: HttpClient::direct(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Result<(StatusCode, Bytes), ApiError> {
        let url = format!("{}{path}", self.base);
        let mut req = Request::builder().method(method).uri(&url);
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|_| ApiError::BadServer(self.base.clone()))?;
        match self.http.send(req, TIMEOUT).await {
            Ok(resp) => Ok((resp.status(), resp.into_body())),
            Err(e) if e.is_connect() => Err(ApiError::Unreachable {
                server: self.base.clone(),
                found: self.found.clone(),
                cause: e,
            }),
            Err(e) => Err(ApiError::Http(e)),
        }
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
            let (message, details) = match serde_json::from_slice::<ErrorBody>(&body) {
                Ok(e) => (e.error, e.details),
                Err(_) => (
                    String::from_utf8_lossy(&body).trim().to_string(),
                    Vec::new(),
                ),
            };
            let message = if message.is_empty() {
                format!("{method} {path}: {status}")
            } else {
                message
            };
            return Err(if status == StatusCode::NOT_FOUND {
                ApiError::NotFound(message)
            } else {
                ApiError::Refused {
                    status,
                    message,
                    details,
                }
            });
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
}

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct StatAnswer {
    pub window_seconds: f64,
    pub rows: Vec<StatRow>,
}

#[derive(Clone, Debug, Deserialize, Serialize)]
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
        assert!(Api::new("https://cp:1", "").is_err());
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
