//! The proxy API server: one bidirectional stream per proxy.
//!
//! A single actor task owns the registry (connected proxies and the
//! resource index) and decides what every proxy is sent. gRPC stream tasks
//! and the store feed it events over a channel; it answers through one
//! `watch` channel per proxy, which keeps only the newest Config, so a slow
//! proxy never blocks the actor and never gets stale configs queued. The
//! HTTP API reads an arc-swapped snapshot that the actor publishes.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use futures::Stream;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use trellis_api::v1::proxy_api_server::ProxyApi;
use trellis_api::v1::proxy_message::Msg;
use trellis_api::v1::{control_message, Ack, Config, ControlMessage, ProxyMessage, Register};
use trellis_identity::token::Claims;

use crate::metrics::Metrics;
use crate::registry::{
    Breach, ConnId, EndpointCache, Proxy, ProxyView, Registry, ResourceIndex, SelectionMemo,
    ServiceName,
};
use crate::stats::Stats;
use crate::store::{Store, StoreEvent};

/// A proxy must register this soon after opening its stream.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);
const EVENT_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("cannot load resources from the store: {0}")]
    Store(#[from] crate::store::StoreError),
}

/// What the HTTP API sees of the proxies.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub proxies: Vec<ProxyView>,
    pub trust_domain: String,
    /// `Mesh.certificateTTL`.
    pub certificate_ttl: std::time::Duration,
    /// Each Service's VIP (pods mode).
    pub vips: crate::vips::Vips,
}

/// Shared by the gRPC server, the HTTP API and `ControlPlane`.
#[derive(Clone)]
pub struct XdsHandle {
    events: mpsc::Sender<Event>,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl XdsHandle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// Sends every proxy a new trust bundle.
    pub async fn set_trust_bundle(&self, bundle: Vec<String>) {
        let _ = self.events.send(Event::TrustBundle(bundle)).await;
    }

    /// Makes `endpoints` every Service's endpoints from now on, in place of
    /// the registered proxies (Kubernetes: EndpointSlices are the truth),
    /// and `vips` their VIPs (ClusterIPs) when given; sends the proxies
    /// whose Configs change.
    pub async fn set_external_endpoints(
        &self,
        endpoints: Arc<std::collections::BTreeMap<ServiceName, Vec<trellis_api::v1::Endpoint>>>,
        vips: Option<std::collections::BTreeMap<ServiceName, std::net::Ipv4Addr>>,
    ) {
        let _ = self.events.send(Event::Endpoints(endpoints, vips)).await;
    }

