//! HTTPRoute rules compiled for matching on the request path.
//!
//! Precedence follows the Gateway API: an exact path beats a prefix, a
//! longer prefix beats a shorter one, then a method match, then more header
//! matches, then more query matches; ties go to the route that sorts first
//! by namespace/name, then to rule order.

use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, Request};
use rand::Rng;
use regex::Regex;
use trellis_resource::{
    parse_duration, HeaderModifier, PathMatchType, Resource, RouteRule, ValueMatchType,
};

use crate::snapshot::SvcKey;

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
}

#[derive(Debug)]
pub struct Backend {
    pub service: SvcKey,
    pub weight: u32,
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
}

/// The compiled routes of one service.
#[derive(Debug, Default)]
pub struct RouteTable {
    rules: Vec<Rule>,
    // Sorted by precedence, best first.
    matches: Vec<Match>,
}

impl Match {
    fn precedence(&self) -> (u8, usize, bool, usize, usize) {
        let (kind, len) = match &self.path {
            PathM::Exact(p) => (2, p.len()),
            PathM::Prefix(p) => (1, p.len()),
            PathM::Regex(_) => (0, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
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

fn value_matcher(t: ValueMatchType, value: &str) -> Result<ValueM, String> {
    Ok(match t {
        ValueMatchType::Exact => ValueM::Exact(value.to_string()),
        ValueMatchType::RegularExpression => {
            ValueM::Regex(Regex::new(&format!("^(?:{value})$")).map_err(|e| e.to_string())?)
        }
    })
}

fn duration(s: &Option<String>) -> Result<Option<Duration>, String> {
    s.as_deref().map(parse_duration).transpose()
}

impl RouteTable {
    /// Compiles the routes attached to a service. Routes must be sorted by
    /// namespace/name by the caller.
    pub fn compile(routes: &[Resource]) -> Result<RouteTable, String> {
        let mut table = RouteTable::default();
        for route in routes {
            let Some(spec) = route.as_route() else {
                continue;
            };
            let ns = &route.metadata.namespace;
            for rule in &spec.rules {
                let idx = table.rules.len();
                table
                    .rules
                    .push(compile_rule(&route.metadata.name, ns, rule)?);
                if rule.matches.is_empty() {
                    table.matches.push(Match {
                        path: PathM::Prefix("/".into()),
                        headers: vec![],
                        query: vec![],
                        method: None,
                        rule: idx,
                    });
                }
                for m in &rule.matches {
                    let path = match &m.path {
                        None => PathM::Prefix("/".into()),
                        Some(p) => match p.match_type {
                            PathMatchType::Exact => PathM::Exact(p.value.clone()),
                            PathMatchType::PathPrefix => PathM::Prefix(p.value.clone()),
                            PathMatchType::RegularExpression => PathM::Regex(
                                Regex::new(&format!("^(?:{})$", p.value))
                                    .map_err(|e| e.to_string())?,
                            ),
                        },
                    };
                    let headers = m
                        .headers
                        .iter()
                        .map(|h| {
                            let name = HeaderName::try_from(h.name.to_ascii_lowercase())
                                .map_err(|e| e.to_string())?;
                            Ok((name, value_matcher(h.match_type, &h.value)?))
                        })
                        .collect::<Result<_, String>>()?;
                    let query = m
                        .query_params
                        .iter()
                        .map(|q| Ok((q.name.clone(), value_matcher(q.match_type, &q.value)?)))
                        .collect::<Result<_, String>>()?;
                    let method = m
                        .method
                        .as_deref()
                        .map(|s| Method::from_bytes(s.as_bytes()).map_err(|e| e.to_string()))
                        .transpose()?;
                    table.matches.push(Match {
                        path,
                        headers,
                        query,
                        method,
                        rule: idx,
                    });
                }
            }
        }
        // A stable sort keeps route order, then rule order, for ties.
        table
            .matches
            .sort_by_key(|m| std::cmp::Reverse(m.precedence()));
        Ok(table)
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rule that takes this request, if any route matches it.
    pub fn find<B>(&self, req: &Request<B>, path: &str) -> Option<&Rule> {
        self.matches
            .iter()
            .find(|m| m.matches(req, path))
            .map(|m| &self.rules[m.rule])
    }
}

fn compile_rule(route: &str, ns: &str, rule: &RouteRule) -> Result<Rule, String> {
    let backends: Vec<Backend> = rule
        .backend_refs
        .iter()
        .map(|b| Backend {
            service: SvcKey::new(b.namespace.as_deref().unwrap_or(ns), &b.name),
            weight: b.weight,
        })
        .collect();
    let total_weight = backends.iter().map(|b| b.weight as u64).sum();
    let (mut request_headers, mut response_headers) = (None, None);
    for f in &rule.filters {
        if let Some(m) = &f.request_header_modifier {
            request_headers = Some(m.clone());
        }
        if let Some(m) = &f.response_header_modifier {
            response_headers = Some(m.clone());
        }
    }
    let (request_timeout, backend_timeout) = match &rule.timeouts {
        Some(t) => (duration(&t.request)?, duration(&t.backend_request)?),
        None => (None, None),
    };
    let retry = match &rule.retry {
        Some(r) => Some(Retry {
            attempts: r.attempts.unwrap_or(2),
            codes: r.codes.clone(),
            backoff: duration(&r.backoff)?.unwrap_or(Duration::from_millis(25)),
        }),
        None => None,
    };
    Ok(Rule {
        route: route.to_string(),
        backends,
        total_weight,
        request_timeout,
        backend_timeout,
        retry,
        request_headers,
        response_headers,
    })
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
}
