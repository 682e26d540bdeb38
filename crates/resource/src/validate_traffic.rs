//! Validation of traffic management: route filters, GRPCRoutes and
//! TrafficPolicies, and the conflicts between resources of an apply and the
//! store (two TrafficPolicies for one Service, an HTTPRoute and a GRPCRoute
//! on one parent). A child of `validate`, whose helpers it shares.

use std::collections::{BTreeMap, HashMap};

use super::{
    check_duration, check_match_headers, check_service_ref, check_target, compiles,
    describe_source, header_name, Problems, ServiceTable, MAX_WEIGHT,
};
use crate::load::{ResourceError, Source};
use crate::traffic::*;
use crate::types::*;

/// (namespace, Service) → the resources naming it: their key, and their
/// index in this apply (None: already stored).
type ByService = BTreeMap<(String, String), Vec<(ResourceKey, Option<usize>)>>;

/// The filters an HTTPRoute rule may carry.
pub(super) const HTTP_FILTERS: &[FilterType] = &[
    FilterType::RequestHeaderModifier,
    FilterType::ResponseHeaderModifier,
    FilterType::RequestRedirect,
    FilterType::UrlRewrite,
    FilterType::RequestMirror,
];

/// The filters of a backendRef: they act only on requests sent to it.
pub(super) const BACKEND_FILTERS: &[FilterType] = &[
    FilterType::RequestHeaderModifier,
    FilterType::ResponseHeaderModifier,
];

/// The filters a GRPCRoute rule may carry.
const GRPC_FILTERS: &[FilterType] = &[
    FilterType::RequestHeaderModifier,
    FilterType::ResponseHeaderModifier,
    FilterType::RequestMirror,
];

const REDIRECT_CODES: [u16; 5] = [301, 302, 303, 307, 308];

fn field_name(t: FilterType) -> &'static str {
    match t {
        FilterType::RequestHeaderModifier => "requestHeaderModifier",
        FilterType::ResponseHeaderModifier => "responseHeaderModifier",
        FilterType::RequestRedirect => "requestRedirect",
        FilterType::UrlRewrite => "urlRewrite",
        FilterType::RequestMirror => "requestMirror",
    }
}

fn type_name(t: FilterType) -> &'static str {
    match t {
        FilterType::UrlRewrite => "URLRewrite",
        FilterType::RequestHeaderModifier => "RequestHeaderModifier",
        FilterType::ResponseHeaderModifier => "ResponseHeaderModifier",
        FilterType::RequestRedirect => "RequestRedirect",
        FilterType::RequestMirror => "RequestMirror",
    }
}

