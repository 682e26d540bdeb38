//! The proxy's connection to the control plane: TLS, verified against the
//! CA root the join token pins (and the roots of the bundle the proxy got
//! since over that verified channel), with the token as credential.
//!
//! `--control-plane` names one replica or several (`ADDR,ADDR,...`), each
//! `HOST:PORT` or a URL; a host name may resolve to several addresses,
//! each a replica. A connection goes to the first that answers, starting
//! after the one used last when the session before failed (`fail_over`),
//! so a proxy whose replica died moves to the next at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tonic::transport::{Channel, Endpoint};
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{SignRequest, SignResponse};
use trellis_identity::token::{Claims, TokenError};
use trellis_identity::verify::ControlPlaneVerifier;

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("--token-file: {0}")]
    Token(TokenError),
    #[error("no join token: create one with `trellis token create --namespace NS --service-account SA` and pass --token-file")]
    NoToken,
    #[error("TLS to the control plane: {0}")]
    Tls(rustls::Error),
    #[error("bad control plane address {addr}: {reason}")]
    Address { addr: String, reason: String },
    /// The whole chain of causes: tonic's top-level message alone says little.
    #[error("connect: {0}")]
    Connect(String),
    #[error("the CA did not answer within 10s")]
    CaTimeout,
    #[error("the CA refused: {0}")]
    CaRefused(String),
}

/// How long one replica gets to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct ControlClient {
    /// As given: for messages.
    given: String,
    /// Each `host:port` given.
    addrs: Vec<String>,
    /// Where the next connection attempt starts, among the resolved
    /// addresses.
    cursor: Arc<AtomicUsize>,
    /// The replica of the current (or last) connection.
    current: Arc<ArcSwap<String>>,
    token: String,
    /// Read again on each use when set: a Kubernetes projected token is
    /// renewed by the kubelet and expires within the hour.
    token_file: Option<std::path::PathBuf>,
    trusted: Arc<ArcSwap<Vec<String>>>,
}

/// `HOST:PORT` or a URL, as `HOST:PORT`.
fn host_port(s: &str) -> Result<String, ControlError> {
    let s = s.trim();
    let addr = match s.split_once("://") {
        Some((_, rest)) => rest.trim_end_matches('/'),
        None => s,
    };
    let ok = addr
        .rsplit_once(':')
        .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
    if !ok {
        return Err(ControlError::Address {
            addr: s.to_string(),
            reason: "expected HOST:PORT or a URL such as https://cp.example:15010".into(),
        });
    }
    Ok(addr.to_string())
}

