//! The xds actor: the one task that owns the registry and decides what
//! every proxy connected to this control plane is sent.
//!
//! Its inputs are the proxies' streams (register, subscribe, ack, gone)
//! and the store's events: resources, the endpoint records of every
//! replica's proxies, the VIP table and the CA. It never waits on the store
//! itself: reads of the whole store (`Loaded`) and VIP allocations run in
//! their own tasks and come back as events, so an etcd outage never stalls
//! a proxy's stream.
//!
//! Versions. A Config's version is `revision << 16` plus a per-proxy
//! count, where `revision` is the store revision the registry reflects, and
//! always greater than the version the proxy last ran (it says which in
//! `Register`). Replicas on one etcd share revisions, so a proxy that moves
//! to another replica is never sent an older state: a replica that has not
//! seen the revision the proxy's config was made at reads the store before
//! it sends that proxy anything.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tonic::Code;
use tracing::{debug, info, warn};
use trellis_api::v1::Register;

use super::{Event, Link, Out, ProxyViews, Snapshot, XdsError, XdsHandle, EVENT_QUEUE};
use crate::idle::Tidy;
use crate::mesh_identity::MeshIdentity;
use crate::metrics::Metrics;
use crate::registry::{
    Breach, ConnId, EndpointCache, EndpointRecord, EndpointSource, Proxy, ProxyView, Registry,
    ResourceIndex, SelectionMemo, ServiceName,
};
use crate::store::{Change, Store, StoreEvent, StoreSnapshot};
use crate::vips::Vips;

/// Bits of a version below the store revision: room for a proxy's own
/// changes (subscriptions) between two revisions.
pub const VERSION_SHIFT: u32 = 16;
/// How often a failed store read or VIP allocation is tried again.
const RETRY: Duration = Duration::from_secs(1);

/// Which proxies to recompute.
enum Scope {
    All,
    One(ConnId),
    /// Proxies whose config holds these services (`Actor::dependents`).
    Affected(BTreeSet<ServiceName>),
}

impl Scope {
    /// Adds what `piece` reaches (`None`: every proxy).
    fn add(&mut self, piece: Option<BTreeSet<ServiceName>>) {
        match (&mut *self, piece) {
            (Scope::All, _) => {}
            (_, None) => *self = Scope::All,
            (Scope::Affected(services), Some(more)) => services.extend(more),
            // Changes start from `Affected`; should one meet `One`, every
            // proxy is the safe superset.
            (Scope::One(_), Some(_)) => *self = Scope::All,
        }
    }
}

/// Whether proxies are held back until an external source is in.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Hold {
    Free,
    /// The source has not said it is in.
    UntilSource,
    /// It is, in the store up to this revision.
    UntilRevision(u64),
}

/// Starts the actor on the store's current state. `replica` names this
/// control plane in the endpoint records it publishes; with
/// `external_source`, proxies get no Config before the source is in
/// (`XdsHandle::source_synced`).
pub async fn start(
    store: Arc<dyn Store>,
    metrics: Arc<Metrics>,
    identity: Arc<MeshIdentity>,
    replica: String,
    external_source: bool,
) -> Result<(XdsHandle, JoinHandle<()>), XdsError> {
    // Watch before reading, so no change falls between the two.
    let store_events = store.watch();
    let first = store.snapshot().await?;
    let snapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let (revision_tx, revision_rx) = watch::channel(0);
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let mut actor = Actor {
        registry: Registry {
            trust_bundle: identity.bundle(),
            ..Default::default()
        },
        links: HashMap::new(),
        applied: 0,
        shared: store.shared(),
        store,
        identity,
        replica,
        metrics,
        snapshot: snapshot.clone(),
        revision: revision_tx,
        events: tx.clone(),
        loading: false,
        load_again: false,
        load_seq: 0,
        buffered: Vec::new(),
        waiting: HashMap::new(),
        allocating: false,
        vips_unchecked: true,
        views: BTreeMap::new(),
        dirty: HashSet::new(),
        published_trust_domain: String::new(),
        published_proxies: ProxyViews::default(),
        endpoint_bytes: HashMap::new(),
        dependents: HashMap::new(),
        hold: if external_source {
            Hold::UntilSource
        } else {
            Hold::Free
        },
        tidy: Tidy::default(),
    };
    let _ = actor.install(first);
    actor.publish();
    let task = tokio::spawn(actor.run(rx, store_events));
    Ok((
        XdsHandle {
            events: tx,
            snapshot,
            revision: revision_rx,
        },
        task,
    ))
}

