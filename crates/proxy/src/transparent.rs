//! Transparent interception (pods mode): the original destination of a
//! redirected connection (SO_ORIGINAL_DST), and the socket mark that the
//! redirect rules of `trellis init` use to let the proxy's own outbound
//! connections pass.
//!
//! The mark is process-wide: it is set once at start-up (`--mark`) and read
//! by every connect, so call sites need no extra argument. Its default,
//! and the ports the rules redirect to, are the pod contract in
//! [`crate::pod`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use socket2::SockRef;
use tokio::net::TcpStream;
use tokio::sync::watch;
use trellis_resource::Protocol;

use crate::inputs::Inputs;
use crate::listener::{Closed, Counted, Kind};
use crate::metrics::{Direction, Peers, TcpLabels};
use crate::outbound::Target;
use crate::snapshot::SvcKey;

/// `trellis proxy --transparent`: what pods mode adds to the proxy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// The mark of every socket the proxy opens, which the redirect rules
    /// let pass (it must match `trellis init --mark`).
    pub mark: u32,
    /// Where the DNS server for service names listens (UDP and TCP);
    /// omitted: no DNS server.
    pub dns_addr: Option<SocketAddr>,
    /// Nameservers for names outside the mesh; empty: the non-loopback
    /// nameservers of /etc/resolv.conf.
    #[serde(default)]
    pub dns_upstreams: Vec<SocketAddr>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mark: crate::pod::MARK,
            dns_addr: Some(crate::pod::DNS_ADDR),
            dns_upstreams: Vec::new(),
        }
    }
}

// 0 means "do not mark".
static MARK: AtomicU32 = AtomicU32::new(0);

/// Sets the mark for every outbound socket this process opens from now on.
pub fn set_mark(mark: u32) {
    MARK.store(mark, Ordering::Relaxed);
}

/// The mark outbound sockets get, if any.
pub fn mark() -> Option<u32> {
    match MARK.load(Ordering::Relaxed) {
        0 => None,
        m => Some(m),
    }
}

/// Marks a socket before it connects, so the redirect rules skip it.
/// Needs CAP_NET_ADMIN; the error says so.
pub fn mark_socket<'a>(socket: impl Into<SockRef<'a>>) -> std::io::Result<()> {
    let Some(m) = mark() else { return Ok(()) };
    socket.into().set_mark(m).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("cannot set socket mark {m:#x} (needs CAP_NET_ADMIN, i.e. root): {e}"),
        )
    })
}

/// Opens a TCP connection marked with the process's mark (if any).
pub async fn connect_marked(addr: SocketAddr) -> std::io::Result<tokio::net::TcpStream> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    mark_socket(&socket)?;
    socket.connect(addr).await
}

/// Where a redirected connection was headed before the NAT rule sent it to
/// us. `None` for a connection that was not redirected (its original
/// destination is the listener itself) or when the kernel has no record.
pub fn original_dst(tcp: &tokio::net::TcpStream) -> Option<SocketAddr> {
    let sock = SockRef::from(tcp);
    let orig = if tcp.local_addr().ok()?.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    }
    .ok()?
    .as_socket()?;
    if Some(orig) == tcp.local_addr().ok() {
        return None;
    }
    Some(orig)
}

