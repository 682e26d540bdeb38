use super::*;
use crate::load::parse_documents;

const BASE: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec:
  trustDomain: example.org
  certificateTTL: 1h
  tracing: {sampling: 0.5}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 80}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: catalog-v1, labels: {app: catalog}}
spec:
  replicas: 2
  serviceAccount: catalog
  command: [trellis, demo-app]
  env: {VERSION: v1}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog.split}
spec:
  parentRefs: [{name: catalog, kind: Service, group: "", port: 80}]
  hostnames: [catalog.shop.svc, "*.example.org"]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-canary, value: "tr.e", type: RegularExpression}]
      queryParams: [{name: v, value: "2"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-route, value: split}], remove: [x-debug]}
    backendRefs:
    - {name: catalog-v1, port: 8080, weight: 90}
    - {name: catalog-v2, namespace: default, weight: 0}
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [502, 503], attempts: 2, backoff: 100ms}
"#;

const BACKENDS: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v1}
spec: {ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec: {ports: [{port: 8080}]}
"#;

fn base() -> Vec<Resource> {
    parse_documents("base.yaml", BASE).unwrap()
}

fn existing() -> Vec<Resource> {
    parse_documents("backends.yaml", BACKENDS).unwrap()
}

fn index(kind: Kind) -> usize {
    base().iter().position(|r| r.kind() == kind).unwrap()
}

fn errors(resources: &[Resource]) -> Vec<ResourceError> {
    validate_apply(resources, &[], &existing())
        .err()
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Applies `edit` to the base resource of `kind` and expects exactly one
/// error about that resource, at `field`, whose reason contains `reason`.
/// (Other resources may fail as a consequence, e.g. a route naming a
/// Service that was just renamed.)
fn rejects(kind: Kind, edit: impl FnOnce(&mut Resource), field: &str, reason: &str) {
    let mut all = base();
    let i = index(kind);
    edit(&mut all[i]);
    let about = all[i].key().to_string();
    let errs: Vec<ResourceError> = errors(&all)
        .into_iter()
        .filter(|e| e.file == about)
        .collect();
    assert_eq!(errs.len(), 1, "{field}: {errs:#?}");
    assert_eq!(errs[0].field, field, "{errs:#?}");
    assert!(errs[0].reason.contains(reason), "{}", errs[0]);
}

fn mesh(r: &mut Resource) -> &mut MeshSpec {
    match &mut r.spec {
        Spec::Mesh(s) => s,
        _ => unreachable!(),
    }
}

fn svc(r: &mut Resource) -> &mut ServiceSpec {
    match &mut r.spec {
        Spec::Service(s) => s,
        _ => unreachable!(),
    }
}

fn wl(r: &mut Resource) -> &mut WorkloadSpec {
    match &mut r.spec {
        Spec::Workload(s) => s,
        _ => unreachable!(),
    }
}

fn route(r: &mut Resource) -> &mut HttpRouteSpec {
    match &mut r.spec {
        Spec::HttpRoute(s) => s,
        _ => unreachable!(),
    }
}

fn rule(r: &mut Resource) -> &mut RouteRule {
    &mut route(r).rules[0]
}

fn matches(r: &mut Resource) -> &mut RouteMatch {
    &mut rule(r).matches[0]
}

#[test]
fn the_base_apply_is_valid() {
    assert_eq!(errors(&base()), vec![]);
}

#[test]
fn names_and_namespaces_are_dns_labels() {
    rejects(
        Kind::Service,
        |r| r.metadata.name = "Catalog".into(),
        "metadata.name",
        "not a valid name",
    );
    rejects(
        Kind::Workload,
        |r| r.metadata.name = "a.b".into(),
        "metadata.name",
        "not a valid name",
    );
    rejects(
        Kind::Workload,
        |r| r.metadata.name = "-a".into(),
        "metadata.name",
        "not a valid name",
    );
    rejects(
        Kind::Workload,
        |r| r.metadata.name = "a".repeat(64),
        "metadata.name",
        "63",
    );
    rejects(
        Kind::Workload,
        |r| r.metadata.namespace = "my_ns".into(),
        "metadata.namespace",
        "not a valid name",
    );
    // Routes may use dots (base has `catalog.split`), but not anything.
    rejects(
        Kind::HttpRoute,
        |r| r.metadata.name = "split..x".into(),
        "metadata.name",
        "not a valid DNS name",
    );
}

#[test]
fn mesh_rules() {
    rejects(
        Kind::Mesh,
        |r| r.metadata.name = "prod".into(),
        "metadata.name",
        "must be named `default`",
    );
    rejects(
        Kind::Mesh,
        |r| mesh(r).trust_domain.clear(),
        "spec.trustDomain",
        "is empty",
    );
    rejects(
        Kind::Mesh,
        |r| mesh(r).trust_domain = "Bad Domain".into(),
        "spec.trustDomain",
        "not a valid DNS name",
    );
    rejects(
        Kind::Mesh,
        |r| mesh(r).certificate_ttl = "1 day".into(),
        "spec.certificateTTL",
        "not a duration",
    );
    rejects(
        Kind::Mesh,
        |r| mesh(r).certificate_ttl = "9s".into(),
        "spec.certificateTTL",
        "at least 10s",
    );
    let ok_ttl = |r: &mut Resource| mesh(r).certificate_ttl = "10s".into();
    let mut all = base();
    ok_ttl(&mut all[0]);
    assert_eq!(errors(&all), vec![]);
    for bad in [1.5, -0.1, f64::NAN] {
        rejects(
            Kind::Mesh,
            |r| mesh(r).tracing.as_mut().unwrap().sampling = bad,
            "spec.tracing.sampling",
            "between 0 and 1",
        );
    }
    // The namespace of a cluster-wide Mesh is not checked: it is ignored.
    let mut all = base();
    all[0].metadata.namespace = "Whatever".into();
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn service_rules() {
    rejects(
        Kind::Service,
        |r| svc(r).ports.clear(),
        "spec.ports",
        "at least one port",
    );
    rejects(
        Kind::Service,
        |r| svc(r).ports[0].port = 0,
        "spec.ports[0].port",
        "port 0",
    );
    rejects(
        Kind::Service,
        |r| svc(r).ports[0].target_port = Some(0),
        "spec.ports[0].targetPort",
        "port 0",
    );
    let dup = |r: &mut Resource| {
        let mut p = svc(r).ports[0].clone();
        p.name = Some("other".into());
        svc(r).ports.push(p);
    };
    rejects(
        Kind::Service,
        dup,
        "spec.ports[1].port",
        "port 80 is listed twice",
    );
    let dup_name = |r: &mut Resource| {
        let mut p = svc(r).ports[0].clone();
        p.port = 81;
        svc(r).ports.push(p);
    };
    rejects(
        Kind::Service,
        dup_name,
        "spec.ports[1].name",
        "`http` is used twice",
    );
}

#[test]
fn workload_rules() {
    rejects(
        Kind::Workload,
        |r| wl(r).replicas = 1001,
        "spec.replicas",
        "at most 1000",
    );
    let mut all = base();
    wl(&mut all[index(Kind::Workload)]).replicas = 1000;
    assert_eq!(errors(&all), vec![]);
    wl(&mut all[index(Kind::Workload)]).replicas = 0;
    assert_eq!(
        errors(&all),
        vec![],
        "0 replicas is a valid way to stop a workload"
    );

    rejects(
        Kind::Workload,
        |r| wl(r).command.clear(),
        "spec.command",
        "is empty",
    );
    rejects(
        Kind::Workload,
        |r| wl(r).command[0].clear(),
        "spec.command[0]",
        "program name is empty",
    );
    rejects(Kind::Workload, |r| wl(r).port = 0, "spec.port", "port 0");
    rejects(
        Kind::Workload,
        |r| wl(r).service_account = Some("Cat Alog".into()),
        "spec.serviceAccount",
        "DNS name",
    );
    rejects(
        Kind::Workload,
        |r| {
            wl(r).env.insert("A=B".into(), "x".into());
        },
        "spec.env.A=B",
        "environment variable name",
    );
}

#[test]
fn route_needs_a_parent_ref() {
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs.clear(),
        "spec.parentRefs",
        "is empty",
    );
}

#[test]
fn parent_ref_kind_and_group_must_be_a_core_service() {
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs[0].kind = Some("Gateway".into()),
        "spec.parentRefs[0].kind",
        "`Gateway` is not supported",
    );
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs[0].group = Some("gateway.networking.k8s.io".into()),
        "spec.parentRefs[0].group",
        "is not supported",
    );
    let mut all = base();
    route(&mut all[index(Kind::HttpRoute)]).parent_refs[0].group = Some("core".into());
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn refs_must_name_existing_services() {
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs[0].name = "catalgo".into(),
        "spec.parentRefs[0]",
        "Service default/catalgo does not exist",
    );
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs[0].namespace = Some("shop".into()),
        "spec.parentRefs[0]",
        "Service shop/catalog does not exist",
    );
    rejects(
        Kind::HttpRoute,
        |r| rule(r).backend_refs[1].kind = Some("Workload".into()),
        "spec.rules[0].backendRefs[1].kind",
        "not supported",
    );

    // The message promised to users, whole, when no file is known.
    let mut all = base();
    all[index(Kind::HttpRoute)].metadata.name = "catalog-split".into();
    rule(&mut all[index(Kind::HttpRoute)]).backend_refs[1].name = "catalog-v3".into();
    let err = validate_apply(&all, &[], &existing()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "HTTPRoute default/catalog-split: spec.rules[0].backendRefs[1]: Service default/catalog-v3 \
         does not exist; apply it first or fix the name"
    );
}

