//! The key-encryption key (KEK): what encrypts the control plane's secrets
//! at rest in its store (the CA's signing key, the join-token signing key),
//! so that a copy of the store, an etcd backup or a snapshot, gives nothing
//! away without the key file too.
//!
//! AES-256-GCM (ring), a random 96-bit nonce per value, and the value's
//! store key as associated data, so a sealed value moved to another key
//! does not open. Sealed values are `tkek1 || nonce || ciphertext+tag`.
//!
//! The key file holds 32 random bytes, raw or as 64 hex digits. Every
//! replica sharing a store needs the same one (`--kek-file`); the embedded
//! store makes its own in `<data-dir>/kek` on first start.

use std::path::{Path, PathBuf};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

const MAGIC: &[u8] = b"tkek1";
const KEY_LEN: usize = 32;
/// The KEK file the embedded store makes in the data dir.
pub const DEFAULT_FILE: &str = "kek";

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("cannot read the key-encryption key {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the key-encryption key {path} must hold 32 random bytes, raw or as 64 hex digits (make one with `head -c 32 /dev/urandom > {path}; chmod 600 {path}`)")]
    Format { path: PathBuf },
    #[error("the key-encryption key {path} is readable by others: make it private with `chmod 600 {path}`")]
    Exposed { path: PathBuf },
    #[error("cannot keep the key-encryption key in {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the stored secret {key} does not open with this key-encryption key: every control plane sharing a store needs the same --kek-file")]
    Open { key: String },
}

/// The key-encryption key. Its bytes are never logged.
pub struct Kek {
    key: LessSafeKey,
    /// SHA-256 of the key, hex, first 8 bytes: tells keys apart in logs.
    id: String,
}

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).finish()
    }
}

impl Kek {
    pub fn from_bytes(bytes: &[u8; KEY_LEN]) -> Kek {
        let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
        let id = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Kek {
            key: LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("a 32-byte key")),
            id,
        }
    }

    /// Reads a key file: 32 raw bytes or 64 hex digits, owner-only.
    pub fn load(path: &Path) -> Result<Kek, KekError> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|source| KekError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KekError::Exposed {
                path: path.to_path_buf(),
            });
        }
        let raw = std::fs::read(path).map_err(|source| KekError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let format = || KekError::Format {
            path: path.to_path_buf(),
        };
        let bytes: [u8; KEY_LEN] = if raw.len() == KEY_LEN {
            raw.try_into().map_err(|_| format())?
        } else {
            let text = std::str::from_utf8(&raw).map_err(|_| format())?.trim();
            if text.len() != 2 * KEY_LEN {
                return Err(format());
            }
            let mut out = [0u8; KEY_LEN];
            for (i, o) in out.iter_mut().enumerate() {
                *o = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).map_err(|_| format())?;
            }
            out
        };
        Ok(Kek::from_bytes(&bytes))
    }

    /// Reads `path`, or makes a new random key there (0600) when there is none.
    pub fn load_or_create(path: &Path) -> Result<Kek, KekError> {
        if !path.exists() {
            let mut bytes = [0u8; KEY_LEN];
            SystemRandom::new()
                .fill(&mut bytes)
                .expect("the OS random source works");
            trellis_identity::write_secret(path, &bytes).map_err(|source| KekError::Write {
                path: path.to_path_buf(),
                source,
            })?;
            tracing::info!(path = %path.display(), "made a key-encryption key");
        }
        Self::load(path)
    }

    /// A short fingerprint of the key, safe to log.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Encrypts `plaintext`, bound to the store key `aad`.
    pub fn seal(&self, aad: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .expect("the OS random source works");
        let mut buf = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut buf,
            )
            .expect("sealing fits in memory");
        let mut out = Vec::with_capacity(MAGIC.len() + NONCE_LEN + buf.len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&buf);
        out
    }

    /// Decrypts what `seal` made for the same `aad`.
    pub fn open(&self, aad: &str, sealed: &[u8]) -> Result<Vec<u8>, KekError> {
        let err = || KekError::Open {
            key: aad.to_string(),
        };
        let rest = sealed.strip_prefix(MAGIC).ok_or_else(err)?;
        if rest.len() < NONCE_LEN {
            return Err(err());
        }
        let (nonce, ct) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| err())?;
        let mut buf = ct.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut buf)
            .map_err(|_| err())?;
        Ok(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_only_with_the_same_key_and_store_key() {
        let kek = Kek::from_bytes(&[7; 32]);
        let sealed = kek.seal("identity/ca", b"secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(kek.open("identity/ca", &sealed).unwrap(), b"secret");
        // Another store key, another KEK, a flipped bit: refused.
        assert!(kek.open("identity/token-key", &sealed).is_err());
        assert!(Kek::from_bytes(&[8; 32])
            .open("identity/ca", &sealed)
            .is_err());
        let mut bad = sealed.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(kek.open("identity/ca", &bad).is_err());
        assert!(kek.open("identity/ca", b"plain").is_err());
        // A nonce per value: the same secret seals differently each time.
        assert_ne!(kek.seal("k", b"x"), kek.seal("k", b"x"));
    }

    #[test]
    fn key_files_are_raw_or_hex_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let made = dir.path().join("kek");
        let kek = Kek::load_or_create(&made).unwrap();
        assert_eq!(std::fs::read(&made).unwrap().len(), 32);
        let mode = std::fs::metadata(&made).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Kek::load_or_create(&made).unwrap().id(), kek.id());

        let hex = dir.path().join("hex");
        std::fs::write(&hex, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(
            Kek::load(&hex).unwrap().id(),
            Kek::from_bytes(&[0xab; 32]).id()
        );

        std::fs::write(&hex, "too short").unwrap();
        assert!(matches!(Kek::load(&hex), Err(KekError::Format { .. })));
        std::fs::set_permissions(&hex, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Kek::load(&hex).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }
}
