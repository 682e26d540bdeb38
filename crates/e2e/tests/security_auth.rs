//! Access to the control plane (hardening issue #12): every HTTP route
//! against every kind of credential, token minting, endpoint hijacking
//! through Register, TLS beyond loopback, and the modes of the files the
//! control plane keeps.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{control_message, proxy_message, ProxyMessage, Register};
use trellis_control::auth::Role;
use trellis_control::{ControlConfig, ControlPlane, HttpTls};
use trellis_e2e::TestMesh;
use trellis_identity::token::Claims;

/// Who asks, and how.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Caller {
    NoToken,
    Viewer,
    Tap,
    Admin,
    Revoked,
    Expired,
    /// A valid admin token, sent under a DNS name of someone else's (DNS rebinding).
    ForeignHost,
    /// A valid admin token on a write from a page of another origin.
    ForeignOrigin,
}

const CALLERS: [Caller; 8] = [
    Caller::NoToken,
    Caller::Viewer,
    Caller::Tap,
    Caller::Admin,
    Caller::Revoked,
    Caller::Expired,
    Caller::ForeignHost,
    Caller::ForeignOrigin,
];

/// A route, what it needs (None: public), and what an allowed caller gets.
struct Route {
    method: Method,
    path: &'static str,
    body: &'static str,
    needs: Option<Role>,
    allowed: u16,
}

fn routes() -> Vec<Route> {
    let r = |method: Method, path, body, needs, allowed| Route {
        method,
        path,
        body,
        needs,
        allowed,
    };
    use Role::*;
    let svc = r#"[{"apiVersion":"trellis.dev/v1alpha1","kind":"Service","metadata":{"name":"x"},"spec":{"selector":{"app":"x"},"ports":[{"port":80}]}}]"#;
    vec![
        r(Method::GET, "/healthz", "", None, 200),
        r(Method::GET, "/readyz", "", None, 200),
        r(Method::GET, "/", "", None, 200),
        r(Method::GET, "/dashboard.js", "", None, 200),
        r(Method::GET, "/dashboard.css", "", None, 200),
        r(Method::GET, "/metrics", "", Some(Viewer), 200),
        r(Method::GET, "/api/v1/resources/svc", "", Some(Viewer), 200),
        r(
            Method::GET,
            "/api/v1/resources/svc/default/nope",
            "",
            Some(Viewer),
            404,
        ),
        r(Method::GET, "/api/v1/services", "", Some(Viewer), 200),
        r(Method::GET, "/api/v1/proxies", "", Some(Viewer), 200),
        r(Method::GET, "/api/v1/stat", "", Some(Viewer), 200),
        r(
            Method::GET,
            "/api/v1/prometheus/targets",
            "",
            Some(Viewer),
            200,
        ),
        r(Method::GET, "/api/v1/edges", "", Some(Viewer), 200),
        r(Method::GET, "/api/v1/traces", "", Some(Viewer), 200),
        r(
            Method::GET,
            "/api/v1/traces/0123456789abcdef0123456789abcdef",
            "",
            Some(Viewer),
            404,
        ),
        r(Method::GET, "/api/v1/ca", "", Some(Viewer), 200),
        r(Method::GET, "/api/v1/no-such-route", "", Some(Viewer), 404),
        // No proxy is connected: an allowed tap gets 404 (no stream to hold).
        r(Method::GET, "/api/v1/tap?workload=nope", "", Some(Tap), 404),
        r(
            Method::POST,
            "/api/v1/apply?dryRun=true",
            svc,
            Some(Admin),
            200,
        ),
        r(
            Method::DELETE,
            "/api/v1/resources/svc/default/nope",
            "",
            Some(Admin),
            404,
        ),
        r(Method::POST, "/v1/traces", "", Some(Admin), 200),
        r(
            Method::POST,
            "/api/v1/tokens",
            r#"{"namespace":"default","serviceAccount":"reviews"}"#,
            Some(Admin),
            200,
        ),
        r(
            Method::POST,
            "/api/v1/tokens",
            r#"{"role":"admin"}"#,
            Some(Admin),
            200,
        ),
        r(Method::GET, "/api/v1/tokens", "", Some(Admin), 200),
        r(
            Method::DELETE,
            "/api/v1/tokens/0123456789abcdef",
            "",
            Some(Admin),
            200,
        ),
        r(Method::POST, "/api/v1/ca/rotate", "", Some(Admin), 200),
        r(Method::POST, "/api/v1/ca/retire", "", Some(Admin), 200),
    ]
}

