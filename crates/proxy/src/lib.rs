//! The Trellis sidecar proxy.
#![forbid(unsafe_code)]

use std::net::SocketAddr;

pub mod config;
pub use config::{ProxyConfig, Upstream};

/// A running proxy.
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Bound addresses of the `--upstream` listeners, in the config's order.
    pub upstream_addrs: Vec<SocketAddr>,
}

impl Proxy {
    /// Binds every listener (a taken port is an error), loads the cached
    /// config, connects to the control plane and starts serving.
    pub async fn start(cfg: ProxyConfig) -> anyhow::Result<Proxy> {
        let _ = cfg;
        anyhow::bail!("not yet built")
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// grace period, then returns.
    pub async fn shutdown(self) {}
}
