//! Kubernetes objects → [`MeshState`]: a pure function of what the
//! watchers hold, so every translation rule is tested on fixture objects.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;
use std::sync::Arc;

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::de::DeserializeOwned;
use trellis_resource::{
    Kind, Metadata, Protocol, Resource, ServicePort, ServiceSpec, Spec, ZONE_LABEL,
};

use super::model::{EndpointInfo, MeshState, PodInfo, Rejected, ServiceRef};
use crate::crd::{AuthorizationPolicy, Mesh, TrafficPolicy};
use crate::inject::{is_injected, trellis_pod, workload_name};

const DEFAULT_TRUST_DOMAIN: &str = "trellis.local";
const ZONE_LABELS: [&str; 2] = [
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// What the watchers hold.
#[derive(Clone, Debug, Default)]
pub struct Inputs {
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub nodes: Vec<Arc<Node>>,
    pub meshes: Vec<Arc<Mesh>>,
    pub traffic_policies: Vec<Arc<TrafficPolicy>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    pub http_routes: Vec<Arc<HttpRoute>>,
    pub grpc_routes: Vec<Arc<GrpcRoute>>,
}

fn metadata(obj: &impl ResourceExt) -> Metadata {
    Metadata {
        name: obj.name_any(),
        namespace: obj
            .namespace()
            .unwrap_or_else(|| trellis_resource::DEFAULT_NAMESPACE.into()),
        labels: obj.labels().clone(),
        // Only Trellis's own annotations matter to proxies; others (kubectl's
        // last-applied configuration...) would only bloat every Config.
        annotations: obj
            .annotations()
            .iter()
            .filter(|(k, _)| k.starts_with("trellis.dev/"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// A port's protocol from its `appProtocol`, else its name's prefix
/// (`http-web`, `grpc`), as Istio reads them; else detected.
fn protocol_hint(app_protocol: Option<&str>, name: Option<&str>) -> Option<Protocol> {
    let by = |s: &str| match s.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(Protocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(Protocol::Http2),
        "grpc" | "grpc-web" => Some(Protocol::Grpc),
        "tcp" | "mysql" | "redis" | "mongo" | "postgres" | "postgresql" => Some(Protocol::Tcp),
        _ => None,
    };
    app_protocol.and_then(by).or_else(|| {
        let name = name?;
        let prefix = name.split('-').next().unwrap_or(name);
        by(prefix)
    })
}

fn service_resource(svc: &Service, slices: &[&EndpointSlice]) -> Resource {
    let spec = svc.spec.clone().unwrap_or_default();
    let ports = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| {
            let port = u16::try_from(p.port).ok()?;
            // A named targetPort is resolved per pod: the EndpointSlices
            // say what it came to.
            let target_port = match &p.target_port {
                Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
                Some(IntOrString::String(_)) => slices
                    .iter()
                    .flat_map(|s| s.ports.iter().flatten())
                    .find(|sp| sp.name == p.name)
                    .and_then(|sp| sp.port)
                    .and_then(|n| u16::try_from(n).ok()),
                None => Some(port),
            };
            Some(ServicePort {
                name: p.name.clone(),
                port,
                target_port,
                protocol: protocol_hint(p.app_protocol.as_deref(), p.name.as_deref()),
            })
        })
        .collect();
    Resource {
        metadata: metadata(svc),
        spec: Spec::Service(ServiceSpec {
            selector: spec.selector.unwrap_or_default(),
            ports,
        }),
    }
}

/// A Gateway API or Trellis object's spec, read as the resource model's:
/// a field the model does not know is an error, not silently dropped.
fn model_spec<T: DeserializeOwned>(spec: &impl serde::Serialize) -> Result<T, String> {
    let mut v = serde_json::to_value(spec).map_err(|e| e.to_string())?;
    strip_nulls(&mut v);
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        format!("spec.{path}: {}", e.inner())
    })
}

fn strip_nulls(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            map.retain(|_, v| !v.is_null());
            map.values_mut().for_each(strip_nulls);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strip_nulls),
        _ => {}
    }
}

fn zone_of(labels: &BTreeMap<String, String>) -> Option<String> {
    ZONE_LABELS.iter().find_map(|k| labels.get(*k).cloned())
}

