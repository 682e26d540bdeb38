//! Config building: what one proxy is sent, from its subscriptions, the
//! resource index and the endpoints.
//!
//! Resources travel inside the protobuf Config as JSON (docs/architecture.md
//! says why). serde writes a struct's fields in declaration order and every
//! map of the resource model is a BTreeMap, so equal resources give equal
//! JSON, and equal Configs equal `Config::content_hash`es.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use trellis_api::v1::{Config, ServiceConfig};
use trellis_resource::{Resource, Spec};

use super::{EndpointCache, Proxy, Registry, ServiceName};

impl Registry {
    /// What a proxy needs about itself: the Services that select it (`own`),
    /// the AuthorizationPolicies that apply to it (namespace-wide ones of
    /// its namespace, and those whose targetRef is a Service selecting it),
    /// and the trust bundle.
    pub fn add_own_config(&self, proxy: &Proxy, own: BTreeSet<ServiceName>, config: &mut Config) {
        config.own_services = own.iter().map(|n| n.to_string()).collect();
        config.authorization_policies_json = self
            .resources
            .authorization_policies
            .iter()
            .filter(|r| r.metadata.namespace == proxy.namespace)
            .filter(|r| match &r.spec {
                Spec::AuthorizationPolicy(ap) => match &ap.target_ref {
                    None => true,
                    Some(t) => own.contains(&ServiceName::new(&r.metadata.namespace, &t.name)),
                },
                _ => false,
            })
            .map(|r| self.resources.json(r))
            .collect();
        config.trust_bundle_pem = self.trust_bundle.clone();
    }

    /// The Config of one proxy (version 0; the caller stamps it), and the
    /// services whose endpoints it holds.
    pub fn config_for(
        &self,
        subscriptions: &BTreeSet<String>,
        cache: &mut EndpointCache,
    ) -> (Config, BTreeSet<ServiceName>) {
        let mut services: BTreeMap<ServiceName, ServiceConfig> = BTreeMap::new();
        let mut missing = Vec::new();
        let mut backend_names = BTreeSet::new();
        for sub in subscriptions {
            let Some(name) = ServiceName::parse(sub) else {
                missing.push(sub.clone());
                continue;
            };
            let Some(svc) = self.resources.services.get(&name) else {
                missing.push(sub.clone());
                continue;
            };
            let sc = self.service_config(&name, svc, true, cache);
            for route in self.routes(&name) {
                backend_names.extend(
                    route
                        .backend_services()
                        .into_iter()
                        .map(|(ns, n)| ServiceName::new(ns, n)),
                );
            }
            services.insert(name, sc);
        }
        // Backends are sent with their endpoints but without their own
        // routes: mesh routing applies at the service the app called, and a
        // proxy that calls a backend directly subscribes to it.
        for name in backend_names {
            if services.contains_key(&name) {
                continue;
            }
            if let Some(svc) = self.resources.services.get(&name) {
                let sc = self.service_config(&name, svc, false, cache);
                services.insert(name, sc);
            }
        }
        let deps = services.keys().cloned().collect();
        // Every field named, so one added to Config is a compile error here
        // rather than a field that silently stays empty.
        let config = Config {
            version: 0,
            mesh_json: self.resources.mesh_json(),
            services: services.into_values().collect(),
            missing,
            // What the proxy needs about itself: `add_own_config`.
            authorization_policies_json: Vec::new(),
            trust_bundle_pem: Vec::new(),
            own_services: Vec::new(),
        };
        (config, deps)
    }

    /// The HTTPRoutes, then the GRPCRoutes, attached to a Service.
    fn routes<'a>(&'a self, name: &ServiceName) -> impl Iterator<Item = &'a Resource> {
        let of = |by_parent: &'a BTreeMap<ServiceName, Vec<Arc<Resource>>>| {
            by_parent.get(name).map(Vec::as_slice).unwrap_or_default()
        };
        of(&self.resources.routes_by_parent)
            .iter()
            .chain(of(&self.resources.grpc_routes_by_parent))
            .map(|r| &**r)
    }

    /// One Service's part of a Config. Its TrafficPolicy always comes along:
    /// endpoint-level settings (balancer, pool, outlier detection, health
    /// checks) follow the Service that serves, even when it is only a
    /// backend. `with_routes` is for the Services the proxy subscribed to.
    fn service_config(
        &self,
        name: &ServiceName,
        svc: &Resource,
        with_routes: bool,
        cache: &mut EndpointCache,
    ) -> ServiceConfig {
        let routes_json = |by_parent: &BTreeMap<ServiceName, Vec<Arc<Resource>>>| -> Vec<String> {
            match by_parent.get(name) {
                Some(routes) if with_routes => {
                    routes.iter().map(|r| self.resources.json(r)).collect()
                }
                _ => Vec::new(),
            }
        };
        ServiceConfig {
            namespace: name.namespace.clone(),
            name: name.name.clone(),
            service_json: self.resources.json(svc),
            routes_json: routes_json(&self.resources.routes_by_parent),
            endpoints: self.endpoints(name, cache),
            vip: self
                .vips
                .get(name)
                .map(|v| v.to_string())
                .unwrap_or_default(),
            traffic_policy_json: self
                .resources
                .policy_by_target
                .get(name)
                .map(|r| self.resources.json(r))
                .unwrap_or_default(),
            grpc_routes_json: routes_json(&self.resources.grpc_routes_by_parent),
        }
    }
}