/// One filter: its type is allowed here, its settings field is present and
/// valid, and no other type's field is.
pub(super) fn check_filter(field: &str, f: &RouteFilter, allowed: &[FilterType], p: &mut Problems) {
    if !allowed.contains(&f.filter_type) {
        let names: Vec<&str> = allowed.iter().map(|t| type_name(*t)).collect();
        p.add(
            format!("{field}.type"),
            format!(
                "{} is not supported here: use {}",
                type_name(f.filter_type),
                names.join(", ")
            ),
        );
        return;
    }
    let present = [
        (
            FilterType::RequestHeaderModifier,
            f.request_header_modifier.is_some(),
        ),
        (
            FilterType::ResponseHeaderModifier,
            f.response_header_modifier.is_some(),
        ),
        (FilterType::RequestRedirect, f.request_redirect.is_some()),
        (FilterType::UrlRewrite, f.url_rewrite.is_some()),
        (FilterType::RequestMirror, f.request_mirror.is_some()),
    ];
    let wanted = field_name(f.filter_type);
    for (t, is_present) in present {
        if t == f.filter_type && !is_present {
            p.add(
                format!("{field}.{wanted}"),
                format!(
                    "is missing: a filter of type {} needs it",
                    type_name(f.filter_type)
                ),
            );
        } else if t != f.filter_type && is_present {
            p.add(
                format!("{field}.{}", field_name(t)),
                format!(
                    "does not belong in a filter of type {}: remove it",
                    type_name(f.filter_type)
                ),
            );
        }
    }
    let at = format!("{field}.{wanted}");
    match f.filter_type {
        FilterType::RequestHeaderModifier | FilterType::ResponseHeaderModifier => {
            let m = f
                .request_header_modifier
                .as_ref()
                .or(f.response_header_modifier.as_ref());
            if let Some(m) = m {
                for (list, values) in [("set", &m.set), ("add", &m.add)] {
                    for (i, hv) in values.iter().enumerate() {
                        p.check(format!("{at}.{list}[{i}].name"), header_name(&hv.name));
                    }
                }
                for (i, name) in m.remove.iter().enumerate() {
                    p.check(format!("{at}.remove[{i}]"), header_name(name));
                }
            }
        }
        FilterType::RequestRedirect => {
            if let Some(r) = &f.request_redirect {
                if let Some(s) = r
                    .scheme
                    .as_deref()
                    .filter(|s| !matches!(*s, "http" | "https"))
                {
                    p.add(
                        format!("{at}.scheme"),
                        format!("`{s}` is not supported: use http or https"),
                    );
                }
                if let Some(h) = &r.hostname {
                    p.check(format!("{at}.hostname"), super::dns_subdomain(h));
                }
                if r.port == Some(0) {
                    p.add(format!("{at}.port"), "port 0 is not a port");
                }
                if let Some(code) = r.status_code.filter(|c| !REDIRECT_CODES.contains(c)) {
                    p.add(
                        format!("{at}.statusCode"),
                        format!("{code} is not a redirect status: use 301, 302, 303, 307 or 308"),
                    );
                }
                if let Some(m) = &r.path {
                    check_path_modifier(&format!("{at}.path"), m, p);
                }
            }
        }
        FilterType::UrlRewrite => {
            if let Some(r) = &f.url_rewrite {
                if let Some(h) = &r.hostname {
                    p.check(format!("{at}.hostname"), super::dns_subdomain(h));
                }
                if let Some(m) = &r.path {
                    check_path_modifier(&format!("{at}.path"), m, p);
                }
            }
        }
        FilterType::RequestMirror => {
            if let Some(m) = &f.request_mirror {
                if m.percent.is_some() && m.fraction.is_some() {
                    p.add(
                        format!("{at}.fraction"),
                        "give either percent or fraction, not both",
                    );
                }
                if let Some(pc) = m.percent.filter(|pc| *pc > 100) {
                    p.add(
                        format!("{at}.percent"),
                        format!("{pc} is over 100: it is the share of requests mirrored"),
                    );
                }
                if let Some(fr) = &m.fraction {
                    if fr.denominator == 0 {
                        p.add(format!("{at}.fraction.denominator"), "must be above 0");
                    } else if fr.numerator > fr.denominator {
                        p.add(
                            format!("{at}.fraction.numerator"),
                            "is above the denominator: the share cannot exceed 1",
                        );
                    }
                }
            }
        }
    }
}

fn check_path_modifier(field: &str, m: &PathModifier, p: &mut Problems) {
    let (wanted, value, other, other_present) = match m.modifier_type {
        PathModifierType::ReplaceFullPath => (
            "replaceFullPath",
            &m.replace_full_path,
            "replacePrefixMatch",
            m.replace_prefix_match.is_some(),
        ),
        PathModifierType::ReplacePrefixMatch => (
            "replacePrefixMatch",
            &m.replace_prefix_match,
            "replaceFullPath",
            m.replace_full_path.is_some(),
        ),
    };
    match value {
        None => p.add(
            format!("{field}.{wanted}"),
            format!(
                "is missing: a path modifier of type {:?} needs it",
                m.modifier_type
            ),
        ),
        Some(v) if !v.starts_with('/') => p.add(
            format!("{field}.{wanted}"),
            format!("`{v}` must start with `/`"),
        ),
        Some(_) => {}
    }
    if other_present {
        p.add(
            format!("{field}.{other}"),
            format!("does not belong with type {:?}: remove it", m.modifier_type),
        );
    }
}

