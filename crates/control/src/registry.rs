//! Who is connected, and what each proxy should be told.
//!
//! The registry holds the connected proxies (each one an endpoint instance
//! of the services that select it) and an index of the stored resources;
//! `Registry::config_for` turns both into the `Config` of one proxy. It is
//! plain data, owned by the xds actor, so nothing here locks.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::{Hash, Hasher};
use std::time::{Instant, SystemTime};

use serde::Serialize;
use trellis_api::v1::{Config, Endpoint, Register, ServiceConfig};
use trellis_resource::{MeshSpec, Resource, DEFAULT_NAMESPACE};

/// Identifies one stream; an instance that reconnects gets a new one.
pub type ConnId = u64;

/// A service's `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`; a bare `name` is in the default namespace.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (DEFAULT_NAMESPACE, s),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(ServiceName::new(ns, name))
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// One connected proxy.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub conn: ConnId,
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub inbound_addr: String,
    pub admin_addr: String,
    pub app_port: u32,
    pub connected_at: Instant,
    pub connected_since: SystemTime,
    /// What the proxy follows, as sent by it (`namespace/name`).
    pub subscriptions: BTreeSet<String>,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_error: Option<String>,
    /// Hash of the content of the last Config sent (version excluded).
    pub sent_hash: Option<u64>,
    /// Services whose endpoints the last Config holds: a proxy joining or
    /// leaving one of them changes this proxy's Config.
    pub depends_on: BTreeSet<ServiceName>,
}

impl Proxy {
    pub fn from_register(conn: ConnId, reg: &Register) -> Self {
        let labels: BTreeMap<String, String> = reg
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let namespace = if reg.namespace.is_empty() {
            DEFAULT_NAMESPACE.to_string()
        } else {
            reg.namespace.clone()
        };
        // Same default as a Workload's serviceAccount: the app label, else
        // the workload's name.
        let service_account = if !reg.service_account.is_empty() {
            reg.service_account.clone()
        } else if let Some(app) = labels.get("app") {
            app.clone()
        } else {
            reg.workload.clone()
        };
        Proxy {
            conn,
            instance: reg.instance.clone(),
            workload: reg.workload.clone(),
            namespace,
            labels,
            service_account,
            inbound_addr: reg.inbound_addr.clone(),
            admin_addr: reg.admin_addr.clone(),
            app_port: reg.app_port,
            connected_at: Instant::now(),
            connected_since: SystemTime::now(),
            subscriptions: reg.subscriptions.iter().cloned().collect(),
            sent_version: 0,
            acked_version: reg.running_version,
            last_error: None,
            sent_hash: None,
            depends_on: BTreeSet::new(),
        }
    }

    pub fn identity(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether this proxy is an endpoint of a service with this selector.
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        selects(
            selector,
            namespace,
            &self.namespace,
            &self.labels,
            &self.inbound_addr,
        )
    }

    pub fn view(&self, trust_domain: &str) -> ProxyView {
        ProxyView {
            instance: self.instance.clone(),
            workload: self.workload.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            service_account: self.service_account.clone(),
            identity: self.identity(trust_domain),
            inbound_addr: self.inbound_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            connected_at: self.connected_at,
            sent_version: self.sent_version,
            acked_version: self.acked_version,
            last_error: self.last_error.clone(),
            subscriptions: self.subscriptions.iter().cloned().collect(),
        }
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// A connected proxy as the HTTP API shows it (`GET /api/v1/proxies`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub identity: String,
    pub inbound_addr: String,
    pub admin_addr: String,
    #[serde(skip)]
    pub connected_at: Instant,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_error: Option<String>,
    pub subscriptions: Vec<String>,
}

impl ProxyView {
    /// Whether this proxy is an endpoint of a service with this selector.
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        selects(
            selector,
            namespace,
            &self.namespace,
            &self.labels,
            &self.inbound_addr,
        )
    }
}

