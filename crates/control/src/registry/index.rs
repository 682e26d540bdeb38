//! The stored resources, indexed for building configs: Services by name,
//! routes by the Service they are attached to, TrafficPolicies by target,
//! and the Mesh. The index follows the store change by change (`put`,
//! `delete`), and says which Services' part of a Config each change
//! touches, so a route change costs the proxies that hold that Service, not
//! a rebuild of the index and a look at every proxy.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_resource::{Kind, MeshSpec, Resource, ResourceKey, Spec};

use super::ServiceName;

/// The stored resources, indexed for building configs. Resources are
/// shared (`Arc`) between the index and its copies (an apply's budget
/// check works on a copy).
#[derive(Clone, Debug, Default)]
pub struct ResourceIndex {
    pub mesh: Option<MeshSpec>,
    pub services: BTreeMap<ServiceName, Arc<Resource>>,
    /// Routes by the Service their parentRefs name, sorted by key.
    pub routes_by_parent: BTreeMap<ServiceName, Vec<Arc<Resource>>>,
    /// GRPCRoutes by the Service their parentRefs name, sorted by key.
    pub grpc_routes_by_parent: BTreeMap<ServiceName, Vec<Arc<Resource>>>,
    /// The TrafficPolicy of each Service that has one (apply refuses a
    /// second; should the store hold two, the first by name wins).
    pub policy_by_target: BTreeMap<ServiceName, Arc<Resource>>,
    /// Every AuthorizationPolicy, sorted by key.
    pub authorization_policies: Vec<Arc<Resource>>,
    /// Every resource, by key: what `put` and `delete` find the old
    /// version of a resource in.
    all: BTreeMap<ResourceKey, Arc<Resource>>,
    /// Every TrafficPolicy by the Service it targets, by key (the first
    /// is the one in force).
    policies: BTreeMap<ServiceName, BTreeSet<ResourceKey>>,
    /// Every resource in key order, as last handed out by `shared`; `None`
    /// once one changed since.
    shared: Option<Arc<Vec<Arc<Resource>>>>,
    /// Each resource of `all` as the JSON a Config carries, by the address
    /// of its `Arc`, made once when it is put: a Config then copies a
    /// string where it serialized the resource, once per proxy. Each entry
    /// holds its `Arc`, so no other resource can have its address while
    /// it is here; it leaves with the resource.
    json: BTreeMap<usize, (Arc<Resource>, Arc<str>)>,
    /// The Mesh's spec as JSON, when there is one.
    mesh_json: Option<Arc<str>>,
}

/// A resource as the JSON a Config carries.
fn to_json(r: &Resource) -> String {
    // Serialising a typed resource to JSON cannot fail (string keys only).
    serde_json::to_string(r).unwrap_or_default()
}

fn address(r: &Resource) -> usize {
    r as *const Resource as usize
}

impl ResourceIndex {
    pub fn new(resources: &[Resource]) -> Self {
        let mut idx = ResourceIndex::default();
        for r in resources {
            idx.put(r.clone());
        }
        idx
    }

    /// Every resource in key order, shared until one changes: what an
    /// apply validates against (`XdsHandle::resources_at`).
    pub fn shared(&mut self) -> Arc<Vec<Arc<Resource>>> {
        self.shared
            .get_or_insert_with(|| Arc::new(self.all.values().cloned().collect()))
            .clone()
    }

    /// How many resources the index holds.
    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    /// Creates or replaces a resource. Which Services' part of a Config
    /// that changes, as `changed_services` says it (`None`: every proxy's).
    pub fn put(&mut self, r: Resource) -> Option<BTreeSet<ServiceName>> {
        self.put_shared(Arc::new(r))
    }

