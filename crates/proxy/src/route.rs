//! HTTPRoute and GRPCRoute rules compiled for matching on the request path.
//!
//! HTTPRoute precedence follows the Gateway API: an exact path beats a
//! prefix, a longer prefix beats a shorter one, then a method match, then
//! more header matches, then more query matches. GRPCRoute precedence: the
//! longer matching service, then the longer method, then more header
//! matches. Ties go to the route that sorts first by namespace/name, then
//! to rule order. A Service with GRPCRoutes is routed by them alone
//! (GEP-1426: an HTTPRoute on the same parent is ignored).

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use rand::Rng;
use regex::Regex;
use trellis_resource::{
    parse_optional_duration, BackendRef, DurationError, GrpcRouteRule, HeaderMatch, HeaderModifier,
    PathMatchType, RequestRedirect, Resource, RouteFilter, RouteRule, UrlRewrite, ValueMatchType,
    RETRY_NON_IDEMPOTENT_ANNOTATION,
};

use crate::snapshot::SvcKey;

/// Why a route cannot be compiled; the resource's validation refuses
/// most of these before they reach a proxy.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error(transparent)]
    Regex(#[from] regex::Error),
    #[error(transparent)]
    HeaderName(#[from] http::header::InvalidHeaderName),
    #[error(transparent)]
    Method(#[from] http::method::InvalidMethod),
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error("a gRPC method match names neither service nor method")]
    EmptyGrpcMethod,
}

#[derive(Debug)]
pub struct Rule {
    /// The route's name, used as the `route` metric label.
    pub route: String,
    pub backends: Vec<Backend>,
    total_weight: u64,
    pub request_timeout: Option<Duration>,
    pub backend_timeout: Option<Duration>,
    pub retry: Option<Retry>,
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    /// Answer with a redirect instead of forwarding.
    pub redirect: Option<RequestRedirect>,
    pub rewrite: Option<UrlRewrite>,
    pub mirrors: Vec<Mirror>,
    /// The route's annotation lets retries resend POST and PATCH.
    pub retry_non_idempotent: bool,
}

#[derive(Debug)]
pub struct Backend {
    pub service: SvcKey,
    pub weight: u32,
    /// Header filters of the backendRef: only for requests sent to it.
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
}

/// A RequestMirror filter: where copies go, and which share of requests.
#[derive(Clone, Debug, PartialEq)]
pub struct Mirror {
    pub service: SvcKey,
    pub share: f64,
}

#[derive(Clone, Debug)]
pub struct Retry {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
}

#[derive(Debug)]
enum PathM {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueM {
    Exact(String),
    Regex(Regex),
}

impl ValueM {
    fn matches(&self, v: &str) -> bool {
        match self {
            ValueM::Exact(s) => s == v,
            ValueM::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct Match {
    path: PathM,
    headers: Vec<(HeaderName, ValueM)>,
    query: Vec<(String, ValueM)>,
    method: Option<Method>,
    rule: usize,
    /// Precedence, compared in order; higher wins.
    rank: [usize; 5],
}

/// The compiled routes of one service.
#[derive(Debug, Default)]
pub struct RouteTable {
    rules: Vec<Rule>,
    // Sorted by precedence, best first.
    matches: Vec<Match>,
}

/// The rule that takes a request, and the prefix its match matched (for
/// `ReplacePrefixMatch`).
#[derive(Clone, Copy, Debug)]
pub struct Matched<'a> {
    pub rule: &'a Rule,
    pub prefix: Option<&'a str>,
}

impl Match {
    fn http_rank(&self) -> [usize; 5] {
        let (kind, len) = match &self.path {
            PathM::Exact(p) => (2, p.len()),
            PathM::Prefix(p) => (1, p.len()),
            PathM::Regex(_) => (0, 0),
        };
        [
            kind,
            len,
            self.method.is_some() as usize,
            self.headers.len(),
            self.query.len(),
        ]
    }

    fn matches<B>(&self, req: &Request<B>, path: &str) -> bool {
        let path_ok = match &self.path {
            PathM::Exact(p) => path == p,
            PathM::Prefix(p) => prefix_matches(p, path),
            PathM::Regex(r) => r.is_match(path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method())
            && self.headers.iter().all(|(name, m)| {
                req.headers()
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            })
            && self.query.iter().all(|(name, m)| {
                let q = req.uri().query().unwrap_or("");
                q.split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == name && m.matches(v)
                })
            })
    }
}

/// Gateway API prefixes match whole path elements: `/foo` matches `/foo`
/// and `/foo/bar`, never `/foobar`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// `ReplacePrefixMatch`: the matched prefix of `path` becomes
/// `replacement`, on whole path elements, as the Gateway API's table says
/// (`/foo/bar` with prefix `/foo` and `/xyz` gives `/xyz/bar`; with `/`
/// gives `/bar`).
pub fn replace_prefix(path: &str, prefix: &str, replacement: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix).unwrap_or(path);
    let out = format!("{}{rest}", replacement.trim_end_matches('/'));
    if out.is_empty() {
        "/".to_string()
    } else {
        out
    }
}

fn value_matcher(t: ValueMatchType, value: &str) -> Result<ValueM, RouteError> {
    Ok(match t {
        ValueMatchType::Exact => ValueM::Exact(value.to_string()),
        ValueMatchType::RegularExpression => ValueM::Regex(Regex::new(&format!("^(?:{value})$"))?),
    })
}

fn header_matchers(headers: &[HeaderMatch]) -> Result<Vec<(HeaderName, ValueM)>, RouteError> {
    headers
        .iter()
        .map(|h| {
            let name = HeaderName::try_from(h.name.to_ascii_lowercase())?;
            Ok((name, value_matcher(h.match_type, &h.value)?))
        })
        .collect()
}

fn catch_all(rule: usize) -> Match {
    Match {
        path: PathM::Prefix("/".into()),
        headers: vec![],
        query: vec![],
        method: None,
        rule,
        rank: [0; 5],
    }
}

impl RouteTable {
    /// Compiles the HTTPRoutes attached to a service. Routes must be sorted
    /// by namespace/name by the caller.
    pub fn compile(routes: &[Resource]) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable::default();
        for route in routes {
            let Some(spec) = route.as_route() else {
                continue;
            };
            let ns = &route.metadata.namespace;
            let retry_any = route
                .metadata
                .annotations
                .get(RETRY_NON_IDEMPOTENT_ANNOTATION)
                .is_some_and(|v| v == "true");
            for rule in &spec.rules {
                let idx = table.rules.len();
                let mut compiled = compile_rule(&route.metadata.name, ns, rule)?;
                compiled.retry_non_idempotent = retry_any;
                table.rules.push(compiled);
                if rule.matches.is_empty() {
                    let mut m = catch_all(idx);
                    m.rank = m.http_rank();
                    table.matches.push(m);
                }
                for m in &rule.matches {
                    let path = match &m.path {
                        None => PathM::Prefix("/".into()),
                        Some(p) => match p.match_type {
                            PathMatchType::Exact => PathM::Exact(p.value.clone()),
                            PathMatchType::PathPrefix => PathM::Prefix(p.value.clone()),
                            PathMatchType::RegularExpression => {
                                PathM::Regex(Regex::new(&format!("^(?:{})$", p.value))?)
                            }
                        },
                    };
                    let query = m
                        .query_params
                        .iter()
                        .map(|q| Ok((q.name.clone(), value_matcher(q.match_type, &q.value)?)))
                        .collect::<Result<_, RouteError>>()?;
                    let method = m
                        .method
                        .as_deref()
                        .map(|s| Method::from_bytes(s.as_bytes()))
                        .transpose()?;
                    let mut compiled = Match {
                        path,
                        headers: header_matchers(&m.headers)?,
                        query,
                        method,
                        rule: idx,
                        rank: [0; 5],
                    };
                    compiled.rank = compiled.http_rank();
                    table.matches.push(compiled);
                }
            }
        }
        table.sort();
        Ok(table)
    }

    /// Compiles the GRPCRoutes attached to a service, sorted by
    /// namespace/name by the caller. gRPC calls `/package.Service/Method`.
    pub fn compile_grpc(routes: &[Resource]) -> Result<RouteTable, RouteError> {
        let mut table = RouteTable::default();
        for route in routes {
            let Some(spec) = route.as_grpc_route() else {
                continue;
            };
            let ns = &route.metadata.namespace;
            for rule in &spec.rules {
                let idx = table.rules.len();
                table
                    .rules
                    .push(compile_grpc_rule(&route.metadata.name, ns, rule)?);
                if rule.matches.is_empty() {
                    table.matches.push(catch_all(idx));
                }
                for m in &rule.matches {
                    let (path, service_len, method_len) = match &m.method {
                        None => (PathM::Prefix("/".into()), 0, 0),
                        Some(mm) => grpc_path(mm)?,
                    };
                    let headers = header_matchers(&m.headers)?;
                    let rank = [service_len, method_len, headers.len(), 0, 0];
                    table.matches.push(Match {
                        path,
                        headers,
                        query: vec![],
                        method: None,
                        rule: idx,
                        rank,
                    });
                }
            }
        }
        table.sort();
        Ok(table)
    }

    /// The table of a service config: its GRPCRoutes if it has any (an
    /// HTTPRoute on the same parent is then ignored, as GEP-1426 says),
    /// else its HTTPRoutes.
    pub fn from_config(
        routes_json: &[String],
        grpc_routes_json: &[String],
    ) -> Result<RouteTable, RouteError> {
        let parse = |list: &[String]| -> Result<Vec<Resource>, RouteError> {
            let mut routes = list
                .iter()
                .map(|r| serde_json::from_str::<Resource>(r))
                .collect::<Result<Vec<_>, _>>()?;
            routes.sort_by(|a, b| {
                (&a.metadata.namespace, &a.metadata.name)
                    .cmp(&(&b.metadata.namespace, &b.metadata.name))
            });
            Ok(routes)
        };
        if grpc_routes_json.is_empty() {
            RouteTable::compile(&parse(routes_json)?)
        } else {
            RouteTable::compile_grpc(&parse(grpc_routes_json)?)
        }
    }

    fn sort(&mut self) {
        // A stable sort keeps route order, then rule order, for ties.
        self.matches.sort_by_key(|m| std::cmp::Reverse(m.rank));
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule that takes this request, if any route matches it.
    pub fn find<B>(&self, req: &Request<B>, path: &str) -> Option<&Rule> {
        self.find_match(req, path).map(|m| m.rule)
    }

    /// The rule that takes this request and what its match matched.
    pub fn find_match<B>(&self, req: &Request<B>, path: &str) -> Option<Matched<'_>> {
        self.matches
            .iter()
            .find(|m| m.matches(req, path))
            .map(|m| Matched {
                rule: &self.rules[m.rule],
                prefix: match &m.path {
                    PathM::Prefix(p) => Some(p.as_str()),
                    _ => None,
                },
            })
    }
}

/// The path matcher of a gRPC method match, and the lengths of its service
/// and method (its precedence).
fn grpc_path(m: &trellis_resource::GrpcMethodMatch) -> Result<(PathM, usize, usize), RouteError> {
    let service = m.service.as_deref().filter(|s| !s.is_empty());
    let method = m.method.as_deref().filter(|s| !s.is_empty());
    let lens = (service.map_or(0, str::len), method.map_or(0, str::len));
    let path = match (m.match_type, service, method) {
        (ValueMatchType::Exact, Some(s), Some(me)) => PathM::Exact(format!("/{s}/{me}")),
        (ValueMatchType::Exact, Some(s), None) => PathM::Prefix(format!("/{s}")),
        (ValueMatchType::Exact, None, Some(me)) => {
            PathM::Regex(Regex::new(&format!("^/[^/]+/{}$", regex::escape(me)))?)
        }
        (ValueMatchType::RegularExpression, s, me) => PathM::Regex(Regex::new(&format!(
            "^/(?:{})/(?:{})$",
            s.unwrap_or("[^/]+"),
            me.unwrap_or("[^/]+")
        ))?),
        (ValueMatchType::Exact, None, None) => return Err(RouteError::EmptyGrpcMethod),
    };
    Ok((path, lens.0, lens.1))
}

fn backends(ns: &str, refs: &[BackendRef]) -> Vec<Backend> {
    refs.iter()
        .map(|b| {
            let (request_headers, response_headers, _) = filters(ns, &b.filters);
            Backend {
                service: SvcKey::new(b.namespace.as_deref().unwrap_or(ns), &b.name),
                weight: b.weight,
                request_headers,
                response_headers,
            }
        })
        .collect()
}

type HeaderFilters = (Option<HeaderModifier>, Option<HeaderModifier>, Vec<Mirror>);

/// Header modifiers and mirrors of a filter list.
fn filters(ns: &str, list: &[RouteFilter]) -> HeaderFilters {
    let (mut request, mut response, mut mirrors) = (None, None, Vec::new());
    for f in list {
        if let Some(m) = &f.request_header_modifier {
            request = Some(m.clone());
        }
        if let Some(m) = &f.response_header_modifier {
            response = Some(m.clone());
        }
        if let Some(m) = &f.request_mirror {
            let share = match (&m.percent, &m.fraction) {
                (Some(p), _) => *p as f64 / 100.0,
                (None, Some(fr)) => fr.numerator as f64 / fr.denominator.max(1) as f64,
                (None, None) => 1.0,
            };
            let b = &m.backend_ref;
            mirrors.push(Mirror {
                service: SvcKey::new(b.namespace.as_deref().unwrap_or(ns), &b.name),
                share,
            });
        }
    }
    (request, response, mirrors)
}

fn new_rule(route: &str, ns: &str, refs: &[BackendRef], list: &[RouteFilter]) -> Rule {
    let backends = backends(ns, refs);
    let total_weight = backends.iter().map(|b| b.weight as u64).sum();
    let (request_headers, response_headers, mirrors) = filters(ns, list);
    Rule {
        route: route.to_string(),
        backends,
        total_weight,
        request_timeout: None,
        backend_timeout: None,
        retry: None,
        request_headers,
        response_headers,
        redirect: list.iter().find_map(|f| f.request_redirect.clone()),
        rewrite: list.iter().find_map(|f| f.url_rewrite.clone()),
        mirrors,
        retry_non_idempotent: false,
    }
}

fn compile_rule(route: &str, ns: &str, rule: &RouteRule) -> Result<Rule, RouteError> {
    let mut r = new_rule(route, ns, &rule.backend_refs, &rule.filters);
    if let Some(t) = &rule.timeouts {
        r.request_timeout = parse_optional_duration(t.request.as_deref())?.filter(|d| !d.is_zero());
        r.backend_timeout =
            parse_optional_duration(t.backend_request.as_deref())?.filter(|d| !d.is_zero());
    }
    if let Some(retry) = &rule.retry {
        r.retry = Some(Retry {
            attempts: retry.attempts.unwrap_or(2),
            codes: retry.codes.clone(),
            backoff: parse_optional_duration(retry.backoff.as_deref())?
                .unwrap_or(Duration::from_millis(25)),
        });
    }
    Ok(r)
}

fn compile_grpc_rule(route: &str, ns: &str, rule: &GrpcRouteRule) -> Result<Rule, RouteError> {
    Ok(new_rule(route, ns, &rule.backend_refs, &rule.filters))
}

impl Rule {
    /// Picks a backend by weight. None when the rule has no backend with
    /// weight (the Gateway API answers 500 then).
    pub fn pick_backend(&self) -> Option<&SvcKey> {
        if self.total_weight == 0 {
            return None;
        }
        let mut n = rand::rng().random_range(0..self.total_weight);
        for b in &self.backends {
            if n < b.weight as u64 {
                return Some(&b.service);
            }
            n -= b.weight as u64;
        }
        None
    }

    /// The backendRef of a service this rule sends to.
    pub fn backend(&self, service: &SvcKey) -> Option<&Backend> {
        self.backends.iter().find(|b| b.service == *service)
    }
}

/// Applies a header modifier filter.
pub fn modify_headers(headers: &mut http::HeaderMap, m: &HeaderModifier) {
    for h in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::try_from(h.value.as_str()),
        ) {
            headers.insert(n, v);
        }
    }
    for h in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(h.name.as_str()),
            HeaderValue::try_from(h.value.as_str()),
        ) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        headers.remove(name.as_str());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(yaml: &str) -> Resource {
        trellis_resource::parse_documents("test.yaml", yaml)
            .unwrap()
            .remove(0)
    }

    const SPLIT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog}
