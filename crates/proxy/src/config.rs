//! The proxy's configuration: one plain, validated struct, logged at start.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(
        "--upstream {0:?}: expected SERVICE:PORT=LOCAL_ADDR, e.g. catalog:8080=127.0.0.1:9000"
    )]
    Upstream(String),
    #[error("--labels {0:?}: expected k=v,k2=v2")]
    Labels(String),
    #[error("--workload must not be empty")]
    NoWorkload,
    #[error("--workers {0} is more than {max}: use at most one per CPU the proxy may use", max = crate::workers::MAX)]
    Workers(usize),
    #[error(transparent)]
    Limits(#[from] crate::limits::LimitsError),
}

/// Configuration of `trellis proxy`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// `HOST:PORT` or a URL of the control plane's gRPC proxy API.
    pub control_plane: String,
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    /// Omitted: the `app` label, else the workload name.
    pub service_account: Option<String>,
    pub token_file: Option<PathBuf>,
    /// SHA-256 fingerprints of the CA roots the control plane's TLS chains
    /// to, for a token that pins none (a Kubernetes ServiceAccount token).
    #[serde(default)]
    pub ca_pins: Vec<String>,
    /// The local app's port on 127.0.0.1.
    pub app_port: u16,
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// The IP peers use to reach the inbound listener; omitted: the
    /// inbound listener's IP, or 127.0.0.1 when that is unspecified.
    pub advertise_addr: Option<IpAddr>,
    /// Where the last good config is kept, to start from when the control
    /// plane is unreachable.
    pub cache_dir: Option<PathBuf>,
    /// Fixed local listeners for apps that cannot use an HTTP proxy.
    pub upstreams: Vec<Upstream>,
    /// Unique name of this proxy process; omitted: workload + random suffix.
    pub instance: Option<String>,
    /// How long in-flight requests may take to finish on shutdown.
    #[serde(with = "secs")]
    pub drain_grace: Duration,
    /// Pods mode: take connections redirected by `trellis init` (see
    /// `transparent`); omitted: explicit proxy and `--upstream` only.
    #[serde(default)]
    pub transparent: Option<crate::transparent::Settings>,
    /// Timeouts and limits every client and peer is held to.
    #[serde(default)]
    pub limits: crate::limits::Limits,
    /// Kubernetes: the app's original probes by admin path
    /// (`/app-health/...`), which the admin server runs for the kubelet.
    #[serde(default)]
    pub app_probes: BTreeMap<String, crate::app_health::AppProbe>,
    /// Worker threads of the data path, each serving the connections it
    /// accepts to completion (see `workers`); 0: the data path runs on the
    /// runtime `Proxy::start` runs on (for embedding; `trellis proxy`
    /// defaults to `workers::default_count`).
    #[serde(default)]
    pub workers: usize,
    /// HTTP/1 callers' requests go to peer proxies over HTTP/1.1, a pooled
    /// mutual-TLS connection per request in flight (as HAProxy and Envoy
    /// do), instead of over the worker's one HTTP/2 connection to the peer
    /// (`--peer-http1`).
    #[serde(default = "default_peer_http1")]
    pub peer_http1: bool,
}

fn default_peer_http1() -> bool {
    PEER_HTTP1
}

/// The default of `--peer-http1`.
pub const PEER_HTTP1: bool = false;

/// `--upstream SERVICE:PORT=LOCAL_ADDR`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Upstream {
    /// A service name as an app would write it: `NAME`, `NAME.NAMESPACE`, ...
    pub service: String,
    pub port: u16,
    pub listen: SocketAddr,
}

impl std::str::FromStr for Upstream {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::Upstream(s.to_string());
        let (target, listen) = s.split_once('=').ok_or_else(bad)?;
        let (service, port) = target.rsplit_once(':').ok_or_else(bad)?;
        if service.is_empty() {
            return Err(bad());
        }
        Ok(Upstream {
            service: service.to_string(),
            port: port.parse().map_err(|_| bad())?,
            listen: listen.parse().map_err(|_| bad())?,
        })
    }
}

/// Parses `k=v,k2=v2`.
pub fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut out = BTreeMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::Labels(s.to_string()))?;
        if k.is_empty() {
            return Err(ConfigError::Labels(s.to_string()));
        }
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

impl ProxyConfig {
    /// Defaults of the SPEC, for a workload and its app port.
    pub fn new(
        control_plane: impl Into<String>,
        workload: impl Into<String>,
        app_port: u16,
    ) -> Self {
        ProxyConfig {
            control_plane: control_plane.into(),
            workload: workload.into(),
            namespace: "default".into(),
            labels: BTreeMap::new(),
            service_account: None,
            token_file: None,
            ca_pins: Vec::new(),
            app_port,
            inbound_addr: ([0, 0, 0, 0], 15006).into(),
            outbound_addr: ([127, 0, 0, 1], 15001).into(),
            admin_addr: ([127, 0, 0, 1], 15000).into(),
            advertise_addr: None,
            cache_dir: None,
            upstreams: Vec::new(),
            instance: None,
            drain_grace: Duration::from_secs(10),
            transparent: None,
            limits: Default::default(),
            app_probes: BTreeMap::new(),
            workers: 0,
            peer_http1: PEER_HTTP1,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.workload.is_empty() {
            return Err(ConfigError::NoWorkload);
        }
        if self.workers > crate::workers::MAX {
            return Err(ConfigError::Workers(self.workers));
        }
        self.limits.validate()?;
        Ok(())
    }

    /// The service account: explicit, else the `app` label, else the workload.
    pub fn service_account(&self) -> String {
        self.service_account
            .clone()
            .or_else(|| self.labels.get("app").cloned())
            .unwrap_or_else(|| self.workload.clone())
    }
}

/// Durations as seconds (f64) when serialized.
pub(crate) mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs_f64(f64::deserialize(d)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_upstream() {
        let u: Upstream = "catalog:8080=127.0.0.1:9000".parse().unwrap();
        assert_eq!(u.service, "catalog");
        assert_eq!(u.port, 8080);
        assert_eq!(u.listen, "127.0.0.1:9000".parse().unwrap());
        assert!("catalog=127.0.0.1:9000".parse::<Upstream>().is_err());
        assert!("catalog:x=127.0.0.1:9000".parse::<Upstream>().is_err());
    }

    #[test]
    fn parses_labels() {
        let l = parse_labels("app=web,version=v2").unwrap();
        assert_eq!(l.get("version").map(String::as_str), Some("v2"));
        assert!(parse_labels("app").is_err());
    }
}