    /// The connected proxies whose Config `proposed` (the whole set of
    /// resources an apply would leave) would push over the Config budget,
    /// or grow while over it; `applied` are the apply's own resources, the
    /// ones to blame first.
    pub async fn check_budget(
        &self,
        proposed: Vec<trellis_resource::Resource>,
        applied: BTreeSet<trellis_resource::ResourceKey>,
    ) -> Vec<Breach> {
        let (reply, rx) = oneshot::channel();
        let ev = Event::CheckBudget {
            proposed,
            applied,
            reply,
        };
        if self.events.send(ev).await.is_err() {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Stops the actor: every proxy stream ends.
    pub async fn shutdown(&self) {
        let _ = self.events.send(Event::Shutdown).await;
    }
}

/// What a proxy's response stream is told to do next.
#[derive(Clone, Debug)]
enum Out {
    Nothing,
    Config(Config),
    Close(Code, String),
}

/// The actor's end of one stream.
struct Link {
    out: watch::Sender<Out>,
    /// Dropping it stops the stream's reader task.
    _kill: oneshot::Sender<()>,
}

enum Event {
    Register {
        conn: ConnId,
        register: Box<Register>,
        out: watch::Sender<Out>,
        kill: oneshot::Sender<()>,
    },
    Subscribe {
        conn: ConnId,
        services: Vec<String>,
    },
    Ack {
        conn: ConnId,
        ack: Ack,
    },
    Disconnect {
        conn: ConnId,
    },
    /// The CA's roots changed (rotation): every proxy gets the new bundle.
    TrustBundle(Vec<String>),
    /// An external source's endpoints (Kubernetes).
    Endpoints(
        Arc<std::collections::BTreeMap<ServiceName, Vec<trellis_api::v1::Endpoint>>>,
        Option<std::collections::BTreeMap<ServiceName, std::net::Ipv4Addr>>,
    ),
    CheckBudget {
        proposed: Vec<trellis_resource::Resource>,
        applied: BTreeSet<trellis_resource::ResourceKey>,
        reply: oneshot::Sender<Vec<Breach>>,
    },
    Shutdown,
}

/// Which proxies to recompute.
enum Scope {
    All,
    One(ConnId),
    /// Proxies whose config holds endpoints of these services, plus one.
    Affected(BTreeSet<ServiceName>, Option<ConnId>),
}

/// Gives new Services a VIP and stores the table before any proxy sees
/// it, so an address handed out survives a restart.
async fn assign_vips(registry: &mut Registry, store: &dyn Store) {
    if registry.vips.assign(registry.resources.services.keys()) {
        if let Err(e) = registry.vips.save(store).await {
            warn!(error = %e, "cannot store the service VIP table; VIPs may change on restart");
        }
    }
}

/// Starts the actor on the store's current state.
pub async fn start(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    trust_bundle: Vec<String>,
) -> Result<(XdsHandle, JoinHandle<()>), XdsError> {
    // Watch before listing, so no change falls between the two.
    let store_events = store.watch();
    let (resources, revision) = store.list(None).await?;
    let mut registry = Registry {
        proxies: Default::default(),
        resources: ResourceIndex::new(&resources),
        trust_bundle,
        vips: crate::vips::Vips::load(store.as_ref())
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "cannot read the service VIP table; assigning anew");
                Default::default()
            }),
        endpoint_source: Default::default(),
    };
    assign_vips(&mut registry, store.as_ref()).await;
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    // Versions start at the wall clock so that they keep growing across
    // restarts, and proxies can tell a newer config from their cached one.
    let version = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1);
    let actor = Actor {
        registry,
        links: HashMap::new(),
        version,
        revision,
        store,
        metrics,
        snapshot: snapshot.clone(),
    };
    actor.publish();
    let task = tokio::spawn(actor.run(rx, store_events));
    Ok((
        XdsHandle {
            events: tx,
            snapshot,
        },
        task,
    ))
}

struct Actor {
    registry: Registry,
    links: HashMap<ConnId, Link>,
    /// The last version sent to any proxy.
    version: u64,
    /// The store revision the resource index reflects.
    revision: u64,
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    snapshot: Arc<ArcSwap<Snapshot>>,
}

