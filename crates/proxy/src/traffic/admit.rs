//! What happens to a request before a backend is chosen: the called
//! Service's local rate limit and fault injection, then the matched rule's
//! RequestRedirect (answered here) or URLRewrite (applied to the request).

use http::header::{HOST, LOCATION, RETRY_AFTER};
use http::{HeaderValue, Request, Response, StatusCode, Uri};
use trellis_resource::{PathModifier, PathModifierType, RequestRedirect, UrlRewrite};

use super::metrics::{FaultKind, TrafficMetrics};
use super::{add_flag, chance, now_nanos};
use crate::error::{ProxyError, Source};
use crate::http::empty;
use crate::route::{replace_prefix, Matched};
use crate::snapshot::ServiceState;
use crate::Body;

/// The verdict on a request.
pub enum Admission {
    /// Answered here: rate limited, aborted by a fault, or redirected.
    Answer(Response<Body>),
    /// Go on; `delayed` says a fault delay was served first.
    Forward { delayed: bool },
}

/// Applies the called service's rate limit and faults, and the rule's
/// redirect or rewrite. `port` is the port the app addressed.
pub async fn admit<B>(
    metrics: &TrafficMetrics,
    svc: &ServiceState,
    matched: Option<Matched<'_>>,
    req: &mut Request<B>,
    port: u16,
) -> Admission {
    if let Some(rl) = &svc.policy.rate_limit {
        if !svc.traffic.limiter.try_acquire(rl, now_nanos()) {
            TrafficMetrics::inc(&metrics.rate_limited, &svc.key);
            let mut resp = ProxyError::new(
                StatusCode::TOO_MANY_REQUESTS,
                Source::Downstream,
                format!(
                    "more than {} requests per second to {} (TrafficPolicy {}): slow down",
                    rl.per_second, svc.key, svc.policy.name
                ),
            )
            .into_response();
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            add_flag(&mut resp, "RL");
            return Admission::Answer(resp);
        }
    }
    let fault = &svc.policy.fault;
    let mut delayed = false;
    if let Some((p, delay)) = fault.delay {
        if chance(p) {
            metrics.fault(&svc.key, FaultKind::delay);
            tokio::time::sleep(delay).await;
            delayed = true;
        }
    }
    if let Some((p, status)) = fault.abort {
        if chance(p) {
            metrics.fault(&svc.key, FaultKind::abort);
            let mut resp = ProxyError::new(
                status,
                Source::Internal,
                format!(
                    "fault injected by TrafficPolicy {} of {}",
                    svc.policy.name, svc.key
                ),
            )
            .into_response();
            if delayed {
                add_flag(&mut resp, "DI");
            }
            add_flag(&mut resp, "FI");
            return Admission::Answer(resp);
        }
    }
    if let Some(m) = matched {
        if let Some(r) = &m.rule.redirect {
            let mut resp = redirect(req, r, m.prefix, port);
            if delayed {
                add_flag(&mut resp, "DI");
            }
            return Admission::Answer(resp);
        }
        if let Some(rw) = &m.rule.rewrite {
            rewrite(req, rw, m.prefix);
        }
    }
    Admission::Forward { delayed }
}

/// The request's host (without port) as the app addressed it.
fn request_host<B>(req: &Request<B>) -> String {
    let authority = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()))
        .unwrap_or_default();
    match authority.parse::<http::uri::Authority>() {
        Ok(a) => a.host().to_string(),
        Err(_) => authority,
    }
}

fn modified_path(path: &str, m: &PathModifier, prefix: Option<&str>) -> String {
    match m.modifier_type {
        PathModifierType::ReplaceFullPath => m.replace_full_path.clone().unwrap_or_default(),
        PathModifierType::ReplacePrefixMatch => replace_prefix(
            path,
            prefix.unwrap_or("/"),
            m.replace_prefix_match.as_deref().unwrap_or("/"),
        ),
    }
}

