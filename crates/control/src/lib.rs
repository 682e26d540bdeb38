//! The Trellis control plane.
//!
//! It owns the store (embedded, or etcd shared by any number of replicas),
//! serves the HTTP API (apply, get, delete, stat, dashboard, metrics; every
//! route but health behind a credential, see `auth`) and the gRPC proxy
//! API, through which every proxy registers, follows the services its app
//! calls and reports traffic. Replicas are stateless: everything they
//! share lives in the store, and the singleton duties go to the one
//! holding the store's leader key. `ControlPlane::start` runs all of it
//! inside the caller's tokio runtime; `trellis control` and `trellis up`
//! both use it.
#![forbid(unsafe_code)]

pub mod auth;
pub mod http;
pub mod https;
pub mod identity_api;
pub mod idle;
pub mod kek;
pub mod mesh_identity;
pub mod metrics;
pub mod observe_api;
pub mod registry;
pub mod stats;
pub mod store;
pub mod tap;
pub mod traces;
pub mod vips;
pub mod xds;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};
use trellis_api::v1::proxy_api_server::ProxyApiServer;

pub use store::{EtcdConfig, EtcdStore, RedbStore, Store, StoreError, StoreEvent};

/// Configuration of `trellis control`.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ControlConfig {
    /// Where the store and the CA live.
    pub data_dir: PathBuf,
    /// HTTP API, dashboard and metrics (default 127.0.0.1:15080). Port 0 picks a free port.
    pub http_addr: SocketAddr,
    /// gRPC proxy API (default 127.0.0.1:15010). Port 0 picks a free port.
    pub grpc_addr: SocketAddr,
    /// A user-supplied CA; by default a root is made in `<data-dir>/ca`.
    #[serde(default)]
    pub ca: mesh_identity::CaFiles,
    /// TLS of the HTTP API; required when `http_addr` is not loopback.
    #[serde(default)]
    pub http_tls: HttpTls,
    /// Names (or IPs) clients use for the HTTP API besides loopback and the
    /// bound address: accepted in `Host`, and put in a mesh-CA certificate.
    #[serde(default)]
    pub http_hosts: Vec<String>,
    /// Where resources, tokens and the CA live.
    #[serde(default)]
    pub store: StoreKind,
    /// The key-encryption key of the secrets in the store (see `kek`);
    /// default `<data-dir>/kek`, made on first start, for the embedded
    /// store. Replicas on etcd must all be given the same one.
    #[serde(default)]
    pub kek_file: Option<PathBuf>,
    /// The mesh's state comes from an external source (Kubernetes) that
    /// says when it is in (`XdsHandle::source_synced`): until then proxies
    /// are registered but sent no Config, so none gets one made without
    /// the source's Services and endpoints.
    #[serde(default)]
    pub external_source: bool,
}

/// Which store backs the control plane.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StoreKind {
    /// `<data-dir>/store.redb`: one control plane on one host.
    #[default]
    Embedded,
    /// etcd, shared by any number of replicas.
    Etcd(EtcdConfig),
}

/// Where the HTTP API's certificate comes from.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum HttpTls {
    /// Plain HTTP: loopback only.
    #[default]
    Off,
    /// A certificate signed by the mesh CA (clients trust `<data-dir>/ca/roots.pem`).
    MeshCa,
    /// The user's certificate chain and key (PEM).
    Files { cert: PathBuf, key: PathBuf },
}

impl ControlConfig {
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        ControlConfig {
            data_dir: data_dir.into(),
            http_addr: ([127, 0, 0, 1], 15080).into(),
            grpc_addr: ([127, 0, 0, 1], 15010).into(),
            ca: Default::default(),
            http_tls: HttpTls::Off,
            http_hosts: Vec::new(),
            store: StoreKind::Embedded,
            kek_file: None,
            external_source: false,
        }
    }
}

/// How often the replica holding the singleton duties does them.
const DUTY_INTERVAL: Duration = Duration::from_secs(60);
/// Token records stay listed this long after they expired.
const EXPIRED_GRACE: Duration = Duration::from_secs(24 * 3600);

/// A name for this replica: the host's name and a random suffix.
fn replica_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "trellis".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0xff_ffff)
}

