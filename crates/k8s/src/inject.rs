//! Sidecar injection: whether a pod gets the mesh, and the pod with it.
//! Pure functions of the pod, its namespace's labels and the settings, so
//! the admission webhook and `trellis inject -f` do exactly the same.
//!
//! An injected pod gets, at the front of its init containers:
//!
//! 1. `trellis-init`: `trellis init` installs the pod's redirect rules
//!    (nftables), with only NET_ADMIN and NET_RAW, as uid 0 (nft needs it),
//!    and exits. The rules let the proxy's own traffic pass by its uid.
//! 2. `trellis-proxy`: the proxy as a native sidecar (`restartPolicy:
//!    Always`), as uid 1337 with no capability at all. Its startup probe
//!    holds the app's containers (and the pod's own init containers, which
//!    may call meshed services) until it has its config and certificate.
//!    A native sidecar is stopped by the kubelet once the pod's containers
//!    have exited, so Jobs complete.
//!
//! and a projected ServiceAccount token (audience `trellis`, one hour)
//! that the proxy presents to the control plane for its identity.
//!
//! Probes: the kubelet's HTTP and TCP probes of the app would reach the
//! redirected ports, where the proxy refuses plaintext under strict mTLS.
//! They are rewritten to the proxy's admin port (`/app-health/<container>/
//! <liveness|readiness|startup>`), where the proxy runs the original probe
//! against the app on 127.0.0.1 (the originals travel in
//! `TRELLIS_APP_PROBES`), as Istio does. Excluding the probed ports from
//! redirection instead would open the app's serving port to plaintext
//! from anywhere, past mTLS and authorization. gRPC and exec probes are
//! left as they are (exec needs no network; gRPC probes need mTLS
//! permissive or an `exclude-inbound-ports` annotation).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use serde_json::{json, Value};

use crate::names::*;

/// What injection needs to know besides the pod.
#[derive(Clone, Debug, PartialEq)]
pub struct InjectConfig {
    /// The image of the init container and the proxy.
    pub image: String,
    /// The control plane's namespace (never injected).
    pub control_plane_namespace: String,
    /// The version written in the `trellis.dev/injected` annotation.
    pub version: String,
    /// SHA-256 of the mesh CA's root, which the proxy trusts for the
    /// control plane (a ServiceAccount token pins nothing).
    pub ca_pin: Option<String>,
}

impl InjectConfig {
    pub fn new(image: impl Into<String>, control_plane_namespace: impl Into<String>) -> Self {
        InjectConfig {
            image: image.into(),
            control_plane_namespace: control_plane_namespace.into(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ca_pin: None,
        }
    }

    /// Where proxies reach the control plane: its Service's DNS name.
    pub fn control_plane_addr(&self) -> String {
        format!(
            "{}:{GRPC_PORT}",
            service_host(CONTROL_SERVICE, &self.control_plane_namespace)
        )
    }
}

/// Whether to inject, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Inject,
    Skip(String),
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the pod cannot be read as a Kubernetes Pod: {0}")]
    BadPod(serde_json::Error),
    #[error("annotation {annotation}: `{value}` is not a list of ports (e.g. `9090,9091`)")]
    BadPorts {
        annotation: &'static str,
        value: String,
    },
    #[error("annotation {annotation}: `{value}` is not a list of IPv4 CIDRs (e.g. `10.0.0.0/8,192.168.1.5/32`)")]
    BadCidrs {
        annotation: &'static str,
        value: String,
    },
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata.labels.as_ref()?.get(key).map(String::as_str)
}

/// Whether the pod is already injected: a second pass changes nothing.
pub fn is_injected(pod: &Pod) -> bool {
    annotation(pod, INJECTED_ANNOTATION).is_some()
        || pod.spec.as_ref().is_some_and(|s| {
            s.init_containers
                .iter()
                .flatten()
                .chain(&s.containers)
                .any(|c| c.name == PROXY_CONTAINER)
        })
}

