//! Outbound: what the local app calls. An explicit HTTP proxy (absolute-form
//! requests and CONNECT) on the outbound address, plus `--upstream`
//! listeners bound to one service each. Requests are routed by HTTPRoute,
//! balanced over endpoints and carried to the peer proxy over HTTP/2.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HOST;
use http::{HeaderValue, Method, Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::balance::PickCtx;
use crate::config::ProxyConfig;
use crate::detect::{detect, Protocol, PEER_TCP_PREAMBLE};
use crate::discovery::Lookup;
use crate::endpoint::Endpoint;
use crate::error::{ProxyError, Source};
use crate::http::{
    absolute_uri, boxed, empty, forward_upgrade, is_upgrade, request_body, strip_hop_by_hop,
    BodyFault, DESTINATION, ORIG_PROTO, SOURCE,
};
use crate::inputs::Inputs;
use crate::listener::{self, BindError, Closed, Kind, Listening};
use crate::loops::{EgressError, HOPS};
use crate::metrics::{Direction, InFlight, PeerNames, TcpLabels};
use crate::names::{classify, Name};
use crate::route::modify_headers;
use crate::server::{serve_connection, Hop};
use crate::snapshot::{ServiceState, SvcKey};
use crate::splice::{splice, Ended};
use crate::traffic::admit::Admission;
use crate::traffic::forward::{Destination, Forwarded, Outgoing};
use crate::traffic::policy::Limit;
use crate::Body;

/// How long a client of an `--upstream` listener may stay silent before its
/// connection is taken as opaque TCP (server-speaks-first protocols).
const DETECT_TIMEOUT: Duration = Duration::from_millis(300);

/// Where a request or connection is headed: the name the app used.
#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
}

impl Target {
    fn authority(&self) -> String {
        if self.host.contains(':') {
            // An IPv6 address, as a URI writes it.
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

pub struct Outbound {
    listener: TcpListener,
    upstreams: Vec<(TcpListener, Target)>,
}

impl Outbound {
    /// Binds the outbound listener and every `--upstream` listener (a
    /// taken port is a start-up error).
    pub async fn new(cfg: &ProxyConfig) -> Result<Outbound, BindError> {
        let listener = listener::bind(cfg.outbound_addr, Kind::outbound).await?;
        let mut upstreams = Vec::new();
        for u in &cfg.upstreams {
            let l = listener::bind(u.listen, Kind::upstream).await?;
            upstreams.push((
                l,
                Target {
                    host: u.service.clone(),
                    port: u.port,
                },
            ));
        }
        Ok(Outbound {
            listener,
            upstreams,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn upstream_addrs(&self) -> Vec<SocketAddr> {
        self.upstreams
            .iter()
            .map(|(l, _)| l.local_addr().expect("bound listener has an address"))
            .collect()
    }

    /// Serves the outbound listener and every `--upstream` one on every
    /// worker (see `workers`): a connection runs on the worker it is
    /// placed on.
    pub async fn run(self, inputs: Arc<Inputs>, shutdown: watch::Receiver<bool>) {
        let workers = inputs.workers.clone();
        for (l, target) in self.upstreams {
            let (inputs, shutdown, workers) = (inputs.clone(), shutdown.clone(), workers.clone());
            tokio::spawn(async move {
                let metrics = inputs.metrics.conns.clone();
                workers
                    .serve_listener(l, Kind::upstream, &metrics, move |l| {
                        let (inputs, target, sd) =
                            (inputs.clone(), target.clone(), shutdown.clone());
                        let how = listening(&inputs, Kind::upstream);
                        listener::serve(l, how, shutdown.clone(), move |tcp, _| {
                            tokio::spawn(serve_fixed(
                                inputs.clone(),
                                tcp,
                                target.clone(),
                                Kind::upstream,
                                sd.clone(),
                            ));
                        })
                    })
                    .await
            });
        }
        let metrics = inputs.metrics.conns.clone();
        workers
            .serve_listener(self.listener, Kind::outbound, &metrics, move |l| {
                let (inputs, sd) = (inputs.clone(), shutdown.clone());
                let how = listening(&inputs, Kind::outbound);
                listener::serve(l, how, shutdown.clone(), move |tcp, _| {
                    accept_outbound(inputs.clone(), tcp, sd.clone())
                })
            })
            .await
    }
}

fn listening(inputs: &Inputs, kind: Kind) -> Listening {
    Listening {
        kind,
        cap: inputs.cfg.limits.max_connections,
        metrics: inputs.metrics.conns.clone(),
    }
}

/// Spawns the task of a connection the outbound listener accepted.
fn accept_outbound(
    inputs: Arc<Inputs>,
    tcp: crate::listener::Counted<tokio::net::TcpStream>,
    sd: watch::Receiver<bool>,
) {
    // Pods mode: a redirected connection keeps its original destination.
    let orig = inputs
        .cfg
        .transparent
        .as_ref()
        .and_then(|_| crate::transparent::original_dst(tcp.get_ref()));
    match orig {
        Some(orig) => {
            tokio::spawn(crate::transparent::serve_outbound(inputs, tcp, orig, sd));
        }
        None => {
            tokio::spawn(async move {
                let i = inputs.clone();
                let s = sd.clone();
                serve_connection(tcp, &i, Kind::outbound, Hop::App, s, move |req| {
                    handle(inputs.clone(), req, None, sd.clone())
                })
                .await
            });
        }
    }
}

/// A connection bound for one service: HTTP is served and routed, anything
/// else is carried as opaque TCP.
pub(crate) async fn serve_fixed<S>(
    inputs: Arc<Inputs>,
    io: S,
    target: Target,
    kind: Kind,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, io) = match detect(io, DETECT_TIMEOUT).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "connection failed during detection");
            return;
        }
    };
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let sd = shutdown.clone();
            let i = inputs.clone();
            serve_connection(io, &i, kind, Hop::App, shutdown, move |req| {
                handle(inputs.clone(), req, Some(target.clone()), sd.clone())
            })
            .await
        }
        // An app's own TLS is opaque to the mesh: carried, not read.
        Protocol::PeerTcp | Protocol::Tls | Protocol::Opaque => tcp_to(inputs, io, target).await,
    }
}

