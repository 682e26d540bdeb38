use serde_json::json;

use super::*;

fn obj<T: DeserializeOwned>(v: serde_json::Value) -> Arc<T> {
    Arc::new(serde_json::from_value(v).unwrap())
}

fn pod(name: &str, ip: &str, sa: &str, injected: bool) -> Arc<Pod> {
    let mut annotations = json!({});
    if injected {
        annotations["trellis.dev/injected"] = json!("0.1.0");
    }
    obj(json!({
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"),
                     "labels": {"app": "web", "pod-template-hash": "abc"},
                     "annotations": annotations,
                     "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-abc",
                                          "uid": "rs", "controller": true}]},
        "spec": {"serviceAccountName": sa, "nodeName": "node-1", "containers": [{"name": "app"}]},
        "status": {"podIP": ip},
    }))
}

fn endpoint(
    pod: &str,
    ip: &str,
    ready: bool,
    serving: bool,
    terminating: bool,
) -> serde_json::Value {
    json!({"addresses": [ip], "conditions": {"ready": ready, "serving": serving, "terminating": terminating},
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}, "zone": "zone-a"})
}

fn inputs() -> Inputs {
    Inputs {
        namespaces: vec![obj(
            json!({"metadata": {"name": "shop", "labels": {"trellis.dev/inject": "enabled"}}}),
        )],
        nodes: vec![obj(
            json!({"metadata": {"name": "node-1", "labels": {"topology.kubernetes.io/zone": "zone-a"}}}),
        )],
        services: vec![
            obj(json!({"metadata": {"name": "web", "namespace": "shop",
                                    "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"}},
                       "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "web"},
                                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                          {"name": "grpc-api", "port": 9090, "targetPort": 9090},
                                          {"name": "dns", "port": 53, "protocol": "UDP"}]}})),
            obj(json!({"metadata": {"name": "db", "namespace": "shop"},
                       "spec": {"clusterIP": "None", "ports": [{"port": 5432, "appProtocol": "postgresql"}]}})),
        ],
        endpoint_slices: vec![obj(json!({
            "metadata": {"name": "web-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}, {"name": "grpc-api", "port": 9090}],
            "endpoints": [
                endpoint("web-1", "10.244.0.5", true, true, false),
                endpoint("web-2", "10.244.0.6", false, true, true),
                endpoint("plain", "10.244.0.7", true, true, false),
            ],
        }))],
        pods: vec![
            pod("web-1", "10.244.0.5", "web", true),
            pod("web-2", "10.244.0.6", "web", true),
            pod("plain", "10.244.0.7", "web", false),
        ],
        ..Default::default()
    }
}

fn key(ns: &str, name: &str) -> ServiceRef {
    (ns.to_string(), name.to_string())
}

#[test]
fn services_become_model_services_with_their_cluster_ip_as_vip() {
    let state = translate(&inputs());
    let web = state
        .resources
        .iter()
        .find(|r| r.metadata.name == "web")
        .and_then(Resource::as_service)
        .unwrap();
    assert_eq!(web.selector["app"], "web");
    let ports: Vec<(u16, Option<u16>, Option<Protocol>)> = web
        .ports
        .iter()
        .map(|p| (p.port, p.target_port, p.protocol))
        .collect();
    // UDP is not meshed; a named targetPort is resolved from the slices;
    // the protocol comes from appProtocol or the port's name.
    assert_eq!(
        ports,
        [
            (80, Some(8080), Some(Protocol::Http)),
            (9090, Some(9090), Some(Protocol::Grpc))
        ]
    );
    assert_eq!(
        state.vips[&key("shop", "web")],
        "10.96.0.20".parse::<Ipv4Addr>().unwrap()
    );
    // A headless Service is in the model without a VIP.
    assert!(!state.vips.contains_key(&key("shop", "db")));
    let db = state
        .resources
        .iter()
        .find(|r| r.metadata.name == "db")
        .and_then(Resource::as_service)
        .unwrap();
    assert_eq!(db.ports[0].protocol, Some(Protocol::Tcp));
    // Annotations other than Trellis's stay out of the Configs.
    let web_meta = &state
        .resources
        .iter()
        .find(|r| r.metadata.name == "web")
        .unwrap()
        .metadata;
    assert!(web_meta.annotations.is_empty());
}

