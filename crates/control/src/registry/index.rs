//! The stored resources, indexed for building configs: Services by name,
//! routes by the Service they are attached to, TrafficPolicies by target,
//! and the Mesh.

use std::collections::{BTreeMap, BTreeSet};

use trellis_resource::{MeshSpec, Resource, Spec};

use super::ServiceName;

/// The stored resources, indexed for building configs.
#[derive(Clone, Debug, Default)]
pub struct ResourceIndex {
    pub mesh: Option<MeshSpec>,
    pub services: BTreeMap<ServiceName, Resource>,
    /// Routes by the Service their parentRefs name, sorted by key.
    pub routes_by_parent: BTreeMap<ServiceName, Vec<Resource>>,
    /// GRPCRoutes by the Service their parentRefs name, sorted by key.
    pub grpc_routes_by_parent: BTreeMap<ServiceName, Vec<Resource>>,
    /// The TrafficPolicy of each Service that has one (apply refuses a
    /// second; should the store hold two, the first by name wins).
    pub policy_by_target: BTreeMap<ServiceName, Resource>,
    /// Every AuthorizationPolicy, sorted by key.
    pub authorization_policies: Vec<Resource>,
}

impl ResourceIndex {
    pub fn new(resources: &[Resource]) -> Self {
        let mut idx = ResourceIndex::default();
        for r in resources {
            match &r.spec {
                Spec::Mesh(mesh) if r.metadata.name == "default" => idx.mesh = Some(mesh.clone()),
                Spec::Service(_) => {
                    idx.services.insert(
                        ServiceName::new(&r.metadata.namespace, &r.metadata.name),
                        r.clone(),
                    );
                }
                Spec::HttpRoute(_) => attach(&mut idx.routes_by_parent, r),
                Spec::GrpcRoute(_) => attach(&mut idx.grpc_routes_by_parent, r),
                Spec::TrafficPolicy(tp) => {
                    let target = ServiceName::new(&r.metadata.namespace, &tp.target_ref.name);
                    let first = idx
                        .policy_by_target
                        .get(&target)
                        .is_none_or(|old| r.key() < old.key());
                    if first {
                        idx.policy_by_target.insert(target, r.clone());
                    }
                }
                Spec::AuthorizationPolicy(_) => idx.authorization_policies.push(r.clone()),
                Spec::Mesh(_) | Spec::Workload(_) => {}
            }
        }
        for routes in idx.routes_by_parent.values_mut() {
            routes.sort_by_key(|r| r.key());
        }
        for routes in idx.grpc_routes_by_parent.values_mut() {
            routes.sort_by_key(|r| r.key());
        }
        idx.authorization_policies.sort_by_key(|r| r.key());
        idx
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
        match &self.mesh {
            Some(m) => serde_json::to_string(m).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
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

/// Files a route under each Service its parentRefs name.
fn attach(by_parent: &mut BTreeMap<ServiceName, Vec<Resource>>, route: &Resource) {
    for (ns, name) in route.parent_services() {
        by_parent
            .entry(ServiceName::new(ns, name))
            .or_default()
            .push(route.clone());
    }
}
