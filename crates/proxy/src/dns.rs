//! The sidecar's DNS server (pods mode, port 15053, UDP and TCP): mesh
//! service names get the service's VIP; every other name is answered from
//! /etc/hosts, else by the upstream nameservers.
//!
//! - `NAME`, `NAME.NAMESPACE`, `NAME.NAMESPACE.svc`, `NAME.NAMESPACE.svc.<trustDomain>`
//!   → A VIP (TTL 5 s); AAAA and other types → an empty NOERROR answer, so
//!   clients fall back to the A record instead of failing.
//! - a `NAME`/`.svc` name that is no service, with no upstream to ask → NXDOMAIN.
//!
//! Resolving a name subscribes to the service (as the outbound proxy does
//! on first use), so the outbound listener then knows its VIP.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name as DnsName, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::watch;

use crate::discovery::Lookup;
use crate::inputs::Inputs;
use crate::listener::{self, BindError, Kind};
use crate::names::{classify, Name};

/// TTL of answers for mesh names: short, since VIPs are stable anyway.
const MESH_TTL: u32 = 5;
const HOSTS_TTL: u32 = 30;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client gets this long for each message.
const TCP_IDLE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS port {0} is taken: is another proxy running in this namespace? choose another with --dns-addr")]
    Taken(SocketAddr),
    #[error("cannot bind the DNS server on {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
    #[error(transparent)]
    Tcp(#[from] BindError),
}

pub struct DnsServer {
    udp: UdpSocket,
    tcp: TcpListener,
    upstreams: Vec<SocketAddr>,
}

/// What answers a query; shared by the UDP and TCP listeners.
pub struct Resolver {
    inputs: Arc<Inputs>,
    upstreams: Vec<SocketAddr>,
    hosts_file: std::path::PathBuf,
}

impl DnsServer {
    /// Binds UDP and TCP on `addr` (a conflict is a start-up error).
    pub async fn new(addr: SocketAddr, upstreams: Vec<SocketAddr>) -> Result<DnsServer, DnsError> {
        let err = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::AddrInUse {
                DnsError::Taken(addr)
            } else {
                DnsError::Bind(addr, e)
            }
        };
        let udp = UdpSocket::bind(addr).await.map_err(err)?;
        let addr = udp.local_addr().map_err(err)?;
        let tcp = listener::bind(addr, Kind::dns).await?;
        let upstreams = if upstreams.is_empty() {
            crate::pod::host_nameservers()
        } else {
            upstreams
        };
        tracing::info!(%addr, ?upstreams, "DNS server for service names");
        Ok(DnsServer {
            udp,
            tcp,
            upstreams,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.udp.local_addr().expect("bound socket has an address")
    }

    pub async fn run(self, inputs: Arc<Inputs>, shutdown: watch::Receiver<bool>) {
        let errors = inputs.metrics.accept_errors.clone();
        let resolver = Arc::new(Resolver {
            inputs,
            upstreams: self.upstreams,
            hosts_file: "/etc/hosts".into(),
        });
        let tcp_resolver = resolver.clone();
        let tcp = listener::serve(
            self.tcp,
            Kind::dns,
            errors,
            shutdown.clone(),
            move |tcp, _| {
                tokio::spawn(serve_tcp(tcp_resolver.clone(), tcp));
            },
        );
        tokio::join!(tcp, serve_udp(Arc::new(self.udp), resolver, shutdown));
    }
}

/// DNS over UDP: each query is answered in its own task.
async fn serve_udp(
    udp: Arc<UdpSocket>,
    resolver: Arc<Resolver>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            got = udp.recv_from(&mut buf) => {
                let Ok((n, peer)) = got else { continue };
                let query = buf[..n].to_vec();
                let (udp, resolver) = (udp.clone(), resolver.clone());
                tokio::spawn(async move {
                    if let Some(answer) = resolver.answer(&query).await {
                        let _ = udp.send_to(&answer, peer).await;
                    }
                });
            }
            _ = shutdown.changed() => return,
        }
    }
}

