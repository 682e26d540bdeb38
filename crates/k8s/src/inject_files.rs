//! `trellis inject -f FILE`: the webhook's injection, offline, for the
//! pods in manifests: Pods, and the pod templates of Deployments,
//! StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs. Other
//! documents pass through unchanged. The namespace label cannot be read
//! offline, so every pod is injected unless its own annotation says
//! `disabled` or its namespace is never injected.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;
use serde_json::Value;

use crate::inject::{decide, inject, Decision, InjectConfig, InjectError};
use crate::names::INJECT_LABEL;

#[derive(Debug, thiserror::Error)]
pub enum InjectFileError {
    #[error("document {document}: not YAML: {source}")]
    Yaml {
        document: usize,
        source: serde_yaml_ng::Error,
    },
    #[error("document {document} ({kind} {name}): {source}")]
    Inject {
        document: usize,
        kind: String,
        name: String,
        source: InjectError,
    },
    #[error("document {document} ({kind} {name}): {reason}")]
    Shape {
        document: usize,
        kind: String,
        name: String,
        reason: String,
    },
}

/// Where a kind keeps its pod template (as a JSON pointer), `""` for a Pod.
fn template_pointer(kind: &str) -> Option<&'static str> {
    match kind {
        "Pod" => Some(""),
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => None,
    }
}

/// What happened to each document, for the CLI to report on stderr.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub kind: String,
    pub name: String,
    pub decision: Decision,
}

/// Injects every pod of a multi-document YAML text; returns the new text
/// and one outcome per document that holds a pod.
pub fn inject_yaml(
    text: &str,
    cfg: &InjectConfig,
) -> Result<(String, Vec<Outcome>), InjectFileError> {
    let mut out = String::new();
    let mut outcomes = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let document = i + 1;
        let mut doc: Value = serde::Deserialize::deserialize(de)
            .map_err(|source| InjectFileError::Yaml { document, source })?;
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if let Some(pointer) = template_pointer(&kind) {
            let namespace = doc["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_string();
            let template = doc
                .pointer_mut(pointer)
                .ok_or_else(|| InjectFileError::Shape {
                    document,
                    kind: kind.clone(),
                    name: name.clone(),
                    reason: format!("has no pod template at {pointer}"),
                })?;
            let decision = inject_template(template, &namespace, cfg).map_err(|source| {
                InjectFileError::Inject {
                    document,
                    kind: kind.clone(),
                    name: name.clone(),
                    source,
                }
            })?;
            outcomes.push(Outcome {
                kind: kind.clone(),
                name: name.clone(),
                decision,
            });
        }
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&doc).expect("JSON values serialise to YAML"));
    }
    Ok((out, outcomes))
}

/// Injects one pod or pod template in place.
fn inject_template(
    template: &mut Value,
    namespace: &str,
    cfg: &InjectConfig,
) -> Result<Decision, InjectError> {
    let pod: Pod = serde_json::from_value(template.clone()).map_err(InjectError::BadPod)?;
    // Offline, the pod's own word or else yes: as if its namespace were labelled.
    let ns_labels = BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())]);
    let decision = decide(&pod, namespace, &ns_labels, cfg);
    if decision == Decision::Inject {
        let injected = inject(&pod, cfg)?;
        let mut v = serde_json::to_value(&injected).expect("a Pod serialises");
        // A template has no apiVersion/kind; a Pod keeps its own.
        if let (Some(obj), Some(orig)) = (v.as_object_mut(), template.as_object()) {
            for key in ["apiVersion", "kind"] {
                match orig.get(key) {
                    Some(val) => obj.insert(key.into(), val.clone()),
                    None => obj.remove(key),
                };
            }
        }
        *template = v;
    }
    Ok(decision)
}