struct Actor {
    registry: Registry,
    links: HashMap<ConnId, Link>,
    /// The store revision the registry reflects: every change up to it.
    applied: u64,
    /// Whether other replicas share the store.
    shared: bool,
    store: Arc<dyn Store>,
    identity: Arc<MeshIdentity>,
    replica: String,
    metrics: Arc<Metrics>,
    snapshot: Arc<ArcSwap<Snapshot>>,
    /// The revision of `snapshot`, sent once it is published.
    revision: watch::Sender<u64>,
    /// Where the tasks the actor starts send their results.
    events: mpsc::Sender<Event>,
    /// A read of the whole store is under way.
    loading: bool,
    /// Another read is needed once this one is in.
    load_again: bool,
    /// How many reads were started.
    load_seq: u64,
    /// Store events that came while a read was under way.
    buffered: Vec<StoreEvent>,
    /// Proxies held back until this replica reaches the revision their
    /// config was made at, or until a store read started after they came
    /// shows the store does not have it: (revision, reads started by then).
    waiting: HashMap<ConnId, (u64, u64)>,
    allocating: bool,
    /// A Service may lack a VIP: set when the Services or the VIP table
    /// change and when an allocation ends, cleared by the check. The
    /// retry tick checks only then: testing every Service each second
    /// was most of an idle control plane's CPU with 1,000 Services.
    vips_unchecked: bool,
    /// The published view of each proxy, and the proxies changed since
    /// (every site that changes a proxy marks it: `self.dirty.insert`).
    /// With 12,000 proxies, rebuilding every view after each ack cost more
    /// than the Configs themselves.
    views: BTreeMap<ConnId, Arc<ProxyView>>,
    dirty: HashSet<ConnId>,
    published_trust_domain: String,
    /// `views` as last published.
    published_proxies: ProxyViews,
    /// The stored bytes of each record in `registry.endpoints`: a read of
    /// the whole store (after any resource change) parses and compares only
    /// the records whose bytes changed, not all of them (10,000 at the
    /// scale benchmark's size, none of which a route change touches).
    endpoint_bytes: HashMap<String, Vec<u8>>,
    /// The proxies whose Config holds each Service (the inverse of
    /// `Proxy::depends_on`): a change to one Service's part of a Config
    /// recomputes these, without a look at any other proxy.
    dependents: HashMap<ServiceName, HashSet<ConnId>>,
    /// Until an external source is in, no proxy is sent a Config: one
    /// made of what a restarted replica's store kept, without the source's
    /// endpoints, would send its traffic nowhere.
    hold: Hold,
    /// Returning the memory of a large round once the actor is idle.
    tidy: Tidy,
}