/// Translates everything the watchers hold.
pub fn translate(inputs: &Inputs) -> MeshState {
    let mut state = MeshState::default();
    let mut rejected = Vec::new();

    let mesh = inputs.meshes.iter().find(|m| m.name_any() == "default");
    state.trust_domain = mesh
        .map(|m| m.spec.0.trust_domain.clone())
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_string());
    let mut resources = Vec::new();
    if let Some(m) = mesh {
        resources.push(Resource {
            metadata: metadata(m.as_ref()),
            spec: Spec::Mesh(m.spec.0.clone()),
        });
    }

    for ns in &inputs.namespaces {
        state
            .namespace_labels
            .insert(ns.name_any(), ns.labels().clone());
    }

    let node_zone: HashMap<String, String> = inputs
        .nodes
        .iter()
        .filter_map(|n| Some((n.name_any(), zone_of(n.labels())?)))
        .collect();
    for pod in &inputs.pods {
        let spec = pod.spec.as_ref();
        let node = spec.and_then(|s| s.node_name.clone());
        state.pods.insert(
            (pod.namespace().unwrap_or_default(), pod.name_any()),
            PodInfo {
                uid: pod.uid().unwrap_or_default(),
                service_account: spec
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into()),
                labels: pod.labels().clone(),
                ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
                zone: node.as_ref().and_then(|n| node_zone.get(n).cloned()),
                node,
                injected: is_injected(pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                workload: workload_name(pod),
            },
        );
    }

    let mut slices_by_service: BTreeMap<ServiceRef, Vec<&EndpointSlice>> = BTreeMap::new();
    for s in &inputs.endpoint_slices {
        if s.address_type != "IPv4" {
            continue;
        }
        if let Some(svc) = s.labels().get(SERVICE_NAME_LABEL) {
            slices_by_service
                .entry((s.namespace().unwrap_or_default(), svc.clone()))
                .or_default()
                .push(s);
        }
    }

    for svc in &inputs.services {
        let key = (svc.namespace().unwrap_or_default(), svc.name_any());
        if svc.spec.as_ref().and_then(|s| s.type_.as_deref()) == Some("ExternalName") {
            continue;
        }
        let slices = slices_by_service.get(&key).cloned().unwrap_or_default();
        resources.push(service_resource(svc, &slices));
        if let Some(ip) = svc
            .spec
            .as_ref()
            .and_then(|s| s.cluster_ip.as_deref())
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        {
            state.vips.insert(key.clone(), ip);
        }
        let eps = endpoints_of(&key, &slices, &state.pods, &state.trust_domain);
        state.endpoints.insert(key, eps);
    }

    for tp in &inputs.traffic_policies {
        resources.push(Resource {
            metadata: metadata(tp.as_ref()),
            spec: Spec::TrafficPolicy(tp.spec.0.clone()),
        });
    }
    for ap in &inputs.authorization_policies {
        resources.push(Resource {
            metadata: metadata(ap.as_ref()),
            spec: Spec::AuthorizationPolicy(ap.spec.0.clone()),
        });
    }
    for r in &inputs.http_routes {
        let parents = r.spec.parent_refs.iter().flatten();
        let parents = parents.map(|p| (p.group.as_deref(), p.kind.as_deref()));
        if has_service_parent(parents) {
            mesh_route("HTTPRoute", r.as_ref(), &r.spec, Spec::HttpRoute)
                .map_or_else(|e| rejected.push(e), |res| resources.push(res));
        }
    }
    for r in &inputs.grpc_routes {
        let parents = r.spec.parent_refs.iter().flatten();
        let parents = parents.map(|p| (p.group.as_deref(), p.kind.as_deref()));
        if has_service_parent(parents) {
            mesh_route("GRPCRoute", r.as_ref(), &r.spec, Spec::GrpcRoute)
                .map_or_else(|e| rejected.push(e), |res| resources.push(res));
        }
    }

    let (kept, invalid) = keep_valid(resources);
    rejected.extend(invalid);
    state.resources = kept;
    state.resources.sort_by_key(Resource::key);
    rejected.sort_by(|a, b| a.object.cmp(&b.object));
    state.rejected = rejected;
    state
}

/// A mesh route in the resource model, or why Trellis cannot take it.
fn mesh_route<T: DeserializeOwned>(
    kind: &str,
    route: &impl ResourceExt,
    spec: &impl serde::Serialize,
    wrap: fn(T) -> Spec,
) -> Result<Resource, Rejected> {
    match model_spec(spec) {
        Ok(spec) => Ok(Resource {
            metadata: metadata(route),
            spec: wrap(spec),
        }),
        Err(reason) => Err(Rejected {
            object: format!(
                "{kind} {}/{}",
                route.namespace().unwrap_or_default(),
                route.name_any()
            ),
            reason: format!("{reason}: Trellis does not support this field or value"),
        }),
    }
}