/// What the filters of one HTTPRoute rule may not do together.
pub(super) fn check_rule_filters(field: &str, rule: &RouteRule, p: &mut Problems) {
    let mut seen: HashMap<FilterType, usize> = HashMap::new();
    for (i, f) in rule.filters.iter().enumerate() {
        if f.filter_type == FilterType::RequestMirror {
            continue;
        }
        if let Some(first) = seen.insert(f.filter_type, i) {
            p.add(
                format!("{field}.filters[{i}]"),
                format!(
                    "a second {} filter (also filters[{first}]): merge them into one",
                    type_name(f.filter_type)
                ),
            );
        }
    }
    if seen.contains_key(&FilterType::RequestRedirect) && seen.contains_key(&FilterType::UrlRewrite)
    {
        p.add(
            format!("{field}.filters"),
            "RequestRedirect and URLRewrite cannot be on the same rule: a redirect answers before any rewrite",
        );
    }
    let prefix_replaced = rule.filters.iter().any(|f| {
        let path = f
            .request_redirect
            .as_ref()
            .and_then(|r| r.path.as_ref())
            .or(f.url_rewrite.as_ref().and_then(|r| r.path.as_ref()));
        path.is_some_and(|m| m.modifier_type == PathModifierType::ReplacePrefixMatch)
    });
    let only_prefixes = rule.matches.iter().all(|m| {
        m.path
            .as_ref()
            .is_none_or(|p| p.match_type == PathMatchType::PathPrefix)
    });
    if prefix_replaced && !only_prefixes {
        p.add(
            format!("{field}.filters"),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match: \
             use ReplaceFullPath, or change the matches",
        );
    }
}

pub(super) fn check_grpc_route(
    namespace: &str,
    spec: &GrpcRouteSpec,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    if spec.parent_refs.is_empty() {
        p.add(
            "spec.parentRefs",
            "is empty: name the Service whose gRPC traffic this route steers, e.g. [{name: greeter}]",
        );
    }
    for re in spec.refs() {
        check_service_ref(namespace, &re.place.field(), &re.target, services, p);
    }
    for (i, host) in spec.hostnames.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        p.check(format!("spec.hostnames[{i}]"), super::dns_subdomain(bare));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("{field}.matches[{j}]");
            if let Some(method) = &m.method {
                check_grpc_method(&format!("{at}.method"), method, p);
            }
            check_match_headers(&at, &m.headers, p);
        }
        for (j, f) in rule.filters.iter().enumerate() {
            check_filter(&format!("{field}.filters[{j}]"), f, GRPC_FILTERS, p);
        }
        check_backend_refs(&field, &rule.backend_refs, p);
    }
}

fn check_grpc_method(field: &str, m: &GrpcMethodMatch, p: &mut Problems) {
    let service = m.service.as_deref().filter(|s| !s.is_empty());
    let method = m.method.as_deref().filter(|s| !s.is_empty());
    if service.is_none() && method.is_none() {
        p.add(
            field,
            "names neither service nor method: give at least one, e.g. {service: helloworld.Greeter}",
        );
        return;
    }
    for (name, value) in [("service", service), ("method", method)] {
        let Some(value) = value else { continue };
        match m.match_type {
            ValueMatchType::RegularExpression => {
                p.check(format!("{field}.{name}"), compiles(value))
            }
            ValueMatchType::Exact => {
                let ok_char = |c: char| {
                    c.is_ascii_alphanumeric() || c == '_' || (name == "service" && c == '.')
                };
                if !value.chars().all(ok_char) {
                    p.add(
                        format!("{field}.{name}"),
                        format!(
                            "`{value}` is not a gRPC {name} name: use letters, digits, `_`{}",
                            if name == "service" {
                                " and `.` (package.Service)"
                            } else {
                                ""
                            }
                        ),
                    );
                }
            }
        }
    }
}

/// Weights of a rule's backendRefs, and their filters.
pub(super) fn check_backend_refs(field: &str, refs: &[BackendRef], p: &mut Problems) {
    for (i, b) in refs.iter().enumerate() {
        if b.weight > MAX_WEIGHT {
            p.add(
                format!("{field}.backendRefs[{i}].weight"),
                format!("{} is too large: weights go up to {MAX_WEIGHT}", b.weight),
            );
        }
        for (j, f) in b.filters.iter().enumerate() {
            check_filter(
                &format!("{field}.backendRefs[{i}].filters[{j}]"),
                f,
                BACKEND_FILTERS,
                p,
            );
        }
    }
    if !refs.is_empty() && refs.iter().all(|b| b.weight == 0) {
        p.add(
            format!("{field}.backendRefs"),
            "every backendRef has weight 0, so the rule has nowhere to send traffic: \
             give at least one a weight above 0",
        );
    }
}

