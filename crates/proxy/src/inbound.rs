//! Inbound: what peer proxies (and, as the mTLS mode allows, plain clients)
//! send to this workload. HTTP is served and forwarded to the local app on
//! loopback; anything else is spliced to the app as opaque TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, Version};
use hyper::body::Incoming;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::detect::{detect, Protocol};
use crate::endpoint::connect;
use crate::error::ProxyError;
use crate::http::{
    absolute_uri, boxed, forward_upgrade, is_upgrade, serve_connection, strip_hop_by_hop,
    DESTINATION, ORIG_PROTO, SOURCE,
};
use crate::inputs::Inputs;
use crate::metrics::{Direction, InFlight, Peers, TcpLabels};
use crate::Body;

/// Peers speak first; a client silent this long is treated as opaque TCP.
const DETECT_TIMEOUT: Duration = Duration::from_millis(500);

pub struct Inbound {
    listener: TcpListener,
    inputs: Arc<Inputs>,
}

impl Inbound {
    pub async fn new(inputs: Arc<Inputs>) -> anyhow::Result<Inbound> {
        let listener = crate::bind(inputs.cfg.inbound_addr, "inbound", "--inbound-addr").await?;
        Ok(Inbound { listener, inputs })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                accepted = self.listener.accept() => {
                    let Ok((tcp, peer)) = accepted else { continue };
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve(self.inputs.clone(), tcp, peer, shutdown.clone()));
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

async fn serve(
    inputs: Arc<Inputs>,
    tcp: TcpStream,
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
    match protocol {
        Protocol::Http1 | Protocol::Http2 => {
            serve_connection(io, shutdown, move |req| handle(inputs.clone(), req)).await;
        }
        Protocol::PeerTcp | Protocol::Opaque => {
            let mut io = io;
            let labels = TcpLabels {
                peers: peers(&inputs, None, None),
                tls: false,
            };
            let mut app = match connect(inputs.app_addr).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "closing inbound TCP connection: the app is not reachable");
                    return;
                }
            };
            inputs.metrics.tcp_opened(&labels);
            let (from_peer, to_peer) = tokio::io::copy_bidirectional(&mut io, &mut app)
                .await
                .unwrap_or((0, 0));
            inputs.metrics.tcp_closed(&labels, to_peer, from_peer);
        }
    }
}

fn peers(inputs: &Inputs, source: Option<&str>, destination: Option<&str>) -> Peers {
    let (source_namespace, source_workload) = source
        .and_then(|s| s.split_once('/'))
        .map(|(ns, w)| (ns.to_string(), w.to_string()))
        .unwrap_or_default();
    let (destination_namespace, destination_service) = destination
        .and_then(|s| s.split_once('/'))
        .map(|(ns, s)| (ns.to_string(), s.to_string()))
        .unwrap_or_else(|| (inputs.cfg.namespace.clone(), String::new()));
    Peers {
        direction: Direction::inbound,
        source_namespace,
        source_workload,
        destination_namespace,
        destination_service,
        destination_workload: inputs.cfg.workload.clone(),
    }
}

async fn handle(inputs: Arc<Inputs>, mut req: Request<Incoming>) -> Response<Body> {
    let _in_flight = InFlight::new(&inputs.metrics);
    let begun = inputs
        .telemetry
        .begin(crate::metrics::Direction::inbound, &mut req);
    let header = |req: &Request<Incoming>, h| {
        req.headers()
            .get(h)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
            .map(str::to_string)
    };
    let source = header(&req, SOURCE);
    let destination = header(&req, DESTINATION);
    let http1 = req.version() < Version::HTTP_2 || req.headers().contains_key(ORIG_PROTO);
    for h in crate::http::INTERNAL {
        req.headers_mut().remove(h);
    }
    let resp = if is_upgrade(&req) {
        forward_upgrade(req, inputs.app_addr).await
    } else {
        forward_to_app(&inputs, req, http1).await
    };
    let mut resp = resp.unwrap_or_else(|e| {
        tracing::debug!(error = %e, "inbound request failed");
        e.into_response()
    });
    inputs.telemetry.end(
        begun,
        crate::telemetry::Done {
            peers: &peers(&inputs, source.as_deref(), destination.as_deref()),
            route: "",
            tls: false,
            peer_identity: "",
        },
        &mut resp,
    );
    resp
}

async fn forward_to_app(
    inputs: &Inputs,
    req: Request<Incoming>,
    http1: bool,
) -> Result<Response<Body>, ProxyError> {
    let (mut parts, body) = req.into_parts();
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
    strip_hop_by_hop(&mut parts.headers, false);
    let client = if http1 {
        parts.version = Version::HTTP_11;
        parts.headers.remove(http::header::HOST);
        &inputs.app_http1
    } else {
        parts.version = Version::HTTP_2;
        &inputs.app_http2
    };
    client
        .request(Request::from_parts(parts, boxed(body)))
        .await
        .map(|r| r.map(boxed))
        .map_err(|e| {
            if e.is_connect() {
                ProxyError::upstream_connect(
                    inputs.app_addr,
                    "the app is not accepting connections",
                )
            } else {
                ProxyError::upstream(e)
            }
        })
}