spec:
  parentRefs: [{name: catalog, kind: Service}]
  rules:
  - matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: catalog-v2}]
  - matches: [{path: {type: Exact, value: /items}}]
    backendRefs: [{name: catalog-v1, weight: 0}, {name: catalog-v2, weight: 1}]
  - backendRefs: [{name: catalog-v1, weight: 90}, {name: catalog-v2, weight: 10}]
"#;

    fn req(path: &str, canary: bool) -> Request<()> {
        let mut b = Request::builder().uri(path);
        if canary {
            b = b.header("x-canary", "yes");
        }
        b.body(()).unwrap()
    }

    #[test]
    fn precedence_and_weights() {
        let table = RouteTable::compile(&[route(SPLIT)]).unwrap();
        // Exact path beats the header match (path precedence comes first).
        let r = table.find(&req("/items", true), "/items").unwrap();
        assert_eq!(r.pick_backend().unwrap().name, "catalog-v2");
        let r = table.find(&req("/other", true), "/other").unwrap();
        assert_eq!(r.backends.len(), 1);
        let r = table.find(&req("/other", false), "/other").unwrap();
        let v2 = (0..10_000)
            .filter(|_| r.pick_backend().unwrap().name == "catalog-v2")
            .count();
        assert!(
            (700..1300).contains(&v2),
            "about 10% to v2, got {v2} of 10000"
        );
    }

    #[test]
    fn prefix_matches_whole_segments() {
        assert!(prefix_matches("/foo", "/foo"));
        assert!(prefix_matches("/foo", "/foo/bar"));
        assert!(prefix_matches("/foo/", "/foo/bar"));
        assert!(!prefix_matches("/foo", "/foobar"));
        assert!(prefix_matches("/", "/anything"));
    }

    #[test]
    fn replace_prefix_follows_the_gateway_api_table() {
        for (path, prefix, replacement, want) in [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo/", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "", "/bar"),
            ("/foo/", "/foo", "", "/"),
            ("/foo", "/foo", "", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/foo", "/foo", "/", "/"),
        ] {
            assert_eq!(
                replace_prefix(path, prefix, replacement),
                want,
                "{path} {prefix} {replacement}"
            );
        }
    }

    const GRPC: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter}
