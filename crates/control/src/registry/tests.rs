use super::*;
use trellis_resource::{
    BackendRef, HttpRouteSpec, Metadata, ParentRef, Resource, RouteRule, ServiceSpec, Spec,
};

fn meta(ns: &str, name: &str) -> Metadata {
    Metadata {
        name: name.into(),
        namespace: ns.into(),
        labels: BTreeMap::new(),
        annotations: BTreeMap::new(),
    }
}

fn service(ns: &str, name: &str, sel: &[(&str, &str)]) -> Resource {
    Resource {
        metadata: meta(ns, name),
        spec: Spec::Service(ServiceSpec {
            selector: sel
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: vec![],
        }),
    }
}

fn backend(name: &str, ns: Option<&str>, weight: u32) -> BackendRef {
    BackendRef {
        group: None,
        kind: None,
        name: name.into(),
        namespace: ns.map(Into::into),
        port: None,
        weight,
        filters: vec![],
    }
}

fn route(
    ns: &str,
    name: &str,
    parent: &str,
    parent_ns: Option<&str>,
    bs: Vec<BackendRef>,
) -> Resource {
    Resource {
        metadata: meta(ns, name),
        spec: Spec::HttpRoute(HttpRouteSpec {
            parent_refs: vec![ParentRef {
                group: None,
                kind: Some("Service".into()),
                name: parent.into(),
                namespace: parent_ns.map(Into::into),
                port: None,
                section_name: None,
            }],
            hostnames: vec![],
            rules: vec![RouteRule {
                backend_refs: bs,
                ..Default::default()
            }],
        }),
    }
}

fn proxy(conn: ConnId, ns: &str, labels: &[(&str, &str)], addr: &str) -> Proxy {
    Proxy::from_register(
        conn,
        &Register {
            instance: format!("i{conn}"),
            workload: "w".into(),
            namespace: ns.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            inbound_addr: addr.into(),
            ..Default::default()
        },
    )
}

/// A connected proxy and its endpoint record, as the store would feed it.
fn add(reg: &mut Registry, p: Proxy) {
    reg.endpoints.insert(p.record("r"));
    reg.proxies.insert(p.conn, p);
}

fn subs(s: &[&str]) -> BTreeSet<String> {
    s.iter().map(|s| s.to_string()).collect()
}

#[test]
fn selection_needs_every_label_and_the_namespace() {
    let p = proxy(1, "default", &[("app", "a"), ("version", "v1")], "x");
    let sel = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(p.selected_by("default", &sel(&[("app", "a")])));
    assert!(p.selected_by("default", &sel(&[("app", "a"), ("version", "v1")])));
    assert!(!p.selected_by("default", &sel(&[("app", "a"), ("version", "v2")])));
    assert!(!p.selected_by("other", &sel(&[("app", "a")])));
    assert!(!p.selected_by("default", &sel(&[])));
}

