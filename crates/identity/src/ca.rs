//! The mesh CA: a root made on first start (or a user-supplied root or
//! intermediate), SVID signing for exactly the identity a token grants,
//! and root rotation without downtime (the trust bundle carries old and new
//! roots until the old one is retired).
//!
//! The CA is plain data here ([`CaMaterial`]): the control plane keeps it
//! in its store, its key encrypted. Versions before the store kept it on
//! disk, in the CA directory: `roots.pem` (the trust bundle), `signer.pem`
//! (the certificate that signs) and `signer.key`; [`Ca::load_dir`] reads
//! those, to move them into the store.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use serde::{Deserialize, Serialize};

use crate::certs::{certs_from_pem, fingerprint, to_pem};
use crate::SpiffeId;

const ROOTS: &str = "roots.pem";
const SIGNER_CERT: &str = "signer.pem";
const SIGNER_KEY: &str = "signer.key";
const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start a little in the past so a peer whose clock runs
/// slightly behind still accepts them.
const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CA directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("CA files: {0}")]
    Files(String),
    #[error("cannot make a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("the CSR is not valid: {0}")]
    BadCsr(String),
    #[error("the CSR asks for {asked}, but the token grants {granted}")]
    WrongIdentity { asked: String, granted: String },
    #[error("a user-supplied CA cannot be rotated by Trellis: rotate it yourself and restart with the new --ca-cert and --ca-bundle")]
    NotRotatable,
    #[error("there is no older root to retire")]
    NothingToRetire,
}

/// What a CA is made of, as the control plane stores it (the whole of it
/// encrypted, since it holds the signing key).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaMaterial {
    pub signer_cert_pem: String,
    pub signer_key_pem: String,
    /// The trust bundle, current root first.
    pub roots_pem: Vec<String>,
    /// Made by Trellis (so it may rotate it), rather than the user's.
    pub generated: bool,
}

pub struct Ca {
    signer_cert_pem: String,
    signer_key: KeyPair,
    /// Appended to every leaf: the signer when it is an intermediate.
    chain_pem: String,
    /// The trust bundle, current root first.
    roots_pem: Vec<String>,
    generated: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn split_pems(pem: &str) -> Result<Vec<String>, CaError> {
    Ok(certs_from_pem(pem)
        .map_err(|e| CaError::Files(e.to_string()))?
        .iter()
        .map(|c| to_pem(c))
        .collect())
}

fn new_root(trust_domain: &str) -> Result<(String, KeyPair), CaError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Trellis");
    params.distinguished_name.push(
        DnType::CommonName,
        format!(
            "Trellis root CA {trust_domain} {}",
            OffsetDateTime::now_utc().unix_timestamp()
        ),
    );
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + ROOT_VALIDITY;
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key))
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A random 128-bit serial (positive: top bit clear).
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the OS RNG works");
    bytes[0] &= 0x7f;
    SerialNumber::from_slice(&bytes)
}

impl Ca {
    /// Reads the CA an older version kept in `dir`; `None` when there is none.
    pub fn load_dir(dir: &Path) -> Result<Option<Ca>, CaError> {
        let cert_path = dir.join(SIGNER_CERT);
        if !cert_path.exists() {
            return Ok(None);
        }
        let signer_cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
        let key_path = dir.join(SIGNER_KEY);
        let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
        let roots_path = dir.join(ROOTS);
        let roots = std::fs::read_to_string(&roots_path).map_err(io(&roots_path))?;
        let roots_pem = split_pems(&roots)?;
        let generated = roots_pem.first() == Some(&signer_cert_pem);
        Ca::from_material(CaMaterial {
            signer_cert_pem,
            signer_key_pem: key_pem,
            roots_pem,
            generated,
        })
        .map(Some)
    }

    /// Writes the files [`Ca::load_dir`] reads (the key 0600): how a CA
    /// kept elsewhere, such as a Kubernetes Secret, is handed to a control
    /// plane, which moves it into its store.
    pub fn write_dir(&self, dir: &Path) -> Result<(), CaError> {
        let m = self.material();
        let path = dir.join(SIGNER_KEY);
        crate::write_secret(&path, m.signer_key_pem.as_bytes()).map_err(io(&path))?;
        let path = dir.join(SIGNER_CERT);
        crate::write_secret(&path, m.signer_cert_pem.as_bytes()).map_err(io(&path))?;
        let path = dir.join(ROOTS);
        crate::write_secret(&path, m.roots_pem.concat().as_bytes()).map_err(io(&path))?;
        Ok(())
    }

