//! The config a proxy runs: an immutable snapshot built from a control-plane
//! `Config`, swapped atomically and read without locks on the hot path.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use trellis_api::v1::Config;
use trellis_resource::{MeshSpec, Resource, ServiceSpec};

use crate::authz::AuthzError;
use crate::balance::Algorithm;
use crate::endpoint::Endpoint;
use crate::route::{RouteError, RouteTable};
use crate::traffic::policy::PolicyError;

/// A service's namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SvcKey {
    pub namespace: String,
    pub name: String,
}

impl SvcKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        SvcKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }
    }

    /// Parses the `namespace/name` form of the proxy API.
    pub fn parse(s: &str) -> Option<Self> {
        let (ns, name) = s.split_once('/')?;
        Some(SvcKey::new(ns, name))
    }
}

impl fmt::Display for SvcKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Why a config is rejected (whole: the running one keeps serving); the
/// control plane shows the message with the NACK.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("mesh: {0}")]
    Mesh(serde_json::Error),
    #[error("service {key}: {reason}")]
    Service {
        key: SvcKey,
        reason: serde_json::Error,
    },
    #[error("service {0}: not a Service resource")]
    NotAService(SvcKey),
    #[error("service {key}: route: {reason}")]
    Route { key: SvcKey, reason: RouteError },
    #[error("service {key}: endpoint address {address:?} is not IP:PORT")]
    EndpointAddress { key: SvcKey, address: String },
    #[error("service {key}: {reason}")]
    Policy { key: SvcKey, reason: PolicyError },
    #[error(transparent)]
    Authz(#[from] AuthzError),
}

/// Service annotation that chooses the load balancer.
pub const LB_ANNOTATION: &str = "trellis.dev/load-balancer";

pub struct ServiceState {
    pub key: SvcKey,
    pub spec: ServiceSpec,
    pub routes: RouteTable,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub algorithm: Algorithm,
    pub rr: AtomicUsize,
    /// The Service's TrafficPolicy, compiled (the defaults without one).
    pub policy: crate::traffic::Policy,
    /// Circuit-breaker counters, retry budget and rate limiter: carried
    /// over from the previous snapshot.
    pub traffic: Arc<crate::traffic::ServiceTraffic>,
    pub balancer: crate::balance::Balancer,
    /// `namespace/name`, for the destination header of each request.
    pub key_header: Option<http::HeaderValue>,
}

#[derive(Default)]
pub struct Snapshot {
    pub version: u64,
    pub mesh: MeshSpec,
    pub services: HashMap<SvcKey, Arc<ServiceState>>,
    pub missing: HashSet<SvcKey>,
    /// The AuthorizationPolicies of this workload, compiled.
    pub authz: crate::authz::Authorizer,
    /// The config as received, for the cache and `/config`.
    pub raw: Config,
}

impl Snapshot {
    pub fn service(&self, key: &SvcKey) -> Option<&Arc<ServiceState>> {
        self.services.get(key)
    }

    /// Builds a snapshot, reusing the endpoints of `prev` that are still
    /// listed. Any error rejects the whole config.
    pub fn build(config: Config, prev: &Snapshot) -> Result<Snapshot, SnapshotError> {
        let mesh: MeshSpec = if config.mesh_json.trim().is_empty() {
            MeshSpec::default()
        } else {
            serde_json::from_str(&config.mesh_json).map_err(SnapshotError::Mesh)?
        };
        let mut services = HashMap::new();
        for sc in &config.services {
            let key = SvcKey::new(&sc.namespace, &sc.name);
            let res: Resource = serde_json::from_str(&sc.service_json).map_err(|reason| {
                SnapshotError::Service {
                    key: key.clone(),
                    reason,
                }
            })?;
            let spec = res
                .as_service()
                .cloned()
                .ok_or_else(|| SnapshotError::NotAService(key.clone()))?;
            let routes = RouteTable::from_config(&sc.routes_json, &sc.grpc_routes_json).map_err(
                |reason| SnapshotError::Route {
                    key: key.clone(),
                    reason,
                },
            )?;
            let old = prev.services.get(&key);
            let mut endpoints = Vec::with_capacity(sc.endpoints.len());
            for ep in &sc.endpoints {
                let addr: SocketAddr =
                    ep.address
                        .parse()
                        .map_err(|_| SnapshotError::EndpointAddress {
                            key: key.clone(),
                            address: ep.address.clone(),
                        })?;
                let reused =
                    old.and_then(|o| o.endpoints.iter().find(|e| e.addr == addr && e.same_as(ep)));
                endpoints.push(match reused {
                    Some(e) => e.clone(),
                    None => Arc::new(Endpoint::new(addr, ep)),
                });
            }
            // A TrafficPolicy's balancer wins over the older annotation.
            let lb_annotation = res.metadata.annotations.get(LB_ANNOTATION);
            let policy = crate::traffic::Policy::from_json(
                &sc.traffic_policy_json,
                lb_annotation.map(String::as_str),
            )
            .map_err(|reason| SnapshotError::Policy {
                key: key.clone(),
                reason,
            })?;
            let algorithm = policy.balancer;
            let balancer = crate::balance::Balancer::new(algorithm, policy.locality, &endpoints);
            services.insert(
                key.clone(),
                Arc::new(ServiceState {
                    key_header: http::HeaderValue::try_from(key.to_string()).ok(),
                    key,
                    spec,
                    routes,
                    endpoints,
                    algorithm,
                    rr: AtomicUsize::new(0),
                    traffic: old.map(|o| o.traffic.clone()).unwrap_or_default(),
                    policy,
                    balancer,
                }),
            );
        }
        let missing = config
            .missing
            .iter()
            .filter_map(|s| SvcKey::parse(s))
            .collect();
        let authz = crate::authz::Authorizer::build(
            &config.authorization_policies_json,
            mesh.default_policy,
        )?;
        Ok(Snapshot {
            version: config.version,
            mesh,
            services,
            missing,
            authz,
            raw: config,
        })
    }

    /// Every service this snapshot knows of or knows to be missing: what a
    /// proxy restarted from its cache subscribes to again.
    pub fn known(&self) -> Vec<SvcKey> {
        self.services
            .keys()
            .chain(self.missing.iter())
            .cloned()
            .collect()
    }
}
