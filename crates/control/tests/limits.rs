//! A control plane that protects itself (issue 12, item 4): nested input
//! refused at once while the control plane keeps answering, Kubernetes'
//! limits on metadata, the document count, and the Config budget, with a
//! fake proxy on the real gRPC API. Every refused apply leaves the stored
//! resources as they were.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{
    control_message, proxy_message, Config, ControlMessage, ProxyMessage, Register, Subscribe,
};
use trellis_control::{ControlConfig, ControlPlane};
use trellis_identity::token::Grant;
use trellis_testkit::eventually;

const WAIT: Duration = Duration::from_secs(15);
/// How long an answer may take before the test gives up on it: a liveness
/// guard so that a control plane that stopped answering fails the test
/// instead of hanging it, not a speed assertion (figures are printed).
const ANSWER: Duration = Duration::from_secs(60);

async fn start() -> (tempfile::TempDir, ControlPlane) {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ControlConfig::new(dir.path());
    cfg.http_addr = "127.0.0.1:0".parse().unwrap();
    cfg.grpc_addr = "127.0.0.1:0".parse().unwrap();
    let cp = ControlPlane::start(cfg).await.unwrap();
    (dir, cp)
}

async fn http(
    cp: &ControlPlane,
    method: &str,
    path: &str,
    ctype: &str,
    body: String,
) -> (u16, Value) {
    let auth = format!("Bearer {}", cp.admin_token());
    let resp = trellis_testkit::http_request(
        method.parse().expect("an HTTP method"),
        &format!("http://{}{path}", cp.http_addr),
        &[("content-type", ctype), ("authorization", &auth)],
        bytes::Bytes::from(body),
        None,
    )
    .await
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let text = String::from_utf8_lossy(resp.body()).into_owned();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (resp.status().as_u16(), v)
}

async fn apply(cp: &ControlPlane, resources: &Value) -> (u16, Value) {
    http(
        cp,
        "POST",
        "/api/v1/apply",
        "application/json",
        resources.to_string(),
    )
    .await
}

/// Every stored resource, to show a refused apply changed nothing.
async fn stored(cp: &ControlPlane) -> Vec<Value> {
    let mut all = Vec::new();
    for kind in ["Service", "HTTPRoute"] {
        let (status, body) = http(
            cp,
            "GET",
            &format!("/api/v1/resources/{kind}"),
            "",
            String::new(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        all.extend(body["items"].as_array().unwrap().iter().cloned());
    }
    all
}

fn service(name: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "trellis.dev/v1alpha1", "kind": "Service",
        "metadata": {"name": name, "annotations": annotations},
        "spec": {"selector": {"app": name}, "ports": [{"port": 8080}]},
    })
}

fn route(name: &str, parent: &str, paths: usize) -> Value {
    // Many path matches, each with a long (valid) prefix: a big route.
    let matches: Vec<Value> = (0..paths)
        .map(|i| json!({"path": {"type": "PathPrefix", "value": format!("/{i}/{}", "p".repeat(200))}}))
        .collect();
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name},
        "spec": {"parentRefs": [{"name": parent}], "rules": [{"matches": matches, "backendRefs": [{"name": parent}]}]},
    })
}

struct FakeProxy {
    tx: mpsc::Sender<ProxyMessage>,
    rx: Streaming<ControlMessage>,
}

