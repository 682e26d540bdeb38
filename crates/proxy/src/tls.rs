//! This proxy's workload identity: its key (made here, kept in the cache
//! dir with mode 0600), its certificate from the control plane's CA, the
//! trust bundle, and the rustls configs built from them. Certificates are
//! renewed at about half their life, with jitter; while the control plane
//! is away the proxy keeps its certificate and keeps retrying.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use rand::Rng;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, ServerConfig};
use tokio::sync::watch;
use trellis_identity::certs::{self, CertError, CertInfo};
use trellis_identity::keys::WorkloadKey;
use trellis_identity::spiffe::ParseError;
use trellis_identity::verify::{PeerClientVerifier, PeerServerVerifier, TrustBundle};
use trellis_identity::{write_secret, SpiffeId, ALPN_H2, ALPN_HTTP1, ALPN_TCP};

use crate::control::{ControlClient, ControlError};

const CERT_FILE: &str = "cert.pem";
const KEY_FILE: &str = "key.pem";
const BUNDLE_FILE: &str = "bundle.pem";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("the certificate's identity: {0}")]
    Identity(ParseError),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
    #[error("the workload key: {0}")]
    Key(rcgen::Error),
    #[error("the CA issued {issued} but this proxy is {expected}")]
    WrongIdentity { issued: String, expected: String },
    #[error(transparent)]
    Control(#[from] ControlError),
}

/// One certificate with everything built from it.
pub struct Credentials {
    pub identity: SpiffeId,
    pub chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    pub bundle: Arc<TrustBundle>,
    pub bundle_pem: Vec<String>,
    pub info: CertInfo,
    pub server: Arc<ServerConfig>,
    /// When this proxy got the certificate (unix seconds): its useful life
    /// starts here, not at the backdated not-before.
    installed_at: i64,
}

impl Credentials {
    fn build(
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: Vec<String>,
    ) -> Result<Credentials, TlsError> {
        let chain = certs::certs_from_pem(chain_pem)?;
        let key = certs::key_from_pem(key_pem)?;
        let info = certs::info(&chain[0])?;
        let identity: SpiffeId = info.identity.parse().map_err(TlsError::Identity)?;
        let bundle = Arc::new(TrustBundle::from_pems(&bundle_pem)?);
        let mut server = ServerConfig::builder_with_provider(trellis_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(PeerClientVerifier::new(bundle.clone())))
            .with_single_cert(chain.clone(), key.clone_key())?;
        server.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec(), ALPN_TCP.to_vec()];
        Ok(Credentials {
            identity,
            chain,
            key,
            bundle,
            bundle_pem,
            info,
            server: Arc::new(server),
            installed_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs() as i64,
        })
    }

    /// A client config that accepts only `expected` as the peer.
    pub fn client(&self, expected: &str, alpn: &[u8]) -> Result<Arc<ClientConfig>, rustls::Error> {
        let mut c = ClientConfig::builder_with_provider(trellis_identity::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PeerServerVerifier::new(
                self.bundle.clone(),
                expected,
            )))
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        c.alpn_protocols = vec![alpn.to_vec()];
        Ok(Arc::new(c))
    }

    fn expires_in(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs() as i64;
        Duration::from_secs(self.info.not_after.saturating_sub(now).max(0) as u64)
    }
}

pub struct Tls {
    current: ArcSwapOption<Credentials>,
    identity: SpiffeId,
    cache_dir: Option<PathBuf>,
    key: WorkloadKey,
    changed: watch::Sender<u64>,
}

impl Tls {
    /// Loads a still-valid certificate from the cache dir, if any; the key is
    /// reused from there, or made now.
    pub fn new(identity: SpiffeId, cache_dir: Option<PathBuf>) -> Result<Arc<Tls>, TlsError> {
        let cached_key = cache_dir
            .as_ref()
            .and_then(|d| std::fs::read_to_string(d.join(KEY_FILE)).ok());
        let key = match cached_key {
            Some(key_pem) => WorkloadKey::from_key_pem(&identity, &key_pem),
            None => WorkloadKey::generate(&identity),
        }
        .map_err(TlsError::Key)?;
        let tls = Arc::new(Tls {
            current: ArcSwapOption::empty(),
            identity,
            cache_dir,
            key,
            changed: watch::channel(0).0,
        });
        tls.load_cache();
        Ok(tls)
    }

    pub fn current(&self) -> Option<Arc<Credentials>> {
        self.current.load_full()
    }

    pub fn identity(&self) -> &SpiffeId {
        &self.identity
    }