/// DNS over TCP: 2-byte length-prefixed messages until the client is done.
async fn serve_tcp(resolver: Arc<Resolver>, mut tcp: tokio::net::TcpStream) {
    loop {
        let mut len = [0u8; 2];
        let read = async {
            tcp.read_exact(&mut len).await?;
            let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
            tcp.read_exact(&mut q).await?;
            Ok::<_, std::io::Error>(q)
        };
        let Ok(Ok(query)) = tokio::time::timeout(TCP_IDLE, read).await else {
            return;
        };
        let Some(answer) = resolver.answer(&query).await else {
            return;
        };
        let mut out = (answer.len() as u16).to_be_bytes().to_vec();
        out.extend(answer);
        if tcp.write_all(&out).await.is_err() {
            return;
        }
    }
}

impl Resolver {
    /// The answer to one query message; `None` for garbage (dropped).
    pub async fn answer(&self, query: &[u8]) -> Option<Vec<u8>> {
        let msg = Message::from_vec(query).ok()?;
        if msg.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut resp = Message::response(msg.metadata.id, msg.metadata.op_code);
        resp.metadata.recursion_desired = msg.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        let Some(q) = msg.queries.first().cloned() else {
            resp.metadata.response_code = ResponseCode::FormErr;
            return resp.to_vec().ok();
        };
        resp.add_query(q.clone());
        if msg.metadata.op_code != OpCode::Query {
            resp.metadata.response_code = ResponseCode::NotImp;
            return resp.to_vec().ok();
        }
        let name = q
            .name()
            .to_ascii()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let qtype = q.query_type();
        match self.mesh(&name).await {
            Mesh::Vip(vip) => {
                if qtype == RecordType::A {
                    resp.add_answer(Record::from_rdata(
                        q.name().clone(),
                        MESH_TTL,
                        RData::A(A(vip)),
                    ));
                }
                return resp.to_vec().ok();
            }
            Mesh::Outside => {}
            // The mesh is authoritative for its name forms (`NAME`, `.svc`):
            // no upstream is asked, so a typo fails fast with NXDOMAIN.
            Mesh::NoSuchService => {
                if hosts_lookup(&self.read_hosts(), &name).is_empty() {
                    resp.metadata.response_code = ResponseCode::NXDomain;
                    return resp.to_vec().ok();
                }
            }
        }
        let from_hosts = hosts_lookup(&self.read_hosts(), &name);
        if !from_hosts.is_empty() {
            for ip in from_hosts {
                let rdata = match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                resp.add_answer(Record::from_rdata(q.name().clone(), HOSTS_TTL, rdata));
            }
            return resp.to_vec().ok();
        }
        if self.upstreams.is_empty() {
            resp.metadata.response_code = ResponseCode::NXDomain;
            return resp.to_vec().ok();
        }
        match self.forward(query).await {
            Some(answer) => Some(answer),
            None => {
                resp.metadata.response_code = ResponseCode::ServFail;
                resp.to_vec().ok()
            }
        }
    }

    async fn mesh(&self, name: &str) -> Mesh {
        let (namespace, trust_domain) = {
            let snap = self.inputs.discovery.snapshot();
            (
                self.inputs.cfg.namespace.clone(),
                snap.mesh.trust_domain.clone(),
            )
        };
        let key = match classify(name, &namespace, &trust_domain) {
            Name::Mesh(k) | Name::Maybe(k) => k,
            Name::External => return Mesh::Outside,
        };
        // `localhost` and friends are never services.
        if name == "localhost" {
            return Mesh::Outside;
        }
        match self.inputs.discovery.resolve(&key).await {
            Lookup::Found(_) => {
                let snap = self.inputs.discovery.snapshot();
                let vip = snap
                    .raw
                    .services
                    .iter()
                    .find(|s| s.namespace == key.namespace && s.name == key.name)
                    .and_then(|s| s.vip.parse::<Ipv4Addr>().ok());
                match vip {
                    Some(v) => Mesh::Vip(v),
                    None => {
                        tracing::warn!(service = %key, "the control plane sent no VIP for this service");
                        Mesh::Outside
                    }
                }
            }
            _ if matches!(classify(name, &namespace, &trust_domain), Name::Maybe(_)) => {
                Mesh::Outside
            }
            _ => Mesh::NoSuchService,
        }
    }

    fn read_hosts(&self) -> String {
        std::fs::read_to_string(&self.hosts_file).unwrap_or_default()
    }

