//! The resource store: what users applied, with a revision that grows with
//! every change, and a feed of change events.
//!
//! `Store` is a trait so that an etcd backend can replace the embedded one
//! for replicated control planes; `RedbStore` is the embedded backend used
//! on plain hosts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use tokio::sync::broadcast;
use trellis_resource::{Kind, Resource, ResourceKey};

/// Resources as JSON, keyed `kind/namespace/name`.
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Store-wide values; only the revision for now.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// The control plane's own state values (see `Store::get_state`).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");

/// How many events a slow watcher may fall behind before it sees `Lagged`.
/// Watchers reload the whole state on lag, so this only bounds memory.
const EVENT_BUFFER: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the store {path} is in use: is another control plane running on this data dir?")]
    InUse { path: PathBuf },
    #[error("cannot open the store {path}: {source}")]
    Open {
        path: PathBuf,
        source: Box<redb::Error>,
    },
    // Boxed: redb's error is large, and every store call returns this.
    #[error("store error: {0}")]
    Backend(Box<redb::Error>),
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

impl From<redb::Error> for StoreError {
    fn from(e: redb::Error) -> Self {
        StoreError::Backend(Box::new(e))
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
    Put(ResourceKey),
    Delete(ResourceKey),
}

/// One committed change of the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreEvent {
    pub revision: u64,
    pub changes: Vec<Change>,
}

/// A resource store. Implementations must be atomic per call and send one
/// event per committed change, in revision order.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates or replaces all `resources` at once, or none of them.
    async fn apply(&self, resources: Vec<Resource>) -> Result<ApplyOutcome>;
    /// Removes a resource; the new revision, or `None` when it did not exist.
    async fn delete(&self, key: &ResourceKey) -> Result<Option<u64>>;
    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>>;
    /// Every resource (of one kind, when given), sorted by key, with the
    /// revision they were read at.
    async fn list(&self, kind: Option<Kind>) -> Result<(Vec<Resource>, u64)>;
    /// Events of every change committed after this call.
    fn watch(&self) -> broadcast::Receiver<StoreEvent>;
    /// Makes everything durable and releases the backend; later calls fail
    /// with `StoreError::Closed`.
    async fn close(&self) -> Result<()>;
    /// A small value of the control plane's own state (not a resource, no
    /// revision, no event), e.g. the service VIP table.
    async fn get_state(&self, _key: &str) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Stores a state value durably. Backends without state keep nothing.
    async fn put_state(&self, _key: &str, _value: Vec<u8>) -> Result<()> {
        Ok(())
    }
    /// Every state value whose key starts with `prefix`, sorted by key
    /// (e.g. the API tokens, one key each, so that creating one is a single
    /// write that replicas cannot lose to each other).
    async fn list_state(&self, _prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }
}