/// The store's file inside the data dir.
pub const STORE_FILE: &str = "store.redb";

/// Makes the data dir, readable by its owner only (and tightens one made
/// by an older version).
fn make_data_dir(dir: &std::path::Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    auth::set_mode(dir, 0o700).map_err(err)
}

/// The HTTP API's TLS config, if it serves TLS.
fn http_tls_config(
    cfg: &ControlConfig,
    identity: &Arc<mesh_identity::MeshIdentity>,
) -> Result<Option<Arc<rustls::ServerConfig>>, anyhow::Error> {
    match &cfg.http_tls {
        HttpTls::Off => Ok(None),
        HttpTls::MeshCa => {
            let mut names = cfg.http_hosts.clone();
            if !cfg.http_addr.ip().is_unspecified() {
                names.push(cfg.http_addr.ip().to_string());
            }
            Ok(Some(https::mesh_ca_config(
                identity.clone(),
                names,
                &[b"h2", b"http/1.1"],
            )?))
        }
        HttpTls::Files { cert, key } => {
            let read = |path: &PathBuf| {
                std::fs::read_to_string(path).map_err(|source| StartError::TlsFile {
                    path: path.clone(),
                    source,
                })
            };
            let (chain, key_pem) = (read(cert)?, read(key)?);
            Ok(Some(https::server_config(
                &chain,
                &key_pem,
                (&cert.display().to_string(), &key.display().to_string()),
            )?))
        }
    }
}

/// Serves the HTTP API on `listener` (plain or TLS) until `shutdown`.
async fn serve_http<L>(
    listener: L,
    app: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) where
    L: axum::serve::Listener<Addr = SocketAddr>,
    http::ClientAddr:
        for<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, L>>,
{
    let serve = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<http::ClientAddr>(),
    )
    .with_graceful_shutdown(shutdown);
    if let Err(e) = serve.await {
        warn!(error = %e, "HTTP API server failed");
    }
}

