//! The app's Kubernetes probes, run by the proxy. The injector rewrites an
//! app container's `httpGet` and `tcpSocket` probes to the admin port's
//! `/app-health/<container>/<liveness|readiness|startup>` (the pod's ports
//! are redirected to the inbound listener, which refuses the kubelet's
//! plaintext under strict mTLS) and hands the originals over in
//! `TRELLIS_APP_PROBES`; here they run against the app on 127.0.0.1, as
//! Istio's agent does. The proxy's own connections are not redirected.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};

/// How long one probe may take: the kubelet's own default timeout.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// One original probe, as the injector wrote it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppProbe {
    HttpGet {
        #[serde(default = "root")]
        path: String,
        port: u16,
        #[serde(default)]
        scheme: String,
        #[serde(default, rename = "httpHeaders")]
        http_headers: Vec<Header>,
    },
    TcpSocket {
        port: u16,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub name: String,
    pub value: String,
}

fn root() -> String {
    "/".into()
}

#[derive(Debug, thiserror::Error)]
#[error("TRELLIS_APP_PROBES is not the injector's probe map ({0}): inject the pod again with this version's `trellis inject` or webhook")]
pub struct ProbesError(serde_json::Error);

/// The probes by admin path, from `TRELLIS_APP_PROBES`' JSON.
pub fn parse(json: &str) -> Result<BTreeMap<String, AppProbe>, ProbesError> {
    serde_json::from_str(json).map_err(ProbesError)
}

/// Runs the probe; the status the kubelet gets and a line saying why.
pub async fn run(probe: &AppProbe) -> (StatusCode, String) {
    let port = match probe {
        AppProbe::HttpGet { port, .. } | AppProbe::TcpSocket { port } => *port,
    };
    let connect = tokio::time::timeout(
        PROBE_TIMEOUT,
        tokio::net::TcpStream::connect(("127.0.0.1", port)),
    );
    let tcp = match connect.await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            return fail(format!(
                "the app does not accept connections on {port}: {e}"
            ))
        }
        Err(_) => return fail(format!("connecting to the app on {port} timed out")),
    };
    let AppProbe::HttpGet {
        path,
        scheme,
        http_headers,
        ..
    } = probe
    else {
        return (StatusCode::OK, "ok\n".into());
    };
    // The kubelet does not verify an HTTPS probe's certificate; without a
    // TLS client here, an HTTPS probe checks that the app accepts connections.
    if scheme.eq_ignore_ascii_case("https") {
        return (StatusCode::OK, "ok (accepts connections)\n".into());
    }
    let get = async {
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let mut req =
            Request::get(path.as_str()).header(http::header::HOST, format!("127.0.0.1:{port}"));
        for h in http_headers {
            req = req.header(h.name.as_str(), h.value.as_str());
        }
        let req = req
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let resp = send.send_request(req).await?;
        let status = resp.status();
        // Read (and drop) the body so the app sees a complete exchange.
        let _ = resp.into_body().collect().await;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
    };
    match tokio::time::timeout(PROBE_TIMEOUT, get).await {
        // As the kubelet: 200 to 399 pass.
        Ok(Ok(s)) if s.as_u16() >= 200 && s.as_u16() < 400 => {
            (StatusCode::OK, format!("app answered {s}\n"))
        }
        Ok(Ok(s)) => fail(format!("the app answered {s}")),
        Ok(Err(e)) => fail(format!("the app's probe failed: {e}")),
        Err(_) => fail("the app's probe timed out".into()),
    }
}

fn fail(why: String) -> (StatusCode, String) {
    (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_injector_writes() {
        let probes = parse(
            r#"{"/app-health/app/readiness":{"httpGet":{"path":"/healthz","port":8080,"scheme":"HTTP","httpHeaders":[{"name":"x","value":"1"}]}},
                "/app-health/app/liveness":{"tcpSocket":{"port":8080}}}"#,
        )
        .unwrap();
        assert_eq!(
            probes["/app-health/app/readiness"],
            AppProbe::HttpGet {
                path: "/healthz".into(),
                port: 8080,
                scheme: "HTTP".into(),
                http_headers: vec![Header {
                    name: "x".into(),
                    value: "1".into()
                }],
            }
        );
        assert_eq!(
            probes["/app-health/app/liveness"],
            AppProbe::TcpSocket { port: 8080 }
        );
        assert!(parse("[1]")
            .unwrap_err()
            .to_string()
            .contains("inject the pod again"));
    }

    #[tokio::test]
    async fn passes_and_fails_as_the_kubelet_would() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 1024];
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    let req = String::from_utf8_lossy(&buf[..n]).to_string();
                    let status = if req.starts_with("GET /ok") {
                        "200 OK"
                    } else {
                        "500 Oops"
                    };
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        let http = |path: &str| AppProbe::HttpGet {
            path: path.into(),
            port,
            scheme: "HTTP".into(),
            http_headers: Vec::new(),
        };
        assert_eq!(run(&http("/ok")).await.0, StatusCode::OK);
        assert_eq!(run(&http("/bad")).await.0, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(run(&AppProbe::TcpSocket { port }).await.0, StatusCode::OK);
        // A port nothing listens on: bound, then closed.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let (code, why) = run(&AppProbe::TcpSocket { port: closed }).await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(why.contains("does not accept connections"), "{why}");
    }
}
