//! The control plane's store: what users applied (resources, with a
//! revision that grows with every change), the proxies' endpoint records,
//! and the control plane's own state values (tokens, the VIP table, the
//! CA), with a feed of change events.
//!
//! Two backends behind one trait: `RedbStore` (`redb`), one file on one
//! host, the default; and `EtcdStore` (`etcd`), shared by any number of
//! control plane replicas, whose revisions and watches come from etcd and
//! whose endpoint records live on a lease of the replica that holds the
//! proxy's stream.

mod etcd;
mod redb;

use async_trait::async_trait;
use serde::Serialize;
use tokio::sync::{broadcast, watch};
use trellis_resource::{Kind, Resource, ResourceKey};

pub use self::etcd::{EtcdConfig, EtcdStore};
pub use self::redb::RedbStore;

/// How many events a slow watcher may fall behind before it sees `Lagged`.
/// Watchers reload the whole state on lag, so this only bounds memory.
pub(crate) const EVENT_BUFFER: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use: is another control plane running on this data dir?")]
    InUse { path: std::path::PathBuf },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: std::path::PathBuf,
        source: Box<::redb::Error>,
    },
    // Boxed: redb's error is large, and every store call returns this.
    #[error("store error: {0}")]
    Backend(Box<::redb::Error>),
    /// etcd cannot serve the request: no member reachable, or no majority.
    #[error("the store (etcd at {endpoints}) is unavailable: {reason}. Writes resume by themselves when a majority of the etcd members is back; check them with `etcdctl --endpoints {endpoints} endpoint health` (when they are healthy, check this replica's --etcd-endpoints, and with TLS its --etcd-ca, --etcd-cert and --etcd-key)")]
    Unavailable { endpoints: String, reason: String },
    #[error("the stored resources changed while this request was handled (another control plane replica wrote them): send it again")]
    Conflict,
    #[error("etcd refused the request: {0}")]
    Etcd(String),
    #[error("the stored record {key} cannot be read ({source}); was the store written by a newer Trellis?")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("cannot encode {key}: {source}")]
    Encode {
        key: ResourceKey,
        source: serde_json::Error,
    },
    #[error("the store is closed")]
    Closed,
    #[error("store task failed: {0}")]
    Task(String),
}

impl From<::redb::Error> for StoreError {
    fn from(e: ::redb::Error) -> Self {
        StoreError::Backend(Box::new(e))
    }
}

impl StoreError {
    /// Whether the store could not be reached, as opposed to refusing the
    /// request: the HTTP API answers 503 for these.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What an apply did to one resource.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Created,
    Configured,
    Unchanged,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyResult {
    pub key: ResourceKey,
    pub action: Action,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApplyOutcome {
    /// The store's revision after the apply (unchanged when nothing changed).
    pub revision: u64,
    /// One per applied resource, in the order given.
    pub results: Vec<ApplyResult>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A resource was created or changed; its stored JSON.
    Put(ResourceKey, Vec<u8>),
    Delete(ResourceKey),
    /// A proxy's endpoint record was published (`Some`) or withdrawn
    /// (`None`), by this control plane or another replica.
    Endpoint {
        instance: String,
        record: Option<Vec<u8>>,
    },
    /// A state value changed (see `Store::get_state`).
    State(String),
    /// Events were lost (a compacted or broken etcd watch): anything may
    /// have changed, so watchers read everything again.
    Reset,
}

/// Changes committed at one revision.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEvent {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// Everything configs are made of, read at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreSnapshot {
    pub revision: u64,
    /// Sorted by key.
    pub resources: Vec<Resource>,
    /// Endpoint records by proxy instance, sorted.
    pub endpoints: Vec<(String, Vec<u8>)>,
    /// The service VIP table (`crate::vips::STATE_KEY`), if stored.
    pub vips: Option<Vec<u8>>,
}

/// A store. Implementations are atomic per call and send one event per
/// committed revision, in revision order.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or replaces all `resources` at once, or none of them.
    async fn apply(&self, resources: Vec<Resource>) -> Result<ApplyOutcome>;
    /// `apply`, refused with `StoreError::Conflict` when the resources
    /// changed after revision `seen` (they were read, and the apply
    /// validated against them, at `seen`). A store with one writer has
    /// nothing to check.
    async fn apply_since(&self, resources: Vec<Resource>, seen: u64) -> Result<ApplyOutcome> {
        let _ = seen;
        self.apply(resources).await
    }
    /// Removes a resource; the new revision, or `None` when it did not exist.
    async fn delete(&self, key: &ResourceKey) -> Result<Option<u64>>;
    /// `delete`, refused like `apply_since`.
    async fn delete_since(&self, key: &ResourceKey, seen: u64) -> Result<Option<u64>> {
        let _ = seen;
        self.delete(key).await
    }
    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>>;
    /// Every resource (of one kind, when given), sorted by key, with the
    /// revision they were read at.
    async fn list(&self, kind: Option<Kind>) -> Result<(Vec<Resource>, u64)>;
    /// Resources, endpoint records and the VIP table at one revision.
    async fn snapshot(&self) -> Result<StoreSnapshot>;
    /// A revision at or after the last change to the resources committed
    /// before this call: a watcher that has seen it has every such change
    /// (a consistent read of the resources at this moment).
    async fn revision(&self) -> Result<u64>;
    /// Events of every change committed after this call.
    fn watch(&self) -> broadcast::Receiver<StoreEvent>;
    /// Makes everything durable and releases the backend; later calls fail
    /// with `StoreError::Closed`. Endpoint records are left to expire (etcd)
    /// so that proxies moving to another replica never drop out.
    async fn close(&self) -> Result<()>;

