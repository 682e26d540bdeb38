//! The proxy's side of the proxy API: registration, on-demand subscription,
//! config updates (acked or nacked, never half-applied), traffic reports,
//! reconnection with backoff and jitter (to the next control plane replica
//! when there are several), and the on-disk cache of the last good config.
//!
//! A config older than the one running is refused: replicas of one store
//! stamp versions from its revisions, so an older version can only come
//! from a replica behind the others, and taking it would go back in time.
//! On shutdown the proxy leaves first (`leave`): the control plane removes
//! it from every caller's endpoints while it still serves.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prost::Message;
use rand::Rng;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{
    control_message, proxy_message, Ack, Config, ProxyMessage, Register, Subscribe,
};

use crate::control::{ControlClient, ControlError};
use crate::metrics::Metrics;
use crate::snapshot::{ServiceState, Snapshot, SvcKey};
use crate::telemetry::Telemetry;
use crate::tls::Tls;

const CACHE_FILE: &str = "config.pb";
const STATS_INTERVAL: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How long a request waits for the control plane to answer a subscription.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a leaving proxy waits for the control plane to close its stream.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What the proxy tells the control plane about itself.
#[derive(Clone, Debug)]
pub struct Identity {
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub service_account: String,
    pub inbound_addr: String,
    pub admin_addr: String,
    pub app_port: u16,
    pub token: String,
}

/// Why a session with the control plane ended (the proxy reconnects).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error("cannot send to the control plane: it stopped reading")]
    Backlogged,
    #[error("cannot send to the control plane: the stream is closed")]
    SendClosed,
    #[error("stream: {0}")]
    Stream(String),
    #[error("the control plane closed the stream")]
    Closed,
}

/// Why a config was refused before it was parsed.
fn older(version: u64, running: u64) -> String {
    format!(
        "config version {version} is older than the running {running}: a control plane replica behind the others sent it; keeping the running config"
    )
}

pub enum Lookup {
    Found(Arc<ServiceState>),
    /// The control plane says there is no such service.
    Missing,
    /// No answer: the control plane is away and the cache does not know it.
    Unavailable(String),
}

pub struct Discovery {
    snapshot: ArcSwap<Snapshot>,
    /// Whether a config (from the control plane or the cache) is loaded.
    loaded: AtomicBool,
    connected: AtomicBool,
    last_error: Mutex<String>,
    subs: Mutex<HashSet<SvcKey>>,
    sub_tx: mpsc::UnboundedSender<SvcKey>,
    applied: watch::Sender<u64>,
    cache_dir: Option<PathBuf>,
    control_plane: String,
    control: ControlClient,
    /// Set once the trust domain is known (after the first config).
    tls: std::sync::OnceLock<Arc<Tls>>,
    metrics: Arc<Metrics>,
    /// Follows the Mesh's telemetry settings; its uplink (span batches, tap
    /// events) rides the stream, and taps start and stop from it.
    telemetry: Arc<Telemetry>,
    /// Set when the proxy leaves the mesh (shutdown): end the stream, and
    /// connect no more.
    leave: watch::Sender<bool>,
    /// Set once the stream ended after `leave`.
    left: watch::Sender<bool>,
}

impl Discovery {
    /// Loads the cache, then connects in the background.
    pub fn start(
        control: ControlClient,
        id: Identity,
        cache_dir: Option<PathBuf>,
        metrics: Arc<Metrics>,
        telemetry: Arc<Telemetry>,
        shutdown: watch::Receiver<bool>,
    ) -> Arc<Discovery> {
        let url = control.addr().to_string();
        let (sub_tx, sub_rx) = mpsc::unbounded_channel();
        let d = Arc::new(Discovery {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            loaded: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            last_error: Mutex::new(String::new()),
            subs: Mutex::new(HashSet::new()),
            sub_tx,
            applied: watch::channel(0).0,
            cache_dir,
            control_plane: url,
            control,
            tls: std::sync::OnceLock::new(),
            metrics,
            telemetry,
            leave: watch::channel(false).0,
            left: watch::channel(false).0,
        });
        d.load_cache();
        tokio::spawn(d.clone().run(id, sub_rx, shutdown));
        d
    }

    pub fn set_tls(&self, tls: Arc<Tls>) {
        let _ = self.tls.set(tls);
    }

    pub fn tls(&self) -> Option<&Arc<Tls>> {
        self.tls.get()
    }

