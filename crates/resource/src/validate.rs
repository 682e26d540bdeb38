//! Deciding whether an apply or a delete is accepted.
//!
//! An apply is accepted whole or not at all, so every problem in it is
//! reported at once: each resource alone (names, ports, durations,
//! regexes...) and the set against what the store already holds (a route
//! may only name Services that exist, no resource twice). Messages say what
//! to change, since they go straight to the person running `trellis apply`.

use std::borrow::Borrow;
use std::collections::HashMap;

use regex::Regex;

use crate::duration::{parse_duration, parse_optional_duration};
use crate::limits::{self, clip, clip_message, dns_label, dns_subdomain};
pub use crate::load::Source;
use crate::load::{LoadError, ResourceError};
use crate::refs::{names_service, ObjectRef};
use crate::types::*;

const MAX_REPLICAS: u32 = 1000;
const MIN_CERTIFICATE_TTL_SECS: u64 = 10;
/// The Gateway API's upper bound for a backendRef's weight.
const MAX_WEIGHT: u32 = 1_000_000;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// Validates a whole apply. `sources` runs parallel to `resources` (it may
/// be empty or short); `existing` is what the store holds now (resources,
/// or shared ones).
pub fn validate_apply<R: Borrow<Resource>>(
    resources: &[Resource],
    sources: &[Source],
    existing: &[R],
) -> Result<(), LoadError> {
    let services = ServiceTable::new(resources, existing);

    let mut errors = Vec::new();
    let mut first_seen: HashMap<ResourceKey, usize> = HashMap::new();
    for (i, r) in resources.iter().enumerate() {
        let mut p = Problems::default();
        check_resource(r, &services, &mut p);
        let key = r.key();
        if let Some(&first) = first_seen.get(&key) {
            p.add(
                "metadata.name",
                format!(
                    "{key} appears twice in this apply (also {}): keep one",
                    describe_source(sources.get(first), first)
                ),
            );
        } else {
            first_seen.insert(key, i);
        }
        errors.extend(p.located(r, sources.get(i)));
    }
    errors.extend(traffic_checks::check_conflicts(
        resources,
        sources,
        existing,
        |i, p| p.located(&resources[i], sources.get(i)),
    ));
    into_result(errors)
}

/// The Services a resource may name, by namespace and name. What this
/// apply writes wins over what the store holds, so a route may name a
/// Service whose new ports arrive in the same apply.
///
/// The store's Services are a sorted list searched by halves, not a hash
/// map: hashing the keys of every Service in the mesh was the largest part
/// of validating a one-route apply against 1,000 Services, and the list
/// the control plane passes is in key order already, so sorting it costs
/// one pass.
pub(crate) struct ServiceTable<'a> {
    applied: Vec<((&'a str, &'a str), &'a ServiceSpec)>,
    stored: Vec<((&'a str, &'a str), &'a ServiceSpec)>,
}

impl<'a> ServiceTable<'a> {
    fn new<R: Borrow<Resource>>(resources: &'a [Resource], existing: &'a [R]) -> Self {
        let named = |r: &'a Resource| {
            r.as_service().map(|spec| {
                (
                    (r.metadata.namespace.as_str(), r.metadata.name.as_str()),
                    spec,
                )
            })
        };
        let applied = resources.iter().filter_map(named).collect();
        let mut stored: Vec<_> = existing
            .iter()
            .map(Borrow::borrow)
            .filter_map(named)
            .collect();
        // Stable, so of two entries with one name the later stays last.
        stored.sort_by(|a, b| a.0.cmp(&b.0));
        stored.dedup_by(|later, earlier| {
            if later.0 == earlier.0 {
                *earlier = *later;
                true
            } else {
                false
            }
        });
        ServiceTable { applied, stored }
    }

    pub(crate) fn get(&self, key: &(&str, &str)) -> Option<&'a ServiceSpec> {
        // The last of this apply's entries with the name, as a map's
        // insert would keep.
        if let Some((_, spec)) = self.applied.iter().rev().find(|(k, _)| k == key) {
            return Some(spec);
        }
        self.stored
            .binary_search_by(|(k, _)| k.cmp(key))
            .ok()
            .map(|i| self.stored[i].1)
    }
}

