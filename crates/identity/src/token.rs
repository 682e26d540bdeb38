//! Join tokens: `trellis1.<claims>.<mac>`, where claims are base64url JSON
//! (namespace, service account, the labels the proxy may serve, the
//! address it may advertise, expiry, id, the pinned CA root) and mac is
//! HMAC-SHA256 over them with a key that never leaves the control plane.
//! A token grants exactly one identity and one set of labels; revoked ids
//! are refused.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::write_secret;

const PREFIX: &str = "trellis1";
const KEY_FILE: &str = "token.key";
const REVOKED_FILE: &str = "revoked.json";

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("the token is malformed: expected trellis1.<claims>.<signature>")]
    Malformed,
    #[error("the token's signature is wrong: it was not made by this control plane")]
    BadSignature,
    #[error(
        "the token expired at {0} (unix seconds): create a new one with `trellis token create`"
    )]
    Expired(u64),
    #[error("the token {0} was revoked")]
    Revoked(String),
    #[error("cannot keep token state in {0}: {1}")]
    Io(String, String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub id: String,
    #[serde(rename = "ns")]
    pub namespace: String,
    #[serde(rename = "sa")]
    pub service_account: String,
    /// The labels a proxy with this token may register with (it may claim
    /// fewer): labels decide which Services a proxy is an endpoint of.
    #[serde(default, rename = "l", skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// An IP the proxy may advertise besides the one it connects from.
    #[serde(default, rename = "addr", skip_serializing_if = "Option::is_none")]
    pub advertise_addr: Option<IpAddr>,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// SHA-256 of the CA root the control plane's TLS chains to.
    pub ca: String,
}

/// What a join token grants: an identity, the labels its proxy may serve
/// and, optionally, an address it may advertise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grant {
    pub namespace: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub advertise_addr: Option<IpAddr>,
}

impl Grant {
    /// A grant of an identity, with no labels.
    pub fn new(namespace: &str, service_account: &str) -> Grant {
        Grant {
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            ..Grant::default()
        }
    }

    pub fn with_labels<K: ToString, V: ToString>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Grant {
        self.labels = labels
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self
    }

    pub fn with_advertise_addr(mut self, ip: IpAddr) -> Grant {
        self.advertise_addr = Some(ip);
        self
    }

    /// Checks names and labels; the error says which one is wrong.
    pub fn check(&self) -> Result<(), String> {
        if !dns_label(&self.namespace) || !dns_label(&self.service_account) {
            return Err(
                "namespace and serviceAccount must be DNS labels (lower-case letters, digits, '-')"
                    .into(),
            );
        }
        for (k, v) in &self.labels {
            if !label_key(k) || !label_value(v) {
                return Err(format!(
                    "label {k}={v}: keys are [prefix/]name and values up to 63 letters, digits, '-', '_' or '.'"
                ));
            }
        }
        Ok(())
    }
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Kubernetes label values: at most 63 of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
fn label_value(s: &str) -> bool {
    s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && s.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && s.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric())
}

/// Kubernetes label keys: an optional DNS-name prefix and `/`, then a name.
fn label_key(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let prefix_ok = prefix.is_none_or(|p| {
        !p.is_empty()
            && p.len() <= 253
            && p.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
    });
    prefix_ok && !name.is_empty() && label_value(name)
}

impl Claims {
    /// Reads the claims without checking the signature: what a proxy does
    /// to learn the CA pin. Never use this to grant anything.
    pub fn peek(token: &str) -> Result<Claims, TokenError> {
        let mut parts = token.trim().split('.');
        let (Some(PREFIX), Some(claims), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed);
        };
        let bytes = B64.decode(claims).map_err(|_| TokenError::Malformed)?;
        serde_json::from_slice(&bytes).map_err(|_| TokenError::Malformed)
    }
}

