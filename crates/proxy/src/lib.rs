//! The Trellis sidecar proxy.
//!
//! `inbound` and `outbound` are the two traffic directions; both read the
//! shared `Inputs` (config, discovery snapshot, metrics, clients). The
//! `discovery` module keeps the config snapshot current from the control
//! plane and the on-disk cache. `listener` binds every listener once, at
//! start-up, and runs the accept loop they share.
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

pub mod accesslog;
pub mod admin;
pub mod app_health;
pub mod authz;
pub mod balance;
#[cfg(feature = "cli")]
pub mod cli;
pub mod config;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod h1pool;
pub mod http;
pub mod inbound;
pub mod inputs;
pub mod limits;
pub mod listener;
pub mod loops;
pub mod metrics;
pub mod names;
pub mod normalize;
pub mod otlp;
pub mod outbound;
pub mod peer_h2;
pub mod pod;
pub mod process;
pub mod route;
pub mod series;
pub mod server;
pub mod snapshot;
pub mod splice;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod traffic;
pub mod transparent;
pub mod workers;

pub use crate::http::Body;
pub use config::{ProxyConfig, Upstream};

use crate::config::ConfigError;
use crate::control::{ControlClient, ControlError};
use crate::discovery::Discovery;
use crate::inputs::Inputs;
use crate::listener::BindError;
use crate::tls::{Tls, TlsError};
use crate::transparent::TransparentError;

/// How long `start` waits for the first config when there is no cache.
pub const FIRST_CONFIG_TIMEOUT: Duration = Duration::from_secs(15);
/// On shutdown, how long a proxy that serves Services keeps accepting
/// after the control plane took it out of its callers' endpoints: the
/// time for the change to reach every caller (through the store and every
/// replica), so that none connects after it stopped accepting.
pub const LEAVE_GRACE: Duration = Duration::from_secs(1);
/// How long shutdown waits for the control plane to see the proxy leave.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a draining proxy lets its connections flush once no request is
/// in flight.
const FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Why a proxy did not start; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read --token-file {}: {reason}", path.display())]
    TokenFile {
        path: PathBuf,
        reason: std::io::Error,
    },
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("cannot start the proxy's {0} worker threads: {1}; lower --workers or raise the process's thread limit")]
    Workers(usize, std::io::Error),
    #[error(transparent)]
    Transparent(#[from] TransparentError),
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot reach the control plane at {control_plane} ({last_error}) and there is no cached config{}: start the control plane, check --control-plane, or give --cache-dir of an earlier run", in_dir(cache_dir))]
    NoConfig {
        control_plane: String,
        last_error: String,
        cache_dir: Option<PathBuf>,
    },
    #[error("workload key: {0}")]
    WorkloadKey(TlsError),
    #[error("cannot get a certificate for {identity} from the control plane at {control_plane}: {reason}")]
    Certificate {
        identity: String,
        control_plane: String,
        reason: TlsError,
    },
}

fn in_dir(dir: &Option<PathBuf>) -> String {
    dir.as_ref()
        .map(|d| format!(" in {}", d.display()))
        .unwrap_or_default()
}

/// A running proxy.
pub struct Proxy {
    pub inbound_addr: SocketAddr,
    pub outbound_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Bound addresses of the `--upstream` listeners, in the config's order.
    pub upstream_addrs: Vec<SocketAddr>,
    pub instance: String,
    shutdown: watch::Sender<bool>,
    metrics: Arc<metrics::Metrics>,
    discovery: Arc<Discovery>,
    drain_grace: Duration,
    /// The data path's threads; dropping the proxy stops them.
    _workers: workers::Workers,
}

/// Every listener of the proxy, bound; each is served once the proxy is
/// ready for what it takes (the admin server at once).
struct Listeners {
    inbound: inbound::Inbound,
    outbound: outbound::Outbound,
    admin: admin::Admin,
    dns: Option<dns::DnsServer>,
}