impl Actor {
    async fn run(
        mut self,
        mut events: mpsc::Receiver<Event>,
        mut store_events: broadcast::Receiver<StoreEvent>,
    ) {
        let mut store_open = true;
        let mut retry = tokio::time::interval(RETRY);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
                r = store_events.recv(), if store_open => {
                    let mut next = Some(r);
                    // A burst of changes (a large apply, thousands of
                    // proxies registering) in one round.
                    for _ in 0..EVENT_QUEUE {
                        match next.take() {
                            Some(Ok(ev)) => self.store_event(ev),
                            // Lagged: some events were lost; a read of the
                            // whole store has everything anyway.
                            Some(Err(broadcast::error::RecvError::Lagged(n))) => {
                                debug!(lost = n, "store events lagged; reading the store");
                                self.request_load();
                            }
                            Some(Err(broadcast::error::RecvError::Closed)) => {
                                store_open = false;
                                break;
                            }
                            None => break,
                        }
                        next = match store_events.try_recv() {
                            Ok(ev) => Some(Ok(ev)),
                            Err(broadcast::error::TryRecvError::Lagged(n)) => {
                                Some(Err(broadcast::error::RecvError::Lagged(n)))
                            }
                            Err(_) => None,
                        };
                    }
                },
                _ = retry.tick() => {
                    if self.load_again && !self.loading {
                        self.load_again = false;
                        self.start_load();
                    }
                    self.allocate_vips();
                    // Both only start tasks, which report back as events:
                    // nothing to publish, and no round for `tidy`.
                    continue;
                }
                _ = sleep_until_due(self.tidy.due()), if self.tidy.due().is_some() => {
                    self.tidy.fire();
                    continue;
                }
            }
            let changed = self.publish();
            self.tidy.round(changed, tokio::time::Instant::now());
        }
        info!(
            proxies = self.links.len(),
            "proxy API stopped; closing streams"
        );
        // The endpoint records stay: these proxies are moving to another
        // replica (or this one, restarted), which publishes them again.
        self.links.clear();
        self.metrics.connected_proxies.set(0);
        self.publish_empty();
    }

    /// Reads the whole store (now, or after the read under way).
    fn request_load(&mut self) {
        if self.loading {
            self.load_again = true;
        } else {
            self.start_load();
        }
    }

    fn start_load(&mut self) {
        self.loading = true;
        self.load_seq += 1;
        let (seq, store, events) = (self.load_seq, self.store.clone(), self.events.clone());
        tokio::spawn(async move {
            let result = store.snapshot().await;
            let _ = events.send(Event::Loaded(seq, result)).await;
        });
    }

    /// Takes a read of the whole store as the registry's new state; which
    /// proxies that changes.
    fn install(&mut self, snap: StoreSnapshot) -> Scope {
        let next = ResourceIndex::new(&snap.resources);
        let changed = self.registry.resources.changed_services(&next);
        self.registry.resources = next;
        let mut all = changed.is_none();
        let mut affected = changed.unwrap_or_default();
        let mut present = HashSet::with_capacity(snap.endpoints.len());
        for (instance, bytes) in snap.endpoints {
            // The same bytes: the same record, kept as it is.
            if self.endpoint_bytes.get(&instance) != Some(&bytes) {
                let scope = self.put_record(&instance, bytes);
                if !all {
                    affected.extend(scope);
                }
            }
            present.insert(instance);
        }
        // Withdrawn since.
        let gone: Vec<String> = self
            .registry
            .endpoints
            .instances()
            .filter(|i| !present.contains(*i))
            .map(str::to_string)
            .collect();
        for instance in gone {
            let scope = self.remove_record(&instance);
            if !all {
                affected.extend(scope);
            }
        }
        let external = matches!(self.registry.endpoint_source, EndpointSource::External(_));
        if let (Some(v), false) = (&snap.vips, external) {
            let vips = Vips::from_json(v);
            if vips != *self.registry.vips {
                all = true;
                self.registry.vips = Arc::new(vips);
            }
        }
        self.applied = self.applied.max(snap.revision);
        if all {
            Scope::All
        } else {
            Scope::Affected(affected)
        }
    }

    fn loaded(&mut self, seq: u64, result: Result<StoreSnapshot, crate::store::StoreError>) {
        self.loading = false;
        match result {
            Ok(snap) => {
                let scope = self.install(snap);
                self.update(scope);
                // What came meanwhile, past what the read saw.
                for ev in std::mem::take(&mut self.buffered) {
                    self.store_event(ev);
                }
                self.release_waiting(Some(seq));
                self.vips_unchecked = true;
                self.allocate_vips();
            }
            Err(e) => {
                // Keep serving the last good state; the retry tick reads
                // again.
                warn!(error = %e, "cannot read the store; proxies keep their config");
                self.load_again = true;
                return;
            }
        }
        if self.load_again {
            self.load_again = false;
            self.start_load();
        }
    }

    fn store_event(&mut self, ev: StoreEvent) {
        if self.loading {
            self.buffered.push(ev);
            return;
        }
        let reset = ev.changes.contains(&Change::Reset);
        if reset {
            self.request_load();
            return;
        }
        if ev.revision <= self.applied {
            // A read of the whole store saw it already.
            return;
        }
        let mut scope = Scope::Affected(BTreeSet::new());
        let mut load = false;
        let mut services = false;
        for change in ev.changes {
            match change {
                Change::Put(key, bytes) => {
                    match serde_json::from_slice::<trellis_resource::Resource>(&bytes) {
                        Ok(r) if r.key() == key => {
                            services |= key.kind == trellis_resource::Kind::Service;
                            scope.add(self.registry.resources.put(r));
                        }
                        Ok(_) | Err(_) => {
                            warn!(%key, "a stored resource cannot be read; reading the whole store");
                            load = true;
                        }
                    }
                }
                Change::Delete(key) => {
                    services |= key.kind == trellis_resource::Kind::Service;
                    scope.add(self.registry.resources.delete(&key));
                }
                Change::Endpoint { instance, record } => {
                    let reached = match record {
                        Some(bytes) => self.put_record(&instance, bytes),
                        None => self.remove_record(&instance),
                    };
                    scope.add(Some(reached));
                }
                Change::State(key) if key == crate::vips::STATE_KEY => load = true,
                Change::State(key) if MeshIdentity::is_ca_key(&key) => self.reload_ca(),
                Change::State(_) | Change::Reset => {}
            }
        }
        if load {
            // The read covers this revision, endpoints and all.
            self.request_load();
            return;
        }
        self.applied = ev.revision;
        self.update(scope);
        self.release_waiting(None);
        if services {
            self.vips_unchecked = true;
            self.allocate_vips();
        }
    }

    /// Takes the stored bytes of an endpoint record; the Services whose
    /// endpoints that changes.
    fn put_record(&mut self, instance: &str, bytes: Vec<u8>) -> BTreeSet<ServiceName> {
        let Some(record) = parse_record(instance, &bytes) else {
            return self.remove_record(instance);
        };
        self.endpoint_bytes.insert(instance.to_string(), bytes);
        let before = self.registry.endpoints.insert(record);
        let Some(now) = self.registry.endpoints.get(instance) else {
            return BTreeSet::new();
        };
        if before.as_deref() == Some(now) {
            return BTreeSet::new();
        }
        let mut reached = self.registry.services_of(now);
        if let Some(before) = before {
            reached.extend(self.registry.services_of(&before));
        }
        reached
    }

    /// Drops an endpoint record; the Services whose endpoints that changes.
    fn remove_record(&mut self, instance: &str) -> BTreeSet<ServiceName> {
        self.endpoint_bytes.remove(instance);
        match self.registry.endpoints.remove(instance) {
            Some(old) => self.registry.services_of(&old),
            None => BTreeSet::new(),
        }
    }

    /// Another replica rotated the CA: sign with it, and send the bundle.
    fn reload_ca(&self) {
        let (identity, events) = (self.identity.clone(), self.events.clone());
        tokio::spawn(async move {
            match identity.reload().await {
                Ok(true) => {
                    let _ = events.send(Event::TrustBundle(identity.bundle())).await;
                }
                Ok(false) => {}
                Err(e) => warn!(error = %e, "cannot read the CA from the store"),
            }
        });
    }

    /// Kubernetes: the endpoints and ClusterIPs the API server says. Only
    /// the proxies whose Configs hold a Service whose endpoints changed are
    /// recomputed; a change of VIPs reaches every proxy.
    fn external_endpoints(
        &mut self,
        endpoints: Arc<BTreeMap<ServiceName, Vec<trellis_api::v1::Endpoint>>>,
        vips: Option<BTreeMap<ServiceName, std::net::Ipv4Addr>>,
    ) {
        let mut all = false;
        if let Some(vips) = vips {
            let mut vips = Vips::fixed(vips);
            // Services without a ClusterIP (headless) get one of the
            // mesh's own; not stored: the source is the truth.
            vips.assign(self.registry.resources.services.keys());
            if vips != *self.registry.vips {
                self.registry.vips = Arc::new(vips);
                all = true;
            }
        }
        let changed: BTreeSet<ServiceName> = match &self.registry.endpoint_source {
            EndpointSource::External(old) => endpoints
                .iter()
                .filter(|(k, v)| old.get(*k) != Some(*v))
                .map(|(k, _)| k.clone())
                .chain(old.keys().filter(|k| !endpoints.contains_key(*k)).cloned())
                .collect(),
            EndpointSource::Registrations => {
                all = true;
                BTreeSet::new()
            }
        };
        self.registry.endpoint_source = EndpointSource::External(endpoints);
        self.update(if all {
            Scope::All
        } else {
            Scope::Affected(changed)
        });
    }

    /// Gives Services without a VIP one, through the store (on Kubernetes
    /// the ClusterIPs are the VIPs: nothing to allocate).
    fn allocate_vips(&mut self) {
        if !self.vips_unchecked
            || self.allocating
            || self.loading
            || matches!(self.registry.endpoint_source, EndpointSource::External(_))
        {
            return;
        }
        self.vips_unchecked = false;
        let missing: Vec<ServiceName> = self
            .registry
            .resources
            .services
            .keys()
            .filter(|n| self.registry.vips.get(n).is_none())
            .cloned()
            .collect();
        if missing.is_empty() {
            return;
        }
        self.allocating = true;
        let (store, events) = (self.store.clone(), self.events.clone());
        tokio::spawn(async move {
            let result = Vips::allocate(&*store, &missing).await;
            let _ = events.send(Event::Allocated(result)).await;
        });
    }

    /// Sends the proxies that waited for this replica to catch up.
    fn release_waiting(&mut self, load: Option<u64>) {
        self.release_hold();
        let ready: Vec<ConnId> = self
            .waiting
            .iter()
            .filter(|(_, (revision, since))| {
                self.applied >= *revision || load.is_some_and(|seq| seq > *since)
            })
            .map(|(c, _)| *c)
            .collect();
        for conn in ready {
            self.waiting.remove(&conn);
            self.dirty.insert(conn);
            if let Some(p) = self.registry.proxies.get_mut(&conn) {
                p.waiting_for = None;
            }
            self.update(Scope::One(conn));
        }
    }

    /// Ends the hold once the source's state is applied.
    fn release_hold(&mut self) {
        if let Hold::UntilRevision(revision) = self.hold {
            if self.applied >= revision {
                self.hold = Hold::Free;
                info!(
                    proxies = self.registry.proxies.len(),
                    revision, "the source's state is in; sending proxies their Configs"
                );
                self.update(Scope::All);
            }
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
                self.dirty.insert(conn);
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
                self.dirty.insert(conn);
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
                }
            }
            Event::TrustBundle(bundle) => {
                if self.registry.trust_bundle != bundle {
                    self.registry.trust_bundle = bundle;
                    self.update(Scope::All);
                }
            }
            Event::Loaded(seq, result) => self.loaded(seq, result),
            Event::Endpoints(endpoints, vips) => self.external_endpoints(endpoints, vips),
            Event::Allocated(result) => {
                self.allocating = false;
                // Services added while it ran, or a failure to retry.
                self.vips_unchecked = true;
                match result {
                    Ok(vips) if vips != *self.registry.vips => {
                        self.registry.vips = Arc::new(vips);
                        self.update(Scope::All);
                    }
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "cannot store the service VIP table; trying again"),
                }
            }
            Event::SourceSynced(revision) => {
                if self.hold != Hold::Free {
                    self.hold = Hold::UntilRevision(revision);
                    self.release_hold();
                }
            }
            Event::CheckBudget { applied, reply } => {
                let _ = reply.send(self.check_budget(applied));
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
        let mut proxy = Proxy::from_register(conn, &register);
        let record = serde_json::to_vec(&proxy.record(&self.replica)).expect("records serialize");
        // Published first, so that the withdrawal of a stale stream's record
        // below never leaves the instance without one.
        self.store.publish_endpoint(&proxy.instance, record.clone());
        proxy.published = record;
        // An instance that reconnects before its old stream was found dead
        // replaces it.
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
            self.remove(old);
        }
        // Its config was made at this revision (by another replica, or an
        // earlier run of this one): nothing older may reach it.
        let needed = proxy.running_version >> VERSION_SHIFT;
        if self.shared && needed > self.applied {
            debug!(instance = %proxy.instance, needed, applied = self.applied, "proxy is ahead of this replica; catching up first");
            proxy.waiting_for = Some(needed);
            self.waiting.insert(conn, (needed, self.load_seq));
            self.request_load();
        }
        info!(
            instance = %proxy.instance,
            workload = %proxy.workload,
            namespace = %proxy.namespace,
            inbound = %proxy.inbound_addr,
            subscriptions = proxy.subscriptions.len(),
            "proxy registered"
        );
        self.dirty.insert(conn);
        self.registry.proxies.insert(conn, proxy);
        self.links.insert(conn, Link { out, _kill: kill });
        self.metrics
            .connected_proxies
            .set(self.registry.proxies.len() as i64);
        // The others learn of it when its record comes back from the store.
        self.update(Scope::One(conn));
    }

    fn remove(&mut self, conn: ConnId) -> Option<Proxy> {
        self.links.remove(&conn);
        self.dirty.insert(conn);
        self.waiting.remove(&conn);
        let p = self.registry.proxies.remove(&conn);
        if let Some(p) = &p {
            depend(&mut self.dependents, conn, &p.depends_on, &BTreeSet::new());
            self.store
                .withdraw_endpoint(&p.instance, p.published.clone());
        }
        self.metrics
            .connected_proxies
            .set(self.registry.proxies.len() as i64);
        p
    }

    /// The connected proxies in `scope`, in order.
    fn targets(&self, scope: &Scope) -> Vec<ConnId> {
        match scope {
            Scope::All => self.registry.proxies.keys().copied().collect(),
            Scope::One(conn) => vec![*conn],
            Scope::Affected(services) => {
                let reached: BTreeSet<ConnId> = services
                    .iter()
                    .filter_map(|s| self.dependents.get(s))
                    .flatten()
                    .copied()
                    .collect();
                reached.into_iter().collect()
            }
        }
    }

    /// Every Service's endpoints in one pass when every proxy is computed;
    /// otherwise filled per Service as needed.
    fn endpoint_cache(&self, scope: &Scope, memo: &mut SelectionMemo) -> EndpointCache {
        match scope {
            Scope::All => self.registry.all_endpoints(memo),
            _ => EndpointCache::new(),
        }
    }

    /// See `XdsHandle::check_budget`. Puts `applied` in the index, builds
    /// the Configs that changes, and takes it out again; what each proxy's
    /// Config was is the size `update` recorded (`Proxy::config_bytes`).
    fn check_budget(&mut self, applied: Vec<trellis_resource::Resource>) -> Vec<Breach> {
        use prost::Message as _;
        let keys: BTreeSet<trellis_resource::ResourceKey> =
            applied.iter().map(|r| r.key()).collect();
        let mut scope = Scope::Affected(BTreeSet::new());
        let mut undo = Vec::with_capacity(applied.len());
        for r in applied {
            let key = r.key();
            undo.push((self.registry.resources.get(&key), key));
            scope.add(self.registry.resources.put(r));
        }
        let mut breaches = Vec::new();
        let mut memo = SelectionMemo::default();
        let mut cache = self.endpoint_cache(&scope, &mut memo);
        for conn in self.targets(&scope) {
            let Some(p) = self.registry.proxies.get(&conn) else {
                continue;
            };
            let (config, _) = self.registry.full_config(p, &mut cache, &mut memo);
            let bytes = config.encoded_len();
            let grew = p.config_bytes.is_none_or(|b| bytes > b);
            if bytes > trellis_api::CONFIG_BUDGET_BYTES && grew {
                breaches.push(Breach {
                    instance: p.instance.clone(),
                    namespace: p.namespace.clone(),
                    workload: p.workload.clone(),
                    bytes,
                    part: self.registry.blame(&config, &keys),
                });
            }
        }
        // Back to what the store holds: put and delete are exact inverses
        // (the index depends only on the set of resources).
        for (old, key) in undo.into_iter().rev() {
            match old {
                Some(r) => self.registry.resources.put_shared(r),
                None => self.registry.resources.delete(&key),
            };
        }
        breaches
    }

    /// Recomputes the configs in `scope` and sends those that changed.
    fn update(&mut self, scope: Scope) {
        if self.hold != Hold::Free {
            // Released with `Scope::All`.
            return;
        }
        let mut memo = SelectionMemo::default();
        let mut cache = self.endpoint_cache(&scope, &mut memo);
        let mut changed = Vec::new();
        for conn in self.targets(&scope) {
            let Some(p) = self.registry.proxies.get(&conn) else {
                continue;
            };
            if p.waiting_for.is_some() {
                continue;
            }
            let (config, deps) = self.registry.full_config(p, &mut cache, &mut memo);
            self.metrics.configs_computed.inc();
            let hash = config.content_hash();
            if p.sent_hash != Some(hash) {
                changed.push((p.conn, config, deps, hash));
            }
        }
        let floor = self.applied << VERSION_SHIFT;
        for (conn, mut config, deps, hash) in changed {
            self.dirty.insert(conn);
            // Over the budget, a Config would fail the proxy's decoding and
            // make it reconnect in a loop: it keeps its last one instead.
            let bytes = prost::Message::encoded_len(&config);
            if let Some(p) = self.registry.proxies.get_mut(&conn) {
                p.config_bytes = Some(bytes);
            }
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
                depend(&mut self.dependents, conn, &p.depends_on, &deps);
                p.depends_on = deps;
                if p.withheld_hash != Some(hash) {
                    p.withheld_hash = Some(hash);
                    let reason = breach.reason();
                    // Once per episode: a replica learns of some changes
                    // (VIPs, endpoint records) a moment after the resources,
                    // so one apply may change a withheld Config twice.
                    if p.config_withheld.is_none() {
                        self.metrics.configs_over_budget.inc();
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
            config.version = floor.max(p.sent_version + 1).max(p.running_version + 1);
            debug!(
                instance = %p.instance,
                version = config.version,
                services = config.services.len(),
                "sending config"
            );
            p.sent_version = config.version;
            link.out.send_replace(Out::Config(config));
            if p.config_withheld.take().is_some() {
                info!(instance = %p.instance, "a proxy's Config is within the budget again; sent");
            }
            p.withheld_hash = None;
            p.sent_hash = Some(hash);
            depend(&mut self.dependents, conn, &p.depends_on, &deps);
            p.depends_on = deps;
            self.metrics.configs_sent.inc();
        }
    }

    /// Publishes the snapshot; how many proxies changed since the last.
    fn publish(&mut self) -> usize {
        let td = self.registry.trust_domain();
        if td != self.published_trust_domain {
            // Every identity in the views names the trust domain.
            self.published_trust_domain = td.to_string();
            self.views.clear();
            self.dirty.extend(self.registry.proxies.keys().copied());
        }
        let changed = self.dirty.len();
        for &conn in &self.dirty {
            match self.registry.proxies.get(&conn) {
                Some(p) => {
                    self.views
                        .insert(conn, Arc::new(p.view(&self.published_trust_domain)));
                }
                None => {
                    self.views.remove(&conn);
                }
            }
        }
        self.published_proxies
            .refresh(&self.views, self.dirty.drain());
        self.snapshot.store(Arc::new(Snapshot {
            proxies: self.published_proxies.clone(),
            endpoints: self.registry.endpoints.shared(),
            revision: self.applied,
            trust_domain: self.published_trust_domain.clone(),
            certificate_ttl: self.registry.resources.certificate_ttl(),
            vips: self.registry.vips.clone(),
            resources: self.registry.resources.shared(),
        }));
        self.revision.send_if_modified(|r| {
            let newer = *r != self.applied;
            *r = self.applied;
            newer
        });
        changed
    }

    fn publish_empty(&mut self) {
        self.snapshot.store(Arc::new(Snapshot {
            trust_domain: self.registry.trust_domain().to_string(),
            certificate_ttl: self.registry.resources.certificate_ttl(),
            vips: self.registry.vips.clone(),
            revision: self.applied,
            resources: self.registry.resources.shared(),
            ..Snapshot::default()
        }));
    }
}

async fn sleep_until_due(due: Option<tokio::time::Instant>) {
    if let Some(due) = due {
        tokio::time::sleep_until(due).await;
    }
}

fn parse_record(instance: &str, bytes: &[u8]) -> Option<EndpointRecord> {
    match serde_json::from_slice::<EndpointRecord>(bytes) {
        Ok(r) if r.instance == instance => Some(r),
        Ok(_) | Err(_) => {
            warn!(instance, "ignoring an endpoint record that cannot be read");
            None
        }
    }
}

/// Moves `conn` in `dependents` from the Services of `old` to those of
/// `new`.
fn depend(
    dependents: &mut HashMap<ServiceName, HashSet<ConnId>>,
    conn: ConnId,
    old: &BTreeSet<ServiceName>,
    new: &BTreeSet<ServiceName>,
) {
    for s in old.difference(new) {
        if let Some(conns) = dependents.get_mut(s) {
            conns.remove(&conn);
            if conns.is_empty() {
                dependents.remove(s);
            }
        }
    }
    for s in new.difference(old) {
        dependents.entry(s.clone()).or_default().insert(conn);
    }
}