/// An app connection to a Service port declared HTTP (HTTP/1.1 or h2c,
/// told apart by hyper), without detection.
pub(crate) async fn serve_http<S>(
    inputs: Arc<Inputs>,
    io: S,
    target: Target,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let sd = shutdown.clone();
    let i = inputs.clone();
    serve_connection(io, &i, Kind::outbound, Hop::App, shutdown, move |req| {
        handle(inputs.clone(), req, Some(target.clone()), sd.clone())
    })
    .await
}

/// Handles one request from the app, counted in flight until its
/// response has been sent.
async fn handle(
    inputs: Arc<Inputs>,
    req: Request<Incoming>,
    fixed: Option<Target>,
    shutdown: watch::Receiver<bool>,
) -> Response<Body> {
    let in_flight = InFlight::new(&inputs.metrics);
    in_flight.hold(handle_request(inputs, req, fixed, shutdown).await)
}

async fn handle_request(
    inputs: Arc<Inputs>,
    mut req: Request<Incoming>,
    fixed: Option<Target>,
    shutdown: watch::Receiver<bool>,
) -> Response<Body> {
    // One more proxy on the request's way, or the end of a loop.
    match crate::loops::next_hop(req.headers(), inputs.cfg.limits.max_hops) {
        Ok(hop) => {
            req.headers_mut().insert(HOPS, hop);
        }
        Err(e) => return e.into_response(),
    }
    if req.method() == Method::CONNECT {
        return connect_tunnel(inputs, req, shutdown);
    }
    let target = match fixed.or_else(|| target_of(&req)) {
        Some(t) => t,
        None => {
            return ProxyError::bad_request(
                "the outbound proxy needs an absolute-form request (GET http://service:port/path) or a Host header",
            )
            .into_response()
        }
    };
    let snap = inputs.discovery.snapshot();
    let name = classify(&target.host, &inputs.cfg.namespace, &snap.mesh.trust_domain);
    drop(snap);
    let (key, maybe) = match name {
        Name::Mesh(k) => (k, false),
        Name::Maybe(k) => (k, true),
        Name::External => return egress(inputs, req, &target).await,
    };
    match inputs.discovery.resolve(&key).await {
        Lookup::Found(svc) => to_service(inputs, req, &target, svc).await,
        Lookup::Missing if maybe => egress(inputs, req, &target).await,
        // `localhost:<own port>` with no such Service: a loop.
        Lookup::Missing => match own_target(&inputs, &target) {
            Some(e) => e.to_proxy_error().into_response(),
            None => ProxyError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                Source::Downstream,
                format!(
                    "no service {key} in the mesh: apply a Service named {} in namespace {}",
                    key.name, key.namespace
                ),
            )
            .into_response(),
        },
        Lookup::Unavailable(msg) => {
            ProxyError::new(StatusCode::SERVICE_UNAVAILABLE, Source::Internal, msg).into_response()
        }
    }
}