#[test]
fn endpoints_come_from_endpoint_slices_and_pods_with_their_identity() {
    let state = translate(&inputs());
    let eps = &state.endpoints[&key("shop", "web")];
    // The pod without the sidecar is no mesh endpoint.
    let pods: Vec<&str> = eps.iter().map(|e| e.pod.as_str()).collect();
    assert_eq!(pods, ["web-1", "web-2"]);
    let e = &eps[0];
    assert_eq!(e.address, "10.244.0.5:15006");
    assert_eq!(e.identity, "spiffe://trellis.local/ns/shop/sa/web");
    assert_eq!(e.workload, "web");
    assert_eq!(e.zone.as_deref(), Some("zone-a"));
    assert_eq!(e.labels[ZONE_LABEL], "zone-a");
    assert!(e.ready && !e.terminating);
    assert!(eps[1].terminating && !eps[1].ready && eps[1].serving);
    // Pods are known with their identity and zone (from the node).
    let p = &state.pods[&("shop".to_string(), "web-1".to_string())];
    assert_eq!(
        (p.service_account.as_str(), p.zone.as_deref(), p.injected),
        ("web", Some("zone-a"), true)
    );
    assert_eq!(
        state.namespace_labels["shop"]["trellis.dev/inject"],
        "enabled"
    );
}

#[test]
fn proxies_get_ready_endpoints_else_the_terminating_ones_still_serving() {
    let state = translate(&inputs());
    let sent: Vec<String> = state
        .proxy_endpoints(&key("shop", "web"))
        .into_iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(sent, ["10.244.0.5:15006"]);
    let mut only_terminating = inputs();
    only_terminating.endpoint_slices = vec![obj(json!({
        "metadata": {"name": "web-x1", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "addressType": "IPv4",
        "endpoints": [endpoint("web-2", "10.244.0.6", false, true, true), endpoint("web-1", "10.244.0.5", false, false, true)],
    }))];
    let state = translate(&only_terminating);
    let sent: Vec<String> = state
        .proxy_endpoints(&key("shop", "web"))
        .into_iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(sent, ["10.244.0.6:15006"]);
    assert!(state.proxy_endpoints(&key("shop", "nope")).is_empty());
}

#[test]
fn a_pod_being_deleted_is_no_ready_endpoint_before_its_slice_says_so() {
    let mut deleting = inputs();
    // web-1's slice still says ready; the pod itself is being deleted.
    let mut web1 = (*pod("web-1", "10.244.0.5", "web", true)).clone();
    web1.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
    ));
    deleting.pods[0] = Arc::new(web1);
    let state = translate(&deleting);
    let e = &state.endpoints[&key("shop", "web")][0];
    assert_eq!(e.pod, "web-1");
    assert!(!e.ready && e.terminating && e.serving);
    // No ready endpoint left: the serving ones while they terminate.
    let sent: Vec<String> = state
        .proxy_endpoints(&key("shop", "web"))
        .into_iter()
        .map(|e| e.address)
        .collect();
    assert_eq!(sent, ["10.244.0.5:15006", "10.244.0.6:15006"]);
}

