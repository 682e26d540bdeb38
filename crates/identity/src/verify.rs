//! rustls verifiers for the mesh.
//!
//! - `PeerServerVerifier` (outbound): the peer's chain must end at a root of
//!   the trust bundle, be valid now, allow server auth, and carry exactly
//!   one URI SAN equal to the identity the control plane said the endpoint
//!   has. The DNS name rustls passes in is ignored: SPIFFE names a workload
//!   by URI, never by DNS.
//! - `PeerClientVerifier` (inbound): the same checks with client auth; the
//!   identity becomes the request's verified source.
//! - `ControlPlaneVerifier` (proxy → control plane): the chain must verify
//!   to a root whose SHA-256 the join token pins (or a root of a bundle the
//!   proxy already got over a verified channel), for the name
//!   `trellis-control`.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};

use crate::certs::{certs_from_pem, fingerprint, spiffe_id};
use crate::SpiffeId;

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

/// The handshake-signature methods every verifier here shares: ring's
/// algorithms, nothing of our own.
macro_rules! signatures_by_ring {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls12_signature(message, cert, dss, &algorithms())
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &algorithms())
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

/// The roots a proxy trusts for peers.
#[derive(Debug)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    pub fn from_pems(pems: &[String]) -> Result<TrustBundle, crate::certs::CertError> {
        let mut roots = Vec::new();
        for p in pems {
            roots.extend(certs_from_pem(p)?);
        }
        Ok(TrustBundle { roots })
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    pub fn fingerprints(&self) -> Vec<String> {
        self.roots.iter().map(|r| fingerprint(r)).collect()
    }

    fn anchors(&self) -> Vec<rustls::pki_types::TrustAnchor<'_>> {
        self.roots
            .iter()
            .filter_map(|r| webpki::anchor_from_trusted_cert(r).ok())
            .collect()
    }
}

fn pki_error(e: webpki::Error) -> Error {
    use webpki::Error as E;
    Error::InvalidCertificate(match e {
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        E::CertNotValidForName(_) => CertificateError::NotValidForName,
        E::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    })
}

/// Verifies a chain against `anchors` for `usage`; returns the SPIFFE ID.
fn verify_chain(
    anchors: &[rustls::pki_types::TrustAnchor<'_>],
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    now: UnixTime,
    usage: webpki::KeyUsage,
) -> Result<SpiffeId, Error> {
    let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
    ee.verify_for_usage(
        algorithms().all,
        anchors,
        intermediates,
        now,
        usage,
        None,
        None,
    )
    .map_err(pki_error)?;
    spiffe_id(end_entity)
        .map_err(|e| Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e)))))
}

/// The verified SPIFFE ID of a peer whose chain the handshake accepted.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id(c).ok())
}

#[derive(Debug)]
pub struct PeerServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: String,
}

impl PeerServerVerifier {
    pub fn new(bundle: Arc<TrustBundle>, expected: impl Into<String>) -> Self {
        PeerServerVerifier {
            bundle,
            expected: expected.into(),
        }
    }
}

impl ServerCertVerifier for PeerServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = verify_chain(
            &self.bundle.anchors(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
        )?;
        if id.to_string() != self.expected {
            tracing::warn!(expected = %self.expected, presented = %id, "peer presented another identity; refusing it");
            return Err(Error::InvalidCertificate(CertificateError::NotValidForName));
        }
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_ring!();
}

#[derive(Debug)]
pub struct PeerClientVerifier {
    bundle: Arc<TrustBundle>,
}

impl PeerClientVerifier {
    pub fn new(bundle: Arc<TrustBundle>) -> Self {
        PeerClientVerifier { bundle }
    }
}

impl ClientCertVerifier for PeerClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        verify_chain(
            &self.bundle.anchors(),
            end_entity,
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
        )?;
        Ok(ClientCertVerified::assertion())
    }

    signatures_by_ring!();
}

#[derive(Debug)]
pub struct ControlPlaneVerifier {
    /// SHA-256 fingerprints of roots the proxy trusts for the control plane.
    trusted: Vec<String>,
}

impl ControlPlaneVerifier {
    pub fn new(trusted: Vec<String>) -> Self {
        ControlPlaneVerifier { trusted }
    }
}

impl ServerCertVerifier for ControlPlaneVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        // Only certificates the proxy already trusts by fingerprint can be
        // anchors; the chain must verify to one of them.
        let anchors: Vec<_> = intermediates
            .iter()
            .filter(|c| self.trusted.contains(&fingerprint(c)))
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .collect();
        if anchors.is_empty() {
            return Err(Error::InvalidCertificate(CertificateError::UnknownIssuer));
        }
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        ee.verify_for_usage(
            algorithms().all,
            &anchors,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let name = ServerName::try_from(crate::CONTROL_PLANE_NAME).expect("a valid DNS name");
        ee.verify_is_valid_for_subject_name(&name)
            .map_err(pki_error)?;
        Ok(ServerCertVerified::assertion())
    }

    signatures_by_ring!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use crate::keys::WorkloadKey;
    use std::time::Duration;

    fn issue(ca: &Ca, id: &SpiffeId) -> Vec<CertificateDer<'static>> {
        let key = WorkloadKey::generate(id).unwrap();
        certs_from_pem(
            &ca.sign_csr(&key.csr_pem, id, Duration::from_secs(600))
                .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn identities_are_checked_exactly() {
        crate::install_crypto_provider();
        let ca = Ca::generate("trellis.local").unwrap();
        let bundle = Arc::new(TrustBundle::from_pems(ca.bundle_pem()).unwrap());
        let web = SpiffeId::new("trellis.local", "prod", "web");
        let chain = issue(&ca, &web);
        let now = UnixTime::now();
        let name = ServerName::try_from("ignored").unwrap();

        let ok = PeerServerVerifier::new(bundle.clone(), web.to_string());
        assert!(ok
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
            .is_ok());
        let other =
            PeerServerVerifier::new(bundle.clone(), "spiffe://trellis.local/ns/prod/sa/web2");
        assert!(other
            .verify_server_cert(&chain[0], &chain[1..], &name, &[], now)
            .is_err());
        let client = PeerClientVerifier::new(bundle.clone());
        assert!(client
            .verify_client_cert(&chain[0], &chain[1..], now)
            .is_ok());

        // A certificate from another CA is refused.
        let foreign = Ca::generate("trellis.local").unwrap();
        let forged = issue(&foreign, &web);
        assert!(ok
            .verify_server_cert(&forged[0], &forged[1..], &name, &[], now)
            .is_err());
        assert!(client
            .verify_client_cert(&forged[0], &forged[1..], now)
            .is_err());

        // Expired: verified at a time after its end.
        let later = UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + 3600));
        assert!(client
            .verify_client_cert(&chain[0], &chain[1..], later)
            .is_err());
    }
}
