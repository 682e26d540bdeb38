//! The tries of one request to a backend's endpoints.
//!
//! - Circuit breaking: the backend's `maxRequests` bounds requests in
//!   flight and `maxPendingRequests` those waiting for a connection; past
//!   either the answer is 503 at once, flagged `UO`.
//! - Endpoints come from the backend's balancer, never one already tried
//!   for this request while another is left.
//! - A failed connection moves to another endpoint (nothing was sent), as
//!   does a request whose stream the peer refused (REFUSED_STREAM: not
//!   processed) if its body can be sent again.
//!   Listed statuses, and resets and per-try timeouts, are retried when the
//!   request can be sent again: its body is empty or was small enough to
//!   keep (64 KiB, when retries or mirrors need a copy), and its method is
//!   idempotent or its route allows resending. Each such retry needs the
//!   called service's retry budget; without it the last answer goes back,
//!   flagged `URX`. Backoff doubles per retry, with jitter.
//! - Every try's outcome feeds the endpoint's outlier detection.
//! - Mirrors get a copy, fire and forget, before the first try.
//!
//! `forward` runs one `Exchange` (what every try of a request shares) one
//! `Try` at a time, keeping where the tries stand in a `RetryState`.

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
use super::policy::{HashKey, Limit, Permit};
use super::{add_flag, is_idempotent, mirror, now_nanos, stable_hash};
use crate::balance::PickCtx;
use crate::endpoint::{Endpoint, PeerConn};
use crate::error::{ProxyError, Source};
use crate::http::{empty, full, request_body, BodyFault};
use crate::inputs::Inputs;
use crate::route::{modify_headers, Backend, Rule};
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
    /// Streamed once; the fault says whether the client broke it off.
    Stream(Option<Incoming>, BodyFault),
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
            return Ok(Payload::Stream(Some(body), BodyFault::default()));
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
        !matches!(self, Payload::Stream(..))
    }

    /// The client's streamed body broke off while it was sent.
    fn broke(&self) -> bool {
        matches!(self, Payload::Stream(_, fault) if fault.broke())
    }

    /// The body for the next try; None when a streamed body was used up.
    fn for_try(&mut self) -> Option<Body> {
        match self {
            Payload::Empty => Some(empty()),
            Payload::Kept(b) => Some(full(b.clone())),
            Payload::Stream(s, fault) => s.take().map(|b| request_body(b, fault)),
        }
    }

    fn copy(&self) -> Option<Bytes> {
        match self {
            Payload::Empty => Some(Bytes::new()),
            Payload::Kept(b) => Some(b.clone()),
            Payload::Stream(..) => None,
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

/// Where a request goes: the Service the app called (its retry policy and
/// budget), the backend the route chose (its endpoints, connection pool
/// and outlier detection; often the same Service), and the rule that
/// matched, if any.
#[derive(Clone, Copy)]
pub struct Destination<'a> {
    pub svc: &'a ServiceState,
    pub backend: &'a ServiceState,
    pub rule: Option<&'a Rule>,
}

/// A request ready for the peer: its headers as they go out, its target,
/// its body, and this proxy's credentials for mutual TLS (none when the
/// mesh disables it).
pub struct Outgoing {
    pub parts: Parts,
    pub uri: Uri,
    pub body: Incoming,
    pub creds: Option<Arc<Credentials>>,
    /// Sent to the peer over HTTP/1.1 (a connection per request in
    /// flight, pooled per worker), not over the worker's HTTP/2 one.
    pub http1: bool,
}

/// Sends a request to its destination's backend: one try after another
/// (see the module's doc) until one answers or none is left.
pub async fn forward(inputs: &Inputs, to: Destination<'_>, req: Outgoing) -> Forwarded {
    let backend = to.backend;
    let Some(in_flight) = backend
        .traffic
        .acquire(Limit::Requests, backend.policy.max_requests)
    else {
        return (
            Ok(overflow(&inputs.metrics.traffic, backend, Limit::Requests)),
            None,
        );
    };
    let mut exchange = match Exchange::new(inputs, to, req).await {
        Ok(e) => e,
        Err(e) => return (Err(e), None),
    };
    let mut state = RetryState::new(&exchange.plan);
    loop {
        match exchange.attempt(&mut state).await {
            Try::Again => continue,
            Try::Stop => return state.last,
            Try::Refused(resp) => return (Ok(resp), None),
            Try::Answer(resp, ep) => return (Ok(exchange.finish(resp, in_flight)), Some(ep)),
        }
    }
}

/// What every try of one request shares.
struct Exchange<'a> {
    inputs: &'a Inputs,
    to: Destination<'a>,
    /// The backendRef the rule sent the request to, for its header filters.
    backend_ref: Option<&'a Backend>,
    plan: Plan,
    /// Idempotent, or the route lets retries resend it.
    resendable: bool,
    parts: Parts,
    uri: Uri,
    creds: Option<Arc<Credentials>>,
    http1: bool,
    payload: Payload,
    /// The ring-hash key of the request, if the backend hashes.
    hash: Option<u64>,
    zone: Option<&'a str>,
}