impl Actor {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut store_events: broadcast::Receiver<StoreEvent>,
    ) {
        let mut store_open = true;
        // Publish at once: the CA reads the certificate TTL from here.
        self.publish();
        loop {
            tokio::select! {
                ev = events.recv() => match ev {
                    None | Some(Event::Shutdown) => break,
                    Some(ev) => {
                        self.handle(ev);
                        // Handle what else is queued before publishing:
                        // publishing copies every proxy's view, so doing it
                        // after each of a burst of events (thousands of
                        // proxies registering, or acking a mesh-wide
                        // change) made that burst quadratic.
                        let mut shutdown = false;
                        for _ in 0..EVENT_QUEUE {
                            match events.try_recv() {
                                Ok(Event::Shutdown) => {
                                    shutdown = true;
                                    break;
                                }
                                Ok(ev) => self.handle(ev),
                                Err(_) => break,
                            }
                        }
                        if shutdown {
                            break;
                        }
                    }
                },
                r = store_events.recv(), if store_open => match r {
                    Ok(ev) if ev.revision <= self.revision => continue,
                    // Lagged: some events were lost, but a reload reads
                    // everything anyway.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        // Coalesce a burst of applies into one reload.
                        while store_events.try_recv().is_ok() {}
                        self.reload().await;
                    }
                    Err(broadcast::error::RecvError::Closed) => store_open = false,
                },
            }
            self.publish();
        }
        info!(
            proxies = self.links.len(),
            "proxy API stopped; closing streams"
        );
        self.links.clear();
        self.metrics.connected_proxies.set(0);
        self.publish_empty();
    }

    async fn reload(&mut self) {
        match self.store.list(None).await {
            Ok((resources, revision)) => {
                self.registry.resources = ResourceIndex::new(&resources);
                assign_vips(&mut self.registry, self.store.as_ref()).await;
                self.revision = revision;
                self.update(Scope::All);
            }
            // Keep serving the last good state; the next event retries.
            Err(e) => warn!(error = %e, "cannot reload resources; proxies keep their config"),
        }
    }

    fn handle(&mut self, ev: Event) {
        match ev {
            Event::Register {
                conn,
                register,
                out,
                kill,
            } => self.register(conn, register, out, kill),
            Event::Subscribe { conn, services } => {
                let Some(p) = self.registry.proxies.get_mut(&conn) else {
                    return;
                };
                let before = p.subscriptions.len();
                p.subscriptions.extend(services);
                if p.subscriptions.len() != before {
                    self.update(Scope::One(conn));
                }
            }
            Event::Ack { conn, ack } => {
                let Some(p) = self.registry.proxies.get_mut(&conn) else {
                    return;
                };
                if ack.accepted {
                    p.acked_version = ack.version;
                    p.last_error = None;
                } else {
                    warn!(
                        instance = %p.instance,
                        version = ack.version,
                        error = %ack.error,
                        "proxy rejected a config"
                    );
                    self.metrics.nacks.inc();
                    p.last_error = Some(if ack.error.is_empty() {
                        format!("config {} rejected", ack.version)
                    } else {
                        ack.error
                    });
                }
            }
            Event::Disconnect { conn } => {
                if let Some(p) = self.remove(conn) {
                    info!(instance = %p.instance, workload = %p.workload, "proxy disconnected");
                    let affected = self.registry.services_selecting(&p);
                    self.update(Scope::Affected(affected, None));
                }
            }
            Event::TrustBundle(bundle) => {
                self.registry.trust_bundle = bundle;
                self.update(Scope::All);
            }
            Event::Endpoints(endpoints, vips) => {
                if let Some(vips) = vips {
                    let vips = crate::vips::Vips::fixed(vips);
                    if vips != self.registry.vips {
                        self.registry.vips = vips;
                        // Services without a ClusterIP (headless) get one
                        // of the mesh's own; not stored, the source is the truth.
                        let services = self.registry.resources.services.keys();
                        self.registry.vips.assign(services);
                        self.update(Scope::All);
                    }
                }
                // Only the proxies whose Configs hold a Service whose
                // endpoints changed are recomputed.
                let changed: BTreeSet<ServiceName> = match &self.registry.endpoint_source {
                    crate::registry::EndpointSource::External(old) => endpoints
                        .iter()
                        .filter(|(k, v)| old.get(*k) != Some(*v))
                        .map(|(k, _)| k.clone())
                        .chain(old.keys().filter(|k| !endpoints.contains_key(*k)).cloned())
                        .collect(),
                    crate::registry::EndpointSource::Registrations => {
                        self.registry.resources.services.keys().cloned().collect()
                    }
                };
                self.registry.endpoint_source =
                    crate::registry::EndpointSource::External(endpoints);
                self.update(Scope::Affected(changed, None));
            }
            Event::CheckBudget {
                proposed,
                applied,
                reply,
            } => {
                let _ = reply.send(self.check_budget(&proposed, &applied));
            }
            Event::Shutdown => {}
        }
    }

    fn register(
        &mut self,
        conn: ConnId,
        register: Box<Register>,
        out: watch::Sender<Out>,
        kill: oneshot::Sender<()>,
    ) {
        let proxy = Proxy::from_register(conn, &register);
        let mut affected = BTreeSet::new();
        // An instance that reconnects before its old stream was found dead
        // replaces it, so it is never listed twice as an endpoint.
        let stale: Vec<ConnId> = self
            .registry
            .proxies
            .values()
            .filter(|p| p.instance == proxy.instance)
            .map(|p| p.conn)
            .collect();
        for old in stale {
            if let Some(link) = self.links.get(&old) {
                link.out.send_replace(Out::Close(
                    Code::Aborted,
                    "a newer stream of this proxy instance replaced this one".into(),
                ));
            }
            if let Some(p) = self.remove(old) {
                affected.extend(self.registry.services_selecting(&p));
            }
        }
        info!(
            instance = %proxy.instance,
            workload = %proxy.workload,
            namespace = %proxy.namespace,
            inbound = %proxy.inbound_addr,
            subscriptions = proxy.subscriptions.len(),
            "proxy registered"
        );
        affected.extend(self.registry.services_selecting(&proxy));
        self.registry.proxies.insert(conn, proxy);
        self.links.insert(conn, Link { out, _kill: kill });
        self.metrics
            .connected_proxies
            .set(self.registry.proxies.len() as i64);
        self.update(Scope::Affected(affected, Some(conn)));
    }

    fn remove(&mut self, conn: ConnId) -> Option<Proxy> {
        self.links.remove(&conn);
        let p = self.registry.proxies.remove(&conn);
        self.metrics
            .connected_proxies
            .set(self.registry.proxies.len() as i64);
        p
    }

    /// Every proxy's Config size under the current resources.
    fn config_sizes(&self) -> HashMap<ConnId, usize> {
        use prost::Message as _;
        let mut memo = SelectionMemo::default();
        let mut cache = self.registry.all_endpoints(&mut memo);
        self.registry
            .proxies
            .values()
            .map(|p| {
                let (config, _) = self.registry.full_config(p, &mut cache, &mut memo);
                (p.conn, config.encoded_len())
            })
            .collect()
    }

    /// See `XdsHandle::check_budget`. Builds every connected proxy's
    /// Config twice (now, and with `proposed`), as a reload does once.
    fn check_budget(
        &mut self,
        proposed: &[trellis_resource::Resource],
        applied: &BTreeSet<trellis_resource::ResourceKey>,
    ) -> Vec<Breach> {
        use prost::Message as _;
        let before = self.config_sizes();
        let current = std::mem::replace(&mut self.registry.resources, ResourceIndex::new(proposed));
        let mut breaches = Vec::new();
        let mut memo = SelectionMemo::default();
        let mut cache = self.registry.all_endpoints(&mut memo);
        for p in self.registry.proxies.values() {
            let (config, _) = self.registry.full_config(p, &mut cache, &mut memo);
            let bytes = config.encoded_len();
            let grew = before.get(&p.conn).is_none_or(|&b| bytes > b);
            if bytes > trellis_api::CONFIG_BUDGET_BYTES && grew {
                breaches.push(Breach {
                    instance: p.instance.clone(),
                    namespace: p.namespace.clone(),
                    workload: p.workload.clone(),
                    bytes,
                    part: self.registry.blame(&config, applied),
                });
            }
        }
        self.registry.resources = current;
        breaches
    }

    /// Recomputes the configs in `scope` and sends those that changed.
    fn update(&mut self, scope: Scope) {
        let mut memo = SelectionMemo::default();
        // Every proxy's Config is recomputed: index every Service's
        // endpoints in one pass over the proxies first.
        let mut cache = match scope {
            Scope::All => self.registry.all_endpoints(&mut memo),
            _ => EndpointCache::new(),
        };
        let mut changed = Vec::new();
        for p in self.registry.proxies.values() {
            let wanted = match &scope {
                Scope::All => true,
                Scope::One(c) => *c == p.conn,
                Scope::Affected(services, extra) => {
                    *extra == Some(p.conn) || !p.depends_on.is_disjoint(services)
                }
            };
            if !wanted {
                continue;
            }
            let (config, deps) = self.registry.full_config(p, &mut cache, &mut memo);
            let hash = config.content_hash();
            if p.sent_hash != Some(hash) {
                changed.push((p.conn, config, deps, hash));
            }
        }
        for (conn, mut config, deps, hash) in changed {
            // Over the budget, a Config would fail the proxy's decoding and
            // make it reconnect in a loop: it keeps its last one instead.
            let bytes = prost::Message::encoded_len(&config);
            let withheld = (bytes > trellis_api::CONFIG_BUDGET_BYTES).then(|| {
                self.registry.proxies.get(&conn).map(|p| Breach {
                    instance: p.instance.clone(),
                    namespace: p.namespace.clone(),
                    workload: p.workload.clone(),
                    bytes,
                    part: self.registry.blame(&config, &BTreeSet::new()),
                })
            });
            if let Some(Some(breach)) = withheld {
                let Some(p) = self.registry.proxies.get_mut(&conn) else {
                    continue;
                };
                p.depends_on = deps;
                if p.withheld_hash != Some(hash) {
                    p.withheld_hash = Some(hash);
                    self.metrics.configs_over_budget.inc();
                    let reason = breach.reason();
                    if p.config_withheld.is_none() {
                        warn!(
                            instance = %p.instance,
                            workload = %p.workload,
                            namespace = %p.namespace,
                            bytes,
                            largest = %breach.part.what,
                            "not sending a proxy its Config: over the Config budget; it keeps its last one"
                        );
                    }
                    p.config_withheld = Some(reason);
                }
                continue;
            }
            let (Some(p), Some(link)) =
                (self.registry.proxies.get_mut(&conn), self.links.get(&conn))
            else {
                continue;
            };
            self.version += 1;
            config.version = self.version;
            debug!(
                instance = %p.instance,
                version = config.version,
                services = config.services.len(),
                "sending config"
            );
            link.out.send_replace(Out::Config(config));
            if p.config_withheld.take().is_some() {
                info!(instance = %p.instance, "a proxy's Config is within the budget again; sent");
            }
            p.withheld_hash = None;
            p.sent_version = self.version;
            p.sent_hash = Some(hash);
            p.depends_on = deps;
            self.metrics.configs_sent.inc();
        }
    }

    fn publish(&self) {
        let td = self.registry.trust_domain().to_string();
        let proxies = self
            .registry
            .proxies
            .values()
            .map(|p| p.view(&td))
            .collect();
        self.snapshot.store(Arc::new(Snapshot {
            proxies,
            trust_domain: td,
            certificate_ttl: self.registry.resources.certificate_ttl(),
            vips: self.registry.vips.clone(),
        }));
    }

    fn publish_empty(&self) {
        self.snapshot.store(Arc::new(Snapshot {
            proxies: Vec::new(),
            trust_domain: self.registry.trust_domain().to_string(),
            certificate_ttl: self.registry.resources.certificate_ttl(),
            vips: self.registry.vips.clone(),
        }));
    }
}