#[test]
fn config_has_routes_backends_endpoints_and_missing() {
    let resources = vec![
        service("default", "catalog", &[("app", "catalog")]),
        service(
            "default",
            "catalog-v1",
            &[("app", "catalog"), ("version", "v1")],
        ),
        service(
            "shop",
            "catalog-v2",
            &[("app", "catalog"), ("version", "v2")],
        ),
        route(
            "default",
            "split",
            "catalog",
            None,
            vec![
                backend("catalog-v1", None, 90),
                backend("catalog-v2", Some("shop"), 10),
            ],
        ),
        // A route in another namespace naming the service explicitly.
        route("shop", "other", "catalog", Some("default"), vec![]),
    ];
    let mut reg = Registry {
        resources: ResourceIndex::new(&resources),
        ..Default::default()
    };
    add(
        &mut reg,
        proxy(
            1,
            "default",
            &[("app", "catalog"), ("version", "v1")],
            "10.0.0.1:15006",
        ),
    );
    // A proxy of another replica: only its record is here.
    let other = proxy(
        2,
        "shop",
        &[("app", "catalog"), ("version", "v2")],
        "10.0.0.2:15006",
    );
    reg.endpoints.insert(other.record("r2"));
    let mut cache = EndpointCache::new();
    let (cfg, deps) = reg.config_for(&subs(&["default/catalog", "default/nope"]), &mut cache);
    assert_eq!(cfg.mesh_json, "{}");
    assert_eq!(cfg.missing, vec!["default/nope".to_string()]);
    let names: Vec<String> = cfg
        .services
        .iter()
        .map(|s| format!("{}/{}", s.namespace, s.name))
        .collect();
    assert_eq!(
        names,
        ["default/catalog", "default/catalog-v1", "shop/catalog-v2"]
    );
    assert_eq!(cfg.services[0].routes_json.len(), 2);
    assert_eq!(cfg.services[0].endpoints.len(), 1);
    assert_eq!(cfg.services[1].endpoints[0].address, "10.0.0.1:15006");
    assert_eq!(
        cfg.services[1].endpoints[0].identity,
        "spiffe://trellis.local/ns/default/sa/catalog"
    );
    assert!(cfg.services[1].routes_json.is_empty());
    assert_eq!(cfg.services[2].endpoints[0].address, "10.0.0.2:15006");
    assert_eq!(deps.len(), 3);

    // Same inputs, same hash; an endpoint leaving changes it.
    let h1 = cfg.content_hash();
    let (again, _) = reg.config_for(
        &subs(&["default/catalog", "default/nope"]),
        &mut EndpointCache::new(),
    );
    assert_eq!(h1, again.content_hash());
    reg.endpoints.remove("i1");
    let (after, _) = reg.config_for(
        &subs(&["default/catalog", "default/nope"]),
        &mut EndpointCache::new(),
    );
    assert_ne!(h1, after.content_hash());
    assert!(after.services[1].endpoints.is_empty());
}

#[test]
fn one_pass_endpoints_and_memoised_selection_match_the_direct_ones() {
    let resources = vec![
        service("default", "catalog", &[("app", "catalog")]),
        service(
            "default",
            "catalog-v1",
            &[("app", "catalog"), ("version", "v1")],
        ),
        service("shop", "catalog", &[("app", "catalog")]),
        service("default", "none", &[]),
    ];
    let mut reg = Registry {
        resources: ResourceIndex::new(&resources),
        ..Default::default()
    };
    let procs = [
        proxy(
            1,
            "default",
            &[("app", "catalog"), ("version", "v1")],
            "b:1",
        ),
        proxy(
            2,
            "default",
            &[("app", "catalog"), ("version", "v1")],
            "a:1",
        ),
        proxy(
            3,
            "default",
            &[("app", "catalog"), ("version", "v2")],
            "c:1",
        ),
        proxy(4, "shop", &[("app", "catalog")], "d:1"),
        // Unreachable: selected by nothing.
        proxy(5, "default", &[("app", "catalog")], ""),
    ];
    for p in procs {
        add(&mut reg, p);
    }
    let mut memo = SelectionMemo::default();
    let all = reg.all_endpoints(&mut memo);
    assert_eq!(all.len(), 4);
    for name in reg.resources.services.keys() {
        let direct = reg.endpoints(name, &mut EndpointCache::new());
        assert_eq!(all[name], direct, "{name}");
    }
    assert_eq!(all[&ServiceName::new("default", "catalog")].len(), 3);
    assert_eq!(
        all[&ServiceName::new("default", "catalog-v1")][0].address,
        "a:1"
    );
    for p in reg.proxies.values() {
        // Twice: computed, then from the memo.
        for _ in 0..2 {
            assert_eq!(
                reg.services_selecting_memo(p, &mut memo),
                reg.services_selecting(p)
            );
        }
    }
}

#[test]
fn service_names_parse() {
    assert_eq!(ServiceName::parse("a/b"), Some(ServiceName::new("a", "b")));
    assert_eq!(
        ServiceName::parse("b"),
        Some(ServiceName::new("default", "b"))
    );
    assert_eq!(ServiceName::parse("a/b/c"), None);
    assert_eq!(ServiceName::parse("/b"), None);
}

