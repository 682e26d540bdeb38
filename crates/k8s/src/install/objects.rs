//! The control plane's Kubernetes objects, with the namespace and the
//! image as placeholders (the template fills them in).

use serde_json::{json, Value};

use super::{IMAGE, NAMESPACE, PROXY_IMAGE};
use crate::names::*;

fn labels() -> Value {
    json!({
        APP_LABEL: CONTROL_PLANE,
        PART_OF_LABEL: PART_OF,
        "app.kubernetes.io/version": env!("CARGO_PKG_VERSION"),
    })
}

fn selector() -> Value {
    json!({ APP_LABEL: CONTROL_PLANE })
}

fn meta(name: &str) -> Value {
    json!({ "name": name, "namespace": NAMESPACE, "labels": labels() })
}

fn cluster_meta(name: &str) -> Value {
    json!({ "name": name, "labels": labels() })
}

pub(super) fn namespace() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": { "name": NAMESPACE, "labels": { PART_OF_LABEL: PART_OF } },
    })
}

pub(super) fn service_account() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(CONTROL_PLANE),
    })
}

/// The ServiceAccounts whose tokens are the CLI's credential for the HTTP
/// API (`viewer`, `tap`). They hold no Kubernetes permission themselves.
pub(super) fn observer_account(name: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta(name),
        "automountServiceAccountToken": false,
    })
}

/// What a person needs for `stat`, `edges`, `trace`, `dashboard`
/// (`trellis-viewer`) or also `tap`, `top` (`trellis-tap`) with
/// `--kubernetes`: find the replicas, port-forward to them, read the CA's
/// public roots, and make a short-lived token of the observer account.
/// Bind it with `kubectl create rolebinding -n trellis-system ... --role`.
pub(super) fn observer_role(name: &str) -> Value {
    let accounts: &[&str] = if name == TAP_ACCOUNT {
        &[VIEWER_ACCOUNT, TAP_ACCOUNT]
    } else {
        &[VIEWER_ACCOUNT]
    };
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(name),
        "rules": [
            { "apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"] },
            { "apiGroups": [""], "resources": ["pods/portforward"], "verbs": ["get", "create"] },
            { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": [ROOTS_CONFIG_MAP], "verbs": ["get"] },
            { "apiGroups": [""], "resources": ["serviceaccounts/token"], "resourceNames": accounts, "verbs": ["create"] },
        ],
    })
}

/// Cluster-wide: read what the mesh is made of, write route status,
/// review tokens, keep the webhook's caBundle. Each rule says who needs it.
pub(super) fn cluster_role() -> Value {
    let read = json!(["get", "list", "watch"]);
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": cluster_meta(CONTROL_PLANE),
        "rules": [
            // source: namespace labels (injection opt-in), Services (VIPs,
            // ports), Pods (identity, labels), Nodes (a pod's zone).
            { "apiGroups": [""], "resources": ["namespaces", "services", "pods", "nodes"], "verbs": read },
            // source: endpoints (ready/serving/terminating, zone).
            { "apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read },
            // source: the Trellis CRDs.
            { "apiGroups": [crate::crd::GROUP], "resources": ["meshes", "trafficpolicies", "authorizationpolicies"], "verbs": read },
            // source: routes; status: their conditions (server-side apply is a patch).
            { "apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes", "grpcroutes"], "verbs": read },
            { "apiGroups": ["gateway.networking.k8s.io"], "resources": ["httproutes/status", "grpcroutes/status"], "verbs": ["patch"] },
            // identity: the sidecars' projected ServiceAccount tokens.
            { "apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"] },
            // webhook: keep its own configuration's caBundle right, and no other's.
            { "apiGroups": ["admissionregistration.k8s.io"], "resources": ["mutatingwebhookconfigurations"],
              "resourceNames": [WEBHOOK_CONFIG], "verbs": ["get", "patch"] },
        ],
    })
}