#[derive(Debug, thiserror::Error)]
pub enum TransparentError {
    #[error("--transparent: {0}")]
    Mark(std::io::Error),
    #[error(transparent)]
    Dns(#[from] crate::dns::DnsError),
}

/// Pods mode at start-up: marks this process's sockets and binds the DNS
/// server (started by the caller once the proxy is ready).
pub async fn start(
    cfg: &crate::ProxyConfig,
) -> Result<Option<crate::dns::DnsServer>, TransparentError> {
    let Some(t) = &cfg.transparent else {
        return Ok(None);
    };
    set_mark(t.mark);
    // Fail now, not on the first connection, when marking is not allowed.
    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
        .and_then(|probe| mark_socket(&probe))
        .map_err(TransparentError::Mark)?;
    let Some(addr) = t.dns_addr else {
        return Ok(None);
    };
    Ok(Some(
        crate::dns::DnsServer::new(addr, t.dns_upstreams.clone()).await?,
    ))
}

/// The mesh service whose VIP is `ip`, among those this proxy knows (its
/// app resolved the name through this proxy's DNS server, which subscribed
/// to it), and the protocol `port` is declared with, if any.
pub fn service_of_vip(
    inputs: &Inputs,
    ip: IpAddr,
    port: u16,
) -> Option<(SvcKey, Option<Protocol>)> {
    let snap = inputs.discovery.snapshot();
    let sc = snap
        .raw
        .services
        .iter()
        .find(|s| s.vip.parse::<IpAddr>().ok() == Some(ip))?;
    let key = SvcKey::new(&sc.namespace, &sc.name);
    let declared = snap.service(&key).and_then(|svc| {
        svc.spec
            .ports
            .iter()
            .find(|p| p.port == port)
            .and_then(|p| p.protocol)
    });
    Some((key, declared))
}

/// A connection the redirect rules sent to the outbound listener: to a
/// service VIP it is routed like an `--upstream` connection (HTTP detected
/// and routed per request, else opaque TCP; ports declared `protocol: tcp`
/// or HTTP skip detection: a pooled HTTP connection may stay silent past
/// the detection timeout, and must not become an opaque tunnel to one
/// endpoint); to any other address it passes through unchanged.
pub async fn serve_outbound(
    inputs: Arc<Inputs>,
    tcp: Counted<TcpStream>,
    orig: SocketAddr,
    shutdown: watch::Receiver<bool>,
) {
    match service_of_vip(&inputs, orig.ip(), orig.port()) {
        Some((key, declared)) => {
            let target = Target {
                host: format!("{}.{}.svc", key.name, key.namespace),
                port: orig.port(),
            };
            match declared {
                Some(Protocol::Tcp) => crate::outbound::tcp_to(inputs, tcp, target).await,
                Some(_) => crate::outbound::serve_http(inputs, tcp, target, shutdown).await,
                None => {
                    crate::outbound::serve_fixed(inputs, tcp, target, Kind::outbound, shutdown)
                        .await
                }
            }
        }
        None => passthrough(inputs, tcp, orig).await,
    }
}

/// Inbound, pods mode: the redirect rules send every inbound port to the
/// inbound listener; a connection whose original destination port is not
/// the app's (nor the listener's own, where peer proxies connect) is for a
/// port nothing serves, and is closed as the kernel would refuse it.
pub fn inbound_wanted(inputs: &Inputs, tcp: &TcpStream, peer: SocketAddr) -> bool {
    if inputs.cfg.transparent.is_none() {
        return true;
    }
    match original_dst(tcp) {
        Some(orig) if orig.port() != inputs.cfg.app_port => {
            tracing::debug!(%peer, %orig, app_port = inputs.cfg.app_port, "closed an inbound connection for a port the app does not serve");
            false
        }
        _ => true,
    }
}

/// Egress: a marked connection to where the app was going (never one of
/// this proxy's own listeners).
async fn passthrough(inputs: Arc<Inputs>, mut tcp: Counted<TcpStream>, orig: SocketAddr) {
    if let Err(e) = inputs.own.check(&orig.to_string(), orig) {
        tracing::warn!(%orig, "closing a redirected connection: {e}");
        return;
    }
    let connect_timeout = inputs.cfg.limits.connect_timeout;
    let up = tokio::time::timeout(connect_timeout, connect_marked(orig)).await;
    let mut up = match up {
        Ok(Ok(up)) => up,
        Ok(Err(e)) => {
            tracing::debug!(%orig, error = %e, "egress connection failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%orig, "egress connection timed out");
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let labels = TcpLabels {
        peers: Peers {
            direction: Direction::outbound,
            source_namespace: inputs.cfg.namespace.clone(),
            source_workload: inputs.cfg.workload.clone(),
            destination_namespace: String::new(),
            destination_service: orig.ip().to_string(),
            destination_workload: String::new(),
        },
        tls: false,
    };
    inputs.metrics.tcp_opened(&labels);
    let idle = inputs.cfg.limits.tcp_idle_timeout;
    let (sent, received) = match crate::splice::splice(&mut tcp, &mut up, idle).await {
        crate::splice::Ended::Closed(sent, received) => (sent, received),
        crate::splice::Ended::Idle => {
            inputs
                .metrics
                .conns
                .closed_by_limit(Kind::outbound, Closed::tcp_idle);
            (0, 0)
        }
    };
    inputs.metrics.tcp_closed(&labels, sent, received);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_direct_connection_has_no_original_destination() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(connect_marked(addr), l.accept());
        let _c = c.unwrap();
        let (s, _) = s.unwrap();
        // Without a NAT rule the kernel has no conntrack entry to report,
        // or reports the listener itself: either way, not redirected.
        assert_eq!(original_dst(&s), None);
    }
}