/// The tonic service.
pub struct ProxyApiService {
    events: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    next_conn: AtomicU64,
    identity: Arc<crate::mesh_identity::MeshIdentity>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    observers: Observers,
}

/// Where spans and tap events from the proxies go.
#[derive(Clone, Default)]
pub struct Observers {
    pub traces: Arc<crate::traces::Traces>,
    pub taps: Arc<crate::tap::TapHub>,
}

impl ProxyApiService {
    pub fn new(
        handle: &XdsHandle,
        stats: Arc<Stats>,
        identity: Arc<crate::mesh_identity::MeshIdentity>,
    ) -> Self {
        ProxyApiService {
            events: handle.events.clone(),
            stats,
            next_conn: AtomicU64::new(1),
            identity,
            snapshot: handle.snapshot.clone(),
            observers: Observers::default(),
        }
    }

    /// Sends the proxies' spans and tap events to these.
    pub fn with_observers(mut self, observers: Observers) -> Self {
        self.observers = observers;
        self
    }
}

type ConfigStream = Pin<Box<dyn Stream<Item = Result<ControlMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ProxyApi for ProxyApiService {
    type StreamStream = ConfigStream;

    async fn sign(
        &self,
        request: Request<trellis_api::v1::SignRequest>,
    ) -> Result<Response<trellis_api::v1::SignResponse>, Status> {
        let claims = self.identity.authenticate(&request.get_ref().token).await?;
        let snap = self.snapshot.load();
        let resp = self.identity.sign(
            &claims,
            request.get_ref(),
            &snap.trust_domain,
            snap.certificate_ttl,
        )?;
        Ok(Response::new(resp))
    }

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let peer = request.remote_addr();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register message within 30s"))??;
        let Some(ProxyMessage {
            msg: Some(Msg::Register(register)),
        }) = first
        else {
            return Err(Status::invalid_argument(
                "the first message on a stream must be Register",
            ));
        };
        if register.workload.is_empty() {
            return Err(Status::invalid_argument("Register.workload is empty"));
        }
        if register.instance.is_empty() {
            return Err(Status::invalid_argument("Register.instance is empty"));
        }
        // A proxy is the identity its token grants, serves only the labels
        // it grants, and at the address it connects from (or the one the
        // token grants): nothing else.
        let claims = self.identity.authenticate(&register.token).await?;
        let mut register = register;
        register.inbound_addr = admit(&claims, &register, peer).inspect_err(|e| {
            warn!(
                instance = %register.instance,
                token = %claims.id,
                ?peer,
                reason = %e.message(),
                "refused a proxy's registration"
            );
        })?;
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        debug!(?peer, conn, instance = %register.instance, "stream opened");
        let taps = self.observers.taps.connect(
            conn,
            &register.workload,
            &register.namespace,
            &register.instance,
        );
        let (out_tx, out_rx) = watch::channel(Out::Nothing);
        let (kill_tx, kill_rx) = oneshot::channel();
        self.events
            .send(Event::Register {
                conn,
                register: Box::new(register),
                out: out_tx,
                kill: kill_tx,
            })
            .await
            .map_err(|_| Status::unavailable("the control plane is shutting down"))?;
        tokio::spawn(read_loop(
            conn,
            inbound,
            self.events.clone(),
            self.stats.clone(),
            kill_rx,
            self.observers.clone(),
        ));
        Ok(Response::new(Box::pin(out_stream(out_rx, taps))))
    }
}