/// A RequestRedirect answer. Omitted parts keep the request's; without a
/// port, a given scheme implies its well-known port, else the request's
/// port stays, and ports 80 (http) and 443 (https) are left out.
pub fn redirect<B>(
    req: &Request<B>,
    r: &RequestRedirect,
    prefix: Option<&str>,
    port: u16,
) -> Response<Body> {
    let scheme = r
        .scheme
        .clone()
        .or_else(|| req.uri().scheme_str().map(str::to_string))
        .unwrap_or_else(|| "http".into());
    let host = r.hostname.clone().unwrap_or_else(|| request_host(req));
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        (None, Some(_)) => None,
        (None, None) => Some(port),
    }
    .filter(|p| !matches!((scheme.as_str(), *p), ("http", 80) | ("https", 443)));
    let path = match &r.path {
        Some(m) => modified_path(req.uri().path(), m, prefix),
        None => req.uri().path().to_string(),
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let port = port.map(|p| format!(":{p}")).unwrap_or_default();
    let location = format!("{scheme}://{host}{port}{path}{query}");
    let mut resp = Response::new(empty());
    *resp.status_mut() =
        StatusCode::from_u16(r.status_code.unwrap_or(302)).unwrap_or(StatusCode::FOUND);
    match HeaderValue::try_from(location) {
        Ok(v) => {
            resp.headers_mut().insert(LOCATION, v);
        }
        Err(_) => {
            return ProxyError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                Source::Internal,
                "the redirect's Location is not a valid header value",
            )
            .into_response()
        }
    }
    resp
}

/// Applies a URLRewrite: the Host header and the path (the query stays).
pub fn rewrite<B>(req: &mut Request<B>, rw: &UrlRewrite, prefix: Option<&str>) {
    if let Some(host) = &rw.hostname {
        if let Ok(v) = HeaderValue::try_from(host.as_str()) {
            req.headers_mut().insert(HOST, v);
        }
    }
    if let Some(m) = &rw.path {
        let path = modified_path(req.uri().path(), m, prefix);
        let pq = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        let mut parts = req.uri().clone().into_parts();
        if let Ok(pq) = pq.parse() {
            parts.path_and_query = Some(pq);
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, host: &str) -> Request<()> {
        Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(())
            .unwrap()
    }

    fn location(r: &RequestRedirect, uri: &str, prefix: Option<&str>) -> (u16, String) {
        let resp = redirect(&req(uri, "catalog:8080"), r, prefix, 8080);
        let loc = resp.headers()[LOCATION].to_str().unwrap().to_string();
        (resp.status().as_u16(), loc)
    }

    #[test]
    fn redirects_keep_what_they_do_not_change() {
        let r = RequestRedirect::default();
        assert_eq!(
            location(&r, "http://catalog:8080/a?x=1", None),
            (302, "http://catalog:8080/a?x=1".into())
        );
        let r = RequestRedirect {
            scheme: Some("https".into()),
            hostname: Some("shop.example.org".into()),
            status_code: Some(301),
            path: Some(PathModifier {
                modifier_type: PathModifierType::ReplacePrefixMatch,
                replace_full_path: None,
                replace_prefix_match: Some("/new".into()),
            }),
            port: None,
        };
        // A scheme without a port means its well-known port, left out.
        assert_eq!(
            location(&r, "http://catalog:8080/old/x?y", Some("/old")),
            (301, "https://shop.example.org/new/x?y".into())
        );
        let r = RequestRedirect {
            port: Some(80),
            ..Default::default()
        };
        assert_eq!(location(&r, "/p", None).1, "http://catalog/p");
    }

    #[test]
    fn rewrites_change_host_and_path_but_not_query() {
        let mut r = req("http://catalog:8080/api/items?page=2", "catalog:8080");
        let rw = UrlRewrite {
            hostname: Some("items.internal".into()),
            path: Some(PathModifier {
                modifier_type: PathModifierType::ReplacePrefixMatch,
                replace_full_path: None,
                replace_prefix_match: Some("/v2".into()),
            }),
        };
        rewrite(&mut r, &rw, Some("/api"));
        assert_eq!(r.headers()[HOST], "items.internal");
        assert_eq!(r.uri().path(), "/v2/items");
        assert_eq!(r.uri().query(), Some("page=2"));
        let full = UrlRewrite {
            hostname: None,
            path: Some(PathModifier {
                modifier_type: PathModifierType::ReplaceFullPath,
                replace_full_path: Some("/health".into()),
                replace_prefix_match: None,
            }),
        };
        rewrite(&mut r, &full, None);
        assert_eq!(r.uri().path(), "/health");
    }
}