/// Where the tries of a request stand.
struct RetryState {
    /// Endpoints tried; the next pick avoids them while others are left.
    /// Inline for the first two: most requests take one try.
    tried: smallvec::SmallVec<[SocketAddr; 2]>,
    /// Retries made for a status, a reset or a timeout.
    retries: u32,
    /// Moves to another endpoint still allowed after failed connections.
    connect_retries: u32,
    /// The outcome the caller gets if no later try answers.
    last: Forwarded,
}

/// A try that got no answer.
struct Failed {
    error: ProxyError,
    /// The peer did not process the request (see `peer_h2::SendError`).
    unprocessed: bool,
}

impl Failed {
    /// A failure after which the peer may have processed the request.
    fn seen(error: ProxyError) -> Failed {
        Failed {
            error,
            unprocessed: false,
        }
    }
}

/// What one try came to.
enum Try {
    /// The answer the caller gets, from this endpoint.
    Answer(Response<Body>, Arc<Endpoint>),
    /// The backend's `maxPendingRequests` is reached: 503 at once.
    Refused(Response<Body>),
    /// Another try (after its backoff, already waited).
    Again,
    /// No try left: the last outcome stands.
    Stop,
}

impl RetryState {
    fn new(plan: &Plan) -> RetryState {
        RetryState {
            tried: smallvec::SmallVec::new(),
            retries: 0,
            connect_retries: plan.attempts.max(2),
            last: (Err(ProxyError::upstream("no attempt made")), None),
        }
    }
}

