//! The store on etcd, shared by any number of control plane replicas.
//!
//! Keys, under `--etcd-prefix` (default `/trellis`):
//!
//! | key | value | lease |
//! | --- | --- | --- |
//! | `resources/<Kind>/<namespace>/<name>` | the resource (JSON) | |
//! | `meta/resources` | touched by every resource write: applies compare its revision | |
//! | `endpoints/<instance>` | a proxy's endpoint record (JSON) | of the replica holding its stream |
//! | `state/<key>` | state values: tokens, the VIP table, the CA and join-token key (sealed with the KEK) | |
//! | `replicas/<id>` | a replica's addresses (JSON) | its own |
//! | `leader` | the id of the replica holding the singleton duties | its own |
//!
//! Revisions are etcd's. One watch over the prefix feeds every change, in
//! revision order; a watch that breaks resumes from the next revision at
//! another member, and one that was compacted meanwhile sends `Reset`, so
//! watchers read everything again. A replica's endpoint records are written
//! from what it wants published (`publish_endpoint`): after an outage, or
//! when its lease was lost and granted anew, it writes them again.

mod client;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use trellis_resource::{Kind, Resource, ResourceKey};

use self::client::pb::{self, compare, request_op, response_op};
pub use self::client::Client;
use self::client::{describe, prefix_end};
use super::{
    action, decode, encode_all, key_string, parse_key, Action, ApplyOutcome, ApplyResult, Change,
    Result, Store, StoreError, StoreEvent, StoreSnapshot, EVENT_BUFFER,
};

/// Where a replica finds etcd.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://` or `https://`; bare
    /// `host:port` takes the scheme from whether TLS files are given).
    pub endpoints: Vec<String>,
    /// Every key lives under it, so one etcd can hold several meshes.
    pub prefix: String,
    /// The CA that signed the members' certificates (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM), when etcd asks for one.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The life of the replica's lease: how long a dead replica's
    /// endpoint records outlive it (unless their proxies moved first).
    #[serde(with = "secs")]
    pub lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        EtcdConfig {
            endpoints: Vec::new(),
            prefix: "/trellis".into(),
            ca: None,
            cert: None,
            key: None,
            lease_ttl: Duration::from_secs(10),
        }
    }
}

mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// How long `open` keeps trying to reach etcd (members starting together
/// with the control plane, e.g. under systemd).
const OPEN_PATIENCE: Duration = Duration::from_secs(20);
/// Endpoint writes per transaction: well under etcd's default limit of 128
/// operations.
const BATCH: usize = 64;
/// Retries of an apply whose compare lost to another replica's write.
const APPLY_TRIES: usize = 5;

const RESOURCES: &str = "resources/";
const META: &str = "meta/resources";
const ENDPOINTS: &str = "endpoints/";
const STATE: &str = "state/";
const REPLICAS: &str = "replicas/";
const LEADER: &str = "leader";

/// What this replica wants published, and what it knows it wrote.
#[derive(Default)]
struct Published {
    wanted: BTreeMap<String, Vec<u8>>,
    /// Written on the current lease.
    written: BTreeMap<String, Vec<u8>>,
    /// To delete, if the stored record is still this one.
    withdrawn: BTreeMap<String, Vec<u8>>,
}

struct Inner {
    client: Client,
    /// `<prefix>/`.
    prefix: String,
    replica: String,
    /// This replica's record under `replicas/`.
    info: Vec<u8>,
    lease_ttl: Duration,
    /// The current lease; 0 when there is none.
    lease: AtomicI64,
    events: broadcast::Sender<StoreEvent>,
    published: Mutex<Published>,
    sync_wake: Notify,
    leader: watch::Sender<bool>,
    leader_wake: Notify,
    closed: AtomicBool,
}

pub struct EtcdStore {
    inner: Arc<Inner>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.client.endpoints())
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

fn range(key: Vec<u8>, prefix: bool) -> pb::RangeRequest {
    pb::RangeRequest {
        range_end: if prefix { prefix_end(&key) } else { Vec::new() },
        key,
        ..Default::default()
    }
}

