//! Loops: a request whose target is one of this proxy's own listeners
//! (it would come back to the proxy, and again, without end), and loops
//! through other proxies, which the hop count `x-trellis-hops` ends.
//!
//! The own-listener check runs where the proxy would open a connection to
//! an address outside the mesh (egress, CONNECT, pods-mode pass-through):
//! on the addresses the target resolves to, so a name, `localhost`, and
//! any local address of a listener bound to `0.0.0.0` are caught alike. A
//! mesh Service called by name is never a loop here, even one named
//! `localhost`: the mesh decides where it goes.

use std::future::Future;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::ProxyConfig;
use crate::error::{ProxyError, Source};

/// How many proxies a request has passed through: outbound proxies add
/// one, the inbound proxy checks it (and, as every internal header, keeps
/// it from the app).
pub const HOPS: HeaderName = HeaderName::from_static("x-trellis-hops");

#[derive(Debug, thiserror::Error)]
pub enum EgressError {
    #[error("{target} is this proxy's own {listener} listener ({addr}): a request sent there would come back here without end; call a service by its name, or an address outside this proxy")]
    Loop {
        target: String,
        listener: &'static str,
        addr: SocketAddr,
    },
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("{host} resolves to no address")]
    NoAddress { host: String },
    #[error(transparent)]
    Connect(ProxyError),
}

impl EgressError {
    /// The caller's answer: 508 for a loop (the request is at fault), 502
    /// for the rest.
    pub fn to_proxy_error(&self) -> ProxyError {
        match self {
            EgressError::Loop { .. } => ProxyError::new(
                StatusCode::LOOP_DETECTED,
                Source::Downstream,
                self.to_string(),
            ),
            EgressError::Connect(e) => ProxyError {
                message: e.message.clone(),
                ..ProxyError::new(e.status, e.source, "")
            },
            other => ProxyError::new(StatusCode::BAD_GATEWAY, Source::Upstream, other.to_string()),
        }
    }

    /// The egress error in an HTTP client's error chain, if there is one.
    pub fn find<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a EgressError> {
        let mut cur = Some(e);
        while let Some(err) = cur {
            if let Some(found) = err.downcast_ref::<EgressError>() {
                return Some(found);
            }
            cur = err.source();
        }
        None
    }
}

/// The addresses this proxy listens on.
#[derive(Clone, Debug, Default)]
pub struct Own {
    listeners: Vec<(SocketAddr, &'static str)>,
}

impl Own {
    /// From a config whose addresses are the bound ones.
    pub fn new(cfg: &ProxyConfig) -> Own {
        let mut listeners = vec![
            (cfg.inbound_addr, "inbound"),
            (cfg.outbound_addr, "outbound"),
            (cfg.admin_addr, "admin"),
        ];
        listeners.extend(cfg.upstreams.iter().map(|u| (u.listen, "--upstream")));
        if let Some(dns) = cfg.transparent.as_ref().and_then(|t| t.dns_addr) {
            listeners.push((dns, "DNS"));
        }
        Own { listeners }
    }

    /// The own listener at `addr`, if there is one: the same port, and the
    /// listener's address or, for one bound to all addresses, any address
    /// of this host.
    pub fn listener_at(&self, addr: SocketAddr) -> Option<(SocketAddr, &'static str)> {
        let ip = addr.ip().to_canonical();
        self.listeners.iter().copied().find(|(l, _)| {
            l.port() == addr.port()
                && (l.ip().to_canonical() == ip || (l.ip().is_unspecified() && is_local(ip)))
        })
    }

    /// Err(Loop) when `addr` is an own listener.
    pub fn check(&self, target: &str, addr: SocketAddr) -> Result<(), EgressError> {
        match self.listener_at(addr) {
            Some((_, listener)) => Err(EgressError::Loop {
                target: target.to_string(),
                listener,
                addr,
            }),
            None => Ok(()),
        }
    }

    /// The addresses of `host:port`, none of them an own listener.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, EgressError> {
        let target = format!("{host}:{port}");
        let addrs: Vec<SocketAddr> = match host.trim_matches(['[', ']']).parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::time::timeout(timeout, tokio::net::lookup_host((host, port)))
                .await
                .map_err(|_| EgressError::Resolve {
                    host: host.to_string(),
                    reason: "timed out".into(),
                })?
                .map_err(|e| EgressError::Resolve {
                    host: host.to_string(),
                    reason: e.to_string(),
                })?
                .collect(),
        };
        // Any own address is a loop: which of them a connection would
        // take is not up to the caller.
        for a in &addrs {
            self.check(&target, *a)?;
        }
        if addrs.is_empty() {
            return Err(EgressError::NoAddress {
                host: host.to_string(),
            });
        }
        Ok(addrs)
    }

    /// A TCP connection to `host:port` outside the mesh: the first of its
    /// addresses that answers.
    pub async fn connect(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<TcpStream, EgressError> {
        let mut last = None;
        for addr in self.resolve(host, port, timeout).await? {
            match crate::endpoint::connect(addr).await {
                Ok(tcp) => return Ok(tcp),
                Err(e) => last = Some(e),
            }
        }
        Err(EgressError::Connect(
            last.expect("resolve gives an address"),
        ))
    }
}

