//! Who may use the HTTP API.
//!
//! Every route but `/healthz`, `/readyz` and the dashboard's static page
//! needs a bearer credential with a role (see `access`). API tokens are
//! `trellis-api.<id>.<secret>`: the id finds the record, the secret is 32
//! random bytes of which the store keeps only the SHA-256. Records live in
//! the store's state values (one key per token), so every replica sharing
//! a store accepts the same credentials, and a revocation holds at once
//! everywhere: each request reads the record.
//!
//! The control plane's own admin token (`<data-dir>/admin-token`, 0600) is
//! registered here on start; it is how `trellis up`, `demo` and an
//! operator on the host get in.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::Method;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::metrics::Metrics;
use crate::store::{Store, StoreError};

/// The file under the data dir that holds the bootstrap admin token.
pub const ADMIN_TOKEN_FILE: &str = "admin-token";
const PREFIX: &str = "trellis-api";
/// State keys: one per API token, one per join token made over the API.
const API_KEYS: &str = "auth/api-token/";
const JOIN_KEYS: &str = "auth/join-token/";

/// What a credential may do. Each role includes the ones before it:
/// tap sees what viewers see, admins everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read resources, services, proxies, stat, edges, traces, metrics,
    /// Prometheus discovery, the CA's public roots.
    Viewer,
    /// And live request metadata (`/api/v1/tap`): paths, identities.
    Tap,
    /// And every write: resources, tokens, the CA, span ingest.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Tap => "tap",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "tap" => Some(Role::Tap),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Public,
    Needs(Role),
}

/// The role each route needs, by method and route template. Anything not
/// listed needs admin, so a route added without thought fails closed.
pub fn access(method: &Method, route: Option<&str>) -> Access {
    let read = *method == Method::GET || *method == Method::HEAD;
    let Some(route) = route else {
        // No route matched: the answer is a 404, which viewers may see.
        return Access::Needs(Role::Viewer);
    };
    match route {
        "/healthz" | "/readyz" => Access::Public,
        // The dashboard's page, script and style hold no data, and a
        // browser loads them before it can send a credential.
        "/" | "/dashboard.js" | "/dashboard.css" if read => Access::Public,
        "/api/v1/tap" if read => Access::Needs(Role::Tap),
        "/metrics"
        | "/api/v1/resources/{kind}"
        | "/api/v1/resources/{kind}/{namespace}/{name}"
        | "/api/v1/services"
        | "/api/v1/proxies"
        | "/api/v1/stat"
        | "/api/v1/prometheus/targets"
        | "/api/v1/edges"
        | "/api/v1/traces"
        | "/api/v1/traces/{id}"
        | "/api/v1/ca"
            if read =>
        {
            Access::Needs(Role::Viewer)
        }
        _ => Access::Needs(Role::Admin),
    }
}

/// An API token's record. The secret is not in it, only its SHA-256.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiToken {
    pub id: String,
    pub role: Role,
    /// Unix seconds.
    pub created_at: u64,
    pub expires_at: Option<u64>,
    #[serde(default)]
    pub revoked_at: Option<u64>,
    /// Hex SHA-256 of the secret.
    sha256: String,
    #[serde(default)]
    pub description: String,
}

/// A join token made over the API, kept so `trellis token list` can show
/// it (the token itself is verified by its signature, not by this record).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinToken {
    pub id: String,
    pub namespace: String,
    pub service_account: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub advertise_addr: Option<std::net::IpAddr>,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default)]
    pub revoked_at: Option<u64>,
}

/// Who made a request: the token's id and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub id: String,
    pub role: Role,
    /// A credential someone else vouched for (`ExternalCredentials`),
    /// kept so a long stream can have it checked again.
    pub external: Option<ExternalCredential>,
}

/// A credential that is not a Trellis API token; its Debug never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ExternalCredential(String);

impl std::fmt::Debug for ExternalCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExternalCredential(..)")
    }
}

/// Who vouches for a bearer credential that is not a Trellis API token.
/// On Kubernetes: the API server, through a TokenReview of a
/// ServiceAccount token made for the CLI (`trellis-viewer`, `trellis-tap`).
#[tonic::async_trait]
pub trait ExternalCredentials: Send + Sync {
    /// The id (for logs; never the credential) and role `token` grants;
    /// the error says what to do.
    async fn review(&self, token: &str) -> Result<(String, Role), String>;
}