fn op_range(r: pb::RangeRequest) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestRange(r)),
    }
}

fn op_put(key: Vec<u8>, value: Vec<u8>, lease: i64) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestPut(pb::PutRequest {
            key,
            value,
            lease,
            ..Default::default()
        })),
    }
}

fn op_delete(key: Vec<u8>) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            pb::DeleteRangeRequest {
                key,
                ..Default::default()
            },
        )),
    }
}

fn cmp(key: Vec<u8>, result: compare::CompareResult, target: compare::TargetUnion) -> pb::Compare {
    let t = match target {
        compare::TargetUnion::Version(_) => compare::CompareTarget::Version,
        compare::TargetUnion::CreateRevision(_) => compare::CompareTarget::Create,
        compare::TargetUnion::ModRevision(_) => compare::CompareTarget::Mod,
        compare::TargetUnion::Value(_) => compare::CompareTarget::Value,
        compare::TargetUnion::Lease(_) => compare::CompareTarget::Lease,
    };
    pb::Compare {
        result: result as i32,
        target: t as i32,
        key,
        target_union: Some(target),
        range_end: Vec::new(),
    }
}

/// The key-values of the `i`th range in a txn's responses.
fn ranged(resp: &pb::TxnResponse, i: usize) -> &[pb::KeyValue] {
    match resp.responses.get(i).and_then(|r| r.response.as_ref()) {
        Some(response_op::Response::ResponseRange(r)) => &r.kvs,
        _ => &[],
    }
}

fn revision(header: &Option<pb::ResponseHeader>) -> u64 {
    header.as_ref().map_or(0, |h| h.revision.max(0) as u64)
}

impl Inner {
    fn key(&self, rest: &str) -> Vec<u8> {
        format!("{}{rest}", self.prefix).into_bytes()
    }

    fn rest<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        std::str::from_utf8(key).ok()?.strip_prefix(&self.prefix)
    }
}

impl EtcdStore {
    /// Connects to etcd (trying for a while: members may be starting too)
    /// and starts the watch, the lease and the endpoint writer. `replica`
    /// names this control plane; `info` is its record under `replicas/`.
    pub async fn open(cfg: &EtcdConfig, replica: &str, info: Vec<u8>) -> Result<EtcdStore> {
        let client = Client::new(cfg)?;
        let mut prefix = cfg.prefix.trim_end_matches('/').to_string();
        if !prefix.starts_with('/') {
            prefix.insert(0, '/');
        }
        prefix.push('/');
        let inner = Arc::new(Inner {
            client,
            prefix,
            replica: replica.to_string(),
            info,
            lease_ttl: cfg.lease_ttl.max(Duration::from_secs(2)),
            lease: AtomicI64::new(0),
            events: broadcast::channel(EVENT_BUFFER).0,
            published: Mutex::new(Published::default()),
            sync_wake: Notify::new(),
            leader: watch::channel(false).0,
            leader_wake: Notify::new(),
            closed: AtomicBool::new(false),
        });
        let started = Instant::now();
        let start_revision = loop {
            match inner.client.range(range(inner.key(META), false)).await {
                Ok(r) => break revision(&r.header),
                Err(e) if started.elapsed() < OPEN_PATIENCE => {
                    debug!(error = %e, "etcd not reachable yet");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        };
        info!(endpoints = inner.client.endpoints(), prefix = %inner.prefix, revision = start_revision, replica, "connected to etcd");
        let tasks = vec![
            tokio::spawn(watch_loop(inner.clone(), start_revision)),
            tokio::spawn(lease_loop(inner.clone())),
            tokio::spawn(sync_loop(inner.clone())),
        ];
        Ok(EtcdStore {
            inner,
            tasks: Mutex::new(tasks),
        })
    }

    fn check_open(&self) -> Result<()> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(StoreError::Closed);
        }
        Ok(())
    }