fn positive(p: &mut Problems, field: &str, value: Option<u32>, what: &str) {
    if value == Some(0) {
        p.add(field, format!("0 {what}: omit the field for no limit"));
    }
}

fn share(p: &mut Problems, field: &str, value: f64, max: f64, what: &str) {
    if !value.is_finite() || !(0.0..=max).contains(&value) {
        p.add(
            field,
            format!("`{value}` is not between 0 and {max}: it is {what}"),
        );
    }
}

pub(super) fn check_traffic_policy(
    namespace: &str,
    spec: &TrafficPolicySpec,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    check_target(namespace, "spec.targetRef", &spec.target_ref, services, p);
    if let Some(lb) = &spec.load_balancer {
        let f = "spec.loadBalancer";
        match (&lb.lb_type, &lb.hash_on) {
            (LoadBalancerType::RingHash, None) => p.add(
                format!("{f}.hashOn"),
                "is missing: ring-hash needs a key, e.g. hashOn: {header: x-user}",
            ),
            (LoadBalancerType::RingHash, Some(h)) => {
                let given = [h.header.is_some(), h.cookie.is_some(), h.source]
                    .iter()
                    .filter(|b| **b)
                    .count();
                if given != 1 {
                    p.add(
                        format!("{f}.hashOn"),
                        "give exactly one of header, cookie or source: true",
                    );
                }
                if let Some(name) = &h.header {
                    p.check(format!("{f}.hashOn.header"), header_name(name));
                }
                if let Some(name) = &h.cookie {
                    if name.is_empty() || name.contains([';', '=', ' ', ',']) {
                        p.add(
                            format!("{f}.hashOn.cookie"),
                            format!("`{name}` is not a cookie name"),
                        );
                    }
                }
            }
            (other, Some(_)) => p.add(
                format!("{f}.hashOn"),
                format!(
                    "is used only by ring-hash, not {}: remove it",
                    other.as_str()
                ),
            ),
            (_, None) => {}
        }
    }
    if let Some(cp) = &spec.connection_pool {
        let f = "spec.connectionPool";
        positive(
            p,
            &format!("{f}.maxConnections"),
            cp.max_connections,
            "connections would refuse every connection",
        );
        positive(
            p,
            &format!("{f}.maxPendingRequests"),
            cp.max_pending_requests,
            "pending requests would refuse every new connection's requests",
        );
        positive(
            p,
            &format!("{f}.maxRequests"),
            cp.max_requests,
            "requests would refuse every request",
        );
    }
    if let Some(od) = &spec.outlier_detection {
        let f = "spec.outlierDetection";
        check_duration(p, &format!("{f}.interval"), &od.interval);
        let base = check_duration(p, &format!("{f}.baseEjectionTime"), &od.base_ejection_time);
        check_duration(p, &format!("{f}.maxEjectionTime"), &od.max_ejection_time);
        if base.is_some_and(|b| b.is_zero()) {
            p.add(
                format!("{f}.baseEjectionTime"),
                "is zero: an ejection would last no time",
            );
        }
        if let Some(pc) = od.max_ejection_percent.filter(|pc| *pc > 100) {
            p.add(
                format!("{f}.maxEjectionPercent"),
                format!("{pc} is over 100: it is the largest share of endpoints ejected at once"),
            );
        }
        if od.consecutive_5xx_errors == Some(0) && od.consecutive_gateway_errors.unwrap_or(0) == 0 {
            p.add(
                format!("{f}.consecutive5xxErrors"),
                "0 turns detection off and consecutiveGatewayErrors is not set: remove outlierDetection, or set a count",
            );
        }
    }
    if let Some(r) = &spec.retry {
        let f = "spec.retry";
        if let Some(n) = r.attempts.filter(|n| *n > 10) {
            p.add(
                format!("{f}.attempts"),
                format!("{n} is too many: at most 10 retries"),
            );
        }
        for (i, code) in r.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                p.add(
                    format!("{f}.codes[{i}]"),
                    format!("{code} is not an error status: retried codes are 400 to 599"),
                );
            }
        }
        let backoff = check_duration(p, &format!("{f}.backoff"), &r.backoff);
        let max = check_duration(p, &format!("{f}.maxBackoff"), &r.max_backoff);
        if let (Some(b), Some(m)) = (backoff, max) {
            if m < b {
                p.add(
                    format!("{f}.maxBackoff"),
                    "is shorter than backoff: make it longer",
                );
            }
        }
        if check_duration(p, &format!("{f}.perTryTimeout"), &r.per_try_timeout)
            .is_some_and(|d| d.is_zero())
        {
            p.add(
                format!("{f}.perTryTimeout"),
                "is zero: omit it for no per-try limit",
            );
        }
        if let Some(b) = &r.budget {
            if let Some(ratio) = b.ratio {
                share(
                    p,
                    &format!("{f}.budget.ratio"),
                    ratio,
                    1.0,
                    "the share of requests that may be retried, e.g. 0.2",
                );
            }
            if check_duration(p, &format!("{f}.budget.ttl"), &b.ttl)
                .is_some_and(|d| d.as_millis() < 1000)
            {
                p.add(
                    format!("{f}.budget.ttl"),
                    "is under 1s: the budget needs a window of at least a second",
                );
            }
        }
    }
    if let Some(fi) = &spec.fault_injection {
        let f = "spec.faultInjection";
        if fi.delay.is_none() && fi.abort.is_none() {
            p.add(
                f,
                "has neither delay nor abort: add one, or remove faultInjection",
            );
        }
        if let Some(d) = &fi.delay {
            share(
                p,
                &format!("{f}.delay.percent"),
                d.percent,
                100.0,
                "the share of requests delayed",
            );
            check_duration(
                p,
                &format!("{f}.delay.fixedDelay"),
                &Some(d.fixed_delay.clone()),
            );
        }
        if let Some(a) = &fi.abort {
            share(
                p,
                &format!("{f}.abort.percent"),
                a.percent,
                100.0,
                "the share of requests aborted",
            );
            if let Some(code) = a.http_status.filter(|c| !(200..=599).contains(c)) {
                p.add(
                    format!("{f}.abort.httpStatus"),
                    format!("{code} is not an HTTP status: use 200 to 599"),
                );
            }
        }
    }
    if let Some(rl) = &spec.local_rate_limit {
        let f = "spec.localRateLimit";
        if rl.requests_per_second == 0 {
            p.add(
                format!("{f}.requestsPerSecond"),
                "0 would refuse every request: give the rate allowed",
            );
        }
        if rl.burst == Some(0) {
            p.add(
                format!("{f}.burst"),
                "0 would refuse every request: omit it to allow requestsPerSecond at once",
            );
        }
    }
    if let Some(hc) = &spec.health_check {
        let f = "spec.healthCheck";
        if !hc.path.starts_with('/') {
            p.add(
                format!("{f}.path"),
                format!("`{}` must start with `/`", hc.path),
            );
        }
        let interval = check_duration(p, &format!("{f}.interval"), &hc.interval);
        let timeout = check_duration(p, &format!("{f}.timeout"), &hc.timeout);
        if interval.is_some_and(|d| d.as_millis() < 100) {
            p.add(format!("{f}.interval"), "is under 100ms: check less often");
        }
        if timeout.is_some_and(|d| d.is_zero()) {
            p.add(format!("{f}.timeout"), "is zero: every check would fail");
        }
        for (name, v) in [
            ("healthyThreshold", hc.healthy_threshold),
            ("unhealthyThreshold", hc.unhealthy_threshold),
        ] {
            if v == Some(0) {
                p.add(format!("{f}.{name}"), "must be at least 1");
            }
        }
    }
    if let Some(t) = spec.locality.as_ref().and_then(|l| l.failover_threshold) {
        share(
            p,
            "spec.locality.failoverThreshold",
            t,
            1.0,
            "the healthy share of the caller's zone below which traffic fails over",
        );
    }
}

