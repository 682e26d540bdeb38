//! The stored resources, indexed for building configs: Services by name,
//! routes by the Service they are attached to, TrafficPolicies by target,
//! and the Mesh.

use std::collections::BTreeMap;

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

/// Files a route under each Service its parentRefs name.
fn attach(by_parent: &mut BTreeMap<ServiceName, Vec<Resource>>, route: &Resource) {
    for (ns, name) in route.parent_services() {
        by_parent
            .entry(ServiceName::new(ns, name))
            .or_default()
            .push(route.clone());
    }
}
