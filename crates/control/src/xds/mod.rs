//! The proxy API server: one bidirectional stream per proxy.
//!
//! A single actor task owns the registry (connected proxies and the
//! resource index) and decides what every proxy is sent. gRPC stream tasks
//! and the store feed it events over a channel; it answers through one
//! `watch` channel per proxy, which keeps only the newest Config, so a slow
//! proxy never blocks the actor and never gets stale configs queued. The
//! HTTP API reads an arc-swapped snapshot that the actor publishes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use futures::Stream;
use tokio::sync::{mpsc, oneshot, watch};
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{debug, warn};
use trellis_api::v1::proxy_api_server::ProxyApi;
use trellis_api::v1::proxy_message::Msg;
use trellis_api::v1::{control_message, Ack, Config, ControlMessage, ProxyMessage, Register};
use trellis_identity::token::Claims;

use crate::registry::{Breach, ConnId, EndpointRecord, ProxyView, ServiceName};
use crate::stats::Stats;

pub use actor::start;

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
    /// The proxies connected to this control plane; shared with earlier
    /// snapshots: a publish rebuilds only the views of the proxies that
    /// changed since the last one, and only the chunks that hold them.
    pub proxies: ProxyViews,
    /// Every proxy of the mesh as an endpoint (from every replica), shared
    /// until one changes.
    pub endpoints: Arc<Vec<Arc<EndpointRecord>>>,
    /// The store revision the registry reflects.
    pub revision: u64,
    pub trust_domain: String,
    /// `Mesh.certificateTTL`.
    pub certificate_ttl: std::time::Duration,
    /// Each Service's VIP (pods mode), shared until one changes.
    pub vips: Arc<crate::vips::Vips>,
    /// The stored resources at `revision`, in key order, shared until one
    /// changes.
    pub resources: Arc<Vec<Arc<trellis_resource::Resource>>>,
}

/// How many proxies (by `ConnId`) share one chunk of `ProxyViews`: 64.
/// A change seen by a few proxies rebuilds one chunk per proxy when it is
/// sent and again as each acks, and each member's `Arc` it copies is a
/// cache miss: with 256 that was 4–5% of a route change's CPU at 12,000
/// proxies. A mesh-wide change rebuilds every chunk whatever their size.
const VIEW_CHUNK_BITS: u32 = 6;

/// The views of the connected proxies in `ConnId` order, in chunks that
/// snapshots share: with 12,000 proxies, copying the whole list after each
/// ack cost more than the route change the acks were for.
#[derive(Clone, Debug, Default)]
pub struct ProxyViews {
    chunks: Arc<std::collections::BTreeMap<ConnId, Arc<[Arc<ProxyView>]>>>,
}

impl ProxyViews {
    pub fn iter(&self) -> impl Iterator<Item = &Arc<ProxyView>> {
        self.chunks.values().flat_map(|c| c.iter())
    }

    /// Rebuilds the chunks that hold `changed` from `views`.
    fn refresh(
        &mut self,
        views: &std::collections::BTreeMap<ConnId, Arc<ProxyView>>,
        changed: impl IntoIterator<Item = ConnId>,
    ) {
        let chunks: std::collections::BTreeSet<ConnId> =
            changed.into_iter().map(|c| c >> VIEW_CHUNK_BITS).collect();
        if chunks.is_empty() {
            return;
        }
        let all = Arc::make_mut(&mut self.chunks);
        for chunk in chunks {
            let start = chunk << VIEW_CHUNK_BITS;
            let end = start.saturating_add(1 << VIEW_CHUNK_BITS);
            let members: Arc<[Arc<ProxyView>]> =
                views.range(start..end).map(|(_, v)| v.clone()).collect();
            if members.is_empty() {
                all.remove(&chunk);
            } else {
                all.insert(chunk, members);
            }
        }
    }
}

/// Shared by the gRPC server, the HTTP API and `ControlPlane`.
#[derive(Clone)]
pub struct XdsHandle {
    events: mpsc::Sender<Event>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// The revision of the published snapshot, sent after it is published.
    revision: watch::Receiver<u64>,
}

