//! The Trellis control plane.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;

/// Configuration of `trellis control`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ControlConfig {
    /// Where the store and the CA live.
    pub data_dir: PathBuf,
    /// HTTP API, dashboard and metrics (default 127.0.0.1:15080). Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// gRPC proxy API (default 127.0.0.1:15010). Port 0 picks a free port.
    pub grpc_addr: SocketAddr,
}

impl ControlConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ControlConfig {
            data_dir: data_dir.into(),
            http_addr: ([127, 0, 0, 1], 15080).into(),
            grpc_addr: ([127, 0, 0, 1], 15010).into(),
        }
    }
}