impl<'a> Exchange<'a> {
    /// Keeps the body if a retry or a mirror needs it, applies the
    /// backendRef's request filters, sends the mirrors their copies, and
    /// pays the request's deposit into the retry budget.
    async fn new(
        inputs: &'a Inputs,
        to: Destination<'a>,
        req: Outgoing,
    ) -> Result<Exchange<'a>, ProxyError> {
        let Outgoing {
            mut parts,
            uri,
            body,
            creds,
            http1,
        } = req;
        let plan = Plan::new(to.rule, to.svc);
        let resendable =
            is_idempotent(&parts.method) || to.rule.is_some_and(|r| r.retry_non_idempotent);
        let mirrors = to.rule.map(|r| r.mirrors.as_slice()).unwrap_or_default();
        let keep = (plan.attempts > 0 && resendable) || !mirrors.is_empty();
        let payload = Payload::prepare(body, &parts.headers, keep).await?;
        let backend_ref = to.rule.and_then(|r| r.backend(&to.backend.key));
        if let Some(m) = backend_ref.and_then(|b| b.request_headers.as_ref()) {
            modify_headers(&mut parts.headers, m);
        }
        for m in mirrors {
            mirror::send(inputs, m, &parts, &uri, payload.copy(), creds.clone());
        }
        to.svc.traffic.budget.deposit(now_nanos());
        let hash = to
            .backend
            .policy
            .hash_key
            .as_ref()
            .and_then(|k| hash_of(k, &parts.headers, inputs));
        Ok(Exchange {
            inputs,
            to,
            backend_ref,
            plan,
            resendable,
            parts,
            uri,
            creds,
            http1,
            payload,
            hash,
            zone: inputs.cfg.labels.get(ZONE_LABEL).map(String::as_str),
        })
    }

    /// One try: an endpoint not tried yet, a connection to it, the request,
    /// and whether its outcome is retried.
    async fn attempt(&mut self, state: &mut RetryState) -> Try {
        let Some(ep) = self.pick(&state.tried) else {
            return Try::Stop;
        };
        state.tried.push(ep.addr);
        let mut load = ep.load.start();
        let conn = match self.connect(&ep, state).await {
            Ok(c) => c,
            Err(end) => return end,
        };
        load.connected();
        let Some(body) = self.payload.for_try() else {
            return Try::Stop;
        };
        let (result, unprocessed) = match self.send(&ep, conn, body).await {
            Ok(resp) => (Ok(resp), false),
            Err(f) => (Err(f.error), f.unprocessed),
        };
        if result.is_err() && self.payload.broke() {
            // The client's fault, not the endpoint's: not counted against
            // it, not retried.
            state.last = (Err(ProxyError::bad_body()), Some(ep));
            return Try::Stop;
        }
        if unprocessed && self.payload.replayable() && state.connect_retries > 0 {
            // As a failed connection: the peer did not process it (it
            // refused the stream), so any request may go again. Outlier
            // detection does not count it (a peer over its stream limit is
            // busy, not broken); the balancer sees a try without answer.
            state.last = (result, Some(ep));
            drop(load);
            return self.resend_unprocessed(state);
        }
        let outcome = match &result {
            Ok(resp) => Outcome::Status(resp.status().as_u16()),
            Err(_) => Outcome::Failed,
        };
        self.record(&ep, outcome);
        let can_retry = self.can_retry(outcome, state.retries);
        match result {
            Err(e) => {
                state.last = (Err(e), Some(ep));
                if !can_retry || !self.withdraw_retry() {
                    return Try::Stop;
                }
                // The endpoint counts this try as pending through the wait.
                self.back_off(state, RetryReason::error).await;
                drop(load);
                Try::Again
            }
            // The peer proxy could not reach its app (it is exiting): as a
            // failed connection, nothing was sent.
            Ok(resp)
                if resp.headers().contains_key(crate::error::NOT_SENT)
                    && state.connect_retries > 0 =>
            {
                state.last = (Ok(resp), Some(ep));
                drop(load);
                self.resend_unprocessed(state)
            }
            Ok(mut resp) => {
                if !can_retry {
                    load.finish(outcome);
                    return Try::Answer(resp, ep);
                }
                if !self.withdraw_retry() {
                    add_flag(&mut resp, "URX");
                    return Try::Answer(resp, ep);
                }
                drop(load);
                state.last = (Ok(resp), Some(ep));
                self.back_off(state, RetryReason::status).await;
                Try::Again
            }
        }
    }

    /// The endpoint's connection, within the backend's
    /// `maxPendingRequests`; else how the try ends.
    async fn connect(&self, ep: &Arc<Endpoint>, state: &mut RetryState) -> Result<PeerConn, Try> {
        let backend = self.to.backend;
        let conn = {
            let Some(_pending) = backend
                .traffic
                .acquire(Limit::Pending, backend.policy.max_pending)
            else {
                let metrics = &self.inputs.metrics.traffic;
                return Err(Try::Refused(overflow(metrics, backend, Limit::Pending)));
            };
            ep.conn(self.creds.as_deref(), self.http1).await
        };
        conn.map_err(|e| {
            self.record(ep, Outcome::Failed);
            state.last = (Err(e), Some(ep.clone()));
            // Nothing was sent: any request may go to another endpoint.
            if state.connect_retries == 0 {
                return Try::Stop;
            }
            self.resend_unprocessed(state)
        })
    }

    /// Another try after one the peer never processed (a failed
    /// connection, a refused stream, a peer that could not reach its app):
    /// takes one of `connect_retries` (the caller checked one is left) and
    /// counts it; no budget, no backoff.
    fn resend_unprocessed(&self, state: &mut RetryState) -> Try {
        state.connect_retries -= 1;
        self.inputs
            .metrics
            .traffic
            .retry(&self.to.svc.key, RetryReason::connect);
        Try::Again
    }

    /// An endpoint of the backend not tried yet (if one is left).
    fn pick(&self, tried: &[SocketAddr]) -> Option<Arc<Endpoint>> {
        let backend = self.to.backend;
        let metrics = &self.inputs.metrics.traffic;
        let ctx = PickCtx {
            hash: self.hash,
            avoid: tried,
            zone: self.zone,
        };
        let picked = backend
            .balancer
            .pick(&backend.endpoints, &backend.rr, &ctx)?;
        if picked.failover {
            TrafficMetrics::inc(&metrics.locality_failovers, &backend.key);
        }
        if picked.hash_missing && tried.is_empty() {
            TrafficMetrics::inc(&metrics.hash_key_missing, &backend.key);
        }
        Some(picked.endpoint.clone())
    }

    /// Sends the request over the endpoint's connection, within the
    /// per-try timeout.
    async fn send(
        &self,
        ep: &Arc<Endpoint>,
        conn: PeerConn,
        body: Body,
    ) -> Result<Response<Body>, Failed> {
        let mut req = Request::new(body);
        *req.method_mut() = self.parts.method.clone();
        *req.headers_mut() = self.parts.headers.clone();
        let send = std::pin::pin!(async {
            match conn {
                PeerConn::H2(mut tx) => {
                    *req.uri_mut() = self.uri.clone();
                    *req.version_mut() = Version::HTTP_2;
                    tx.send(req).await.map_err(|e| Failed {
                        unprocessed: e.unprocessed,
                        error: ProxyError::upstream(e),
                    })
                }
                PeerConn::H1(c) => {
                    *req.uri_mut() = self.uri.clone();
                    crate::h1pool::origin_form(&mut req);
                    let creds = self.creds.as_deref();
                    // Boxed: the HTTP/1.1 path (`--peer-http1`) is not the
                    // default, and held inline its future would grow every
                    // request's.
                    Box::pin(crate::h1pool::send(&ep.idle_h1, c, req, || {
                        ep.connect_h1(creds)
                    }))
                    .await
                    .map_err(|e| match e {
                        crate::h1pool::Failed::Connect(e) => e,
                        crate::h1pool::Failed::Send(e) => ProxyError::upstream(e),
                    })
                    .map_err(Failed::seen)
                }
            }
        });
        crate::http::within(self.plan.per_try, send)
            .await
            .unwrap_or_else(|| Err(Failed::seen(ProxyError::timeout("backend request"))))
    }

    /// Whether this outcome is retried, budget aside: a listed status, or
    /// a reset or timeout (retried once even without a retry policy),
    /// for a request that can be sent again.
    fn can_retry(&self, outcome: Outcome, retries: u32) -> bool {
        let (wanted, allowed) = match outcome {
            Outcome::Status(code) => (self.plan.codes.contains(&code), self.plan.attempts),
            Outcome::Failed => (true, self.plan.attempts.max(1)),
        };
        wanted && self.resendable && self.payload.replayable() && retries < allowed
    }

    /// Takes a retry from the called Service's budget; counts it if empty.
    fn withdraw_retry(&self) -> bool {
        let svc = self.to.svc;
        if svc
            .traffic
            .budget
            .try_withdraw(&svc.policy.budget, now_nanos())
        {
            return true;
        }
        TrafficMetrics::inc(&self.inputs.metrics.traffic.budget_exhausted, &svc.key);
        false
    }

    /// Counts a retry and waits its backoff.
    async fn back_off(&self, state: &mut RetryState, reason: RetryReason) {
        state.retries += 1;
        self.inputs.metrics.traffic.retry(&self.to.svc.key, reason);
        tokio::time::sleep(self.plan.backoff(state.retries)).await;
    }

    /// Feeds a try's outcome to the endpoint's outlier detection.
    fn record(&self, ep: &Endpoint, outcome: Outcome) {
        let backend = self.to.backend;
        let Some(cfg) = backend.policy.outlier.as_ref() else {
            return;
        };
        if ep
            .health
            .record(cfg, outcome, &backend.endpoints, now_nanos())
        {
            TrafficMetrics::inc(&self.inputs.metrics.traffic.ejections, &backend.key);
            tracing::info!(
                service = %backend.key,
                endpoint = %ep.addr,
                instance = %ep.instance,
                "outlier detection ejected an endpoint"
            );
        }
    }

    /// The answer as the caller gets it: the backendRef's response filters
    /// applied, and the request counted against `maxRequests` until the
    /// body is done (a gRPC stream may last long after the headers).
    fn finish(&self, mut resp: Response<Body>, in_flight: Permit) -> Response<Body> {
        if let Some(m) = self.backend_ref.and_then(|b| b.response_headers.as_ref()) {
            modify_headers(resp.headers_mut(), m);
        }
        resp.map(|b| {
            Held {
                inner: b,
                _permit: in_flight,
            }
            .boxed_unsync()
        })
    }
}

/// A response body that holds a circuit-breaker permit until it ends.
struct Held {
    inner: Body,
    _permit: Permit,
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
    _permit: Permit,
}

impl<S> HeldIo<S> {
    pub fn new(inner: S, permit: Permit) -> Self {
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
