//! Mutual TLS between proxies with session resumption: the client configs
//! this proxy dials peers with (one per expected peer identity, sharing
//! that identity's TLS 1.3 session tickets), the checks every finished
//! handshake passes, resumed or not, and the count of handshakes.
//!
//! A resumed TLS 1.3 handshake skips the certificates: each side takes the
//! other's chain from the earlier session. So that the identity check
//! still holds:
//!
//! - rustls resumes a session only under the very verifier (and client
//!   certificate) it was made with, and each expected identity has its
//!   own verifier: a session proven for one identity is never taken for
//!   another;
//! - tickets are kept per expected identity and, within it, per peer
//!   address (the server name the client presents is the address), so a
//!   ticket is offered only to the address that issued it and only when
//!   the identity it proved is the one expected now: an address that
//!   passed to another workload starts with a full handshake;
//! - after every handshake the client checks the peer's certificate
//!   against the expected identity itself, and on a resumed one both sides
//!   check that the certificate is still valid;
//! - tickets live with the certificate that issued them: a new
//!   certificate or trust bundle (rotation) means new configs, a new
//!   ticket key, and full handshakes again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use rustls::client::danger::ServerCertVerifier;
use rustls::client::{ClientSessionMemoryCache, ResolvesClientCert, Resumption};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::{ClientConfig, CommonState, HandshakeKind};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use trellis_identity::certs;
use trellis_identity::verify::PeerServerVerifier;

use super::{Credentials, TlsError};
use crate::metrics::Direction;

/// Peer identities whose client configs are kept; past this many the set
/// starts over (a proxy follows the Services its app calls, far fewer).
const MAX_PEER_IDENTITIES: usize = 1024;
/// Peer addresses per identity whose session tickets are kept (least
/// recently used out first).
const SESSIONS_PER_IDENTITY: usize = 256;

/// The client configs for one expected peer identity, one per ALPN, all
/// with the identity's verifier and session store (so they can resume
/// each other's sessions).
#[derive(Clone)]
struct PeerClients {
    verifier: Arc<dyn ServerCertVerifier>,
    sessions: Arc<ClientSessionMemoryCache>,
    configs: Vec<(Vec<u8>, Arc<ClientConfig>)>,
}

/// The client side of one certificate: the certificate as every client
/// config presents it, and the configs per expected peer identity, read
/// without a lock and copied on the rare insert.
pub(super) struct Clients {
    cert: Arc<dyn ResolvesClientCert>,
    peers: ArcSwap<HashMap<String, PeerClients>>,
}

impl Clients {
    pub(super) fn new(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Clients, TlsError> {
        let cert = CertifiedKey::from_der(chain, key, &trellis_identity::provider())?;
        Ok(Clients {
            cert: Arc::new(SingleCertAndKey::from(cert)),
            peers: ArcSwap::default(),
        })
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabels {
    direction: Direction,
    resumed: bool,
}

/// `trellis_tls_handshakes_total`: completed mutual-TLS handshakes with
/// peer proxies, by direction and whether they resumed a session.
#[derive(Clone, Default)]
pub struct Handshakes(Family<HandshakeLabels, Counter>);

impl Handshakes {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trellis_tls_handshakes",
            "Mutual-TLS handshakes with peer proxies that completed, by direction and whether they resumed an earlier session",
            self.0.clone(),
        );
    }

    pub fn get(&self, direction: Direction, resumed: bool) -> u64 {
        self.0
            .get_or_create(&HandshakeLabels { direction, resumed })
            .get()
    }

    fn record(&self, direction: Direction, resumed: bool) {
        self.0
            .get_or_create(&HandshakeLabels { direction, resumed })
            .inc();
    }
}

fn resumed(conn: &CommonState) -> bool {
    conn.handshake_kind() == Some(HandshakeKind::Resumed)
}

impl Credentials {
    /// The client config that accepts only `expected` as the peer, with
    /// the session tickets of that identity.
    pub fn client(&self, expected: &str, alpn: &[u8]) -> Result<Arc<ClientConfig>, TlsError> {
        let peers = self.clients.peers.load();
        let peer = peers.get(expected);
        if let Some((_, c)) = peer.and_then(|p| p.configs.iter().find(|(a, _)| a == alpn)) {
            return Ok(c.clone());
        }
        let (verifier, sessions) = match peer {
            Some(p) => (p.verifier.clone(), p.sessions.clone()),
            None => (
                Arc::new(PeerServerVerifier::new(self.bundle.clone(), expected)) as Arc<_>,
                Arc::new(ClientSessionMemoryCache::new(SESSIONS_PER_IDENTITY)),
            ),
        };
        let config = self.build_client(alpn, verifier.clone(), sessions.clone())?;
        self.clients.peers.rcu(|map| {
            let mut map = if map.len() >= MAX_PEER_IDENTITIES {
                HashMap::new()
            } else {
                HashMap::clone(map)
            };
            let peer = map
                .entry(expected.to_string())
                .or_insert_with(|| PeerClients {
                    verifier: verifier.clone(),
                    sessions: sessions.clone(),
                    configs: Vec::new(),
                });
            if !peer.configs.iter().any(|(a, _)| a == alpn) {
                peer.configs.push((alpn.to_vec(), config.clone()));
            }
            map
        });
        Ok(config)
    }