#[test]
fn config_carries_traffic_policies_grpc_routes_and_mirror_backends() {
    let resources = trellis_resource::parse_documents(
        "t.yaml",
        r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: shadow}
spec: {selector: {app: shadow}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: greeter}
spec: {selector: {app: greeter}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shadow}
spec: {targetRef: {name: shadow}, loadBalancer: {type: round-robin}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror}
spec:
  parentRefs: [{name: catalog}]
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}
    backendRefs: [{name: catalog}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter}
spec:
  parentRefs: [{name: greeter}]
  rules: [{backendRefs: [{name: greeter}]}]
"#,
    )
    .unwrap();
    let reg = Registry {
        resources: ResourceIndex::new(&resources),
        ..Default::default()
    };
    let (cfg, _) = reg.config_for(
        &subs(&["default/catalog", "default/greeter"]),
        &mut EndpointCache::new(),
    );
    let by_name = |n: &str| cfg.services.iter().find(|s| s.name == n).unwrap();
    // The mirror's Service comes along, with its own policy.
    assert!(by_name("shadow")
        .traffic_policy_json
        .contains("round-robin"));
    assert_eq!(by_name("catalog").traffic_policy_json, "");
    assert_eq!(by_name("greeter").grpc_routes_json.len(), 1);
    assert!(by_name("greeter").routes_json.is_empty());
}

#[test]
fn changes_name_the_services_they_reach() {
    let load = |yaml: &str| {
        ResourceIndex::new(&trellis_resource::parse_documents("t.yaml", yaml).unwrap())
    };
    const SERVICES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: reviews}
spec: {selector: {app: reviews}}
"#;
    let base = load(SERVICES);
    let name = |n: &str| ServiceName::new("default", n);

    // Nothing changed: nothing to recompute.
    assert_eq!(
        base.changed_services(&load(SERVICES)),
        Some(BTreeSet::new())
    );

    // A route is filed under its parent: only that Service's subscribers.
    let routed = load(&format!(
        "{SERVICES}---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec:\n  parentRefs: [{{kind: Service, name: catalog}}]\n  rules: [{{backendRefs: [{{name: reviews}}]}}]\n"
    ));
    assert_eq!(
        base.changed_services(&routed),
        Some(BTreeSet::from([name("catalog")]))
    );
    // Removing it reaches the same Service.
    assert_eq!(
        routed.changed_services(&base),
        Some(BTreeSet::from([name("catalog")]))
    );

    // A TrafficPolicy: its target.
    let policed = load(&format!(
        "{SERVICES}---\napiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{kind: Service, name: reviews}}\n  loadBalancer: {{type: round-robin}}\n"
    ));
    assert_eq!(
        base.changed_services(&policed),
        Some(BTreeSet::from([name("reviews")]))
    );

    // A Service, the Mesh or an AuthorizationPolicy: everyone.
    let more = load(&format!(
        "{SERVICES}---\napiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: ratings}}\nspec: {{selector: {{app: ratings}}}}\n"
    ));
    assert_eq!(base.changed_services(&more), None);
    let meshed = load(&format!(
        "{SERVICES}---\napiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: example.org}}\n"
    ));
    assert_eq!(base.changed_services(&meshed), None);
    let authz = load(&format!(
        "{SERVICES}---\napiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: a}}\nspec:\n  action: ALLOW\n  rules: [{{from: [{{namespaces: [default]}}]}}]\n"
    ));
    assert_eq!(base.changed_services(&authz), None);
}