spec:
  parentRefs: [{name: greeter}]
  rules:
  - matches: [{method: {service: helloworld.Greeter}}]
    backendRefs: [{name: service-only}]
  - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
    backendRefs: [{name: exact}]
  - matches: [{method: {method: SayHello}, headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: method-only}]
  - matches: [{method: {type: RegularExpression, service: "helloworld\\..*", method: "Say.*"}}]
    backendRefs: [{name: regex}]
"#;

    #[test]
    fn grpc_matches_follow_service_then_method_length() {
        let table = RouteTable::compile_grpc(&[route(GRPC)]).unwrap();
        let to = |path: &str, canary: bool| {
            table
                .find(&req(path, canary), path)
                .map(|r| r.backends[0].service.name.clone())
        };
        assert_eq!(to("/helloworld.Greeter/SayHello", true).unwrap(), "exact");
        assert_eq!(
            to("/helloworld.Greeter/Other", false).unwrap(),
            "service-only"
        );
        assert_eq!(to("/other.Svc/SayHello", true).unwrap(), "method-only");
        assert_eq!(to("/helloworld.Other/SayHi", false).unwrap(), "regex");
        assert_eq!(to("/other.Svc/SayHello", false), None);
    }

    #[test]
    fn filters_compile_into_the_rule() {
        let table = RouteTable::compile(&[route(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: r
  annotations: {trellis.dev/retry-non-idempotent: "true"}
spec:
  parentRefs: [{name: catalog}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow, namespace: test}, percent: 25}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow2}, fraction: {numerator: 1, denominator: 1000}}}
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}}
    backendRefs:
    - name: catalog
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-b, value: "1"}]}}]
"#,
        )])
        .unwrap();
        let m = table
            .find_match(&req("/api/items", false), "/api/items")
            .unwrap();
        assert_eq!(m.prefix, Some("/api"));
        let r = m.rule;
        assert!(r.retry_non_idempotent);
        assert_eq!(
            r.mirrors,
            vec![
                Mirror {
                    service: SvcKey::new("test", "shadow"),
                    share: 0.25
                },
                Mirror {
                    service: SvcKey::new("default", "shadow2"),
                    share: 0.001
                }
            ]
        );
        assert!(r.rewrite.is_some());
        let b = r.backend(&SvcKey::new("default", "catalog")).unwrap();
        assert_eq!(b.request_headers.as_ref().unwrap().set[0].name, "x-b");
    }
}