    /// `put`, of a shared resource.
    pub fn put_shared(&mut self, new: Arc<Resource>) -> Option<BTreeSet<ServiceName>> {
        let key = new.key();
        if let Some(old) = self.all.get(&key) {
            if **old == *new {
                // The same resource: the index keeps the copy it holds.
                return Some(BTreeSet::new());
            }
        }
        let old = self.all.insert(key.clone(), new.clone());
        self.shared = None;
        if let Some(old) = &old {
            self.json.remove(&address(old));
        }
        self.json
            .insert(address(&new), (new.clone(), to_json(&new).into()));
        self.reindex(&key, old.as_deref(), Some(&new))
    }

    /// The resource stored under `key`.
    pub fn get(&self, key: &ResourceKey) -> Option<Arc<Resource>> {
        self.all.get(key).cloned()
    }

    /// Removes a resource, if the index holds it; what that changes, as for
    /// `put`.
    pub fn delete(&mut self, key: &ResourceKey) -> Option<BTreeSet<ServiceName>> {
        match self.all.remove(key) {
            Some(old) => {
                self.shared = None;
                self.json.remove(&address(&old));
                self.reindex(key, Some(&old), None)
            }
            None => Some(BTreeSet::new()),
        }
    }

    /// Moves `key` in the index from `old` to `new` (either may be absent).
    fn reindex(
        &mut self,
        key: &ResourceKey,
        old: Option<&Resource>,
        new: Option<&Arc<Resource>>,
    ) -> Option<BTreeSet<ServiceName>> {
        let mut changed = BTreeSet::new();
        match key.kind {
            Kind::Mesh => {
                if key.name != "default" {
                    return Some(changed);
                }
                let mesh = new.and_then(|r| match &r.spec {
                    Spec::Mesh(m) => Some(m.clone()),
                    _ => None,
                });
                if mesh == self.mesh {
                    return Some(changed);
                }
                self.mesh_json = mesh.as_ref().map(|m| {
                    serde_json::to_string(m)
                        .unwrap_or_else(|_| "{}".into())
                        .into()
                });
                self.mesh = mesh;
                return None;
            }
            Kind::Service => {
                let name = ServiceName::new(&key.namespace, &key.name);
                match new {
                    Some(r) => self.services.insert(name, r.clone()),
                    None => self.services.remove(&name),
                };
                return None;
            }
            Kind::AuthorizationPolicy => {
                let list = &mut self.authorization_policies;
                list.retain(|r| !is(r, key));
                if let Some(r) = new {
                    let at = list.partition_point(|x| x.key() < *key);
                    list.insert(at, r.clone());
                }
                return None;
            }
            Kind::HttpRoute | Kind::GrpcRoute => {
                let by_parent = if key.kind == Kind::HttpRoute {
                    &mut self.routes_by_parent
                } else {
                    &mut self.grpc_routes_by_parent
                };
                if let Some(old) = old {
                    for (ns, name) in old.parent_services() {
                        let parent = ServiceName::new(ns, name);
                        if let Some(routes) = by_parent.get_mut(&parent) {
                            routes.retain(|r| !is(r, key));
                            if routes.is_empty() {
                                by_parent.remove(&parent);
                            }
                        }
                        changed.insert(parent);
                    }
                }
                if let Some(new) = new {
                    for (ns, name) in new.parent_services() {
                        let parent = ServiceName::new(ns, name);
                        let routes = by_parent.entry(parent.clone()).or_default();
                        let at = routes.partition_point(|x| x.key() < *key);
                        routes.insert(at, new.clone());
                        changed.insert(parent);
                    }
                }
            }
            Kind::TrafficPolicy => {
                let target = |r: &Resource| match &r.spec {
                    Spec::TrafficPolicy(tp) => {
                        Some(ServiceName::new(&r.metadata.namespace, &tp.target_ref.name))
                    }
                    _ => None,
                };
                if let Some(t) = old.and_then(target) {
                    if let Some(keys) = self.policies.get_mut(&t) {
                        keys.remove(key);
                        if keys.is_empty() {
                            self.policies.remove(&t);
                        }
                    }
                    changed.insert(t);
                }
                if let Some(t) = new.and_then(|r| target(r)) {
                    self.policies
                        .entry(t.clone())
                        .or_default()
                        .insert(key.clone());
                    changed.insert(t);
                }
                for t in &changed {
                    let first = self
                        .policies
                        .get(t)
                        .and_then(|keys| keys.first())
                        .and_then(|k| self.all.get(k));
                    match first {
                        Some(r) => self.policy_by_target.insert(t.clone(), r.clone()),
                        None => self.policy_by_target.remove(t),
                    };
                }
            }
            Kind::Workload => {}
        }
        Some(changed)
    }