/// Why a request was refused. Messages say what to do; none carries the
/// secret.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("this needs a credential: send `Authorization: Bearer TOKEN` (the CLI takes --token-file FILE or TRELLIS_TOKEN, and finds the local mesh's own); make one with `trellis token create --role viewer|tap|admin`")]
    Missing,
    #[error("the credential is not a Trellis API token (trellis-api.<id>.<secret>; join tokens are for proxies): make one with `trellis token create --role viewer|tap|admin`")]
    Malformed,
    #[error("the credential is not known to this control plane: make one with `trellis token create --role viewer|tap|admin`")]
    Unknown,
    #[error("the credential {id} expired at {at} (unix seconds): make a new one with `trellis token create --role ...`")]
    Expired { id: String, at: u64 },
    #[error(
        "the credential {id} was revoked: make a new one with `trellis token create --role ...`"
    )]
    Revoked { id: String },
    #[error("this needs the {needed} role, and the credential {id} has {has}: use a token made with `trellis token create --role {needed}`")]
    Forbidden { id: String, has: Role, needed: Role },
    #[error("{0}")]
    Refused(String),
    #[error("cannot check the credential: {0}")]
    Store(#[from] StoreError),
    #[error("the stored token record {0} cannot be read")]
    Corrupt(String),
}

impl AuthError {
    /// The `reason` label of `trellis_control_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::Malformed => "malformed",
            AuthError::Unknown => "unknown",
            AuthError::Expired { .. } => "expired",
            AuthError::Revoked { .. } => "revoked",
            AuthError::Forbidden { .. } => "forbidden",
            AuthError::Refused(_) => "refused",
            AuthError::Store(_) | AuthError::Corrupt(_) => "error",
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS random source works");
    hex(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn sha256_hex(secret: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, secret.as_bytes()).as_ref())
}

/// `trellis-api.<id>.<secret>` → (id, secret).
fn split(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix(PREFIX)?.strip_prefix('.')?;
    let (id, secret) = rest.split_once('.')?;
    let hexy = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hexy(id, 16) && hexy(secret, 64)).then_some((id, secret))
}

/// API tokens in the store, and the checks of every request.
pub struct Auth {
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    external: std::sync::OnceLock<Arc<dyn ExternalCredentials>>,
}

impl Auth {
    pub fn new(store: Arc<dyn Store>, metrics: Arc<Metrics>) -> Auth {
        Auth {
            store,
            metrics,
            external: std::sync::OnceLock::new(),
        }
    }

    /// Accepts credentials `external` vouches for, beside API tokens.
    pub fn set_external(&self, external: Arc<dyn ExternalCredentials>) {
        let _ = self.external.set(external);
    }

    /// Makes a token; returns it (shown once, never stored) and its record.
    pub async fn create(
        &self,
        role: Role,
        ttl: Option<Duration>,
        description: &str,
    ) -> Result<(String, ApiToken), AuthError> {
        let (id, secret) = (random_hex(8), random_hex(32));
        let created_at = now();
        let record = ApiToken {
            id: id.clone(),
            role,
            created_at,
            expires_at: ttl.map(|t| created_at + t.as_secs()),
            revoked_at: None,
            sha256: sha256_hex(&secret),
            description: description.to_string(),
        };
        self.put(&record).await?;
        Ok((format!("{PREFIX}.{id}.{secret}"), record))
    }