pub(super) fn cluster_role_binding() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": cluster_meta(CONTROL_PLANE),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": CONTROL_PLANE },
        "subjects": [{ "kind": "ServiceAccount", "name": CONTROL_PLANE, "namespace": NAMESPACE }],
    })
}

/// In the control plane's own namespace only: the CA Secret, the Lease and
/// the roots ConfigMap.
/// `create` cannot be limited to a name (the object has none yet when it
/// is checked); everything else is limited to Trellis's own objects.
pub(super) fn role() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": meta(CONTROL_PLANE),
        "rules": [
            // ca_secret: the first replica creates the CA Secret, the
            // others read it; rotation updates it.
            { "apiGroups": [""], "resources": ["secrets"], "verbs": ["create"] },
            { "apiGroups": [""], "resources": ["secrets"], "resourceNames": [CA_SECRET], "verbs": ["get", "watch", "list", "update"] },
            // lease: leader election for status writes and CA work.
            { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"] },
            { "apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": [LEASE], "verbs": ["get", "update"] },
            // the CA's public roots for the CLI (`--kubernetes`).
            { "apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"] },
            { "apiGroups": [""], "resources": ["configmaps"], "resourceNames": [ROOTS_CONFIG_MAP], "verbs": ["get", "update"] },
        ],
    })
}

pub(super) fn role_binding() -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": meta(CONTROL_PLANE),
        "roleRef": { "apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": CONTROL_PLANE },
        "subjects": [{ "kind": "ServiceAccount", "name": CONTROL_PLANE, "namespace": NAMESPACE }],
    })
}

pub(super) fn control_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(CONTROL_SERVICE),
        "spec": {
            "selector": selector(),
            "ports": [
                { "name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc" },
                { "name": "https", "port": HTTP_PORT, "targetPort": "https", "protocol": "TCP", "appProtocol": "https" },
            ],
        },
    })
}

pub(super) fn webhook_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta(WEBHOOK_SERVICE),
        "spec": {
            "selector": selector(),
            "ports": [{ "name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP", "appProtocol": "https" }],
        },
    })
}

fn probe(path: &str, port: &str) -> Value {
    json!({
        "httpGet": { "path": path, "port": port, "scheme": "HTTPS" },
        "periodSeconds": 5,
        "timeoutSeconds": 2,
        "failureThreshold": 3,
    })
}

pub(super) fn deployment(ha: bool) -> Value {
    let mut pod_spec = json!({
        "serviceAccountName": CONTROL_PLANE,
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "terminationGracePeriodSeconds": 30,
        "containers": [{
            "name": "control",
            "image": IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "args": [
                "control", "--kubernetes",
                "--data-dir", "/var/lib/trellis/control",
                "--grpc-addr", format!("0.0.0.0:{GRPC_PORT}"),
                "--http-addr", format!("0.0.0.0:{HTTP_PORT}"),
                "--http-tls-mesh-ca",
                "--webhook-addr", format!("0.0.0.0:{WEBHOOK_PORT}"),
            ],
            "env": [
                { "name": "TRELLIS_POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } },
                { "name": "TRELLIS_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                // What the webhook injects (`--proxy-image`; default: the
                // control plane's own image).
                { "name": PROXY_IMAGE_ENV, "value": PROXY_IMAGE },
            ],
            "ports": [
                { "name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP" },
                { "name": "https", "containerPort": HTTP_PORT, "protocol": "TCP" },
                { "name": "webhook", "containerPort": WEBHOOK_PORT, "protocol": "TCP" },
            ],
            // Ready once the webhook serves and the cluster has been read:
            // a replica that took pods before would let them start unmeshed.
            "readinessProbe": probe(crate::names::WEBHOOK_READY_PATH, "webhook"),
            "livenessProbe": probe("/healthz", "https"),
            "resources": {
                "requests": { "cpu": "100m", "memory": "128Mi" },
                "limits": { "memory": "512Mi" },
            },
            "securityContext": {
                "allowPrivilegeEscalation": false,
                "readOnlyRootFilesystem": true,
                "capabilities": { "drop": ["ALL"] },
            },
            "volumeMounts": [{ "name": "data", "mountPath": "/var/lib/trellis" }],
        }],
        // The CA key is copied here from its Secret: memory, never the node's
        // disk. The data dir is a folder of it, which the control plane
        // (not root) may make 0700.
        "volumes": [{ "name": "data", "emptyDir": { "medium": "Memory", "sizeLimit": "32Mi" } }],
    });
    if ha {
        // Preferred, not required: a one-node cluster still runs all three.
        pod_spec["affinity"] = json!({
            "podAntiAffinity": {
                "preferredDuringSchedulingIgnoredDuringExecution": [{
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": { "matchLabels": selector() },
                        "topologyKey": "kubernetes.io/hostname",
                    },
                }],
            },
        });
    }
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta(CONTROL_PLANE),
        "spec": {
            "replicas": if ha { 3 } else { 2 },
            "selector": { "matchLabels": selector() },
            // A new replica is ready before an old one goes: proxies always
            // have a control plane to reconnect to.
            "strategy": { "type": "RollingUpdate", "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 } },
            "template": {
                "metadata": { "labels": labels() },
                "spec": pod_spec,
            },
        },
    })
}