/// What `caller` must get from `route`.
fn expected(route: &Route, caller: Caller) -> u16 {
    let write = route.method != Method::GET;
    let role = match caller {
        Caller::ForeignHost => return 403,
        Caller::ForeignOrigin if write => return 403,
        Caller::ForeignOrigin | Caller::Admin => Some(Role::Admin),
        Caller::Viewer => Some(Role::Viewer),
        Caller::Tap => Some(Role::Tap),
        Caller::NoToken | Caller::Revoked | Caller::Expired => None,
    };
    match (route.needs, role) {
        (None, _) => route.allowed,
        (Some(_), None) => 401,
        (Some(needed), Some(has)) if has >= needed => route.allowed,
        (Some(_), Some(_)) => 403,
    }
}

async fn request(
    addr: std::net::SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, String) {
    let ctype = if path == "/v1/traces" {
        "application/x-protobuf"
    } else {
        "application/json"
    };
    let mut all = vec![("content-type", ctype)];
    all.extend_from_slice(headers);
    let resp = trellis_testkit::http_request(
        method.clone(),
        &format!("http://{addr}{path}"),
        &all,
        Bytes::from(body.to_string()),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    (
        resp.status().as_u16(),
        resp.headers().clone(),
        String::from_utf8_lossy(resp.body()).to_string(),
    )
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_against_every_credential() {
    let mesh = TestMesh::start().await;
    let cp = mesh.control.as_ref().unwrap();
    let auth = cp.auth();
    let make = |role, ttl| {
        let auth = auth.clone();
        async move { auth.create(role, ttl, "matrix").await.unwrap() }
    };
    let (viewer, _) = make(Role::Viewer, None).await;
    let (tap, _) = make(Role::Tap, None).await;
    let (admin, _) = make(Role::Admin, None).await;
    let (revoked, r) = make(Role::Admin, None).await;
    auth.revoke(&r.id).await.unwrap();
    let (expired, _) = make(Role::Admin, Some(Duration::ZERO)).await;

    let mut table = String::new();
    let mut wrong = Vec::new();
    for route in routes() {
        let _ = write!(table, "{:<7} {:<48}", route.method.as_str(), route.path);
        for caller in CALLERS {
            let (token, host, origin) = match caller {
                Caller::NoToken => (None, None, None),
                Caller::Viewer => (Some(&viewer), None, None),
                Caller::Tap => (Some(&tap), None, None),
                Caller::Admin => (Some(&admin), None, None),
                Caller::Revoked => (Some(&revoked), None, None),
                Caller::Expired => (Some(&expired), None, None),
                Caller::ForeignHost => (Some(&admin), Some("rebind.evil.example"), None),
                Caller::ForeignOrigin => (Some(&admin), None, Some("http://evil.example")),
            };
            let auth_value = token.map(|t| bearer(t));
            let mut headers: Vec<(&str, &str)> = Vec::new();
            if let Some(a) = &auth_value {
                headers.push(("authorization", a));
            }
            if let Some(h) = host {
                headers.push(("host", h));
            }
            if let Some(o) = origin {
                headers.push(("origin", o));
            }
            let (status, resp_headers, body) = request(
                mesh.http_addr,
                route.method.clone(),
                route.path,
                &headers,
                route.body,
            )
            .await;
            let want = expected(&route, caller);
            let _ = write!(table, " {caller:?}={status}");
            if status != want {
                wrong.push(format!(
                    "{} {} as {caller:?}: got {status}, want {want}: {body}",
                    route.method, route.path
                ));
                continue;
            }
            if status == 401 {
                // Says how to authenticate, and what to do.
                let challenge = resp_headers
                    .get("www-authenticate")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                assert!(
                    challenge.starts_with("Bearer"),
                    "{}: {challenge:?}",
                    route.path
                );
                let v: Value = serde_json::from_str(&body).unwrap();
                assert!(
                    v["error"]
                        .as_str()
                        .unwrap()
                        .contains("trellis token create"),
                    "{body}"
                );
            }
            if status == 403 && matches!(caller, Caller::Viewer | Caller::Tap) {
                let v: Value = serde_json::from_str(&body).unwrap();
                assert!(v["error"].as_str().unwrap().contains("role"), "{body}");
            }
        }
        table.push('\n');
    }
    println!("{table}");
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Refusals are counted by reason; the secrets never show in the token list.
    let (_, _, metrics) = request(
        mesh.http_addr,
        Method::GET,
        "/metrics",
        &[("authorization", &bearer(&viewer))],
        "",
    )
    .await;
    for reason in ["missing", "revoked", "expired", "forbidden"] {
        assert!(
            metrics.contains(&format!(
                "trellis_control_auth_failures_total{{reason=\"{reason}\"}}"
            )),
            "no {reason} failures counted:\n{metrics}"
        );
    }
    let (status, _, list) = request(
        mesh.http_addr,
        Method::GET,
        "/api/v1/tokens",
        &[("authorization", &bearer(&admin))],
        "",
    )
    .await;
    assert_eq!(status, 200);
    for t in [&viewer, &tap, &admin, &revoked] {
        let secret = t.rsplit('.').next().unwrap();
        assert!(!list.contains(secret), "a secret is listed: {list}");
    }
    let v: Value = serde_json::from_str(&list).unwrap();
    let roles: Vec<&str> = v["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["role"].as_str())
        .collect();
    assert!(
        roles.contains(&"viewer") && roles.contains(&"tap"),
        "{list}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_cannot_be_minted_without_an_admin_credential() {
    let mesh = TestMesh::start().await;
    let body = r#"{"namespace":"default","serviceAccount":"reviews","labels":{"app":"reviews"}}"#;
    let admin = bearer(&mesh.admin_token());
    for (what, headers) in [
        ("no credential", vec![]),
        // A page that rebinds its DNS name to the control plane.
        (
            "a rebinding page",
            vec![
                ("host", "rebind.evil.example"),
                ("authorization", admin.as_str()),
            ],
        ),
    ] {
        let (status, _, answer) = request(
            mesh.http_addr,
            Method::POST,
            "/api/v1/tokens",
            &headers,
            body,
        )
        .await;
        assert!(status == 401 || status == 403, "{what}: {status} {answer}");
        assert!(
            !answer.contains("trellis1."),
            "{what} got a token: {answer}"
        );
    }
    let (status, _, answer) = request(
        mesh.http_addr,
        Method::POST,
        "/api/v1/tokens",
        &[("authorization", &admin)],
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let v: Value = serde_json::from_str(&answer).unwrap();
    let claims = Claims::peek(v["token"].as_str().unwrap()).unwrap();
    assert_eq!(
        claims.labels["app"], "reviews",
        "the token binds its labels"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_takes_effect_at_once() {
    let mesh = TestMesh::start().await;
    let admin = bearer(&mesh.admin_token());
    let (_, _, made) = request(
        mesh.http_addr,
        Method::POST,
        "/api/v1/tokens",
        &[("authorization", &admin)],
        r#"{"role":"viewer","ttl":"1h"}"#,
    )
    .await;
    let v: Value = serde_json::from_str(&made).unwrap();
    let viewer = bearer(v["token"].as_str().unwrap());
    let headers = [("authorization", viewer.as_str())];
    let get = || {
        request(
            mesh.http_addr,
            Method::GET,
            "/api/v1/services",
            &headers,
            "",
        )
    };
    assert_eq!(get().await.0, 200);
    let (status, _, _) = request(
        mesh.http_addr,
        Method::DELETE,
        &format!("/api/v1/tokens/{}", v["id"].as_str().unwrap()),
        &[("authorization", &admin)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    // The very next request is refused: no cache to wait out.
    let (status, _, body) = get().await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("revoked"), "{body}");
}

/// A registered proxy's stream; dropping it ends the registration.
type Stream = (
    mpsc::Sender<ProxyMessage>,
    tonic::Streaming<trellis_api::v1::ControlMessage>,
);

/// A proxy's stream: Register with `token`; Ok once the control plane
/// answers with a Config, Err with the refusal.
async fn register(mesh: &TestMesh, token: &str, reg: Register) -> Result<Stream, tonic::Status> {
    let channel = trellis_proxy::control::ControlClient::new(&mesh.grpc_addr.to_string(), token)
        .unwrap()
        .channel()
        .await
        .unwrap();
    let mut client = ProxyApiClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let reg = Register {
        token: token.to_string(),
        ..reg
    };
    tx.send(ProxyMessage {
        msg: Some(proxy_message::Msg::Register(reg)),
    })
    .await
    .unwrap();
    let mut down = client.stream(ReceiverStream::new(rx)).await?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(10), down.message())
        .await
        .expect("an answer within 10s")?;
    assert!(matches!(
        first.and_then(|m| m.msg),
        Some(control_message::Msg::Config(_))
    ));
    Ok((tx, down))
}

fn reviews(instance: &str, labels: &[(&str, &str)], inbound: &str) -> Register {
    Register {
        instance: instance.into(),
        workload: "reviews".into(),
        namespace: "default".into(),
        service_account: "reviews".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        inbound_addr: inbound.into(),
        ..Default::default()
    }
}

async fn join_token(mesh: &TestMesh, body: Value) -> String {
    let (status, _, answer) = request(
        mesh.http_addr,
        Method::POST,
        "/api/v1/tokens",
        &[("authorization", &bearer(&mesh.admin_token()))],
        &body.to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    serde_json::from_str::<Value>(&answer).unwrap()["token"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn endpoints(mesh: &TestMesh) -> BTreeMap<String, Vec<String>> {
    let v = mesh.get_json("/api/v1/services").await;
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let eps = s["endpoints"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| e["address"].as_str().unwrap().to_string())
                .collect();
            (s["name"].as_str().unwrap().to_string(), eps)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_cannot_claim_another_services_endpoints() {
    let mesh = TestMesh::start().await;
    mesh.apply(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: reviews}\nspec: {selector: {app: reviews}, ports: [{port: 8080}]}\n---\n\
         apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: payments}\nspec: {selector: {app: payments}, ports: [{port: 8080}]}\n",
    )
    .await
    .unwrap();
    let reviews_token = join_token(
        &mesh,
        json!({"namespace": "default", "serviceAccount": "reviews", "labels": {"app": "reviews"}}),
    )
    .await;

    // A valid token for reviews, with the labels of payments: refused.
    let err = register(
        &mesh,
        &reviews_token,
        reviews("spy-0", &[("app", "payments")], "127.0.0.1:21001"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("app=payments"), "{}", err.message());
    // Or with an extra label that would select one more Service: refused.
    let err = register(
        &mesh,
        &reviews_token,
        reviews(
            "spy-1",
            &[("app", "reviews"), ("tier", "pay")],
            "127.0.0.1:21001",
        ),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    // A token without labels grants none, and says how to get them.
    let bare = join_token(
        &mesh,
        json!({"namespace": "default", "serviceAccount": "reviews"}),
    )
    .await;
    let err = register(
        &mesh,
        &bare,
        reviews("spy-2", &[("app", "reviews")], "127.0.0.1:21001"),
    )
    .await
    .unwrap_err();
    assert!(
        err.message().contains("--labels app=reviews"),
        "{}",
        err.message()
    );
    // An address other than the one it connects from: refused.
    let err = register(
        &mesh,
        &reviews_token,
        reviews("spy-3", &[("app", "reviews")], "10.99.0.7:21001"),
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("--advertise-addr"),
        "{}",
        err.message()
    );
    let after_spies = endpoints(&mesh).await;
    assert!(after_spies["payments"].is_empty(), "{after_spies:?}");
    assert!(after_spies["reviews"].is_empty(), "{after_spies:?}");

    // The legitimate proxy is accepted, and serves reviews only.
    let _legit = register(
        &mesh,
        &reviews_token,
        reviews("reviews-0", &[("app", "reviews")], "127.0.0.1:21001"),
    )
    .await
    .expect("a proxy within its token registers");
    // An address the token grants is accepted too.
    let remote = join_token(
        &mesh,
        json!({"namespace": "default", "serviceAccount": "reviews",
               "labels": {"app": "reviews"}, "advertiseAddr": "10.99.0.7"}),
    )
    .await;
    let _remote = register(
        &mesh,
        &remote,
        reviews("reviews-1", &[("app", "reviews")], "10.99.0.7:21001"),
    )
    .await
    .expect("an address the token grants");
    let eps = endpoints(&mesh).await;
    assert_eq!(
        eps["reviews"],
        ["10.99.0.7:21001", "127.0.0.1:21001"],
        "{eps:?}"
    );
    assert!(eps["payments"].is_empty(), "{eps:?}");
}

#[tokio::test]
async fn beyond_loopback_the_http_api_needs_tls() {
    let dir = tempfile::tempdir().unwrap();
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let mut cfg = ControlConfig::new(dir.path().join("control"));
        cfg.http_addr = addr.parse().unwrap();
        cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
        let err = ControlPlane::start(cfg).await.unwrap_err().to_string();
        assert!(
            err.contains("beyond loopback")
                && err.contains("--http-tls-cert")
                && err.contains("--http-tls-mesh-ca"),
            "{addr}: {err}"
        );
    }

    // With TLS it serves, and the CLI's client talks to it trusting the mesh root.
    let mut cfg = ControlConfig::new(dir.path().join("control"));
    cfg.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg.http_tls = HttpTls::MeshCa;
    let cp = ControlPlane::start(cfg).await.unwrap();
    let roots = dir.path().join("control").join("ca").join("roots.pem");
    let api = trellis::client::Api::with_ca(
        &format!("https://localhost:{}", cp.http_addr.port()),
        "test",
        Some(&roots),
    )
    .unwrap();
    let refused = api
        .get::<Value>("/api/v1/services")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.contains("needs a credential"), "{refused}");
    let services: Value = api
        .with_token(cp.admin_token())
        .get("/api/v1/services")
        .await
        .expect("served over TLS");
    assert!(services.is_array());
    // Plain HTTP on the TLS port gets nothing.
    let plain =
        trellis_testkit::try_http_get(&format!("http://{}/healthz", cp.http_addr), None).await;
    assert!(plain.map(|(s, _)| s != 200).unwrap_or(true));
    cp.shutdown().await;
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn the_control_planes_files_are_private() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("control");
    // As an older version left it: a 0755 folder with 0644 files.
    std::fs::create_dir_all(data.join("ca")).unwrap();
    for d in [&data, &data.join("ca")] {
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    std::fs::write(data.join("admin-token"), "ab".repeat(32)).unwrap();
    std::fs::set_permissions(
        data.join("admin-token"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();

    let mut cfg = ControlConfig::new(&data);
    cfg.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    let cp = ControlPlane::start(cfg.clone()).await.unwrap();
    // A join token revoked, so the revocation list exists.
    cp.identity().revoke("0123456789abcdef").unwrap();
    cp.shutdown().await;
    // Start again: files written on the second start are private as well.
    let cp = ControlPlane::start(cfg).await.unwrap();
    cp.shutdown().await;

    assert_eq!(mode(&data), 0o700, "the data dir");
    assert_eq!(mode(&data.join("ca")), 0o700, "the CA dir");
    for f in ["store.redb", "admin-token"] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    let mut seen = Vec::new();
    for entry in std::fs::read_dir(data.join("ca")).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        seen.push(p.file_name().unwrap().to_string_lossy().to_string());
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            "revoked.json",
            "roots.pem",
            "signer.key",
            "signer.pem",
            "token.key"
        ]
    );
}