/// In GAMMA, a route belongs to the mesh when a parentRef names a Service;
/// routes of Gateways are other controllers' business.
fn has_service_parent<'a>(
    mut parents: impl Iterator<Item = (Option<&'a str>, Option<&'a str>)>,
) -> bool {
    parents.any(|(group, kind)| {
        kind == Some("Service") && matches!(group, Some("") | Some("core") | None)
    })
}

/// The pods behind a Service that have the sidecar, one endpoint each
/// (a pod in several slices, or on several ports, is one proxy).
fn endpoints_of(
    service: &ServiceRef,
    slices: &[&EndpointSlice],
    pods: &BTreeMap<(String, String), PodInfo>,
    trust_domain: &str,
) -> Vec<EndpointInfo> {
    let mut by_pod: BTreeMap<String, EndpointInfo> = BTreeMap::new();
    for slice in slices {
        for ep in slice.endpoints.iter().flatten() {
            let Some(target) = ep
                .target_ref
                .as_ref()
                .filter(|t| t.kind.as_deref() == Some("Pod"))
            else {
                continue;
            };
            let Some(pod_name) = &target.name else {
                continue;
            };
            let Some(pod) = pods.get(&(service.0.clone(), pod_name.clone())) else {
                continue;
            };
            if !pod.injected {
                continue;
            }
            let Some(ip) = ep.addresses.first() else {
                continue;
            };
            let cond = ep.conditions.clone().unwrap_or_default();
            // Unset conditions mean "unknown": read as ready, as the
            // EndpointSlice API says consumers should.
            let ready = cond.ready.unwrap_or(true) && !pod.terminating;
            let zone = ep.zone.clone().or_else(|| pod.zone.clone());
            let mut labels = pod.labels.clone();
            if let Some(z) = &zone {
                labels.insert(ZONE_LABEL.into(), z.clone());
            }
            by_pod.insert(
                pod_name.clone(),
                EndpointInfo {
                    address: format!("{ip}:{}", trellis_pod::INBOUND_PORT),
                    pod: pod_name.clone(),
                    workload: pod.workload.clone(),
                    namespace: service.0.clone(),
                    labels,
                    identity: format!(
                        "spiffe://{trust_domain}/ns/{}/sa/{}",
                        service.0, pod.service_account
                    ),
                    ready,
                    serving: cond.serving.unwrap_or(ready),
                    terminating: cond.terminating.unwrap_or(false) || pod.terminating,
                    zone,
                },
            );
        }
    }
    let mut eps: Vec<EndpointInfo> = by_pod.into_values().collect();
    eps.sort_by(|a, b| a.address.cmp(&b.address));
    eps
}

/// Runs the resource model's own checks on each resource alone. A route
/// whose only problem is a reference to a missing Service is kept (its
/// status says `ResolvedRefs: False`); anything else the loader would
/// refuse is left out, with the loader's message.
fn keep_valid(resources: Vec<Resource>) -> (Vec<Resource>, Vec<Rejected>) {
    let services: Vec<Resource> = resources
        .iter()
        .filter(|r| r.kind() == Kind::Service)
        .cloned()
        .collect();
    let mut kept = Vec::new();
    let mut rejected = Vec::new();
    for r in resources {
        if r.kind() == Kind::Service {
            kept.push(r);
            continue;
        }
        let errors =
            match trellis_resource::validate_apply(std::slice::from_ref(&r), &[], &services) {
                Ok(()) => Vec::new(),
                Err(e) => e.errors,
            };
        let ref_fields: Vec<String> = r.route_refs().iter().map(|re| re.place.field()).collect();
        let target_ref = |f: &str| f.starts_with("spec.targetRef");
        let serious: Vec<String> = errors
            .iter()
            .filter(|e| {
                let is_ref = ref_fields
                    .iter()
                    .any(|rf| e.field == *rf || e.field.starts_with(&format!("{rf}.port")))
                    || target_ref(&e.field);
                !(is_ref && e.reason.contains("does not exist"))
            })
            .map(|e| format!("{}: {}", e.field, e.reason))
            .collect();
        if serious.is_empty() {
            kept.push(r);
        } else {
            rejected.push(Rejected {
                object: r.key().to_string(),
                reason: serious.join("; "),
            });
        }
    }
    (kept, rejected)
}

#[cfg(test)]
#[path = "translate_tests.rs"]
mod tests;