    fn build_client(
        &self,
        alpn: &[u8],
        verifier: Arc<dyn ServerCertVerifier>,
        sessions: Arc<ClientSessionMemoryCache>,
    ) -> Result<Arc<ClientConfig>, TlsError> {
        let mut c = ClientConfig::builder_with_provider(trellis_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(self.clients.cert.clone());
        c.alpn_protocols = vec![alpn.to_vec()];
        c.resumption = Resumption::store(sessions);
        Ok(Arc::new(c))
    }

    /// Mutual TLS over `io` with the peer proxy at `addr`, which must
    /// prove exactly `expected`; resumes an earlier session with it when
    /// it can.
    pub async fn connect<IO>(
        &self,
        addr: SocketAddr,
        expected: &str,
        alpn: &[u8],
        io: IO,
    ) -> Result<TlsStream<IO>, TlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let config = self.client(expected, alpn)?;
        // The address, not a shared name: tickets are looked up by it.
        let name = ServerName::IpAddress(addr.ip().into());
        let tls = TlsConnector::from(config)
            .connect(name, io)
            .await
            .map_err(TlsError::Handshake)?;
        let (_, conn) = tls.get_ref();
        check_peer(conn, Some(expected))?;
        self.handshakes.record(Direction::outbound, resumed(conn));
        Ok(tls)
    }

