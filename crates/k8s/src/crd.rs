//! The Trellis CRDs, `trellis.dev/v1alpha1` `Mesh` (cluster-scoped),
//! `TrafficPolicy` and `AuthorizationPolicy` (namespaced), and their
//! OpenAPI v3 schemas.
//!
//! The spec of each kind *is* the resource model's spec type
//! (trellis-resource), wrapped in a transparent newtype so kube's derive
//! can name the kind; the schema comes from the same type through
//! schemars, so the API server and `trellis apply` refuse the same
//! misspelt field and the same bad enum value. The API server refuses
//! fields the schema does not list (kubectl's field validation is Strict
//! by default) because no schema node preserves unknown fields.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, JSONSchemaProps, ValidationRule,
};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use trellis_resource::{AuthorizationPolicySpec, MeshSpec, TrafficPolicySpec};

pub const GROUP: &str = "trellis.dev";
pub const VERSION: &str = "v1alpha1";

/// `Mesh`: one per cluster, named `default`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "Mesh",
    plural = "meshes",
    doc = "The mesh-wide settings: trust domain, mTLS mode, default policy, certificate lifetime, tracing. One per cluster, named `default`."
)]
#[serde(transparent)]
pub struct MeshBody(pub MeshSpec);

/// `TrafficPolicy`: how callers treat traffic to one Service.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    plural = "trafficpolicies",
    shortname = "tp",
    namespaced,
    doc = "How the callers' proxies treat traffic to one Service: load balancer, connection pool, outlier detection, retries, faults, rate limit, health checks, locality.",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
#[serde(transparent)]
pub struct TrafficPolicyBody(pub TrafficPolicySpec);

/// `AuthorizationPolicy`: who may call a Service (or a namespace).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "trellis.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    plural = "authorizationpolicies",
    shortname = "ap",
    namespaced,
    doc = "Who may call a Service (without targetRef: every Service of the namespace). DENY first; then, if any ALLOW policy selects the target, a request must match one; else Mesh.defaultPolicy decides.",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.targetRef.name"}"#
)]
#[serde(transparent)]
pub struct AuthorizationPolicyBody(pub AuthorizationPolicySpec);

/// The three Trellis CRDs, in a fixed order, ready to apply.
pub fn trellis_crds() -> Vec<CustomResourceDefinition> {
    let mut mesh = Mesh::crd();
    // One Mesh per cluster: the name is part of the contract, as the
    // universal loader's check says.
    if let Some(root) = root_schema(&mut mesh) {
        root.x_kubernetes_validations = Some(vec![ValidationRule {
            rule: "self.metadata.name == 'default'".into(),
            message: Some("there is one Mesh and it must be named `default`: rename it".into()),
            ..Default::default()
        }]);
    }
    let mut crds = vec![mesh, TrafficPolicy::crd(), AuthorizationPolicy::crd()];
    for crd in &mut crds {
        crd.metadata.labels.get_or_insert_default().insert(
            crate::names::PART_OF_LABEL.into(),
            crate::names::PART_OF.into(),
        );
        if let Some(root) = root_schema(crd) {
            tidy(root);
        }
    }
    crds
}

fn root_schema(crd: &mut CustomResourceDefinition) -> Option<&mut JSONSchemaProps> {
    crd.spec
        .versions
        .first_mut()?
        .schema
        .as_mut()?
        .open_api_v3_schema
        .as_mut()
}

/// Makes the derived schema what the API server should enforce:
///
/// - no `default`s: the Rust types apply them when they read a spec, and
///   defaults in a CRD are written into stored objects, which GitOps tools
///   then see as drift from what the user applied;
/// - no `additionalProperties: false` (serde's `deny_unknown_fields`): a
///   structural schema may not say it, and needs not, since fields outside
///   `properties` are unknown fields the API server refuses;
/// - no `null` among an enum's values (`nullable` says it);
/// - no `format` of unsigned integers (`uint16`...): the API server does
///   not know them; their `minimum`/`maximum` say the same.
fn tidy(schema: &mut JSONSchemaProps) {
    let mut value = serde_json::to_value(&*schema).expect("a schema serialises");
    tidy_value(&mut value);
    *schema = serde_json::from_value(value).expect("a tidied schema is still a schema");
}

/// Tidies one schema node and its subschemas. Only keywords are removed:
/// `properties` is walked by value, so a field named like a keyword stays.
fn tidy_value(v: &mut Value) {
    let Value::Object(node) = v else { return };
    node.remove("default");
    // An optional enum lists null among its values; `nullable` says that
    // already, and the API server wants enum values of the node's type.
    if let Some(Value::Array(values)) = node.get_mut("enum") {
        values.retain(|v| !v.is_null());
    }
    if node.get("additionalProperties") == Some(&Value::Bool(false)) {
        node.remove("additionalProperties");
    }
    if node
        .get("format")
        .and_then(Value::as_str)
        .is_some_and(|f| f.starts_with("uint"))
    {
        node.remove("format");
    }
    if let Some(Value::Object(props)) = node.get_mut("properties") {
        props.values_mut().for_each(tidy_value);
    }
    for key in ["items", "additionalProperties", "not"] {
        if let Some(sub) = node.get_mut(key) {
            tidy_value(sub);
        }
    }
    for key in ["allOf", "anyOf", "oneOf"] {
        if let Some(Value::Array(subs)) = node.get_mut(key) {
            subs.iter_mut().for_each(tidy_value);
        }
    }
}

#[cfg(test)]
#[path = "crd_tests.rs"]
mod tests;