/// Kubernetes: endpoints come from the external source, never from the
/// registered proxies, whatever their labels.
#[test]
fn external_endpoints_replace_registrations() {
    let resources = vec![service("default", "catalog", &[("app", "catalog")])];
    let mut reg = Registry {
        resources: ResourceIndex::new(&resources),
        ..Default::default()
    };
    add(
        &mut reg,
        proxy(1, "default", &[("app", "catalog")], "10.0.0.1:15006"),
    );
    let name = ServiceName::new("default", "catalog");
    let registered = reg.endpoints(&name, &mut EndpointCache::new());
    assert_eq!(
        registered.len(),
        1,
        "universal mode: the proxy is the endpoint"
    );

    let pod = trellis_api::v1::Endpoint {
        address: "10.244.0.5:15006".into(),
        instance: "catalog-7d9f-x2".into(),
        workload: "catalog".into(),
        namespace: "default".into(),
        labels: Default::default(),
        identity: "spiffe://trellis.local/ns/default/sa/catalog".into(),
    };
    reg.endpoint_source = EndpointSource::External(std::sync::Arc::new(
        [(name.clone(), vec![pod.clone()])].into(),
    ));
    assert_eq!(
        reg.endpoints(&name, &mut EndpointCache::new()),
        std::slice::from_ref(&pod)
    );
    let all = reg.all_endpoints(&mut SelectionMemo::default());
    assert_eq!(all[&name], std::slice::from_ref(&pod));
    // A Service the source knows but the resources do not has none.
    let ghost = ServiceName::new("default", "ghost");
    assert!(reg.endpoints(&ghost, &mut EndpointCache::new()).is_empty());
    // The Config of a proxy that calls catalog carries the pod.
    let (cfg, _) = reg.config_for(&subs(&["default/catalog"]), &mut EndpointCache::new());
    assert_eq!(cfg.services[0].endpoints, [pod]);
}

/// One of a small universe of resources, in one of two versions, for the
/// index's property test: names and targets collide on purpose.
fn candidate(i: usize, v: usize) -> Resource {
    let svc = |k: usize| format!("s{}", k % 3);
    let yaml = match i {
        0 => format!("apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {{trustDomain: td{v}.org}}\n"),
        1 => format!("apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: other}}\nspec: {{trustDomain: td{v}.org}}\n"),
        2..=4 => format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {}}}\nspec: {{selector: {{app: a{v}}}}}\n", svc(i)),
        5..=8 => format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{}}}\nspec:\n  parentRefs: [{{kind: Service, name: {}}}{}]\n  rules: [{{backendRefs: [{{name: s2}}]}}]\n",
            i % 3,
            svc(i + v),
            if v == 1 { format!(", {{kind: Service, name: {}}}", svc(i + 2)) } else { String::new() },
        ),
        9 | 10 => format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {{name: g{i}}}\nspec:\n  parentRefs: [{{kind: Service, name: {}}}]\n  rules: [{{backendRefs: [{{name: s1, port: 50051}}]}}]\n",
            svc(i + v)
        ),
        11..=13 => format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p{i}}}\nspec:\n  targetRef: {{kind: Service, name: {}}}\n  loadBalancer: {{type: {}}}\n",
            svc(i / 2 + v),
            if v == 0 { "round-robin" } else { "least-request" }
        ),
        14 | 15 => format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: ap{i}}}\nspec:\n  action: {}\n  rules: [{{from: [{{namespaces: [default]}}]}}]\n",
            if v == 0 { "ALLOW" } else { "DENY" }
        ),
        _ => format!("apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\nspec: {{command: [\"app{}\"]}}\n", v),
    };
    let mut parsed = trellis_resource::parse_documents("t.yaml", &yaml)
        .unwrap_or_else(|e| panic!("{yaml}: {e}"));
    parsed.remove(0)
}