    /// Checks and counts a handshake the inbound listener completed: a
    /// resumed one must still have a valid client certificate.
    pub fn accepted(&self, conn: &CommonState) -> Result<(), TlsError> {
        check_peer(conn, None)?;
        self.handshakes.record(Direction::inbound, resumed(conn));
        Ok(())
    }
}

/// The peer's certificate after a handshake: its identity is `expected`
/// (when given), and, on a resumed handshake, where no certificate was
/// verified just now, it has not expired since.
fn check_peer(conn: &CommonState, expected: Option<&str>) -> Result<(), TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    let resumed = resumed(conn);
    if expected.is_none() && !resumed {
        // The client verifier checked it in this very handshake.
        return Ok(());
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    check_leaf(leaf, resumed, expected, now)
}

fn check_leaf(
    leaf: &[u8],
    resumed: bool,
    expected: Option<&str>,
    now: i64,
) -> Result<(), TlsError> {
    let info = certs::info(leaf)?;
    if let Some(expected) = expected {
        if info.identity != expected {
            return Err(TlsError::PeerIdentity {
                expected: expected.to_string(),
                presented: info.identity,
            });
        }
    }
    if resumed && info.not_after <= now {
        return Err(TlsError::PeerExpired(info.identity));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::TlsAcceptor;
    use trellis_identity::ca::Ca;
    use trellis_identity::keys::WorkloadKey;
    use trellis_identity::verify::peer_identity;
    use trellis_identity::{SpiffeId, ALPN_H2, ALPN_TCP};

    use crate::metrics::Metrics;

    struct Mesh {
        ca: Ca,
        metrics: Arc<Metrics>,
    }

    impl Mesh {
        fn new() -> Mesh {
            trellis_identity::install_crypto_provider();
            let ca = Ca::generate("trellis.local").unwrap();
            Mesh {
                ca,
                metrics: Metrics::new(),
            }
        }

        /// The credentials of service account `sa`, counting into the
        /// shared metrics.
        fn creds(&self, sa: &str) -> Credentials {
            let id = SpiffeId::new("trellis.local", "default", sa);
            let key = WorkloadKey::generate(&id).unwrap();
            let chain = self
                .ca
                .sign_csr(&key.csr_pem, &id, Duration::from_secs(3600))
                .unwrap();
            Credentials::build(
                &chain,
                &key.key_pem,
                self.ca.bundle_pem().to_vec(),
                self.metrics.tls_handshakes.clone(),
            )
            .unwrap()
        }
    }

    fn id(sa: &str) -> String {
        SpiffeId::new("trellis.local", "default", sa).to_string()
    }

    const ADDR: &str = "10.0.0.7:15006";

    /// One connection from `client` to `server` (as if at `ADDR`) that
    /// expects `expected`: the identity each side saw of the other.
    async fn dial(
        client: &Credentials,
        server: &Credentials,
        expected: &str,
        alpn: &[u8],
    ) -> Result<(String, String), TlsError> {
        let (c, s) = tokio::io::duplex(64 * 1024);
        let acceptor = TlsAcceptor::from(server.server.clone());
        let accept = tokio::spawn(async move {
            let tls = acceptor.accept(s).await?;
            Ok::<_, std::io::Error>(tls)
        });
        let out = client
            .connect(ADDR.parse().unwrap(), expected, alpn, c)
            .await;
        let accepted = accept.await.unwrap();
        let tls = out?;
        let server_side = accepted.map_err(TlsError::Handshake)?;
        let (_, sconn) = server_side.get_ref();
        server.accepted(sconn)?;
        let seen_by_client = peer_identity(tls.get_ref().1.peer_certificates()).unwrap();
        let seen_by_server = peer_identity(sconn.peer_certificates()).unwrap();
        // The tickets follow the handshake: the client takes them in with
        // the first data it reads, as it would an answer.
        let (mut tls, mut server_side) = (tls, server_side);
        server_side.write_all(b"x").await.unwrap();
        server_side.flush().await.unwrap();
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.unwrap();
        Ok((seen_by_client.to_string(), seen_by_server.to_string()))
    }

    #[tokio::test]
    async fn a_resumed_session_still_proves_both_identities_and_is_counted() {
        let mesh = Mesh::new();
        let (frontend, catalog) = (mesh.creds("frontend"), mesh.creds("catalog"));
        let hs = &mesh.metrics.tls_handshakes;
        for round in 0..3 {
            let seen = dial(&frontend, &catalog, &id("catalog"), ALPN_TCP)
                .await
                .unwrap();
            assert_eq!(seen, (id("catalog"), id("frontend")), "round {round}");
        }
        assert_eq!(hs.get(Direction::outbound, false), 1, "one full handshake");
        assert_eq!(hs.get(Direction::outbound, true), 2, "then resumed");
        assert_eq!(hs.get(Direction::inbound, false), 1);
        assert_eq!(hs.get(Direction::inbound, true), 2);
        // Another ALPN to the same peer shares its tickets.
        dial(&frontend, &catalog, &id("catalog"), ALPN_H2)
            .await
            .unwrap();
        assert_eq!(hs.get(Direction::outbound, true), 3);
        let text = mesh.metrics.encode();
        assert!(
            text.contains(r#"trellis_tls_handshakes_total{direction="outbound",resumed="true"} 3"#),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_session_is_never_resumed_for_another_expected_identity() {
        let mesh = Mesh::new();
        let frontend = mesh.creds("frontend");
        let (catalog, payments) = (mesh.creds("catalog"), mesh.creds("payments"));
        dial(&frontend, &catalog, &id("catalog"), ALPN_TCP)
            .await
            .unwrap();
        // The address now should be payments, but catalog still answers
        // there: catalog's ticket is not offered, and the full handshake
        // refuses catalog.
        let err = dial(&frontend, &catalog, &id("payments"), ALPN_TCP)
            .await
            .unwrap_err();
        assert!(matches!(err, TlsError::Handshake(_)), "{err}");
        // Payments took the address: a full handshake, identity proven.
        let seen = dial(&frontend, &payments, &id("payments"), ALPN_TCP)
            .await
            .unwrap();
        assert_eq!(seen.0, id("payments"));
        let hs = &mesh.metrics.tls_handshakes;
        assert_eq!(hs.get(Direction::outbound, true), 0);
        assert_eq!(hs.get(Direction::outbound, false), 2);
    }

    #[tokio::test]
    async fn new_credentials_start_with_full_handshakes() {
        let mesh = Mesh::new();
        let frontend = mesh.creds("frontend");
        let catalog = mesh.creds("catalog");
        dial(&frontend, &catalog, &id("catalog"), ALPN_TCP)
            .await
            .unwrap();
        // Catalog renewed its certificate: the old ticket key is gone.
        let renewed = mesh.creds("catalog");
        dial(&frontend, &renewed, &id("catalog"), ALPN_TCP)
            .await
            .unwrap();
        let hs = &mesh.metrics.tls_handshakes;
        assert_eq!(hs.get(Direction::outbound, false), 2);
        assert_eq!(hs.get(Direction::outbound, true), 0);
    }

    #[test]
    fn a_peer_certificate_is_checked_for_identity_and_on_resumption_for_expiry() {
        let mesh = Mesh::new();
        let catalog = mesh.creds("catalog");
        let leaf = &catalog.chain[0];
        let not_after = catalog.info.not_after;
        for resumed in [false, true] {
            let err = check_leaf(leaf, resumed, Some(&id("payments")), 0).unwrap_err();
            assert!(matches!(err, TlsError::PeerIdentity { .. }), "{err}");
            check_leaf(leaf, resumed, Some(&id("catalog")), not_after - 1).unwrap();
        }
        let err = check_leaf(leaf, true, Some(&id("catalog")), not_after).unwrap_err();
        assert!(matches!(err, TlsError::PeerExpired(_)), "{err}");
        check_leaf(leaf, true, None, not_after).unwrap_err();
        // A full handshake's verifier judged expiry itself.
        check_leaf(leaf, false, None, not_after).unwrap();
    }
}