/// Decides whether `pod` in `namespace` (whose labels are `ns_labels`)
/// gets the mesh. The pod's annotation (or label) `trellis.dev/inject`
/// wins over the namespace's label; kube-system, the control plane's own
/// namespace and host-network pods are never injected.
pub fn decide(
    pod: &Pod,
    namespace: &str,
    ns_labels: &BTreeMap<String, String>,
    cfg: &InjectConfig,
) -> Decision {
    if namespace == "kube-system" || namespace == cfg.control_plane_namespace {
        return Decision::Skip(format!("pods in {namespace} are never injected"));
    }
    if is_injected(pod) {
        return Decision::Skip("already injected".into());
    }
    if pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false)
    {
        // The redirect rules would be installed in the node's own network.
        return Decision::Skip("host-network pods share the node's network: not injected".into());
    }
    let own = annotation(pod, INJECT_ANNOTATION).or_else(|| label(pod, INJECT_LABEL));
    match own {
        Some("enabled") => return Decision::Inject,
        Some("disabled") => return Decision::Skip(format!("{INJECT_ANNOTATION}: disabled")),
        Some(other) => {
            return Decision::Skip(format!(
                "{INJECT_ANNOTATION}: `{other}` is neither `enabled` nor `disabled`"
            ))
        }
        None => {}
    }
    match ns_labels.get(INJECT_LABEL).map(String::as_str) {
        Some("enabled") => Decision::Inject,
        _ => Decision::Skip(format!(
            "namespace {namespace} is not labelled {INJECT_LABEL}=enabled"
        )),
    }
}

fn ports_annotation(pod: &Pod, key: &'static str) -> Result<Vec<u16>, InjectError> {
    let Some(value) = annotation(pod, key) else {
        return Ok(Vec::new());
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|p| p.parse::<u16>().ok().filter(|p| *p != 0))
        .collect::<Option<Vec<u16>>>()
        .ok_or_else(|| InjectError::BadPorts {
            annotation: key,
            value: value.to_string(),
        })
}

fn cidrs_annotation(pod: &Pod, key: &'static str) -> Result<Vec<String>, InjectError> {
    let Some(value) = annotation(pod, key) else {
        return Ok(Vec::new());
    };
    let bad = || InjectError::BadCidrs {
        annotation: key,
        value: value.to_string(),
    };
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|c| {
            let (ip, len) = c.split_once('/').unwrap_or((c, "32"));
            match (ip.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) {
                (Ok(ip), Ok(len)) if len <= 32 => Ok(format!("{ip}/{len}")),
                _ => Err(bad()),
            }
        })
        .collect()
}

fn join<T: ToString>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The workload a pod belongs to, as metrics and `trellis stat` name it:
/// a Deployment's pods are named after the Deployment (the ReplicaSet's
/// name without its pod-template-hash), others after their owner, else
/// their `app.kubernetes.io/name` or `app` label, else the pod's name.
pub fn workload_name(pod: &Pod) -> String {
    let meta = &pod.metadata;
    if let Some(owner) = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
    {
        if owner.kind == "ReplicaSet" {
            if let Some(hash) = label(pod, "pod-template-hash") {
                if let Some(base) = owner.name.strip_suffix(&format!("-{hash}")) {
                    return base.to_string();
                }
            }
        }
        return owner.name.clone();
    }
    if let Some(app) = label(pod, "app.kubernetes.io/name").or_else(|| label(pod, "app")) {
        return app.to_string();
    }
    meta.name
        .clone()
        .or_else(|| {
            meta.generate_name
                .as_ref()
                .map(|g| g.trim_end_matches('-').to_string())
        })
        .unwrap_or_else(|| "pod".into())
}

/// The app's port the proxy forwards inbound requests to: the
/// `trellis.dev/app-port` annotation, else the first TCP port the pod's
/// containers declare, else 8080.
fn app_port(pod: &Pod) -> Result<u16, InjectError> {
    if let Some(v) = annotation(pod, APP_PORT_ANNOTATION) {
        return v
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| InjectError::BadPorts {
                annotation: APP_PORT_ANNOTATION,
                value: v.to_string(),
            });
    }
    let declared = pod.spec.iter().flat_map(|s| &s.containers).find_map(|c| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .and_then(|p| u16::try_from(p.container_port).ok())
    });
    Ok(declared.unwrap_or(8080))
}

/// Rewrites one probe to the proxy's admin port, returning the original
/// (its named port resolved) to hand to the proxy.
fn rewrite_probe(container: &Container, probe: &mut Probe, path: String) -> Option<Value> {
    let resolve = |port: &k8s_openapi::apimachinery::pkg::util::intstr::IntOrString| match port {
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(p) => Some(*p),
        k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port),
    };
    let original = if let Some(get) = &probe.http_get {
        json!({
            "httpGet": {
                "path": get.path.clone().unwrap_or_else(|| "/".into()),
                "port": resolve(&get.port)?,
                "scheme": get.scheme.clone().unwrap_or_else(|| "HTTP".into()),
                "httpHeaders": get.http_headers.clone().unwrap_or_default(),
            }
        })
    } else if let Some(tcp) = &probe.tcp_socket {
        json!({ "tcpSocket": { "port": resolve(&tcp.port)? } })
    } else {
        return None;
    };
    probe.http_get = Some(k8s_openapi::api::core::v1::HTTPGetAction {
        path: Some(path),
        port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i32::from(
            trellis_pod::ADMIN_PORT,
        )),
        scheme: Some("HTTP".into()),
        ..Default::default()
    });
    probe.tcp_socket = None;
    Some(original)
}