/// A loop error when a single-label name (`localhost`) names one of this
/// proxy's own listeners.
fn own_target(inputs: &Inputs, target: &Target) -> Option<EgressError> {
    if target.host != "localhost" {
        return None;
    }
    let v4 = std::net::SocketAddr::from(([127, 0, 0, 1], target.port));
    let v6 = std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, target.port));
    let a = target.authority();
    inputs
        .own
        .check(&a, v4)
        .and_then(|()| inputs.own.check(&a, v6))
        .err()
}

fn target_of<B>(req: &Request<B>) -> Option<Target> {
    let authority = req
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| req.headers().get(HOST)?.to_str().ok().map(str::to_string))?;
    parse_authority(&authority)
}

fn parse_authority(authority: &str) -> Option<Target> {
    let a: http::uri::Authority = authority.parse().ok()?;
    Some(Target {
        host: a
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string(),
        port: a.port_u16().unwrap_or(80),
    })
}

/// CONNECT host:port — answer 200, then treat the tunnel like an
/// `--upstream` connection to that target.
fn connect_tunnel(
    inputs: Arc<Inputs>,
    req: Request<Incoming>,
    shutdown: watch::Receiver<bool>,
) -> Response<Body> {
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| parse_authority(a.as_str()))
    else {
        return ProxyError::bad_request("CONNECT needs host:port").into_response();
    };
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => {
                serve_fixed(
                    inputs,
                    hyper_util::rt::TokioIo::new(upgraded),
                    target,
                    Kind::outbound,
                    shutdown,
                )
                .await
            }
            Err(e) => tracing::debug!(error = %e, "CONNECT upgrade failed"),
        }
    });
    Response::new(empty())
}

fn peers<'a>(inputs: &'a Inputs, key: &'a SvcKey, ep: Option<&'a Endpoint>) -> PeerNames<'a> {
    PeerNames {
        direction: Direction::outbound,
        source_namespace: &inputs.cfg.namespace,
        source_workload: &inputs.cfg.workload,
        destination_namespace: &key.namespace,
        destination_service: &key.name,
        destination_workload: ep.map_or("", |e| e.workload.as_str()),
    }
}