pub(super) fn pod_disruption_budget() -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": meta(CONTROL_PLANE),
        "spec": { "maxUnavailable": 1, "selector": { "matchLabels": selector() } },
    })
}

/// Never the control plane's own namespace (its pods must start to serve
/// the webhook) nor kube-system.
fn excluded_namespaces() -> Value {
    json!({ "key": "kubernetes.io/metadata.name", "operator": "NotIn", "values": ["kube-system", NAMESPACE] })
}

fn webhook(name: &str, namespace_selector: Value, object_selector: Value, ha: bool) -> Value {
    json!({
        "name": name,
        "admissionReviewVersions": ["v1"],
        "sideEffects": "None",
        // --ha: a pod of an injected namespace never starts without its
        // sidecar; by default, pods start (unmeshed) while the webhook is down.
        "failurePolicy": if ha { "Fail" } else { "Ignore" },
        "matchPolicy": "Equivalent",
        "reinvocationPolicy": "Never",
        "timeoutSeconds": 10,
        // caBundle is written by the control plane at run time.
        "clientConfig": {
            "service": { "name": WEBHOOK_SERVICE, "namespace": NAMESPACE, "path": WEBHOOK_PATH, "port": 443 },
        },
        "rules": [{
            "apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
            "resources": ["pods"], "scope": "Namespaced",
        }],
        "namespaceSelector": namespace_selector,
        "objectSelector": object_selector,
    })
}

/// Two webhooks: pods of namespaces labelled `trellis.dev/inject=enabled`
/// (unless the pod's label says `disabled`), and pods labelled
/// `trellis.dev/inject=enabled` in any other namespace. The API server
/// can select by labels only; the pod annotation is read by the handler.
pub(super) fn webhook_configuration(ha: bool) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": cluster_meta(WEBHOOK_CONFIG),
        "webhooks": [
            webhook(
                &format!("namespace.{WEBHOOK_NAME}"),
                json!({ "matchExpressions": [
                    { "key": INJECT_LABEL, "operator": "In", "values": ["enabled"] },
                    excluded_namespaces(),
                ]}),
                json!({ "matchExpressions": [
                    { "key": INJECT_LABEL, "operator": "NotIn", "values": ["disabled"] },
                ]}),
                ha,
            ),
            webhook(
                &format!("object.{WEBHOOK_NAME}"),
                json!({ "matchExpressions": [
                    { "key": INJECT_LABEL, "operator": "NotIn", "values": ["enabled"] },
                    excluded_namespaces(),
                ]}),
                json!({ "matchExpressions": [
                    { "key": INJECT_LABEL, "operator": "In", "values": ["enabled"] },
                ]}),
                ha,
            ),
        ],
    })
}
