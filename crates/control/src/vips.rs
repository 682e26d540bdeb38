//! Service VIPs: a stable virtual IPv4 address per Service, which the
//! sidecars' DNS servers answer for its names and their outbound listeners
//! recognise as the original destination of a redirected connection.
//!
//! Addresses come from 240.240.0.0/16 (class E, never assigned to a real
//! network; Istio's DNS proxy auto-allocates from the same range), so they
//! cannot collide with a pod subnet or a host route. A Service keeps its
//! VIP for the life of the store, even across delete and re-apply, so a
//! client that cached an address never reaches another service by it. The
//! table is one value in the store (`Store::swap_state`), so it survives
//! restarts, and replicas sharing a store allocate through it: each change
//! is a compare-and-swap of the whole table, redone on top of another
//! replica's when that one wrote first, so no two Services ever get the
//! same address.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use crate::registry::ServiceName;
use crate::store::{Store, StoreError};

/// The key of the VIP table among the store's state values.
pub const STATE_KEY: &str = "vips";
/// 240.240.0.0/16.
const BASE: u32 = u32::from_be_bytes([240, 240, 0, 0]);
const SIZE: u32 = 1 << 16;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Vips {
    by_service: BTreeMap<ServiceName, Ipv4Addr>,
}

impl Vips {
    /// The table from its stored JSON (`{"ns/name": "240.240.x.y"}`);
    /// entries that do not parse are dropped and reassigned.
    pub fn from_json(bytes: &[u8]) -> Vips {
        let raw: BTreeMap<String, String> = serde_json::from_slice(bytes).unwrap_or_default();
        let by_service = raw
            .into_iter()
            .filter_map(|(k, v)| Some((ServiceName::parse(&k)?, v.parse().ok()?)))
            .collect();
        Vips { by_service }
    }

    pub fn to_json(&self) -> Vec<u8> {
        let raw: BTreeMap<String, String> = self
            .by_service
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        serde_json::to_vec(&raw).expect("a map of strings serialises")
    }

    /// A table given whole by an external source (Kubernetes: each
    /// Service's ClusterIP is its VIP).
    pub fn fixed(by_service: BTreeMap<ServiceName, Ipv4Addr>) -> Vips {
        Vips { by_service }
    }

    pub fn get(&self, name: &ServiceName) -> Option<Ipv4Addr> {
        self.by_service.get(name).copied()
    }

    /// Gives every service in `services` that has none a VIP; returns
    /// whether the table changed (and so must be stored). A service's
    /// first choice is a hash of its name, so two control planes that
    /// start from empty stores agree on most addresses.
    pub fn assign<'a>(&mut self, services: impl IntoIterator<Item = &'a ServiceName>) -> bool {
        let mut used: HashSet<Ipv4Addr> = self.by_service.values().copied().collect();
        let mut changed = false;
        for name in services {
            if self.by_service.contains_key(name) {
                continue;
            }
            // Skip .0 and .255 of each /24 so no VIP looks like a network
            // or broadcast address to tools that assume /24s.
            let start = fnv1a(name.to_string().as_bytes()) % SIZE;
            let free = (0..SIZE)
                .map(|i| Ipv4Addr::from(BASE + (start + i) % SIZE))
                .find(|ip| {
                    let last = ip.octets()[3];
                    last != 0 && last != 255 && !used.contains(ip)
                });
            let Some(ip) = free else {
                tracing::warn!(service = %name, "no service VIP left in 240.240.0.0/16");
                continue;
            };
            used.insert(ip);
            self.by_service.insert(name.clone(), ip);
            changed = true;
        }
        changed
    }

    /// Loads the table from the store (empty when none was stored).
    pub async fn load(store: &dyn Store) -> Result<Vips, StoreError> {
        Ok(store
            .get_state(STATE_KEY)
            .await?
            .map(|b| Vips::from_json(&b))
            .unwrap_or_default())
    }

    /// Gives `services` that have no VIP one, in the stored table; returns
    /// the table as stored.
    pub async fn allocate<'a>(
        store: &dyn Store,
        services: impl IntoIterator<Item = &'a ServiceName> + Clone,
    ) -> Result<Vips, StoreError> {
        for _ in 0..ALLOCATE_TRIES {
            let raw = store.get_state(STATE_KEY).await?;
            let mut vips = raw.as_deref().map(Vips::from_json).unwrap_or_default();
            if !vips.assign(services.clone()) {
                return Ok(vips);
            }
            if store
                .swap_state(STATE_KEY, raw.as_deref(), vips.to_json())
                .await?
            {
                return Ok(vips);
            }
        }
        Err(StoreError::Conflict)
    }
}