/// Routes a request to a mesh service and forwards it to one of its endpoints.
async fn to_service(
    inputs: Arc<Inputs>,
    mut req: Request<Incoming>,
    target: &Target,
    svc: Arc<ServiceState>,
) -> Response<Body> {
    let begun = inputs.telemetry.begin(Direction::outbound, &mut req);
    // Route and forward the one normalised path the peer will authorize.
    if let Err(e) = crate::normalize::normalize_uri(&mut req) {
        return e.into_response();
    }
    let matched = svc.routes.find_match(&req, req.uri().path());
    let rule = matched.map(|m| m.rule);
    let route_name = rule.map(|r| r.route.clone()).unwrap_or_default();
    // Rate limit, faults, redirect and rewrite (see traffic::admit).
    let admission = crate::traffic::admit::admit(
        &inputs.metrics.traffic,
        &svc,
        matched,
        &mut req,
        target.port,
    )
    .await;
    let delayed = match admission {
        Admission::Answer(mut resp) => {
            inputs.telemetry.end(
                begun,
                crate::telemetry::Done {
                    peers: peers(&inputs, &svc.key, None),
                    route: &route_name,
                    tls: false,
                    peer_identity: "",
                },
                &mut resp,
            );
            return resp;
        }
        Admission::Forward { delayed } => delayed,
    };
    let backend = match rule {
        None => svc.clone(),
        Some(rule) => match rule.pick_backend() {
            None => {
                return ProxyError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    Source::Internal,
                    format!("route {} has no backend with weight above zero", rule.route),
                )
                .into_response()
            }
            Some(k) if *k == svc.key => svc.clone(),
            Some(k) => match inputs.discovery.resolve(k).await {
                Lookup::Found(b) => b,
                _ => {
                    return ProxyError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        Source::Internal,
                        format!(
                            "route {} names service {k}, which is not in the mesh",
                            rule.route
                        ),
                    )
                    .into_response()
                }
            },
        },
    };
    let request_timeout = rule.and_then(|r| r.request_timeout);
    let to = Destination {
        svc: &svc,
        backend: &backend,
        rule,
    };
    // Pinned in place, once: a future held by value in two arms (or moved
    // into a timeout) is laid out more than once in this one's state,
    // which every request then copies as hyper moves it.
    let forward = std::pin::pin!(forward(&inputs, req, target, to));
    let result = crate::http::within(request_timeout, forward)
        .await
        .unwrap_or_else(|| (Err(ProxyError::timeout("request")), None));
    let (result, ep) = result;
    let mut resp = result.unwrap_or_else(|e| {
        tracing::debug!(service = %backend.key, error = %e, "request failed");
        e.into_response()
    });
    if let Some(m) = rule.and_then(|r| r.response_headers.as_ref()) {
        modify_headers(resp.headers_mut(), m);
    }
    if delayed {
        crate::traffic::add_flag(&mut resp, "DI");
    }
    inputs.telemetry.end(
        begun,
        crate::telemetry::Done {
            peers: peers(&inputs, &backend.key, ep.as_deref()),
            route: &route_name,
            // Every call to a peer is mutual TLS unless the mesh disables it.
            tls: ep.is_some()
                && inputs.discovery.snapshot().mesh.mtls != trellis_resource::MtlsMode::Disabled,
            peer_identity: ep.as_deref().map(|e| e.identity.as_str()).unwrap_or(""),
        },
        &mut resp,
    );
    resp
}

/// Prepares a request for the peer and sends it to `backend`'s endpoints
/// with the traffic policy's circuit breaking, retries and outlier
/// detection (see `traffic::forward`).
async fn forward(
    inputs: &Inputs,
    req: Request<Incoming>,
    target: &Target,
    to: Destination<'_>,
) -> Forwarded {
    let Destination { svc, backend, rule } = to;
    if backend.endpoints.is_empty() {
        let e = ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Source::Upstream,
            format!(
                "service {} has no endpoints: is a workload with its labels running?",
                backend.key
            ),
        );
        return (Err(e), None);
    }
    if is_upgrade(&req) {
        let ep = backend
            .balancer
            .pick(&backend.endpoints, &backend.rr, &zone_ctx(inputs))
            .map(|p| p.endpoint.clone());
        let Some(ep) = ep else {
            return (Err(ProxyError::upstream("no endpoint")), None);
        };
        // An upgraded connection is one of the pool's connections.
        let Some(permit) = backend
            .traffic
            .acquire(Limit::Connections, backend.policy.max_connections)
        else {
            let resp = crate::traffic::forward::overflow(
                &inputs.metrics.traffic,
                backend,
                Limit::Connections,
            );
            return (Ok(resp), None);
        };
        let creds = match peer_credentials(inputs) {
            Ok(c) => c,
            Err(e) => return (Err(e), Some(ep)),
        };
        // The upgrade's futures are boxed: they are large, and held
        // inline they would grow every request's (see `Endpoint::h2`).
        let io = match Box::pin(ep.open(creds.as_deref(), trellis_identity::ALPN_HTTP1)).await {
            Ok(io) => crate::traffic::forward::HeldIo::new(io, permit),
            Err(e) => return (Err(e), Some(ep)),
        };
        let idle = inputs.cfg.limits.tcp_idle_timeout;
        return (Box::pin(forward_upgrade(req, io, idle)).await, Some(ep));
    }
    let creds = match peer_credentials(inputs) {
        Ok(c) => c,
        Err(e) => return (Err(e), None),
    };
    let (mut parts, body) = req.into_parts();
    let authority = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .unwrap_or_else(|| target.authority());
    let uri = match absolute_uri(&authority, &parts.uri) {
        Ok(u) => u,
        Err(e) => return (Err(e), None),
    };
    let orig_version = parts.version;
    strip_hop_by_hop(&mut parts.headers, false);
    parts.headers.remove(HOST);
    // The app's request rarely carries one: one pass over the names first.
    if parts
        .headers
        .keys()
        .any(|k| crate::http::INTERNAL.contains(k))
    {
        for h in crate::http::INTERNAL {
            parts.headers.remove(h);
        }
    }
    if orig_version < Version::HTTP_2 {
        parts
            .headers
            .insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
    }
    if let Some(v) = &inputs.source_header {
        parts.headers.insert(SOURCE, v.clone());
    }
    if let Some(v) = &svc.key_header {
        parts.headers.insert(DESTINATION, v.clone());
    }
    if let Some(m) = rule.and_then(|r| r.request_headers.as_ref()) {
        modify_headers(&mut parts.headers, m);
    }
    let req = Outgoing {
        parts,
        uri,
        body,
        creds,
        http1: inputs.cfg.peer_http1 && orig_version < Version::HTTP_2,
    };
    crate::traffic::forward::forward(inputs, to, req).await
}

