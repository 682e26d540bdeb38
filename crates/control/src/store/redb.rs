//! The embedded store: one redb file on one host. Resources and state
//! values are durable; endpoint records live in memory, since they belong
//! to the proxies connected to this very process.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use redb::{Database, ReadableTable, TableDefinition};
use tokio::sync::{broadcast, watch};
use trellis_resource::{Kind, Resource, ResourceKey};

use super::{
    action, decode, encode_all, key_string, ApplyOutcome, ApplyResult, Change, Result, Store,
    StoreError, StoreEvent, StoreSnapshot, EVENT_BUFFER,
};

/// Resources as JSON, keyed `kind/namespace/name`.
const RESOURCES: TableDefinition<&str, &[u8]> = TableDefinition::new("resources");
/// Store-wide values; only the revision for now.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const REVISION: &str = "revision";
/// The control plane's own state values (see `Store::get_state`).
const STATE: TableDefinition<&str, &[u8]> = TableDefinition::new("state");
/// How long `close` waits for reads under way to drop their handle.
const CLOSE_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The embedded store: one redb file. redb commits are durable and
/// crash-safe, so a control plane that dies restarts with every resource.
pub struct RedbStore {
    path: PathBuf,
    /// `None` once closed. Cloned out briefly, never held across an await.
    db: RwLock<Option<Arc<Database>>>,
    /// Serialises writers so that events leave in revision order, and
    /// holds what is kept in memory: the revision (the stored one, plus
    /// one per endpoint change since) and the endpoint records.
    write_lock: Arc<Mutex<Memory>>,
    events: broadcast::Sender<StoreEvent>,
    leader: watch::Sender<bool>,
    /// Tests make an apply fail after writing this many resources.
    #[cfg(test)]
    fail_after: std::sync::atomic::AtomicUsize,
}