impl Listeners {
    /// Binds them all, so that a port conflict fails before anything
    /// registers; the sockets bound here are the ones served.
    async fn bind(cfg: &ProxyConfig) -> Result<Listeners, StartError> {
        Ok(Listeners {
            inbound: inbound::Inbound::new(cfg).await?,
            outbound: outbound::Outbound::new(cfg).await?,
            admin: admin::Admin::new(cfg).await?,
            dns: transparent::start(cfg).await?,
        })
    }
}

impl Proxy {
    /// Binds every listener (a taken port is an error), loads the cached
    /// config, connects to the control plane and starts serving. Fails when
    /// neither the control plane nor a cache gives a config in time.
    pub async fn start(cfg: ProxyConfig) -> Result<Proxy, StartError> {
        Self::start_with_timeout(cfg, FIRST_CONFIG_TIMEOUT).await
    }

    pub async fn start_with_timeout(
        mut cfg: ProxyConfig,
        first_config: Duration,
    ) -> Result<Proxy, StartError> {
        cfg.validate()?;
        let instance = cfg.instance.clone().unwrap_or_else(|| {
            format!("{}-{:06x}", cfg.workload, rand::random::<u32>() & 0xff_ffff)
        });
        cfg.instance = Some(instance.clone());
        tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting proxy");
        let token = read_token(&cfg)?;
        let workers = workers::Workers::start(cfg.workers)
            .map_err(|e| StartError::Workers(cfg.workers, e))?;
        endpoint::use_slots(workers::slots(cfg.workers));

        // 1. Bind every listener.
        let Listeners {
            inbound,
            outbound,
            admin,
            dns,
        } = Listeners::bind(&cfg).await?;
        cfg.inbound_addr = inbound.local_addr();
        cfg.outbound_addr = outbound.local_addr();
        cfg.admin_addr = admin.local_addr();
        for (u, bound) in cfg.upstreams.iter_mut().zip(outbound.upstream_addrs()) {
            u.listen = bound;
        }
        if let (Some(t), Some(dns)) = (cfg.transparent.as_mut(), dns.as_ref()) {
            t.dns_addr = Some(dns.local_addr());
        }
        limits::set_connect_timeout(cfg.limits.connect_timeout);
        warn_if_descriptors_run_out_first(&cfg);

        // 2. Register and discover; the admin server answers meanwhile.
        let control = if cfg.ca_pins.is_empty() {
            ControlClient::new(&cfg.control_plane, &token)?
        } else {
            // Kubernetes: the projected token is renewed in its file.
            ControlClient::pinned(&cfg.control_plane, &token, cfg.ca_pins.clone())?
                .with_token_file(cfg.token_file.clone())
        };
        let metrics = metrics::Metrics::new();
        let (shutdown, shutdown_rx) = watch::channel(false);
        let telemetry = own_telemetry(&cfg, &instance, &metrics);
        let discovery = Discovery::start(
            control.clone(),
            registration(&cfg, &instance, token),
            cfg.cache_dir.clone(),
            metrics.clone(),
            telemetry.clone(),
            shutdown_rx.clone(),
        );
        let proxy = Proxy {
            inbound_addr: cfg.inbound_addr,
            outbound_addr: cfg.outbound_addr,
            admin_addr: cfg.admin_addr,
            upstream_addrs: outbound.upstream_addrs(),
            instance,
            shutdown,
            metrics: metrics.clone(),
            discovery: discovery.clone(),
            drain_grace: cfg.drain_grace,
            _workers: workers,
        };
        let inputs = Inputs::new(cfg, discovery, metrics, telemetry, proxy._workers.set());
        tokio::spawn(admin.run(inputs.clone(), shutdown_rx.clone()));

        // 3. The first config, then 4. the workload's certificate (its
        // identity needs the trust domain the config carries).
        let ready = async {
            wait_first_config(&inputs, first_config).await?;
            workload_identity(&inputs, &control).await
        };
        let tls = match ready.await {
            Ok(tls) => tls,
            Err(e) => {
                let _ = proxy.shutdown.send(true);
                return Err(e);
            }
        };

        // 5. Serve.
        tokio::spawn(tls.run(control, shutdown_rx.clone()));
        tokio::spawn(inbound.run(inputs.clone(), shutdown_rx.clone()));
        tokio::spawn(traffic::health::run(inputs.clone(), shutdown_rx.clone()));
        tokio::spawn(endpoint::open_ahead(inputs.clone(), shutdown_rx.clone()));
        tokio::spawn(h1pool::sweep_every(
            h1pool::IDLE_TIMEOUT / 2,
            inputs.app_http1.clone(),
            shutdown_rx.clone(),
        ));
        if let Some(dns) = dns {
            tokio::spawn(dns.run(inputs.clone(), shutdown_rx.clone()));
        }
        tokio::spawn(outbound.run(inputs, shutdown_rx));
        tracing::info!(inbound = %proxy.inbound_addr, outbound = %proxy.outbound_addr, admin = %proxy.admin_addr, "proxy ready");
        Ok(proxy)
    }