/// The balancer's context for a connection (no hash key): the caller's zone
/// (`ZONE_LABEL`), so that locality applies to tunnels and TCP too.
fn zone_ctx(inputs: &Inputs) -> PickCtx<'_> {
    PickCtx {
        zone: inputs
            .cfg
            .labels
            .get(trellis_resource::ZONE_LABEL)
            .map(String::as_str),
        ..Default::default()
    }
}

/// A request for a host outside the mesh goes there directly.
async fn egress(
    inputs: Arc<Inputs>,
    mut req: Request<Incoming>,
    target: &Target,
) -> Response<Body> {
    let begun = inputs.telemetry.begin(Direction::outbound, &mut req);
    let key = SvcKey::new("", &target.host);
    let limits = &inputs.cfg.limits;
    let result = if is_upgrade(&req) {
        match inputs
            .own
            .connect(&target.host, target.port, limits.connect_timeout)
            .await
        {
            Ok(tcp) => forward_upgrade(req, tcp, limits.tcp_idle_timeout).await,
            Err(e) => Err(e.to_proxy_error()),
        }
    } else {
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers, false);
        match absolute_uri(&target.authority(), &parts.uri) {
            Ok(uri) => {
                parts.uri = uri;
                parts.version = Version::HTTP_11;
                let fault = BodyFault::default();
                let sent = inputs
                    .egress
                    .get()
                    .request(Request::from_parts(parts, request_body(body, &fault)));
                match tokio::time::timeout(limits.egress_request_timeout, sent).await {
                    Ok(Ok(r)) => Ok(r.map(boxed)),
                    Ok(Err(_)) if fault.broke() => Err(ProxyError::bad_body()),
                    Ok(Err(e)) => Err(EgressError::find(&e)
                        .map(EgressError::to_proxy_error)
                        .unwrap_or_else(|| ProxyError::upstream(e))),
                    Err(_) => Err(ProxyError::timeout(&format!(
                        "the call to {} outside the mesh (--egress-request-timeout {:?})",
                        target.authority(),
                        limits.egress_request_timeout
                    ))),
                }
            }
            Err(e) => Err(e),
        }
    };
    let mut resp = result.unwrap_or_else(ProxyError::into_response);
    inputs.telemetry.end(
        begun,
        crate::telemetry::Done {
            peers: peers(&inputs, &key, None),
            route: "",
            tls: false,
            peer_identity: "",
        },
        &mut resp,
    );
    resp
}