    /// The Services whose part of a Config differs between `self` and
    /// `next`, when only routes and TrafficPolicies changed; `None` when
    /// anything that can touch any proxy changed (the Mesh, a Service, which
    /// moves selections, VIPs and `missing` lists, or an
    /// AuthorizationPolicy): then every Config is recomputed.
    ///
    /// A route's or a policy's change reaches exactly the proxies whose
    /// Config holds the Service it is filed under (their `depends_on`), so
    /// a change one Service's subscribers see costs those proxies, not the
    /// mesh.
    pub fn changed_services(&self, next: &ResourceIndex) -> Option<BTreeSet<ServiceName>> {
        // Every field named: one added to the index is a compile error here
        // until someone says what its changes reach.
        let ResourceIndex {
            mesh,
            services,
            routes_by_parent,
            grpc_routes_by_parent,
            policy_by_target,
            authorization_policies,
            // What the fields above are made of.
            all: _,
            policies: _,
            shared: _,
            json: _,
            mesh_json: _,
        } = self;
        if *mesh != next.mesh
            || *services != next.services
            || *authorization_policies != next.authorization_policies
        {
            return None;
        }
        let mut changed = BTreeSet::new();
        differing_keys(routes_by_parent, &next.routes_by_parent, &mut changed);
        differing_keys(
            grpc_routes_by_parent,
            &next.grpc_routes_by_parent,
            &mut changed,
        );
        differing_keys(policy_by_target, &next.policy_by_target, &mut changed);
        Some(changed)
    }

    pub fn trust_domain(&self) -> &str {
        self.mesh
            .as_ref()
            .map(|m| m.trust_domain.as_str())
            .filter(|t| !t.is_empty())
            .unwrap_or("trellis.local")
    }

    /// `Mesh.certificateTTL` (validated at apply; 24h if unset).
    pub fn certificate_ttl(&self) -> std::time::Duration {
        self.mesh
            .as_ref()
            .and_then(|m| trellis_resource::parse_duration(&m.certificate_ttl).ok())
            .unwrap_or(std::time::Duration::from_secs(24 * 3600))
    }

    /// The Mesh's spec as JSON, `{}` when there is none.
    pub(super) fn mesh_json(&self) -> String {
        self.mesh_json.as_deref().unwrap_or("{}").to_string()
    }

    /// How many resources' JSON the index keeps (every one it holds).
    #[cfg(test)]
    pub fn json_kept(&self) -> usize {
        self.json.len()
    }

    /// A resource of the index as the JSON a Config carries (made when it
    /// was put; made now for one the index does not hold).
    pub fn json(&self, r: &Resource) -> String {
        match self.json.get(&address(r)) {
            Some((_, json)) => json.to_string(),
            None => to_json(r),
        }
    }
}

/// Adds the keys whose values differ between `a` and `b` (present in one
/// only, or unequal).
fn differing_keys<V: PartialEq>(
    a: &BTreeMap<ServiceName, V>,
    b: &BTreeMap<ServiceName, V>,
    out: &mut BTreeSet<ServiceName>,
) {
    for (k, v) in a {
        if b.get(k) != Some(v) {
            out.insert(k.clone());
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            out.insert(k.clone());
        }
    }
}

/// Whether `r` is the resource `key` names.
fn is(r: &Resource, key: &ResourceKey) -> bool {
    r.metadata.name == key.name && r.key() == *key
}
