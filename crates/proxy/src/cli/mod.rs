//! The sidecar's command line, shared by the one `trellis` binary
//! (`trellis proxy`, `trellis init`) and the proxy-only `trellis-proxy`
//! (the sidecar image's binary; docs/performance.md, "The one binary's
//! cost"): the flags, their mapping onto `ProxyConfig`, and running the
//! proxy until SIGTERM. Behind the `cli` feature, so the library itself
//! carries no clap.

pub mod init;

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::config::{parse_labels, Upstream};
use crate::{pod, Proxy, ProxyConfig};

/// Durations typed on the command line (`500ms`, `30s`, `1h30m`): the
/// loose form of trellis-resource's one duration parser, its error as the
/// text clap shows.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    Ok(trellis_resource::parse_duration_loose(s)?)
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// The control plane's proxy API: HOST:PORT or a URL, or several
    /// replicas' (comma-separated), or a name with several addresses; the
    /// proxy fails over between them.
    #[arg(long, value_name = "ADDR[,ADDR...]")]
    pub control_plane: String,
    #[arg(long, value_name = "NAME")]
    pub workload: String,
    #[arg(long, value_parser = parse_labels, value_name = "k=v,...")]
    pub labels: Option<BTreeMap<String, String>>,
    #[arg(long, value_name = "SA")]
    pub service_account: Option<String>,
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// SHA-256 of the CA root the control plane's TLS chains to, for a
    /// token that pins none (Kubernetes; the injector sets it).
    #[arg(long = "ca-pin", value_name = "SHA256")]
    pub ca_pins: Vec<String>,
    /// Kubernetes: the app's original probes (JSON, by admin path), which
    /// the admin port runs for the kubelet; the injector sets it.
    #[arg(long, env = "TRELLIS_APP_PROBES", value_name = "JSON", hide = true)]
    pub app_probes: Option<String>,
    /// The local app's port on 127.0.0.1.
    #[arg(long, value_name = "PORT")]
    pub app_port: u16,
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], pod::INBOUND_PORT)))]
    pub inbound_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], pod::OUTBOUND_PORT)))]
    pub outbound_addr: SocketAddr,
    #[arg(long, default_value_t = SocketAddr::from(([127, 0, 0, 1], pod::ADMIN_PORT)))]
    pub admin_addr: SocketAddr,
    /// The IP peers use to reach the inbound listener.
    #[arg(long, value_name = "IP")]
    pub advertise_addr: Option<IpAddr>,
    /// Where the last good config is kept.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// A fixed local listener for a service: SERVICE:PORT=LOCAL_ADDR.
    #[arg(long = "upstream", value_name = "SERVICE:PORT=LOCAL_ADDR")]
    pub upstreams: Vec<Upstream>,
    /// Unique name of this proxy process (default: workload + random suffix).
    #[arg(long)]
    pub instance: Option<String>,
    /// How long in-flight requests may take to finish on shutdown.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_grace: std::time::Duration,
    /// Worker threads of the data path; each serves the connections it
    /// accepts to completion, with its own connections to peers and the
    /// app (default: one per CPU the proxy may use, at most 2). 0: no
    /// workers; the data path runs on one work-stealing runtime with the
    /// control tasks (the layout before issue 13, to compare with).
    #[arg(long, env = "TRELLIS_PROXY_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    /// How HTTP/1 callers' requests travel to peer proxies: `true`, over
    /// HTTP/1.1 on pooled mutual-TLS connections, one per request in
    /// flight; `false`, over the worker's one HTTP/2 connection to each
    /// peer (HTTP/2 callers always use that).
    #[arg(long, env = "TRELLIS_PROXY_PEER_HTTP1", value_name = "BOOL",
          default_value_t = crate::config::PEER_HTTP1, action = clap::ArgAction::Set)]
    pub peer_http1: bool,
    /// Pods mode (transparent interception).
    #[command(flatten)]
    pub pods: init::TransparentArgs,
    /// Timeouts and limits (docs/security.md, "Limits").
    #[command(flatten)]
    pub limits: LimitArgs,
}

/// The proxy's timeouts and limits; each flag left out keeps the default
/// of `trellis_proxy::limits::Limits` (docs/security.md lists them).
#[derive(Debug, Default, Args)]
#[command(next_help_heading = "Limits")]
pub struct LimitArgs {
    /// A request's headers must arrive within this [10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub header_read_timeout: Option<std::time::Duration>,
    /// Close an HTTP/1 connection idle between requests after this [5m].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub http1_idle_timeout: Option<std::time::Duration>,
    /// Send GOAWAY on an HTTP/2 connection with no stream for this long [1h].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub http2_idle_timeout: Option<std::time::Duration>,
    /// How often HTTP/2 PINGs check that a client is alive [20s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub http2_keepalive_interval: Option<std::time::Duration>,
    /// How long a PING may go unanswered before the connection closes [10s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub http2_keepalive_timeout: Option<std::time::Duration>,
    /// Connections each listener holds; more are closed at once [10000].
    #[arg(long, value_name = "N")]
    pub max_connections: Option<usize>,
    /// Streams one HTTP/2 connection may have open at once [1024].
    #[arg(long, value_name = "N")]
    pub http2_max_concurrent_streams: Option<u32>,
    /// Streams a client may reset before they are taken, then GOAWAY [20].
    #[arg(long, value_name = "N")]
    pub http2_max_pending_accept_reset_streams: Option<usize>,
    /// GOAWAY once more than half of this many streams were reset early [500].
    #[arg(long, value_name = "N")]
    pub http2_reset_flood_streams: Option<u32>,
    /// Largest request header section, in KiB [60].
    #[arg(long, value_name = "KIB")]
    pub max_request_headers_kb: Option<u32>,
    /// Most headers in one request [100].
    #[arg(long, value_name = "N")]
    pub max_request_headers: Option<usize>,
    /// Most proxies one request may pass through (x-trellis-hops) [16].
    #[arg(long, value_name = "N")]
    pub max_hops: Option<u32>,
    /// Connecting to a peer, the app or an outside host [3s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Option<std::time::Duration>,
    /// A call outside the mesh must answer within this [60s].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub egress_request_timeout: Option<std::time::Duration>,
    /// Close opaque TCP that carried nothing either way for this long [1h].
    #[arg(long, value_parser = parse_duration, value_name = "DURATION")]
    pub tcp_idle_timeout: Option<std::time::Duration>,
}

