//! The seam between Kubernetes and the control plane: what the API server
//! says the mesh is, in the control plane's own terms.
//!
//! Universal mode and Kubernetes feed the same registry. Resources are
//! the resource model's `Resource`s in both: on Kubernetes, core Services,
//! Gateway API routes and the Trellis CRDs, translated. What differs is
//! where endpoints come from. In universal mode a proxy that registers
//! *is* an endpoint of the Services that select it. On Kubernetes the
//! EndpointSlices and Pods are the truth ([`MeshState::endpoints`]); a
//! registering proxy only asks for its config, and a pod that is not
//! ready is no endpoint however connected its proxy is.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use trellis_resource::Resource;

/// A Service's `(namespace, name)`.
pub type ServiceRef = (String, String);

/// Everything the control plane learns from the API server, recomputed on
/// each change and published whole (so readers never see half an update).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshState {
    /// The Services, HTTPRoutes, GRPCRoutes, TrafficPolicies,
    /// AuthorizationPolicies and the Mesh, sorted by key: what the store
    /// holds in universal mode.
    pub resources: Vec<Resource>,
    /// Each Service's endpoints (sorted by address), whatever their state.
    pub endpoints: BTreeMap<ServiceRef, Vec<EndpointInfo>>,
    /// Each Service's ClusterIP: its VIP, as the proxies' DNS and outbound
    /// listeners know it (headless Services have none).
    pub vips: BTreeMap<ServiceRef, Ipv4Addr>,
    /// The pods of the cluster that the mesh cares about, by (namespace, name).
    pub pods: BTreeMap<(String, String), PodInfo>,
    /// Each namespace's labels (injection opt-in).
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Objects the API server holds that Trellis does not use, and why.
    pub rejected: Vec<Rejected>,
    /// The trust domain (the Mesh's, else the default).
    pub trust_domain: String,
}

/// One pod behind a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    /// Where peers reach the pod's proxy: `<pod IP>:15006`.
    pub address: String,
    /// The pod's name (its proxy registers with it as its instance).
    pub pod: String,
    pub workload: String,
    pub namespace: String,
    /// The pod's labels, with `topology.trellis.dev/zone` when its zone is known.
    pub labels: BTreeMap<String, String>,
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: String,
    /// EndpointSlice conditions.
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone: Option<String>,
}

/// What the control plane checks a registering proxy against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub uid: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    pub ip: Option<String>,
    pub node: Option<String>,
    pub zone: Option<String>,
    /// Whether the pod has the sidecar.
    pub injected: bool,
    /// Whether the pod is being deleted: seen here first, before the
    /// EndpointSlice controller marks its endpoint terminating, so that
    /// proxies stop picking it as its app begins to exit.
    pub terminating: bool,
    pub workload: String,
}

/// An object Trellis does not use, for route status and `trellis check`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// e.g. `HTTPRoute shop/web`.
    pub object: String,
    pub reason: String,
}

impl EndpointInfo {
    /// As the proxy API carries it.
    pub fn to_api(&self) -> trellis_api::v1::Endpoint {
        trellis_api::v1::Endpoint {
            address: self.address.clone(),
            instance: self.pod.clone(),
            workload: self.workload.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            identity: self.identity.clone(),
        }
    }
}

impl MeshState {
    /// The endpoints proxies are sent for a Service: the ready ones; when
    /// none is ready, those still serving while they terminate (as
    /// kube-proxy does), so a Service whose every pod is being replaced
    /// keeps answering until the new ones are ready.
    pub fn proxy_endpoints(&self, service: &ServiceRef) -> Vec<trellis_api::v1::Endpoint> {
        let Some(all) = self.endpoints.get(service) else {
            return Vec::new();
        };
        let ready: Vec<_> = all.iter().filter(|e| e.ready && !e.terminating).collect();
        let chosen = if ready.is_empty() {
            all.iter().filter(|e| e.serving).collect()
        } else {
            ready
        };
        chosen.into_iter().map(EndpointInfo::to_api).collect()
    }
}