#[test]
fn backend_namespace_defaults_to_the_routes() {
    let mut all = base();
    let r = &mut all[index(Kind::HttpRoute)];
    r.metadata.namespace = "shop".into();
    route(r).parent_refs[0].namespace = Some("default".into());
    let errs = errors(&all);
    // catalog-v1 has no namespace, so it is looked up in `shop`; catalog-v2
    // names `default` and is found.
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].field, "spec.rules[0].backendRefs[0]");
    assert!(errs[0]
        .reason
        .contains("Service shop/catalog-v1 does not exist"));
}

#[test]
fn services_in_the_same_apply_count() {
    let mut all = base();
    all.extend(existing());
    assert_eq!(validate_apply::<Resource>(&all, &[], &[]), Ok(()));
    assert!(validate_apply::<Resource>(&base(), &[], &[]).is_err());
}

#[test]
fn the_applied_service_wins_over_the_stored_one_in_any_order() {
    let catalog = |port: u16| {
        let mut r = base()[index(Kind::Service)].clone();
        svc(&mut r).ports[0].port = port;
        r
    };
    // The route names port 80 of catalog.
    let route_only = || -> Vec<Resource> {
        base()
            .into_iter()
            .filter(|r| r.key().kind == Kind::HttpRoute)
            .collect()
    };
    // The route's backends, stored out of key order around catalog's
    // copies, of which the last is the one in force.
    let stored = |first: u16, last: u16| {
        let mut v = vec![catalog(first)];
        v.extend(existing().into_iter().rev());
        v.push(catalog(last));
        v
    };
    assert_eq!(validate_apply(&route_only(), &[], &stored(81, 80)), Ok(()));
    assert!(validate_apply(&route_only(), &[], &stored(80, 81)).is_err());
    // The apply's own copy of the Service is what the route is checked
    // against, whatever the store holds.
    let with = |port: u16| {
        let mut v = route_only();
        v.push(catalog(port));
        v
    };
    assert_eq!(validate_apply(&with(80), &[], &stored(81, 81)), Ok(()));
    assert!(validate_apply(&with(81), &[], &stored(80, 80)).is_err());
}

