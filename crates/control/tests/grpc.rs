//! A control plane in-process, on free ports, with fake proxies speaking
//! the real gRPC API and a plain HTTP/1.1 client for the API.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{
    control_message, proxy_message, Ack, Config, ControlMessage, ProxyMessage, Register, StatEntry,
    StatsReport, Subscribe,
};
use trellis_control::{ControlConfig, ControlPlane};
use trellis_identity::token::Grant;
use trellis_testkit::eventually;
use trellis_testkit::prometheus::Metrics;

const WAIT: Duration = Duration::from_secs(15);

fn config(dir: &std::path::Path) -> ControlConfig {
    let mut cfg = ControlConfig::new(dir);
    cfg.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    cfg
}

/// One HTTP/1.1 request; returns the status and the body as JSON (or a
/// JSON string when it is not JSON).
/// Sent with the control plane's admin token.
async fn http(
    cp: &ControlPlane,
    method: &str,
    path: &str,
    ctype: &str,
    body: &str,
) -> (u16, Value) {
    let auth = format!("Bearer {}", cp.admin_token());
    let resp = trellis_testkit::http_request(
        method.parse().expect("an HTTP method"),
        &format!("http://{}{path}", cp.http_addr),
        &[("content-type", ctype), ("authorization", &auth)],
        bytes::Bytes::from(body.to_string()),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let text = String::from_utf8_lossy(resp.body()).into_owned();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (resp.status().as_u16(), v)
}

async fn get(cp: &ControlPlane, path: &str) -> (u16, Value) {
    http(cp, "GET", path, "application/json", "").await
}

async fn apply(cp: &ControlPlane, resources: &Value) -> (u16, Value) {
    http(
        cp,
        "POST",
        "/api/v1/apply",
        "application/json",
        &resources.to_string(),
    )
    .await
}

fn service(name: &str, selector: Value) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": name},
        "spec": {"selector": selector, "ports": [{"port": 8080, "protocol": "http"}]},
    })
}

fn mesh_resources() -> Value {
    json!([
        service("catalog", json!({"app": "catalog"})),
        service("catalog-v1", json!({"app": "catalog", "version": "v1"})),
        service("catalog-v2", json!({"app": "catalog", "version": "v2"})),
        {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "catalog-split"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "catalog"}],
                "rules": [{"backendRefs": [
                    {"name": "catalog-v1", "weight": 90},
                    {"name": "catalog-v2", "weight": 10},
                ]}],
            },
        },
    ])
}

/// A fake proxy: the sending half of its stream and the configs it gets.
struct FakeProxy {
    tx: mpsc::Sender<ProxyMessage>,
    rx: Streaming<ControlMessage>,
}

impl FakeProxy {
    /// Connects over TLS with a join token for the registered identity.
    async fn connect(cp: &ControlPlane, mut register: Register) -> FakeProxy {
        let grant = Grant::new(&register.namespace, &register.service_account)
            .with_labels(register.labels.clone());
        let (token, _) = cp.identity().create_token(&grant, Duration::from_secs(600));
        register.token = token.clone();
        let mut client = ProxyApiClient::new(channel(cp, &token).await);
        let (tx, rx) = mpsc::channel(16);
        // The server answers only after Register, so send it first.
        tx.send(msg(proxy_message::Msg::Register(register)))
            .await
            .unwrap();
        let rx = client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeProxy { tx, rx }
    }

    async fn send(&self, m: proxy_message::Msg) {
        self.tx.send(msg(m)).await.unwrap();
    }

