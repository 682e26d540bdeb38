//! The control plane's CA and join tokens, as the proxy API and the HTTP
//! API use them. Both live in the store, so that every replica sharing it
//! signs with the same CA and accepts the same tokens:
//!
//! - `identity/ca`: the CA (signer certificate and key, trust bundle),
//!   sealed with the key-encryption key (`kek`);
//! - `identity/token-key`: the join-token signing key, sealed likewise;
//! - `identity/revoked/<id>`: one per revoked join token, read at every
//!   registration and CSR, so a revocation holds at once on every replica.
//!
//! Nothing secret is on disk: `<data-dir>/ca` (0700) holds only
//! `roots.pem`, the trust bundle, for clients of the HTTP API's mesh-CA
//! certificate. A CA and key that an older version kept there are moved
//! into the store on first start, and their files removed. Keys are never
//! logged.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tonic::Status;
use tracing::{info, warn};
use trellis_api::v1::{SignRequest, SignResponse};
use trellis_identity::ca::{Ca, CaError, CaMaterial};
use trellis_identity::token::{self, Claims, Grant, TokenAuthority, TokenError};
use trellis_identity::SpiffeId;

use crate::kek::{Kek, KekError};
use crate::store::{Store, StoreError};

const CA_KEY: &str = "identity/ca";
const TOKEN_KEY: &str = "identity/token-key";
const REVOKED: &str = "identity/revoked/";
/// The trust bundle, in `<data-dir>/ca`, for clients.
pub const ROOTS_FILE: &str = "roots.pem";
/// Tries of a CA change that lost to another replica's.
const SWAP_TRIES: usize = 5;

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
    store: Arc<dyn Store>,
    kek: Arc<Kek>,
    ca: RwLock<Ca>,
    /// The stored (sealed) value the CA in memory came from: what a change
    /// compares against, so that two replicas never overwrite each other.
    ca_sealed: RwLock<Vec<u8>>,
    tokens: TokenAuthority,
    roots_file: PathBuf,
    /// Held while `roots_file` is written, so the file ends with the CA
    /// installed last (a rotation and the reload it triggers both write).
    roots_write: std::sync::Mutex<()>,
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
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Kek(#[from] KekError),
    #[error("the stored {0} cannot be read; was it written by a newer Trellis?")]
    Corrupt(&'static str),
    #[error("--ca-cert and --ca-key go together: give both or neither")]
    HalfCa,
    #[error("another control plane replica changed the CA at the same time: try again")]
    Busy,
    #[error("cannot make {path} private (0700 folder, 0600 files): {source}")]
    Private {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Makes `dir` a 0700 folder whose files are 0600: the CA's certificates
/// are public, but nothing in here needs to be readable by anyone else, and
/// one rule is easier to check than a list.
fn make_private(dir: &Path) -> Result<(), IdentityError> {
    let err = |path: &Path| {
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

/// A sealed secret from the store, or `make`'s, stored unless another
/// replica stored one first (then that one). Returns it and its sealed form.
async fn shared_secret(
    store: &dyn Store,
    kek: &Kek,
    key: &str,
    make: impl FnOnce() -> Result<Vec<u8>, IdentityError>,
) -> Result<(Vec<u8>, Vec<u8>), IdentityError> {
    if let Some(sealed) = store.get_state(key).await? {
        return Ok((kek.open(key, &sealed)?, sealed));
    }
    let sealed = kek.seal(key, &make()?);
    if store.swap_state(key, None, sealed).await? {
        info!(
            key,
            "stored a new secret, sealed with the key-encryption key"
        );
    }
    // Read back: when another replica stored one first, its value won.
    let sealed = store
        .get_state(key)
        .await?
        .ok_or(IdentityError::Corrupt("secret"))?;
    Ok((kek.open(key, &sealed)?, sealed))
}

fn material_of(bytes: &[u8]) -> Result<CaMaterial, IdentityError> {
    serde_json::from_slice(bytes).map_err(|_| IdentityError::Corrupt("CA"))
}

impl MeshIdentity {
    /// Loads the CA and the join-token key from the store (moving those of
    /// an older version's `<data-dir>/ca` there first), or makes them.
    pub async fn open(
        data_dir: &Path,
        files: &CaFiles,
        store: Arc<dyn Store>,
        kek: Arc<Kek>,
    ) -> Result<MeshIdentity, IdentityError> {
        let dir = data_dir.join("ca");
        // Private before anything is written into it.
        make_private(&dir)?;
        let (legacy_key, legacy_revoked) = token::read_legacy(&dir);
        let legacy_ca = Ca::load_dir(&dir)?;

        let (secret, _) = shared_secret(&*store, &kek, TOKEN_KEY, || {
            Ok(legacy_key.unwrap_or_else(token::generate_key))
        })
        .await?;
        let tokens = TokenAuthority::new(&secret)?;
        for id in &legacy_revoked {
            store
                .put_state(&format!("{REVOKED}{id}"), revocation_record())
                .await?;
        }

        let (material, sealed) = match (&files.cert, &files.key) {
            (Some(cert), Some(key)) => {
                // The user's CA wins over a stored one: they asked for it.
                let m = Ca::from_files(cert, key, files.bundle.as_deref())?.material();
                let stored = match store.get_state(CA_KEY).await? {
                    Some(s) => Some((material_of(&kek.open(CA_KEY, &s)?)?, s)),
                    None => None,
                };
                match stored {
                    Some((old, sealed)) if old == m => (m, sealed),
                    _ => {
                        let sealed = kek.seal(
                            CA_KEY,
                            &serde_json::to_vec(&m).expect("CA material serializes"),
                        );
                        store.put_state(CA_KEY, sealed.clone()).await?;
                        (m, sealed)
                    }
                }
            }
            (None, None) => {
                let (plain, sealed) = shared_secret(&*store, &kek, CA_KEY, || {
                    let ca = match legacy_ca {
                        Some(ca) => ca,
                        None => Ca::generate("trellis.local")?,
                    };
                    Ok(serde_json::to_vec(&ca.material()).expect("CA material serializes"))
                })
                .await?;
                (material_of(&plain)?, sealed)
            }
            _ => return Err(IdentityError::HalfCa),
        };
        let ca = Ca::from_material(material)?;

        // The store holds them now: no secret stays on disk.
        for f in Ca::LEGACY_FILES.iter().chain(token::LEGACY_FILES.iter()) {
            let path = dir.join(f);
            if path.exists() {
                match std::fs::remove_file(&path) {
                    Ok(()) => {
                        info!(path = %path.display(), "moved into the store; removed the file")
                    }
                    Err(e) => {
                        warn!(path = %path.display(), error = %e, "cannot remove a file the store holds now")
                    }
                }
            }
        }
        let identity = MeshIdentity {
            store,
            kek,
            ca: RwLock::new(ca),
            ca_sealed: RwLock::new(sealed),
            tokens,
            roots_file: dir.join(ROOTS_FILE),
            roots_write: std::sync::Mutex::new(()),
            external: std::sync::OnceLock::new(),
        };
        identity.write_roots()?;
        info!(root = %identity.pin(), roots = identity.bundle().len(), "CA ready");
        Ok(identity)
    }

    fn ca(&self) -> std::sync::RwLockReadGuard<'_, Ca> {
        self.ca.read().unwrap_or_else(|e| e.into_inner())
    }

    /// `<data-dir>/ca/roots.pem`: what clients of the HTTP API trust.
    fn write_roots(&self) -> Result<(), IdentityError> {
        let _one_writer = self.roots_write.lock().unwrap_or_else(|e| e.into_inner());
        let roots = self.bundle().concat();
        trellis_identity::write_secret(&self.roots_file, roots.as_bytes()).map_err(|source| {
            IdentityError::Private {
                path: self.roots_file.clone(),
                source,
            }
        })
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

    /// Revokes a join token on every replica, from the next registration
    /// or CSR on.
    pub async fn revoke(&self, id: &str) -> Result<(), IdentityError> {
        self.store
            .put_state(&format!("{REVOKED}{id}"), revocation_record())
            .await?;
        Ok(())
    }

    /// The ids of revoked join tokens.
    pub async fn revoked(&self) -> Result<Vec<String>, IdentityError> {
        Ok(self
            .store
            .list_state(REVOKED)
            .await?
            .into_iter()
            .filter_map(|(k, _)| k.strip_prefix(REVOKED).map(str::to_string))
            .collect())
    }

    /// Forgets a revocation (its token expired: it is refused anyway).
    pub async fn forget_revocation(&self, id: &str) -> Result<(), IdentityError> {
        self.store.delete_state(&format!("{REVOKED}{id}")).await?;
        Ok(())
    }

    /// Checks a proxy's token; the error is what the proxy is told.
    pub async fn verify_token(&self, token: &str) -> Result<Claims, Status> {
        if token.is_empty() {
            return Err(Status::unauthenticated(
                "a join token is required: create one with `trellis token create --namespace NS --service-account SA` and give it with --token-file",
            ));
        }
        let claims = self.tokens.verify(token).map_err(|e| {
            warn!(error = %e, "refused a join token");
            Status::unauthenticated(e.to_string())
        })?;
        match self
            .store
            .get_state(&format!("{REVOKED}{}", claims.id))
            .await
        {
            Ok(None) => Ok(claims),
            Ok(Some(_)) => {
                let e = TokenError::Revoked(claims.id);
                warn!(error = %e, "refused a join token");
                Err(Status::unauthenticated(e.to_string()))
            }
            Err(e) => Err(Status::unavailable(format!(
                "cannot check whether the join token was revoked: {e}"
            ))),
        }
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
            None => self.verify_token(token).await,
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

    /// Changes the CA with `change`, unless another replica changed it
    /// first (then on top of theirs); returns the new bundle.
    async fn change_ca(
        &self,
        change: impl Fn(&mut Ca) -> Result<(), CaError>,
    ) -> Result<Vec<String>, IdentityError> {
        for _ in 0..SWAP_TRIES {
            let expected = self
                .ca_sealed
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let mut ca = Ca::from_material(self.ca().material())?;
            change(&mut ca)?;
            let sealed = self.kek.seal(
                CA_KEY,
                &serde_json::to_vec(&ca.material()).expect("CA material serializes"),
            );
            if self
                .store
                .swap_state(CA_KEY, Some(&expected), sealed.clone())
                .await?
            {
                self.install(ca, sealed)?;
                return Ok(self.bundle());
            }
            self.reload().await?;
        }
        Err(IdentityError::Busy)
    }

    fn install(&self, ca: Ca, sealed: Vec<u8>) -> Result<(), IdentityError> {
        *self.ca.write().unwrap_or_else(|e| e.into_inner()) = ca;
        *self.ca_sealed.write().unwrap_or_else(|e| e.into_inner()) = sealed;
        self.write_roots()
    }

    /// Makes a new root; returns the new bundle (old and new roots).
    pub async fn rotate(&self, trust_domain: &str) -> Result<Vec<String>, IdentityError> {
        let bundle = self.change_ca(|ca| ca.rotate(trust_domain)).await?;
        info!(root = %self.pin(), "rotated the root CA; the bundle trusts old and new roots");
        Ok(bundle)
    }

    /// Stops trusting the old roots; returns the new bundle.
    pub async fn retire(&self) -> Result<Vec<String>, IdentityError> {
        let bundle = self.change_ca(Ca::retire_old).await?;
        info!(root = %self.pin(), "retired the old roots");
        Ok(bundle)
    }

    /// Reads the CA again (another replica may have rotated it); whether
    /// it changed.
    pub async fn reload(&self) -> Result<bool, IdentityError> {
        let Some(sealed) = self.store.get_state(CA_KEY).await? else {
            return Ok(false);
        };
        if *self.ca_sealed.read().unwrap_or_else(|e| e.into_inner()) == sealed {
            return Ok(false);
        }
        let ca = Ca::from_material(material_of(&self.kek.open(CA_KEY, &sealed)?)?)?;
        self.install(ca, sealed)?;
        info!(root = %self.pin(), "the CA changed in the store; using it");
        Ok(true)
    }

    /// The store key of the CA: its changes are the ones to reload on.
    pub fn is_ca_key(key: &str) -> bool {
        key == CA_KEY
    }
}

fn revocation_record() -> Vec<u8> {
    let at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::to_vec(&serde_json::json!({ "revokedAt": at })).expect("json serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn setup(dir: &Path) -> (Arc<dyn Store>, Arc<Kek>) {
        let store: Arc<dyn Store> = Arc::new(
            crate::store::RedbStore::open(dir.join("store.redb"))
                .await
                .unwrap(),
        );
        (store, Arc::new(Kek::from_bytes(&[3; 32])))
    }

    #[tokio::test]
    async fn replicas_on_one_store_share_the_ca_and_the_token_key() {
        let dir = tempfile::tempdir().unwrap();
        let (store, kek) = setup(dir.path()).await;
        let a = MeshIdentity::open(
            &dir.path().join("a"),
            &CaFiles::default(),
            store.clone(),
            kek.clone(),
        )
        .await
        .unwrap();
        let b = MeshIdentity::open(
            &dir.path().join("b"),
            &CaFiles::default(),
            store.clone(),
            kek.clone(),
        )
        .await
        .unwrap();
        assert_eq!(a.pin(), b.pin());
        // A token made at A is good at B; revoked at B, refused at A.
        let (token, claims) = a.create_token(&Grant::new("prod", "web"), Duration::from_secs(60));
        assert_eq!(b.verify_token(&token).await.unwrap(), claims);
        b.revoke(&claims.id).await.unwrap();
        let e = a.verify_token(&token).await.unwrap_err();
        assert!(e.message().contains("revoked"), "{}", e.message());
        // A rotation at A reaches B on reload; B's own change then builds on it.
        a.rotate("trellis.local").await.unwrap();
        assert!(b.reload().await.unwrap());
        assert_eq!(a.pin(), b.pin());
        assert_eq!(b.bundle().len(), 2);
        // B rotates from a stale copy: it loses the swap, reloads, and wins
        // on top of A's, so nothing A did is lost.
        a.rotate("trellis.local").await.unwrap();
        let bundle = b.rotate("trellis.local").await.unwrap();
        assert_eq!(bundle.len(), 4);
        // Secrets are sealed in the store; only the public roots are on disk.
        let sealed = store.get_state(CA_KEY).await.unwrap().unwrap();
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));
        let files: Vec<String> = std::fs::read_dir(dir.path().join("a/ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(files, [ROOTS_FILE]);
        // Another KEK cannot open them.
        let other = Arc::new(Kek::from_bytes(&[4; 32]));
        let e = MeshIdentity::open(&dir.path().join("c"), &CaFiles::default(), store, other)
            .await
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("same --kek-file"), "{e}");
    }

    #[tokio::test]
    async fn an_older_versions_files_move_into_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let (store, kek) = setup(dir.path()).await;
        let ca_dir = dir.path().join("data/ca");
        std::fs::create_dir_all(&ca_dir).unwrap();
        let old = Ca::generate("trellis.local").unwrap();
        let m = old.material();
        std::fs::write(ca_dir.join("roots.pem"), m.roots_pem.concat()).unwrap();
        std::fs::write(ca_dir.join("signer.pem"), &m.signer_cert_pem).unwrap();
        std::fs::write(ca_dir.join("signer.key"), &m.signer_key_pem).unwrap();
        let key = token::generate_key();
        std::fs::write(ca_dir.join("token.key"), &key).unwrap();
        std::fs::write(ca_dir.join("revoked.json"), r#"["0123456789abcdef"]"#).unwrap();
        let old_tokens = TokenAuthority::new(&key).unwrap();
        let (token, _) = old_tokens.create(&Grant::new("a", "b"), Duration::from_secs(60), "x");

        let id = MeshIdentity::open(&dir.path().join("data"), &CaFiles::default(), store, kek)
            .await
            .unwrap();
        assert_eq!(id.pin(), old.root_fingerprint());
        assert!(
            id.verify_token(&token).await.is_ok(),
            "the old key still verifies"
        );
        assert_eq!(id.revoked().await.unwrap(), ["0123456789abcdef"]);
        for f in ["signer.key", "signer.pem", "token.key", "revoked.json"] {
            assert!(!ca_dir.join(f).exists(), "{f} is gone");
        }
        assert!(ca_dir.join("roots.pem").exists());
    }
}