    pub fn snapshot(&self) -> arc_swap::Guard<Arc<Snapshot>> {
        self.snapshot.load()
    }

    /// Changes with each config applied (its version).
    pub fn watch_applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    pub fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Acquire)
    }

    pub fn last_error(&self) -> String {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Every replica given (`--control-plane`).
    pub fn control_plane(&self) -> &str {
        &self.control_plane
    }

    /// The replica of the current (or last) connection.
    pub fn current_replica(&self) -> String {
        self.control.current()
    }

    /// Waits until a config is loaded, or gives up after `timeout`.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let mut rx = self.applied.subscribe();
        let wait = async {
            while !self.is_loaded() {
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(timeout, wait).await;
        self.is_loaded()
    }

    /// Finds a service, subscribing to it on first use.
    pub async fn resolve(&self, key: &SvcKey) -> Lookup {
        // The common case first, without subscribing (the subscription's
        // count is shared by every worker).
        if let Some(found) = self.lookup_now(key) {
            return found;
        }
        // Subscribed before looking again, so that a config applied in
        // between is not missed.
        let mut rx = self.applied.subscribe();
        if let Some(found) = self.lookup_now(key) {
            return found;
        }
        let newly = self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key.clone());
        if newly {
            let _ = self.sub_tx.send(key.clone());
        }
        let wait = async {
            loop {
                if let Some(found) = self.lookup_now(key) {
                    return found;
                }
                if rx.changed().await.is_err() {
                    return Lookup::Unavailable("proxy is shutting down".into());
                }
            }
        };
        match tokio::time::timeout(RESOLVE_TIMEOUT, wait).await {
            Ok(found) => found,
            Err(_) if self.is_connected() => {
                Lookup::Unavailable(format!("the control plane did not answer for service {key} in time"))
            }
            Err(_) => Lookup::Unavailable(format!(
                "service {key} is not in this proxy's cached config and the control plane ({}) is unreachable: {}",
                self.control_plane,
                self.last_error()
            )),
        }
    }

    fn lookup_now(&self, key: &SvcKey) -> Option<Lookup> {
        let snap = self.snapshot.load();
        if let Some(s) = snap.service(key) {
            return Some(Lookup::Found(s.clone()));
        }
        if snap.missing.contains(key) {
            return Some(Lookup::Missing);
        }
        None
    }

    fn load_cache(&self) {
        let Some(dir) = &self.cache_dir else { return };
        let path = dir.join(CACHE_FILE);
        let Ok(bytes) = std::fs::read(&path) else {
            return;
        };
        let config = match Config::decode(bytes.as_slice()) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable config cache");
                return;
            }
        };
        match Snapshot::build(config, &Snapshot::default()) {
            Ok(snap) => {
                tracing::info!(version = snap.version, path = %path.display(), "starting from cached config");
                self.subs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(snap.known());
                self.install(snap);
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring invalid config cache")
            }
        }
    }

    fn install(&self, snap: Snapshot) {
        let version = snap.version;
        self.telemetry.configure(&snap.mesh);
        self.snapshot.store(Arc::new(snap));
        self.loaded.store(true, Ordering::Release);
        self.applied.send_replace(version);
    }

    /// Leaves the mesh: closes the stream, so that the control plane takes
    /// this proxy out of its callers' endpoints, and waits (up to
    /// `timeout`) until it did. Whether the control plane saw it leave.
    pub async fn leave(&self, timeout: Duration) -> bool {
        let mut left = self.left.subscribe();
        self.leave.send_replace(true);
        let wait = async {
            while !*left.borrow_and_update() {
                if left.changed().await.is_err() {
                    return false;
                }
            }
            true
        };
        tokio::time::timeout(timeout, wait).await.unwrap_or(false) && self.was_connected()
    }

    fn was_connected(&self) -> bool {
        self.metrics.control_plane_connects.get() > 0
    }

    /// Applies a config whole, or rejects it and keeps the running one.
    fn apply(&self, config: Config) -> Ack {
        let version = config.version;
        let running = self.snapshot.load().version;
        if self.is_loaded() && version < running {
            self.metrics.config_rejections.inc();
            let error = older(version, running);
            tracing::warn!(version, running, "{error}");
            return Ack {
                version,
                accepted: false,
                error,
            };
        }
        let encoded = config.encode_to_vec();
        let bundle = config.trust_bundle_pem.clone();
        match Snapshot::build(config, &self.snapshot.load()) {
            Ok(snap) => {
                self.install(snap);
                if let Some(tls) = self.tls.get() {
                    tls.set_bundle(&bundle);
                    self.control.trust(tls.trusted_roots());
                }
                self.write_cache(&encoded);
                tracing::debug!(version, "config applied");
                Ack {
                    version,
                    accepted: true,
                    error: String::new(),
                }
            }
            Err(error) => {
                self.metrics.config_rejections.inc();
                tracing::warn!(version, %error, "config rejected; keeping the running config");
                Ack {
                    version,
                    accepted: false,
                    error: error.to_string(),
                }
            }
        }
    }

    fn write_cache(&self, encoded: &[u8]) {
        let Some(dir) = &self.cache_dir else { return };
        // Write then rename, so a crash never leaves half a cache.
        let tmp = dir.join(format!("{CACHE_FILE}.tmp"));
        let res = std::fs::create_dir_all(dir)
            .and_then(|_| std::fs::write(&tmp, encoded))
            .and_then(|_| std::fs::rename(&tmp, dir.join(CACHE_FILE)));
        if let Err(e) = res {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot write the config cache");
        }
    }

    fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = e;
    }

    async fn run(
        self: Arc<Self>,
        id: Identity,
        mut sub_rx: mpsc::UnboundedReceiver<SvcKey>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut failures = 0u32;
        let mut leave = self.leave.subscribe();
        loop {
            if *leave.borrow() {
                self.left.send_replace(true);
                return;
            }
            let connects = self.metrics.control_plane_connects.get();
            let result = self
                .session(&id, &mut sub_rx, &mut shutdown, &mut leave)
                .await;
            if self.metrics.control_plane_connects.get() > connects {
                // The last session got through: start the backoff over.
                backoff = Duration::from_millis(100);
                failures = 0;
            }
            match result {
                Ok(()) => {
                    self.connected.store(false, Ordering::Release);
                    self.left.send_replace(true);
                    return;
                }
                Err(e) => {
                    // Another replica next, if there are several.
                    self.control.fail_over();
                    self.connected.store(false, Ordering::Release);
                    // Wake resolvers so they notice the control plane is gone.
                    self.applied.send_modify(|_| {});
                    if failures == 0 || failures.is_power_of_two() {
                        tracing::warn!(control_plane = %self.control.current(), error = %e, "control plane unreachable; serving the last config and retrying");
                    }
                    self.set_error(e.to_string());
                    failures += 1;
                }
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            tokio::select! {
                _ = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                _ = shutdown.changed() => return,
                _ = leave.changed() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One connection to the control plane; returns Ok on shutdown, and
    /// once the control plane closed the stream after `leave`.
    async fn session(
        &self,
        id: &Identity,
        sub_rx: &mut mpsc::UnboundedReceiver<SvcKey>,
        shutdown: &mut watch::Receiver<bool>,
        leave: &mut watch::Receiver<bool>,
    ) -> Result<(), SessionError> {
        let channel = self.control.channel().await?;
        let mut client = ProxyApiClient::new(channel)
            .max_decoding_message_size(trellis_api::MAX_CONTROL_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<ProxyMessage>(256);
        let subscriptions: Vec<String> = self
            .subs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|k| k.to_string())
            .collect();
        let register = Register {
            instance: id.instance.clone(),
            workload: id.workload.clone(),
            namespace: id.namespace.clone(),
            labels: id.labels.clone().into_iter().collect(),
            service_account: id.service_account.clone(),
            inbound_addr: id.inbound_addr.clone(),
            admin_addr: id.admin_addr.clone(),
            app_port: id.app_port as u32,
            subscriptions,
            running_version: self.snapshot.load().version,
            // A renewed token (Kubernetes) when the client reads a file.
            token: Some(self.control.current_token())
                .filter(|t| !t.is_empty())
                .unwrap_or_else(|| id.token.clone()),
        };
        // A full channel means the control plane stopped reading: drop the
        // stream and reconnect.
        let send = |tx: &mpsc::Sender<ProxyMessage>, msg| {
            tx.try_send(ProxyMessage { msg: Some(msg) })
                .map_err(|e| match e {
                    mpsc::error::TrySendError::Full(_) => SessionError::Backlogged,
                    mpsc::error::TrySendError::Closed(_) => SessionError::SendClosed,
                })
        };
        send(&tx, proxy_message::Msg::Register(register))?;
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(|e| SessionError::Stream(e.message().to_string()))?
            .into_inner();
        self.metrics.control_plane_connects.inc();
        let mut stats = tokio::time::interval(STATS_INTERVAL);
        stats.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut first = true;
        let mut uplink = self.telemetry.uplink().await;
        // Taps end with the stream that started them.
        let _taps = StopTaps(&self.telemetry);
        loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => match m.msg {
                        Some(control_message::Msg::Config(config)) => {
                            let ack = self.apply(config);
                            if first {
                                tracing::info!(control_plane = %self.control.current(), version = ack.version, "connected to the control plane");
                                first = false;
                                self.connected.store(true, Ordering::Release);
                                self.set_error(String::new());
                            }
                            send(&tx, proxy_message::Msg::Ack(ack))?;
                        }
                        Some(control_message::Msg::TapStart(t)) => self.telemetry.taps.start(t),
                        Some(control_message::Msg::TapStop(t)) => self.telemetry.taps.stop(&t.id),
                        None => {}
                    },
                    Ok(None) => return Err(SessionError::Closed),
                    Err(status) => return Err(SessionError::Stream(status.message().to_string())),
                },
                Some(msg) = uplink.recv() => {
                    // Span batches and tap events: dropped when the stream
                    // is backed up, like traffic reports.
                    let _ = send(&tx, msg);
                }
                Some(key) = sub_rx.recv() => {
                    let mut services = vec![key.to_string()];
                    while let Ok(k) = sub_rx.try_recv() {
                        services.push(k.to_string());
                    }
                    send(&tx, proxy_message::Msg::Subscribe(Subscribe { services }))?;
                }
                _ = stats.tick() => {
                    if let Some(report) = self.metrics.take_report(STATS_INTERVAL) {
                        if send(&tx, proxy_message::Msg::Stats(report)).is_err() {
                            self.metrics.stats_dropped.inc();
                        }
                    }
                }
                _ = shutdown.changed() => return Ok(()),
                _ = leave.changed() => break,
            }
        }
        // Leaving: end our half of the stream; the control plane withdraws
        // this proxy's endpoints, then ends its half.
        drop(tx);
        let closed = async { while let Ok(Some(_)) = inbound.message().await {} };
        let _ = tokio::time::timeout(LEAVE_TIMEOUT, closed).await;
        tracing::info!(control_plane = %self.control.current(), "left the control plane");
        Ok(())
    }
}

