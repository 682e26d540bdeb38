//! Prints how large the Configs of a mesh are as Trellis sends them
//! (resources as JSON inside the protobuf Config) and as typed protobuf
//! messages would make them, for docs/architecture.md's choice between the
//! two.
//!
//! The typed size is an estimate: the same JSON values counted with
//! protobuf's wire rules (a one-byte tag instead of the field name, varint
//! lengths and integers, maps as entry messages, `apiVersion` and `kind`
//! implied by the message type). Strings that would be enums stay strings,
//! so the estimate is on the high side.
//!
//! `cargo run -p trellis-control --example config_size [-- FILE_OR_DIR...]`
//! (default: the demo mesh, examples/demo).

use std::collections::BTreeSet;
use std::path::PathBuf;

use prost::Message;
use serde_json::Value;
use trellis_api::v1::{Config, Register};
use trellis_control::registry::{EndpointCache, Proxy, Registry, ResourceIndex};
use trellis_resource::{load_path, Resource, Spec};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut paths: Vec<PathBuf> = std::env::args().skip(1).map(PathBuf::from).collect();
    if paths.is_empty() {
        paths.push(root.join("examples/demo"));
    }
    let mut resources = Vec::new();
    for p in &paths {
        resources.extend(load_path(p)?);
    }
    let mut registry = Registry {
        resources: ResourceIndex::new(&resources),
        ..Default::default()
    };
    register_workloads(&mut registry, &resources);

    println!(
        "{:<28} {:>10} {:>10} {:>12} {:>8}",
        "proxy subscribed to", "sent", "json", "typed (est.)", "ratio"
    );
    let services: Vec<String> = registry
        .resources
        .services
        .keys()
        .map(|n| n.to_string())
        .collect();
    let mut rows: Vec<(String, BTreeSet<String>)> = services
        .iter()
        .map(|s| (s.clone(), BTreeSet::from([s.clone()])))
        .collect();
    rows.push(("every service".into(), services.iter().cloned().collect()));
    for (label, subs) in rows {
        let (config, _) = registry.config_for(&subs, &mut EndpointCache::new());
        let sent = config.encoded_len();
        let json = json_bytes(&config);
        let typed = typed_estimate(&config)?;
        println!(
            "{label:<28} {sent:>10} {json:>10} {typed:>12} {:>8.2}",
            sent as f64 / typed as f64
        );
    }
    Ok(())
}

/// One proxy per Workload replica, with the Workload's labels.
fn register_workloads(registry: &mut Registry, resources: &[Resource]) {
    let mut conn = 0;
    for r in resources {
        let Spec::Workload(w) = &r.spec else { continue };
        for i in 0..w.replicas.max(1) {
            conn += 1;
            let register = Register {
                instance: format!("{}-{i}-7f3a9c", r.metadata.name),
                workload: r.metadata.name.clone(),
                namespace: r.metadata.namespace.clone(),
                labels: r.metadata.labels.clone(),
                inbound_addr: format!("10.0.{}.{}:15006", conn / 250, conn % 250 + 1),
                admin_addr: format!("10.0.{}.{}:15000", conn / 250, conn % 250 + 1),
                app_port: 8080,
                ..Default::default()
            };
            let proxy = Proxy::from_register(conn, &register);
            registry.endpoints.insert(proxy.record("example"));
            registry.proxies.insert(conn, proxy);
        }
    }
}

/// The bytes of JSON the Config carries.
fn json_bytes(c: &Config) -> usize {
    c.mesh_json.len()
        + c.authorization_policies_json
            .iter()
            .map(String::len)
            .sum::<usize>()
        + c.services
            .iter()
            .map(|s| {
                s.service_json.len()
                    + s.traffic_policy_json.len()
                    + s.routes_json.iter().map(String::len).sum::<usize>()
                    + s.grpc_routes_json.iter().map(String::len).sum::<usize>()
            })
            .sum::<usize>()
}

/// The Config's encoded size with each JSON string replaced by its typed
/// protobuf estimate.
fn typed_estimate(c: &Config) -> Result<usize, serde_json::Error> {
    let json_field = |s: &str| -> Result<usize, serde_json::Error> {
        if s.is_empty() {
            return Ok(0);
        }
        Ok(field(message(&serde_json::from_str(s)?, true)))
    };
    let mut total = c.encoded_len();
    let mut swap = |s: &str| -> Result<(), serde_json::Error> {
        total = total + json_field(s)? - if s.is_empty() { 0 } else { field(s.len()) };
        Ok(())
    };
    swap(&c.mesh_json)?;
    for s in &c.authorization_policies_json {
        swap(s)?;
    }
    for svc in &c.services {
        swap(&svc.service_json)?;
        swap(&svc.traffic_policy_json)?;
        for r in svc.routes_json.iter().chain(&svc.grpc_routes_json) {
            swap(r)?;
        }
    }
    Ok(total)
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

/// A length-delimited field of `len` bytes: tag, length, bytes.
fn field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// A JSON object's size as a protobuf message's body.
fn message(v: &Value, top: bool) -> usize {
    let Value::Object(map) = v else { return 0 };
    map.iter()
        .filter(|(k, _)| !(top && (*k == "apiVersion" || *k == "kind")))
        .map(|(k, v)| match (k.as_str(), v) {
            // String maps: one entry message per pair.
            ("labels" | "annotations" | "selector" | "env", Value::Object(m)) => m
                .iter()
                .map(|(k, v)| field(field(k.len()) + value(v)))
                .sum(),
            _ => value(v),
        })
        .sum()
}

/// A JSON value's size as one protobuf field (repeated: one per element).
fn value(v: &Value) -> usize {
    match v {
        Value::Null => 0,
        Value::Bool(b) => usize::from(*b) * 2,
        Value::Number(n) => match n.as_u64() {
            Some(u) => 1 + varint_len(u),
            None if n.is_i64() => 11,
            None => 9,
        },
        Value::String(s) => field(s.len()),
        Value::Array(a) => a.iter().map(value).sum(),
        Value::Object(_) => field(message(v, false)),
    }
}