    /// Asks each upstream in turn over UDP from a marked socket (so the
    /// redirect rules let it out); returns the first answer as is.
    async fn forward(&self, query: &[u8]) -> Option<Vec<u8>> {
        forward(&self.upstreams, query).await
    }
}

/// Asks each upstream in turn over UDP from a marked socket; the first
/// answer is returned as is.
pub async fn forward(upstreams: &[SocketAddr], query: &[u8]) -> Option<Vec<u8>> {
    for up in upstreams {
        let r = tokio::time::timeout(UPSTREAM_TIMEOUT, async {
            let sock = marked_udp(up)?;
            sock.send_to(query, up).await?;
            let mut buf = vec![0u8; 4096];
            loop {
                let (n, from) = sock.recv_from(&mut buf).await?;
                if from == *up && n >= 2 && buf[..2] == query[..2] {
                    buf.truncate(n);
                    return Ok::<_, std::io::Error>(buf);
                }
            }
        })
        .await;
        match r {
            Ok(Ok(answer)) => return Some(answer),
            Ok(Err(e)) => tracing::debug!(upstream = %up, error = %e, "DNS upstream failed"),
            Err(_) => tracing::debug!(upstream = %up, "DNS upstream timed out"),
        }
    }
    None
}

enum Mesh {
    Vip(Ipv4Addr),
    Outside,
    NoSuchService,
}

fn marked_udp(to: &SocketAddr) -> std::io::Result<UdpSocket> {
    let domain = if to.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    crate::transparent::mark_socket(&s)?;
    s.set_nonblocking(true)?;
    let any: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    s.bind(&any.into())?;
    UdpSocket::from_std(s.into())
}

/// The non-loopback `nameserver` lines of a resolv.conf (a loopback
/// resolver such as 127.0.0.53 is not reachable from a pod's namespace).
pub fn system_nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// The addresses /etc/hosts gives `name` (case-insensitive).
pub fn hosts_lookup(hosts: &str, name: &str) -> Vec<IpAddr> {
    hosts
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ip = f.next()?.parse::<IpAddr>().ok()?;
            f.any(|n| n.trim_end_matches('.').eq_ignore_ascii_case(name))
                .then_some(ip)
        })
        .collect()
}

/// Builds a query message (for tests and `trellis check`-style probes).
pub fn query(name: &str, qtype: RecordType) -> Vec<u8> {
    let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    let n = DnsName::from_ascii(format!("{}.", name.trim_end_matches('.'))).expect("valid name");
    m.add_query(hickory_proto::op::Query::query(n, qtype));
    m.to_vec().expect("encodable query")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_skips_loopback_nameservers() {
        let r = "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nsearch example\nnameserver ::1\nnameserver 2001:db8::1\n";
        assert_eq!(
            system_nameservers(r),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn hosts_file_lookup() {
        let h = "127.0.0.1 localhost\n::1 localhost ip6-localhost\n10.1.2.3 db.example db # comment\n# 10.9.9.9 gone\n";
        assert_eq!(
            hosts_lookup(h, "DB"),
            vec!["10.1.2.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(hosts_lookup(h, "localhost").len(), 2);
        assert!(hosts_lookup(h, "gone").is_empty());
    }

    #[tokio::test]
    async fn forwards_to_the_first_upstream_that_answers() {
        // A fake upstream that echoes the query back as a NOERROR answer.
        let up = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let up_addr = up.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            let (n, peer) = up.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_query(q.queries[0].clone());
            r.add_answer(Record::from_rdata(
                q.queries[0].name().clone(),
                60,
                RData::A(A(Ipv4Addr::new(192, 0, 2, 7))),
            ));
            up.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
        });
        // A dead upstream first: it is skipped after its timeout.
        let dead = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let q = query("www.example.com", RecordType::A);
        let answer = forward(&[dead.local_addr().unwrap(), up_addr], &q)
            .await
            .expect("an answer");
        let m = Message::from_vec(&answer).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.answers.len(), 1);
        assert!(forward(&[dead.local_addr().unwrap()], &q).await.is_none());
    }

    #[test]
    fn queries_round_trip_through_the_wire_format() {
        let q = query("catalog", RecordType::A);
        let m = Message::from_vec(&q).unwrap();
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.queries[0].name().to_ascii(), "catalog.");
        assert_eq!(m.queries[0].query_type(), RecordType::A);
    }
}
