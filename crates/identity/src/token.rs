//! Join tokens: `trellis1.<claims>.<mac>`, where claims are base64url JSON
//! (namespace, service account, the labels the proxy may serve, the
//! address it may advertise, expiry, id, the pinned CA root) and mac is
//! HMAC-SHA256 over them with a key that never leaves the control plane
//! (it keeps the key in its store, encrypted, so every replica signs and
//! verifies with the same one). A token grants exactly one identity and one
//! set of labels. Revocations live in the store too: the control plane
//! checks them after [`TokenAuthority::verify`].

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::hmac;
use serde::{Deserialize, Serialize};

const PREFIX: &str = "trellis1";
/// Where versions before the store kept the key and the revocations.
const KEY_FILE: &str = "token.key";
const REVOKED_FILE: &str = "revoked.json";
/// Bytes of a signing key.
pub const KEY_LEN: usize = 32;

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
    #[error("the token signing key must be at least {KEY_LEN} bytes")]
    ShortKey,
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
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new random signing key.
pub fn generate_key() -> Vec<u8> {
    let mut s = vec![0u8; KEY_LEN];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut s)
        .expect("the OS random source works");
    s
}

/// The key and revoked ids an older version kept in `dir` (files
/// `token.key` and `revoked.json`), to move them into the store.
pub fn read_legacy(dir: &Path) -> (Option<Vec<u8>>, BTreeSet<String>) {
    let key = std::fs::read(dir.join(KEY_FILE))
        .ok()
        .filter(|k| k.len() >= KEY_LEN);
    let revoked = std::fs::read(dir.join(REVOKED_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    (key, revoked)
}

/// Writes a signing key where [`read_legacy`] finds it (0600).
pub fn write_legacy_key(dir: &Path, key: &[u8]) -> std::io::Result<()> {
    crate::write_secret(&dir.join(KEY_FILE), key)
}

/// The files [`read_legacy`] reads.
pub const LEGACY_FILES: [&str; 2] = [KEY_FILE, REVOKED_FILE];

impl TokenAuthority {
    /// Signs and verifies with `secret` (at least [`KEY_LEN`] bytes).
    pub fn new(secret: &[u8]) -> Result<TokenAuthority, TokenError> {
        if secret.len() < KEY_LEN {
            return Err(TokenError::ShortKey);
        }
        Ok(TokenAuthority {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
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

    /// Checks signature and expiry; returns what the token grants. The
    /// caller checks revocation (`Claims::id`) against its store.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let token = token.trim();
        let (signed, mac) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let mac = B64.decode(mac).map_err(|_| TokenError::Malformed)?;
        let claims = Claims::peek(token)?;
        hmac::verify(&self.key, signed.as_bytes(), &mac).map_err(|_| TokenError::BadSignature)?;
        if claims.exp <= now() {
            return Err(TokenError::Expired(claims.exp));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_exactly_what_was_signed() {
        let ta = TokenAuthority::new(&generate_key()).unwrap();
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
        let other = TokenAuthority::new(&generate_key()).unwrap();
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));
        assert_eq!(ta.verify("nonsense"), Err(TokenError::Malformed));
    }

    #[test]
    fn expired_tokens_and_short_keys_are_refused() {
        let ta = TokenAuthority::new(&generate_key()).unwrap();
        let grant = Grant::new("prod", "web");
        let (expired, _) = ta.create(&grant, Duration::ZERO, "pin");
        assert!(matches!(ta.verify(&expired), Err(TokenError::Expired(_))));
        assert!(matches!(
            TokenAuthority::new(&[1; 16]),
            Err(TokenError::ShortKey)
        ));
    }

    #[test]
    fn the_key_of_an_older_version_is_read_from_its_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_legacy(dir.path()), (None, BTreeSet::new()));
        let key = generate_key();
        std::fs::write(dir.path().join(KEY_FILE), &key).unwrap();
        std::fs::write(dir.path().join(REVOKED_FILE), r#"["ab","cd"]"#).unwrap();
        let (k, revoked) = read_legacy(dir.path());
        assert_eq!(k, Some(key));
        assert_eq!(revoked.into_iter().collect::<Vec<_>>(), ["ab", "cd"]);
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