pub struct TokenAuthority {
    key: hmac::Key,
    revoked: RwLock<BTreeSet<String>>,
    dir: PathBuf,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl TokenAuthority {
    /// Loads (or makes, 0600) the signing key and the revocation list in `dir`.
    pub fn load_or_create(dir: &Path) -> Result<TokenAuthority, TokenError> {
        let err = |e: std::io::Error| TokenError::Io(dir.display().to_string(), e.to_string());
        std::fs::create_dir_all(dir).map_err(err)?;
        let key_path = dir.join(KEY_FILE);
        let secret = match std::fs::read(&key_path) {
            Ok(s) if s.len() >= 32 => s,
            _ => {
                let mut s = vec![0u8; 32];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s).map_err(
                    |_| TokenError::Io(dir.display().to_string(), "no randomness".into()),
                )?;
                write_secret(&key_path, &s).map_err(err)?;
                s
            }
        };
        let revoked = std::fs::read(dir.join(REVOKED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        Ok(TokenAuthority {
            key: hmac::Key::new(hmac::HMAC_SHA256, &secret),
            revoked: RwLock::new(revoked),
            dir: dir.to_path_buf(),
        })
    }

    pub fn create(&self, grant: &Grant, ttl: Duration, ca: &str) -> (String, Claims) {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        let claims = Claims {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            namespace: grant.namespace.clone(),
            service_account: grant.service_account.clone(),
            labels: grant.labels.clone(),
            advertise_addr: grant.advertise_addr,
            exp: now() + ttl.as_secs(),
            ca: ca.to_string(),
        };
        let body = B64.encode(serde_json::to_vec(&claims).expect("claims serialize"));
        let signed = format!("{PREFIX}.{body}");
        let mac = B64.encode(hmac::sign(&self.key, signed.as_bytes()).as_ref());
        (format!("{signed}.{mac}"), claims)
    }

    /// Checks signature, expiry and revocation; returns what the token grants.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        let (signed, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        let claims = Claims::peek(token)?;
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        if claims.exp <= now() {
            return Err(TokenError::Expired(claims.exp));
        }
        if self
            .revoked
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&claims.id)
        {
            return Err(TokenError::Revoked(claims.id));
        }
        Ok(claims)
    }

    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        let mut revoked = self.revoked.write().unwrap_or_else(|e| e.into_inner());
        revoked.insert(id.to_string());
        let bytes = serde_json::to_vec(&*revoked).expect("a set of strings serializes");
        write_secret(&self.dir.join(REVOKED_FILE), &bytes)
            .map_err(|e| TokenError::Io(self.dir.display().to_string(), e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_exactly_what_was_signed() {
        let dir = tempfile::tempdir().unwrap();
        let ta = TokenAuthority::load_or_create(dir.path()).unwrap();
        let grant = Grant::new("prod", "web")
            .with_labels([("app", "web")])
            .with_advertise_addr([10, 0, 0, 7].into());
        let (token, claims) = ta.create(&grant, Duration::from_secs(60), "pin");
        assert_eq!(ta.verify(&token).unwrap(), claims);
        assert_eq!(claims.labels["app"], "web");
        assert_eq!(claims.advertise_addr, Some([10, 0, 0, 7].into()));
        assert_eq!(Claims::peek(&token).unwrap().ca, "pin");

        // Any change to the claims breaks the signature.
        let (prefix, rest) = token.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        for forged_claims in [
            Claims {
                service_account: "admin".into(),
                ..claims.clone()
            },
            Claims {
                labels: [("app".to_string(), "payments".to_string())].into(),
                ..claims.clone()
            },
            Claims {
                advertise_addr: Some([10, 0, 0, 8].into()),
                ..claims.clone()
            },
        ] {
            let forged = format!(
                "{prefix}.{}.{mac}",
                B64.encode(serde_json::to_vec(&forged_claims).unwrap())
            );
            assert_eq!(ta.verify(&forged), Err(TokenError::BadSignature));
        }

        // Another control plane's key does not verify it.
        let other = TokenAuthority::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));
        assert_eq!(ta.verify("nonsense"), Err(TokenError::Malformed));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ta = TokenAuthority::load_or_create(dir.path()).unwrap();
        let grant = Grant::new("prod", "web");
        let (expired, _) = ta.create(&grant, Duration::ZERO, "pin");
        assert!(matches!(ta.verify(&expired), Err(TokenError::Expired(_))));
        let (token, claims) = ta.create(&grant, Duration::from_secs(60), "pin");
        ta.revoke(&claims.id).unwrap();
        assert_eq!(
            ta.verify(&token),
            Err(TokenError::Revoked(claims.id.clone()))
        );
        // Revocation survives a restart.
        let again = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(again.verify(&token), Err(TokenError::Revoked(claims.id)));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(REVOKED_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn tokens_of_older_versions_grant_no_labels() {
        // Claims without `l` and `addr`, as tokens made before labels were
        // bound: they grant the identity and nothing more.
        let c: Claims =
            serde_json::from_str(r#"{"id":"ab","ns":"prod","sa":"web","exp":1,"ca":"x"}"#).unwrap();
        assert!(c.labels.is_empty());
        assert_eq!(c.advertise_addr, None);
    }

    #[test]
    fn grants_are_checked() {
        assert!(Grant::new("prod", "web")
            .with_labels([("app", "web"), ("trellis.dev/tier", "v1.2")])
            .check()
            .is_ok());
        assert!(Grant::new("Prod", "web").check().is_err());
        assert!(Grant::new("prod", "web")
            .with_labels([("app", "a b")])
            .check()
            .is_err());
        assert!(Grant::new("prod", "web")
            .with_labels([("", "x")])
            .check()
            .is_err());
    }
}