/// Whether a proxy is an endpoint of the service `service_ns`/`selector`:
/// same namespace, every selector label matches, and it has an inbound
/// address that peers can reach. An empty selector selects nothing, as for
/// Kubernetes Services without one: it would otherwise select every proxy.
fn selects(
    selector: &BTreeMap<String, String>,
    service_ns: &str,
    proxy_ns: &str,
    labels: &BTreeMap<String, String>,
    inbound_addr: &str,
) -> bool {
    !selector.is_empty()
        && !inbound_addr.is_empty()
        && proxy_ns == service_ns
        && selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

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
            if let Some(mesh) = r.as_mesh() {
                if r.metadata.name == "default" {
                    idx.mesh = Some(mesh.clone());
                }
            } else if r.as_service().is_some() {
                idx.services.insert(
                    ServiceName::new(&r.metadata.namespace, &r.metadata.name),
                    r.clone(),
                );
            } else if let Some(route) = r.as_route() {
                for parent in parent_services(r, &route.parent_refs) {
                    idx.routes_by_parent
                        .entry(parent)
                        .or_default()
                        .push(r.clone());
                }
            } else if let Some(route) = r.as_grpc_route() {
                for parent in parent_services(r, &route.parent_refs) {
                    idx.grpc_routes_by_parent
                        .entry(parent)
                        .or_default()
                        .push(r.clone());
                }
            } else if let Some(tp) = r.as_traffic_policy() {
                let target = ServiceName::new(&r.metadata.namespace, &tp.target_ref.name);
                let first = idx
                    .policy_by_target
                    .get(&target)
                    .is_none_or(|old| r.key() < old.key());
                if first {
                    idx.policy_by_target.insert(target, r.clone());
                }
            }
        }
        for routes in idx.routes_by_parent.values_mut() {
            routes.sort_by_key(|r| r.key());
        }
        for routes in idx.grpc_routes_by_parent.values_mut() {
            routes.sort_by_key(|r| r.key());
        }
        idx.authorization_policies = resources
            .iter()
            .filter(|r| matches!(r.spec, trellis_resource::Spec::AuthorizationPolicy(_)))
            .cloned()
            .collect();
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

    fn mesh_json(&self) -> String {
        match &self.mesh {
            Some(m) => serde_json::to_string(m).unwrap_or_else(|_| "{}".into()),
            None => "{}".into(),
        }
    }
}

/// The Services a route's parentRefs name (a parentRef without a namespace
/// means the route's own).
fn parent_services(
    route: &Resource,
    refs: &[trellis_resource::ParentRef],
) -> BTreeSet<ServiceName> {
    refs.iter()
        .filter(|p| names_service(p.group.as_deref(), p.kind.as_deref()))
        .map(|p| {
            ServiceName::new(
                p.namespace.as_deref().unwrap_or(&route.metadata.namespace),
                &p.name,
            )
        })
        .collect()
}

/// Whether a parentRef/backendRef's group and kind name a Service; in mesh
/// (GAMMA) form they are omitted or the core group's `Service`.
fn names_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("") | Some("core")) && matches!(kind, None | Some("Service"))
}

/// Services a route (HTTPRoute or GRPCRoute) sends requests to: those of
/// its backendRefs and of its RequestMirror filters.
fn backends(route: &Resource) -> Vec<ServiceName> {
    let ns = &route.metadata.namespace;
    let mut out = Vec::new();
    let mut add = |group: Option<&str>, kind: Option<&str>, name: &str, namespace: Option<&str>| {
        if names_service(group, kind) {
            out.push(ServiceName::new(namespace.unwrap_or(ns), name));
        }
    };
    let http = route
        .as_route()
        .into_iter()
        .flat_map(|r| r.rules.iter().map(|x| (&x.filters, &x.backend_refs)));
    let grpc = route
        .as_grpc_route()
        .into_iter()
        .flat_map(|r| r.rules.iter().map(|x| (&x.filters, &x.backend_refs)));
    for (filters, refs) in http.chain(grpc) {
        for b in refs {
            add(
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
            );
        }
        let mirrors = filters
            .iter()
            .chain(refs.iter().flat_map(|b| &b.filters))
            .filter_map(|f| f.request_mirror.as_ref());
        for m in mirrors {
            let b = &m.backend_ref;
            add(
                b.group.as_deref(),
                b.kind.as_deref(),
                &b.name,
                b.namespace.as_deref(),
            );
        }
    }
    out
}

/// Connected proxies and stored resources: everything configs are made of.
#[derive(Debug, Default)]
pub struct Registry {
    pub proxies: BTreeMap<ConnId, Proxy>,
    pub resources: ResourceIndex,
    /// The roots every proxy must trust, current first.
    pub trust_bundle: Vec<String>,
    /// Each Service's stable virtual IP (pods mode).
    pub vips: crate::vips::Vips,
}

