//! The tries of one request to a backend's endpoints.
//!
//! - Circuit breaking: the backend's `maxRequests` bounds requests in
//!   flight and `maxPendingRequests` those waiting for a connection; past
//!   either the answer is 503 at once, flagged `UO`.
//! - Endpoints come from the backend's balancer, never one already tried
//!   for this request while another is left.
//! - A failed connection moves to another endpoint (nothing was sent).
//!   Listed statuses, and resets and per-try timeouts, are retried when the
//!   request can be sent again: its body is empty or was small enough to
//!   keep (64 KiB, when retries or mirrors need a copy), and its method is
//!   idempotent or its route allows resending. Each such retry needs the
//!   called service's retry budget; without it the last answer goes back,
//!   flagged `URX`. Backoff doubles per retry, with jitter.
//! - Every try's outcome feeds the endpoint's outlier detection.
//! - Mirrors get a copy, fire and forget, before the first try.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_LENGTH;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use trellis_resource::ZONE_LABEL;

use super::metrics::{RetryReason, TrafficMetrics};
use super::outlier::Outcome;
use super::policy::{HashKey, Limit};
use super::{add_flag, is_idempotent, mirror, now_nanos, stable_hash};
use crate::balance::PickCtx;
use crate::endpoint::Endpoint;
use crate::error::{ProxyError, Source};
use crate::http::{boxed, empty, full};
use crate::inputs::Inputs;
use crate::route::{modify_headers, Rule};
use crate::snapshot::ServiceState;
use crate::tls::Credentials;
use crate::Body;

/// The largest body kept in memory so that it can be sent again.
pub const MAX_REPLAY_BODY: u64 = 64 * 1024;

pub type Forwarded = (Result<Response<Body>, ProxyError>, Option<Arc<Endpoint>>);

/// A request body, kept when it may have to be sent more than once.
enum Payload {
    Empty,
    Kept(Bytes),
    Stream(Option<Incoming>),
}

impl Payload {
    async fn prepare(
        body: Incoming,
        headers: &HeaderMap,
        keep: bool,
    ) -> Result<Payload, ProxyError> {
        if body.is_end_stream() {
            return Ok(Payload::Empty);
        }
        let small = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|n| n <= MAX_REPLAY_BODY);
        if !(keep && small) {
            return Ok(Payload::Stream(Some(body)));
        }
        let bytes = body
            .collect()
            .await
            .map_err(|e| {
                ProxyError::new(
                    StatusCode::BAD_REQUEST,
                    Source::Downstream,
                    format!("reading the request body failed: {e}"),
                )
            })?
            .to_bytes();
        Ok(Payload::Kept(bytes))
    }

    fn replayable(&self) -> bool {
        !matches!(self, Payload::Stream(_))
    }

    /// The body for the next try; None when a streamed body was used up.
    fn for_try(&mut self) -> Option<Body> {
        match self {
            Payload::Empty => Some(empty()),
            Payload::Kept(b) => Some(full(b.clone())),
            Payload::Stream(s) => s.take().map(boxed),
        }
    }

    fn copy(&self) -> Option<Bytes> {
        match self {
            Payload::Empty => Some(Bytes::new()),
            Payload::Kept(b) => Some(b.clone()),
            Payload::Stream(_) => None,
        }
    }
}

/// What retries a request gets: the route's `retry` if it has one, else
/// the called service's TrafficPolicy.
struct Plan {
    attempts: u32,
    codes: Vec<u16>,
    backoff: Duration,
    max_backoff: Duration,
    per_try: Option<Duration>,
}

impl Plan {
    fn new(rule: Option<&Rule>, svc: &ServiceState) -> Plan {
        let p = &svc.policy.retry;
        let per_try = rule.and_then(|r| r.backend_timeout).or(p.per_try_timeout);
        match rule.and_then(|r| r.retry.as_ref()) {
            Some(r) => Plan {
                attempts: r.attempts,
                codes: r.codes.clone(),
                backoff: r.backoff,
                max_backoff: r.backoff * 10,
                per_try,
            },
            None => Plan {
                attempts: p.attempts,
                codes: p.codes.clone(),
                backoff: p.backoff,
                max_backoff: p.max_backoff,
                per_try,
            },
        }
    }

    /// The wait before retry `n` (1-based): doubling from `backoff`, at
    /// most `max_backoff`, with up to +50% jitter so callers spread out.
    fn backoff(&self, n: u32) -> Duration {
        let base = self
            .backoff
            .saturating_mul(1u32 << (n.saturating_sub(1)).min(16))
            .min(self.max_backoff);
        base.mul_f64(1.0 + rand::random::<f64>() * 0.5)
    }
}

