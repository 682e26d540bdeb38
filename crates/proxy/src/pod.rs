//! The pod contract: what the redirect rules (`trellis init`), the pods-mode
//! runner (`trellis up --mode pods`) and the sidecar (`trellis proxy
//! --transparent`) agree on inside a pod: the sidecar's ports, the mark of
//! its own sockets, and how the pod's DNS reaches the sidecar. One source,
//! so the rules, the runner and the proxy cannot drift apart.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The sidecar's admin port (`/ready`, `/metrics`): the rules never
/// redirect it, so the host reaches it on the pod's IP.
pub const ADMIN_PORT: u16 = 15000;
/// Where the rules send the app's outbound TCP.
pub const OUTBOUND_PORT: u16 = 15001;
/// Where the rules send TCP from other pods and hosts.
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's DNS server for service names (UDP and TCP).
pub const DNS_PORT: u16 = 15053;
/// DNS: the rules send this destination port to [`DNS_PORT`], whatever
/// the nameserver's address.
pub const NAMESERVER_PORT: u16 = 53;

/// Where the sidecar's DNS server listens: loopback, as only the pod's own
/// traffic is redirected to it.
pub const DNS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, DNS_PORT));

/// The mark of every socket the sidecar opens; the rules let marked
/// packets pass. A mark, unlike a uid, works when the app and the sidecar
/// run as the same user ("te11" in a hex-ish spelling; any value unused on
/// the host works).
pub const MARK: u32 = 0x7e11;

/// The host's resolver configuration.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// A pod's resolv.conf. Any nameserver works, since the rules send port 53
/// to the sidecar whatever the address; `nameserver` only has to be one the
/// pod routes, so that a resolver does not give up before sending.
pub fn resolv_conf(nameserver: Ipv4Addr) -> String {
    format!("# written by trellis up (pods mode)\nnameserver {nameserver}\n")
}

/// Where a sidecar forwards names outside the mesh: the host's
/// non-loopback nameservers (a loopback stub such as 127.0.0.53 is not
/// reachable from a pod's namespace). Empty when there is none.
pub fn host_nameservers() -> Vec<SocketAddr> {
    crate::dns::system_nameservers(&std::fs::read_to_string(RESOLV_CONF).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_names_the_nameserver() {
        let text = resolv_conf(Ipv4Addr::new(10, 200, 1, 1));
        assert_eq!(
            crate::dns::system_nameservers(&text),
            ["10.200.1.1:53".parse::<SocketAddr>().unwrap()]
        );
    }
}