/// Conflicts across resources: at most one TrafficPolicy per Service, and
/// no Service that is the parent of both an HTTPRoute and a GRPCRoute
/// (GEP-1426: the HTTPRoute would be ignored). What this apply writes
/// replaces what the store holds under the same key.
pub(super) fn check_conflicts<R: std::borrow::Borrow<Resource>>(
    resources: &[Resource],
    sources: &[Source],
    existing: &[R],
    mut located: impl FnMut(usize, Problems) -> Vec<ResourceError>,
) -> Vec<ResourceError> {
    let applied: HashMap<ResourceKey, usize> = resources
        .iter()
        .enumerate()
        .map(|(i, r)| (r.key(), i))
        .collect();
    // (namespace, service) -> policies/routes naming it: key, index in this apply.
    let mut policies = ByService::new();
    let mut http_parents = ByService::new();
    let mut grpc_parents = ByService::new();
    // Only these kinds can conflict: the others are passed over before
    // their keys are built (a thousand Services in a mesh).
    let stored = existing
        .iter()
        .map(std::borrow::Borrow::borrow)
        .filter(|r| {
            matches!(
                r.spec,
                Spec::TrafficPolicy(_) | Spec::HttpRoute(_) | Spec::GrpcRoute(_)
            )
        })
        .filter(|r| !applied.contains_key(&r.key()))
        .map(|r| (r, None));
    let new = resources.iter().enumerate().map(|(i, r)| (r, Some(i)));
    for (r, at) in stored.chain(new) {
        let ns = r.metadata.namespace.clone();
        match &r.spec {
            Spec::TrafficPolicy(tp) => policies
                .entry((ns, tp.target_ref.name.clone()))
                .or_default()
                .push((r.key(), at)),
            Spec::HttpRoute(_) => add_parents(&mut http_parents, r, at),
            Spec::GrpcRoute(_) => add_parents(&mut grpc_parents, r, at),
            _ => {}
        }
    }
    let name_of = |key: &ResourceKey, at: Option<usize>| match at {
        Some(i) => format!("{key} ({})", describe_source(sources.get(i), i)),
        None => format!("{key} (already applied)"),
    };
    let mut errors = Vec::new();
    for ((ns, svc), list) in &policies {
        if list.len() < 2 {
            continue;
        }
        for (key, at) in list {
            let Some(i) = at else { continue };
            let others: Vec<String> = list
                .iter()
                .filter(|(k, _)| k != key)
                .map(|(k, a)| name_of(k, *a))
                .collect();
            let mut p = Problems::default();
            p.add(
                "spec.targetRef",
                format!(
                    "Service {ns}/{svc} already has a TrafficPolicy: {}; a Service takes one, so merge them",
                    others.join(", ")
                ),
            );
            errors.extend(located(*i, p));
        }
    }
    for (parent, grpc) in &grpc_parents {
        let Some(http) = http_parents.get(parent) else {
            continue;
        };
        let (ns, svc) = parent;
        for (key, at) in grpc.iter().chain(http) {
            let Some(i) = at else { continue };
            let others: Vec<String> = grpc
                .iter()
                .chain(http)
                .filter(|(k, _)| k.kind != key.kind)
                .map(|(k, a)| name_of(k, *a))
                .collect();
            let mut p = Problems::default();
            p.add(
                "spec.parentRefs",
                format!(
                    "Service {ns}/{svc} would have both HTTPRoutes and GRPCRoutes ({}): \
                     the Gateway API ignores the HTTPRoute then; route it with one kind",
                    others.join(", ")
                ),
            );
            errors.extend(located(*i, p));
        }
    }
    errors
}

fn add_parents(by_parent: &mut ByService, route: &Resource, at: Option<usize>) {
    for (ns, name) in route.parent_services() {
        by_parent
            .entry((ns.to_string(), name.to_string()))
            .or_default()
            .push((route.key(), at));
    }
}

#[cfg(test)]
#[path = "validate_traffic_tests.rs"]
mod tests;