/// Refuses to delete a Service that a remaining route still names, since
/// the route would start failing at once.
pub fn validate_delete<R: Borrow<Resource>>(
    key: &ResourceKey,
    remaining: &[R],
) -> Result<(), LoadError> {
    if key.kind != Kind::Service {
        return Ok(());
    }
    let mut errors = Vec::new();
    for r in remaining.iter().map(Borrow::borrow) {
        let fields: Vec<String> = r
            .route_refs()
            .into_iter()
            .filter(|re| re.target.is_service())
            .filter(|re| {
                re.target.name == key.name
                    && re.target.namespace_or(&r.metadata.namespace) == key.namespace
            })
            .map(|re| re.place.field())
            .collect();
        if !fields.is_empty() {
            errors.push(ResourceError::for_path(
                key.to_string(),
                format!(
                    "still used by {} ({}): delete or change that route first",
                    r.key(),
                    fields.join(", ")
                ),
            ));
        }
    }
    into_result(errors)
}

fn into_result(errors: Vec<ResourceError>) -> Result<(), LoadError> {
    if errors.is_empty() {
        Ok(())
    } else {
        Err(LoadError { errors })
    }
}

fn describe_source(source: Option<&Source>, index: usize) -> String {
    match source {
        Some(s) if !s.file.is_empty() && s.document > 0 => {
            format!("{} document {}", s.file, s.document)
        }
        Some(s) if !s.file.is_empty() => s.file.clone(),
        _ => format!("item {} of the apply", index + 1),
    }
}

/// The problems of one resource, as (field path, reason).
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push((field.into(), reason.into()));
    }

    fn check(&mut self, field: impl Into<String>, result: Result<(), String>) {
        if let Err(reason) = result {
            self.add(field, reason);
        }
    }

    /// Without a file to point at, the resource's own name is the most
    /// useful thing to lead the message with.
    fn located(self, r: &Resource, source: Option<&Source>) -> Vec<ResourceError> {
        let (file, document, line) = match source {
            Some(s) if !s.file.is_empty() || s.document > 0 => (s.file.clone(), s.document, s.line),
            _ => (r.key().to_string(), 0, None),
        };
        self.0
            .into_iter()
            .map(|(field, reason)| ResourceError {
                file: file.clone(),
                document,
                line,
                // Paths may hold user keys, reasons user values.
                field: if field.len() > 4 * limits::QUOTE_CHARS {
                    clip(&field)
                } else {
                    field
                },
                reason: clip_message(&reason),
            })
            .collect()
    }
}

fn check_resource(r: &Resource, services: &ServiceTable<'_>, p: &mut Problems) {
    let name = &r.metadata.name;
    // Route names are only labels on metrics and in the API, so the
    // Kubernetes rule for most objects (a DNS subdomain) is enough; the
    // others become parts of DNS names and identities.
    if matches!(r.kind(), Kind::HttpRoute | Kind::GrpcRoute) {
        p.check("metadata.name", dns_subdomain(name));
    } else {
        p.check("metadata.name", dns_label(name));
    }
    if r.kind().namespaced() {
        p.check("metadata.namespace", dns_label(&r.metadata.namespace));
    }
    p.0.extend(limits::check_labels("metadata.labels", &r.metadata.labels));
    p.0.extend(limits::check_annotations(&r.metadata.annotations));
    if let Some(bytes) = limits::oversized(r) {
        p.add(
            "",
            format!(
                "the resource takes {bytes} bytes as JSON, over the limit of {} bytes (512 KiB) \
                 for one resource: split it, or move large data out of it",
                limits::MAX_RESOURCE_BYTES
            ),
        );
    }
    match &r.spec {
        Spec::Mesh(spec) => check_mesh(name, spec, p),
        Spec::Service(spec) => check_service(spec, p),
        Spec::Workload(spec) => check_workload(spec, p),
        Spec::HttpRoute(spec) => check_route(&r.metadata.namespace, spec, services, p),
        Spec::GrpcRoute(spec) => {
            traffic_checks::check_grpc_route(&r.metadata.namespace, spec, services, p)
        }
        Spec::TrafficPolicy(spec) => {
            traffic_checks::check_traffic_policy(&r.metadata.namespace, spec, services, p)
        }
        Spec::AuthorizationPolicy(spec) => check_authz(&r.metadata.namespace, spec, services, p),
    }
}

/// A policy's `targetRef`: a Service in the policy's namespace.
fn check_target(
    namespace: &str,
    field: &str,
    t: &TargetRef,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    check_service_ref(namespace, field, &t.as_object_ref(), services, p);
}

