use base64::Engine as _;
use http::Method;
use serde_json::{json, Value};

use super::*;
use crate::testing::{mock, step};

fn admission(namespace: &str) -> AdmissionReview<DynamicObject> {
    serde_json::from_value(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "web-", "namespace": namespace, "labels": {"app": "web"}},
                "spec": {"containers": [{"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]}]},
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }))
    .unwrap()
}

fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
    BTreeMap::from([
        (
            "shop".to_string(),
            BTreeMap::from([("trellis.dev/inject".to_string(), "enabled".to_string())]),
        ),
        ("plain".to_string(), BTreeMap::new()),
    ])
}

fn cfg() -> InjectConfig {
    InjectConfig::new("trellis.local/trellis:test", "trellis-system")
}

#[test]
fn a_pod_of_a_labelled_namespace_is_admitted_with_the_injection_as_a_json_patch() {
    let out = review(admission("shop"), &cfg(), &namespaces());
    let resp = &out["response"];
    assert_eq!(resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    let ops = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().unwrap())
        .unwrap();
    let ops: json_patch::Patch = serde_json::from_slice(&ops).unwrap();
    let mut pod: Value =
        serde_json::to_value(admission("shop")).unwrap()["request"]["object"].clone();
    json_patch::patch(&mut pod, &ops).unwrap();
    assert_eq!(pod["spec"]["initContainers"][0]["name"], "trellis-init");
    assert_eq!(pod["spec"]["initContainers"][1]["name"], "trellis-proxy");
    assert_eq!(pod["spec"]["initContainers"][1]["restartPolicy"], "Always");
    assert_eq!(pod["spec"]["containers"].as_array().unwrap().len(), 1);
}

#[test]
fn other_pods_are_admitted_unchanged() {
    for ns in ["plain", "unknown", "kube-system", "trellis-system"] {
        let out = review(admission(ns), &cfg(), &namespaces());
        assert_eq!(out["response"]["allowed"], true, "{ns}");
        assert!(out["response"].get("patch").is_none(), "{ns}");
    }
}

#[test]
fn a_pod_that_cannot_be_injected_is_admitted_with_a_warning() {
    let mut review_in = serde_json::to_value(admission("shop")).unwrap();
    review_in["request"]["object"]["metadata"]["annotations"] =
        json!({"trellis.dev/exclude-inbound-ports": "http"});
    let review_in = serde_json::from_value(review_in).unwrap();
    let out = review(review_in, &cfg(), &namespaces());
    assert_eq!(out["response"]["allowed"], true);
    assert!(out["response"].get("patch").is_none());
    let warning = out["response"]["warnings"][0].as_str().unwrap();
    assert!(warning.contains("exclude-inbound-ports"), "{warning}");
}

fn config(bundle: Option<&str>) -> Value {
    let hook = |name: &str| {
        let mut cc = json!({"service": {"name": "trellis-webhook", "namespace": "trellis-system", "path": "/inject"}});
        if let Some(b) = bundle {
            cc["caBundle"] = json!(base64::engine::general_purpose::STANDARD.encode(b));
        }
        json!({"name": name, "clientConfig": cc, "sideEffects": "None", "admissionReviewVersions": ["v1"]})
    };
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": WEBHOOK_CONFIG},
        "webhooks": [hook("namespace.sidecar-injector.trellis.dev"), hook("object.sidecar-injector.trellis.dev")],
    })
}

const PATH: &str =
    "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/trellis-sidecar-injector";

#[tokio::test]
async fn the_ca_bundle_is_set_on_every_webhook_that_lacks_it() {
    let (client, seen, task) = mock(vec![
        step(Method::GET, PATH, 200, config(None)),
        step(Method::PATCH, PATH, 200, config(Some("ROOTS"))),
    ]);
    assert!(ensure_ca_bundle(client, "ROOTS").await.unwrap());
    task.await.unwrap();
    let patch = seen.lock().unwrap()[1].body.clone();
    let encoded = base64::engine::general_purpose::STANDARD.encode("ROOTS");
    assert_eq!(
        patch,
        json!([
            {"op": "test", "path": "/webhooks/0/name", "value": "namespace.sidecar-injector.trellis.dev"},
            {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": encoded},
            {"op": "test", "path": "/webhooks/1/name", "value": "object.sidecar-injector.trellis.dev"},
            {"op": "add", "path": "/webhooks/1/clientConfig/caBundle", "value": encoded},
        ])
    );
}

#[tokio::test]
async fn a_right_ca_bundle_is_left_alone() {
    let (client, seen, task) = mock(vec![step(Method::GET, PATH, 200, config(Some("ROOTS")))]);
    assert!(!ensure_ca_bundle(client, "ROOTS").await.unwrap());
    task.await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_missing_configuration_says_to_install() {
    let (client, _, task) = mock(vec![step(
        Method::GET,
        PATH,
        404,
        crate::testing::status_error(404, "NotFound"),
    )]);
    let err = ensure_ca_bundle(client, "ROOTS").await.unwrap_err();
    assert!(err.to_string().contains("trellis install"), "{err}");
    task.await.unwrap();
}
