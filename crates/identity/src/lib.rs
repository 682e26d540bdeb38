//! Trellis identities.
//!
//! - `spiffe`: the SPIFFE IDs every workload carries.
//! - `ca`: the mesh CA in the control plane: its roots on disk (keys 0600),
//!   CSR signing for exactly the identity a token grants, root rotation.
//! - `token`: signed join tokens (HMAC-SHA256), with expiry and revocation.
//! - `keys`: a proxy's own key and CSR (the key never leaves the proxy).
//! - `verify`: rustls verifiers that check a peer's chain against the
//!   mesh's trust bundle and its URI SAN exactly against the identity
//!   expected.
#![forbid(unsafe_code)]

pub mod ca;
pub mod certs;
pub mod keys;
pub mod spiffe;
pub mod token;
pub mod verify;

pub use spiffe::SpiffeId;

/// ALPN of HTTP/2 between proxies.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN of HTTP/1.1 between proxies (upgrades).
pub const ALPN_HTTP1: &[u8] = b"http/1.1";
/// ALPN of opaque TCP between proxies.
pub const ALPN_TCP: &[u8] = b"trellis/tcp";
/// The DNS name in the control plane's server certificate.
pub const CONTROL_PLANE_NAME: &str = "trellis-control";

/// The crypto provider of every TLS config in Trellis (explicit, so that
/// another crate enabling a second provider changes nothing).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as rustls' process-wide crypto provider (once).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Writes a secret file readable by its owner only (0600), atomically.
pub fn write_secret(path: &std::path::Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    // A name of this write's own: two writers of one file (a CA rotation
    // and the reload its store change triggers) never share a temp file,
    // and the last rename wins with a whole file.
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = path.with_file_name(format!(".{name}.{}.{seq}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn concurrent_writers_of_one_secret_each_succeed_and_leave_a_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roots.pem");
        let writers: Vec<_> = (0..4u8)
            .map(|w| {
                let path = path.clone();
                std::thread::spawn(move || {
                    let contents = vec![b'a' + w; 64 * 1024];
                    for _ in 0..200 {
                        super::write_secret(&path, &contents).unwrap();
                    }
                })
            })
            .collect();
        for w in writers {
            w.join().expect("no writer failed");
        }
        let got = std::fs::read(&path).unwrap();
        assert_eq!(got.len(), 64 * 1024);
        assert!(got.iter().all(|b| *b == got[0]), "one writer's whole file");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["roots.pem"], "no temp file left behind");
    }
}
