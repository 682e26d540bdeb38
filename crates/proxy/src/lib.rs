//! The Trellis sidecar proxy.
//!
//! `inbound` and `outbound` are the two traffic directions; both read the
//! shared `Inputs` (config, discovery snapshot, metrics, clients). The
//! `discovery` module keeps the config snapshot current from the control
//! plane and the on-disk cache.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;

pub mod accesslog;
pub mod admin;
pub mod authz;
pub mod balance;
pub mod config;
pub mod control;
pub mod detect;
pub mod discovery;
pub mod dns;
pub mod endpoint;
pub mod error;
pub mod http;
pub mod inbound;
pub mod inputs;
pub mod metrics;
pub mod names;
pub mod normalize;
pub mod otlp;
pub mod outbound;
pub mod pod;
pub mod process;
pub mod route;
pub mod series;
pub mod snapshot;
pub mod tap;
pub mod telemetry;
pub mod tls;
pub mod trace;
pub mod traffic;
pub mod transparent;

pub use crate::http::Body;
pub use config::{ProxyConfig, Upstream};

/// How long `start` waits for the first config when there is no cache.
pub const FIRST_CONFIG_TIMEOUT: Duration = Duration::from_secs(15);

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
    drain_grace: Duration,
}

/// Binds a listener; a taken port is a start-up error that says what to do.
pub(crate) async fn bind(addr: SocketAddr, what: &str, flag: &str) -> anyhow::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!(
                "{what} port {addr} is taken: is another proxy running? choose another with {flag}"
            )
        } else {
            anyhow::anyhow!("cannot bind the {what} listener on {addr}: {e}")
        }
    })?;
    Ok(socket.listen(1024)?)
}

impl Proxy {
    /// Binds every listener (a taken port is an error), loads the cached
    /// config, connects to the control plane and starts serving. Fails when
    /// neither the control plane nor a cache gives a config in time.
    pub async fn start(cfg: ProxyConfig) -> anyhow::Result<Proxy> {
        Self::start_with_timeout(cfg, FIRST_CONFIG_TIMEOUT).await
    }

    pub async fn start_with_timeout(
        mut cfg: ProxyConfig,
        first_config: Duration,
    ) -> anyhow::Result<Proxy> {
        cfg.validate()?;
        let instance = cfg.instance.clone().unwrap_or_else(|| {
            format!("{}-{:06x}", cfg.workload, rand::random::<u32>() & 0xff_ffff)
        });
        cfg.instance = Some(instance.clone());
        tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting proxy");
        let token = match &cfg.token_file {
            Some(p) => std::fs::read_to_string(p)
                .with_context(|| format!("cannot read --token-file {}", p.display()))?
                .trim()
                .to_string(),
            None => String::new(),
        };
        let metrics = metrics::Metrics::new();
        let (shutdown, shutdown_rx) = watch::channel(false);

        // Bind first, so a port conflict fails before anything registers.
        let inbound_listener = bind(cfg.inbound_addr, "inbound", "--inbound-addr").await?;
        let inbound_addr = inbound_listener.local_addr()?;
        drop(inbound_listener);
        let advertise_ip = cfg.advertise_addr.unwrap_or_else(|| {
            if inbound_addr.ip().is_unspecified() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                inbound_addr.ip()
            }
        });
        let mut cfg_bound = cfg.clone();
        cfg_bound.inbound_addr = inbound_addr;

        let identity = discovery::Identity {
            instance: instance.clone(),
            workload: cfg.workload.clone(),
            namespace: cfg.namespace.clone(),
            labels: cfg.labels.clone(),
            service_account: cfg.service_account(),
            inbound_addr: SocketAddr::new(advertise_ip, inbound_addr.port()).to_string(),
            admin_addr: String::new(),
            app_port: cfg.app_port,
            token,
        };
        // Admin and listeners need Inputs, which needs Discovery, which
        // needs the admin address to register: bind admin first.
        let admin_listener = bind(cfg.admin_addr, "admin", "--admin-addr").await?;
        let admin_addr = admin_listener.local_addr()?;
        drop(admin_listener);
        cfg_bound.admin_addr = admin_addr;
        let mut identity = identity;
        identity.admin_addr = SocketAddr::new(
            if admin_addr.ip().is_unspecified() {
                advertise_ip
            } else {
                admin_addr.ip()
            },
            admin_addr.port(),
        )
        .to_string();

