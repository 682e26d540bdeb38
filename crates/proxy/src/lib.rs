//! The Trellis sidecar proxy.
#![forbid(unsafe_code)]

pub mod config;
pub use config::{ProxyConfig, Upstream};
