//! A proxy's own key and its CSR. The key is made where it is used and
//! never sent anywhere; only the CSR goes to the CA.

use rcgen::string::Ia5String;
use rcgen::{CertificateParams, DnType, KeyPair, SanType};

use crate::SpiffeId;

pub struct WorkloadKey {
    pub key_pem: String,
    pub csr_pem: String,
}

impl std::fmt::Debug for WorkloadKey {
    // The key is a secret: never print it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadKey").finish_non_exhaustive()
    }
}

impl WorkloadKey {
    /// A new ECDSA P-256 key and a CSR for `id` (its only SAN, as a URI).
    pub fn generate(id: &SpiffeId) -> Result<WorkloadKey, rcgen::Error> {
        Self::for_key(id, KeyPair::generate()?)
    }

    /// A CSR for `id` with a key kept from before (PEM).
    pub fn from_key_pem(id: &SpiffeId, key_pem: &str) -> Result<WorkloadKey, rcgen::Error> {
        Self::for_key(id, KeyPair::from_pem(key_pem)?)
    }

    fn for_key(id: &SpiffeId, key: KeyPair) -> Result<WorkloadKey, rcgen::Error> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Trellis");
        params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.to_string())?)];
        let csr = params.serialize_request(&key)?;
        Ok(WorkloadKey {
            key_pem: key.serialize_pem(),
            csr_pem: csr.pem()?,
        })
    }
}