        let telemetry = telemetry::Telemetry::new(
            telemetry::Own {
                namespace: cfg.namespace.clone(),
                workload: cfg.workload.clone(),
                service_account: cfg.service_account(),
                instance: instance.clone(),
                service: cfg
                    .labels
                    .get("app")
                    .cloned()
                    .unwrap_or_else(|| cfg.workload.clone()),
            },
            &trellis_resource::MeshSpec::default(),
            metrics.clone(),
        );
        let control = control::ControlClient::new(&cfg.control_plane, &identity.token)
            .map_err(|e| anyhow::anyhow!(e))?;
        let discovery = discovery::Discovery::start(
            control.clone(),
            identity,
            cfg.cache_dir.clone(),
            metrics.clone(),
            telemetry.clone(),
            shutdown_rx.clone(),
        );
        let inputs = inputs::Inputs::new(cfg_bound, discovery.clone(), metrics.clone(), telemetry);
        let inbound = inbound::Inbound::new(inputs.clone()).await?;
        let outbound = outbound::Outbound::new(inputs.clone()).await?;
        let admin = admin::Admin::new(inputs.clone()).await?;
        let dns = transparent::start(&cfg, inputs.clone()).await?;
        let proxy = Proxy {
            inbound_addr: inbound.local_addr(),
            outbound_addr: outbound.local_addr(),
            admin_addr: admin.local_addr(),
            upstream_addrs: outbound.upstream_addrs(),
            instance,
            shutdown,
            metrics,
            drain_grace: cfg.drain_grace,
        };
        tokio::spawn(admin.run(shutdown_rx.clone()));
        if !discovery.wait_loaded(first_config).await {
            let _ = proxy.shutdown.send(true);
            anyhow::bail!(
                "cannot reach the control plane at {} ({}) and there is no cached config{}: start the control plane, check --control-plane, or give --cache-dir of an earlier run",
                cfg.control_plane,
                discovery.last_error(),
                cfg.cache_dir
                    .as_ref()
                    .map(|d| format!(" in {}", d.display()))
                    .unwrap_or_default()
            );
        }
        // The workload identity needs the trust domain, which the config
        // (from the control plane or the cache) carries.
        let trust_domain = discovery.snapshot().mesh.trust_domain.clone();
        let spiffe =
            trellis_identity::SpiffeId::new(&trust_domain, &cfg.namespace, &cfg.service_account());
        let tls = tls::Tls::new(spiffe, cfg.cache_dir.clone())
            .map_err(|e| anyhow::anyhow!("workload key: {e}"))?;
        control.trust(tls.trusted_roots());
        discovery.set_tls(tls.clone());
        if tls.current().is_none() {
            if let Err(e) = tls.renew(&control).await {
                let _ = proxy.shutdown.send(true);
                anyhow::bail!(
                    "cannot get a certificate for {} from the control plane at {}: {e}",
                    tls.identity(),
                    cfg.control_plane
                );
            }
            control.trust(tls.trusted_roots());
        }
        tokio::spawn(tls.clone().run(control, shutdown_rx.clone()));
        tokio::spawn(inbound.run(shutdown_rx.clone()));
        tokio::spawn(traffic::health::run(inputs.clone(), shutdown_rx.clone()));
        if let Some(dns) = dns {
            tokio::spawn(dns.run(shutdown_rx.clone()));
        }
        tokio::spawn(outbound.run(shutdown_rx));
        tracing::info!(inbound = %proxy.inbound_addr, outbound = %proxy.outbound_addr, admin = %proxy.admin_addr, "proxy ready");
        Ok(proxy)
    }

    /// Requests being handled now, in both directions.
    pub fn in_flight(&self) -> u64 {
        self.metrics.in_flight_now()
    }

    /// Stops accepting, lets in-flight requests finish within the drain
    /// grace period, then returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_grace;
        while self.metrics.in_flight_now() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
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
