//! Zero trust: mutual TLS between proxies with exact SPIFFE identities,
//! AuthorizationPolicy, one normalised path, and no spoofable identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use trellis_e2e::yaml::{mesh as mesh_yaml, service, service_in};
use trellis_e2e::{demo_app, metric_sum, wait_config, ProxyClient, TestMesh};

/// Requests a proxy's inbound served over mutual TLS (`tls`) or plaintext.
async fn inbound_requests(admin: SocketAddr, tls: bool) -> f64 {
    let tls = if tls { "true" } else { "false" };
    metric_sum(
        admin,
        "trellis_requests_total",
        &[("direction", "inbound"), ("tls", tls)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_may_not_call_prod_but_prod_may() {
    let mesh = TestMesh::start().await;
    mesh.apply(&format!(
        r#"{}---
{}---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: prod-only, namespace: prod}}
spec:
  targetRef: {{kind: Service, name: api}}
  action: ALLOW
  rules:
  - from: [{{namespaces: [prod]}}]
"#,
        mesh_yaml("{defaultPolicy: deny}"),
        service_in("prod", "api")
    ))
    .await
    .expect("apply");
    let (port, _app) = demo_app("api", "v1", "api-0").await;
    let api = mesh
        .sidecar_in("prod", "api", &[("app", "api")], port)
        .await;
    let (p1, _a1) = demo_app("web", "v1", "web-prod").await;
    let prod = mesh.sidecar_in("prod", "web", &[("app", "web")], p1).await;
    let (p2, _a2) = demo_app("web", "v1", "web-dev").await;
    let dev = mesh.sidecar_in("dev", "web", &[("app", "web")], p2).await;
    mesh.wait_endpoints_in("prod", "api", 1).await;
    wait_config(api.admin_addr, "the api proxy has its policy", |v| {
        v["version"].as_u64() > Some(0)
    })
    .await;

    let (status, body) = ProxyClient::new(prod.outbound_addr)
        .get("http://api.prod:8080/data")
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        answer["headers"]["x-trellis-peer-identity"],
        "spiffe://trellis.local/ns/prod/sa/web"
    );
    let (status, body) = ProxyClient::new(dev.outbound_addr)
        .get("http://api.prod:8080/data")
        .await
        .unwrap();
    assert_eq!(
        status,
        StatusCode::FORBIDDEN,
        "{}",
        String::from_utf8_lossy(&body)
    );
    assert_eq!(
        metric_sum(api.admin_addr, "trellis_authz_denied_total", &[]).await,
        1.0
    );
    // Both calls were mutual TLS.
    let tls = inbound_requests(api.admin_addr, true).await;
    assert_eq!(tls, 2.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_deny_holds_against_every_spelling() {
    let mesh = TestMesh::start().await;
    mesh.apply(&format!(
        r#"{}---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: no-admin}}
spec:
  targetRef: {{name: catalog}}
  action: DENY
  rules: [{{to: [{{paths: ["/admin*"]}}]}}]
"#,
        service("catalog")
    ))
    .await
    .expect("apply");
    let catalog = mesh.demo_sidecar("catalog").await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;
    wait_config(
        catalog.admin_addr,
        "the catalog proxy has its policy",
        |v| v["version"].as_u64() > Some(0),
    )
    .await;

    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client.get("http://catalog:8080/public").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    for path in [
        "/admin",
        "//admin",
        "/public/../admin",
        "/public/%2e%2e/admin",
        "/%61dmin",
        "/admin/users",
        "/./admin",
    ] {
        let (status, body) = client
            .get(&format!("http://catalog:8080{path}"))
            .await
            .unwrap();
        assert_eq!(
            status,
            StatusCode::FORBIDDEN,
            "{path}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    // An encoded slash is refused outright.
    let (status, _) = client.get("http://catalog:8080/%2Fadmin").await.unwrap();
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // A fragment sent raw on the wire is dropped before matching.
    let mut s = tokio::net::TcpStream::connect(frontend.outbound_addr)
        .await
        .unwrap();
    s.write_all(b"GET http://catalog:8080/admin#x HTTP/1.1\r\nhost: catalog:8080\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    assert!(
        answer.starts_with("HTTP/1.1 403") || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    assert!(
        !answer.contains("\"service\""),
        "the app answered: {answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spoofed_identity_headers_never_reach_the_app() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let _catalog = mesh.demo_sidecar("catalog").await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    let (status, body) = ProxyClient::new(frontend.outbound_addr)
        .request(
            http::Method::GET,
            "http://catalog:8080/",
            &[
                (
                    "x-trellis-peer-identity",
                    "spiffe://trellis.local/ns/prod/sa/admin",
                ),
                (
                    "x-forwarded-client-cert",
                    "By=spiffe://x;URI=spiffe://trellis.local/ns/prod/sa/admin",
                ),
                ("x-trellis-source", "prod/admin"),
                ("x-trellis-anything", "yes"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    let answer: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let headers = answer["headers"].as_object().unwrap();
    assert_eq!(
        headers["x-trellis-peer-identity"], "spiffe://trellis.local/ns/default/sa/frontend",
        "{headers:?}"
    );
    assert!(
        !headers.contains_key("x-forwarded-client-cert"),
        "{headers:?}"
    );
    assert!(!headers.contains_key("x-trellis-source"), "{headers:?}");
    assert!(!headers.contains_key("x-trellis-anything"), "{headers:?}");
}

/// A client certificate signed with `issuer` (cert and key PEM), made by
/// `edit` from a valid workload certificate's parameters.
fn client_cert(
    issuer_cert: &str,
    issuer_key: &str,
    edit: impl FnOnce(&mut rcgen::CertificateParams),
) -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rustls::pki_types::PrivateKeyDer<'static>,
) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        rcgen::string::Ia5String::try_from("spiffe://trellis.local/ns/default/sa/frontend")
            .unwrap(),
    )];
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(60);
    params.not_after = now + Duration::from_secs(3600);
    edit(&mut params);
    let issuer_key = rcgen::KeyPair::from_pem(issuer_key).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(issuer_cert, &issuer_key).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    (
        vec![cert.der().clone()],
        rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
}

/// Connects to an inbound listener with a client certificate and sends an
/// HTTP/1.1 request; returns what came back (nothing when refused).
async fn call_with_cert(
    inbound: SocketAddr,
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rustls::pki_types::PrivateKeyDer<'static>,
) -> String {
    #[derive(Debug)]
    struct AnyServer;
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer))
        .with_client_auth_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let mut answer = String::new();
    let Ok(mut tls) = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("peer.trellis").unwrap(), tcp)
        .await
    else {
        return answer;
    };
    if tls
        .write_all(b"GET / HTTP/1.1\r\nhost: catalog:8080\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return answer;
    }
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    answer.push_str(&String::from_utf8_lossy(&buf));
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_client_certificates_are_refused() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let catalog = mesh.demo_sidecar("catalog").await;
    let ca_dir = mesh.dir.path().join("control").join("ca");
    let ca_cert = std::fs::read_to_string(ca_dir.join("signer.pem")).unwrap();
    let ca_key = std::fs::read_to_string(ca_dir.join("signer.key")).unwrap();

    // The same request with a good mesh certificate is answered: the
    // refusals below are the certificates' doing.
    let (chain, key) = client_cert(&ca_cert, &ca_key, |_| {});
    let ok = call_with_cert(catalog.inbound_addr, chain, key).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");

    let foreign = rcgen::KeyPair::generate().unwrap();
    let mut foreign_params = rcgen::CertificateParams::default();
    foreign_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign_cert = foreign_params.self_signed(&foreign).unwrap();
    let cases: Vec<(&str, _)> = vec![
        (
            "a foreign CA",
            client_cert(&foreign_cert.pem(), &foreign.serialize_pem(), |_| {}),
        ),
        (
            "an expired certificate",
            client_cert(&ca_cert, &ca_key, |p| {
                let now = time::OffsetDateTime::now_utc();
                p.not_before = now - Duration::from_secs(7200);
                p.not_after = now - Duration::from_secs(3600);
            }),
        ),
        (
            "the identity in a DNS SAN",
            client_cert(&ca_cert, &ca_key, |p| {
                p.subject_alt_names = vec![rcgen::SanType::DnsName(
                    rcgen::string::Ia5String::try_from("frontend.default.svc").unwrap(),
                )];
            }),
        ),
        (
            "no client-auth key usage",
            client_cert(&ca_cert, &ca_key, |p| {
                p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            }),
        ),
    ];
    for (what, (chain, key)) in cases {
        let answer = call_with_cert(catalog.inbound_addr, chain, key).await;
        assert!(answer.is_empty(), "{what} was let in: {answer}");
    }
    let failures = metric_sum(
        catalog.admin_addr,
        "trellis_tls_handshake_failures_total",
        &[],
    )
    .await;
    assert_eq!(failures, 4.0);

    // A client that stalls mid-handshake is dropped, and the proxy serves on.
    let mut stalled = tokio::net::TcpStream::connect(catalog.inbound_addr)
        .await
        .unwrap();
    stalled
        .write_all(&[0x16, 0x03, 0x01, 0x00, 0x50])
        .await
        .unwrap();
    let (chain, key) = client_cert(&ca_cert, &ca_key, |_| {});
    let ok = call_with_cert(catalog.inbound_addr, chain, key).await;
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_and_permissive_accepts_it() {
    let mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let catalog = mesh.demo_sidecar("catalog").await;
    wait_config(catalog.admin_addr, "a config", |v| {
        v["version"].as_u64() > Some(0)
    })
    .await;

    let plain =
        |addr| async move { trellis_testkit::try_http_get(&format!("http://{addr}/"), None).await };
    assert!(
        plain(catalog.inbound_addr).await.is_err(),
        "strict mode answered plaintext"
    );
    assert_eq!(
        metric_sum(catalog.admin_addr, "trellis_plaintext_refused_total", &[]).await,
        1.0
    );

    mesh.apply(&mesh_yaml("{mtls: permissive}"))
        .await
        .expect("apply");
    mesh.wait_mesh_synced().await;
    let (status, _) = plain(catalog.inbound_addr)
        .await
        .expect("permissive mode answers plaintext");
    assert_eq!(status, StatusCode::OK);
    let plaintext = inbound_requests(catalog.admin_addr, false).await;
    assert_eq!(plaintext, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_keeps_serving_with_the_control_plane_stopped() {
    let mut mesh = TestMesh::start().await;
    mesh.apply(&service("catalog")).await.expect("apply");
    let catalog = mesh.demo_sidecar("catalog").await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;
    // The frontend learns catalog on its first call; then the control plane goes.
    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (status, _) = client.get("http://catalog:8080/").await.unwrap();
    assert_eq!(status, StatusCode::OK);
    mesh.stop_control().await;
    for _ in 0..49 {
        let (status, _) = client.get("http://catalog:8080/").await.unwrap();
        assert_eq!(status, StatusCode::OK);
    }
    let tls = inbound_requests(catalog.admin_addr, true).await;
    assert_eq!(tls, 50.0);
}

/// Certificates with a 30 s TTL rotate under steady load without a failed
/// request: the load runs until each proxy has rotated twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_under_load_without_a_failure() {
    let mesh = TestMesh::start().await;
    mesh.apply(&format!(
        "{}---\n{}",
        mesh_yaml("{certificateTTL: 30s}"),
        service("catalog")
    ))
    .await
    .expect("apply");
    let catalog = mesh.demo_sidecar("catalog").await;
    let frontend = mesh.demo_sidecar("frontend").await;
    mesh.wait_endpoints("catalog", 1).await;

    // Each proxy's certificates seen, in order: (serial, notAfter).
    let mut seen: [Vec<(String, i64)>; 2] = Default::default();
    let proxies = [catalog.admin_addr, frontend.admin_addr];
    let mut client = ProxyClient::new(frontend.outbound_addr);
    let (mut sent, mut failed) = (0u32, 0u32);
    let give_up = Instant::now() + Duration::from_secs(120);
    let mut next_check = Instant::now();
    // Steady load: one request every 10 ms at most.
    let mut pace = tokio::time::interval(Duration::from_millis(10));
    while seen.iter().any(|certs| certs.len() < 3) {
        assert!(
            Instant::now() < give_up,
            "certificates with a 30s TTL did not rotate twice in 2 minutes: {seen:?}"
        );
        pace.tick().await;
        // A new connection now and then, so that fresh handshakes use the
        // rotated certificates too.
        if sent % 200 == 0 {
            client = ProxyClient::new(frontend.outbound_addr);
        }
        match client.get("http://catalog:8080/").await {
            Ok((StatusCode::OK, _)) => {}
            other => {
                failed += 1;
                eprintln!("request {sent} failed: {other:?}");
            }
        }
        sent += 1;
        if Instant::now() >= next_check {
            for (admin, certs) in proxies.iter().zip(&mut seen) {
                let c = certificate(*admin).await;
                if certs.last().is_none_or(|last| last.0 != c.0) {
                    certs.push(c);
                }
            }
            next_check = Instant::now() + Duration::from_secs(1);
        }
    }
    println!("rotation under load: {sent} requests, {failed} failed, certificates {seen:?}");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} requests failed across rotations"
    );
    // Renewal at about half-life (40-60% of 30s), never a renewal storm:
    // each certificate expires some 12s or more after the one before.
    for certs in &seen {
        for pair in certs.windows(2) {
            assert!(
                pair[1].1 - pair[0].1 >= 10,
                "renewed too soon after the one before: {certs:?}"
            );
        }
    }
}

/// A proxy's current certificate: serial and notAfter (Unix seconds).
async fn certificate(admin: SocketAddr) -> (String, i64) {
    let (_, body) = trellis_testkit::http_get(&format!("http://{admin}/certs"), None).await;
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let c = &v["certificate"];
    (
        c["serial"].as_str().unwrap_or_default().to_string(),
        c["notAfter"].as_i64().unwrap_or_default(),
    )
}