/// Tries of an allocation that lost to another replica's.
const ALLOCATE_TRIES: usize = 10;

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<ServiceName> {
        n.iter().map(|s| ServiceName::parse(s).unwrap()).collect()
    }

    #[test]
    fn vips_are_stable_unique_and_in_range() {
        let mut v = Vips::default();
        let a = names(&["default/catalog", "default/reviews", "shop/catalog"]);
        assert!(v.assign(&a));
        assert!(!v.assign(&a), "nothing new, nothing changed");
        let ips: HashSet<_> = a.iter().map(|n| v.get(n).unwrap()).collect();
        assert_eq!(ips.len(), 3);
        for ip in &ips {
            let o = ip.octets();
            assert_eq!((o[0], o[1]), (240, 240));
            assert!(o[3] != 0 && o[3] != 255);
        }
        // Adding services never moves the old ones.
        let before = v.get(&a[0]);
        v.assign(&names(&["default/new1", "default/new2"]));
        assert_eq!(v.get(&a[0]), before);
    }

    #[test]
    fn the_table_round_trips_through_json() {
        let mut v = Vips::default();
        v.assign(&names(&["default/catalog", "x/y"]));
        assert_eq!(Vips::from_json(&v.to_json()), v);
        assert_eq!(Vips::from_json(b"garbage"), Vips::default());
    }

    #[test]
    fn collisions_probe_to_the_next_free_address() {
        let mut v = Vips::default();
        let n = names(&["default/a"]);
        v.assign(&n);
        let taken = v.get(&n[0]).unwrap();
        // Pretend another service already holds a's first choice.
        let mut w = Vips::default();
        w.by_service
            .insert(ServiceName::parse("z/z").unwrap(), taken);
        w.assign(&n);
        assert_ne!(w.get(&n[0]), Some(taken));
    }

    #[tokio::test]
    async fn vips_survive_a_store_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let n = names(&["default/catalog"]);
        let first = {
            let store = crate::store::RedbStore::open(&path).await.unwrap();
            assert_eq!(Vips::load(&store).await.unwrap(), Vips::default());
            let v = Vips::allocate(&store, &n).await.unwrap();
            store.close().await.unwrap();
            v.get(&n[0])
        };
        let store = crate::store::RedbStore::open(&path).await.unwrap();
        let v = Vips::load(&store).await.unwrap();
        assert_eq!(v.get(&n[0]), first);
    }

    #[tokio::test]
    async fn concurrent_allocations_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(
            crate::store::RedbStore::open(dir.path().join("s.redb"))
                .await
                .unwrap(),
        );
        // Many writers, each with its own services, all at once.
        let mut tasks = Vec::new();
        for w in 0..8 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let n: Vec<ServiceName> = (0..5)
                    .map(|i| ServiceName::new("default", format!("w{w}-s{i}")))
                    .collect();
                Vips::allocate(&*store, &n).await.unwrap()
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let v = Vips::load(&*store).await.unwrap();
        let ips: HashSet<_> = v.by_service.values().collect();
        assert_eq!(v.by_service.len(), 40);
        assert_eq!(ips.len(), 40);
    }
}