#[test]
fn ref_ports_must_exist_on_the_service() {
    rejects(
        Kind::HttpRoute,
        |r| rule(r).backend_refs[0].port = Some(9090),
        "spec.rules[0].backendRefs[0].port",
        "has no port 9090 (it has 8080)",
    );
    rejects(
        Kind::HttpRoute,
        |r| route(r).parent_refs[0].port = Some(81),
        "spec.parentRefs[0].port",
        "has no port 81",
    );
}

#[test]
fn weights() {
    rejects(
        Kind::HttpRoute,
        |r| rule(r).backend_refs[0].weight = 0,
        "spec.rules[0].backendRefs",
        "every backendRef has weight 0",
    );
    rejects(
        Kind::HttpRoute,
        |r| rule(r).backend_refs[0].weight = 1_000_001,
        "spec.rules[0].backendRefs[0].weight",
        "too large",
    );
    // No backendRefs at all is not the same thing (Gateway API answers 500).
    let mut all = base();
    rule(&mut all[index(Kind::HttpRoute)]).backend_refs.clear();
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn hostnames_are_dns_names() {
    rejects(
        Kind::HttpRoute,
        |r| route(r).hostnames.push("bad host".into()),
        "spec.hostnames[2]",
        "not a valid DNS name",
    );
}

#[test]
fn path_matches() {
    let set = |t: PathMatchType, v: &str| {
        let v = v.to_string();
        move |r: &mut Resource| {
            matches(r).path = Some(PathMatch {
                match_type: t,
                value: v,
            })
        }
    };
    let field = "spec.rules[0].matches[0].path.value";
    rejects(
        Kind::HttpRoute,
        set(PathMatchType::PathPrefix, "api"),
        field,
        "must start with `/`",
    );
    rejects(
        Kind::HttpRoute,
        set(PathMatchType::Exact, ""),
        field,
        "must start with `/`",
    );
    rejects(
        Kind::HttpRoute,
        set(PathMatchType::RegularExpression, "/api/(v1"),
        field,
        "not a valid regular expression",
    );
    let mut all = base();
    set(PathMatchType::RegularExpression, "^/api/v[0-9]+")(&mut all[index(Kind::HttpRoute)]);
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn regex_errors_are_one_line() {
    let err = compiles("(").unwrap_err();
    assert!(!err.contains('\n'), "{err}");
    assert!(err.contains("unclosed group"), "{err}");
}

#[test]
fn header_and_query_matches() {
    rejects(
        Kind::HttpRoute,
        |r| matches(r).headers[0].name = "x canary".into(),
        "spec.rules[0].matches[0].headers[0].name",
        "not a valid header name",
    );
    rejects(
        Kind::HttpRoute,
        |r| matches(r).headers[0].value = "[".into(),
        "spec.rules[0].matches[0].headers[0].value",
        "not a valid regular expression",
    );
    // An exact value is taken literally, whatever it contains.
    let mut all = base();
    let m = matches(&mut all[index(Kind::HttpRoute)]);
    m.headers[0].match_type = ValueMatchType::Exact;
    m.headers[0].value = "[".into();
    assert_eq!(errors(&all), vec![]);

    rejects(
        Kind::HttpRoute,
        |r| matches(r).query_params[0].name.clear(),
        "spec.rules[0].matches[0].queryParams[0].name",
        "is empty",
    );
    rejects(
        Kind::HttpRoute,
        |r| {
            let q = &mut matches(r).query_params[0];
            q.match_type = ValueMatchType::RegularExpression;
            q.value = "*".into();
        },
        "spec.rules[0].matches[0].queryParams[0].value",
        "not a valid regular expression",
    );
}

#[test]
fn methods() {
    rejects(
        Kind::HttpRoute,
        |r| matches(r).method = Some("get".into()),
        "spec.rules[0].matches[0].method",
        "use one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
    );
    for m in METHODS {
        let mut all = base();
        matches(&mut all[index(Kind::HttpRoute)]).method = Some(m.into());
        assert_eq!(errors(&all), vec![], "{m}");
    }
}

#[test]
fn filters_need_their_modifier_and_valid_header_names() {
    rejects(
        Kind::HttpRoute,
        |r| {
            let f = &mut rule(r).filters[0];
            f.filter_type = FilterType::ResponseHeaderModifier;
            f.request_header_modifier = None;
        },
        "spec.rules[0].filters[0].responseHeaderModifier",
        "is missing",
    );
    rejects(
        Kind::HttpRoute,
        |r| rule(r).filters[0].response_header_modifier = Some(HeaderModifier::default()),
        "spec.rules[0].filters[0].responseHeaderModifier",
        "does not belong",
    );
    rejects(
        Kind::HttpRoute,
        |r| {
            let m = rule(r).filters[0].request_header_modifier.as_mut().unwrap();
            m.remove[0] = "x debug".into();
        },
        "spec.rules[0].filters[0].requestHeaderModifier.remove[0]",
        "not a valid header name",
    );
    rejects(
        Kind::HttpRoute,
        |r| {
            let f = rule(r).filters[0].clone();
            rule(r).backend_refs[0].filters.push(f);
            let m = rule(r).backend_refs[0].filters[0]
                .request_header_modifier
                .as_mut()
                .unwrap();
            m.set[0].name = String::new();
        },
        "spec.rules[0].backendRefs[0].filters[0].requestHeaderModifier.set[0].name",
        "not a valid header name",
    );
}

#[test]
fn timeouts_and_backoff_are_durations() {
    rejects(
        Kind::HttpRoute,
        |r| rule(r).timeouts.as_mut().unwrap().request = Some("10".into()),
        "spec.rules[0].timeouts.request",
        "not a duration",
    );
    rejects(
        Kind::HttpRoute,
        |r| rule(r).timeouts.as_mut().unwrap().backend_request = Some("1.5s".into()),
        "spec.rules[0].timeouts.backendRequest",
        "not a duration",
    );
    rejects(
        Kind::HttpRoute,
        |r| rule(r).timeouts.as_mut().unwrap().backend_request = Some("11s".into()),
        "spec.rules[0].timeouts.backendRequest",
        "longer than timeouts.request",
    );
    let mut all = base();
    let timeouts = rule(&mut all[index(Kind::HttpRoute)])
        .timeouts
        .as_mut()
        .unwrap();
    timeouts.request = Some("0s".into());
    timeouts.backend_request = Some("1h".into());
    assert_eq!(errors(&all), vec![], "0s means no overall timeout");

    rejects(
        Kind::HttpRoute,
        |r| rule(r).retry.as_mut().unwrap().backoff = Some("fast".into()),
        "spec.rules[0].retry.backoff",
        "not a duration",
    );
}

#[test]
fn retry_codes_are_400_to_599() {
    for bad in [200, 399, 600] {
        rejects(
            Kind::HttpRoute,
            |r| rule(r).retry.as_mut().unwrap().codes.push(bad),
            "spec.rules[0].retry.codes[2]",
            "400 to 599",
        );
    }
    let mut all = base();
    rule(&mut all[index(Kind::HttpRoute)])
        .retry
        .as_mut()
        .unwrap()
        .codes = vec![400, 599];
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn duplicate_keys_in_one_apply_name_both_places() {
    let mut all = base();
    let mut again = all[index(Kind::Service)].clone();
    again.metadata.labels.insert("tier".into(), "web".into());
    all.push(again);
    let sources: Vec<Source> = (1..=all.len())
        .map(|n| Source {
            file: "apply.yaml".into(),
            document: n,
            line: Some(n * 10),
        })
        .collect();
    let err = validate_apply(&all, &sources, &existing()).unwrap_err();
    assert_eq!(err.errors.len(), 1, "{err}");
    let e = &err.errors[0];
    assert_eq!(
        (e.file.as_str(), e.document, e.line),
        ("apply.yaml", 5, Some(50))
    );
    assert_eq!(e.field, "metadata.name");
    assert!(
        e.reason.contains("Service default/catalog appears twice"),
        "{e}"
    );
    assert!(e.reason.contains("apply.yaml document 2"), "{e}");

    // The same name in another namespace or of another kind is fine.
    let mut all = base();
    let mut other = all[index(Kind::Service)].clone();
    other.metadata.namespace = "shop".into();
    all.push(other);
    assert_eq!(errors(&all), vec![]);
}

#[test]
fn errors_carry_their_source_and_all_are_reported() {
    let mut all = base();
    wl(&mut all[index(Kind::Workload)]).port = 0;
    mesh(&mut all[0]).trust_domain.clear();
    let sources = [
        Source {
            file: "a.yaml".into(),
            document: 1,
            line: Some(2),
        },
        Source {
            file: "a.yaml".into(),
            document: 2,
            line: Some(11),
        },
        Source {
            file: "b.yaml".into(),
            document: 1,
            line: Some(1),
        },
    ];
    let err = validate_apply(&all, &sources, &existing()).unwrap_err();
    let got: Vec<String> = err.errors.iter().map(|e| e.to_string()).collect();
    assert_eq!(
        got,
        [
            "a.yaml: document 1 (line 2): spec.trustDomain: is empty: use a DNS name such as `trellis.local`",
            "b.yaml: document 1 (line 1): spec.port: port 0 is not allowed: use 1 to 65535",
        ]
    );
}

#[test]
fn delete_of_a_service_a_route_names_is_refused() {
    let mut remaining = base();
    remaining.extend(existing());
    let key = |name: &str| ResourceKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: name.into(),
    };
    let err = validate_delete(&key("catalog-v1"), &remaining).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Service default/catalog-v1: still used by HTTPRoute default/catalog.split \
         (spec.rules[0].backendRefs[0]): delete or change that route first"
    );
    let err = validate_delete(&key("catalog"), &remaining).unwrap_err();
    assert!(err.to_string().contains("(spec.parentRefs[0])"), "{err}");

    // A Service nothing names, or one of the same name elsewhere, may go.
    let mut unused = key("catalog-v1");
    unused.namespace = "shop".into();
    assert_eq!(validate_delete(&unused, &remaining), Ok(()));
    remaining.retain(|r| r.kind() != Kind::HttpRoute);
    assert_eq!(validate_delete(&key("catalog"), &remaining), Ok(()));
    // Other kinds have no dependents.
    let wl = base()[index(Kind::Workload)].key();
    assert_eq!(validate_delete(&wl, &base()), Ok(()));
}

#[test]
fn mesh_access_log_and_otlp_endpoint_are_checked() {
    let bad = |yaml: &str| {
        let Ok(docs) = crate::parse_documents_with_sources("m.yaml", yaml) else {
            return true;
        };
        let (res, src): (Vec<_>, Vec<_>) = docs.into_iter().unzip();
        crate::validate_apply::<Resource>(&res, &src, &[]).is_err()
    };
    let mesh = |spec: &str| {
        format!("apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec: {spec}\n")
    };
    assert!(!bad(&mesh("{accessLog: {stdout: true}}")));
    assert!(!bad(&mesh("{accessLog: {path: '/tmp/{workload}.log'}}")));
    assert!(bad(&mesh("{accessLog: {}}")));
    assert!(bad(&mesh("{accessLog: {stdout: true, path: /tmp/x}}")));
    assert!(!bad(&mesh(
        "{tracing: {sampling: 1, otlpEndpoint: 'http://127.0.0.1:4318/v1/traces', otlpProtocol: http/protobuf}}"
    )));
    assert!(bad(&mesh("{tracing: {otlpEndpoint: 'ftp://x'}}")));
    assert!(bad(&mesh("{tracing: {otlpProtocol: thrift}}")));
}

/// Kubernetes' limits on metadata, and the per-resource size; every error
/// names the field and the limit, and quotes no more than a prefix of the
/// input.
#[test]
fn metadata_and_size_limits_name_the_field_and_the_limit() {
    let svc = |metadata: &str, selector: &str| {
        format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {metadata}\n\
             spec: {{selector: {selector}, ports: [{{port: 80}}]}}\n"
        )
    };
    let errors = |yaml: &str| -> Vec<ResourceError> {
        let rs = parse_documents("limits.yaml", yaml).unwrap();
        validate_apply::<Resource>(&rs, &[], &[]).map_or_else(|e| e.errors, |_| Vec::new())
    };
    let long = "a".repeat(64);
    let huge = "x".repeat(300 << 10);

    let e = errors(&svc(&format!("{{name: {long}}}"), "{app: a}"));
    assert_eq!(e[0].field, "metadata.name");
    assert!(e[0].reason.contains("at most 63"), "{}", e[0].reason);

    let e = errors(&svc(
        &format!("{{name: s, labels: {{{long}: v, ok: {long}}}}}"),
        "{app: a}",
    ));
    let fields: Vec<&str> = e.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            format!("metadata.labels.{long}").as_str(),
            "metadata.labels.ok"
        ]
    );

    let e = errors(&svc("{name: s}", &format!("{{app: {long}}}")));
    assert_eq!(e[0].field, "spec.selector.app");

    let e = errors(&svc(
        &format!("{{name: s, annotations: {{note: {huge}}}}}"),
        "{app: a}",
    ));
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "metadata.annotations.note");
    assert!(e[0].reason.contains("262144"), "{}", e[0].reason);

    // Under the annotation limit, and over the resource limit together.
    let half = "y".repeat(200 << 10);
    let e = errors(&svc(
        &format!("{{name: s, annotations: {{a: {half}}}}}"),
        "{app: a}",
    ));
    assert!(e.is_empty(), "{e:?}");
    let workload = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Workload\nmetadata: {{name: w}}\n\
         spec: {{command: [x], port: 1, env: {{A: {half}, B: {half}, C: {half}}}}}\n"
    );
    let e = errors(&workload);
    assert_eq!(e.len(), 1, "{e:?}");
    assert_eq!(e[0].field, "");
    assert!(e[0].reason.contains("524288"), "{}", e[0].reason);

    // A huge invalid name is quoted by its prefix and size only.
    let e = errors(&svc(&format!("{{name: {huge}}}"), "{app: a}"));
    assert!(e[0].reason.len() < 400, "{}", e[0].reason);
    assert!(e[0].reason.contains("(307200 bytes)"), "{}", e[0].reason);
}