impl LimitArgs {
    /// Sets the limits given on the command line.
    pub fn apply(&self, l: &mut crate::limits::Limits) {
        fn set<T: Copy>(flag: Option<T>, field: &mut T) {
            if let Some(v) = flag {
                *field = v;
            }
        }
        set(self.header_read_timeout, &mut l.header_read_timeout);
        set(self.http1_idle_timeout, &mut l.http1_idle_timeout);
        set(self.http2_idle_timeout, &mut l.http2_idle_timeout);
        set(
            self.http2_keepalive_interval,
            &mut l.http2_keepalive_interval,
        );
        set(self.http2_keepalive_timeout, &mut l.http2_keepalive_timeout);
        set(self.max_connections, &mut l.max_connections);
        set(
            self.http2_max_concurrent_streams,
            &mut l.http2_max_concurrent_streams,
        );
        set(
            self.http2_max_pending_accept_reset_streams,
            &mut l.http2_max_pending_accept_reset_streams,
        );
        set(
            self.http2_reset_flood_streams,
            &mut l.http2_reset_flood_streams,
        );
        set(self.max_request_headers_kb, &mut l.max_request_headers_kb);
        set(self.max_request_headers, &mut l.max_request_headers);
        set(self.max_hops, &mut l.max_hops);
        set(self.connect_timeout, &mut l.connect_timeout);
        set(self.egress_request_timeout, &mut l.egress_request_timeout);
        set(self.tcp_idle_timeout, &mut l.tcp_idle_timeout);
    }
}

/// The proxy's configuration from its flags; `namespace` is `-n` (default
/// `default`).
pub fn config(namespace: Option<&str>, args: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    let mut cfg = ProxyConfig::new(
        args.control_plane.clone(),
        args.workload.clone(),
        args.app_port,
    );
    cfg.namespace = namespace
        .unwrap_or(trellis_resource::DEFAULT_NAMESPACE)
        .to_string();
    cfg.labels = args.labels.clone().unwrap_or_default();
    cfg.service_account = args.service_account.clone();
    cfg.token_file = args.token_file.clone();
    cfg.ca_pins = args.ca_pins.clone();
    if let Some(json) = args.app_probes.as_deref().filter(|j| !j.trim().is_empty()) {
        cfg.app_probes = crate::app_health::parse(json)?;
    }
    cfg.inbound_addr = args.inbound_addr;
    cfg.outbound_addr = args.outbound_addr;
    cfg.admin_addr = args.admin_addr;
    cfg.advertise_addr = args.advertise_addr;
    cfg.cache_dir = args.cache_dir.clone();
    cfg.upstreams = args.upstreams.clone();
    cfg.instance = args.instance.clone();
    cfg.drain_grace = args.drain_grace;
    cfg.workers = args.workers.unwrap_or_else(crate::workers::default_count);
    cfg.peer_http1 = args.peer_http1;
    cfg.transparent = args.pods.settings();
    args.limits.apply(&mut cfg.limits);
    cfg.validate()?;
    Ok(cfg)
}

/// The runtime `run` runs on: with workers, one thread for the control
/// tasks (the data path has its own); without, a work-stealing runtime
/// for everything (`TOKIO_WORKER_THREADS` sets its size).
pub fn runtime(cfg: &ProxyConfig) -> std::io::Result<tokio::runtime::Runtime> {
    if cfg.workers == 0 {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    }
    .enable_all()
    .build()
}

/// Runs the proxy until SIGINT or SIGTERM, then drains it.
pub async fn run(cfg: ProxyConfig) -> anyhow::Result<ExitCode> {
    let proxy = tokio::select! {
        p = Proxy::start(cfg) => p?,
        // A proxy still waiting for its first config stops at once.
        _ = shutdown() => return Ok(ExitCode::SUCCESS),
    };
    shutdown().await;
    tracing::info!("draining");
    proxy.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            // Without a SIGTERM handler Ctrl-C still works; say why
            // `kill` would end the process abruptly.
            tracing::warn!(error = %e, "cannot listen for SIGTERM");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`); colours only
/// on a terminal, since the processes of `trellis up` log to files.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}
