//! Inbound: what peer proxies (and, as the mTLS mode allows, plain clients)
//! send to this workload. HTTP is served and forwarded to the local app on
//! loopback; anything else is spliced to the app as opaque TCP.
//!
//! Plaintext that says nothing within the detection timeout (permissive
//! or disabled mTLS) is carried to the app only when a Service of this
//! workload declares a `tcp` port (a server-speaks-first protocol);
//! otherwise it is closed and counted, so that idle clients cannot each
//! hold a connection to the app.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::authz::{Attrs, Decision};
use crate::config::ProxyConfig;
use crate::detect::{detect, Protocol, Rewind};
use crate::endpoint::connect;
use crate::error::ProxyError;
use crate::http::{
    absolute_uri, forward_upgrade, is_upgrade, request_body, strip_hop_by_hop, BodyFault,
    DESTINATION, ORIG_PROTO, SOURCE,
};
use crate::inputs::Inputs;
use crate::listener::{self, BindError, Closed, Counted, Kind, Listening};
use crate::metrics::{Direction, InFlight, PeerNames, TcpLabels};
use crate::server::{serve_connection, Hop};
use crate::splice::{splice, Ended};
use crate::Body;
use trellis_identity::SpiffeId;
use trellis_resource::MtlsMode;

/// Peers speak first; a client silent this long is treated as opaque TCP.
const DETECT_TIMEOUT: Duration = Duration::from_millis(500);
/// A TLS client that stalls mid-handshake is dropped after this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Who is on the other end of an inbound connection.
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The identity the peer's certificate proved (mutual TLS only).
    pub identity: Option<SpiffeId>,
    pub tls: bool,
    /// `identity` as a URI, made once per connection rather than per request.
    identity_uri: String,
    /// The same, ready for the `x-trellis-peer-identity` header.
    identity_header: Option<http::HeaderValue>,
}

impl PeerInfo {
    pub fn new(identity: Option<SpiffeId>, tls: bool) -> PeerInfo {
        let identity_uri = identity.as_ref().map(|i| i.to_string()).unwrap_or_default();
        let identity_header = identity
            .as_ref()
            .and_then(|_| http::HeaderValue::from_str(&identity_uri).ok());
        PeerInfo {
            identity,
            tls,
            identity_uri,
            identity_header,
        }
    }
}

pub struct Inbound {
    listener: TcpListener,
}

impl Inbound {
    /// Binds the inbound listener (a taken port is a start-up error).
    pub async fn new(cfg: &ProxyConfig) -> Result<Inbound, BindError> {
        let listener = listener::bind(cfg.inbound_addr, Kind::inbound).await?;
        Ok(Inbound { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Serves the listener on every worker (see `workers`): a connection
    /// runs on the worker it is placed on.
    pub async fn run(self, inputs: Arc<Inputs>, shutdown: watch::Receiver<bool>) {
        let (workers, metrics) = (inputs.workers.clone(), inputs.metrics.conns.clone());
        workers
            .serve_listener(self.listener, Kind::inbound, &metrics, move |l| {
                let (inputs, shutdown) = (inputs.clone(), shutdown.clone());
                let how = Listening {
                    kind: Kind::inbound,
                    cap: inputs.cfg.limits.max_connections,
                    metrics: inputs.metrics.conns.clone(),
                };
                let sd = shutdown.clone();
                listener::serve(l, how, shutdown, move |tcp, peer| {
                    // Pods mode: a redirected connection for a port the
                    // app does not serve is closed.
                    if crate::transparent::inbound_wanted(&inputs, tcp.get_ref(), peer) {
                        tokio::spawn(serve(inputs.clone(), tcp, peer, sd.clone()));
                    }
                })
            })
            .await
    }
}

async fn serve(
    inputs: Arc<Inputs>,
    tcp: Counted<TcpStream>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let (protocol, io) = match detect(tcp, DETECT_TIMEOUT).await {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(%peer, error = %e, "inbound connection failed during detection");
            return;
        }
    };
    let mode = inputs.discovery.snapshot().mesh.mtls;
    if protocol == Protocol::Tls {
        return serve_tls(inputs, io, peer, shutdown).await;
    }
    if mode == MtlsMode::Strict {
        // Only the identity a certificate proves may reach the app.
        inputs.metrics.plaintext_refused.inc();
        tracing::debug!(%peer, "refused a plaintext connection: the mesh's mTLS mode is strict");
        return;
    }
    let info = Arc::new(PeerInfo::default());
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            let i = inputs.clone();
            serve_connection(io, &i, Kind::inbound, Hop::Plain, shutdown, move |req| {
                handle(inputs.clone(), req, info.clone())
            })
            .await;
        }
        Protocol::Tls => {}
        Protocol::PeerTcp | Protocol::Opaque => {
            let silent = protocol == Protocol::Opaque && io.replays_nothing();
            if silent && !declares_tcp(&inputs).await {
                inputs
                    .metrics
                    .conns
                    .closed_by_limit(Kind::inbound, Closed::detect_timeout);
                tracing::debug!(%peer, "closed a plaintext connection that sent nothing: no Service of this workload declares a tcp port");
                return;
            }
            tcp_to_app(inputs, io, peer, &info).await
        }
    }
}