    async fn put(&self, record: &ApiToken) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec(record).expect("token records serialize");
        self.store
            .put_state(&format!("{API_KEYS}{}", record.id), bytes)
            .await?;
        Ok(())
    }

    async fn get(&self, id: &str) -> Result<Option<ApiToken>, AuthError> {
        let Some(bytes) = self.store.get_state(&format!("{API_KEYS}{id}")).await? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|_| AuthError::Corrupt(id.to_string()))
    }

    /// Checks an `Authorization` header value; returns who it is.
    pub async fn verify(&self, header: Option<&str>) -> Result<Principal, AuthError> {
        let header = header.map(str::trim).filter(|h| !h.is_empty());
        let Some(header) = header else {
            return Err(AuthError::Missing);
        };
        let token = match header.split_once(' ') {
            Some((scheme, t)) if scheme.eq_ignore_ascii_case("bearer") => t.trim(),
            _ => return Err(AuthError::Malformed),
        };
        let Some((id, secret)) = split(token) else {
            return match self.external.get() {
                Some(_) if token.starts_with(PREFIX) => Err(AuthError::Malformed),
                Some(external) => {
                    let (id, role) = external.review(token).await.map_err(AuthError::Refused)?;
                    Ok(Principal {
                        id,
                        role,
                        external: Some(ExternalCredential(token.to_string())),
                    })
                }
                None => Err(AuthError::Malformed),
            };
        };
        let record = self.get(id).await?.ok_or(AuthError::Unknown)?;
        let given = sha256_hex(secret);
        if !bool::from(given.as_bytes().ct_eq(record.sha256.as_bytes())) {
            // The same answer as an unknown id: a guess learns nothing.
            return Err(AuthError::Unknown);
        }
        check_live(&record)?;
        Ok(Principal {
            id: record.id,
            role: record.role,
            external: None,
        })
    }

    /// Whether a credential checked earlier is still good (long streams
    /// check again, so a revocation ends them too).
    pub async fn still_valid(&self, who: &Principal) -> Result<(), AuthError> {
        if let Some(ExternalCredential(token)) = &who.external {
            let external = self.external.get().ok_or(AuthError::Unknown)?;
            let (_, role) = external.review(token).await.map_err(AuthError::Refused)?;
            return if role >= who.role {
                Ok(())
            } else {
                Err(AuthError::Forbidden {
                    id: who.id.clone(),
                    has: role,
                    needed: who.role,
                })
            };
        }
        let record = self.get(&who.id).await?.ok_or(AuthError::Unknown)?;
        check_live(&record)
    }

    /// Counts a refusal.
    pub fn failed(&self, e: &AuthError) {
        self.metrics.auth_failure(e.reason());
    }

    /// Revokes an API token; `None` when no API token has that id.
    pub async fn revoke(&self, id: &str) -> Result<Option<ApiToken>, AuthError> {
        let Some(mut record) = self.get(id).await? else {
            return Ok(None);
        };
        if record.revoked_at.is_none() {
            record.revoked_at = Some(now());
            self.put(&record).await?;
        }
        Ok(Some(record))
    }

    pub async fn list(&self) -> Result<Vec<ApiToken>, AuthError> {
        list(&*self.store, API_KEYS).await
    }

    /// Keeps a join token's record for `token list`.
    pub async fn record_join(&self, record: &JoinToken) -> Result<(), AuthError> {
        let bytes = serde_json::to_vec(record).expect("token records serialize");
        self.store
            .put_state(&format!("{JOIN_KEYS}{}", record.id), bytes)
            .await?;
        Ok(())
    }

    /// Marks a join token's record revoked (if there is one).
    pub async fn revoke_join(&self, id: &str) -> Result<(), AuthError> {
        let key = format!("{JOIN_KEYS}{id}");
        let Some(bytes) = self.store.get_state(&key).await? else {
            return Ok(());
        };
        let mut record: JoinToken =
            serde_json::from_slice(&bytes).map_err(|_| AuthError::Corrupt(id.to_string()))?;
        if record.revoked_at.is_none() {
            record.revoked_at = Some(now());
            self.record_join(&record).await?;
        }
        Ok(())
    }

    pub async fn list_join(&self) -> Result<Vec<JoinToken>, AuthError> {
        list(&*self.store, JOIN_KEYS).await
    }

    /// Deletes the records of tokens that expired more than `grace` ago
    /// (they are refused anyway; the grace keeps them in `token list` for a
    /// while). Returns the ids of the join tokens whose records went, so
    /// that their revocations can go too. A singleton duty: one replica
    /// does it for all.
    pub async fn remove_expired(&self, grace: Duration) -> Result<Vec<String>, AuthError> {
        let before = now().saturating_sub(grace.as_secs());
        let mut joins = Vec::new();
        for t in self.list().await? {
            if t.expires_at.is_some_and(|at| at < before) {
                self.store
                    .delete_state(&format!("{API_KEYS}{}", t.id))
                    .await?;
            }
        }
        for t in self.list_join().await? {
            if t.expires_at < before {
                self.store
                    .delete_state(&format!("{JOIN_KEYS}{}", t.id))
                    .await?;
                joins.push(t.id);
            }
        }
        Ok(joins)
    }

    /// Registers the control plane's own admin token, kept in
    /// `<data_dir>/admin-token` (0600), and returns it. A file whose token
    /// is unknown to the store, revoked, expired, or of an older format is
    /// replaced by a new token.
    pub async fn bootstrap(&self, data_dir: &Path) -> Result<String, BootstrapError> {
        let path = data_dir.join(ADMIN_TOKEN_FILE);
        let io = |source| BootstrapError::Io {
            path: path.clone(),
            source,
        };
        let existing = match std::fs::read_to_string(&path) {
            Ok(t) => Some(t.trim().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(e)),
        };
        if let Some(token) = existing {
            match self.verify(Some(&format!("Bearer {token}"))).await {
                Ok(p) if p.role == Role::Admin => {
                    // Tighten a file left readable by an older version.
                    set_mode(&path, 0o600).map_err(io)?;
                    return Ok(token);
                }
                Ok(_) | Err(AuthError::Malformed | AuthError::Unknown) => {}
                Err(e @ (AuthError::Revoked { .. } | AuthError::Expired { .. })) => {
                    tracing::warn!(reason = e.reason(), path = %path.display(), "the admin token file holds a dead token; making a new one");
                }
                Err(e) => return Err(BootstrapError::Auth(e)),
            }
        }
        let description = format!("bootstrap admin token ({})", path.display());
        let (token, record) = self
            .create(Role::Admin, None, &description)
            .await
            .map_err(BootstrapError::Auth)?;
        trellis_identity::write_secret(&path, token.as_bytes()).map_err(io)?;
        tracing::info!(id = %record.id, path = %path.display(), "made the bootstrap admin token");
        Ok(token)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("cannot keep the admin token in {path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot register the admin token: {0}")]
    Auth(AuthError),
}