/// `exact`, `prefix*` or `*suffix`; a lone `*` matches everything.
fn check_pattern(field: String, value: &str, p: &mut Problems) {
    let inner = value.strip_prefix('*').unwrap_or(value);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    if value.is_empty() {
        p.add(
            field,
            "is empty: use an exact value, `prefix*`, `*suffix` or `*`",
        );
    } else if inner.contains('*')
        || (value.starts_with('*') && value.ends_with('*') && value.len() > 1)
    {
        p.add(
            field,
            format!("`{value}`: `*` may stand only at the start or the end (exact, `prefix*`, `*suffix`)"),
        );
    }
}

fn check_authz(
    namespace: &str,
    spec: &AuthorizationPolicySpec,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    if let Some(t) = &spec.target_ref {
        check_target(namespace, "spec.targetRef", t, services, p);
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        for (j, from) in rule.from.iter().enumerate() {
            for (k, principal) in from.principals.iter().enumerate() {
                let field = format!("{at}.from[{j}].principals[{k}]");
                if principal != "*"
                    && !principal.starts_with("spiffe://")
                    && !principal.starts_with('*')
                {
                    p.add(
                        field,
                        format!("`{principal}`: a principal is a SPIFFE ID such as spiffe://trellis.local/ns/prod/sa/web"),
                    );
                } else {
                    check_pattern(field, principal, p);
                }
            }
            for (k, ns) in from.namespaces.iter().enumerate() {
                check_pattern(format!("{at}.from[{j}].namespaces[{k}]"), ns, p);
            }
        }
        for (j, to) in rule.to.iter().enumerate() {
            for (k, method) in to.methods.iter().enumerate() {
                if !METHODS.contains(&method.as_str()) {
                    p.add(
                        format!("{at}.to[{j}].methods[{k}]"),
                        format!(
                            "`{method}` is not an HTTP method: use one of {}",
                            METHODS.join(", ")
                        ),
                    );
                }
            }
            for (k, path) in to.paths.iter().enumerate() {
                let field = format!("{at}.to[{j}].paths[{k}]");
                if !path.starts_with('/') && !path.starts_with('*') {
                    p.add(
                        field,
                        format!("`{path}`: a path starts with `/` (or `*` for a suffix match)"),
                    );
                } else {
                    check_pattern(field, path, p);
                }
            }
            for (k, port) in to.ports.iter().enumerate() {
                if *port == 0 {
                    p.add(format!("{at}.to[{j}].ports[{k}]"), "port 0 is not a port");
                }
            }
        }
        for (j, cond) in rule.when.iter().enumerate() {
            p.check(format!("{at}.when[{j}].header"), header_name(&cond.header));
            if cond.values.is_empty() {
                p.add(
                    format!("{at}.when[{j}].values"),
                    "is empty: list the values the header may hold",
                );
            }
            for (k, v) in cond.values.iter().enumerate() {
                check_pattern(format!("{at}.when[{j}].values[{k}]"), v, p);
            }
        }
    }
}

fn check_mesh(name: &str, spec: &MeshSpec, p: &mut Problems) {
    if name != "default" {
        p.add(
            "metadata.name",
            format!("the Mesh is named `{name}`: there is one Mesh and it must be named `default`"),
        );
    }
    if spec.trust_domain.is_empty() {
        p.add(
            "spec.trustDomain",
            "is empty: use a DNS name such as `trellis.local`",
        );
    } else {
        p.check("spec.trustDomain", dns_subdomain(&spec.trust_domain));
    }
    match parse_duration(&spec.certificate_ttl) {
        Err(e) => p.add("spec.certificateTTL", e.to_string()),
        Ok(ttl) if ttl.as_secs() < MIN_CERTIFICATE_TTL_SECS => p.add(
            "spec.certificateTTL",
            format!(
                "`{}` is too short: certificates must live at least {MIN_CERTIFICATE_TTL_SECS}s",
                spec.certificate_ttl
            ),
        ),
        Ok(_) => {}
    }
    if let Some(tracing) = &spec.tracing {
        if !(0.0..=1.0).contains(&tracing.sampling) {
            p.add(
                "spec.tracing.sampling",
                format!(
                    "`{}` is not between 0 and 1: it is the share of traces sampled, e.g. 0.1",
                    tracing.sampling
                ),
            );
        }
        if let Some(ep) = &tracing.otlp_endpoint {
            let host = ep
                .strip_prefix("http://")
                .map(|rest| rest.split('/').next().unwrap_or(""));
            if !host.is_some_and(|h| !h.is_empty() && !h.contains(char::is_whitespace)) {
                p.add(
                    "spec.tracing.otlpEndpoint",
                    format!("`{ep}` is not an http:// URL with a host, e.g. http://127.0.0.1:4317"),
                );
            }
        }
    }
    if let Some(log) = &spec.access_log {
        match (&log.path, log.stdout) {
            (Some(_), true) | (None, false) => p.add(
                "spec.accessLog",
                "give exactly one of `stdout: true` or `path: FILE`",
            ),
            (Some(path), false) if path.trim().is_empty() => {
                p.add("spec.accessLog.path", "is empty: give a file path")
            }
            _ => {}
        }
    }
}