    /// Requests being handled now, in both directions.
    pub fn in_flight(&self) -> u64 {
        self.metrics.in_flight_now()
    }

    /// Leaves the mesh, then stops accepting and lets in-flight requests
    /// finish within the drain grace period. Leaving first means callers
    /// stop sending here while it still accepts: the control plane takes
    /// it out of their endpoints, and it serves on for `LEAVE_GRACE` (if it
    /// is an endpoint at all) while that reaches them.
    pub async fn shutdown(self) {
        let serves = !self.discovery.snapshot().raw.own_services.is_empty();
        let started = tokio::time::Instant::now();
        if self.discovery.leave(LEAVE_TIMEOUT).await && serves {
            tokio::time::sleep(LEAVE_GRACE.min(self.drain_grace)).await;
        }
        let _ = self.shutdown.send(true);
        let deadline = started + self.drain_grace.max(LEAVE_GRACE);
        while self.metrics.in_flight_now() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A response's last frames may still sit in its connection's
        // write buffer when its body is done: let the connections flush
        // (they close gracefully) before the process exits.
        if self.metrics.in_flight_now() == 0 {
            let flush = deadline.min(tokio::time::Instant::now() + FLUSH_GRACE);
            tokio::time::sleep_until(flush).await;
        }
        let left = self.metrics.in_flight_now();
        if left > 0 {
            tracing::warn!(
                left,
                "drain grace period over; dropping requests still in flight"
            );
        }
    }
}

/// The connection caps are only a defence if the process can hold that
/// many connections: say so when its open-file limit is lower.
fn warn_if_descriptors_run_out_first(cfg: &ProxyConfig) {
    let soft = procfs::process::Process::myself()
        .and_then(|p| p.limits())
        .ok()
        .and_then(|l| match l.max_open_files.soft_limit {
            procfs::process::LimitValue::Value(v) => Some(v),
            procfs::process::LimitValue::Unlimited => None,
        });
    let listeners = 2 + cfg.upstreams.len() as u64;
    let wanted = cfg.limits.max_connections as u64 * listeners;
    if let Some(soft) = soft.filter(|s| *s < wanted) {
        tracing::warn!(
            open_file_limit = soft,
            max_connections = cfg.limits.max_connections,
            "the open-file limit ({soft}) is below what the connection caps allow ({wanted} for {listeners} listeners of --max-connections {}): at that limit new connections are shed; raise it (ulimit -n, systemd LimitNOFILE=) or lower --max-connections",
            cfg.limits.max_connections
        );
    }
}

fn read_token(cfg: &ProxyConfig) -> Result<String, StartError> {
    let Some(path) = &cfg.token_file else {
        return Ok(String::new());
    };
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t.trim().to_string()),
        Err(reason) => Err(StartError::TokenFile {
            path: path.clone(),
            reason,
        }),
    }
}