/// The hash key of a request, for ring-hash.
fn hash_of(key: &HashKey, headers: &HeaderMap, inputs: &Inputs) -> Option<u64> {
    match key {
        HashKey::Header(name) => headers.get(name).map(|v| stable_hash(v.as_bytes())),
        HashKey::Cookie(name) => headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then(|| stable_hash(v.as_bytes()))
            }),
        HashKey::Source => {
            let me = inputs
                .cfg
                .instance
                .as_deref()
                .unwrap_or(&inputs.cfg.workload);
            Some(stable_hash(me.as_bytes()))
        }
    }
}

/// A 503 for a full connection pool.
pub fn overflow(metrics: &TrafficMetrics, backend: &ServiceState, limit: Limit) -> Response<Body> {
    metrics.overflow(&backend.key, limit);
    let mut resp = ProxyError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        Source::Upstream,
        format!(
            "the connection pool of {} is full ({} {}): TrafficPolicy {} limits it",
            backend.key,
            match limit {
                Limit::Connections => backend.policy.max_connections,
                Limit::Pending => backend.policy.max_pending,
                Limit::Requests => backend.policy.max_requests,
            }
            .unwrap_or_default(),
            limit.as_str(),
            backend.policy.name,
        ),
    )
    .into_response();
    add_flag(&mut resp, "UO");
    resp
}

/// Sends a request (its headers ready for the peer) to `backend`, which
/// `svc` (the service the app called) routed it to.
#[allow(clippy::too_many_arguments)]
pub async fn forward(
    inputs: &Inputs,
    mut parts: Parts,
    uri: Uri,
    body: Incoming,
    creds: Option<Arc<Credentials>>,
    svc: &ServiceState,
    backend: &ServiceState,
    rule: Option<&Rule>,
) -> Forwarded {
    let metrics = &inputs.metrics.traffic;
    let Some(in_flight) = backend
        .traffic
        .acquire(Limit::Requests, backend.policy.max_requests)
    else {
        return (Ok(overflow(metrics, backend, Limit::Requests)), None);
    };
    let plan = Plan::new(rule, svc);
    let resendable = is_idempotent(&parts.method) || rule.is_some_and(|r| r.retry_non_idempotent);
    let mirrors = rule.map(|r| r.mirrors.as_slice()).unwrap_or_default();
    let keep = (plan.attempts > 0 && resendable) || !mirrors.is_empty();
    let mut payload = match Payload::prepare(body, &parts.headers, keep).await {
        Ok(p) => p,
        Err(e) => return (Err(e), None),
    };
    let backend_ref = rule.and_then(|r| r.backend(&backend.key));
    if let Some(m) = backend_ref.and_then(|b| b.request_headers.as_ref()) {
        modify_headers(&mut parts.headers, m);
    }
    for m in mirrors {
        mirror::send(inputs, m, &parts, &uri, payload.copy(), creds.clone());
    }
    let now = now_nanos();
    svc.traffic.budget.deposit(now);
    let hash = backend
        .policy
        .hash_key
        .as_ref()
        .and_then(|k| hash_of(k, &parts.headers, inputs));
    let zone = inputs.cfg.labels.get(ZONE_LABEL).map(String::as_str);
    let outlier = backend.policy.outlier.as_ref();
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0u32;
    let mut connect_retries = plan.attempts.max(2);
    let mut last: Forwarded = (Err(ProxyError::upstream("no attempt made")), None);
    loop {
        let ctx = PickCtx {
            hash,
            avoid: &tried,
            zone,
        };
        let Some(picked) = backend.balancer.pick(&backend.endpoints, &backend.rr, &ctx) else {
            break;
        };
        if picked.failover {
            TrafficMetrics::inc(&metrics.locality_failovers, &backend.key);
        }
        if picked.hash_missing && tried.is_empty() {
            TrafficMetrics::inc(&metrics.hash_key_missing, &backend.key);
        }
        let ep = picked.endpoint.clone();
        tried.push(ep.addr);
        let mut guard = Some(ep.load.start());
        let conn = {
            let Some(_pending) = backend
                .traffic
                .acquire(Limit::Pending, backend.policy.max_pending)
            else {
                return (Ok(overflow(metrics, backend, Limit::Pending)), None);
            };
            ep.h2(creds.as_deref()).await
        };
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                if let Some(cfg) = outlier {
                    record(inputs, backend, &ep, cfg, Outcome::Failed);
                }
                last = (Err(e), Some(ep));
                // Nothing was sent: any request may go to another endpoint.
                if connect_retries == 0 {
                    break;
                }
                connect_retries -= 1;
                metrics.retry(&svc.key, RetryReason::connect);
                continue;
            }
        };
        let Some(try_body) = payload.for_try() else {
            break;
        };
        let mut upstream_req = Request::new(try_body);
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.uri_mut() = uri.clone();
        *upstream_req.version_mut() = Version::HTTP_2;
        *upstream_req.headers_mut() = parts.headers.clone();
        let send = conn.send_request(upstream_req);
        let result = match plan.per_try {
            Some(t) => match tokio::time::timeout(t, send).await {
                Ok(r) => r.map_err(ProxyError::upstream),
                Err(_) => Err(ProxyError::timeout("backend request")),
            },
            None => send.await.map_err(ProxyError::upstream),
        };
        let outcome = match &result {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(_) => Outcome::Failed,
        };
        if let Some(cfg) = outlier {
            record(inputs, backend, &ep, cfg, outcome);
        }
        let wants_retry = match outcome {
            Outcome::Status(code) => plan.codes.contains(&code),
            // A reset or timeout is retried even without a retry policy,
            // once, when the request can be sent again.
            Outcome::Failed => true,
        };
        let allowed = match outcome {
            Outcome::Status(_) => plan.attempts,
            Outcome::Failed => plan.attempts.max(1),
        };
        let can_retry = wants_retry && resendable && payload.replayable() && retries < allowed;
        let mut resp = match result {
            Ok(resp) => {
                if !can_retry {
                    if let Some(g) = guard.take() {
                        g.finish();
                    }
                }
                resp.map(boxed)
            }
            Err(e) => {
                last = (Err(e), Some(ep.clone()));
                if !can_retry {
                    break;
                }
                if !svc
                    .traffic
                    .budget
                    .try_withdraw(&svc.policy.budget, now_nanos())
                {
                    TrafficMetrics::inc(&metrics.budget_exhausted, &svc.key);
                    break;
                }
                retries += 1;
                metrics.retry(&svc.key, RetryReason::error);
                tokio::time::sleep(plan.backoff(retries)).await;
                continue;
            }
        };
        if can_retry {
            if svc
                .traffic
                .budget
                .try_withdraw(&svc.policy.budget, now_nanos())
            {
                retries += 1;
                metrics.retry(&svc.key, RetryReason::status);
                drop(guard);
                last = (Ok(resp), Some(ep));
                tokio::time::sleep(plan.backoff(retries)).await;
                continue;
            }
            TrafficMetrics::inc(&metrics.budget_exhausted, &svc.key);
            add_flag(&mut resp, "URX");
        }
        if let Some(m) = backend_ref.and_then(|b| b.response_headers.as_ref()) {
            modify_headers(resp.headers_mut(), m);
        }
        // The request counts against maxRequests until its answer's body
        // is done (a gRPC stream may last long after the headers).
        let resp = resp.map(|b| {
            Held {
                inner: b,
                _permit: in_flight,
            }
            .boxed_unsync()
        });
        return (Ok(resp), Some(ep));
    }
    last
}