fn check_service(spec: &ServiceSpec, p: &mut Problems) {
    p.0.extend(limits::check_labels("spec.selector", &spec.selector));
    if spec.ports.is_empty() {
        p.add("spec.ports", "a Service needs at least one port");
    }
    let mut numbers: HashMap<u16, usize> = HashMap::new();
    let mut names: HashMap<&str, usize> = HashMap::new();
    for (i, port) in spec.ports.iter().enumerate() {
        let field = format!("spec.ports[{i}]");
        if port.port == 0 {
            p.add(
                format!("{field}.port"),
                "port 0 is not allowed: use 1 to 65535",
            );
        } else if let Some(first) = numbers.insert(port.port, i) {
            p.add(
                format!("{field}.port"),
                format!(
                    "port {} is listed twice (also spec.ports[{first}])",
                    port.port
                ),
            );
        }
        if port.target_port == Some(0) {
            p.add(
                format!("{field}.targetPort"),
                "port 0 is not allowed: use 1 to 65535",
            );
        }
        if let Some(name) = &port.name {
            if let Some(first) = names.insert(name, i) {
                p.add(
                    format!("{field}.name"),
                    format!("port name `{name}` is used twice (also spec.ports[{first}])"),
                );
            }
        }
    }
}

fn check_workload(spec: &WorkloadSpec, p: &mut Problems) {
    if spec.replicas > MAX_REPLICAS {
        p.add(
            "spec.replicas",
            format!(
                "{} is too many: at most {MAX_REPLICAS} replicas",
                spec.replicas
            ),
        );
    }
    match spec.command.first() {
        None => p.add(
            "spec.command",
            "is empty: give the program and its arguments, e.g. [trellis, demo-app]",
        ),
        Some(program) if program.is_empty() => {
            p.add("spec.command[0]", "the program name is empty")
        }
        Some(_) => {}
    }
    if spec.port == 0 {
        p.add("spec.port", "port 0 is not allowed: use 1 to 65535");
    }
    if let Some(sa) = &spec.service_account {
        p.check("spec.serviceAccount", dns_subdomain(sa));
    }
    for name in spec.env.keys() {
        if name.is_empty() || name.contains(['=', '\0']) {
            p.add(
                format!("spec.env.{name}"),
                format!("`{name}` is not an environment variable name: it must be non-empty, without `=`"),
            );
        }
    }
}

fn check_route(
    namespace: &str,
    spec: &HttpRouteSpec,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    if spec.parent_refs.is_empty() {
        p.add(
            "spec.parentRefs",
            "is empty: name the Service whose traffic this route steers, e.g. [{name: catalog}]",
        );
    }
    for re in spec.refs() {
        check_service_ref(namespace, &re.place.field(), &re.target, services, p);
    }
    for (i, host) in spec.hostnames.iter().enumerate() {
        let bare = host.strip_prefix("*.").unwrap_or(host);
        p.check(format!("spec.hostnames[{i}]"), dns_subdomain(bare));
    }
    for (i, rule) in spec.rules.iter().enumerate() {
        check_rule(&format!("spec.rules[{i}]"), rule, p);
    }
}

fn check_service_ref(
    own_namespace: &str,
    field: &str,
    re: &ObjectRef<'_>,
    services: &ServiceTable<'_>,
    p: &mut Problems,
) {
    // Group and kind are checked apart, so each gets its own message.
    if let Some(kind) = re.kind.filter(|k| !names_service(None, Some(k))) {
        p.add(
            format!("{field}.kind"),
            format!("`{kind}` is not supported: in the mesh a route refers to a Service"),
        );
    }
    if let Some(group) = re.group.filter(|g| !names_service(Some(g), None)) {
        p.add(
            format!("{field}.group"),
            format!("`{group}` is not supported: a Service's group is \"\" (core)"),
        );
    }
    if !re.is_service() {
        return;
    }
    let namespace = re.namespace_or(own_namespace);
    let Some(service) = services.get(&(namespace, re.name)) else {
        p.add(
            field,
            format!(
                "Service {namespace}/{} does not exist; apply it first or fix the name",
                re.name
            ),
        );
        return;
    };
    if let Some(port) = re.port {
        if !service.ports.iter().any(|sp| sp.port == port) {
            let has: Vec<String> = service.ports.iter().map(|sp| sp.port.to_string()).collect();
            p.add(
                format!("{field}.port"),
                format!(
                    "Service {namespace}/{} has no port {port} (it has {})",
                    re.name,
                    if has.is_empty() {
                        "none".into()
                    } else {
                        has.join(", ")
                    }
                ),
            );
        }
    }
}