/// Whether `ip` is an address of this host.
fn is_local(ip: IpAddr) -> bool {
    // Binding succeeds only for an address the host has (EADDRNOTAVAIL
    // otherwise); it sends nothing.
    ip.is_loopback() || ip.is_unspecified() || UdpSocket::bind((ip, 0)).is_ok()
}

/// The hop count of a request arriving at an outbound listener: the value
/// to send on, or 508 when it has passed `max` proxies already.
pub fn next_hop(headers: &HeaderMap, max: u32) -> Result<HeaderValue, ProxyError> {
    let n = hops(headers);
    if n >= max {
        return Err(too_many(n, max));
    }
    Ok(HeaderValue::from(n + 1))
}

/// At the inbound listener: 508 past `max`.
pub fn check_hops(headers: &HeaderMap, max: u32) -> Result<(), ProxyError> {
    let n = hops(headers);
    if n > max {
        return Err(too_many(n, max));
    }
    Ok(())
}

fn hops(headers: &HeaderMap) -> u32 {
    headers
        .get(HOPS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
        // A count no proxy could have written: take it as the limit, so a
        // loop cannot hide behind it.
        .unwrap_or(if headers.contains_key(HOPS) {
            u32::MAX
        } else {
            0
        })
}

fn too_many(n: u32, max: u32) -> ProxyError {
    ProxyError::new(
        StatusCode::LOOP_DETECTED,
        Source::Downstream,
        format!("this request has passed through {n} proxies (x-trellis-hops), the most --max-hops ({max}) allows: it is probably going round in a loop; check where the services and addresses it was sent to lead"),
    )
}

/// The egress HTTP client's connector: resolves the target itself, refuses
/// this proxy's own listeners, and connects within the connect timeout
/// (marked in pods mode, as every connection the proxy makes).
#[derive(Clone)]
pub struct EgressConnector {
    pub own: Arc<Own>,
    pub timeout: Duration,
}

impl tower::Service<Uri> for EgressConnector {
    type Response = TokioIo<TcpStream>;
    type Error = EgressError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, EgressError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (own, timeout) = (self.own.clone(), self.timeout);
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            own.connect(&host, port, timeout).await.map(TokioIo::new)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(inbound: &str, outbound: &str) -> Own {
        let mut cfg = ProxyConfig::new("127.0.0.1:1", "w", 1);
        cfg.inbound_addr = inbound.parse().unwrap();
        cfg.outbound_addr = outbound.parse().unwrap();
        cfg.admin_addr = "127.0.0.1:15000".parse().unwrap();
        Own::new(&cfg)
    }

    #[test]
    fn own_listeners_are_found_at_every_local_address() {
        let own = own("0.0.0.0:15006", "127.0.0.1:15001");
        let at = |a: &str| own.listener_at(a.parse().unwrap()).map(|(_, l)| l);
        assert_eq!(at("127.0.0.1:15001"), Some("outbound"));
        assert_eq!(
            at("127.0.0.2:15001"),
            None,
            "outbound is bound to 127.0.0.1 only"
        );
        assert_eq!(at("127.0.0.2:15006"), Some("inbound"));
        assert_eq!(at("0.0.0.0:15006"), Some("inbound"));
        assert_eq!(at("[::ffff:127.0.0.1]:15001"), Some("outbound"));
        assert_eq!(at("127.0.0.1:15000"), Some("admin"));
        assert_eq!(at("127.0.0.1:8080"), None);
        // TEST-NET-1: no host has it.
        assert_eq!(at("192.0.2.1:15006"), None);
    }

    #[tokio::test]
    async fn a_name_for_an_own_listener_is_a_loop() {
        let own = own("0.0.0.0:15006", "127.0.0.1:15001");
        let t = Duration::from_secs(3);
        let err = own.resolve("localhost", 15001, t).await.unwrap_err();
        assert!(
            matches!(
                err,
                EgressError::Loop {
                    listener: "outbound",
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.to_proxy_error().status, StatusCode::LOOP_DETECTED);
        assert!(own.resolve("127.0.0.1", 8080, t).await.is_ok());
        assert!(own.resolve("[::1]", 15006, t).await.is_err());
    }

    #[test]
    fn hops_count_up_to_the_limit() {
        let mut h = HeaderMap::new();
        assert_eq!(next_hop(&h, 3).unwrap(), "1");
        h.insert(HOPS, HeaderValue::from(2));
        assert_eq!(next_hop(&h, 3).unwrap(), "3");
        h.insert(HOPS, HeaderValue::from(3));
        let e = next_hop(&h, 3).unwrap_err();
        assert_eq!(e.status, StatusCode::LOOP_DETECTED);
        assert!(
            check_hops(&h, 3).is_ok(),
            "the inbound takes what an outbound sent"
        );
        h.insert(HOPS, HeaderValue::from_static("lots"));
        assert!(next_hop(&h, 3).is_err() && check_hops(&h, 3).is_err());
    }
}
