use http::Method;
use serde_json::json;

use super::*;
use crate::source::Rejected;
use crate::testing::{mock, step};

fn state() -> MeshState {
    let mut s = MeshState::default();
    for name in ["web", "web-v1"] {
        s.endpoints.insert(("shop".into(), name.into()), Vec::new());
    }
    s
}

fn route(backends: serde_json::Value, parents: serde_json::Value) -> serde_json::Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "split", "namespace": "shop", "generation": 3, "resourceVersion": "9"},
        "spec": {"parentRefs": parents, "rules": [{"backendRefs": backends}]},
    })
}

fn svc(name: &str) -> serde_json::Value {
    json!({"group": "", "kind": "Service", "name": name})
}

fn conditions(parents: &[serde_json::Value]) -> Vec<(String, String, String)> {
    parents[0]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["type"].as_str().unwrap().into(),
                c["status"].as_str().unwrap().into(),
                c["reason"].as_str().unwrap().into(),
            )
        })
        .collect()
}

const NOW: &str = "2026-12-01T10:00:00Z";

#[test]
fn a_route_whose_refs_all_resolve_is_accepted_and_resolved() {
    let r = route(json!([{"name": "web-v1", "port": 80}]), json!([svc("web")]));
    let p = desired_parents(&r, &state(), NOW);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0]["controllerName"], "trellis.dev/control-plane");
    assert_eq!(p[0]["parentRef"], svc("web"));
    assert_eq!(
        conditions(&p),
        [
            ("Accepted".into(), "True".into(), "Accepted".into()),
            ("ResolvedRefs".into(), "True".into(), "ResolvedRefs".into())
        ]
    );
    assert_eq!(p[0]["conditions"][0]["observedGeneration"], 3);
}

#[test]
fn a_missing_backend_is_backend_not_found_with_its_name() {
    let r = route(
        json!([{"name": "web-v1"}, {"name": "gone", "port": 80}]),
        json!([svc("web")]),
    );
    let p = desired_parents(&r, &state(), NOW);
    assert_eq!(
        conditions(&p)[1],
        (
            "ResolvedRefs".into(),
            "False".into(),
            "BackendNotFound".into()
        )
    );
    assert!(p[0]["conditions"][1]["message"]
        .as_str()
        .unwrap()
        .contains("shop/gone"));
}

#[test]
fn a_backend_that_is_not_a_service_is_invalid_kind() {
    let r = route(
        json!([{"group": "x.example", "kind": "Bucket", "name": "b"}]),
        json!([svc("web")]),
    );
    assert_eq!(
        conditions(&desired_parents(&r, &state(), NOW))[1].2,
        "InvalidKind"
    );
}

#[test]
fn a_missing_parent_or_an_unusable_route_is_not_accepted() {
    let r = route(json!([{"name": "web"}]), json!([svc("nope")]));
    assert_eq!(
        conditions(&desired_parents(&r, &state(), NOW))[0].2,
        "NoMatchingParent"
    );
    let mut s = state();
    s.rejected.push(Rejected {
        object: "HTTPRoute shop/split".into(),
        reason: "spec.rules[0].filters[0]: unknown".into(),
    });
    let r = route(json!([{"name": "web"}]), json!([svc("web")]));
    let p = desired_parents(&r, &s, NOW);
    assert_eq!(
        conditions(&p)[0],
        ("Accepted".into(), "False".into(), "UnsupportedValue".into())
    );
    assert!(p[0]["conditions"][0]["message"]
        .as_str()
        .unwrap()
        .contains("filters[0]"));
}

#[test]
fn gateway_parents_get_no_entry_from_the_mesh() {
    let r = route(
        json!([{"name": "web"}]),
        json!([{"name": "public-gw"}, svc("web")]),
    );
    assert_eq!(desired_parents(&r, &state(), NOW).len(), 1);
}

#[test]
fn other_controllers_entries_stay_and_unchanged_conditions_keep_their_time() {
    let other = json!({"parentRef": {"name": "public-gw"}, "controllerName": "example.com/gateway", "conditions": []});
    let r = route(json!([{"name": "web"}]), json!([svc("web")]));
    let first = desired_parents(&r, &state(), "2026-12-01T09:00:00Z");
    let existing = vec![other.clone(), first[0].clone()];
    let merged = merge_parents(&existing, desired_parents(&r, &state(), NOW));
    assert_eq!(merged[0], other);
    assert_eq!(
        merged[1]["conditions"][0]["lastTransitionTime"],
        "2026-12-01T09:00:00Z"
    );
    assert_eq!(merged, existing, "nothing changed, nothing to write");
}

#[tokio::test]
async fn the_status_is_patched_at_the_version_read_and_only_when_it_changes() {
    let path = "/apis/gateway.networking.k8s.io/v1/namespaces/shop/httproutes/split/status";
    let r = route(json!([{"name": "web"}]), json!([svc("web")]));
    let (client, seen, task) = mock(vec![step(Method::PATCH, path, 200, r.clone())]);
    let api: Api<gateway_api::httproutes::HttpRoute> = Api::namespaced(client, "shop");
    assert!(write(&api, &r, &state(), NOW).await.unwrap());
    task.await.unwrap();
    let body = seen.lock().unwrap()[0].body.clone();
    assert_eq!(body["metadata"]["resourceVersion"], "9");
    assert_eq!(
        body["status"]["parents"][0]["controllerName"],
        "trellis.dev/control-plane"
    );

    let mut written = r.clone();
    written["status"] = json!({"parents": desired_parents(&r, &state(), NOW)});
    let (client, seen, task) = mock(vec![]);
    let api: Api<gateway_api::httproutes::HttpRoute> = Api::namespaced(client, "shop");
    assert!(!write(&api, &written, &state(), "2026-12-01T11:00:00Z")
        .await
        .unwrap());
    task.await.unwrap();
    assert!(seen.lock().unwrap().is_empty());
}
