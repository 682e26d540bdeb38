//! TLS for the control plane's servers: a certificate that follows the
//! mesh CA, and a listener that hands axum (or tonic) connections whose
//! handshake finished. Handshakes run concurrently (one stalled client
//! holds no one else up), each within a time limit, at most
//! `MAX_HANDSHAKES` at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A client that stalls mid-handshake is dropped after this long.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; more connections wait in the backlog.
const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("--http-tls-cert {path}: {reason}")]
    Cert { path: String, reason: String },
    #[error("--http-tls-key {path}: {reason}")]
    Key { path: String, reason: String },
    #[error("the HTTP API's certificate and key do not go together: {0}")]
    Config(String),
}

/// A rustls server config from PEM (chain first, then its key).
pub fn server_config(
    chain_pem: &str,
    key_pem: &str,
    names: (&str, &str),
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = trellis_identity::certs::certs_from_pem(chain_pem).map_err(|e| TlsError::Cert {
        path: names.0.to_string(),
        reason: e.to_string(),
    })?;
    let key = trellis_identity::certs::key_from_pem(key_pem).map_err(|e| TlsError::Key {
        path: names.1.to_string(),
        reason: e.to_string(),
    })?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(trellis_identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The control plane's own certificate from the mesh CA, for `names`,
/// made again at the first handshake after the CA signs under another
/// root (`trellis ca rotate`, here or on another replica) and at half its
/// life. Made once at start, it stayed signed by the old root: after
/// `trellis ca retire`, no proxy could connect to the proxy API until a
/// restart.
pub struct MeshCaCert {
    identity: Arc<crate::mesh_identity::MeshIdentity>,
    names: Vec<String>,
    current: arc_swap::ArcSwap<Issued>,
}

/// A certificate, the root it was made under and when to make another.
struct Issued {
    pin: String,
    renew_at: std::time::Instant,
    key: Arc<rustls::sign::CertifiedKey>,
}

/// A certificate of the mesh CA is made for a year (`Ca::server_cert`):
/// another is made after half of it.
const RENEW_AFTER: Duration = Duration::from_secs(182 * 24 * 3600);

impl MeshCaCert {
    /// Makes the first certificate now (its error is start-up's).
    pub fn new(
        identity: Arc<crate::mesh_identity::MeshIdentity>,
        names: Vec<String>,
    ) -> Result<MeshCaCert, TlsError> {
        let first = issue(&identity, &names)?;
        Ok(MeshCaCert {
            identity,
            names,
            current: arc_swap::ArcSwap::from_pointee(first),
        })
    }
}

impl std::fmt::Debug for MeshCaCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCaCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn issue(
    identity: &crate::mesh_identity::MeshIdentity,
    names: &[String],
) -> Result<Issued, TlsError> {
    let pin = identity.pin();
    let (chain_pem, key_pem) = identity.server_tls(names).map_err(|e| {
        TlsError::Config(format!("cannot make a certificate from the mesh CA: {e}"))
    })?;
    let chain = trellis_identity::certs::certs_from_pem(&chain_pem)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let key = trellis_identity::certs::key_from_pem(&key_pem)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let key = rustls::sign::CertifiedKey::from_der(chain, key, &trellis_identity::provider())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Issued {
        pin,
        renew_at: std::time::Instant::now() + RENEW_AFTER,
        key: Arc::new(key),
    })
}

impl rustls::server::ResolvesServerCert for MeshCaCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let current = self.current.load();
        if current.pin == self.identity.pin() && std::time::Instant::now() < current.renew_at {
            return Some(current.key.clone());
        }
        // Two handshakes at once may both make one: the last one stays.
        match issue(&self.identity, &self.names) {
            Ok(next) => {
                tracing::info!(names = ?self.names, root = %next.pin, "made a new server certificate from the mesh CA");
                let key = next.key.clone();
                self.current.store(Arc::new(next));
                Some(key)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot make a new server certificate; serving the last one");
                Some(current.key.clone())
            }
        }
    }
}

/// A rustls server config whose certificate follows the mesh CA (see
/// `MeshCaCert`), offering `alpn`.
pub fn mesh_ca_config(
    identity: Arc<crate::mesh_identity::MeshIdentity>,
    names: Vec<String>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let resolver = MeshCaCert::new(identity, names)?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(trellis_identity::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    Ok(Arc::new(cfg))
}

/// Accepts TCP connections and yields them once their TLS handshake is done.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    acceptor: JoinHandle<()>,
}

impl TlsListener {
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        let tls = TlsAcceptor::from(config);
        let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        let acceptor = tokio::spawn(async move {
            loop {
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    return;
                };
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning.
                        tracing::warn!(error = %e, "accepting a TLS connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (tls, tx) = (tls.clone(), tx.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(s)) => {
                            let _ = tx.send((s, peer)).await;
                        }
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener {
            ready,
            local,
            acceptor,
        })
    }
}

impl TlsListener {
    /// The connections as a stream, for tonic's `serve_with_incoming`.
    pub fn into_stream(
        self,
    ) -> impl futures::Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
        futures::stream::unfold(self, |mut listener| async move {
            let next = listener.ready.recv().await?;
            Some((Ok(next.0), listener))
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The acceptor ended (only when aborted): nothing more comes.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}