impl FakeProxy {
    async fn connect(cp: &ControlPlane, instance: &str, subscriptions: &[&str]) -> FakeProxy {
        let mut register = Register {
            instance: instance.into(),
            workload: "web".into(),
            namespace: "default".into(),
            service_account: "web".into(),
            inbound_addr: "127.0.0.1:1".into(),
            subscriptions: subscriptions.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        let grant = Grant::new("default", "web");
        let (token, _) = cp.identity().create_token(&grant, Duration::from_secs(600));
        register.token = token.clone();
        let channel = trellis_proxy::control::ControlClient::new(&cp.grpc_addr.to_string(), &token)
            .unwrap()
            .channel()
            .await
            .unwrap();
        // The proxy's own decode limit.
        let mut client = ProxyApiClient::new(channel)
            .max_decoding_message_size(trellis_api::MAX_CONTROL_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel(16);
        tx.send(ProxyMessage {
            msg: Some(proxy_message::Msg::Register(register)),
        })
        .await
        .unwrap();
        let rx = client
            .stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        FakeProxy { tx, rx }
    }

    /// The next Config satisfying `pred`; a stream error fails the test.
    async fn config_where(&mut self, what: &str, pred: impl Fn(&Config) -> bool) -> Config {
        tokio::time::timeout(WAIT, async {
            loop {
                let m = self
                    .rx
                    .message()
                    .await
                    .expect("the stream stays up")
                    .expect("stream ended");
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

fn nested_json(levels: usize) -> String {
    format!("{}1{}", "{\"a\":".repeat(levels), "}".repeat(levels))
}

fn nested_yaml(levels: usize) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nspec: {}1{}\n",
        "{a: ".repeat(levels),
        "}".repeat(levels)
    )
}

/// Finding: an apply of 100k-level nested input kept a worker busy for
/// 90 s, and two stopped the control plane answering HTTP and gRPC. Now
/// both are refused with 400 at once, and /readyz and a proxy's stream
/// are answered meanwhile (durations printed, not asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_applies_are_refused_and_the_control_plane_keeps_answering() {
    let (_dir, cp) = start().await;
    let (status, body) = apply(&cp, &json!([service("catalog", json!({}))])).await;
    assert_eq!(status, 200, "{body}");
    let before = stored(&cp).await;
    let mut proxy = FakeProxy::connect(&cp, "web-0", &[]).await;
    proxy.config_where("the first config", |_| true).await;

    let json_body = nested_json(100_000);
    let yaml_body = nested_yaml(100_000);
    println!(
        "nested bodies: JSON {} bytes, YAML {} bytes",
        json_body.len(),
        yaml_body.len()
    );
    let cp = std::sync::Arc::new(cp);
    let started = Instant::now();
    let applies: Vec<_> = [
        ("application/json", json_body),
        ("application/yaml", yaml_body),
    ]
    .into_iter()
    .map(|(ctype, body)| {
        let cp = cp.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let r = http(&cp, "POST", "/api/v1/apply", ctype, body).await;
            (ctype, r, t.elapsed())
        })
    })
    .collect();

    // Meanwhile: the HTTP API and the proxy API answer.
    let t = Instant::now();
    let (status, _) = tokio::time::timeout(ANSWER, http(&cp, "GET", "/readyz", "", String::new()))
        .await
        .expect("/readyz answers while nested applies run");
    assert_eq!(status, 200);
    println!(
        "/readyz answered in {:?} during the nested applies",
        t.elapsed()
    );
    let t = Instant::now();
    proxy
        .tx
        .send(ProxyMessage {
            msg: Some(proxy_message::Msg::Subscribe(Subscribe {
                services: vec!["default/catalog".into()],
            })),
        })
        .await
        .unwrap();
    proxy
        .config_where("catalog after subscribing", |c| {
            c.services.iter().any(|s| s.name == "catalog")
        })
        .await;
    println!(
        "a proxy's Subscribe was answered in {:?} during the nested applies",
        t.elapsed()
    );

    for task in applies {
        let (ctype, (status, body), took) = tokio::time::timeout(ANSWER, task)
            .await
            .expect("a nested apply is answered")
            .unwrap();
        println!("nested {ctype} apply refused with {status} in {took:?}");
        assert_eq!(status, 400, "{body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("nested deeper than 32 levels"), "{error}");
        assert!(error.len() < 500, "the error quotes no input: {error}");
    }
    println!(
        "both nested applies done {:?} after they started",
        started.elapsed()
    );
    assert_eq!(stored(&cp).await, before);
}

/// Finding: a Service with a 5 MB annotation was accepted. Now it, and
/// oversized names and labels, are refused naming the field and the limit,
/// quoting at most a prefix of the input.
#[tokio::test]
async fn oversized_metadata_and_too_many_documents_are_refused() {
    let (_dir, cp) = start().await;
    let (status, body) = apply(&cp, &json!([service("catalog", json!({}))])).await;
    assert_eq!(status, 200, "{body}");
    let before = stored(&cp).await;

    let huge = "x".repeat(5 << 20);
    let (status, body) = apply(&cp, &json!([service("big", json!({"note": huge}))])).await;
    assert_eq!(
        status,
        400,
        "{}",
        &body.to_string()[..300.min(body.to_string().len())]
    );
    let detail = &body["details"][0];
    assert_eq!(detail["field"], "metadata.annotations.note", "{detail}");
    assert!(
        detail["reason"].as_str().unwrap().contains("262144"),
        "{detail}"
    );
    assert!(body.to_string().len() < 4096, "the answer echoes no input");

    let long = "a".repeat(300);
    let (status, body) = apply(&cp, &json!([service(&long, json!({}))])).await;
    assert_eq!(status, 400);
    assert_eq!(body["details"][0]["field"], "metadata.name", "{body}");
    assert!(
        body["details"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("(300 bytes)"),
        "{body}"
    );

    let mut labelled = service("labelled", json!({}));
    labelled["metadata"]["labels"] = json!({"app": "v".repeat(64)});
    let (status, body) = apply(&cp, &json!([labelled])).await;
    assert_eq!(status, 400);
    assert_eq!(body["details"][0]["field"], "metadata.labels.app", "{body}");
    assert!(
        body["details"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("at most 63"),
        "{body}"
    );

    let many = "kind: Service\n---\n".repeat(trellis_resource::limits::MAX_DOCUMENTS + 1);
    let (status, body) = http(&cp, "POST", "/api/v1/apply", "application/yaml", many).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("over the limit of 10000"),
        "{body}"
    );

    let over = " ".repeat(trellis_resource::limits::MAX_INPUT_BYTES + 1);
    let (status, body) = http(&cp, "POST", "/api/v1/apply", "application/yaml", over).await;
    assert_eq!(status, 413, "{body}");

    assert_eq!(stored(&cp).await, before);
}

/// Finding: Configs over the proxy's 4 MiB gRPC limit made proxies
/// reconnect about 11 times a second. Now an apply that would push a
/// connected proxy's Config over the budget is refused naming the
/// resource, and a Config over the budget anyway is never sent: the proxy
/// keeps its stream and its last Config, and its state says why.
#[tokio::test]
async fn configs_stay_within_the_budget() {
    let (_dir, cp) = start().await;
    let (status, body) = apply(&cp, &json!([service("catalog", json!({}))])).await;
    assert_eq!(status, 200, "{body}");
    let mut proxy = FakeProxy::connect(&cp, "web-0", &["default/catalog"]).await;
    let first = proxy
        .config_where("catalog", |c| {
            c.services.iter().any(|s| s.name == "catalog")
        })
        .await;

    // Routes of about 480 KB each: five together are over 2 MiB.
    let routes: Vec<Value> = (0..5)
        .map(|i| route(&format!("r{i}"), "catalog", 1900))
        .collect();
    let one = routes[0].to_string().len();
    assert!(
        one < trellis_resource::limits::MAX_RESOURCE_BYTES
            && 5 * one > trellis_api::CONFIG_BUDGET_BYTES
    );
    let before = stored(&cp).await;
    let (status, body) = apply(&cp, &Value::Array(routes.clone())).await;
    assert_eq!(status, 400, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(
        error.contains("HTTPRoute default/r"),
        "names the resource: {error}"
    );
    assert!(
        error.contains("web-0") && error.contains("2097152"),
        "{error}"
    );
    assert_eq!(stored(&cp).await, before);

    // Applied one at a time, each under the budget, the last one over it:
    // refused, naming that route.
    for r in &routes[..4] {
        let (status, body) = apply(&cp, &json!([r])).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = apply(&cp, &json!([routes[4]])).await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("HTTPRoute default/r4"),
        "{body}"
    );
    let with_four = proxy
        .config_where("four routes", |c| {
            c.services.iter().any(|s| s.routes_json.len() == 4)
        })
        .await;
    assert!(with_four.version > first.version);

    // A Service with big annotations, accepted while no proxy follows it;
    // once this proxy subscribes, its Config is over the budget: never
    // sent, and the stream stays up.
    let note = "n".repeat(250 << 10);
    let (status, body) = apply(&cp, &json!([service("extra", json!({"a": note}))])).await;
    assert_eq!(status, 200, "{body}");
    proxy
        .tx
        .send(ProxyMessage {
            msg: Some(proxy_message::Msg::Subscribe(Subscribe {
                services: vec!["default/extra".into()],
            })),
        })
        .await
        .unwrap();
    let withheld = eventually(
        "the proxy's state to say its Config is withheld",
        WAIT,
        || async {
            let (_, proxies) = http(&cp, "GET", "/api/v1/proxies", "", String::new()).await;
            proxies[0]["configWithheld"].as_str().map(str::to_string)
        },
    )
    .await;
    println!("withheld: {withheld}");
    assert!(withheld.contains("over the budget"), "{withheld}");
    let metrics = http(&cp, "GET", "/metrics", "", String::new()).await.1;
    assert!(
        metrics
            .as_str()
            .unwrap()
            .contains("trellis_control_configs_over_budget_total 1"),
        "counted once"
    );
    // The stream is up (no error, no reconnect): a change within the budget
    // (deleting a route) reaches the proxy on the same stream.
    let (status, body) = http(
        &cp,
        "DELETE",
        "/api/v1/resources/HTTPRoute/default/r3",
        "",
        String::new(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let back = proxy
        .config_where("extra and three routes", |c| {
            c.services.iter().any(|s| s.name == "extra")
                && c.services.iter().any(|s| s.routes_json.len() == 3)
        })
        .await;
    assert!(prost::Message::encoded_len(&back) <= trellis_api::CONFIG_BUDGET_BYTES);
    let (_, proxies) = http(&cp, "GET", "/api/v1/proxies", "", String::new()).await;
    assert!(proxies[0]["configWithheld"].is_null(), "{}", proxies[0]);
}

/// Writes validate against the resources the xds actor holds once it has
/// seen every earlier write (not a fresh read of the store): each write
/// here depends on the one just before it, sent at once, and must see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_write_is_validated_against_every_write_before_it() {
    let (_dir, cp) = start().await;
    for i in 0..20 {
        let svc = format!("svc-{i}");
        let (status, body) = apply(&cp, &json!([service(&svc, json!({}))])).await;
        assert_eq!(status, 200, "{body}");
        // A route may only name a Service that exists: the one just applied.
        let (status, body) = apply(&cp, &json!([route(&format!("r-{i}"), &svc, 1)])).await;
        assert_eq!(
            status, 200,
            "round {i}: the route's Service is not seen: {body}"
        );
        // A Service takes one TrafficPolicy: the second sees the first.
        let policy = |name: &str| {
            json!({
                "apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
                "metadata": {"name": name},
                "spec": {"targetRef": {"kind": "Service", "name": svc}},
            })
        };
        let (status, body) = apply(&cp, &json!([policy(&format!("a-{i}"))])).await;
        assert_eq!(status, 200, "{body}");
        let (status, body) = apply(&cp, &json!([policy(&format!("b-{i}"))])).await;
        assert_ne!(
            status, 200,
            "round {i}: a second TrafficPolicy was accepted"
        );
        assert!(
            body.to_string().contains("already has a TrafficPolicy"),
            "{body}"
        );
        // A Service that a route names cannot be deleted.
        let (status, body) = http(
            &cp,
            "DELETE",
            &format!("/api/v1/resources/Service/default/{svc}"),
            "",
            String::new(),
        )
        .await;
        assert_ne!(status, 200, "round {i}: deleted a Service a route names");
        assert!(body.to_string().contains("still used by"), "{body}");
    }
}
