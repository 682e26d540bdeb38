use crate::load::parse_documents;
use crate::types::*;
use crate::validate::{validate_apply, validate_delete};
use crate::ResourceError;

const SERVICES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog-v2}
spec: {selector: {app: catalog, version: v2}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: shadow}
spec: {selector: {app: shadow}, ports: [{port: 8080}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: greeter}
spec: {selector: {app: greeter}, ports: [{port: 50051, protocol: grpc}]}
"#;

const POLICY: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: catalog}
spec:
  targetRef: {kind: Service, name: catalog}
  loadBalancer: {type: ring-hash, hashOn: {header: x-user}}
  connectionPool: {maxConnections: 100, maxPendingRequests: 10, maxRequests: 50}
  outlierDetection:
    consecutive5xxErrors: 3
    consecutiveGatewayErrors: 2
    interval: 5s
    baseEjectionTime: 10s
    maxEjectionTime: 1m
    maxEjectionPercent: 50
  retry:
    attempts: 2
    codes: [503]
    backoff: 10ms
    maxBackoff: 100ms
    perTryTimeout: 500ms
    budget: {ratio: 0.25, minRetriesPerSecond: 5, ttl: 10s}
  faultInjection:
    delay: {percent: 10, fixedDelay: 50ms}
    abort: {percent: 0.5, httpStatus: 503}
  localRateLimit: {requestsPerSecond: 50, burst: 10}
  healthCheck: {path: /healthz, interval: 2s, timeout: 500ms, healthyThreshold: 1, unhealthyThreshold: 2}
  locality: {enabled: true, failoverThreshold: 0.5}
"#;

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{kind: Service, name: catalog}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: catalog.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow, port: 8080}, percent: 50}
    backendRefs:
    - name: catalog-v2
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v2}]}
"#;

const GRPC_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter}
spec:
  parentRefs: [{kind: Service, name: greeter}]
  rules:
  - matches:
    - method: {service: helloworld.Greeter, method: SayHello}
      headers: [{name: x-canary, value: "yes"}]
    - method: {type: RegularExpression, service: "helloworld\\..*"}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: shadow}, fraction: {numerator: 1, denominator: 1000}}
    backendRefs: [{name: greeter, port: 50051}]
"#;

fn docs(yaml: &str) -> Vec<Resource> {
    parse_documents("t.yaml", yaml).unwrap()
}

fn all() -> Vec<Resource> {
    [POLICY, ROUTE, GRPC_ROUTE]
        .iter()
        .flat_map(|y| docs(y))
        .collect()
}