/// What the proxy registers as: the addresses peers and the control plane
/// use reach its bound listeners (`cfg` holds the bound addresses).
fn registration(cfg: &ProxyConfig, instance: &str, token: String) -> discovery::Identity {
    let advertise_ip = cfg.advertise_addr.unwrap_or_else(|| {
        if cfg.inbound_addr.ip().is_unspecified() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            cfg.inbound_addr.ip()
        }
    });
    let admin_ip: IpAddr = if cfg.admin_addr.ip().is_unspecified() {
        advertise_ip
    } else {
        cfg.admin_addr.ip()
    };
    discovery::Identity {
        instance: instance.to_string(),
        workload: cfg.workload.clone(),
        namespace: cfg.namespace.clone(),
        labels: cfg.labels.clone(),
        service_account: cfg.service_account(),
        inbound_addr: SocketAddr::new(advertise_ip, cfg.inbound_addr.port()).to_string(),
        admin_addr: SocketAddr::new(admin_ip, cfg.admin_addr.port()).to_string(),
        app_port: cfg.app_port,
        token,
    }
}

fn own_telemetry(
    cfg: &ProxyConfig,
    instance: &str,
    metrics: &Arc<metrics::Metrics>,
) -> Arc<telemetry::Telemetry> {
    telemetry::Telemetry::new(
        telemetry::Own {
            namespace: cfg.namespace.clone(),
            workload: cfg.workload.clone(),
            service_account: cfg.service_account(),
            instance: instance.to_string(),
            service: cfg
                .labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| cfg.workload.clone()),
        },
        &trellis_resource::MeshSpec::default(),
        metrics.clone(),
    )
}

/// Waits for a config from the control plane or the cache.
async fn wait_first_config(inputs: &Inputs, timeout: Duration) -> Result<(), StartError> {
    if inputs.discovery.wait_loaded(timeout).await {
        return Ok(());
    }
    Err(StartError::NoConfig {
        control_plane: inputs.cfg.control_plane.clone(),
        last_error: inputs.discovery.last_error(),
        cache_dir: inputs.cfg.cache_dir.clone(),
    })
}

/// The workload's key and certificate: from the cache when still valid,
/// else signed now by the control plane's CA.
async fn workload_identity(
    inputs: &Inputs,
    control: &ControlClient,
) -> Result<Arc<Tls>, StartError> {
    let cfg = &inputs.cfg;
    let trust_domain = inputs.discovery.snapshot().mesh.trust_domain.clone();
    let spiffe =
        trellis_identity::SpiffeId::new(&trust_domain, &cfg.namespace, &cfg.service_account());
    let tls = Tls::new(
        spiffe,
        cfg.cache_dir.clone(),
        inputs.metrics.tls_handshakes.clone(),
    )
    .map_err(StartError::WorkloadKey)?;
    control.trust(tls.trusted_roots());
    inputs.discovery.set_tls(tls.clone());
    if tls.current().is_none() {
        if let Err(reason) = tls.renew(control).await {
            return Err(StartError::Certificate {
                identity: tls.identity().to_string(),
                control_plane: cfg.control_plane.clone(),
                reason,
            });
        }
        control.trust(tls.trusted_roots());
    }
    Ok(tls)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listener::Kind;

    #[tokio::test]
    async fn a_taken_port_is_a_start_up_error_naming_its_flag() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        // Nothing listens at the control plane's address: binding fails
        // before the proxy tries it.
        let mut cfg = ProxyConfig::new("127.0.0.1:1", "web", 1);
        cfg.inbound_addr = ([127, 0, 0, 1], 0).into();
        cfg.outbound_addr = addr;
        cfg.admin_addr = ([127, 0, 0, 1], 0).into();
        let err = Proxy::start(cfg).await.err().expect("a taken port fails");
        assert!(
            matches!(
                err,
                StartError::Bind(BindError::Taken {
                    kind: Kind::outbound,
                    ..
                })
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!("outbound port {addr} is taken: is another proxy running? choose another with --outbound-addr")
        );
    }
}