    /// Every resource and the meta key, at one revision.
    async fn read_resources(&self) -> Result<(BTreeMap<String, Vec<u8>>, i64, u64)> {
        let i = &self.inner;
        let resp = i
            .client
            .txn(pb::TxnRequest {
                compare: vec![],
                success: vec![
                    op_range(range(i.key(RESOURCES), true)),
                    op_range(range(i.key(META), false)),
                ],
                failure: vec![],
            })
            .await?;
        let mut out = BTreeMap::new();
        for kv in ranged(&resp, 0) {
            if let Some(k) = i.rest(&kv.key).and_then(|k| k.strip_prefix(RESOURCES)) {
                out.insert(k.to_string(), kv.value.clone());
            }
        }
        let meta = ranged(&resp, 1).first().map_or(0, |kv| kv.mod_revision);
        Ok((out, meta, revision(&resp.header)))
    }

    /// Writes `ops` if no resource changed since the meta key's revision
    /// `meta` (and, with `seen`, since that revision); the new revision,
    /// or `None` when another write came first.
    async fn write_resources(&self, meta: i64, mut ops: Vec<pb::RequestOp>) -> Result<Option<u64>> {
        let i = &self.inner;
        ops.push(op_put(i.key(META), Vec::new(), 0));
        let resp = i
            .client
            .txn(pb::TxnRequest {
                compare: vec![cmp(
                    i.key(META),
                    compare::CompareResult::Equal,
                    compare::TargetUnion::ModRevision(meta),
                )],
                success: ops,
                failure: vec![],
            })
            .await?;
        Ok(resp.succeeded.then(|| revision(&resp.header)))
    }

    async fn apply_inner(
        &self,
        resources: Vec<Resource>,
        seen: Option<u64>,
    ) -> Result<ApplyOutcome> {
        self.check_open()?;
        let encoded = encode_all(&resources)?;
        for _ in 0..APPLY_TRIES {
            let (stored, meta, read_at) = self.read_resources().await?;
            if seen.is_some_and(|s| meta as u64 > s) {
                return Err(StoreError::Conflict);
            }
            let mut results = Vec::with_capacity(encoded.len());
            let mut ops = Vec::new();
            for (key, json) in &encoded {
                let ks = key_string(key);
                let action = action(stored.get(&ks).map(Vec::as_slice), json);
                if action != Action::Unchanged {
                    ops.push(op_put(
                        self.inner.key(&format!("{RESOURCES}{ks}")),
                        json.clone(),
                        0,
                    ));
                }
                results.push(ApplyResult {
                    key: key.clone(),
                    action,
                });
            }
            if ops.is_empty() {
                return Ok(ApplyOutcome {
                    revision: read_at,
                    results,
                });
            }
            match self.write_resources(meta, ops).await? {
                Some(revision) => return Ok(ApplyOutcome { revision, results }),
                None if seen.is_some() => return Err(StoreError::Conflict),
                None => continue,
            }
        }
        Err(StoreError::Conflict)
    }

    async fn delete_inner(&self, key: &ResourceKey, seen: Option<u64>) -> Result<Option<u64>> {
        self.check_open()?;
        let ks = key_string(key);
        for _ in 0..APPLY_TRIES {
            let (stored, meta, _) = self.read_resources().await?;
            if seen.is_some_and(|s| meta as u64 > s) {
                return Err(StoreError::Conflict);
            }
            if !stored.contains_key(&ks) {
                return Ok(None);
            }
            let op = op_delete(self.inner.key(&format!("{RESOURCES}{ks}")));
            match self.write_resources(meta, vec![op]).await? {
                Some(revision) => return Ok(Some(revision)),
                None if seen.is_some() => return Err(StoreError::Conflict),
                None => continue,
            }
        }
        Err(StoreError::Conflict)
    }
}

#[async_trait]
impl Store for EtcdStore {
    async fn apply(&self, resources: Vec<Resource>) -> Result<ApplyOutcome> {
        self.apply_inner(resources, None).await
    }

    async fn apply_since(&self, resources: Vec<Resource>, seen: u64) -> Result<ApplyOutcome> {
        self.apply_inner(resources, Some(seen)).await
    }