/// Whether a Service that selects this workload declares a `tcp` port, so
/// that a client that waits for the server to speak first is expected.
async fn declares_tcp(inputs: &Inputs) -> bool {
    let own: Vec<_> = inputs
        .discovery
        .snapshot()
        .raw
        .own_services
        .iter()
        .filter_map(|s| crate::snapshot::SvcKey::parse(s))
        .collect();
    for key in own {
        if let crate::discovery::Lookup::Found(svc) = inputs.discovery.resolve(&key).await {
            if svc
                .spec
                .ports
                .iter()
                .any(|p| p.protocol == Some(trellis_resource::Protocol::Tcp))
            {
                return true;
            }
        }
    }
    false
}

/// Terminates mutual TLS from a peer proxy, then serves what its ALPN says.
async fn serve_tls(
    inputs: Arc<Inputs>,
    io: Rewind<Counted<TcpStream>>,
    peer: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    let Some(creds) = inputs.discovery.tls().and_then(|t| t.current()) else {
        tracing::warn!(%peer, "refused a TLS connection: this proxy has no certificate yet");
        return;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(creds.server.clone());
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            inputs.metrics.tls_handshake_failures.inc();
            tracing::warn!(%peer, error = %e, "refused a TLS peer");
            return;
        }
        Err(_) => {
            inputs.metrics.tls_handshake_failures.inc();
            tracing::warn!(%peer, "dropped a TLS peer that stalled in the handshake");
            return;
        }
    };
    let (_, conn) = tls.get_ref();
    if let Err(e) = creds.accepted(conn) {
        inputs.metrics.tls_handshake_failures.inc();
        tracing::warn!(%peer, error = %e, "refused a TLS peer");
        return;
    }
    let info = Arc::new(PeerInfo::new(
        trellis_identity::verify::peer_identity(conn.peer_certificates()),
        true,
    ));
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    if alpn.as_deref() == Some(trellis_identity::ALPN_TCP) {
        return tcp_to_app(inputs, tls, peer, &info).await;
    }
    let i = inputs.clone();
    // Boxed: a peer's requests come over HTTP/2, where each stream is a
    // task of its own, whose whole state tokio copies when it is spawned
    // and twice more when it ends; this keeps that state small (measured:
    // docs/performance.md, "Boxing the request's future").
    serve_connection(tls, &i, Kind::inbound, Hop::Peer, shutdown, move |req| {
        Box::pin(handle(inputs.clone(), req, info.clone()))
    })
    .await;
}

/// Opaque TCP to the app, if policy allows the peer.
async fn tcp_to_app<S>(inputs: Arc<Inputs>, mut io: S, peer: SocketAddr, info: &PeerInfo)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    {
        let snap = inputs.discovery.snapshot();
        let attrs = Attrs {
            peer: info.identity.as_ref(),
            method: None,
            path: None,
            port: inputs.cfg.app_port,
            headers: None,
        };
        if let Decision::Deny(why) = snap.authz.evaluate(&attrs) {
            inputs.metrics.authz_denied.inc();
            tracing::info!(%peer, identity = ?info.identity.as_ref().map(|i| i.to_string()), %why, "closed a TCP connection: not authorized");
            return;
        }
    }
    {
        let labels = TcpLabels {
            peers: PeerNames {
                direction: Direction::inbound,
                source_namespace: info.identity.as_ref().map_or("", |i| i.namespace.as_str()),
                source_workload: "",
                destination_namespace: &inputs.cfg.namespace,
                destination_service: "",
                destination_workload: &inputs.cfg.workload,
            }
            .to_owned(),
            tls: info.tls,
        };
        let mut app = match connect(inputs.app_addr).await {
            Ok(app) => app,
            Err(e) => {
                tracing::warn!(%peer, error = %e, "closing inbound TCP connection: the app is not reachable");
                return;
            }
        };
        inputs.metrics.tcp_opened(&labels);
        let (from_peer, to_peer) =
            match splice(&mut io, &mut app, inputs.cfg.limits.tcp_idle_timeout).await {
                Ended::Closed(from_peer, to_peer) => (from_peer, to_peer),
                Ended::Idle => {
                    inputs
                        .metrics
                        .conns
                        .closed_by_limit(Kind::inbound, Closed::tcp_idle);
                    (0, 0)
                }
            };
        inputs.metrics.tcp_closed(&labels, to_peer, from_peer);
    }
}