    /// The files [`Ca::load_dir`] reads that hold secrets or are kept in the
    /// store now (all but the public `roots.pem`).
    pub const LEGACY_FILES: [&'static str; 2] = [SIGNER_CERT, SIGNER_KEY];

    /// A new self-signed root.
    pub fn generate(trust_domain: &str) -> Result<Ca, CaError> {
        let (cert, key) = new_root(trust_domain)?;
        Ok(Ca {
            signer_cert_pem: cert.clone(),
            signer_key: key,
            chain_pem: String::new(),
            roots_pem: vec![cert],
            generated: true,
        })
    }

    /// A CA from what [`Ca::material`] gave.
    pub fn from_material(m: CaMaterial) -> Result<Ca, CaError> {
        let signer_key = KeyPair::from_pem(&m.signer_key_pem)?;
        if m.roots_pem.is_empty() {
            return Err(CaError::Files("the CA has no root to trust".into()));
        }
        let is_root = m.roots_pem.contains(&m.signer_cert_pem);
        Ok(Ca {
            chain_pem: if is_root {
                String::new()
            } else {
                m.signer_cert_pem.clone()
            },
            signer_cert_pem: m.signer_cert_pem,
            signer_key,
            roots_pem: m.roots_pem,
            generated: m.generated,
        })
    }

    /// Everything the CA is made of, its key included: for the store only.
    pub fn material(&self) -> CaMaterial {
        CaMaterial {
            signer_cert_pem: self.signer_cert_pem.clone(),
            signer_key_pem: self.signer_key.serialize_pem(),
            roots_pem: self.roots_pem.clone(),
            generated: self.generated,
        }
    }

    /// A user-supplied root or intermediate. `bundle` holds the roots to
    /// trust (default: `cert` itself, which must then be a root).
    pub fn from_files(cert: &Path, key: &Path, bundle: Option<&Path>) -> Result<Ca, CaError> {
        let signer_cert_pem = split_pems(&std::fs::read_to_string(cert).map_err(io(cert))?)?
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Files(format!("{}: no certificate", cert.display())))?;
        let signer_key = KeyPair::from_pem(&std::fs::read_to_string(key).map_err(io(key))?)?;
        let roots_pem = match bundle {
            Some(b) => split_pems(&std::fs::read_to_string(b).map_err(io(b))?)?,
            None => vec![signer_cert_pem.clone()],
        };
        let is_root = roots_pem.contains(&signer_cert_pem);
        Ok(Ca {
            chain_pem: if is_root {
                String::new()
            } else {
                signer_cert_pem.clone()
            },
            signer_cert_pem,
            signer_key,
            roots_pem,
            generated: false,
        })
    }

    /// Every root the mesh trusts now, current first.
    pub fn bundle_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// SHA-256 of the current root, which join tokens pin.
    pub fn root_fingerprint(&self) -> String {
        self.roots_pem
            .first()
            .and_then(|p| certs_from_pem(p).ok())
            .and_then(|c| c.first().map(|c| fingerprint(c)))
            .unwrap_or_default()
    }