#[derive(Default)]
struct Memory {
    revision: u64,
    endpoints: BTreeMap<String, Vec<u8>>,
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
        let (db, revision) = tokio::task::spawn_blocking(move || open_db(&p))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Ok(RedbStore {
            path,
            db: RwLock::new(Some(Arc::new(db))),
            write_lock: Arc::new(Mutex::new(Memory {
                revision,
                endpoints: BTreeMap::new(),
            })),
            events,
            // One control plane per store file: it holds every duty.
            leader: watch::channel(true).0,
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

fn open_db(path: &Path) -> Result<(Database, u64)> {
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
    let revision;
    {
        txn.open_table(RESOURCES).map_err(redb::Error::from)?;
        txn.open_table(STATE).map_err(redb::Error::from)?;
        let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
        revision = read_revision(&meta)?;
        if meta.get(REVISION).map_err(redb::Error::from)?.is_none() {
            meta.insert(REVISION, 0).map_err(redb::Error::from)?;
        }
    }
    txn.commit().map_err(redb::Error::from)?;
    Ok((db, revision))
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
            let encoded = encode_all(&resources)?;
            let mut mem = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            let mut results = Vec::with_capacity(encoded.len());
            let mut changes = Vec::new();
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
                    let action = action(old.as_ref().map(|o| o.value()), json);
                    if action != super::Action::Unchanged {
                        changes.push(Change::Put(key.clone(), json.clone()));
                    }
                    results.push(ApplyResult {
                        key: key.clone(),
                        action,
                    });
                }
            }
            if changes.is_empty() {
                txn.abort().map_err(redb::Error::from)?;
                return Ok(ApplyOutcome {
                    revision: mem.revision,
                    results,
                });
            }
            let revision = commit_next(txn, &mut mem)?;
            // No receivers is fine: nobody watches yet.
            let _ = events.send(StoreEvent { revision, changes });
            Ok(ApplyOutcome { revision, results })
        })
        .await
    }

    async fn delete(&self, key: &ResourceKey) -> Result<Option<u64>> {
        let key = key.clone();
        let events = self.events.clone();
        let write_lock = self.write_lock.clone();
        self.blocking(move |db| {
            let mut mem = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
                let existed = table
                    .remove(key_string(&key).as_str())
                    .map_err(redb::Error::from)?
                    .is_some();
                if !existed {
                    return Ok(None);
                }
            }
            let revision = commit_next(txn, &mut mem)?;
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
        let mem = self.write_lock.clone();
        self.blocking(move |db| {
            // Under the write lock, so the resources and the revision agree.
            let mem = mem.lock().unwrap_or_else(|e| e.into_inner());
            let revision = mem.revision;
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
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

    async fn revision(&self) -> Result<u64> {
        self.db()?;
        Ok(self
            .write_lock
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .revision)
    }

    async fn snapshot(&self) -> Result<StoreSnapshot> {
        let mem = self.write_lock.clone();
        self.blocking(move |db| {
            let mem = mem.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(RESOURCES).map_err(redb::Error::from)?;
            let mut resources = Vec::new();
            for item in table.iter().map_err(redb::Error::from)? {
                let (k, v) = item.map_err(redb::Error::from)?;
                resources.push(decode(k.value(), v.value())?);
            }
            resources.sort_by_key(|r| r.key());
            let state = txn.open_table(STATE).map_err(redb::Error::from)?;
            let vips = state
                .get(crate::vips::STATE_KEY)
                .map_err(redb::Error::from)?
                .map(|v| v.value().to_vec());
            Ok(StoreSnapshot {
                revision: mem.revision,
                resources,
                endpoints: mem
                    .endpoints
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                vips,
            })
        })
        .await
    }

    async fn get_state(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let key = key.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(STATE).map_err(redb::Error::from)?;
            let v = table.get(key.as_str()).map_err(redb::Error::from)?;
            Ok(v.map(|v| v.value().to_vec()))
        })
        .await
    }

    async fn put_state(&self, key: &str, value: Vec<u8>) -> Result<()> {
        self.write_state(key, None, Some(value)).await.map(|_| ())
    }

    async fn swap_state(&self, key: &str, expected: Option<&[u8]>, value: Vec<u8>) -> Result<bool> {
        self.write_state(key, Some(expected.map(<[u8]>::to_vec)), Some(value))
            .await
    }

    async fn delete_state(&self, key: &str) -> Result<()> {
        self.write_state(key, None, None).await.map(|_| ())
    }

    async fn list_state(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>> {
        let prefix = prefix.to_string();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(redb::Error::from)?;
            let table = txn.open_table(STATE).map_err(redb::Error::from)?;
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

    fn publish_endpoint(&self, instance: &str, record: Vec<u8>) {
        let mut mem = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if mem.endpoints.get(instance) == Some(&record) {
            return;
        }
        mem.endpoints.insert(instance.to_string(), record.clone());
        mem.revision += 1;
        let _ = self.events.send(StoreEvent {
            revision: mem.revision,
            changes: vec![Change::Endpoint {
                instance: instance.to_string(),
                record: Some(record),
            }],
        });
    }

    fn withdraw_endpoint(&self, instance: &str, record: Vec<u8>) {
        let mut mem = self.write_lock.lock().unwrap_or_else(|e| e.into_inner());
        if mem.endpoints.get(instance) != Some(&record) {
            return;
        }
        mem.endpoints.remove(instance);
        mem.revision += 1;
        let _ = self.events.send(StoreEvent {
            revision: mem.revision,
            changes: vec![Change::Endpoint {
                instance: instance.to_string(),
                record: None,
            }],
        });
    }

    fn leader(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    fn describe(&self) -> String {
        format!("embedded store {}", self.path.display())
    }

    async fn close(&self) -> Result<()> {
        let db = self.db.write().unwrap_or_else(|e| e.into_inner()).take();
        // redb commits are durable already; dropping the last handle
        // releases the file lock. Wait for in-flight writers first, then
        // for reads under way (a task of the actor's may hold a handle):
        // until the last is dropped, a control plane started next on this
        // data dir finds the store in use.
        let write_lock = self.write_lock.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let Some(mut db) = db else {
                return Ok(());
            };
            let deadline = std::time::Instant::now() + CLOSE_WAIT;
            loop {
                match Arc::try_unwrap(db) {
                    Ok(last) => {
                        drop(last);
                        return Ok(());
                    }
                    Err(_) if std::time::Instant::now() >= deadline => {
                        return Err(StoreError::Task(format!(
                            "a read of the store did not end within {CLOSE_WAIT:?}; the file stays locked until it does"
                        )));
                    }
                    Err(shared) => {
                        db = shared;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                }
            }
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

impl RedbStore {
    /// Writes (`Some`) or deletes (`None`) a state value; with `expected`,
    /// only if the key holds that value now. Whether it wrote.
    async fn write_state(
        &self,
        key: &str,
        expected: Option<Option<Vec<u8>>>,
        value: Option<Vec<u8>>,
    ) -> Result<bool> {
        let key = key.to_string();
        let write_lock = self.write_lock.clone();
        let events = self.events.clone();
        self.blocking(move |db| {
            let mut mem = write_lock.lock().unwrap_or_else(|e| e.into_inner());
            let txn = db.begin_write().map_err(redb::Error::from)?;
            {
                let mut table = txn.open_table(STATE).map_err(redb::Error::from)?;
                if let Some(expected) = &expected {
                    let now = table
                        .get(key.as_str())
                        .map_err(redb::Error::from)?
                        .map(|v| v.value().to_vec());
                    if &now != expected {
                        return Ok(false);
                    }
                }
                match &value {
                    Some(v) => {
                        table
                            .insert(key.as_str(), v.as_slice())
                            .map_err(redb::Error::from)?;
                    }
                    None => {
                        table.remove(key.as_str()).map_err(redb::Error::from)?;
                    }
                }
            }
            let revision = commit_next(txn, &mut mem)?;
            let _ = events.send(StoreEvent {
                revision,
                changes: vec![Change::State(key)],
            });
            Ok(true)
        })
        .await
    }
}

/// Commits `txn` with the next revision stored in it.
fn commit_next(txn: redb::WriteTransaction, mem: &mut Memory) -> Result<u64> {
    let revision = mem.revision + 1;
    {
        let mut meta = txn.open_table(META).map_err(redb::Error::from)?;
        meta.insert(REVISION, revision).map_err(redb::Error::from)?;
    }
    txn.commit().map_err(redb::Error::from)?;
    mem.revision = revision;
    Ok(revision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::service;
    use crate::store::Action;

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

    #[tokio::test]
    async fn state_swaps_only_from_the_expected_value() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut watch = store.watch();
        assert!(store.swap_state("k", None, b"1".to_vec()).await.unwrap());
        assert!(!store.swap_state("k", None, b"2".to_vec()).await.unwrap());
        assert!(!store
            .swap_state("k", Some(b"0"), b"2".to_vec())
            .await
            .unwrap());
        assert!(store
            .swap_state("k", Some(b"1"), b"2".to_vec())
            .await
            .unwrap());
        assert_eq!(store.get_state("k").await.unwrap(), Some(b"2".to_vec()));
        store.delete_state("k").await.unwrap();
        assert_eq!(store.get_state("k").await.unwrap(), None);
        let ev = watch.recv().await.unwrap();
        assert_eq!(ev.changes, vec![Change::State("k".into())]);
    }

    #[tokio::test]
    async fn endpoints_live_in_memory_and_are_withdrawn_only_as_published() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir).await;
        let mut watch = store.watch();
        store.publish_endpoint("web-0", b"a".to_vec());
        let ev = watch.recv().await.unwrap();
        assert_eq!(ev.revision, 1);
        assert_eq!(
            ev.changes,
            vec![Change::Endpoint {
                instance: "web-0".into(),
                record: Some(b"a".to_vec())
            }]
        );
        // The proxy registered again (record b): the old stream's withdrawal
        // of record a changes nothing.
        store.publish_endpoint("web-0", b"b".to_vec());
        store.withdraw_endpoint("web-0", b"a".to_vec());
        let snap = store.snapshot().await.unwrap();
        assert_eq!(snap.endpoints, vec![("web-0".to_string(), b"b".to_vec())]);
        assert_eq!(snap.revision, 2);
        store.withdraw_endpoint("web-0", b"b".to_vec());
        assert!(store.snapshot().await.unwrap().endpoints.is_empty());
        // Revisions keep growing past in-memory changes.
        let out = store
            .apply(vec![service("default", "a", 80)])
            .await
            .unwrap();
        assert_eq!(out.revision, 4);
    }
}
