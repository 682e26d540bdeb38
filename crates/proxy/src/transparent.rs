//! Transparent interception (pods mode): the original destination of a
//! redirected connection (SO_ORIGINAL_DST), and the socket mark that the
//! redirect rules of `trellis init` use to let the proxy's own outbound
//! connections pass.
//!
//! The mark is process-wide: it is set once at start-up (`--mark`) and read
//! by every connect, so call sites need no extra argument.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};

use socket2::SockRef;

/// The mark `trellis init` excludes and `trellis proxy --transparent` sets
/// by default ("te11" in a hex-ish spelling; any value unused on the host
/// works).
pub const DEFAULT_MARK: u32 = 0x7e11;

/// Default ports the redirect rules send traffic to.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PORT: u16 = 15006;
pub const DNS_PORT: u16 = 15053;
pub const ADMIN_PORT: u16 = 15000;

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