/// The pod contract's ports (trellis_proxy::pod), repeated here because
/// this crate must not depend on the proxy; a test in the CLI checks they
/// agree.
pub mod trellis_pod {
    pub const ADMIN_PORT: u16 = 15000;
    pub const INBOUND_PORT: u16 = 15006;
}

/// The pod with the mesh: init container, native sidecar, token volume,
/// rewritten probes, the `trellis.dev/injected` annotation. Call it only
/// when [`decide`] says [`Decision::Inject`].
pub fn inject(pod: &Pod, cfg: &InjectConfig) -> Result<Pod, InjectError> {
    let exclude_in = ports_annotation(pod, EXCLUDE_INBOUND_PORTS)?;
    let exclude_out = ports_annotation(pod, EXCLUDE_OUTBOUND_PORTS)?;
    let exclude_cidrs = cidrs_annotation(pod, EXCLUDE_OUTBOUND_CIDRS)?;
    let app_port = app_port(pod)?;
    let workload = workload_name(pod);
    let mut pod = pod.clone();
    let mut spec = pod.spec.take().unwrap_or_default();

    let mut probes = BTreeMap::new();
    for c in &mut spec.containers {
        let snapshot = c.clone();
        for (kind, probe) in [
            ("liveness", &mut c.liveness_probe),
            ("readiness", &mut c.readiness_probe),
            ("startup", &mut c.startup_probe),
        ] {
            if let Some(p) = probe.as_mut() {
                let path = format!("/app-health/{}/{kind}", snapshot.name);
                if let Some(original) = rewrite_probe(&snapshot, p, path.clone()) {
                    probes.insert(path, original);
                }
            }
        }
    }

    let mut init_args = vec![
        "init".to_string(),
        "--proxy-uid".into(),
        PROXY_UID.to_string(),
    ];
    for (flag, value) in [
        ("--exclude-inbound-ports", join(&exclude_in)),
        ("--exclude-outbound-ports", join(&exclude_out)),
        ("--exclude-outbound-cidrs", exclude_cidrs.join(",")),
    ] {
        if !value.is_empty() {
            init_args.push(flag.into());
            init_args.push(value);
        }
    }
    let init: Container = serde_json::from_value(json!({
        "name": INIT_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        "args": init_args,
        "resources": {
            "requests": { "cpu": "10m", "memory": "16Mi" },
            "limits": { "memory": "64Mi" },
        },
        "securityContext": {
            // nft needs uid 0 and NET_ADMIN (NET_RAW for its netlink
            // socket); nothing else, and the container exits at once.
            "runAsUser": 0,
            "runAsNonRoot": false,
            "privileged": false,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"], "add": ["NET_ADMIN", "NET_RAW"] },
        },
    }))
    .map_err(InjectError::BadPod)?;

    let labels = pod
        .metadata
        .labels
        .iter()
        .flatten()
        .filter(|(k, _)| k.as_str() != "pod-template-hash")
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    let cpu = annotation(&pod, PROXY_CPU_ANNOTATION)
        .unwrap_or("50m")
        .to_string();
    let memory = annotation(&pod, PROXY_MEMORY_ANNOTATION)
        .unwrap_or("64Mi")
        .to_string();
    let mut proxy_args = vec![
        "proxy".to_string(),
        "--transparent".into(),
        // No mark (that needs CAP_NET_ADMIN): the rules know the proxy by its uid.
        "--mark".into(),
        "off".into(),
        "--control-plane".into(),
        cfg.control_plane_addr(),
        "--workload".into(),
        workload.clone(),
        "--namespace".into(),
        "$(TRELLIS_POD_NAMESPACE)".into(),
        "--service-account".into(),
        "$(TRELLIS_SERVICE_ACCOUNT)".into(),
        "--instance".into(),
        "$(TRELLIS_POD_NAME)".into(),
        "--token-file".into(),
        TOKEN_FILE.into(),
        "--app-port".into(),
        app_port.to_string(),
        "--inbound-addr".into(),
        format!("0.0.0.0:{}", trellis_pod::INBOUND_PORT),
        "--admin-addr".into(),
        format!("0.0.0.0:{}", trellis_pod::ADMIN_PORT),
        "--advertise-addr".into(),
        "$(TRELLIS_POD_IP)".into(),
        "--cache-dir".into(),
        // A folder of the volume: the proxy makes it 0700, which it may
        // not do to the volume's root (owned by root).
        "/var/lib/trellis/cache".into(),
    ];
    if let Some(pin) = &cfg.ca_pin {
        proxy_args.push("--ca-pin".into());
        proxy_args.push(pin.clone());
    }
    if !labels.is_empty() {
        proxy_args.push("--labels".into());
        proxy_args.push(labels);
    }
    let field = |path: &str| json!({ "fieldRef": { "fieldPath": path } });
    let admin_probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": trellis_pod::ADMIN_PORT, "scheme": "HTTP" },
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 1,
        })
    };
    let proxy: Container = serde_json::from_value(json!({
        "name": PROXY_CONTAINER,
        "image": cfg.image,
        "imagePullPolicy": "IfNotPresent",
        // A native sidecar: started before the app, stopped after it, and
        // never what keeps a Job's pod running.
        "restartPolicy": "Always",
        "args": proxy_args,
        "env": [
            { "name": "TRELLIS_POD_NAME", "valueFrom": field("metadata.name") },
            { "name": "TRELLIS_POD_NAMESPACE", "valueFrom": field("metadata.namespace") },
            { "name": "TRELLIS_SERVICE_ACCOUNT", "valueFrom": field("spec.serviceAccountName") },
            { "name": "TRELLIS_POD_IP", "valueFrom": field("status.podIP") },
            { "name": "TRELLIS_NODE_NAME", "valueFrom": field("spec.nodeName") },
            { "name": "TRELLIS_APP_PROBES", "value": serde_json::to_string(&probes).unwrap_or_default() },
        ],
        "ports": [{ "name": "trellis-admin", "containerPort": trellis_pod::ADMIN_PORT, "protocol": "TCP" }],
        // The app starts only once the proxy has its config and certificate
        // (two minutes for a control plane that is down or far).
        "startupProbe": admin_probe("/ready", 1, 120),
        "readinessProbe": admin_probe("/ready", 5, 3),
        "livenessProbe": admin_probe("/live", 10, 3),
        "resources": {
            "requests": { "cpu": cpu, "memory": memory },
            "limits": { "memory": "256Mi" },
        },
        "securityContext": {
            "runAsUser": PROXY_UID,
            "runAsGroup": PROXY_UID,
            "runAsNonRoot": true,
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": { "drop": ["ALL"] },
        },
        "volumeMounts": [
            { "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true },
            { "name": "trellis-proxy-cache", "mountPath": "/var/lib/trellis" },
        ],
    }))
    .map_err(InjectError::BadPod)?;

    let mut inits = vec![init, proxy];
    inits.extend(spec.init_containers.take().unwrap_or_default());
    spec.init_containers = Some(inits);
    let volumes = spec.volumes.get_or_insert_default();
    volumes.push(
        serde_json::from_value(json!({
            "name": TOKEN_VOLUME,
            "projected": { "sources": [{ "serviceAccountToken": {
                "audience": TOKEN_AUDIENCE, "expirationSeconds": 3600, "path": "token",
            }}]},
        }))
        .map_err(InjectError::BadPod)?,
    );
    // The proxy's key and config cache: memory, never the node's disk.
    volumes.push(
        serde_json::from_value(json!({
            "name": "trellis-proxy-cache",
            "emptyDir": { "medium": "Memory", "sizeLimit": "16Mi" },
        }))
        .map_err(InjectError::BadPod)?,
    );
    pod.spec = Some(spec);
    pod.metadata
        .annotations
        .get_or_insert_default()
        .insert(INJECTED_ANNOTATION.into(), cfg.version.clone());
    Ok(pod)
}

/// The JSON patch (RFC 6902) that turns `before` into `after`.
pub fn patch(before: &Pod, after: &Pod) -> json_patch::Patch {
    let a = serde_json::to_value(before).expect("a Pod serialises");
    let b = serde_json::to_value(after).expect("a Pod serialises");
    json_patch::diff(&a, &b)
}

#[cfg(test)]
#[path = "inject_tests.rs"]
mod tests;