    /// The next Config that satisfies `pred`, skipping older ones.
    async fn config_where(&mut self, what: &str, pred: impl Fn(&Config) -> bool) -> Config {
        let rx = &mut self.rx;
        tokio::time::timeout(WAIT, async {
            loop {
                let m = rx.message().await.unwrap().expect("stream ended");
                if let Some(control_message::Msg::Config(c)) = m.msg {
                    if pred(&c) {
                        return c;
                    }
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for a config with {what}"))
    }
}

/// A TLS channel to the proxy API that verifies the control plane against
/// the root the token pins, as a proxy does.
async fn channel(cp: &ControlPlane, token: &str) -> tonic::transport::Channel {
    trellis_proxy::control::ControlClient::new(&cp.grpc_addr.to_string(), token)
        .unwrap()
        .channel()
        .await
        .unwrap()
}

fn msg(m: proxy_message::Msg) -> ProxyMessage {
    ProxyMessage { msg: Some(m) }
}

fn register(instance: &str, workload: &str, labels: &[(&str, &str)], inbound: &str) -> Register {
    Register {
        instance: instance.into(),
        workload: workload.into(),
        namespace: "default".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        inbound_addr: inbound.into(),
        admin_addr: "127.0.0.1:15000".into(),
        ..Default::default()
    }
}

fn service_in<'a>(c: &'a Config, name: &str) -> Option<&'a trellis_api::v1::ServiceConfig> {
    c.services
        .iter()
        .find(|s| s.namespace == "default" && s.name == name)
}

fn endpoint_addrs(c: &Config, name: &str) -> Vec<String> {
    service_in(c, name)
        .map(|s| s.endpoints.iter().map(|e| e.address.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn proxies_get_services_routes_and_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (status, body) = apply(&cp, &mesh_resources()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"].as_array().unwrap().len(), 4);
    assert!(body["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["action"] == "created"));

    // The first Config comes right after Register, even when empty.
    let mut v1 = FakeProxy::connect(
        &cp,
        register(
            "catalog-v1-0",
            "catalog-v1",
            &[("app", "catalog"), ("version", "v1")],
            "127.0.0.1:21001",
        ),
    )
    .await;
    let first = v1.config_where("anything", |_| true).await;
    assert!(first.services.is_empty());
    assert_eq!(first.mesh_json, "{}");
    v1.send(proxy_message::Msg::Ack(Ack {
        version: first.version,
        accepted: true,
        error: String::new(),
    }))
    .await;

    let mut web = FakeProxy::connect(
        &cp,
        register("web-0", "web", &[("app", "web")], "127.0.0.1:21002"),
    )
    .await;
    web.send(proxy_message::Msg::Subscribe(Subscribe {
        services: vec!["default/catalog".into(), "default/nope".into()],
    }))
    .await;
    let cfg = web
        .config_where("catalog and its backends", |c| {
            service_in(c, "catalog").is_some() && endpoint_addrs(c, "catalog-v1").len() == 1
        })
        .await;
    let names: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["catalog", "catalog-v1", "catalog-v2"]);
    assert_eq!(cfg.missing, ["default/nope"]);
    assert_eq!(endpoint_addrs(&cfg, "catalog"), ["127.0.0.1:21001"]);
    assert_eq!(endpoint_addrs(&cfg, "catalog-v1"), ["127.0.0.1:21001"]);
    assert!(endpoint_addrs(&cfg, "catalog-v2").is_empty());
    let ep = &service_in(&cfg, "catalog-v1").unwrap().endpoints[0];
    assert_eq!(ep.identity, "spiffe://trellis.local/ns/default/sa/catalog");
    assert_eq!(ep.instance, "catalog-v1-0");
    let catalog = service_in(&cfg, "catalog").unwrap();
    assert_eq!(catalog.routes_json.len(), 1);
    let route: Value = serde_json::from_str(&catalog.routes_json[0]).unwrap();
    assert_eq!(route["metadata"]["name"], "catalog-split");
    let svc: Value = serde_json::from_str(&catalog.service_json).unwrap();
    assert_eq!(svc["spec"]["selector"]["app"], "catalog");

    // A nack shows in the proxies list.
    web.send(proxy_message::Msg::Ack(Ack {
        version: cfg.version,
        accepted: false,
        error: "route catalog-split: unsupported".into(),
    }))
    .await;
    let proxies = eventually("the nack in /api/v1/proxies", WAIT, || async {
        let (_, v) = get(&cp, "/api/v1/proxies").await;
        let web = v
            .as_array()?
            .iter()
            .find(|p| p["instance"] == "web-0")?
            .clone();
        (web["lastError"] == "route catalog-split: unsupported").then_some(v)
    })
    .await;
    let web_view = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["instance"] == "web-0")
        .unwrap();
    assert_eq!(web_view["sentVersion"], json!(cfg.version));
    assert_eq!(
        web_view["subscriptions"],
        json!(["default/catalog", "default/nope"])
    );
    assert_eq!(
        web_view["identity"],
        "spiffe://trellis.local/ns/default/sa/web"
    );

    // Services show their endpoints; Prometheus finds both proxies.
    let (_, svcs) = get(&cp, "/api/v1/services").await;
    let catalog = svcs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "catalog")
        .unwrap();
    assert_eq!(catalog["endpoints"][0]["address"], "127.0.0.1:21001");
    let (_, targets) = get(&cp, "/api/v1/prometheus/targets").await;
    assert_eq!(targets.as_array().unwrap().len(), 2);

    // Traffic reports show up in /api/v1/stat.
    let mut buckets = vec![0u64; trellis_api::LATENCY_BUCKETS_MS.len() + 1];
    buckets[4] = 10;
    v1.send(proxy_message::Msg::Stats(StatsReport {
        interval_seconds: 10.0,
        entries: vec![StatEntry {
            direction: "inbound".into(),
            destination_namespace: "default".into(),
            destination_service: "catalog".into(),
            destination_workload: "catalog-v1".into(),
            requests: 10,
            failures: 1,
            tls_requests: 10,
            latency_buckets: buckets,
            ..Default::default()
        }],
    }))
    .await;
    let row = eventually("a stat row", WAIT, || async {
        let (_, v) = get(&cp, "/api/v1/stat?kind=service&window=30s").await;
        v["rows"].as_array()?.first().cloned()
    })
    .await;
    assert_eq!(row["name"], "catalog");
    assert_eq!(row["requests"], 10);
    assert!((row["successRate"].as_f64().unwrap() - 0.9).abs() < 1e-9);

    // The v1 proxy goes away: web gets a Config without its endpoint.
    drop(v1);
    let after = web
        .config_where("catalog-v1 without endpoints", |c| {
            endpoint_addrs(c, "catalog-v1").is_empty()
        })
        .await;
    assert!(after.version > cfg.version);
    assert!(endpoint_addrs(&after, "catalog").is_empty());
    assert_eq!(after.services.len(), 3);
    eventually("one proxy left", WAIT, || async {
        let (_, v) = get(&cp, "/api/v1/proxies").await;
        (v.as_array()?.len() == 1).then_some(())
    })
    .await;

    // A route change reaches the subscriber.
    let mut changed = mesh_resources();
    changed[3]["spec"]["rules"][0]["backendRefs"][1]["weight"] = json!(50);
    let (status, body) = apply(&cp, &changed).await;
    assert_eq!(status, 200, "{body}");
    let actions: Vec<&str> = body["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        ["unchanged", "unchanged", "unchanged", "configured"]
    );
    web.config_where("the new weight", |c| {
        service_in(c, "catalog")
            .is_some_and(|s| s.routes_json.iter().any(|r| r.contains("\"weight\":50")))
    })
    .await;

    let (status, text) = get(&cp, "/metrics").await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap();
    let metrics = Metrics::parse(text).unwrap();
    assert_eq!(
        metrics.sum("trellis_control_nacks_total", &[]),
        1.0,
        "{text}"
    );
    assert_eq!(
        metrics.sum("trellis_control_connected_proxies", &[]),
        1.0,
        "{text}"
    );

    cp.shutdown().await;
    // Shutdown closes the remaining stream.
    let end = tokio::time::timeout(WAIT, async {
        loop {
            match web.rx.message().await {
                Ok(Some(_)) => continue,
                other => return other.map(|_| ()),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream stayed open after shutdown");
}

#[tokio::test]
async fn first_message_must_be_register() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (token, _) = cp
        .identity()
        .create_token(&Grant::new("default", "x"), Duration::from_secs(600));
    let mut client = ProxyApiClient::new(channel(&cp, &token).await);
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(proxy_message::Msg::Subscribe(Subscribe {
        services: vec!["default/a".into()],
    })))
    .await
    .unwrap();
    let err = client.stream(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    cp.shutdown().await;
}

/// The VIP of each Service, from the API.
async fn vips(cp: &ControlPlane) -> Vec<(String, String)> {
    let (_, v) = get(cp, "/api/v1/services").await;
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap_or("").to_string(),
                        s["vip"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn services_applied_one_after_another_each_get_a_vip() {
    // The actor checks for Services without a VIP only when the Services
    // change or an allocation ends: applies that land while an allocation
    // is under way must still get theirs.
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    for i in 0..6 {
        let (status, body) = apply(
            &cp,
            &json!([service(&format!("s{i}"), json!({"app": "s"}))]),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let all = eventually("all 6 Services have a VIP", WAIT, || async {
        let v = vips(&cp).await;
        (v.len() == 6 && v.iter().all(|(_, ip)| ip.starts_with("240.240."))).then_some(v)
    })
    .await;
    let distinct: std::collections::HashSet<_> = all.iter().map(|(_, ip)| ip).collect();
    assert_eq!(distinct.len(), 6, "{all:?}");
    cp.shutdown().await;
}

#[tokio::test]
async fn bad_apply_is_refused_whole_and_restart_keeps_resources() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (status, _) = apply(&cp, &mesh_resources()).await;
    assert_eq!(status, 200);
    let (_, before) = get(&cp, "/api/v1/resources/svc").await;

    // A good Service next to a route naming a Service that does not exist.
    let bad = json!([
        service("extra", json!({"app": "extra"})),
        {
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "broken"},
            "spec": {"parentRefs": [{"name": "catalog"}], "rules": [{"backendRefs": [{"name": "ghost"}]}]},
        },
    ]);
    let (status, body) = apply(&cp, &bad).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("refused"),
        "{body}"
    );
    let detail = &body["details"][0];
    assert!(
        detail["field"].as_str().unwrap().contains("backendRefs"),
        "{body}"
    );
    let (_, after) = get(&cp, "/api/v1/resources/svc").await;
    assert_eq!(before, after);
    let (status, _) = get(&cp, "/api/v1/resources/route/default/broken").await;
    assert_eq!(status, 404);

    // Unparseable input, and a dry run, change nothing either.
    let (status, body) = http(
        &cp,
        "POST",
        "/api/v1/apply",
        "application/yaml",
        "kind: Service\nmetadata: [\n",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let yaml = "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata:\n  name: dry\nspec:\n  selector: {app: dry}\n  ports: [{port: 80}]\n";
    let (status, body) = http(
        &cp,
        "POST",
        "/api/v1/apply?dryRun=true",
        "application/yaml",
        yaml,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["results"][0]["action"], "created");
    let (status, _) = get(&cp, "/api/v1/resources/svc/default/dry").await;
    assert_eq!(status, 404);

    // A Service still named by a route cannot be deleted; the route can.
    let (status, body) = http(
        &cp,
        "DELETE",
        "/api/v1/resources/svc/default/catalog-v2",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = http(
        &cp,
        "DELETE",
        "/api/v1/resources/routes/default/catalog-split",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["deleted"]["kind"], "HTTPRoute");
    let (status, _) = http(
        &cp,
        "DELETE",
        "/api/v1/resources/routes/default/catalog-split",
        "application/json",
        "",
    )
    .await;
    assert_eq!(status, 404);

    // The port is taken while this one runs.
    let mut clash = config(dir.path());
    clash.http_addr = cp.http_addr;
    let err = ControlPlane::start(clash).await.unwrap_err().to_string();
    assert!(
        err.contains(&format!("port {} is taken", cp.http_addr.port())),
        "{err}"
    );
    assert!(err.contains("--http-addr"), "{err}");

    cp.shutdown().await;
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (status, restored) = get(&cp, "/api/v1/resources/svc").await;
    assert_eq!(status, 200);
    assert_eq!(restored, before);
    let (status, _) = get(&cp, "/api/v1/resources/route/default/catalog-split").await;
    assert_eq!(status, 404);
    let (all, _) = cp.store().list(None).await.unwrap();
    assert_eq!(all.len(), 3);
    cp.shutdown().await;
}

#[tokio::test]
async fn dashboard_checks_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (status, page) = get(&cp, "/").await;
    assert_eq!(status, 200);
    assert!(page.as_str().unwrap().contains("<title>Trellis</title>"));

    let resp = trellis_testkit::http_request(
        http::Method::GET,
        &format!("http://{}/", cp.http_addr),
        &[("host", "evil.example:15080")],
        bytes::Bytes::new(),
        None,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 403, "{resp:?}");
    assert_eq!(
        resp.headers()
            .get("x-frame-options")
            .map(|v| v.to_str().unwrap().to_ascii_lowercase()),
        Some("deny".to_string()),
        "{resp:?}"
    );
    cp.shutdown().await;
}

#[tokio::test]
async fn a_reconnecting_instance_replaces_its_old_stream() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let reg = register(
        "catalog-0",
        "catalog",
        &[("app", "catalog")],
        "0.0.0.0:21003",
    );
    let mut old = FakeProxy::connect(&cp, reg.clone()).await;
    let first = old.config_where("anything", |_| true).await;
    let mut new = FakeProxy::connect(&cp, reg).await;
    let second = new.config_where("anything", |_| true).await;
    assert!(second.version > first.version);
    let status = tokio::time::timeout(WAIT, async {
        loop {
            match old.rx.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("the old stream ended without a status"),
                Err(status) => return status,
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(status.code(), tonic::Code::Aborted);
    let (_, proxies) = get(&cp, "/api/v1/proxies").await;
    let proxies = proxies.as_array().unwrap();
    assert_eq!(proxies.len(), 1);
    // Registered on every interface: reached at the stream's source address.
    assert_eq!(proxies[0]["inboundAddr"], "127.0.0.1:21003");
    cp.shutdown().await;
}

#[tokio::test]
async fn the_ca_signs_only_what_a_valid_token_grants() {
    use trellis_api::v1::SignRequest;
    use trellis_identity::keys::WorkloadKey;
    use trellis_identity::SpiffeId;

    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let identity = cp.identity();
    let (token, claims) =
        identity.create_token(&Grant::new("prod", "web"), Duration::from_secs(600));
    let mut client = ProxyApiClient::new(channel(&cp, &token).await);
    let web = SpiffeId::new("trellis.local", "prod", "web");
    let key = WorkloadKey::generate(&web).unwrap();

    // The granted identity is signed, with the bundle.
    let resp = client
        .sign(SignRequest {
            token: token.clone(),
            csr_pem: key.csr_pem.clone(),
        })
        .await
        .expect("signed")
        .into_inner();
    assert_eq!(resp.identity, web.to_string());
    let chain = trellis_identity::certs::certs_from_pem(&resp.certificate_chain_pem).unwrap();
    assert_eq!(trellis_identity::certs::spiffe_id(&chain[0]).unwrap(), web);
    assert_eq!(resp.trust_bundle_pem.len(), 1);

    // A CSR for another identity is refused.
    let admin = WorkloadKey::generate(&SpiffeId::new("trellis.local", "prod", "admin")).unwrap();
    let err = client
        .sign(SignRequest {
            token: token.clone(),
            csr_pem: admin.csr_pem,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");

    // A forged, an expired and a revoked token are refused.
    let forged = format!("{}x", token);
    let err = client
        .sign(SignRequest {
            token: forged,
            csr_pem: key.csr_pem.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let (expired, _) = identity.create_token(&Grant::new("prod", "web"), Duration::ZERO);
    let err = client
        .sign(SignRequest {
            token: expired,
            csr_pem: key.csr_pem.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("expired"), "{err:?}");
    identity.revoke(&claims.id).await.unwrap();
    let err = client
        .sign(SignRequest {
            token: token.clone(),
            csr_pem: key.csr_pem.clone(),
        })
        .await
        .unwrap_err();
    assert!(err.message().contains("revoked"), "{err:?}");

    // A proxy may not register as an identity its token does not grant.
    let (token, _) = identity.create_token(&Grant::new("dev", "client"), Duration::from_secs(600));
    let mut reg = register("spy-1", "spy", &[("app", "spy")], "127.0.0.1:1");
    reg.namespace = "prod".into();
    reg.service_account = "client".into();
    reg.token = token.clone();
    let (tx, rx) = mpsc::channel(4);
    tx.send(msg(proxy_message::Msg::Register(reg)))
        .await
        .unwrap();
    let mut client = ProxyApiClient::new(channel(&cp, &token).await);
    let err = client.stream(ReceiverStream::new(rx)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    cp.shutdown().await;
}

#[tokio::test]
async fn proxies_refuse_a_control_plane_their_token_does_not_pin() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let cp_a = ControlPlane::start(config(a.path())).await.unwrap();
    let cp_b = ControlPlane::start(config(b.path())).await.unwrap();
    // A token of control plane A pins A's root: B cannot pass for A.
    let (token, _) = cp_a
        .identity()
        .create_token(&Grant::new("prod", "web"), Duration::from_secs(600));
    let result = trellis_proxy::control::ControlClient::new(&cp_b.grpc_addr.to_string(), &token)
        .unwrap()
        .channel()
        .await;
    let Err(err) = result else {
        panic!("the handshake with the wrong control plane must fail");
    };
    assert!(
        matches!(err, trellis_proxy::control::ControlError::Connect(_)),
        "{err}"
    );
    cp_a.shutdown().await;
    cp_b.shutdown().await;
}

/// OTLP/gRPC spans sent to the proxy API's port need an admin API token,
/// like `POST /v1/traces`: none or a viewer's is refused and stores nothing.
#[tokio::test]
async fn otlp_grpc_spans_need_an_admin_token() {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    // The channel pins the mesh CA through a join token; the span export
    // itself carries an API token.
    let (join, _) = cp
        .identity()
        .create_token(&Grant::new("default", "app"), Duration::from_secs(600));
    let chan = channel(&cp, &join).await;
    let (viewer, _) = cp
        .auth()
        .create(trellis_control::auth::Role::Viewer, None, "test")
        .await
        .unwrap();
    let spans = |trace: u8| ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            scope_spans: vec![ScopeSpans {
                spans: vec![Span {
                    trace_id: vec![trace; 16],
                    span_id: vec![1; 8],
                    name: "GET /".into(),
                    start_time_unix_nano: 1_000,
                    end_time_unix_nano: 2_000,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let export = |credential: Option<String>, trace: u8| {
        let chan = chan.clone();
        async move {
            let mut req = tonic::Request::new(spans(trace));
            if let Some(c) = credential {
                req.metadata_mut()
                    .insert("authorization", format!("Bearer {c}").parse().unwrap());
            }
            TraceServiceClient::new(chan).export(req).await
        }
    };

    let none = export(None, 1).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated, "{none:?}");
    let join_as_api = export(Some(join.clone()), 2).await.unwrap_err();
    assert_eq!(
        join_as_api.code(),
        tonic::Code::Unauthenticated,
        "{join_as_api:?}"
    );
    let viewer_err = export(Some(viewer), 3).await.unwrap_err();
    assert_eq!(
        viewer_err.code(),
        tonic::Code::PermissionDenied,
        "{viewer_err:?}"
    );
    export(Some(cp.admin_token().to_string()), 4)
        .await
        .expect("an admin token may send spans");

    let (status, traces) = get(&cp, "/api/v1/traces").await;
    assert_eq!(status, 200, "{traces}");
    let ids: Vec<String> = traces["traces"]
        .as_array()
        .unwrap_or_else(|| panic!("a list of traces: {traces}"))
        .iter()
        .map(|t| t["traceId"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        ids,
        vec!["04".repeat(16)],
        "only the admin's spans are kept"
    );
    cp.shutdown().await;
}

/// A route change is computed for the proxies whose Config holds its
/// Service, not for every proxy.
#[tokio::test]
async fn a_route_change_recomputes_only_the_proxies_it_reaches() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let (status, body) = apply(
        &cp,
        &json!([
            service("catalog", json!({"app": "catalog"})),
            service("reviews", json!({"app": "reviews"})),
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let computed = || async {
        let (status, text) = get(&cp, "/metrics").await;
        assert_eq!(status, 200, "{text}");
        Metrics::parse(text.as_str().unwrap())
            .unwrap()
            .sum("trellis_control_configs_computed_total", &[])
    };

    let mut callers = Vec::new();
    for (i, svc) in ["catalog", "reviews", "reviews"].into_iter().enumerate() {
        let mut p = FakeProxy::connect(
            &cp,
            register(
                &format!("c-{i}"),
                "caller",
                &[],
                &format!("127.0.0.1:{}", 22001 + i),
            ),
        )
        .await;
        p.send(proxy_message::Msg::Subscribe(Subscribe {
            services: vec![format!("default/{svc}")],
        }))
        .await;
        p.config_where(svc, |c| service_in(c, svc).is_some()).await;
        callers.push(p);
    }
    let before = computed().await;

    let (status, body) = apply(
        &cp,
        &json!([{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": "catalog-timeout"},
            "spec": {
                "parentRefs": [{"kind": "Service", "name": "catalog"}],
                "rules": [{"backendRefs": [{"name": "catalog"}], "timeouts": {"request": "2s"}}],
            },
        }]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    callers[0]
        .config_where("the route", |c| {
            service_in(c, "catalog").is_some_and(|s| s.routes_json.len() == 1)
        })
        .await;
    // The Config is computed before it is sent: the count is final here.
    assert_eq!(
        computed().await - before,
        1.0,
        "only catalog's one subscriber is recomputed"
    );

    // A new Service still reaches every proxy.
    let before = computed().await;
    let (status, body) = apply(&cp, &json!([service("ratings", json!({"app": "ratings"}))])).await;
    assert_eq!(status, 200, "{body}");
    // At least once each: the Service's VIP, allocated just after the
    // apply, may come in the same batch or as a second change.
    eventually("every proxy recomputed", WAIT, || async {
        let n = computed().await - before;
        (n >= 3.0).then_some(n)
    })
    .await;
    cp.shutdown().await;
}

/// With an external source (Kubernetes), a proxy that comes before the
/// source is in gets nothing; its first Config holds the source's
/// endpoints. Before, a replica restarted in its pod sent one made of what
/// its store kept and no endpoints, and the proxy's calls failed with 503.
#[tokio::test]
async fn an_external_source_holds_proxies_until_it_is_in() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.external_source = true;
    let cp = ControlPlane::start(cfg).await.unwrap();
    // What the store kept from the replica's last run.
    let (status, body) = apply(&cp, &json!([service("catalog", json!({"app": "catalog"}))])).await;
    assert_eq!(status, 200, "{body}");

    let mut caller = FakeProxy::connect(
        &cp,
        register("web-0", "web", &[("app", "web")], "127.0.0.1:23001"),
    )
    .await;
    caller
        .send(proxy_message::Msg::Subscribe(Subscribe {
            services: vec!["default/catalog".into()],
        }))
        .await;
    eventually("the caller registered", WAIT, || async {
        let (_, v) = get(&cp, "/api/v1/proxies").await;
        let n = v.as_array()?.len();
        (n == 1).then_some(n)
    })
    .await;

    let endpoint = trellis_api::v1::Endpoint {
        address: "10.9.0.7:8080".into(),
        instance: "catalog-7".into(),
        workload: "catalog".into(),
        namespace: "default".into(),
        identity: "spiffe://trellis.local/ns/default/sa/catalog".into(),
        ..Default::default()
    };
    let xds = cp.xds();
    let catalog = trellis_control::registry::ServiceName::new("default", "catalog");
    xds.set_external_endpoints(
        std::sync::Arc::new([(catalog.clone(), vec![endpoint])].into()),
        Some([(catalog, "10.96.0.10".parse().unwrap())].into()),
    )
    .await;
    xds.source_synced(cp.store().revision().await.unwrap())
        .await;

    // The first Config it gets, not a later one.
    let first = caller.config_where("the first Config", |_| true).await;
    assert_eq!(endpoint_addrs(&first, "catalog"), ["10.9.0.7:8080"]);
    cp.shutdown().await;
}

/// After a CA rotation, a proxy whose join token pins the new root joins
/// without a restart of the control plane; and after the old root is
/// retired, so does one whose token pins the new root.
#[tokio::test]
async fn proxies_join_after_a_ca_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(config(dir.path())).await.unwrap();
    let old = cp.identity().pin();
    cp.identity().rotate("trellis.local").await.unwrap();
    assert_ne!(cp.identity().pin(), old);
    let mut p = FakeProxy::connect(
        &cp,
        register("web-0", "web", &[("app", "web")], "127.0.0.1:24001"),
    )
    .await;
    p.config_where("a first Config", |_| true).await;
    cp.identity().retire().await.unwrap();
    let mut q = FakeProxy::connect(
        &cp,
        register("web-1", "web", &[("app", "web")], "127.0.0.1:24002"),
    )
    .await;
    q.config_where("a first Config", |_| true).await;
    cp.shutdown().await;
}