    /// A small value of the control plane's own state (not a resource),
    /// e.g. the service VIP table or an API token's record.
    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>>;
    /// Stores a state value durably.
    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<()>;
    /// Writes `value` only if the key holds `expected` now (`None`: no
    /// value); whether it did. What replicas use to change a shared value
    /// without losing each other's writes.
    async fn swap_state(&self, key: &str, expected: Option<&[u8]>, value: Vec<u8>) -> Result<bool>;
    async fn delete_state(&self, key: &str) -> Result<()>;
    /// Every state value whose key starts with `prefix`, sorted by key
    /// (e.g. the API tokens, one key each, so that creating one is a single
    /// write that replicas cannot lose to each other).
    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>>;

    /// Publishes the endpoint record of a proxy connected to this control
    /// plane. Returns at once; the store writes it (again, after an outage)
    /// until it is withdrawn, and every replica's watch then sees it.
    fn publish_endpoint(&self, instance: &str, record: Vec<u8>);
    /// Withdraws a record published here, if the stored one is still
    /// `record` (the proxy may have registered again since, here or at
    /// another replica).
    fn withdraw_endpoint(&self, instance: &str, record: Vec<u8>);

    /// Whether other control planes may share this store: then config
    /// versions come from its revisions, and a proxy that moves between
    /// replicas is never sent an older state than it runs.
    fn shared(&self) -> bool {
        false
    }
    /// Whether this control plane holds the singleton duties (cleanup of
    /// expired tokens); on etcd, who holds the leader key on its lease.
    fn leader(&self) -> watch::Receiver<bool>;
    /// What the store is, for logs and `/readyz`.
    fn describe(&self) -> String;
}

/// `kind/namespace/name`; the namespace is empty for cluster-wide kinds.
pub fn key_string(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind.as_str(), key.namespace, key.name)
}

/// The inverse of `key_string`.
pub fn parse_key(s: &str) -> Option<ResourceKey> {
    let mut parts = s.splitn(3, '/');
    let kind = Kind::parse_loose(parts.next()?)?;
    let namespace = parts.next()?.to_string();
    let name = parts.next()?.to_string();
    Some(ResourceKey {
        kind,
        namespace,
        name,
    })
}

fn decode(key: &str, value: &[u8]) -> Result<Resource> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

/// Encodes every resource first, so one that cannot be encoded fails the
/// apply before anything is written.
fn encode_all(resources: &[Resource]) -> Result<Vec<(ResourceKey, Vec<u8>)>> {
    resources
        .iter()
        .map(|r| {
            let key = r.key();
            serde_json::to_vec(r)
                .map(|json| (key.clone(), json))
                .map_err(|source| StoreError::Encode { key, source })
        })
        .collect()
}

/// What applying `new` over `old` does: compare decoded values, not bytes,
/// since equal resources may have been encoded by an older serialiser.
fn action(old: Option<&[u8]>, new: &[u8]) -> Action {
    match old {
        None => Action::Created,
        Some(old) => {
            let same = old == new
                || serde_json::from_slice::<serde_json::Value>(old).ok()
                    == serde_json::from_slice::<serde_json::Value>(new).ok();
            if same {
                Action::Unchanged
            } else {
                Action::Configured
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::BTreeMap;
    use trellis_resource::{Metadata, ServicePort, ServiceSpec, Spec};

    use super::*;

    pub(crate) fn service(ns: &str, name: &str, port: u16) -> Resource {
        Resource {
            metadata: Metadata {
                name: name.into(),
                namespace: ns.into(),
                labels: BTreeMap::new(),
                annotations: BTreeMap::new(),
            },
            spec: Spec::Service(ServiceSpec {
                selector: [("app".to_string(), name.to_string())].into(),
                ports: vec![ServicePort {
                    name: None,
                    port,
                    target_port: None,
                    protocol: None,
                }],
            }),
        }
    }

    #[test]
    fn keys_round_trip() {
        let k = service("shop", "a/b", 80).key();
        assert_eq!(parse_key(&key_string(&k)), Some(k));
        assert_eq!(parse_key("Nope/x/y"), None);
        assert_eq!(parse_key("Service/x"), None);
    }
}