fn check_rule(field: &str, rule: &RouteRule, p: &mut Problems) {
    for (i, m) in rule.matches.iter().enumerate() {
        check_match(&format!("{field}.matches[{i}]"), m, p);
    }
    for (i, f) in rule.filters.iter().enumerate() {
        traffic_checks::check_filter(
            &format!("{field}.filters[{i}]"),
            f,
            traffic_checks::HTTP_FILTERS,
            p,
        );
    }
    traffic_checks::check_rule_filters(field, rule, p);
    traffic_checks::check_backend_refs(field, &rule.backend_refs, p);
    if let Some(t) = &rule.timeouts {
        let request = check_duration(p, &format!("{field}.timeouts.request"), &t.request);
        let backend = check_duration(
            p,
            &format!("{field}.timeouts.backendRequest"),
            &t.backend_request,
        );
        // A zero request timeout means none, so any per-try timeout fits.
        if let (Some(request), Some(backend)) = (request, backend) {
            if !request.is_zero() && backend > request {
                p.add(
                    format!("{field}.timeouts.backendRequest"),
                    "is longer than timeouts.request, which includes every try: make it shorter",
                );
            }
        }
    }
    if let Some(retry) = &rule.retry {
        for (i, code) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                p.add(
                    format!("{field}.retry.codes[{i}]"),
                    format!("{code} is not an error status: retried codes are 400 to 599"),
                );
            }
        }
        check_duration(p, &format!("{field}.retry.backoff"), &retry.backoff);
    }
}

fn check_duration(
    p: &mut Problems,
    field: &str,
    value: &Option<String>,
) -> Option<std::time::Duration> {
    match parse_optional_duration(value.as_deref()) {
        Ok(d) => d,
        Err(e) => {
            p.add(field, e.to_string());
            None
        }
    }
}

fn check_match(field: &str, m: &RouteMatch, p: &mut Problems) {
    if let Some(path) = &m.path {
        let f = format!("{field}.path.value");
        match path.match_type {
            PathMatchType::Exact | PathMatchType::PathPrefix => {
                if !path.value.starts_with('/') {
                    p.add(f, format!("`{}` must start with `/`", path.value));
                }
            }
            PathMatchType::RegularExpression => p.check(f, compiles(&path.value)),
        }
    }
    check_match_headers(field, &m.headers, p);
    for (i, q) in m.query_params.iter().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        if q.name.is_empty() {
            p.add(
                format!("{f}.name"),
                "is empty: name the query parameter to match",
            );
        }
        if q.match_type == ValueMatchType::RegularExpression {
            p.check(format!("{f}.value"), compiles(&q.value));
        }
    }
    if let Some(method) = &m.method {
        if !METHODS.contains(&method.as_str()) {
            p.add(
                format!("{field}.method"),
                format!(
                    "`{method}` is not an HTTP method: use one of {}",
                    METHODS.join(", ")
                ),
            );
        }
    }
}

/// Header matches of a route match (HTTPRoute or GRPCRoute).
fn check_match_headers(field: &str, headers: &[HeaderMatch], p: &mut Problems) {
    for (i, h) in headers.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        p.check(format!("{f}.name"), header_name(&h.name));
        if h.match_type == ValueMatchType::RegularExpression {
            p.check(format!("{f}.value"), compiles(&h.value));
        }
    }
}

fn compiles(pattern: &str) -> Result<(), String> {
    Regex::new(pattern).map(drop).map_err(|e| {
        // The regex crate's messages span several lines (with a caret
        // under the pattern); errors here are one line each.
        let text = e.to_string();
        let why = text
            .lines()
            .find_map(|l| l.strip_prefix("error: "))
            .unwrap_or(text.lines().last().unwrap_or_default())
            .to_string();
        format!("`{pattern}` is not a valid regular expression: {why}")
    })
}

fn header_name(name: &str) -> Result<(), String> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if !name.is_empty() && name.chars().all(token) {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a valid header name: use letters, digits and `-`, e.g. `x-canary`"
        ))
    }
}

#[path = "validate_traffic.rs"]
mod traffic_checks;

#[cfg(test)]
#[path = "validate_tests.rs"]
mod tests;