/// Whether a registration stays within what its token grants; returns the
/// inbound address to publish. The identity must be the token's; every
/// label the proxy claims must be one the token grants (fewer labels select
/// fewer Services, so a subset is safe, and a token without labels grants
/// none); the inbound address's IP must be the one the proxy connects from,
/// or the one the token grants. A proxy listening on every interface
/// (`0.0.0.0:15006`) is published at the address it connects from.
fn admit(claims: &Claims, register: &Register, peer: Option<SocketAddr>) -> Result<String, Status> {
    if claims.namespace != register.namespace || claims.service_account != register.service_account
    {
        return Err(Status::permission_denied(format!(
            "the token grants namespace {} and service account {}, but the proxy registers as {}/{}",
            claims.namespace, claims.service_account, register.namespace, register.service_account
        )));
    }
    let extra: Vec<String> = register
        .labels
        .iter()
        .filter(|(k, v)| claims.labels.get(*k) != Some(*v))
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    if !extra.is_empty() {
        let all: Vec<String> = register
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let granted = if claims.labels.is_empty() {
            "no labels".to_string()
        } else {
            let g: Vec<String> = claims
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            format!("only {}", g.join(","))
        };
        return Err(Status::permission_denied(format!(
            "the proxy claims labels {} that its token does not grant (the token grants {granted}): make a token for them with `trellis token create -n {} --service-account {} --labels {}`",
            extra.join(","),
            claims.namespace,
            claims.service_account,
            all.join(",")
        )));
    }
    let inbound: SocketAddr = register.inbound_addr.parse().map_err(|_| {
        Status::invalid_argument(format!(
            "Register.inbound_addr {:?} is not IP:PORT: give the proxy --advertise-addr IP",
            register.inbound_addr
        ))
    })?;
    let peer_ip = peer.map(|p| p.ip().to_canonical());
    if inbound.ip().is_unspecified() {
        return match peer_ip {
            Some(ip) => Ok(SocketAddr::new(ip, inbound.port()).to_string()),
            None => Err(Status::invalid_argument(
                "cannot tell where the proxy connects from: give it --advertise-addr IP",
            )),
        };
    }
    let ip = inbound.ip().to_canonical();
    if Some(ip) == peer_ip || Some(ip) == claims.advertise_addr.map(|a| a.to_canonical()) {
        return Ok(inbound.to_string());
    }
    let from = peer_ip.map_or("an unknown address".to_string(), |p| p.to_string());
    Err(Status::permission_denied(format!(
        "the proxy advertises {ip} but connects from {from}, and its token grants no other address: advertise the address it connects from, or make a token with `trellis token create -n {} --service-account {} --advertise-addr {ip} ...`",
        claims.namespace, claims.service_account
    )))
}