#[test]
fn the_mesh_sets_the_trust_domain_and_crds_become_model_resources() {
    let mut i = inputs();
    i.meshes = vec![obj(
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
        "metadata": {"name": "default"}, "spec": {"trustDomain": "corp.example", "mtls": "permissive"}}),
    )];
    i.traffic_policies = vec![obj(
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"targetRef": {"name": "web"}, "loadBalancer": {"type": "round-robin"}}}),
    )];
    i.authorization_policies = vec![obj(
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "prod-only", "namespace": "shop"},
        "spec": {"action": "ALLOW", "rules": [{"from": [{"namespaces": ["shop"]}]}]}}),
    )];
    let state = translate(&i);
    assert_eq!(state.trust_domain, "corp.example");
    assert_eq!(
        state.endpoints[&key("shop", "web")][0].identity,
        "spiffe://corp.example/ns/shop/sa/web"
    );
    let kinds: Vec<String> = state
        .resources
        .iter()
        .map(|r| r.key().to_string())
        .collect();
    assert_eq!(
        kinds,
        [
            "Mesh default",
            "Service shop/db",
            "Service shop/web",
            "TrafficPolicy shop/web",
            "AuthorizationPolicy shop/prod-only",
        ]
    );
    assert!(state.rejected.is_empty(), "{:?}", state.rejected);
}

fn http_route(name: &str, spec: serde_json::Value) -> Arc<HttpRoute> {
    obj(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": name, "namespace": "shop"}, "spec": spec}),
    )
}

#[test]
fn mesh_routes_are_kept_gateway_routes_ignored_and_unsupported_ones_rejected() {
    let mut i = inputs();
    i.http_routes = vec![
        http_route(
            "split",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
                "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                           "backendRefs": [{"name": "web", "port": 80, "weight": 90}, {"name": "web-v2", "port": 80, "weight": 10}]}],
            }),
        ),
        http_route(
            "ingress",
            json!({"parentRefs": [{"name": "public-gw"}], "rules": [{}]}),
        ),
        http_route(
            "odd",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"filters": [{"type": "ExtensionRef",
                                        "extensionRef": {"group": "x.example", "kind": "Thing", "name": "t"}}]}],
            }),
        ),
        http_route(
            "bad-regex",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "("}}]}],
            }),
        ),
    ];
    let state = translate(&i);
    let routes: Vec<&str> = state
        .resources
        .iter()
        .filter(|r| r.kind() == Kind::HttpRoute)
        .map(|r| r.metadata.name.as_str())
        .collect();
    // The route to a missing backend (web-v2) is kept: its status says so.
    assert_eq!(routes, ["split"]);
    let rejected: Vec<(&str, &str)> = state
        .rejected
        .iter()
        .map(|r| (r.object.as_str(), r.reason.as_str()))
        .collect();
    assert_eq!(rejected.len(), 2, "{rejected:?}");
    assert_eq!(rejected[0].0, "HTTPRoute shop/bad-regex");
    assert!(
        rejected[0].1.contains("regular expression"),
        "{}",
        rejected[0].1
    );
    assert_eq!(rejected[1].0, "HTTPRoute shop/odd");
    assert!(
        rejected[1].1.starts_with("spec.rules[0].filters[0]"),
        "{}",
        rejected[1].1
    );
}

#[test]
fn grpc_routes_translate_too() {
    let mut i = inputs();
    i.grpc_routes = vec![obj(
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
        "metadata": {"name": "by-method", "namespace": "shop"},
        "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 9090}],
                 "rules": [{"matches": [{"method": {"service": "shop.Catalog", "method": "List"}}],
                            "backendRefs": [{"name": "web", "port": 9090}]}]}}),
    )];
    let state = translate(&i);
    let r = state
        .resources
        .iter()
        .find(|r| r.kind() == Kind::GrpcRoute)
        .unwrap();
    let spec = r.as_grpc_route().unwrap();
    assert_eq!(
        spec.rules[0].matches[0]
            .method
            .as_ref()
            .unwrap()
            .method
            .as_deref(),
        Some("List")
    );
}

#[test]
fn translation_is_deterministic_whatever_the_watch_order() {
    let a = inputs();
    let mut b = inputs();
    b.pods.reverse();
    b.services.reverse();
    assert_eq!(translate(&a), translate(&b));
}