/// Who called whom, from the caller's verified identity, the workload
/// its proxy named (trusted only within the identity's namespace) and the
/// service it called; borrowed, so that a request allocates nothing here.
fn peers<'a>(
    inputs: &'a Inputs,
    info: &'a PeerInfo,
    claimed_source: Option<&'a http::HeaderValue>,
    destination: Option<&'a http::HeaderValue>,
) -> PeerNames<'a> {
    let (source_namespace, source_workload) = match &info.identity {
        Some(id) => (
            id.namespace.as_str(),
            claimed_source
                .and_then(|v| v.to_str().ok())
                .and_then(|c| c.split_once('/'))
                .filter(|(ns, _)| *ns == id.namespace)
                .map_or("", |(_, w)| w),
        ),
        None => ("", ""),
    };
    let (destination_namespace, destination_service) = destination
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.split_once('/'))
        .unwrap_or((inputs.cfg.namespace.as_str(), ""));
    PeerNames {
        direction: Direction::inbound,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_service,
        destination_workload: &inputs.cfg.workload,
    }
}

/// The header in which the app learns the caller's verified identity.
pub const PEER_IDENTITY: http::HeaderName =
    http::HeaderName::from_static("x-trellis-peer-identity");

/// Removes every header that claims an identity: only this proxy may say
/// who the caller is.
fn strip_identity_claims(headers: &mut http::HeaderMap) {
    let is_claim = |k: &http::HeaderName| {
        k.as_str().starts_with("x-trellis-") || k.as_str() == "x-forwarded-client-cert"
    };
    // The common request carries none: no allocation unless one is there.
    while let Some(k) = headers.keys().find(|k| is_claim(k)).cloned() {
        headers.remove(k);
    }
}

async fn handle(
    inputs: Arc<Inputs>,
    mut req: Request<Incoming>,
    info: Arc<PeerInfo>,
) -> Response<Body> {
    let in_flight = InFlight::new(&inputs.metrics);
    let begun = inputs
        .telemetry
        .begin(crate::metrics::Direction::inbound, &mut req);
    // Kept for the metrics labels (a header value clone shares its bytes);
    // the source workload is only a label, and the namespace comes from the
    // verified identity when there is one.
    let claimed_source = req.headers().get(SOURCE).cloned();
    let destination = req.headers().get(DESTINATION).cloned();
    let http1 = req.version() < Version::HTTP_2 || req.headers().contains_key(ORIG_PROTO);
    // The hop count, like every internal header, goes no further.
    let hops = crate::loops::check_hops(req.headers(), inputs.cfg.limits.max_hops);
    strip_identity_claims(req.headers_mut());
    let resp = match hops {
        Err(e) => Err(e),
        Ok(()) => match authorize(&inputs, &mut req, &info) {
            Some(refusal) => Ok(refusal),
            None if is_upgrade(&req) => match connect(inputs.app_addr).await {
                // Boxed: large, and rare (see `Endpoint::h2`).
                Ok(app) => {
                    Box::pin(forward_upgrade(
                        req,
                        app,
                        inputs.cfg.limits.tcp_idle_timeout,
                    ))
                    .await
                }
                Err(e) => Err(e),
            },
            None => forward_to_app(&inputs, req, http1).await,
        },
    };
    let mut resp = resp.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "inbound request failed");
        e.into_response()
    });
    inputs.telemetry.end(
        begun,
        crate::telemetry::Done {
            peers: peers(
                &inputs,
                &info,
                claimed_source.as_ref(),
                destination.as_ref(),
            ),
            route: "",
            tls: info.tls,
            peer_identity: &info.identity_uri,
        },
        &mut resp,
    );
    in_flight.hold(resp)
}