    /// The fingerprints of the roots this proxy trusts (cached bundle).
    pub fn trusted_roots(&self) -> Vec<String> {
        self.current()
            .map(|c| c.bundle.fingerprints())
            .unwrap_or_default()
    }

    fn load_cache(&self) {
        let Some(dir) = &self.cache_dir else { return };
        let (Ok(chain), Ok(bundle)) = (
            std::fs::read_to_string(dir.join(CERT_FILE)),
            std::fs::read_to_string(dir.join(BUNDLE_FILE)),
        ) else {
            return;
        };
        let bundle = split(&bundle);
        match Credentials::build(&chain, &self.key.key_pem, bundle) {
            Ok(c) if c.identity == self.identity && c.expires_in() > Duration::ZERO => {
                tracing::info!(identity = %c.identity, serial = %c.info.serial, "using the cached certificate");
                self.current.store(Some(Arc::new(c)));
            }
            Ok(_) => tracing::info!(
                "the cached certificate is expired or for another identity; asking for a new one"
            ),
            Err(e) => tracing::warn!(error = %e, "ignoring an unreadable cached certificate"),
        }
    }

    fn install(&self, chain_pem: &str, bundle_pem: Vec<String>) -> Result<(), TlsError> {
        let c = Credentials::build(chain_pem, &self.key.key_pem, bundle_pem.clone())?;
        if c.identity != self.identity {
            return Err(TlsError::WrongIdentity {
                issued: c.identity.to_string(),
                expected: self.identity.to_string(),
            });
        }
        if let Some(dir) = &self.cache_dir {
            let res = std::fs::create_dir_all(dir)
                .and_then(|_| write_secret(&dir.join(KEY_FILE), self.key.key_pem.as_bytes()))
                .and_then(|_| std::fs::write(dir.join(CERT_FILE), chain_pem))
                .and_then(|_| std::fs::write(dir.join(BUNDLE_FILE), bundle_pem.concat()));
            if let Err(e) = res {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot cache the certificate");
            }
        }
        tracing::info!(identity = %c.identity, serial = %c.info.serial, not_after = c.info.not_after, "certificate installed");
        self.current.store(Some(Arc::new(c)));
        self.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// A new trust bundle from the control plane (root rotation).
    pub fn set_bundle(&self, bundle_pem: &[String]) {
        let Some(cur) = self.current() else { return };
        if cur.bundle_pem == bundle_pem || bundle_pem.is_empty() {
            return;
        }
        let chain: String = cur.chain.iter().map(|c| certs::to_pem(c)).collect();
        if let Err(e) = self.install(&chain, bundle_pem.to_vec()) {
            tracing::warn!(error = %e, "cannot use the new trust bundle; keeping the old one");
        }
    }

    /// Asks the CA for a certificate once.
    pub async fn renew(&self, control: &ControlClient) -> Result<(), TlsError> {
        let resp = control.sign(&self.key.csr_pem).await?;
        self.install(&resp.certificate_chain_pem, resp.trust_bundle_pem)?;
        control.trust(self.trusted_roots());
        Ok(())
    }

    /// When to renew: about half-way through the certificate's life.
    fn renew_in(&self) -> Duration {
        let Some(c) = self.current() else {
            return Duration::ZERO;
        };
        // The useful life starts when the certificate arrived, not at its
        // backdated not-before.
        let start = c.installed_at.max(c.info.not_before);
        let life = (c.info.not_after - start).max(1) as f64;
        let jitter = rand::rng().random_range(0.4..0.6);
        let at = start as f64 + life * jitter;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        Duration::from_secs_f64((at - now).max(0.0))
    }

    /// Keeps the certificate fresh until shutdown.
    pub async fn run(self: Arc<Self>, control: ControlClient, mut shutdown: watch::Receiver<bool>) {
        let mut backoff = Duration::from_millis(200);
        loop {
            let wait = self.renew_in();
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            match self.renew(&control).await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(e) => {
                    let left = self.current().map(|c| c.expires_in());
                    tracing::warn!(error = %e, expires_in = ?left, "cannot renew the certificate; keeping the current one and retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.mul_f64(rand::rng().random_range(0.5..1.0))) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
    }

    /// Waits until a certificate is installed, or `timeout`.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let mut rx = self.changed.subscribe();
        let wait = async {
            while self.current().is_none() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.current().is_some()
    }
}

fn split(pems: &str) -> Vec<String> {
    certs::certs_from_pem(pems)
        .map(|c| c.iter().map(|c| certs::to_pem(c)).collect())
        .unwrap_or_default()
}
