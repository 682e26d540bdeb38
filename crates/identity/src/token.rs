//! Join tokens: `trellis1.<claims>.<mac>`, where claims are base64url JSON
//! (namespace, service account, expiry, id, the pinned CA root) and mac is
//! HMAC-SHA256 over them with a key that never leaves the control plane.
//! A token grants exactly one identity; revoked ids are refused.

use std::collections::BTreeSet;
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
    /// Expiry, unix seconds.
    pub exp: u64,
    /// SHA-256 of the CA root the control plane's TLS chains to.
    pub ca: String,
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

    pub fn create(
        &self,
        namespace: &str,
        service_account: &str,
        ttl: Duration,
        ca: &str,
    ) -> (String, Claims) {
        let mut id = [0u8; 8];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id);
        let claims = Claims {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
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
        std::fs::write(self.dir.join(REVOKED_FILE), bytes)
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
        let (token, claims) = ta.create("prod", "web", Duration::from_secs(60), "pin");
        assert_eq!(ta.verify(&token).unwrap(), claims);
        assert_eq!(Claims::peek(&token).unwrap().ca, "pin");

        // Any change to the claims breaks the signature.
        let (prefix, rest) = token.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let forged_claims = Claims {
            service_account: "admin".into(),
            ..claims.clone()
        };
        let forged = format!(
            "{prefix}.{}.{mac}",
            B64.encode(serde_json::to_vec(&forged_claims).unwrap())
        );
        assert_eq!(ta.verify(&forged), Err(TokenError::BadSignature));

        // Another control plane's key does not verify it.
        let other = TokenAuthority::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));
        assert_eq!(ta.verify("nonsense"), Err(TokenError::Malformed));
    }

    #[test]
    fn expired_and_revoked_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ta = TokenAuthority::load_or_create(dir.path()).unwrap();
        let (expired, _) = ta.create("prod", "web", Duration::ZERO, "pin");
        assert!(matches!(ta.verify(&expired), Err(TokenError::Expired(_))));
        let (token, claims) = ta.create("prod", "web", Duration::from_secs(60), "pin");
        ta.revoke(&claims.id).unwrap();
        assert_eq!(
            ta.verify(&token),
            Err(TokenError::Revoked(claims.id.clone()))
        );
        // Revocation survives a restart.
        let again = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert_eq!(again.verify(&token), Err(TokenError::Revoked(claims.id)));
    }
}