/// Opaque TCP to a service (or, outside the mesh, straight to the target).
pub(crate) async fn tcp_to<S>(inputs: Arc<Inputs>, mut io: S, target: Target)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let trust_domain = inputs.discovery.snapshot().mesh.trust_domain.clone();
    let name = classify(&target.host, &inputs.cfg.namespace, &trust_domain);
    let svc = match &name {
        Name::Mesh(k) | Name::Maybe(k) => match inputs.discovery.resolve(k).await {
            Lookup::Found(s) => Some(s),
            Lookup::Missing if matches!(name, Name::Maybe(_)) => None,
            other => {
                let why = match other {
                    Lookup::Unavailable(m) => m,
                    _ => format!("no service {k} in the mesh"),
                };
                tracing::warn!(target = %target.authority(), "closing TCP connection: {why}");
                return;
            }
        },
        Name::External => None,
    };
    let mut tls = false;
    // Held while the connection lasts: it counts against maxConnections.
    let mut _pool_permit = None;
    let (mut upstream, key, ep): (Box<dyn crate::endpoint::Io>, _, _) = match svc {
        Some(svc) => {
            let ep = svc
                .balancer
                .pick(&svc.endpoints, &svc.rr, &zone_ctx(&inputs))
                .map(|p| p.endpoint.clone());
            let Some(ep) = ep else {
                tracing::warn!(service = %svc.key, "closing TCP connection: the service has no endpoints");
                return;
            };
            _pool_permit = svc
                .traffic
                .acquire(Limit::Connections, svc.policy.max_connections);
            if _pool_permit.is_none() {
                inputs
                    .metrics
                    .traffic
                    .overflow(&svc.key, Limit::Connections);
                tracing::warn!(service = %svc.key, "closing TCP connection: the connection pool is full (TrafficPolicy maxConnections)");
                return;
            }
            let creds = match peer_credentials(&inputs) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(service = %svc.key, error = %e, "closing TCP connection");
                    return;
                }
            };
            tls = creds.is_some();
            let mut up = match ep.open(creds.as_deref(), trellis_identity::ALPN_TCP).await {
                Ok(up) => up,
                Err(e) => {
                    tracing::warn!(service = %svc.key, error = %e, "closing TCP connection");
                    return;
                }
            };
            // Over mutual TLS the ALPN says "opaque TCP"; in plaintext a
            // preamble does.
            if !tls && up.write_all(PEER_TCP_PREAMBLE).await.is_err() {
                return;
            }
            (up, svc.key.clone(), Some(ep))
        }
        None => {
            let connect_timeout = inputs.cfg.limits.connect_timeout;
            match inputs
                .own
                .connect(&target.host, target.port, connect_timeout)
                .await
            {
                Ok(up) => (Box::new(up), SvcKey::new("", &target.host), None),
                Err(e) => {
                    tracing::warn!(target = %target.authority(), "closing TCP connection: {e}");
                    return;
                }
            }
        }
    };
    let labels = TcpLabels {
        peers: peers(&inputs, &key, ep.as_deref()).to_owned(),
        tls,
    };
    inputs.metrics.tcp_opened(&labels);
    let (sent, received) =
        match splice(&mut io, &mut upstream, inputs.cfg.limits.tcp_idle_timeout).await {
            Ended::Closed(sent, received) => (sent, received),
            Ended::Idle => {
                inputs
                    .metrics
                    .conns
                    .closed_by_limit(Kind::outbound, Closed::tcp_idle);
                (0, 0)
            }
        };
    inputs.metrics.tcp_closed(&labels, sent, received);
}

/// The credentials for a connection to a peer proxy: none when the mesh's
/// mTLS mode is `disabled`; otherwise this proxy's certificate, without
/// which it does not call peers at all.
pub(crate) fn peer_credentials(
    inputs: &Inputs,
) -> Result<Option<Arc<crate::tls::Credentials>>, ProxyError> {
    if inputs.discovery.snapshot().mesh.mtls == trellis_resource::MtlsMode::Disabled {
        return Ok(None);
    }
    match inputs.discovery.tls().and_then(|t| t.current()) {
        Some(c) => Ok(Some(c)),
        None => Err(ProxyError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            Source::Internal,
            "this proxy has no certificate yet, so it cannot call peers over mutual TLS",
        )),
    }
}
