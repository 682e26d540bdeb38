//! The limits and timeouts the proxy holds every client and peer to: one
//! plain struct with safe defaults, each value settable by a flag and
//! listed with what a peer sees in docs/security.md ("Limits").
//!
//! Header limits are the same on every hop: the first hop (the outbound
//! and `--upstream` listeners, the admin server) holds the app's request
//! to them exactly; the inbound listener, which also takes what peer
//! proxies add, allows `PEER_HEADER_ALLOWANCE` more, so a request that
//! passes the first hop passes the second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::HeaderMap;
use serde::{Deserialize, Serialize};

/// What a proxy adds to a request on its way to a peer (its internal
/// headers, trace context, the hop count, and a route's header filters),
/// on top of the app's headers: the inbound listener allows this much
/// more than the first hop.
pub const PEER_HEADER_ALLOWANCE_BYTES: u32 = 8 * 1024;
pub const PEER_HEADER_ALLOWANCE_COUNT: usize = 16;

/// `--connect-timeout`, for every connection the proxy opens: one value
/// per process (set at start), as the socket mark is.
static CONNECT_TIMEOUT_MS: AtomicU64 = AtomicU64::new(3000);

pub fn set_connect_timeout(d: Duration) {
    CONNECT_TIMEOUT_MS.store(d.as_millis().max(1) as u64, Ordering::Relaxed);
}

pub fn connect_timeout() -> Duration {
    Duration::from_millis(CONNECT_TIMEOUT_MS.load(Ordering::Relaxed))
}

/// How HTTP/2 counts a header's size (RFC 9113 §6.5.2): name, value and
/// 32 bytes of overhead. HTTP/1 headers are counted the same way, so one
/// limit means the same on both.
pub const HEADER_OVERHEAD: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum LimitsError {
    #[error("{flag} must be more than zero")]
    Zero { flag: &'static str },
    #[error("--max-request-headers-kb {0} is too large: at most 4096 (4 MiB)")]
    HeadersTooLarge(u32),
}

/// Limits of `trellis proxy` (flags in brackets; defaults in
/// `Limits::default`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// A new connection's first request, and any HTTP/1 request once its
    /// first byte arrived, must have sent its whole header within this
    /// (`--header-read-timeout`); else the connection is closed, with a
    /// 408 when part of a request came.
    #[serde(with = "crate::config::secs")]
    pub header_read_timeout: Duration,
    /// An HTTP/1 keep-alive connection with no request in flight is closed
    /// after this (`--http1-idle-timeout`).
    #[serde(with = "crate::config::secs")]
    pub http1_idle_timeout: Duration,
    /// An HTTP/2 connection with no stream open is sent GOAWAY after this
    /// (`--http2-idle-timeout`).
    #[serde(with = "crate::config::secs")]
    pub http2_idle_timeout: Duration,
    /// HTTP/2 PINGs find dead peers: sent this often
    /// (`--http2-keepalive-interval`), the connection is closed when one
    /// is not answered within `http2_keepalive_timeout`
    /// (`--http2-keepalive-timeout`).
    #[serde(with = "crate::config::secs")]
    pub http2_keepalive_interval: Duration,
    #[serde(with = "crate::config::secs")]
    pub http2_keepalive_timeout: Duration,
    /// Connections each listener holds at once; more are closed at once
    /// and counted (`--max-connections`).
    pub max_connections: usize,
    /// Streams one HTTP/2 client may have open at once
    /// (`--http2-max-concurrent-streams`).
    pub http2_max_concurrent_streams: u32,
    /// Streams a client may reset before the proxy has even taken them
    /// (a burst of HEADERS+RST_STREAM); past it, GOAWAY
    /// (`--http2-max-pending-accept-reset-streams`).
    pub http2_max_pending_accept_reset_streams: usize,
    /// Premature resets: once this many streams have ended on a
    /// connection, and more than half of them were reset by the client
    /// within a second of opening (before or just after their answer),
    /// the connection is sent GOAWAY and closed
    /// (`--http2-reset-flood-streams`; counted in windows of this many).
    pub http2_reset_flood_streams: u32,
    /// A request's headers, counted as HTTP/2 does (name + value + 32 per
    /// header), in KiB (`--max-request-headers-kb`).
    pub max_request_headers_kb: u32,
    /// How many headers a request may carry (`--max-request-headers`).
    pub max_request_headers: usize,
    /// How many proxies a request may pass through (`x-trellis-hops`)
    /// before it is refused with 508 (`--max-hops`).
    pub max_hops: u32,
    /// Connecting to a peer, the app or a host outside the mesh
    /// (`--connect-timeout`).
    #[serde(with = "crate::config::secs")]
    pub connect_timeout: Duration,
    /// A call outside the mesh must have its response headers within this
    /// (`--egress-request-timeout`).
    #[serde(with = "crate::config::secs")]
    pub egress_request_timeout: Duration,
    /// An opaque TCP connection (a CONNECT tunnel, `protocol: tcp`,
    /// pass-through, an upgrade) that carries no byte either way for this
    /// long is closed (`--tcp-idle-timeout`).
    #[serde(with = "crate::config::secs")]
    pub tcp_idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            http1_idle_timeout: Duration::from_secs(300),
            http2_idle_timeout: Duration::from_secs(3600),
            http2_keepalive_interval: Duration::from_secs(20),
            http2_keepalive_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            // Envoy's default since 1.36.
            http2_max_concurrent_streams: 1024,
            // hyper's and linkerd2-proxy's.
            http2_max_pending_accept_reset_streams: 20,
            // Envoy's premature-reset rule (overload.premature_reset_total_stream_count).
            http2_reset_flood_streams: 500,
            // Envoy's max_request_headers_kb and max_headers_count.
            max_request_headers_kb: 60,
            max_request_headers: 100,
            max_hops: 16,
            connect_timeout: Duration::from_secs(3),
            egress_request_timeout: Duration::from_secs(60),
            tcp_idle_timeout: Duration::from_secs(3600),
        }
    }
}