/// Reads a proxy's messages until its stream ends, then reports it gone.
async fn read_loop(
    conn: ConnId,
    mut inbound: Streaming<ProxyMessage>,
    events: mpsc::Sender<Event>,
    stats: Arc<Stats>,
    mut kill: oneshot::Receiver<()>,
    observers: Observers,
) {
    struct Gone<'a>(&'a Observers, ConnId);
    impl Drop for Gone<'_> {
        fn drop(&mut self) {
            self.0.taps.disconnect(self.1);
        }
    }
    let _gone = Gone(&observers, conn);
    loop {
        let msg = tokio::select! {
            _ = &mut kill => return,
            msg = inbound.message() => msg,
        };
        let ev = match msg {
            Ok(Some(ProxyMessage { msg: Some(msg) })) => match msg {
                Msg::Register(_) => {
                    warn!(conn, "a second Register on one stream is ignored");
                    continue;
                }
                Msg::Subscribe(s) => Event::Subscribe {
                    conn,
                    services: s.services,
                },
                Msg::Ack(ack) => Event::Ack { conn, ack },
                Msg::Stats(report) => {
                    stats.record(&report);
                    continue;
                }
                Msg::TapEvents(t) => {
                    observers.taps.deliver(conn, &t.id, t.events);
                    continue;
                }
                Msg::Traces(batch) => {
                    use prost::Message as _;
                    match opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                        batch.otlp.as_slice(),
                    ) {
                        Ok(req) => observers.traces.ingest(req),
                        Err(e) => debug!(conn, error = %e, "dropping an undecodable span batch"),
                    }
                    continue;
                }
            },
            Ok(Some(ProxyMessage { msg: None })) => continue,
            Ok(None) => {
                debug!(conn, "proxy closed its stream");
                break;
            }
            Err(status) => {
                debug!(conn, %status, "proxy stream failed");
                break;
            }
        };
        if events.send(ev).await.is_err() {
            return;
        }
    }
    let _ = events.send(Event::Disconnect { conn }).await;
}