impl ControlClient {
    /// `control_plane` is one or more (comma-separated) `HOST:PORT` or
    /// URLs; the token pins the CA root.
    pub fn new(control_plane: &str, token: &str) -> Result<ControlClient, ControlError> {
        let addrs = control_plane
            .split(',')
            .filter(|a| !a.trim().is_empty())
            .map(host_port)
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err(ControlError::Address {
                addr: control_plane.to_string(),
                reason: "no address: give --control-plane HOST:PORT[,HOST:PORT...]".into(),
            });
        }
        let pin = if token.is_empty() {
            Vec::new()
        } else {
            vec![Claims::peek(token).map_err(ControlError::Token)?.ca]
        };
        Ok(ControlClient {
            given: addrs.join(","),
            current: Arc::new(ArcSwap::from_pointee(addrs[0].clone())),
            addrs,
            cursor: Arc::new(AtomicUsize::new(0)),
            token: token.to_string(),
            token_file: None,
            trusted: Arc::new(ArcSwap::from_pointee(pin)),
        })
    }

    /// For a token that pins nothing (Kubernetes: the pod's ServiceAccount
    /// token): the control plane's CA roots are `pins` (SHA-256
    /// fingerprints, as `trellis install` and the injector hand them out).
    pub fn pinned(
        control_plane: &str,
        token: &str,
        pins: Vec<String>,
    ) -> Result<ControlClient, ControlError> {
        let mut client = ControlClient::new(control_plane, "")?;
        client.token = token.to_string();
        client.trusted = Arc::new(ArcSwap::from_pointee(pins));
        Ok(client)
    }

    /// Reads the token from `path` again each time it is presented (the
    /// one given at start stays the fallback when the file cannot be read).
    pub fn with_token_file(mut self, path: Option<std::path::PathBuf>) -> ControlClient {
        self.token_file = path;
        self
    }

    /// The token to present now.
    pub fn current_token(&self) -> String {
        self.token_file
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| self.token.clone())
    }

    /// Every address given, comma-separated.
    pub fn addr(&self) -> &str {
        &self.given
    }

    /// The replica connected to last.
    pub fn current(&self) -> String {
        (**self.current.load()).clone()
    }

    /// The next connection starts with another replica than the last one.
    pub fn fail_over(&self) {
        self.cursor.fetch_add(1, Ordering::Relaxed);
    }

    /// Every replica's address: each name resolved, in the order given.
    async fn resolve(&self) -> (Vec<SocketAddr>, Vec<String>) {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        for a in &self.addrs {
            match tokio::net::lookup_host(a.as_str()).await {
                Ok(found) => {
                    for addr in found {
                        if !out.contains(&addr) {
                            out.push(addr);
                        }
                    }
                }
                Err(e) => errors.push(format!("{a}: {e}")),
            }
        }
        (out, errors)
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Also trusts these roots (fingerprints) for the control plane.
    pub fn trust(&self, fingerprints: Vec<String>) {
        let mut all = (**self.trusted.load()).clone();
        for f in fingerprints {
            if !all.contains(&f) {
                all.push(f);
            }
        }
        self.trusted.store(Arc::new(all));
    }

    /// A connection to the first replica that answers.
    pub async fn channel(&self) -> Result<Channel, ControlError> {
        if self.token.is_empty() {
            return Err(ControlError::NoToken);
        }
        let (addrs, mut errors) = self.resolve().await;
        let n = addrs.len();
        let start = self.cursor.load(Ordering::Relaxed);
        for i in 0..n {
            let k = (start + i) % n;
            match self.connect(addrs[k]).await {
                Ok(channel) => {
                    self.cursor.store(k, Ordering::Relaxed);
                    self.current.store(Arc::new(addrs[k].to_string()));
                    return Ok(channel);
                }
                Err(e) => errors.push(format!("{}: {e}", addrs[k])),
            }
        }
        Err(ControlError::Connect(if errors.is_empty() {
            format!("{} resolves to no address", self.given)
        } else {
            errors.join("; ")
        }))
    }

    async fn connect(&self, addr: SocketAddr) -> Result<Channel, String> {
        let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ControlPlaneVerifier::new(
                (**self.trusted.load()).clone(),
            )))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let connect = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            async move {
                // Marked in transparent mode, so that `trellis init`'s rules
                // let it pass without excluding the control plane's ports.
                let tcp =
                    tokio::time::timeout(CONNECT_TIMEOUT, crate::transparent::connect_marked(addr))
                        .await
                        .map_err(|_| {
                            std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                        })??;
                let _ = tcp.set_nodelay(true);
                let name = ServerName::try_from(trellis_identity::CONTROL_PLANE_NAME)
                    .expect("a valid DNS name");
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(TokioIo::new(tls))
            }
        });
        Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_with_connector(connect)
            .await
            .map_err(|e| error_chain(&e))
    }

    /// Asks the CA to sign a CSR for the identity the token grants.
    pub async fn sign(&self, csr_pem: &str) -> Result<SignResponse, ControlError> {
        let mut client = ProxyApiClient::new(self.channel().await?);
        let resp = tokio::time::timeout(
            Duration::from_secs(10),
            client.sign(SignRequest {
                token: self.current_token(),
                csr_pem: csr_pem.to_string(),
            }),
        )
        .await
        .map_err(|_| ControlError::CaTimeout)?
        .map_err(|s| ControlError::CaRefused(s.message().to_string()))?;
        Ok(resp.into_inner())
    }
}

/// The whole chain of causes: tonic's top-level message alone says little.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_plane_lists_parse() {
        let c = ControlClient::new("https://a:15010/, b:15010,,10.0.0.7:1", "").unwrap();
        assert_eq!(c.addrs, ["a:15010", "b:15010", "10.0.0.7:1"]);
        assert_eq!(c.addr(), "a:15010,b:15010,10.0.0.7:1");
        for bad in ["", ",", "a", "a:port", ":15010"] {
            assert!(ControlClient::new(bad, "").is_err(), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn connections_go_to_the_first_replica_that_answers() {
        // Two dead replicas (closed ports) before a live one: the live one
        // is found, and `fail_over` then starts past it.
        let dead1 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead2 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (d1, d2) = (dead1.local_addr().unwrap(), dead2.local_addr().unwrap());
        drop((dead1, dead2));
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let l = live.local_addr().unwrap();
        let c = ControlClient::new(&format!("{d1},{d2},{l}"), "").unwrap();
        let (addrs, errors) = c.resolve().await;
        assert_eq!(addrs, [d1, d2, l]);
        assert!(errors.is_empty());
        // Without a token nothing is tried.
        assert!(matches!(c.channel().await, Err(ControlError::NoToken)));
        // The TCP connection of each attempt, seen from the live replica.
        let accepted = tokio::spawn(async move { live.accept().await.map(|(_, a)| a) });
        let e = c.connect(d1).await.unwrap_err();
        assert!(e.contains("refused"), "{e}");
        let _ = tokio::time::timeout(Duration::from_secs(5), c.connect(l)).await;
        assert!(accepted.await.unwrap().is_ok());
        c.fail_over();
        assert_eq!(c.cursor.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_token_file_is_read_again_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let client = ControlClient::pinned("cp:15010", "first", vec!["pin".into()])
            .unwrap()
            .with_token_file(Some(path.clone()));
        assert_eq!(client.current_token(), "first");
        // The kubelet renews the projected token in place.
        std::fs::write(&path, "renewed\n").unwrap();
        assert_eq!(client.current_token(), "renewed");
        // Unreadable: the token read at start stays.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(client.current_token(), "first");
    }
}
