//! The control plane's CA and join tokens, as the proxy API and the HTTP
//! API use them. Everything in `<data-dir>/ca` is mode 0600 in a 0700
//! folder; keys are never logged.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::Duration;

use tonic::Status;
use tracing::{info, warn};
use trellis_api::v1::{SignRequest, SignResponse};
use trellis_identity::ca::{Ca, CaError};
use trellis_identity::token::{Claims, Grant, TokenAuthority, TokenError};
use trellis_identity::SpiffeId;

/// Where the CA comes from.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct CaFiles {
    /// A user-supplied root or intermediate certificate (PEM) …
    pub cert: Option<PathBuf>,
    /// … and its key (PEM).
    pub key: Option<PathBuf>,
    /// The roots to trust (default: `cert`, which must then be a root).
    pub bundle: Option<PathBuf>,
}

pub struct MeshIdentity {
    ca: RwLock<Ca>,
    tokens: TokenAuthority,
    /// Kubernetes: proxies present ServiceAccount tokens, which the API
    /// server vouches for, instead of join tokens.
    external: std::sync::OnceLock<std::sync::Arc<dyn ExternalTokens>>,
}

/// Who vouches for a proxy's token when it is not a join token
/// (Kubernetes: a TokenReview of the pod's projected ServiceAccount token).
/// The claims it returns are checked and used as a join token's are.
#[tonic::async_trait]
pub trait ExternalTokens: Send + Sync {
    /// The identity, labels and address `token` grants; the error is what
    /// the proxy is told.
    async fn review(&self, token: &str) -> Result<Claims, Status>;
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("--ca-cert and --ca-key go together: give both or neither")]
    HalfCa,
    #[error("cannot make {path} private (0700 folder, 0600 files): {source}")]
    Private {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes `dir` a 0700 folder whose files are 0600: the CA's certificates
/// are public, but nothing in here needs to be readable by anyone else, and
/// one rule is easier to check than a list.
fn make_private(dir: &std::path::Path) -> Result<(), IdentityError> {
    let err = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| IdentityError::Private { path, source }
    };
    std::fs::create_dir_all(dir).map_err(err(dir))?;
    crate::auth::set_mode(dir, 0o700).map_err(err(dir))?;
    for entry in std::fs::read_dir(dir).map_err(err(dir))? {
        let path = entry.map_err(err(dir))?.path();
        if path.is_file() {
            crate::auth::set_mode(&path, 0o600).map_err(err(&path))?;
        }
    }
    Ok(())
}

impl MeshIdentity {
    pub fn open(
        data_dir: &std::path::Path,
        files: &CaFiles,
    ) -> Result<MeshIdentity, IdentityError> {
        let dir = data_dir.join("ca");
        // Private before anything is written into it.
        make_private(&dir)?;
        let ca = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => Ca::from_files(&dir, cert, key, files.bundle.as_deref())?,
            (None, None) => Ca::load_or_create(&dir, "trellis.local")?,
            _ => return Err(IdentityError::HalfCa),
        };
        let tokens = TokenAuthority::load_or_create(&dir)?;
        make_private(&dir)?;
        info!(root = %ca.root_fingerprint(), roots = ca.bundle_pem().len(), "CA ready");
        Ok(MeshIdentity {
            ca: RwLock::new(ca),
            tokens,
            external: std::sync::OnceLock::new(),
        })
    }

    fn ca(&self) -> std::sync::RwLockReadGuard<'_, Ca> {
        self.ca.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn bundle(&self) -> Vec<String> {
        self.ca().bundle_pem().to_vec()
    }

    /// SHA-256 of the current root: what tokens pin.
    pub fn pin(&self) -> String {
        self.ca().root_fingerprint()
    }

    /// The control plane's own server certificate chain and key (PEM), for
    /// `trellis-control`, `localhost` and `extra` names or IPs.
    pub fn server_tls(&self, extra: &[String]) -> Result<(String, String), CaError> {
        let mut names = vec![trellis_identity::CONTROL_PLANE_NAME, "localhost"];
        names.extend(extra.iter().map(String::as_str));
        self.ca().server_cert(&names)
    }

    /// A join token for what `grant` grants (the caller checked it).
    pub fn create_token(&self, grant: &Grant, ttl: Duration) -> (String, Claims) {
        self.tokens.create(grant, ttl, &self.pin())
    }

    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        self.tokens.revoke(id)
    }

    /// Checks a proxy's token; the error is what the proxy is told.
    pub fn verify_token(&self, token: &str) -> Result<Claims, Status> {
        if token.is_empty() {
            return Err(Status::unauthenticated(
                "a join token is required: create one with `trellis token create --namespace NS --service-account SA` and give it with --token-file",
            ));
        }
        self.tokens.verify(token).map_err(|e| {
            warn!(error = %e, "refused a join token");
            Status::unauthenticated(e.to_string())
        })
    }

    /// From now on proxies' tokens are reviewed by `external` (Kubernetes);
    /// join tokens are no longer accepted. Set once.
    pub fn set_external(&self, external: std::sync::Arc<dyn ExternalTokens>) {
        let _ = self.external.set(external);
    }

    /// Checks a proxy's token: a join token, or on Kubernetes what the API
    /// server says of it.
    pub async fn authenticate(&self, token: &str) -> Result<Claims, Status> {
        match self.external.get() {
            Some(external) => external.review(token).await,
            None => self.verify_token(token),
        }
    }

    /// Signs a CSR for exactly the identity `claims` (from
    /// [`MeshIdentity::authenticate`]) grant.
    pub fn sign(
        &self,
        claims: &Claims,
        req: &SignRequest,
        trust_domain: &str,
        ttl: Duration,
    ) -> Result<SignResponse, Status> {
        let id = SpiffeId::new(trust_domain, &claims.namespace, &claims.service_account);
        let ca = self.ca();
        let chain = ca.sign_csr(&req.csr_pem, &id, ttl).map_err(|e| match e {
            CaError::WrongIdentity { .. } => {
                warn!(token = %claims.id, error = %e, "refused a CSR for another identity");
                Status::permission_denied(e.to_string())
            }
            other => Status::invalid_argument(other.to_string()),
        })?;
        Ok(SignResponse {
            certificate_chain_pem: chain,
            trust_bundle_pem: ca.bundle_pem().to_vec(),
            identity: id.to_string(),
        })
    }

    /// Makes a new root; returns the new bundle (old and new roots).
    pub fn rotate(&self, trust_domain: &str) -> Result<Vec<String>, CaError> {
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        ca.rotate(trust_domain)?;
        info!(root = %ca.root_fingerprint(), "rotated the root CA; the bundle trusts old and new roots");
        Ok(ca.bundle_pem().to_vec())
    }

    /// Stops trusting the old roots; returns the new bundle.
    pub fn retire(&self) -> Result<Vec<String>, CaError> {
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        ca.retire_old()?;
        info!(root = %ca.root_fingerprint(), "retired the old roots");
        Ok(ca.bundle_pem().to_vec())
    }
}