/// The embedded store: one redb file. redb commits are durable and
/// crash-safe, so a control plane that dies restarts with every resource.
pub struct RedbStore {
    path: PathBuf,
    /// `None` once closed. Cloned out briefly, never held across an await.
    db: RwLock<Option<Arc<Database>>>,
    /// Serialises writers so that events leave in revision order.
    write_lock: Arc<Mutex<()>>,
    events: broadcast::Sender<StoreEvent>,
    /// Tests make an apply fail after writing this many resources.
    #[cfg(test)]
    fail_after: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

impl RedbStore {
    /// Opens (or creates) the store at `path`.
    pub async fn open(path: impl Into<PathBuf>) -> Result<Self> {
        let path = path.into();
        let p = path.clone();
        let db = tokio::task::spawn_blocking(move || open_db(&p))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(RedbStore {
            path,
            db: RwLock::new(Some(Arc::new(db))),
            write_lock: Arc::new(Mutex::new(())),
            events,
            #[cfg(test)]
            fail_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn db(&self) -> Result<Arc<Database>> {
        self.db
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .ok_or(StoreError::Closed)
    }

    /// Runs blocking redb work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Database>) -> Result<T> + Send + 'static,
    {
        let db = self.db()?;
        tokio::task::spawn_blocking(move || f(db))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

fn open_db(path: &Path) -> Result<Database> {
    let db = Database::create(path).map_err(|e| match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_owned(),
        },
        e => StoreError::Open {
            path: path.to_owned(),
            source: Box::new(e.into()),
        },
    })?;
    // Create the tables up front so that readers never meet a missing table.
    let txn = db.begin_write().map_err(redb::Error::from)?;
    {
        txn.open_table(RESOURCES).map_err(redb::Error::from)?;
        let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
        let has_revision = meta.get(REVISION).map_err(redb::Error::from)?.is_some();
        if !has_revision {
            meta.insert(REVISION, 0).map_err(redb::Error::from)?;
        }
    }
    txn.commit().map_err(redb::Error::from)?;
    Ok(db)
}

/// `kind/namespace/name`; the namespace is empty for cluster-wide kinds.
pub fn key_string(key: &ResourceKey) -> String {
    format!("{}/{}/{}", key.kind.as_str(), key.namespace, key.name)
}

fn decode(key: &str, value: &[u8]) -> Result<Resource> {
    serde_json::from_slice(value).map_err(|source| StoreError::Corrupt {
        key: key.to_string(),
        source,
    })
}

fn read_revision(table: &impl ReadableTable<&'static str, u64>) -> Result<u64> {
    Ok(table
        .get(REVISION)
        .map_err(redb::Error::from)?
        .map(|v| v.value())
        .unwrap_or(0))
}

#[async_trait]
impl Store for RedbStore {
    async fn apply(&self, resources: Vec<Resource>) -> Result<ApplyOutcome> {
        let events = self.events.clone();
        let write_lock = self.write_lock.clone();
        #[cfg(test)]
        let fail_after = self.fail_after.load(std::sync::atomic::Ordering::Relaxed);
        self.blocking(move |db| {
            // Encode first: a resource that cannot be encoded fails the
            // apply before anything is written.
            let mut encoded = Vec::with_capacity(resources.len());
            for r in &resources {
                let key = r.key();
                let json = serde_json::to_vec(r).map_err(|source| StoreError::Encode {
                    key: key.clone(),
                    source,
                })?;
                encoded.push((key, json));
            }
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            let mut results = Vec::with_capacity(encoded.len());
            let mut changes = Vec::new();
            let revision;
            {
                let mut table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
                for (key, json) in &encoded {
                    #[cfg(test)]
                    if results.len() >= fail_after {
                        // Dropping `txn` without commit aborts it.
                        return Err(StoreError::Task("injected failure".into()));
                    }
                    let ks = key_string(key);
                    let old = table
                        .insert(ks.as_str(), json.as_slice())
                        .map_err(redb::Error::from)?;
                    let action = match old {
                        None => Action::Created,
                        // Compare decoded values, not bytes: equal resources
                        // may have been encoded by an older serialiser.
                        Some(old) => {
                            let same = old.value() == json.as_slice()
                                || serde_json::from_slice::<serde_json::Value>(old.value()).ok()
                                    == serde_json::from_slice::<serde_json::Value>(json).ok();
                            if same {
                                Action::Unchanged
                            } else {
                                Action::Configured
                            }
                        }
                    };
                    if action != Action::Unchanged {
                        changes.push(Change::Put(key.clone()));
                    }
                    results.push(ApplyResult {
                        key: key.clone(),
                        action,
                    });
                }
                let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
                let current = read_revision(&meta)?;
                revision = if changes.is_empty() {
                    current
                } else {
                    meta.insert(REVISION, current + 1)
                        .map_err(redb::Error::from)?;
                    current + 1
                };
            }
            if changes.is_empty() {
                txn.abort().map_err(redb::Error::from)?;
            } else {
                txn.commit().map_err(redb::Error::from)?;
                // No receivers is fine: nobody watches yet.
                let _ = events.send(StoreEvent { revision, changes });
            }
            Ok(ApplyOutcome { revision, results })
        })
        .await
    }

    async fn delete(&self, key: &ResourceKey) -> Result<Option<u64>> {
        let key = key.clone();
        let events = self.events.clone();
        let write_lock = self.write_lock.clone();
        self.blocking(move |db| {
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            let revision;
            {
                let mut table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
                let existed = table
                    .remove(key_string(&key).as_str())
                    .map_err(redb::Error::from)?
                    .is_some();
                if !existed {
                    return Ok(None);
                }
                let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
                revision = read_revision(&meta)? + 1;
                meta.insert(REVISION, revision).map_err(redb::Error::from)?;
            }
            txn.commit().map_err(redb::Error::from)?;
            let _ = events.send(StoreEvent {
                revision,
                changes: vec![Change::Delete(key)],
            });
            Ok(Some(revision))
        })
        .await
    }

    async fn get(&self, key: &ResourceKey) -> Result<Option<Resource>> {
        let ks = key_string(key);
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
            match table.get(ks.as_str()).map_err(redb::Error::from)? {
                Some(v) => Ok(Some(decode(&ks, v.value())?)),
                None => Ok(None),
            }
        })
        .await
    }

    async fn list(&self, kind: Option<Kind>) -> Result<(Vec<Resource>, u64)> {
        self.blocking(move |db| {
            // One read transaction: the resources and the revision agree.
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
            let meta = txn.open_table(META).map_err(redb::Error::from)?;
            let revision = read_revision(&meta)?;
            let prefix = kind.map(|k| format!("{}/", k.as_str()));
            let iter = match &prefix {
                Some(p) => table.range(p.as_str()..).map_err(redb::Error::from)?,
                None => table.iter().map_err(redb::Error::from)?,
            };
            let mut out = Vec::new();
            for item in iter {
                let (k, v) = item.map_err(redb::Error::from)?;
                let k = k.value();
                if let Some(p) = &prefix {
                    if !k.starts_with(p.as_str()) {
                        break;
                    }
                }
                out.push(decode(k, v.value())?);
            }
            // Keys sort by kind name; callers expect key order.
            out.sort_by_key(|r| r.key());
            Ok((out, revision))
        })
        .await
    }

    fn watch(&self) -> broadcast::Receiver<StoreEvent> {
        self.events.subscribe()
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            // Stores written before the state table existed have none.
            let table = match txn.open_table(STATE) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(redb::Error::from(e).into()),
            };
            let v = table.get(key.as_str()).map_err(redb::Error::from)?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<()> {
        let key = key.to_string();
        let write_lock = self.write_lock.clone();
        self.blocking(move |db| {
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut table = txn.open_table(STATE).map_err(redb::Error::from)?;
                table
                    .insert(key.as_str(), value.as_slice())
                    .map_err(redb::Error::from)?;
            }
            txn.commit().map_err(redb::Error::from)?;
            Ok(())
        })
        .await
    }

    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = match txn.open_table(STATE) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(redb::Error::from(e).into()),
            };
            let mut out = Vec::new();
            for item in table.range(prefix.as_str()..).map_err(redb::Error::from)? {
                let (k, v) = item.map_err(redb::Error::from)?;
                if !k.value().starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.value().to_string(), v.value().to_vec()));
            }
            Ok(out)
        })
        .await
    }

    async fn close(&self) -> Result<()> {
        let db = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        // redb commits are durable already; dropping the last handle
        // releases the file lock. Wait for in-flight writers first.
        let write_lock = self.write_lock.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            drop(db);
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use trellis_resource::{Metadata, ServicePort, ServiceSpec, Spec};

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

    async fn open(dir: &tempfile::TempDir) -> RedbStore {
        RedbStore::open(dir.path().join("store.redb"))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn apply_list_get_delete() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut watch = store.watch();
        let a = service("default", "a", 80);
        let b = service("shop", "b", 81);
        let out = store.apply(vec![a.clone(), b.clone()]).await.unwrap();
        assert_eq!(out.revision, 1);
        assert!(out.results.iter().all(|r| r.action == Action::Created));
        let ev = watch.recv().await.unwrap();
        assert_eq!(ev.revision, 1);
        assert_eq!(ev.changes.len(), 2);

        let (all, rev) = store.list(None).await.unwrap();
        assert_eq!((all.len(), rev), (2, 1));
        let (svcs, _) = store.list(Some(Kind::Service)).await.unwrap();
        assert_eq!(svcs.len(), 2);
        let (routes, _) = store.list(Some(Kind::HttpRoute)).await.unwrap();
        assert!(routes.is_empty());
        assert_eq!(store.get(&a.key()).await.unwrap(), Some(a.clone()));

        // Same content again: nothing changes, not even the revision.
        let out = store.apply(vec![a.clone()]).await.unwrap();
        assert_eq!(out.revision, 1);
        assert_eq!(out.results[0].action, Action::Unchanged);

        let a2 = service("default", "a", 8080);
        let out = store.apply(vec![a2.clone()]).await.unwrap();
        assert_eq!(out.revision, 2);
        assert_eq!(out.results[0].action, Action::Configured);
        assert_eq!(store.get(&a.key()).await.unwrap(), Some(a2));

        assert_eq!(store.delete(&a.key()).await.unwrap(), Some(3));
        assert_eq!(store.delete(&a.key()).await.unwrap(), None);
        assert_eq!(store.get(&a.key()).await.unwrap(), None);
        let ev = watch.recv().await.unwrap();
        assert_eq!(ev.revision, 2);
        let ev = watch.recv().await.unwrap();
        assert_eq!(ev.changes, vec![Change::Delete(a.key())]);
    }

    #[tokio::test]
    async fn reopen_restores_everything() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store
            .apply(vec![
                service("default", "a", 80),
                service("default", "b", 81),
            ])
            .await
            .unwrap();
        store.close().await.unwrap();
        assert!(matches!(store.list(None).await, Err(StoreError::Closed)));

        let store = open(&dir).await;
        let (all, rev) = store.list(None).await.unwrap();
        assert_eq!(rev, 1);
        assert_eq!(
            all,
            vec![service("default", "a", 80), service("default", "b", 81)]
        );
        // The revision keeps growing after a restart.
        let out = store
            .apply(vec![service("default", "c", 82)])
            .await
            .unwrap();
        assert_eq!(out.revision, 2);
    }

    #[tokio::test]
    async fn state_values_list_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        assert!(store.list_state("auth/").await.unwrap().is_empty());
        for k in ["auth/b", "auth/a", "authz", "vips"] {
            store.put_state(k, k.as_bytes().to_vec()).await.unwrap();
        }
        let got: Vec<String> = store
            .list_state("auth/")
            .await
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(got, ["auth/a", "auth/b"]);
    }

    #[tokio::test]
    async fn second_open_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _store = open(&dir).await;
        let err = RedbStore::open(dir.path().join("store.redb"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::InUse { .. }), "{err}");
    }

    #[tokio::test]
    async fn failing_apply_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        store
            .apply(vec![service("default", "a", 80)])
            .await
            .unwrap();
        let mut watch = store.watch();
        store
            .fail_after
            .store(1, std::sync::atomic::Ordering::Relaxed);
        let err = store
            .apply(vec![
                service("default", "b", 81),
                service("default", "a", 9),
            ])
            .await;
        assert!(err.is_err());
        store
            .fail_after
            .store(usize::MAX, std::sync::atomic::Ordering::Relaxed);
        let (all, rev) = store.list(None).await.unwrap();
        assert_eq!(rev, 1);
        assert_eq!(all, vec![service("default", "a", 80)]);
        assert!(watch.try_recv().is_err());
    }
}