/// HTTP/2 pings on idle proxy streams: a proxy that died without closing
/// its connection (host lost, cable pulled) is found within about
/// interval + timeout, and its endpoints are withdrawn.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for servers to finish before cutting them off.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("port {port} is taken: is another control plane running? use {flag} to pick another address")]
    PortTaken { port: u16, flag: &'static str },
    #[error("cannot listen on {addr} ({flag}): {source}")]
    Bind {
        addr: SocketAddr,
        flag: &'static str,
        source: std::io::Error,
    },
    #[error("cannot create the data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the HTTP API would listen on {addr}, beyond loopback, in plain HTTP, where anyone on the network could read its credentials: give it TLS with --http-tls-cert FILE --http-tls-key FILE, or --http-tls-mesh-ca for a certificate from the mesh CA (clients then trust <data-dir>/ca/roots.pem), or listen on 127.0.0.1")]
    PlainHttpBeyondLoopback { addr: SocketAddr },
    #[error("cannot read {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] https::TlsError),
    #[error(transparent)]
    Bootstrap(#[from] auth::BootstrapError),
    #[error("with --store etcd every replica needs the same key-encryption key: give --kek-file FILE (32 random bytes: `head -c 32 /dev/urandom > kek; chmod 600 kek`, copied to every replica)")]
    NoKek,
    #[error(transparent)]
    Kek(#[from] kek::KekError),
    #[error(transparent)]
    Identity(#[from] mesh_identity::IdentityError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Xds(#[from] xds::XdsError),
}

/// A running control plane.
pub struct ControlPlane {
    /// Where the HTTP API listens (the actual port when 0 was asked).
    pub http_addr: SocketAddr,
    /// Where the gRPC proxy API listens.
    pub grpc_addr: SocketAddr,
    store: Arc<dyn Store>,
    identity: Arc<mesh_identity::MeshIdentity>,
    auth: Arc<auth::Auth>,
    admin_token: String,
    replica: String,
    xds: xds::XdsHandle,
    actor: JoinHandle<()>,
    duties: JoinHandle<()>,
    servers: Vec<(&'static str, oneshot::Sender<()>, JoinHandle<()>)>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("http_addr", &self.http_addr)
            .field("grpc_addr", &self.grpc_addr)
            .finish()
    }
}

async fn bind(addr: SocketAddr, flag: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).await.map_err(|source| {
        if source.kind() == std::io::ErrorKind::AddrInUse {
            StartError::PortTaken {
                port: addr.port(),
                flag,
            }
        } else {
            StartError::Bind { addr, flag, source }
        }
    })
}

impl ControlPlane {
    /// Opens the store, binds both listeners and starts serving. Returns
    /// once both ports accept connections.
    pub async fn start(cfg: ControlConfig) -> anyhow::Result<ControlPlane> {
        info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting control plane");
        if !cfg.http_addr.ip().is_loopback() && cfg.http_tls == HttpTls::Off {
            return Err(StartError::PlainHttpBeyondLoopback {
                addr: cfg.http_addr,
            }
            .into());
        }
        make_data_dir(&cfg.data_dir)?;
        // Bind first: a taken port is the likelier mistake, and says more
        // than a store held by the other process.
        let http_listener = bind(cfg.http_addr, "--http-addr").await?;
        let grpc_listener = bind(cfg.grpc_addr, "--grpc-addr").await?;
        let http_addr = http_listener.local_addr()?;
        let grpc_addr = grpc_listener.local_addr()?;

        let replica = replica_id();
        let kek = match (&cfg.kek_file, &cfg.store) {
            (Some(path), _) => kek::Kek::load(path)?,
            (None, StoreKind::Embedded) => {
                kek::Kek::load_or_create(&cfg.data_dir.join(kek::DEFAULT_FILE))?
            }
            (None, StoreKind::Etcd(_)) => return Err(StartError::NoKek.into()),
        };
        let store: Arc<dyn Store> = match &cfg.store {
            StoreKind::Embedded => {
                let store_path = cfg.data_dir.join(STORE_FILE);
                let store = RedbStore::open(&store_path).await?;
                auth::set_mode(&store_path, 0o600).map_err(|source| StartError::DataDir {
                    path: store_path.clone(),
                    source,
                })?;
                Arc::new(store)
            }
            StoreKind::Etcd(etcd) => {
                let info = serde_json::json!({
                    "id": replica,
                    "http": http_addr,
                    "grpc": grpc_addr,
                    "startedAt": std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs())
                        .unwrap_or(0),
                });
                Arc::new(EtcdStore::open(etcd, &replica, info.to_string().into_bytes()).await?)
            }
        };
        info!(store = %store.describe(), replica = %replica, kek = kek.id(), "store open");
        let metrics = Arc::new(metrics::Metrics::new());
        let stats = Arc::new(stats::Stats::new());
        let identity = Arc::new(
            mesh_identity::MeshIdentity::open(&cfg.data_dir, &cfg.ca, store.clone(), Arc::new(kek))
                .await?,
        );
        let (xds, actor) = xds::start(
            store.clone(),
            metrics.clone(),
            identity.clone(),
            replica.clone(),
            cfg.external_source,
        )
        .await?;
        // The proxy API's certificate follows the CA (rotation, retire).
        let grpc_tls = https::mesh_ca_config(identity.clone(), Vec::new(), &[b"h2"])?;
        let auth = Arc::new(auth::Auth::new(store.clone(), metrics.clone()));
        let admin_token = auth.bootstrap(&cfg.data_dir).await?;
        let duties = tokio::spawn(singleton_duties(
            store.leader(),
            auth.clone(),
            identity.clone(),
        ));
        let http_tls = http_tls_config(&cfg, &identity)?;

        let mut servers = Vec::new();

        let (tx, rx) = oneshot::channel::<()>();
        let observers = xds::Observers::default();
        let service = ProxyApiServer::new(
            xds::ProxyApiService::new(&xds, stats.clone(), identity.clone())
                .with_observers(observers.clone()),
        );
        // The proxy API is served over TLS only; proxies verify this chain
        // against the root their join token pins.
        let grpc_incoming = https::TlsListener::new(grpc_listener, grpc_tls)
            .map_err(|e| anyhow::anyhow!("cannot serve the proxy API: {e}"))?
            .into_stream();
        let grpc = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(service)
            .add_service(
                opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceServiceServer::new(
                    traces::Receiver::new(observers.traces.clone(), auth.clone()),
                ),
            )
            .serve_with_incoming_shutdown(grpc_incoming, async {
                let _ = rx.await;
            });
        let task = tokio::spawn(async move {
            if let Err(e) = grpc.await {
                warn!(error = %e, "proxy API server failed");
            }
        });
        servers.push(("proxy API", tx, task));

        let (tx, rx) = oneshot::channel::<()>();
        let state = http::AppState::new(http::AppDeps {
            store: store.clone(),
            xds: xds.clone(),
            stats,
            metrics,
            observers,
            identity: identity.clone(),
            auth: auth.clone(),
            bind: http_addr,
            hosts: cfg.http_hosts.clone(),
        });
        let app = http::router(state);
        let shutdown = async {
            let _ = rx.await;
        };
        let task = match http_tls {
            Some(config) => tokio::spawn(serve_http(
                https::TlsListener::new(http_listener, config)?,
                app,
                shutdown,
            )),
            None => tokio::spawn(serve_http(http_listener, app, shutdown)),
        };
        servers.push(("HTTP API", tx, task));

        info!(%http_addr, %grpc_addr, data_dir = %cfg.data_dir.display(), "control plane ready");
        Ok(ControlPlane {
            http_addr,
            grpc_addr,
            store,
            identity,
            auth,
            admin_token,
            replica,
            xds,
            actor,
            duties,
            servers,
        })
    }

    /// This replica's name (in its endpoint records and in etcd).
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The bootstrap admin token (also in `<data-dir>/admin-token`), for
    /// tests and embedders.
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// API tokens, for tests and embedders.
    pub fn auth(&self) -> Arc<auth::Auth> {
        self.auth.clone()
    }

    /// The CA and join tokens, for tests and embedders.
    pub fn identity(&self) -> Arc<mesh_identity::MeshIdentity> {
        self.identity.clone()
    }

    /// The proxy API's registry, for an external endpoint source
    /// (Kubernetes).
    pub fn xds(&self) -> xds::XdsHandle {
        self.xds.clone()
    }

    /// The resource store, for tests and embedders.
    pub fn store(&self) -> Arc<dyn Store> {
        self.store.clone()
    }

    /// Stops serving, closes every proxy stream and closes the store.
    pub async fn shutdown(self) {
        info!("control plane shutting down");
        self.duties.abort();
        // End the proxy streams first: graceful server shutdown waits for
        // open streams, and these never end by themselves.
        self.xds.shutdown().await;
        if tokio::time::timeout(DRAIN_TIMEOUT, self.actor)
            .await
            .is_err()
        {
            warn!("proxy API actor did not stop in time");
        }
        for (name, tx, mut task) in self.servers {
            let _ = tx.send(());
            if tokio::time::timeout(DRAIN_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                warn!(server = name, "did not drain in time; closing it");
                task.abort();
                let _ = task.await;
            }
        }
        if let Err(e) = self.store.close().await {
            warn!(error = %e, "closing the store failed");
        }
        info!("control plane stopped");
    }
}

/// What one replica does for all, while it holds the store's leader key:
/// removing the records of tokens long expired, and their revocations.
async fn singleton_duties(
    mut leader: tokio::sync::watch::Receiver<bool>,
    auth: Arc<auth::Auth>,
    identity: Arc<mesh_identity::MeshIdentity>,
) {
    loop {
        while !*leader.borrow_and_update() {
            if leader.changed().await.is_err() {
                return;
            }
        }
        match auth.remove_expired(EXPIRED_GRACE).await {
            Ok(joins) => {
                for id in &joins {
                    if let Err(e) = identity.forget_revocation(id).await {
                        warn!(error = %e, "cannot remove a revocation");
                    }
                }
                if !joins.is_empty() {
                    info!(
                        join_tokens = joins.len(),
                        "removed the records of expired tokens"
                    );
                }
            }
            Err(e) => warn!(error = %e, "cannot remove expired token records; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(DUTY_INTERVAL) => {}
            _ = leader.changed() => {}
        }
    }
}