/// Stops every tap when a session ends.
struct StopTaps<'a>(&'a Telemetry);

impl Drop for StopTaps<'_> {
    fn drop(&mut self) {
        self.0.taps.stop_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn discovery() -> Arc<Discovery> {
        let metrics = Metrics::new();
        let own = crate::telemetry::Own {
            namespace: "default".into(),
            workload: "web".into(),
            service_account: "web".into(),
            instance: "web-0".into(),
            service: "web".into(),
        };
        let telemetry =
            Telemetry::new(own, &trellis_resource::MeshSpec::default(), metrics.clone());
        // No token: the background session never connects anywhere.
        let control = ControlClient::new("127.0.0.1:1", "").unwrap();
        let id = Identity {
            instance: "web-0".into(),
            workload: "web".into(),
            namespace: "default".into(),
            labels: Default::default(),
            service_account: "web".into(),
            inbound_addr: "127.0.0.1:15006".into(),
            admin_addr: "127.0.0.1:15000".into(),
            app_port: 8080,
            token: String::new(),
        };
        let (_tx, shutdown) = watch::channel(false);
        Discovery::start(control, id, None, metrics, telemetry, shutdown)
    }

    #[tokio::test]
    async fn configs_older_than_the_running_one_are_refused() {
        let d = discovery();
        let config = |version: u64| Config {
            version,
            ..Config::default()
        };
        assert!(d.apply(config(10 << 16)).accepted);
        // A replica behind the one that sent version 10<<16.
        let ack = d.apply(config(9 << 16));
        assert!(!ack.accepted);
        assert!(
            ack.error.contains("older than the running"),
            "{}",
            ack.error
        );
        assert_eq!(d.snapshot().version, 10 << 16, "the running config stays");
        assert_eq!(d.metrics.config_rejections.get(), 1);
        // Newer ones are taken as before.
        assert!(d.apply(config((10 << 16) + 1)).accepted);
        assert_eq!(d.snapshot().version, (10 << 16) + 1);
    }
}