/// Endpoints per service, computed once per round of config updates.
pub type EndpointCache = HashMap<ServiceName, Vec<Endpoint>>;

/// The Services selecting each (namespace, labels) met in one round of
/// config updates.
#[derive(Debug, Default)]
pub struct SelectionMemo(HashMap<String, HashMap<BTreeMap<String, String>, BTreeSet<ServiceName>>>);

fn endpoint_of(p: &Proxy, trust_domain: &str) -> Endpoint {
    Endpoint {
        address: p.inbound_addr.clone(),
        instance: p.instance.clone(),
        workload: p.workload.clone(),
        namespace: p.namespace.clone(),
        labels: p
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        identity: p.identity(trust_domain),
    }
}

/// Stable order, so that equal content hashes equal.
fn sort_endpoints(eps: &mut [Endpoint]) {
    eps.sort_by(|a, b| (&a.address, &a.instance).cmp(&(&b.address, &b.instance)));
}

impl Registry {
    pub fn trust_domain(&self) -> &str {
        self.resources.trust_domain()
    }

    /// What a proxy needs about itself: the Services that select it, the
    /// AuthorizationPolicies that apply to it (namespace-wide ones of its
    /// namespace, and those whose targetRef is a Service selecting it), and
    /// the trust bundle.
    pub fn add_own_config(&self, proxy: &Proxy, config: &mut Config) {
        self.add_own_config_for(proxy, self.services_selecting(proxy), config);
    }

    /// `add_own_config`, with the Services that select the proxy (`own`)
    /// already known.
    pub fn add_own_config_for(
        &self,
        proxy: &Proxy,
        own: BTreeSet<ServiceName>,
        config: &mut Config,
    ) {
        config.own_services = own.iter().map(|n| n.to_string()).collect();
        config.authorization_policies_json = self
            .resources
            .authorization_policies
            .iter()
            .filter(|r| r.metadata.namespace == proxy.namespace)
            .filter(|r| match &r.spec {
                trellis_resource::Spec::AuthorizationPolicy(ap) => match &ap.target_ref {
                    None => true,
                    Some(t) => own.contains(&ServiceName::new(&r.metadata.namespace, &t.name)),
                },
                _ => false,
            })
            .map(to_json)
            .collect();
        config.trust_bundle_pem = self.trust_bundle.clone();
    }

