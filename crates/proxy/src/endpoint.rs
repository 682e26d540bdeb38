//! One endpoint of a service: a peer proxy's inbound listener, its load
//! figures and the HTTP/2 connection this proxy keeps to it.
//!
//! Endpoints outlive config versions: a new config reuses the `Endpoint` of
//! an address it still lists, so load figures and connections carry over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::balance::Load;
use crate::error::ProxyError;
use crate::tls::Credentials;
use crate::Body;

/// The default of `--connect-timeout` (see `limits`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

pub struct Endpoint {
    pub addr: SocketAddr,
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub load: Arc<Load>,
    /// Outlier ejection and active health-check state.
    pub health: crate::traffic::EndpointHealth,
    /// The shared HTTP/2 connection, and whether it is mutual TLS.
    h2: ArcSwapOption<(SendRequest<Body>, bool)>,
    // Serialises connection set-up so a burst opens one connection, not many.
    connecting: tokio::sync::Mutex<()>,
}

impl Endpoint {
    pub fn new(addr: SocketAddr, ep: &trellis_api::v1::Endpoint) -> Self {
        Endpoint {
            addr,
            instance: ep.instance.clone(),
            workload: ep.workload.clone(),
            namespace: ep.namespace.clone(),
            identity: ep.identity.clone(),
            labels: ep.labels.clone().into_iter().collect(),
            load: Arc::new(Load::default()),
            health: Default::default(),
            h2: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether the peer describes the same endpoint (so it can be reused).
    pub fn same_as(&self, ep: &trellis_api::v1::Endpoint) -> bool {
        self.instance == ep.instance && self.identity == ep.identity && self.workload == ep.workload
    }

    /// Opens a connection to the peer: mutual TLS with `alpn` when `creds`
    /// are given (the peer must prove exactly this endpoint's identity),
    /// else plaintext.
    pub async fn open(
        &self,
        creds: Option<&Credentials>,
        alpn: &[u8],
    ) -> Result<Box<dyn Io>, ProxyError> {
        let tcp = connect(self.addr).await?;
        let Some(creds) = creds else {
            return Ok(Box::new(tcp));
        };
        if self.identity.is_empty() {
            return Err(ProxyError::upstream_connect(
                self.addr,
                "the endpoint has no identity to verify",
            ));
        }
        let config = creds
            .client(&self.identity, alpn)
            .map_err(|e| ProxyError::upstream_connect(self.addr, e))?;
        let name = ServerName::try_from("peer.trellis").expect("a valid DNS name");
        let tls = tokio::time::timeout(
            crate::limits::connect_timeout(),
            TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| ProxyError::upstream_connect(self.addr, "TLS handshake timed out"))?
        .map_err(|e| {
            ProxyError::upstream_connect(
                self.addr,
                format!("mutual TLS with {} failed: {e}", self.identity),
            )
        })?;
        Ok(Box::new(tls))
    }

    /// A ready HTTP/2 connection to the peer, made on first use and shared
    /// by every request to this endpoint.
    pub async fn h2(&self, creds: Option<&Credentials>) -> Result<SendRequest<Body>, ProxyError> {
        let tls = creds.is_some();
        let usable = |c: &(SendRequest<Body>, bool)| !c.0.is_closed() && c.1 == tls;
        if let Some(c) = self.h2.load().as_deref() {
            if usable(c) {
                return Ok(c.0.clone());
            }
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.h2.load().as_deref() {
            if usable(c) {
                return Ok(c.0.clone());
            }
        }
        let io = self.open(creds, trellis_identity::ALPN_H2).await?;
        let (tx, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            // Fixed, large windows, not adaptive ones (see
            // `server::SHARED_CONN_WINDOW`): this connection carries every
            // call to the peer.
            .initial_stream_window_size(crate::server::SHARED_STREAM_WINDOW)
            .initial_connection_window_size(crate::server::SHARED_CONN_WINDOW)
            .max_header_list_size(crate::server::MAX_RESPONSE_HEADERS)
            .handshake::<_, Body>(TokioIo::new(io))
            .await
            .map_err(|e| ProxyError::upstream_connect(self.addr, e))?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%addr, error = %e, "connection to peer closed");
            }
        });
        self.h2.store(Some(Arc::new((tx.clone(), tls))));
        Ok(tx)
    }
}

/// A connection to a peer, plaintext or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Opens a TCP connection with a bounded wait and Nagle off.
pub async fn connect(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    // Marked in pods mode, so the redirect rules let it pass.
    let tcp = tokio::time::timeout(
        crate::limits::connect_timeout(),
        crate::transparent::connect_marked(addr),
    )
    .await
    .map_err(|_| ProxyError::upstream_connect(addr, "connect timed out"))?
    .map_err(|e| ProxyError::upstream_connect(addr, e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn endpoint(addr: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            addr.parse().unwrap(),
            &trellis_api::v1::Endpoint {
                address: addr.into(),
                instance: addr.into(),
                workload: "w".into(),
                namespace: "default".into(),
                ..Default::default()
            },
        ))
    }
}