proptest::proptest! {
    /// The index kept change by change holds what an index built from the
    /// final resources would (each part computed here the plain way), and
    /// each change names at least the Services `changed_services` does
    /// (`None`, every proxy, exactly when it does).
    #[test]
    fn the_index_follows_puts_and_deletes(
        ops in proptest::collection::vec((0..17usize, 0..2usize, proptest::bool::weighted(0.3)), 1..40),
    ) {
        let mut idx = ResourceIndex::default();
        let mut stored: BTreeMap<trellis_resource::ResourceKey, Resource> = BTreeMap::new();
        for (i, v, delete) in ops {
            let r = candidate(i, v);
            let before = idx.clone();
            // A trial put taken back (the budget check's) leaves the index
            // as it was.
            let trial = candidate(16 - i, 1 - v);
            let old = idx.get(&trial.key());
            idx.put(trial.clone());
            match old {
                Some(o) => idx.put_shared(o),
                None => idx.delete(&trial.key()),
            };
            proptest::prop_assert_eq!(format!("{idx:?}"), format!("{before:?}"));
            let said = if delete {
                stored.remove(&r.key());
                idx.delete(&r.key())
            } else {
                stored.insert(r.key(), r.clone());
                idx.put(r)
            };
            match (before.changed_services(&idx), said) {
                (None, None) => {}
                (Some(needed), Some(said)) => proptest::prop_assert!(
                    needed.is_subset(&said),
                    "the change named {said:?}, but {needed:?} changed"
                ),
                (needed, said) => proptest::prop_assert!(false, "changed {needed:?}, said {said:?}"),
            }
        }
        let all: Vec<&Resource> = stored.values().collect();
        proptest::prop_assert_eq!(idx.len(), all.len());
        // The JSON kept for each is what it serializes to, and nothing
        // more is kept.
        proptest::prop_assert_eq!(idx.json_kept(), all.len());
        for r in idx.shared().iter() {
            proptest::prop_assert_eq!(idx.json(r), serde_json::to_string(&**r).unwrap());
        }
        let mesh = all.iter().find_map(|r| match &r.spec {
            Spec::Mesh(m) if r.metadata.name == "default" => Some(m.clone()),
            _ => None,
        });
        proptest::prop_assert_eq!(&idx.mesh, &mesh);
        let services: BTreeMap<ServiceName, Resource> = all
            .iter()
            .filter(|r| r.as_service().is_some())
            .map(|r| (ServiceName::new(&r.metadata.namespace, &r.metadata.name), (*r).clone()))
            .collect();
        let indexed: BTreeMap<ServiceName, Resource> = idx
            .services
            .iter()
            .map(|(k, v)| (k.clone(), (**v).clone()))
            .collect();
        proptest::prop_assert_eq!(indexed, services);
        for (kind, by_parent) in [
            (trellis_resource::Kind::HttpRoute, &idx.routes_by_parent),
            (trellis_resource::Kind::GrpcRoute, &idx.grpc_routes_by_parent),
        ] {
            let mut want: BTreeMap<ServiceName, Vec<String>> = BTreeMap::new();
            for r in all.iter().filter(|r| r.kind() == kind) {
                for (ns, name) in r.parent_services() {
                    want.entry(ServiceName::new(ns, name))
                        .or_default()
                        .push(r.metadata.name.clone());
                }
            }
            let got: BTreeMap<ServiceName, Vec<String>> = by_parent
                .iter()
                .map(|(k, rs)| (k.clone(), rs.iter().map(|r| r.metadata.name.clone()).collect()))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
        let mut policies: BTreeMap<ServiceName, String> = BTreeMap::new();
        for r in &all {
            if let Spec::TrafficPolicy(tp) = &r.spec {
                policies
                    .entry(ServiceName::new(&r.metadata.namespace, &tp.target_ref.name))
                    .or_insert_with(|| r.metadata.name.clone());
            }
        }
        let got: BTreeMap<ServiceName, String> = idx
            .policy_by_target
            .iter()
            .map(|(k, r)| (k.clone(), r.metadata.name.clone()))
            .collect();
        proptest::prop_assert_eq!(got, policies);
        let aps: Vec<&str> = all
            .iter()
            .filter(|r| r.kind() == trellis_resource::Kind::AuthorizationPolicy)
            .map(|r| r.metadata.name.as_str())
            .collect();
        let got: Vec<&str> = idx
            .authorization_policies
            .iter()
            .map(|r| r.metadata.name.as_str())
            .collect();
        proptest::prop_assert_eq!(got, aps);
    }
}