    /// The services (existing or not) that select a proxy with these
    /// namespace and labels: their endpoints change when it comes or goes.
    pub fn services_selecting(&self, proxy: &Proxy) -> BTreeSet<ServiceName> {
        self.resources
            .services
            .iter()
            .filter(|(_, r)| {
                r.as_service()
                    .is_some_and(|s| proxy.selected_by(&r.metadata.namespace, &s.selector))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `services_selecting`, memoised by the proxy's namespace and labels:
    /// proxies of one workload share them, so a round over every proxy
    /// compares each distinct label set with each selector once.
    pub fn services_selecting_memo(
        &self,
        proxy: &Proxy,
        memo: &mut SelectionMemo,
    ) -> BTreeSet<ServiceName> {
        if proxy.inbound_addr.is_empty() {
            // Nothing selects a proxy that peers cannot reach.
            return BTreeSet::new();
        }
        if let Some(own) = memo
            .0
            .get(&proxy.namespace)
            .and_then(|by_labels| by_labels.get(&proxy.labels))
        {
            return own.clone();
        }
        let own = self.services_selecting(proxy);
        memo.0
            .entry(proxy.namespace.clone())
            .or_default()
            .insert(proxy.labels.clone(), own.clone());
        own
    }

    /// Every Service's endpoints, in one pass over the proxies (rather than
    /// one pass per Service): what a round that recomputes every proxy's
    /// Config starts from.
    pub fn all_endpoints(&self, memo: &mut SelectionMemo) -> EndpointCache {
        let td = self.trust_domain().to_string();
        let mut cache: EndpointCache = self
            .resources
            .services
            .keys()
            .map(|n| (n.clone(), Vec::new()))
            .collect();
        for p in self.proxies.values() {
            for name in self.services_selecting_memo(p, memo) {
                if let Some(eps) = cache.get_mut(&name) {
                    eps.push(endpoint_of(p, &td));
                }
            }
        }
        for eps in cache.values_mut() {
            sort_endpoints(eps);
        }
        cache
    }

    pub fn endpoints(&self, name: &ServiceName, cache: &mut EndpointCache) -> Vec<Endpoint> {
        if let Some(eps) = cache.get(name) {
            return eps.clone();
        }
        let td = self.trust_domain().to_string();
        let mut eps: Vec<Endpoint> = match self.resources.services.get(name) {
            Some(r) => {
                let selector = r.as_service().map(|s| &s.selector);
                self.proxies
                    .values()
                    .filter(|p| selector.is_some_and(|sel| p.selected_by(&name.namespace, sel)))
                    .map(|p| endpoint_of(p, &td))
                    .collect()
            }
            None => Vec::new(),
        };
        sort_endpoints(&mut eps);
        cache.insert(name.clone(), eps.clone());
        eps
    }

    /// The TrafficPolicy targeting a service as JSON, "" for none.
    fn traffic_policy_json(&self, name: &ServiceName) -> String {
        self.resources
            .policy_by_target
            .get(name)
            .map(to_json)
            .unwrap_or_default()
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
            let routes = self
                .resources
                .routes_by_parent
                .get(&name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let grpc_routes = self
                .resources
                .grpc_routes_by_parent
                .get(&name)
                .map(Vec::as_slice)
                .unwrap_or_default();
            for route in routes.iter().chain(grpc_routes) {
                backend_names.extend(backends(route));
            }
            let sc = ServiceConfig {
                namespace: name.namespace.clone(),
                name: name.name.clone(),
                service_json: to_json(svc),
                routes_json: routes.iter().map(to_json).collect(),
                endpoints: self.endpoints(&name, cache),
                vip: self
                    .vips
                    .get(&name)
                    .map(|v| v.to_string())
                    .unwrap_or_default(),
                traffic_policy_json: self.traffic_policy_json(&name),
                grpc_routes_json: grpc_routes.iter().map(to_json).collect(),
            };
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
                let sc = ServiceConfig {
                    namespace: name.namespace.clone(),
                    name: name.name.clone(),
                    service_json: to_json(svc),
                    routes_json: Vec::new(),
                    endpoints: self.endpoints(&name, cache),
                    vip: self
                        .vips
                        .get(&name)
                        .map(|v| v.to_string())
                        .unwrap_or_default(),
                    // Endpoint-level settings (balancer, pool, outlier
                    // detection, health checks) follow the backend.
                    traffic_policy_json: self.traffic_policy_json(&name),
                    ..Default::default()
                };
                services.insert(name, sc);
            }
        }
        let deps = services.keys().cloned().collect();
        let config = Config {
            version: 0,
            mesh_json: self.resources.mesh_json(),
            services: services.into_values().collect(),
            missing,
            ..Default::default()
        };
        (config, deps)
    }
}

fn to_json(r: &Resource) -> String {
    // Serialising a typed resource to JSON cannot fail (string keys only).
    serde_json::to_string(r).unwrap_or_default()
}

/// A hash of a Config's content, version excluded. Labels are hashed in
/// sorted order because prost maps are HashMaps.
pub fn content_hash(config: &Config) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    config.mesh_json.hash(&mut h);
    config.missing.hash(&mut h);
    config.authorization_policies_json.hash(&mut h);
    config.trust_bundle_pem.hash(&mut h);
    config.own_services.hash(&mut h);
    config.services.len().hash(&mut h);
    for s in &config.services {
        s.namespace.hash(&mut h);
        s.name.hash(&mut h);
        s.service_json.hash(&mut h);
        s.routes_json.hash(&mut h);
        s.vip.hash(&mut h);
        s.traffic_policy_json.hash(&mut h);
        s.grpc_routes_json.hash(&mut h);
        s.endpoints.len().hash(&mut h);
        for e in &s.endpoints {
            e.address.hash(&mut h);
            e.instance.hash(&mut h);
            e.workload.hash(&mut h);
            e.namespace.hash(&mut h);
            e.identity.hash(&mut h);
            let labels: BTreeMap<_, _> = e.labels.iter().collect();
            labels.hash(&mut h);
        }
    }
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resource::{
        BackendRef, HttpRouteSpec, Metadata, ParentRef, RouteRule, ServiceSpec, Spec,
    };

    fn meta(ns: &str, name: &str) -> Metadata {
        Metadata {
            name: name.into(),
            namespace: ns.into(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }

    fn service(ns: &str, name: &str, sel: &[(&str, &str)]) -> Resource {
        Resource {
            metadata: meta(ns, name),
            spec: Spec::Service(ServiceSpec {
                selector: sel
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ports: vec![],
            }),
        }
    }

    fn backend(name: &str, ns: Option<&str>, weight: u32) -> BackendRef {
        BackendRef {
            group: None,
            kind: None,
            name: name.into(),
            namespace: ns.map(Into::into),
            port: None,
            weight,
            filters: vec![],
        }
    }

    fn route(
        ns: &str,
        name: &str,
        parent: &str,
        parent_ns: Option<&str>,
        bs: Vec<BackendRef>,
    ) -> Resource {
        Resource {
            metadata: meta(ns, name),
            spec: Spec::HttpRoute(HttpRouteSpec {
                parent_refs: vec![ParentRef {
                    group: None,
                    kind: Some("Service".into()),
                    name: parent.into(),
                    namespace: parent_ns.map(Into::into),
                    port: None,
                    section_name: None,
                }],
                hostnames: vec![],
                rules: vec![RouteRule {
                    backend_refs: bs,
                    ..Default::default()
                }],
            }),
        }
    }

    fn proxy(conn: ConnId, ns: &str, labels: &[(&str, &str)], addr: &str) -> Proxy {
        Proxy::from_register(
            conn,
            &Register {
                instance: format!("i{conn}"),
                workload: "w".into(),
                namespace: ns.into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                inbound_addr: addr.into(),
                ..Default::default()
            },
        )
    }

    fn subs(s: &[&str]) -> BTreeSet<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn selection_needs_every_label_and_the_namespace() {
        let p = proxy(1, "default", &[("app", "a"), ("version", "v1")], "x");
        let sel = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(p.selected_by("default", &sel(&[("app", "a")])));
        assert!(p.selected_by("default", &sel(&[("app", "a"), ("version", "v1")])));
        assert!(!p.selected_by("default", &sel(&[("app", "a"), ("version", "v2")])));
        assert!(!p.selected_by("other", &sel(&[("app", "a")])));
        assert!(!p.selected_by("default", &sel(&[])));
    }

    #[test]
    fn config_has_routes_backends_endpoints_and_missing() {
        let resources = vec![
            service("default", "catalog", &[("app", "catalog")]),
            service(
                "default",
                "catalog-v1",
                &[("app", "catalog"), ("version", "v1")],
            ),
            service(
                "shop",
                "catalog-v2",
                &[("app", "catalog"), ("version", "v2")],
            ),
            route(
                "default",
                "split",
                "catalog",
                None,
                vec![
                    backend("catalog-v1", None, 90),
                    backend("catalog-v2", Some("shop"), 10),
                ],
            ),
            // A route in another namespace naming the service explicitly.
            route("shop", "other", "catalog", Some("default"), vec![]),
        ];
        let mut reg = Registry {
            resources: ResourceIndex::new(&resources),
            ..Default::default()
        };
        reg.proxies.insert(
            1,
            proxy(
                1,
                "default",
                &[("app", "catalog"), ("version", "v1")],
                "10.0.0.1:15006",
            ),
        );
        reg.proxies.insert(
            2,
            proxy(
                2,
                "shop",
                &[("app", "catalog"), ("version", "v2")],
                "10.0.0.2:15006",
            ),
        );
        let mut cache = EndpointCache::new();
        let (cfg, deps) = reg.config_for(&subs(&["default/catalog", "default/nope"]), &mut cache);
        assert_eq!(cfg.mesh_json, "{}");
        assert_eq!(cfg.missing, vec!["default/nope".to_string()]);
        let names: Vec<String> = cfg
            .services
            .iter()
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        assert_eq!(
            names,
            ["default/catalog", "default/catalog-v1", "shop/catalog-v2"]
        );
        assert_eq!(cfg.services[0].routes_json.len(), 2);
        assert_eq!(cfg.services[0].endpoints.len(), 1);
        assert_eq!(cfg.services[1].endpoints[0].address, "10.0.0.1:15006");
        assert_eq!(
            cfg.services[1].endpoints[0].identity,
            "spiffe://trellis.local/ns/default/sa/catalog"
        );
        assert!(cfg.services[1].routes_json.is_empty());
        assert_eq!(cfg.services[2].endpoints[0].address, "10.0.0.2:15006");
        assert_eq!(deps.len(), 3);

        // Same inputs, same hash; an endpoint leaving changes it.
        let h1 = content_hash(&cfg);
        let (again, _) = reg.config_for(
            &subs(&["default/catalog", "default/nope"]),
            &mut EndpointCache::new(),
        );
        assert_eq!(h1, content_hash(&again));
        reg.proxies.remove(&1);
        let (after, _) = reg.config_for(
            &subs(&["default/catalog", "default/nope"]),
            &mut EndpointCache::new(),
        );
        assert_ne!(h1, content_hash(&after));
        assert!(after.services[1].endpoints.is_empty());
    }

    #[test]
    fn one_pass_endpoints_and_memoised_selection_match_the_direct_ones() {
        let resources = vec![
            service("default", "catalog", &[("app", "catalog")]),
            service(
                "default",
                "catalog-v1",
                &[("app", "catalog"), ("version", "v1")],
            ),
            service("shop", "catalog", &[("app", "catalog")]),
            service("default", "none", &[]),
        ];
        let mut reg = Registry {
            resources: ResourceIndex::new(&resources),
            ..Default::default()
        };
        let procs = [
            proxy(
                1,
                "default",
                &[("app", "catalog"), ("version", "v1")],
                "b:1",
            ),
            proxy(
                2,
                "default",
                &[("app", "catalog"), ("version", "v1")],
                "a:1",
            ),
            proxy(
                3,
                "default",
                &[("app", "catalog"), ("version", "v2")],
                "c:1",
            ),
            proxy(4, "shop", &[("app", "catalog")], "d:1"),
            // Unreachable: selected by nothing.
            proxy(5, "default", &[("app", "catalog")], ""),
        ];
        for p in procs {
            reg.proxies.insert(p.conn, p);
        }
        let mut memo = SelectionMemo::default();
        let all = reg.all_endpoints(&mut memo);
        assert_eq!(all.len(), 4);
        for name in reg.resources.services.keys() {
            let direct = reg.endpoints(name, &mut EndpointCache::new());
            assert_eq!(all[name], direct, "{name}");
        }
        assert_eq!(all[&ServiceName::new("default", "catalog")].len(), 3);
        assert_eq!(
            all[&ServiceName::new("default", "catalog-v1")][0].address,
            "a:1"
        );
        for p in reg.proxies.values() {
            // Twice: computed, then from the memo.
            for _ in 0..2 {
                assert_eq!(
                    reg.services_selecting_memo(p, &mut memo),
                    reg.services_selecting(p)
                );
            }
        }
    }

    #[test]
    fn service_names_parse() {
        assert_eq!(ServiceName::parse("a/b"), Some(ServiceName::new("a", "b")));
        assert_eq!(
            ServiceName::parse("b"),
            Some(ServiceName::new("default", "b"))
        );
        assert_eq!(ServiceName::parse("a/b/c"), None);
        assert_eq!(ServiceName::parse("/b"), None);
    }

    #[test]
    fn config_carries_traffic_policies_grpc_routes_and_mirror_backends() {
        let resources = trellis_resource::parse_documents(
            "t.yaml",
            r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec: {selector: {app: catalog}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: shadow}
spec: {selector: {app: shadow}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: greeter}
spec: {selector: {app: greeter}, ports: [{port: 80}]}
---
apiVersion: trellis.dev/v1alpha1
kind: TrafficPolicy
metadata: {name: shadow}
spec: {targetRef: {name: shadow}, loadBalancer: {type: round-robin}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror}
spec:
  parentRefs: [{name: catalog}]
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}
    backendRefs: [{name: catalog}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter}
spec:
  parentRefs: [{name: greeter}]
  rules: [{backendRefs: [{name: greeter}]}]
"#,
        )
        .unwrap();
        let reg = Registry {
            resources: ResourceIndex::new(&resources),
            ..Default::default()
        };
        let (cfg, _) = reg.config_for(
            &subs(&["default/catalog", "default/greeter"]),
            &mut EndpointCache::new(),
        );
        let by_name = |n: &str| cfg.services.iter().find(|s| s.name == n).unwrap();
        // The mirror's Service comes along, with its own policy.
        assert!(by_name("shadow")
            .traffic_policy_json
            .contains("round-robin"));
        assert_eq!(by_name("catalog").traffic_policy_json, "");
        assert_eq!(by_name("greeter").grpc_routes_json.len(), 1);
        assert!(by_name("greeter").routes_json.is_empty());
    }
}