impl XdsHandle {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The stored resources as the actor holds them, once it has seen every
    /// change up to `revision` (the store's revision now, for a consistent
    /// read): the same as a read of the store, without decoding every
    /// resource. `None` when the actor has not got there within `wait`
    /// (it is reading the whole store, or stopped): read the store then.
    pub async fn resources_at(
        &self,
        revision: u64,
        wait: Duration,
    ) -> Option<(Arc<Vec<Arc<trellis_resource::Resource>>>, u64)> {
        let mut rx = self.revision.clone();
        tokio::time::timeout(wait, rx.wait_for(|&r| r >= revision))
            .await
            .ok()?
            .ok()?;
        let snap = self.snapshot();
        (snap.revision >= revision).then(|| (snap.resources.clone(), snap.revision))
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

    /// The external source's state is in the store up to `revision` (see
    /// `ControlConfig::external_source`): once this replica has applied
    /// it, the proxies it held get their Configs.
    pub async fn source_synced(&self, revision: u64) {
        let _ = self.events.send(Event::SourceSynced(revision)).await;
    }

    /// The connected proxies whose Config `applied` (an apply's resources,
    /// put over the ones this control plane's configs are made of) would
    /// push over the Config budget, or grow while over it. The apply's own
    /// resources are the ones to blame first.
    pub async fn check_budget(&self, applied: Vec<trellis_resource::Resource>) -> Vec<Breach> {
        let (reply, rx) = oneshot::channel();
        let ev = Event::CheckBudget { applied, reply };
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

mod actor;

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
    /// A read of the whole store, the `n`th asked for.
    Loaded(
        u64,
        Result<crate::store::StoreSnapshot, crate::store::StoreError>,
    ),
    /// The VIP table after an allocation.
    Allocated(Result<crate::vips::Vips, crate::store::StoreError>),
    /// An external source's endpoints (Kubernetes).
    Endpoints(
        Arc<std::collections::BTreeMap<ServiceName, Vec<trellis_api::v1::Endpoint>>>,
        Option<std::collections::BTreeMap<ServiceName, std::net::Ipv4Addr>>,
    ),
    /// The external source's state is in the store up to this revision.
    SourceSynced(u64),
    CheckBudget {
        applied: Vec<trellis_resource::Resource>,
        reply: oneshot::Sender<Vec<Breach>>,
    },
    Shutdown,
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
        register.admin_addr = admin_target(&register, peer);
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

/// The admin address to list for Prometheus discovery, given the admitted
/// `inbound_addr`: on the proxy's own published address or the one it
/// connects from, never another host's (a proxy must not steer the mesh's
/// scrapers at arbitrary addresses). Anything else is left out, not refused:
/// the proxy still serves, it is just not scraped.
fn admin_target(register: &Register, peer: Option<SocketAddr>) -> String {
    if register.admin_addr.is_empty() {
        return String::new();
    }
    let Ok(admin) = register.admin_addr.parse::<SocketAddr>() else {
        warn!(instance = %register.instance, admin = %register.admin_addr, "left out an admin address that is not IP:PORT");
        return String::new();
    };
    let inbound_ip = register
        .inbound_addr
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical());
    if admin.ip().is_unspecified() {
        return inbound_ip.map_or(String::new(), |ip| {
            SocketAddr::new(ip, admin.port()).to_string()
        });
    }
    let ip = admin.ip().to_canonical();
    if Some(ip) == inbound_ip || Some(ip) == peer.map(|p| p.ip().to_canonical()) {
        return SocketAddr::new(ip, admin.port()).to_string();
    }
    warn!(instance = %register.instance, admin = %admin, "left out an admin address on another host than the proxy's");
    String::new()
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

    fn view(instance: &str) -> Arc<ProxyView> {
        Arc::new(ProxyView {
            instance: instance.into(),
            workload: String::new(),
            namespace: String::new(),
            labels: Default::default(),
            service_account: String::new(),
            identity: String::new(),
            inbound_addr: String::new(),
            admin_addr: String::new(),
            connected_at: std::time::Instant::now(),
            sent_version: 0,
            acked_version: 0,
            last_error: None,
            config_withheld: None,
            subscriptions: Vec::new(),
        })
    }

    /// A write reads the actor's resources only once the actor has seen
    /// the revision asked for; before that it waits, and then gives up.
    #[tokio::test]
    async fn resources_are_read_only_at_the_revision_asked_for() {
        let (events, _rx) = mpsc::channel(1);
        let at = |revision: u64, names: &[&str]| {
            let resources = names
                .iter()
                .map(|n| {
                    let yaml = format!("apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: {n}}}\nspec: {{selector: {{app: {n}}}}}\n");
                    Arc::new(trellis_resource::parse_documents("t.yaml", &yaml).unwrap().remove(0))
                })
                .collect();
            Snapshot {
                revision,
                resources: Arc::new(resources),
                ..Snapshot::default()
            }
        };
        let snapshot = Arc::new(ArcSwap::from_pointee(at(5, &["a"])));
        let (revision_tx, revision) = watch::channel(5);
        let xds = XdsHandle {
            events,
            snapshot: snapshot.clone(),
            revision,
        };
        let short = Duration::from_millis(50);
        let (found, rev) = xds.resources_at(5, short).await.unwrap();
        assert_eq!((found.len(), rev), (1, 5));
        // Not there yet: no answer rather than an older one.
        assert!(xds.resources_at(6, short).await.is_none());
        // Published while the write waits: it gets the new resources.
        let waiting = tokio::spawn({
            let xds = xds.clone();
            async move { xds.resources_at(6, Duration::from_secs(30)).await }
        });
        snapshot.store(Arc::new(at(6, &["a", "b"])));
        revision_tx.send_replace(6);
        let (found, rev) = waiting.await.unwrap().unwrap();
        assert_eq!((found.len(), rev), (2, 6));
    }

    #[test]
    fn proxy_views_rebuild_only_the_chunks_that_changed() {
        let far = 5 << VIEW_CHUNK_BITS;
        let mut views: std::collections::BTreeMap<ConnId, Arc<ProxyView>> =
            [(1, view("a")), (2, view("b")), (far, view("c"))].into();
        let mut published = ProxyViews::default();
        published.refresh(&views, [1, 2, far]);
        let names =
            |p: &ProxyViews| -> Vec<String> { p.iter().map(|v| v.instance.clone()).collect() };
        assert_eq!(names(&published), ["a", "b", "c"]);
        let before = published.clone();
        views.insert(2, view("b2"));
        views.remove(&far);
        published.refresh(&views, [2, far]);
        assert_eq!(names(&published), ["a", "b2"]);
        // An earlier snapshot keeps what it saw.
        assert_eq!(names(&before), ["a", "b", "c"]);
        // Nothing changed: nothing rebuilt, the chunks stay shared.
        let same = published.clone();
        published.refresh(&views, []);
        assert!(Arc::ptr_eq(&same.chunks, &published.chunks));
    }

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

    #[test]
    fn admin_addresses_stay_on_the_proxys_host() {
        let peer: SocketAddr = "10.0.0.7:40000".parse().unwrap();
        let target = |inbound: &str, admin: &str| {
            let mut r = register(&[], inbound);
            r.admin_addr = admin.into();
            admin_target(&r, Some(peer))
        };
        assert_eq!(target("10.0.0.7:15006", "10.0.0.7:15000"), "10.0.0.7:15000");
        // Published on a granted address other than the peer's.
        assert_eq!(target("10.0.0.9:15006", "10.0.0.9:15000"), "10.0.0.9:15000");
        assert_eq!(target("10.0.0.7:15006", "0.0.0.0:15000"), "10.0.0.7:15000");
        // Another host, the control plane's loopback, garbage: left out.
        assert_eq!(target("10.0.0.7:15006", "10.0.0.8:15000"), "");
        assert_eq!(target("10.0.0.7:15006", "127.0.0.1:2379"), "");
        assert_eq!(target("10.0.0.7:15006", "not an address"), "");
        assert_eq!(target("10.0.0.7:15006", ""), "");
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
