//! Route status, as other GAMMA meshes write it: for each parentRef of an
//! HTTPRoute or GRPCRoute that names a Service, an entry under
//! `status.parents` with Trellis's controllerName and two conditions:
//!
//! - `Accepted`: True; False with `NoMatchingParent` when the Service does
//!   not exist, or `UnsupportedValue` when Trellis cannot use the route
//!   (the reason says what);
//! - `ResolvedRefs`: True; False with `BackendNotFound` (a backendRef names
//!   a missing Service) or `InvalidKind` (a backendRef is not a Service).
//!
//! Entries of other controllers are kept; a condition that did not change
//! keeps its lastTransitionTime, and nothing is written when nothing
//! changed. Only the Lease holder writes (see `lease`).

use std::collections::BTreeSet;

use kube::api::{Api, Patch, PatchParams};
use serde_json::{json, Value};

use crate::names::CONTROLLER_NAME;
use crate::source::{MeshState, ServiceRef};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("cannot write the status of {route}: {source}; does the control plane's ClusterRole allow patching {kind}/status?")]
    Write {
        route: String,
        kind: String,
        source: Box<kube::Error>,
    },
}

fn names_service(r: &Value) -> bool {
    let group = r["group"].as_str().unwrap_or("");
    let kind = r["kind"].as_str();
    matches!(group, "" | "core") && kind == Some("Service")
}

fn condition(
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &str,
) -> Value {
    let mut c = json!({
        "type": type_,
        "status": if ok { "True" } else { "False" },
        "reason": reason,
        "message": message,
        "lastTransitionTime": now,
    });
    if let Some(g) = generation {
        c["observedGeneration"] = json!(g);
    }
    c
}

/// Trellis's entries of `status.parents` for a route (the object as JSON).
pub fn desired_parents(route: &Value, state: &MeshState, now: &str) -> Vec<Value> {
    let kind = route["kind"].as_str().unwrap_or("HTTPRoute");
    let ns = route["metadata"]["namespace"].as_str().unwrap_or("default");
    let name = route["metadata"]["name"].as_str().unwrap_or_default();
    let generation = route["metadata"]["generation"].as_i64();
    let services: BTreeSet<&ServiceRef> = state.endpoints.keys().collect();
    let exists = |r: &Value| {
        let svc_ns = r["namespace"].as_str().unwrap_or(ns).to_string();
        let svc = r["name"].as_str().unwrap_or_default().to_string();
        services.contains(&(svc_ns, svc))
    };
    let rejected = state
        .rejected
        .iter()
        .find(|r| r.object == format!("{kind} {ns}/{name}"));
    let backends: Vec<&Value> = route["spec"]["rules"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|rule| rule["backendRefs"].as_array().into_iter().flatten())
        .collect();
    let invalid: Vec<String> = backends
        .iter()
        .filter(|b| !names_service(&with_service_default(b)))
        .map(|b| {
            format!(
                "{}/{}",
                b["kind"].as_str().unwrap_or("?"),
                b["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let missing: Vec<String> = backends
        .iter()
        .filter(|b| names_service(&with_service_default(b)) && !exists(b))
        .map(|b| {
            format!(
                "{}/{}",
                b["namespace"].as_str().unwrap_or(ns),
                b["name"].as_str().unwrap_or("?")
            )
        })
        .collect();
    let resolved = if !invalid.is_empty() {
        condition(
            "ResolvedRefs",
            false,
            "InvalidKind",
            &format!("backendRefs must be Services: {}", invalid.join(", ")),
            generation,
            now,
        )
    } else if !missing.is_empty() {
        condition(
            "ResolvedRefs",
            false,
            "BackendNotFound",
            &format!("no such Service: {}", missing.join(", ")),
            generation,
            now,
        )
    } else {
        condition(
            "ResolvedRefs",
            true,
            "ResolvedRefs",
            "every backendRef resolves to a Service",
            generation,
            now,
        )
    };
    route["spec"]["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| names_service(p))
        .map(|p| {
            let accepted = match rejected {
                Some(r) => condition(
                    "Accepted",
                    false,
                    "UnsupportedValue",
                    &r.reason,
                    generation,
                    now,
                ),
                None if !exists(p) => condition(
                    "Accepted",
                    false,
                    "NoMatchingParent",
                    &format!(
                        "no such Service: {}/{}",
                        p["namespace"].as_str().unwrap_or(ns),
                        p["name"].as_str().unwrap_or("?")
                    ),
                    generation,
                    now,
                ),
                None => condition(
                    "Accepted",
                    true,
                    "Accepted",
                    "attached to the Service's mesh traffic",
                    generation,
                    now,
                ),
            };
            json!({
                "parentRef": p,
                "controllerName": CONTROLLER_NAME,
                "conditions": [accepted, resolved.clone()],
            })
        })
        .collect()
}

/// A backendRef's kind defaults to Service (and its group to core).
fn with_service_default(b: &Value) -> Value {
    let mut b = b.clone();
    if b.get("kind").is_none_or(Value::is_null) {
        b["kind"] = json!("Service");
    }
    b
}

/// `status.parents` with Trellis's entries replaced by `ours` (other
/// controllers' kept), each unchanged condition keeping its old
/// lastTransitionTime.
pub fn merge_parents(existing: &[Value], ours: Vec<Value>) -> Vec<Value> {
    let mut merged: Vec<Value> = existing
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    for mut entry in ours {
        let old = existing.iter().find(|p| {
            p["controllerName"] == CONTROLLER_NAME && p["parentRef"] == entry["parentRef"]
        });
        if let (Some(old), Some(conds)) = (old, entry["conditions"].as_array_mut()) {
            for c in conds {
                let same = old["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find(|o| {
                        o["type"] == c["type"]
                            && o["status"] == c["status"]
                            && o["reason"] == c["reason"]
                    });
                if let Some(o) = same {
                    c["lastTransitionTime"] = o["lastTransitionTime"].clone();
                }
            }
        }
        merged.push(entry);
    }
    merged
}

/// Writes Trellis's part of a route's status; returns whether it wrote.
/// `api` is the route kind's (HTTPRoute or GRPCRoute) namespaced Api.
pub async fn write<K>(
    api: &Api<K>,
    route: &Value,
    state: &MeshState,
    now: &str,
) -> Result<bool, StatusError>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let ours = desired_parents(route, state, now);
    let existing: Vec<Value> = route["status"]["parents"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let merged = merge_parents(&existing, ours);
    if merged == existing {
        return Ok(false);
    }
    let name = route["metadata"]["name"].as_str().unwrap_or_default();
    // The resourceVersion makes the write fail rather than drop another
    // controller's entry written since the route was read.
    let patch = json!({
        "metadata": {"resourceVersion": route["metadata"]["resourceVersion"]},
        "status": {"parents": merged},
    });
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .map_err(|e| StatusError::Write {
            route: format!(
                "{}/{name}",
                route["metadata"]["namespace"].as_str().unwrap_or_default()
            ),
            kind: route["kind"]
                .as_str()
                .unwrap_or("routes")
                .to_ascii_lowercase()
                + "s",
            source: Box::new(e),
        })?;
    Ok(true)
}

#[cfg(test)]
#[path = "status_tests.rs"]
mod tests;