/// A response body that holds a circuit-breaker permit until it ends.
struct Held {
    inner: Body,
    _permit: super::policy::Permit,
}

impl http_body::Body for Held {
    type Data = Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A connection that holds a circuit-breaker permit (`maxConnections`)
/// for as long as it is open, wherever it ends up (an upgraded tunnel).
pub struct HeldIo<S> {
    inner: S,
    _permit: super::policy::Permit,
}

impl<S> HeldIo<S> {
    pub fn new(inner: S, permit: super::policy::Permit) -> Self {
        HeldIo {
            inner,
            _permit: permit,
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for HeldIo<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for HeldIo<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

fn record(
    inputs: &Inputs,
    backend: &ServiceState,
    ep: &Endpoint,
    cfg: &super::policy::OutlierConfig,
    outcome: Outcome,
) {
    if ep
        .health
        .record(cfg, outcome, &backend.endpoints, now_nanos())
    {
        TrafficMetrics::inc(&inputs.metrics.traffic.ejections, &backend.key);
        tracing::info!(
            service = %backend.key,
            endpoint = %ep.addr,
            instance = %ep.instance,
            "outlier detection ejected an endpoint"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_bounds() {
        let plan = Plan {
            attempts: 5,
            codes: vec![],
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
            per_try: None,
        };
        for (n, lo) in [(1, 10), (2, 20), (3, 40), (4, 50), (9, 50)] {
            let d = plan.backoff(n).as_millis() as u64;
            assert!((lo..=lo * 3 / 2).contains(&d), "retry {n}: {d}ms");
        }
    }
}