    async fn delete(&self, key: &ResourceKey) -> Result<Option<u64>> {
        self.delete_inner(key, None).await
    }

    async fn delete_since(&self, key: &ResourceKey, seen: u64) -> Result<Option<u64>> {
        self.delete_inner(key, Some(seen)).await
    }

    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>> {
        self.check_open()?;
        let ks = key_string(key);
        let resp = self
            .inner
            .client
            .range(range(self.inner.key(&format!("{RESOURCES}{ks}")), false))
            .await?;
        resp.kvs
            .first()
            .map(|kv| decode(&ks, &kv.value))
            .transpose()
    }

    async fn revision(&self) -> Result<u64> {
        self.check_open()?;
        // Every resource write (apply or delete) rewrites the meta key in
        // its transaction, so its mod revision is that of the last resource
        // change. Not the header's revision: etcd counts every key of the
        // cluster, and a watch of this prefix never sees the others'.
        let resp = self
            .inner
            .client
            .range(range(self.inner.key(META), false))
            .await?;
        Ok(resp.kvs.first().map_or(0, |kv| kv.mod_revision as u64))
    }

    async fn list(&self, kind: Option<Kind>) -> Result<(Vec<Resource>, u64)> {
        self.check_open()?;
        let sub = match kind {
            Some(k) => format!("{RESOURCES}{}/", k.as_str()),
            None => RESOURCES.to_string(),
        };
        let resp = self
            .inner
            .client
            .range(range(self.inner.key(&sub), true))
            .await?;
        let mut out = Vec::with_capacity(resp.kvs.len());
        for kv in &resp.kvs {
            let k = self.inner.rest(&kv.key).unwrap_or_default();
            out.push(decode(k, &kv.value)?);
        }
        out.sort_by_key(|r| r.key());
        Ok((out, revision(&resp.header)))
    }