    fn issuer(&self) -> Result<Issuer<'_, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_pem(
            &self.signer_cert_pem,
            &self.signer_key,
        )?)
    }

    /// Signs a CSR whose only SAN is the URI of `granted`, for `ttl`.
    /// Returns the chain (leaf first) in PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        granted: &SpiffeId,
        ttl: Duration,
    ) -> Result<String, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let granted_uri = granted.to_string();
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked.len() != 1 || asked[0] != granted_uri {
            return Err(CaError::WrongIdentity {
                asked: if asked.is_empty() {
                    "no identity".into()
                } else {
                    asked.join(", ")
                },
                granted: granted_uri,
            });
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        params.subject_alt_names = vec![SanType::URI(
            Ia5String::try_from(granted_uri).map_err(|e| CaError::BadCsr(e.to_string()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + ttl;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }

    /// A server certificate and key for the control plane's own TLS.
    pub fn server_cert(&self, dns_names: &[&str]) -> Result<(String, String), CaError> {
        let key = KeyPair::generate()?;
        let mut params =
            CertificateParams::new(dns_names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, crate::CONTROL_PLANE_NAME);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        // The root goes with the chain so that a proxy can match it against
        // the fingerprint its token pins.
        let root = self.roots_pem.first().cloned().unwrap_or_default();
        Ok((
            format!("{}{}{}", cert.pem(), self.chain_pem, root),
            key.serialize_pem(),
        ))
    }

    /// Makes a new root; new certificates are signed by it, and the bundle
    /// keeps trusting the old root until `retire_old`. The caller stores
    /// the new [`Ca::material`].
    pub fn rotate(&mut self, trust_domain: &str) -> Result<(), CaError> {
        if !self.generated {
            return Err(CaError::NotRotatable);
        }
        let (cert, key) = new_root(trust_domain)?;
        self.roots_pem.insert(0, cert.clone());
        self.signer_cert_pem = cert;
        self.signer_key = key;
        Ok(())
    }

    /// Drops every root but the current one from the bundle.
    pub fn retire_old(&mut self) -> Result<(), CaError> {
        if self.roots_pem.len() < 2 {
            return Err(CaError::NothingToRetire);
        }
        self.roots_pem.truncate(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::WorkloadKey;

    #[test]
    fn signs_only_the_granted_identity() {
        let ca = Ca::generate("trellis.local").unwrap();
        let web = SpiffeId::new("trellis.local", "prod", "web");
        let key = WorkloadKey::generate(&web).unwrap();
        let chain = ca
            .sign_csr(&key.csr_pem, &web, Duration::from_secs(3600))
            .unwrap();
        let certs = certs_from_pem(&chain).unwrap();
        assert_eq!(crate::certs::spiffe_id(&certs[0]).unwrap(), web);

        let admin = SpiffeId::new("trellis.local", "prod", "admin");
        let err = ca
            .sign_csr(&key.csr_pem, &admin, Duration::from_secs(3600))
            .unwrap_err();
        assert!(matches!(err, CaError::WrongIdentity { .. }), "{err}");
    }

    #[test]
    fn the_ca_round_trips_through_its_material() {
        let ca = Ca::generate("trellis.local").unwrap();
        let again = Ca::from_material(ca.material()).unwrap();
        assert_eq!(ca.root_fingerprint(), again.root_fingerprint());
        assert_eq!(again.material(), ca.material());
        // The key signs the same way after the round trip.
        let web = SpiffeId::new("trellis.local", "prod", "web");
        let key = WorkloadKey::generate(&web).unwrap();
        assert!(again
            .sign_csr(&key.csr_pem, &web, Duration::from_secs(60))
            .is_ok());
    }

    #[test]
    fn a_ca_of_an_older_version_is_read_from_its_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(Ca::load_dir(dir.path()).unwrap().is_none());
        let ca = Ca::generate("trellis.local").unwrap();
        let m = ca.material();
        std::fs::write(dir.path().join(ROOTS), m.roots_pem.concat()).unwrap();
        std::fs::write(dir.path().join(SIGNER_CERT), &m.signer_cert_pem).unwrap();
        std::fs::write(dir.path().join(SIGNER_KEY), &m.signer_key_pem).unwrap();
        let read = Ca::load_dir(dir.path()).unwrap().unwrap();
        assert_eq!(read.material(), m);
    }

    #[test]
    fn rotation_keeps_the_old_root_until_retired() {
        let mut ca = Ca::generate("trellis.local").unwrap();
        let old = ca.root_fingerprint();
        ca.rotate("trellis.local").unwrap();
        assert_eq!(ca.bundle_pem().len(), 2);
        assert_ne!(ca.root_fingerprint(), old);
        let reloaded = Ca::from_material(ca.material()).unwrap();
        assert_eq!(reloaded.bundle_pem().len(), 2);
        ca.retire_old().unwrap();
        assert_eq!(ca.bundle_pem().len(), 1);
    }
}
