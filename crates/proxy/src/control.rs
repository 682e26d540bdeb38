//! The proxy's connection to the control plane: TLS, verified against the
//! CA root the join token pins (and the roots of the bundle the proxy got
//! since over that verified channel), with the token as credential.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
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

#[derive(Clone)]
pub struct ControlClient {
    /// `host:port`.
    addr: String,
    token: String,
    /// Read again on each use when set: a Kubernetes projected token is
    /// renewed by the kubelet and expires within the hour.
    token_file: Option<std::path::PathBuf>,
    trusted: Arc<ArcSwap<Vec<String>>>,
}

impl ControlClient {
    /// `control_plane` is `HOST:PORT` or a URL; the token pins the CA root.
    pub fn new(control_plane: &str, token: &str) -> Result<ControlClient, ControlError> {
        let addr = match control_plane.split_once("://") {
            Some((_, rest)) => rest.trim_end_matches('/').to_string(),
            None => control_plane.to_string(),
        };
        let pin = if token.is_empty() {
            Vec::new()
        } else {
            vec![Claims::peek(token).map_err(ControlError::Token)?.ca]
        };
        Ok(ControlClient {
            addr,
            token: token.to_string(),
            token_file: None,
            trusted: Arc::new(ArcSwap::from_pointee(pin)),
        })
    }

    /// For a token that pins nothing (Kubernetes: the pod's ServiceAccount
    /// token): the control plane's CA roots are `pins` (SHA-256
    /// fingerprints, as `trellis install` and the injector hand them out).
    pub fn pinned(control_plane: &str, token: &str, pins: Vec<String>) -> ControlClient {
        let addr = match control_plane.split_once("://") {
            Some((_, rest)) => rest.trim_end_matches('/').to_string(),
            None => control_plane.to_string(),
        };
        ControlClient {
            addr,
            token: token.to_string(),
            token_file: None,
            trusted: Arc::new(ArcSwap::from_pointee(pins)),
        }
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

    pub fn addr(&self) -> &str {
        &self.addr
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

    pub async fn channel(&self) -> Result<Channel, ControlError> {
        if self.token.is_empty() {
            return Err(ControlError::NoToken);
        }
        let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(ControlError::Tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ControlPlaneVerifier::new(
                (**self.trusted.load()).clone(),
            )))
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let addr = self.addr.clone();
        let connect = tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let addr = addr.clone();
            async move {
                let tcp = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(&addr))
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
        Endpoint::from_shared(format!("http://{}", self.addr))
            .map_err(|e| ControlError::Address {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .keep_alive_while_idle(true)
            .connect_with_connector(connect)
            .await
            .map_err(|e| ControlError::Connect(error_chain(&e)))
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
    fn a_token_file_is_read_again_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "first\n").unwrap();
        let client = ControlClient::pinned("cp:15010", "first", vec!["pin".into()])
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