/// The response stream: every new Config in `rx`, and the tap messages in
/// `taps`, until the actor drops the sender (shutdown, or the proxy is
/// gone) or asks to close.
fn out_stream(
    rx: watch::Receiver<Out>,
    taps: mpsc::Receiver<ControlMessage>,
) -> impl Stream<Item = Result<ControlMessage, Status>> {
    futures::stream::unfold(Some((rx, taps)), |state| async move {
        let (mut rx, mut taps) = state?;
        loop {
            tokio::select! {
                biased;
                changed = rx.changed() => {
                    // Err: the sender is gone and every value was seen.
                    changed.ok()?;
                }
                Some(msg) = taps.recv() => return Some((Ok(msg), Some((rx, taps)))),
            }
            let out = rx.borrow_and_update().clone();
            match out {
                Out::Nothing => continue,
                Out::Config(config) => {
                    let msg = ControlMessage {
                        msg: Some(control_message::Msg::Config(config)),
                    };
                    return Some((Ok(msg), Some((rx, taps))));
                }
                Out::Close(code, message) => return Some((Err(Status::new(code, message)), None)),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(labels: &[(&str, &str)], addr: Option<&str>) -> Claims {
        Claims {
            id: "t".into(),
            namespace: "default".into(),
            service_account: "reviews".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            advertise_addr: addr.map(|a| a.parse().unwrap()),
            exp: u64::MAX,
            ca: String::new(),
        }
    }

    fn register(labels: &[(&str, &str)], inbound: &str) -> Register {
        Register {
            namespace: "default".into(),
            service_account: "reviews".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            inbound_addr: inbound.into(),
            ..Default::default()
        }
    }

    #[test]
    fn unspecified_inbound_addresses_use_the_peer() {
        let c = claims(&[], None);
        let peer: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let ok = |inbound: &str| admit(&c, &register(&[], inbound), Some(peer)).unwrap();
        assert_eq!(ok("0.0.0.0:15006"), "10.0.0.7:15006");
        assert_eq!(ok("[::]:15006"), "10.0.0.7:15006");
        assert_eq!(ok("10.0.0.7:15006"), "10.0.0.7:15006");
        // A v4 peer on a dual-stack listener.
        let mapped: SocketAddr = "[::ffff:10.0.0.7]:40000".parse().unwrap();
        assert!(admit(&c, &register(&[], "10.0.0.7:15006"), Some(mapped)).is_ok());
    }

    #[test]
    fn addresses_other_than_the_peer_need_the_token() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for inbound in ["10.0.0.9:15006", "host:15006", "127.0.0.2:15006"] {
            let e = admit(&claims(&[], None), &register(&[], inbound), Some(peer)).unwrap_err();
            assert!(
                e.message().contains("advertise"),
                "{inbound}: {}",
                e.message()
            );
        }
        let granted = claims(&[], Some("10.0.0.9"));
        assert!(admit(&granted, &register(&[], "10.0.0.9:15006"), Some(peer)).is_ok());
        assert!(admit(&granted, &register(&[], "10.0.0.8:15006"), Some(peer)).is_err());
        assert!(admit(&claims(&[], None), &register(&[], "0.0.0.0:1"), None).is_err());
    }

    #[test]
    fn labels_must_be_granted() {
        let peer = Some("127.0.0.1:4000".parse().unwrap());
        let c = claims(&[("app", "reviews"), ("version", "v1")], None);
        let ok = |labels: &[(&str, &str)]| admit(&c, &register(labels, "127.0.0.1:1"), peer);
        assert!(ok(&[("app", "reviews"), ("version", "v1")]).is_ok());
        assert!(ok(&[("app", "reviews")]).is_ok());
        assert!(ok(&[]).is_ok());
        let e = ok(&[("app", "payments")]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied);
        assert!(e.message().contains("app=payments"), "{}", e.message());
        assert!(ok(&[("app", "reviews"), ("tier", "x")]).is_err());
        // A token without labels grants none, and says how to get them.
        let e = admit(
            &claims(&[], None),
            &register(&[("app", "reviews")], "127.0.0.1:1"),
            peer,
        )
        .unwrap_err();
        assert!(
            e.message().contains("no labels") && e.message().contains("--labels app=reviews"),
            "{}",
            e.message()
        );
        // And the identity must be the token's.
        let mut other = register(&[], "127.0.0.1:1");
        other.service_account = "payments".into();
        assert!(admit(&c, &other, peer).is_err());
    }
}
