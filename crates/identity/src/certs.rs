//! Reading certificates: PEM chains, URI SANs, validity, serials.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use x509_parser::prelude::*;

use crate::SpiffeId;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read PEM: {0}")]
    Pem(String),
    #[error("cannot parse the certificate: {0}")]
    Parse(String),
    #[error("the certificate carries no SPIFFE ID as a URI SAN")]
    NoSpiffeUri,
    #[error("the certificate carries {0} URI SANs; a workload certificate carries exactly one")]
    ManyUris(usize),
    #[error("the certificate's key usage does not allow digital signatures")]
    KeyUsage,
}

/// What `/certs` and `trellis check` show of a certificate.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertInfo {
    pub identity: String,
    pub serial: String,
    pub not_before: i64,
    pub not_after: i64,
    pub issuer: String,
}

pub fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_slice_iter(pem.as_bytes()).collect();
    let certs = certs.map_err(|e| CertError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::Pem("no certificate in PEM".into()));
    }
    Ok(certs)
}

pub fn key_from_pem(pem: &str) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| CertError::Pem(e.to_string()))
}

pub fn to_pem(der: &[u8]) -> String {
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The one SPIFFE ID in a workload certificate's URI SANs. A SPIFFE ID
/// elsewhere (a DNS SAN, the subject) does not count.
pub fn spiffe_id(der: &[u8]) -> Result<SpiffeId, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.digital_signature() {
            return Err(CertError::KeyUsage);
        }
    }
    let uris: Vec<&str> = match cert.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    match uris.as_slice() {
        [] => Err(CertError::NoSpiffeUri),
        [one] => one.parse().map_err(|_| CertError::NoSpiffeUri),
        many => Err(CertError::ManyUris(many.len())),
    }
}

pub fn info(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse(e.to_string()))?;
    let identity = spiffe_id(der).map(|id| id.to_string()).unwrap_or_default();
    Ok(CertInfo {
        identity,
        serial: cert.raw_serial_as_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
        issuer: cert.issuer().to_string(),
    })
}

/// SHA-256 of a certificate's DER, hex: how a join token pins the CA root.
pub fn fingerprint(der: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, der)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