fn errors(resources: &[Resource], existing: &[Resource]) -> Vec<ResourceError> {
    validate_apply(resources, &[], existing)
        .err()
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Parses `yaml` (one document), checks it against the services, and
/// expects one error at `field` whose reason holds `reason`.
fn refused(yaml: &str, field: &str, reason: &str) {
    let errs = errors(&docs(yaml), &docs(SERVICES));
    assert_eq!(errs.len(), 1, "{field}: {errs:#?}");
    assert_eq!(errs[0].field, field, "{errs:#?}");
    assert!(errs[0].reason.contains(reason), "{}", errs[0]);
}

fn edit(base: &str, from: &str, to: &str) -> String {
    assert!(base.contains(from), "{from}");
    base.replacen(from, to, 1)
}

#[test]
fn a_full_policy_and_routes_are_valid_and_round_trip() {
    assert_eq!(errors(&all(), &docs(SERVICES)), vec![]);
    for r in all() {
        let json = serde_json::to_string(&r).unwrap();
        let back: Resource = serde_json::from_str(&json).unwrap();
        assert_eq!(back, r, "{json}");
    }
    let tp = docs(POLICY).remove(0);
    let tp = tp.as_traffic_policy().unwrap();
    assert_eq!(
        tp.load_balancer.as_ref().unwrap().lb_type,
        crate::LoadBalancerType::RingHash
    );
    assert_eq!(
        tp.outlier_detection
            .as_ref()
            .unwrap()
            .consecutive_5xx_errors,
        Some(3)
    );
}

#[test]
fn impossible_policies_are_refused() {
    refused(
        &edit(POLICY, "maxEjectionPercent: 50", "maxEjectionPercent: 101"),
        "spec.outlierDetection.maxEjectionPercent",
        "over 100",
    );
    refused(
        &edit(POLICY, ", hashOn: {header: x-user}", ""),
        "spec.loadBalancer.hashOn",
        "ring-hash needs a key",
    );
    refused(
        &edit(
            POLICY,
            "hashOn: {header: x-user}",
            "hashOn: {header: x-user, source: true}",
        ),
        "spec.loadBalancer.hashOn",
        "exactly one",
    );
    refused(
        &edit(POLICY, "type: ring-hash", "type: round-robin"),
        "spec.loadBalancer.hashOn",
        "only by ring-hash",
    );
    refused(
        &edit(POLICY, "maxRequests: 50", "maxRequests: 0"),
        "spec.connectionPool.maxRequests",
        "omit the field",
    );
    refused(
        &edit(POLICY, "delay: {percent: 10,", "delay: {percent: 110,"),
        "spec.faultInjection.delay.percent",
        "between 0 and 100",
    );
    refused(
        &edit(POLICY, "httpStatus: 503", "httpStatus: 99"),
        "spec.faultInjection.abort.httpStatus",
        "200 to 599",
    );
    refused(
        &edit(POLICY, "ratio: 0.25", "ratio: 2"),
        "spec.retry.budget.ratio",
        "between 0 and 1",
    );
    refused(
        &edit(POLICY, "perTryTimeout: 500ms", "perTryTimeout: soon"),
        "spec.retry.perTryTimeout",
        "duration",
    );
    refused(
        &edit(POLICY, "requestsPerSecond: 50", "requestsPerSecond: 0"),
        "spec.localRateLimit.requestsPerSecond",
        "refuse every request",
    );
    refused(
        &edit(POLICY, "path: /healthz", "path: healthz"),
        "spec.healthCheck.path",
        "start with `/`",
    );
    refused(
        &edit(POLICY, "failoverThreshold: 0.5", "failoverThreshold: 1.5"),
        "spec.locality.failoverThreshold",
        "between 0 and 1",
    );
    refused(
        &edit(
            POLICY,
            "name: catalog}\n  loadBalancer",
            "name: nosuch}\n  loadBalancer",
        ),
        "spec.targetRef",
        "does not exist",
    );
}

#[test]
fn route_filters_are_checked() {
    refused(
        &edit(
            ROUTE,
            "name: shadow, port: 8080",
            "name: missing, port: 8080",
        ),
        "spec.rules[1].filters[1].requestMirror.backendRef",
        "Service default/missing does not exist",
    );
    refused(
        &edit(ROUTE, "percent: 50", "percent: 150"),
        "spec.rules[1].filters[1].requestMirror.percent",
        "over 100",
    );
    refused(
        &edit(ROUTE, "statusCode: 301", "statusCode: 200"),
        "spec.rules[0].filters[0].requestRedirect.statusCode",
        "not a redirect status",
    );
    refused(
        &edit(
            ROUTE,
            "{type: PathPrefix, value: /old}",
            "{type: Exact, value: /old}",
        ),
        "spec.rules[0].filters",
        "ReplacePrefixMatch needs every match",
    );
    refused(
        &edit(
            ROUTE,
            "requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}",
            "requestRedirect: {path: {type: ReplaceFullPath}",
        ),
        "spec.rules[0].filters[0].requestRedirect.path.replaceFullPath",
        "is missing",
    );
    refused(
        &edit(
            ROUTE,
            "    - type: RequestMirror\n",
            "    - type: RequestRedirect\n      requestRedirect: {hostname: elsewhere}\n    - type: RequestMirror\n",
        ),
        "spec.rules[1].filters",
        "cannot be on the same rule",
    );
    refused(
        &edit(ROUTE, "type: RequestHeaderModifier", "type: URLRewrite"),
        "spec.rules[1].backendRefs[0].filters[0].type",
        "not supported here",
    );
    refused(
        &edit(
            ROUTE,
            "      urlRewrite: {hostname: catalog.internal, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}\n",
            "",
        ),
        "spec.rules[1].filters[0].urlRewrite",
        "is missing",
    );
}

#[test]
fn grpc_routes_are_checked() {
    refused(
        &edit(GRPC_ROUTE, "helloworld\\\\..*", "helloworld(("),
        "spec.rules[0].matches[1].method.service",
        "not a valid regular expression",
    );
    refused(
        &edit(
            GRPC_ROUTE,
            "{service: helloworld.Greeter, method: SayHello}",
            "{}",
        ),
        "spec.rules[0].matches[0].method",
        "neither service nor method",
    );
    refused(
        &edit(GRPC_ROUTE, "method: SayHello}", "method: Say/Hello}"),
        "spec.rules[0].matches[0].method.method",
        "not a gRPC method name",
    );
    refused(
        &edit(
            GRPC_ROUTE,
            "- type: RequestMirror\n      requestMirror: {backendRef: {name: shadow}, fraction: {numerator: 1, denominator: 1000}}",
            "- type: RequestRedirect\n      requestRedirect: {hostname: x}",
        ),
        "spec.rules[0].filters[0].type",
        "not supported here",
    );
    refused(
        &edit(GRPC_ROUTE, "port: 50051}]", "port: 50051, weight: 0}]"),
        "spec.rules[0].backendRefs",
        "weight 0",
    );
}

#[test]
fn one_traffic_policy_per_service() {
    let second = edit(
        POLICY,
        "metadata: {name: catalog}",
        "metadata: {name: catalog-2}",
    );
    let both: Vec<Resource> = docs(POLICY).into_iter().chain(docs(&second)).collect();
    let errs = errors(&both, &docs(SERVICES));
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs.iter().all(|e| e.field == "spec.targetRef"));
    assert!(errs[0]
        .reason
        .contains("already has a TrafficPolicy: TrafficPolicy default/catalog-2"));

    // One already stored, a second in this apply: the new one is refused.
    let existing: Vec<Resource> = docs(SERVICES).into_iter().chain(docs(POLICY)).collect();
    let errs = errors(&docs(&second), &existing);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert!(errs[0]
        .reason
        .contains("TrafficPolicy default/catalog (already applied)"));

    // Re-applying the same policy (same name) replaces it: no conflict.
    assert_eq!(errors(&docs(POLICY), &existing), vec![]);
}

#[test]
fn http_and_grpc_routes_may_not_share_a_parent() {
    let grpc_on_catalog = edit(
        GRPC_ROUTE,
        "parentRefs: [{kind: Service, name: greeter}]",
        "parentRefs: [{kind: Service, name: catalog}]",
    );
    let existing: Vec<Resource> = docs(SERVICES).into_iter().chain(docs(ROUTE)).collect();
    let errs = errors(&docs(&grpc_on_catalog), &existing);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].field, "spec.parentRefs");
    assert!(
        errs[0].reason.contains("both HTTPRoutes and GRPCRoutes"),
        "{}",
        errs[0]
    );
}

#[test]
fn deleting_a_mirror_or_grpc_backend_is_refused() {
    let remaining: Vec<Resource> = docs(SERVICES).into_iter().chain(all()).collect();
    let key = ResourceKey {
        kind: Kind::Service,
        namespace: "default".into(),
        name: "shadow".into(),
    };
    let errs = validate_delete(&key, &remaining).unwrap_err().errors;
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert!(errs[0].reason.contains("requestMirror"), "{}", errs[0]);
}