/// Normalises the path (the one used from here on), applies the
/// AuthorizationPolicies, and tells the app who is calling. Returns the
/// refusal, if the request may not go on.
fn authorize(
    inputs: &Inputs,
    req: &mut Request<Incoming>,
    info: &PeerInfo,
) -> Option<Response<Body>> {
    if let Err(e) = crate::normalize::normalize_uri(req) {
        return Some(e.into_response());
    }
    let snap = inputs.discovery.snapshot();
    let attrs = Attrs {
        peer: info.identity.as_ref(),
        method: Some(req.method().as_str()),
        path: Some(req.uri().path()),
        port: inputs.cfg.app_port,
        headers: Some(req.headers()),
    };
    if let Decision::Deny(why) = snap.authz.evaluate(&attrs) {
        inputs.metrics.authz_denied.inc();
        tracing::debug!(identity = ?info.identity.as_ref().map(|i| i.to_string()), path = %req.uri().path(), %why, "request denied");
        return Some(crate::http::text_response(
            http::StatusCode::FORBIDDEN,
            "RBAC: access denied\n",
        ));
    }
    if let Some(v) = &info.identity_header {
        req.headers_mut().insert(PEER_IDENTITY, v.clone());
    }
    None
}

async fn forward_to_app(
    inputs: &Inputs,
    req: Request<Incoming>,
    http1: bool,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    let idempotent = crate::traffic::is_idempotent(&parts.method);
    let fault = BodyFault::default();
    if !http1 {
        return forward_to_app_h2(inputs, parts, body, &fault, idempotent).await;
    }
    if parts.uri.authority().is_none() && !parts.headers.contains_key(http::header::HOST) {
        if let Ok(host) = http::HeaderValue::from_str(&inputs.app_addr.to_string()) {
            parts.headers.insert(http::header::HOST, host);
        }
    }
    let mut req = Request::from_parts(parts, request_body(body, &fault));
    crate::h1pool::origin_form(&mut req);
    let app = inputs.app_addr;
    let connect = || async move {
        crate::h1pool::connect_plain(app).await.map_err(|e| {
            tracing::debug!(%app, error = %e, "cannot connect to the app");
            ProxyError::upstream_connect(app, "the app is not accepting connections")
        })
    };
    let idle = &inputs.app_http1;
    let c = match idle.take(false) {
        Some(c) => c,
        // Boxed: rare, and large (see `Endpoint::h2`).
        None => Box::pin(connect()).await?,
    };
    match crate::h1pool::send(idle, c, req, connect).await {
        Ok(mut r) => {
            // Only this proxy says that a request reached no app.
            r.headers_mut().remove(crate::error::NOT_SENT);
            Ok(r)
        }
        Err(crate::h1pool::Failed::Connect(e)) => Err(e),
        Err(crate::h1pool::Failed::Send(_)) if fault.broke() => Err(ProxyError::bad_body()),
        Err(crate::h1pool::Failed::Send(e)) => {
            let unanswered = e.is_incomplete_message() || e.is_canceled();
            let mut err = ProxyError::upstream(e);
            // The app closed a kept-alive connection as the request went
            // out on it (an app shutting down closes idle ones): it did
            // not answer, and an idempotent request may go to another
            // endpoint.
            err.retry_safe = idempotent && unanswered;
            Err(err)
        }
    }
}

/// To the app over HTTP/2, for HTTP/2 callers: one connection per worker.
async fn forward_to_app_h2(
    inputs: &Inputs,
    mut parts: http::request::Parts,
    body: Incoming,
    fault: &BodyFault,
    idempotent: bool,
) -> Result<Response<Body>, ProxyError> {
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)?
                .to_str()
                .ok()
                .map(str::to_string)
        })
        .unwrap_or_else(|| inputs.app_addr.to_string());
    parts.uri = absolute_uri(&authority, &parts.uri)?;
    parts.version = Version::HTTP_2;
    let app = inputs.app_http2.get();
    let mut conn = match app.ready() {
        Some(c) => c,
        // Boxed: rare, and large (see `Endpoint::h2`).
        None => Box::pin(app.connect()).await.map_err(|e| {
            ProxyError::upstream_connect(
                inputs.app_addr,
                format!("the app is not accepting connections: {e}"),
            )
        })?,
    };
    match conn
        .send(Request::from_parts(parts, request_body(body, fault)))
        .await
    {
        Ok(mut r) => {
            r.headers_mut().remove(crate::error::NOT_SENT);
            Ok(r)
        }
        Err(_) if fault.broke() => Err(ProxyError::bad_body()),
        Err(e) => {
            // As over HTTP/1.1 (see `forward_to_app`); and a request the app
            // cannot have seen (see `peer_h2::SendError`) may go anywhere.
            let closed = e.error.is_go_away() || e.error.is_io();
            let mut err = ProxyError::upstream(&e);
            err.retry_safe = e.unprocessed || (idempotent && closed);
            Err(err)
        }
    }
}