fn check_live(record: &ApiToken) -> Result<(), AuthError> {
    if record.revoked_at.is_some() {
        return Err(AuthError::Revoked {
            id: record.id.clone(),
        });
    }
    match record.expires_at {
        Some(at) if at <= now() => Err(AuthError::Expired {
            id: record.id.clone(),
            at,
        }),
        _ => Ok(()),
    }
}

async fn list<T: serde::de::DeserializeOwned>(
    store: &dyn Store,
    prefix: &str,
) -> Result<Vec<T>, AuthError> {
    store
        .list_state(prefix)
        .await?
        .into_iter()
        .map(|(k, v)| serde_json::from_slice(&v).map_err(|_| AuthError::Corrupt(k)))
        .collect()
}

/// Sets a file's or folder's permission bits.
pub fn set_mode(path: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn auth(dir: &tempfile::TempDir) -> Auth {
        let store = crate::RedbStore::open(dir.path().join("store.redb"))
            .await
            .unwrap();
        Auth::new(Arc::new(store), Arc::new(Metrics::new()))
    }

    fn bearer(t: &str) -> String {
        format!("Bearer {t}")
    }

    /// Vouches for `sa-viewer` and `sa-tap` until told otherwise, and
    /// counts what it was asked.
    struct FakeReviewer {
        asked: std::sync::Mutex<Vec<String>>,
        tap_role: std::sync::Mutex<Role>,
    }

    #[tonic::async_trait]
    impl ExternalCredentials for FakeReviewer {
        async fn review(&self, token: &str) -> Result<(String, Role), String> {
            self.asked.lock().unwrap().push(token.to_string());
            match token {
                "sa-viewer" => Ok(("k8s:viewer".into(), Role::Viewer)),
                "sa-tap" => Ok(("k8s:tap".into(), *self.tap_role.lock().unwrap())),
                _ => Err("the API server did not authenticate the token".into()),
            }
        }
    }

    #[tokio::test]
    async fn external_credentials_are_reviewed_and_checked_again_on_long_streams() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir).await;
        // Without a reviewer, anything but an API token is malformed.
        assert!(matches!(
            auth.verify(Some(&bearer("sa-viewer"))).await,
            Err(AuthError::Malformed)
        ));
        let reviewer = Arc::new(FakeReviewer {
            asked: Default::default(),
            tap_role: std::sync::Mutex::new(Role::Tap),
        });
        auth.set_external(reviewer.clone());
        let who = auth.verify(Some(&bearer("sa-tap"))).await.unwrap();
        assert_eq!((who.id.as_str(), who.role), ("k8s:tap", Role::Tap));
        // The credential is kept for re-checks, and never printed.
        assert!(!format!("{who:?}").contains("sa-tap"));
        assert!(auth.still_valid(&who).await.is_ok());
        *reviewer.tap_role.lock().unwrap() = Role::Viewer;
        assert!(matches!(
            auth.still_valid(&who).await,
            Err(AuthError::Forbidden { .. })
        ));
        let e = auth.verify(Some(&bearer("stranger"))).await.unwrap_err();
        assert_eq!(e.reason(), "refused");
        assert!(e.to_string().contains("did not authenticate"), "{e}");
        // A Trellis API token, even a mangled one, never goes to the reviewer.
        let (token, _) = auth.create(Role::Viewer, None, "t").await.unwrap();
        assert_eq!(
            auth.verify(Some(&bearer(&token))).await.unwrap().external,
            None
        );
        assert!(matches!(
            auth.verify(Some(&bearer("trellis-api.zz.zz"))).await,
            Err(AuthError::Malformed)
        ));
        assert_eq!(
            *reviewer.asked.lock().unwrap(),
            ["sa-tap", "sa-tap", "sa-tap", "stranger"]
        );
    }

    #[tokio::test]
    async fn tokens_verify_until_revoked_or_expired() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir).await;
        let (token, record) = auth.create(Role::Tap, None, "t").await.unwrap();
        let who = auth.verify(Some(&bearer(&token))).await.unwrap();
        assert_eq!(who.role, Role::Tap);
        // The store keeps a hash, never the secret.
        let (_, secret) = split(&token).unwrap();
        for r in auth.list().await.unwrap() {
            assert!(!serde_json::to_string(&r).unwrap().contains(secret));
        }

        let mut wrong = token.clone();
        wrong.replace_range(
            wrong.len() - 1..,
            if token.ends_with('0') { "1" } else { "0" },
        );
        assert!(matches!(
            auth.verify(Some(&bearer(&wrong))).await,
            Err(AuthError::Unknown)
        ));
        for bad in ["", "Bearer", "Basic abc", "Bearer trellis1.a.b", "Bearer x"] {
            let e = auth.verify(Some(bad)).await.unwrap_err();
            assert!(
                matches!(e, AuthError::Missing | AuthError::Malformed),
                "{bad}: {e}"
            );
        }

        auth.revoke(&record.id).await.unwrap().unwrap();
        assert!(matches!(
            auth.verify(Some(&bearer(&token))).await,
            Err(AuthError::Revoked { .. })
        ));
        assert!(auth.still_valid(&who).await.is_err());

        let (expired, _) = auth
            .create(Role::Admin, Some(Duration::ZERO), "t")
            .await
            .unwrap();
        assert!(matches!(
            auth.verify(Some(&bearer(&expired))).await,
            Err(AuthError::Expired { .. })
        ));
    }

    #[tokio::test]
    async fn the_bootstrap_token_is_kept_and_replaced_when_dead() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir).await;
        let t1 = auth.bootstrap(dir.path()).await.unwrap();
        assert_eq!(auth.bootstrap(dir.path()).await.unwrap(), t1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(ADMIN_TOKEN_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        let (id, _) = split(&t1).unwrap();
        auth.revoke(id).await.unwrap();
        let t2 = auth.bootstrap(dir.path()).await.unwrap();
        assert_ne!(t1, t2);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(ADMIN_TOKEN_FILE)).unwrap(),
            t2
        );

        // The hex token of older versions is replaced too.
        std::fs::write(dir.path().join(ADMIN_TOKEN_FILE), "ab".repeat(32)).unwrap();
        let t3 = auth.bootstrap(dir.path()).await.unwrap();
        assert!(t3.starts_with("trellis-api."));
    }

    #[tokio::test]
    async fn expired_records_are_removed_after_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let auth = auth(&dir).await;
        let (_, dead) = auth
            .create(Role::Viewer, Some(Duration::ZERO), "t")
            .await
            .unwrap();
        let (_, live) = auth
            .create(Role::Viewer, Some(Duration::from_secs(3600)), "t")
            .await
            .unwrap();
        let join = |id: &str, expires_at| JoinToken {
            id: id.into(),
            namespace: "a".into(),
            service_account: "b".into(),
            labels: Default::default(),
            advertise_addr: None,
            created_at: 0,
            expires_at,
            revoked_at: None,
        };
        auth.record_join(&join("aa", now())).await.unwrap();
        auth.record_join(&join("bb", now() + 3600)).await.unwrap();
        // Within the grace, nothing goes.
        assert!(auth
            .remove_expired(Duration::from_secs(3600))
            .await
            .unwrap()
            .is_empty());
        assert_eq!(auth.list().await.unwrap().len(), 2);
        // Past it, only the expired ones.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(auth.remove_expired(Duration::ZERO).await.unwrap(), ["aa"]);
        let ids: Vec<String> = auth
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|t| t.id)
            .collect();
        assert_eq!(ids, [live.id]);
        assert_ne!(dead.id, ids[0]);
        assert_eq!(auth.list_join().await.unwrap()[0].id, "bb");
    }

    #[test]
    fn unlisted_routes_need_admin() {
        assert_eq!(access(&Method::GET, Some("/healthz")), Access::Public);
        assert_eq!(
            access(&Method::GET, Some("/api/v1/services")),
            Access::Needs(Role::Viewer)
        );
        assert_eq!(
            access(&Method::POST, Some("/api/v1/services")),
            Access::Needs(Role::Admin)
        );
        assert_eq!(
            access(&Method::GET, Some("/api/v1/something-new")),
            Access::Needs(Role::Admin)
        );
        assert!(Role::Admin > Role::Tap && Role::Tap > Role::Viewer);
    }
}