impl Limits {
    pub fn validate(&self) -> Result<(), LimitsError> {
        let zero = [
            (self.header_read_timeout.is_zero(), "--header-read-timeout"),
            (self.http1_idle_timeout.is_zero(), "--http1-idle-timeout"),
            (self.http2_idle_timeout.is_zero(), "--http2-idle-timeout"),
            (
                self.http2_keepalive_interval.is_zero(),
                "--http2-keepalive-interval",
            ),
            (
                self.http2_keepalive_timeout.is_zero(),
                "--http2-keepalive-timeout",
            ),
            (self.max_connections == 0, "--max-connections"),
            (
                self.http2_max_concurrent_streams == 0,
                "--http2-max-concurrent-streams",
            ),
            (
                self.http2_reset_flood_streams == 0,
                "--http2-reset-flood-streams",
            ),
            (self.max_request_headers_kb == 0, "--max-request-headers-kb"),
            (self.max_request_headers == 0, "--max-request-headers"),
            (self.max_hops == 0, "--max-hops"),
            (self.connect_timeout.is_zero(), "--connect-timeout"),
            (
                self.egress_request_timeout.is_zero(),
                "--egress-request-timeout",
            ),
            (self.tcp_idle_timeout.is_zero(), "--tcp-idle-timeout"),
        ];
        if let Some((_, flag)) = zero.into_iter().find(|(z, _)| *z) {
            return Err(LimitsError::Zero { flag });
        }
        if self.max_request_headers_kb > 4096 {
            return Err(LimitsError::HeadersTooLarge(self.max_request_headers_kb));
        }
        Ok(())
    }

    /// The header limits of a listener: exact on the first hop, with room
    /// for what a proxy adds on the inbound one.
    pub fn headers(&self, peer_hop: bool) -> HeaderLimits {
        let bytes = self.max_request_headers_kb * 1024;
        if peer_hop {
            HeaderLimits {
                bytes: bytes + PEER_HEADER_ALLOWANCE_BYTES,
                count: self.max_request_headers + PEER_HEADER_ALLOWANCE_COUNT,
            }
        } else {
            HeaderLimits {
                bytes,
                count: self.max_request_headers,
            }
        }
    }
}

/// How large a request's headers may be on one listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeaderLimits {
    /// Counted as HTTP/2 does: name + value + 32 per header.
    pub bytes: u32,
    pub count: usize,
}

impl HeaderLimits {
    /// `Err((bytes, count))` when `headers` break a limit.
    pub fn check(&self, headers: &HeaderMap) -> Result<(), (usize, usize)> {
        let count = headers.len();
        let mut bytes = 0usize;
        for (name, value) in headers {
            bytes += name.as_str().len() + value.len() + HEADER_OVERHEAD;
        }
        if count > self.count || bytes > self.bytes as usize {
            return Err((bytes, count));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_inbound_hop_allows_what_a_proxy_adds() {
        let l = Limits::default();
        let first = l.headers(false);
        let peer = l.headers(true);
        assert_eq!((first.bytes, first.count), (60 * 1024, 100));
        assert!(peer.bytes >= first.bytes + 4096 && peer.count >= first.count + 8);

        // A header the first hop takes is taken by the second with the
        // proxy's own added.
        let mut h = HeaderMap::new();
        h.insert("x-big", "a".repeat(16 * 1024).parse().unwrap());
        assert!(first.check(&h).is_ok());
        for (k, v) in [
            ("x-trellis-orig-proto", "HTTP/1.1"),
            ("x-trellis-source", "default/web"),
            ("x-trellis-destination", "default/catalog"),
            ("x-trellis-hops", "1"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ] {
            h.insert(k, v.parse().unwrap());
        }
        assert!(peer.check(&h).is_ok());
    }

    #[test]
    fn headers_past_a_limit_are_told() {
        let l = HeaderLimits {
            bytes: 100,
            count: 2,
        };
        let mut h = HeaderMap::new();
        h.insert("a", "b".parse().unwrap());
        assert_eq!(l.check(&h), Ok(()));
        h.insert("c", "d".repeat(70).parse().unwrap());
        assert_eq!(l.check(&h), Err((34 + 103, 2)));
        let mut many = HeaderMap::new();
        for n in ["a", "b", "c"] {
            many.insert(n, "1".parse().unwrap());
        }
        assert_eq!(l.check(&many), Err((3 * 34, 3)));
    }

    #[test]
    fn zero_is_refused_with_the_flag_named() {
        let mut l = Limits::default();
        assert!(l.validate().is_ok());
        l.max_connections = 0;
        assert_eq!(
            l.validate().unwrap_err().to_string(),
            "--max-connections must be more than zero"
        );
    }
}