    async fn snapshot(&self) -> Result<StoreSnapshot> {
        self.check_open()?;
        let i = &self.inner;
        let resp = i
            .client
            .txn(pb::TxnRequest {
                compare: vec![],
                success: vec![
                    op_range(range(i.key(RESOURCES), true)),
                    op_range(range(i.key(ENDPOINTS), true)),
                    op_range(range(
                        i.key(&format!("{STATE}{}", crate::vips::STATE_KEY)),
                        false,
                    )),
                ],
                failure: vec![],
            })
            .await?;
        let mut resources = Vec::new();
        for kv in ranged(&resp, 0) {
            resources.push(decode(i.rest(&kv.key).unwrap_or_default(), &kv.value)?);
        }
        resources.sort_by_key(|r| r.key());
        let endpoints = ranged(&resp, 1)
            .iter()
            .filter_map(|kv| {
                let instance = i.rest(&kv.key)?.strip_prefix(ENDPOINTS)?;
                Some((instance.to_string(), kv.value.clone()))
            })
            .collect();
        Ok(StoreSnapshot {
            revision: revision(&resp.header),
            resources,
            endpoints,
            vips: ranged(&resp, 2).first().map(|kv| kv.value.clone()),
        })
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    async fn close(&self) -> Result<()> {
        let i = &self.inner;
        if i.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in &tasks {
            t.abort();
        }
        // Hand the singleton duties over at once, and leave the replica
        // list. Endpoint records stay on the lease until it expires: their
        // proxies are moving to other replicas, which write them again.
        let lease = i.lease.swap(0, Ordering::AcqRel);
        let _ = i
            .client
            .txn(pb::TxnRequest {
                compare: vec![cmp(
                    i.key(LEADER),
                    compare::CompareResult::Equal,
                    compare::TargetUnion::Value(i.replica.clone().into_bytes()),
                )],
                success: vec![op_delete(i.key(LEADER))],
                failure: vec![],
            })
            .await;
        let _ = i
            .client
            .delete(pb::DeleteRangeRequest {
                key: i.key(&format!("{REPLICAS}{}", i.replica)),
                ..Default::default()
            })
            .await;
        i.leader.send_replace(false);
        debug!(lease, "etcd store closed");
        Ok(())
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.check_open()?;
        let resp = self
            .inner
            .client
            .range(range(self.inner.key(&format!("{STATE}{key}")), false))
            .await?;
        Ok(resp.kvs.into_iter().next().map(|kv| kv.value))
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.check_open()?;
        self.inner
            .client
            .put(pb::PutRequest {
                key: self.inner.key(&format!("{STATE}{key}")),
                value,
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn swap_state(&self, key: &str, expected: Option<&[u8]>, value: Vec<u8>) -> Result<bool> {
        self.check_open()?;
        let k = self.inner.key(&format!("{STATE}{key}"));
        let compare = match expected {
            None => cmp(
                k.clone(),
                compare::CompareResult::Equal,
                compare::TargetUnion::CreateRevision(0),
            ),
            Some(v) => cmp(
                k.clone(),
                compare::CompareResult::Equal,
                compare::TargetUnion::Value(v.to_vec()),
            ),
        };
        let resp = self
            .inner
            .client
            .txn(pb::TxnRequest {
                compare: vec![compare],
                success: vec![op_put(k, value, 0)],
                failure: vec![],
            })
            .await?;
        Ok(resp.succeeded)
    }

    async fn delete_state(&self, key: &str) -> Result<()> {
        self.check_open()?;
        self.inner
            .client
            .delete(pb::DeleteRangeRequest {
                key: self.inner.key(&format!("{STATE}{key}")),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        self.check_open()?;
        let resp = self
            .inner
            .client
            .range(range(self.inner.key(&format!("{STATE}{prefix}")), true))
            .await?;
        Ok(resp
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let k = self.inner.rest(&kv.key)?.strip_prefix(STATE)?.to_string();
                Some((k, kv.value))
            })
            .collect())
    }

    fn publish_endpoint(&self, instance: &str, record: Vec<u8>) {
        let mut p = self
            .inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        p.withdrawn.remove(instance);
        p.wanted.insert(instance.to_string(), record);
        drop(p);
        self.inner.sync_wake.notify_one();
    }

    fn withdraw_endpoint(&self, instance: &str, record: Vec<u8>) {
        let mut p = self
            .inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if p.wanted.get(instance) == Some(&record) {
            p.wanted.remove(instance);
        }
        p.written.remove(instance);
        p.withdrawn.insert(instance.to_string(), record);
        drop(p);
        self.inner.sync_wake.notify_one();
    }

    fn shared(&self) -> bool {
        true
    }

    fn leader(&self) -> watch::Receiver<bool> {
        self.inner.leader.subscribe()
    }

    fn describe(&self) -> String {
        format!(
            "etcd at {} (prefix {})",
            self.inner.client.endpoints(),
            self.inner.prefix.trim_end_matches('/')
        )
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Release);
        for t in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            t.abort();
        }
    }
}

/// Turns one watch response into events, one per revision.
fn events_of(inner: &Inner, resp: &pb::WatchResponse) -> Vec<StoreEvent> {
    let mut out: Vec<StoreEvent> = Vec::new();
    for ev in &resp.events {
        let Some(kv) = &ev.kv else { continue };
        let Some(rest) = inner.rest(&kv.key) else {
            continue;
        };
        let put = ev.r#type == pb::event::EventType::Put as i32;
        let change = if let Some(k) = rest.strip_prefix(RESOURCES) {
            let Some(key) = parse_key(k) else { continue };
            if put {
                Change::Put(key, kv.value.clone())
            } else {
                Change::Delete(key)
            }
        } else if let Some(instance) = rest.strip_prefix(ENDPOINTS) {
            Change::Endpoint {
                instance: instance.to_string(),
                record: put.then(|| kv.value.clone()),
            }
        } else if let Some(k) = rest.strip_prefix(STATE) {
            Change::State(k.to_string())
        } else {
            if rest == LEADER {
                inner.leader_wake.notify_one();
            }
            continue;
        };
        let rev = kv.mod_revision.max(0) as u64;
        match out.last_mut() {
            Some(last) if last.revision == rev => last.changes.push(change),
            _ => out.push(StoreEvent {
                revision: rev,
                changes: vec![change],
            }),
        }
    }
    out
}

/// Feeds every change under the prefix to the store's watchers.
async fn watch_loop(inner: Arc<Inner>, start: u64) {
    let mut next = start + 1;
    let mut backoff = Duration::from_millis(100);
    let mut failures = 0u32;
    while !inner.closed.load(Ordering::Acquire) {
        let create = pb::WatchCreateRequest {
            key: inner.prefix.clone().into_bytes(),
            range_end: prefix_end(inner.prefix.as_bytes()),
            start_revision: next as i64,
            ..Default::default()
        };
        let (_tx, mut stream) = match inner.client.watch(create).await {
            Ok(s) => s,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_power_of_two() {
                    warn!(error = %e, "cannot watch etcd; retrying");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    if resp.compact_revision > 0 {
                        // What happened between `next` and the compaction is
                        // gone: watchers read everything again.
                        let now = revision(&resp.header).max(resp.compact_revision as u64);
                        warn!(
                            from = next,
                            compacted = resp.compact_revision,
                            "the etcd watch fell behind a compaction; reloading"
                        );
                        let _ = inner.events.send(StoreEvent {
                            revision: now,
                            changes: vec![Change::Reset],
                        });
                        next = now + 1;
                        break;
                    }
                    if resp.canceled {
                        debug!(reason = %resp.cancel_reason, "etcd canceled the watch");
                        break;
                    }
                    if resp.created && failures > 0 {
                        info!(from = next, "watching etcd again");
                    }
                    failures = 0;
                    backoff = Duration::from_millis(100);
                    for ev in events_of(&inner, &resp) {
                        next = next.max(ev.revision + 1);
                        let _ = inner.events.send(ev);
                    }
                }
                Ok(None) => break,
                Err(s) => {
                    debug!(error = %describe(&s), "the etcd watch broke");
                    break;
                }
            }
        }
        failures += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Keeps a lease (granting a new one when it was lost), the replica's
/// record on it, and tries for the leader key.
async fn lease_loop(inner: Arc<Inner>) {
    let ttl = inner.lease_ttl;
    while !inner.closed.load(Ordering::Acquire) {
        let id = match inner.client.lease_grant(ttl).await {
            Ok(id) => id,
            Err(e) => {
                debug!(error = %e, "cannot grant a lease; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        inner.lease.store(id, Ordering::Release);
        // Everything published is written again on the new lease.
        inner
            .published
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .written
            .clear();
        inner.sync_wake.notify_one();
        info!(lease = id, ttl = ?ttl, "holding an etcd lease");
        let mut last_ok = Instant::now();
        let mut registered = false;
        let mut stream = None;
        loop {
            if inner.closed.load(Ordering::Acquire) {
                return;
            }
            if last_ok.elapsed() >= ttl {
                warn!(
                    lease = id,
                    "the etcd lease may have expired; granting a new one"
                );
                break;
            }
            // A new stream carries its first request.
            let mut sent = false;
            if stream.is_none() {
                stream = inner.client.keep_alive(id).await.ok();
                sent = stream.is_some();
            }
            if let Some((tx, rx)) = &mut stream {
                sent = sent || tx.try_send(pb::LeaseKeepAliveRequest { id }).is_ok();
                match tokio::time::timeout(Duration::from_secs(2), rx.message()).await {
                    Ok(Ok(Some(r))) if sent && r.ttl > 0 => last_ok = Instant::now(),
                    Ok(Ok(Some(_))) => {
                        warn!(lease = id, "the etcd lease expired; granting a new one");
                        break;
                    }
                    _ => stream = None,
                }
            }
            if !registered {
                registered = inner
                    .client
                    .put(pb::PutRequest {
                        key: inner.key(&format!("{REPLICAS}{}", inner.replica)),
                        value: inner.info.clone(),
                        lease: id,
                        ..Default::default()
                    })
                    .await
                    .is_ok();
            }
            campaign(&inner, id, last_ok.elapsed() < ttl).await;
            tokio::select! {
                _ = tokio::time::sleep(ttl / 3) => {}
                _ = inner.leader_wake.notified() => {}
            }
        }
        inner.lease.store(0, Ordering::Release);
        inner
            .leader
            .send_if_modified(|l| std::mem::replace(l, false));
    }
}

/// Takes the leader key if it is free; tells whether this replica holds it.
async fn campaign(inner: &Inner, lease: i64, lease_alive: bool) {
    let key = inner.key(LEADER);
    let resp = inner
        .client
        .txn(pb::TxnRequest {
            compare: vec![cmp(
                key.clone(),
                compare::CompareResult::Equal,
                compare::TargetUnion::CreateRevision(0),
            )],
            success: vec![op_put(
                key.clone(),
                inner.replica.clone().into_bytes(),
                lease,
            )],
            failure: vec![op_range(range(key, false))],
        })
        .await;
    let holds = match &resp {
        Ok(r) if r.succeeded => true,
        Ok(r) => ranged(r, 0)
            .first()
            .is_some_and(|kv| kv.value == inner.replica.as_bytes() && kv.lease == lease),
        // Unknown while etcd is away: keep what we knew while the lease lives.
        Err(_) => *inner.leader.borrow() && lease_alive,
    };
    let changed = inner
        .leader
        .send_if_modified(|l| std::mem::replace(l, holds) != holds);
    if changed {
        info!(replica = %inner.replica, leader = holds, "singleton duties {}", if holds { "taken" } else { "released" });
    }
}

/// Writes what `publish_endpoint` asked for and deletes what
/// `withdraw_endpoint` asked for, again and again until etcd took it.
async fn sync_loop(inner: Arc<Inner>) {
    let mut failing = false;
    loop {
        if failing {
            tokio::select! {
                _ = inner.sync_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        } else {
            inner.sync_wake.notified().await;
        }
        if inner.closed.load(Ordering::Acquire) {
            return;
        }
        let lease = inner.lease.load(Ordering::Acquire);
        if lease == 0 {
            failing = true;
            continue;
        }
        let (puts, deletes): (Vec<_>, Vec<_>) = {
            let p = inner.published.lock().unwrap_or_else(|e| e.into_inner());
            (
                p.wanted
                    .iter()
                    .filter(|(k, v)| p.written.get(*k) != Some(*v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                p.withdrawn
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            )
        };
        failing = false;
        for batch in puts.chunks(BATCH) {
            let ops = batch
                .iter()
                .map(|(k, v)| op_put(inner.key(&format!("{ENDPOINTS}{k}")), v.clone(), lease))
                .collect();
            let req = pb::TxnRequest {
                compare: vec![],
                success: ops,
                failure: vec![],
            };
            match inner.client.txn(req).await {
                Ok(_) => {
                    let mut p = inner.published.lock().unwrap_or_else(|e| e.into_inner());
                    for (k, v) in batch {
                        if p.wanted.get(k) == Some(v)
                            && inner.lease.load(Ordering::Acquire) == lease
                        {
                            p.written.insert(k.clone(), v.clone());
                        }
                    }
                }
                Err(e) => {
                    debug!(error = %e, "cannot write endpoint records yet");
                    failing = true;
                    break;
                }
            }
        }
        for (k, v) in deletes {
            let key = inner.key(&format!("{ENDPOINTS}{k}"));
            let req = pb::TxnRequest {
                compare: vec![cmp(
                    key.clone(),
                    compare::CompareResult::Equal,
                    compare::TargetUnion::Value(v.clone()),
                )],
                success: vec![op_delete(key)],
                failure: vec![],
            };
            match inner.client.txn(req).await {
                Ok(_) => {
                    let mut p = inner.published.lock().unwrap_or_else(|e| e.into_inner());
                    if p.withdrawn.get(&k) == Some(&v) {
                        p.withdrawn.remove(&k);
                    }
                }
                Err(e) => {
                    debug!(error = %e, "cannot withdraw endpoint records yet");
                    failing = true;
                    break;
                }
            }
        }
    }
}
