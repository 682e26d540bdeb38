//! `Config::content_hash` against the proto schema itself: the tests build
//! Configs from the compiled descriptor, so a field added to proxy.proto is
//! covered without anyone listing it here.

use std::collections::{BTreeMap, HashMap};

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

use crate::v1::{Config, Endpoint, ServiceConfig};

const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/proxy_descriptor.bin"));
const CONFIG: &str = ".trellis.proxy.v1.Config";

/// Every message type of the proxy API by full name (`.pkg.Msg`,
/// `.pkg.Msg.Nested`), map entries included.
fn schema() -> HashMap<String, DescriptorProto> {
    fn add(prefix: &str, msg: &DescriptorProto, out: &mut HashMap<String, DescriptorProto>) {
        let name = format!("{prefix}.{}", msg.name());
        for nested in &msg.nested_type {
            add(&name, nested, out);
        }
        out.insert(name, msg.clone());
    }
    let fds = FileDescriptorSet::decode(DESCRIPTOR).expect("the build script's descriptor set");
    let mut out = HashMap::new();
    for file in &fds.file {
        for msg in &file.message_type {
            add(&format!(".{}", file.package()), msg, &mut out);
        }
    }
    out
}

fn varint(mut v: u64, buf: &mut Vec<u8>) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(number: i32, wire_type: u64, buf: &mut Vec<u8>) {
    varint(((number as u64) << 3) | wire_type, buf);
}

/// Writes a message of type `name` with every field set, recursively: one
/// element for repeated fields and maps (a map is a repeated entry
/// message), which is enough for each to count. Scalar leaves are numbered in the
/// order they are written; leaf `changed` gets a different value. Each
/// leaf's path (`services.endpoints.labels.value`) is pushed on `paths`.
fn populate(
    schema: &HashMap<String, DescriptorProto>,
    name: &str,
    prefix: &str,
    changed: Option<usize>,
    paths: &mut Vec<String>,
) -> Vec<u8> {
    assert!(
        prefix.matches('.').count() < 8,
        "{prefix}: recursive message"
    );
    let msg = &schema[name];
    let mut buf = Vec::new();
    for field in &msg.field {
        let path = if prefix.is_empty() {
            field.name().to_string()
        } else {
            format!("{prefix}.{}", field.name())
        };
        let n = field.number();
        if field.r#type() == Type::Message {
            let inner = populate(schema, field.type_name(), &path, changed, paths);
            key(n, 2, &mut buf);
            varint(inner.len() as u64, &mut buf);
            buf.extend(inner);
            continue;
        }
        let leaf = paths.len();
        paths.push(path.clone());
        let alt = changed == Some(leaf);
        let number = leaf as u64 + if alt { 1000 } else { 1 };
        match field.r#type() {
            Type::String | Type::Bytes => {
                let s = format!("{path}={number}");
                key(n, 2, &mut buf);
                varint(s.len() as u64, &mut buf);
                buf.extend(s.as_bytes());
            }
            Type::Bool => {
                // False is the default, which the encoding omits: a change
                // all the same.
                if !alt {
                    key(n, 0, &mut buf);
                    varint(1, &mut buf);
                }
            }
            Type::Int32
            | Type::Int64
            | Type::Uint32
            | Type::Uint64
            | Type::Sint32
            | Type::Sint64
            | Type::Enum => {
                key(n, 0, &mut buf);
                varint(number, &mut buf);
            }
            Type::Double | Type::Fixed64 | Type::Sfixed64 => {
                key(n, 1, &mut buf);
                let bits = if field.r#type() == Type::Double {
                    (number as f64).to_bits()
                } else {
                    number
                };
                buf.extend(bits.to_le_bytes());
            }
            Type::Float | Type::Fixed32 | Type::Sfixed32 => {
                key(n, 5, &mut buf);
                let bits = if field.r#type() == Type::Float {
                    (number as f32).to_bits()
                } else {
                    number as u32
                };
                buf.extend(bits.to_le_bytes());
            }
            other => panic!("{path}: teach this test to write a {other:?} field"),
        }
    }
    buf
}

fn config(changed: Option<usize>) -> (Config, Vec<String>) {
    let mut paths = Vec::new();
    let bytes = populate(&schema(), CONFIG, "", changed, &mut paths);
    let config = Config::decode(bytes.as_slice()).expect("a Config");
    // Nothing written was dropped as unknown.
    assert_eq!(config.encoded_len(), bytes.len());
    (config, paths)
}

#[test]
fn every_config_field_counts_in_the_content_hash() {
    let (base, paths) = config(None);
    assert!(
        paths.iter().any(|p| p == "services.endpoints.labels.value"),
        "{paths:?}"
    );
    for (leaf, path) in paths.iter().enumerate() {
        let (other, _) = config(Some(leaf));
        assert_ne!(other, base, "{path}: the change did not reach the Config");
        if path == "version" {
            assert_eq!(
                other.content_hash(),
                base.content_hash(),
                "the version is not content"
            );
        } else {
            assert_ne!(
                other.content_hash(),
                base.content_hash(),
                "{path} does not count in Config::content_hash"
            );
        }
    }
}

#[test]
fn a_populated_config_sets_every_field_of_every_message_it_holds() {
    let (config, _) = config(None);
    let endpoint = &config.services[0].endpoints[0];
    // Spot checks that the walk went all the way down.
    assert_eq!(config.services.len(), 1);
    assert_ne!(config.services[0], ServiceConfig::default());
    assert_ne!(*endpoint, Endpoint::default());
    assert_eq!(endpoint.labels.len(), 1);
}

/// Sixteen labels, inserted in the given key order.
fn labels(order: impl Iterator<Item = u32>) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for i in order {
        m.insert(format!("k{i}"), format!("v{i}"));
    }
    m
}

fn config_with_labels(labels: BTreeMap<String, String>) -> Config {
    Config {
        mesh_json: "{}".into(),
        services: vec![ServiceConfig {
            namespace: "default".into(),
            name: "catalog".into(),
            endpoints: vec![Endpoint {
                address: "10.0.0.1:15006".into(),
                labels,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

#[test]
fn equal_content_hashes_equal_whatever_the_map_insertion_order() {
    let a = config_with_labels(labels(0..16));
    let b = config_with_labels(labels((0..16).rev()));
    assert_eq!(a.content_hash(), b.content_hash());
    assert_eq!(a.encode_to_vec(), b.encode_to_vec());
}

#[test]
fn the_version_is_not_content() {
    let a = config_with_labels(labels(0..2));
    let b = Config {
        version: 42,
        ..a.clone()
    };
    assert_eq!(a.content_hash(), b.content_hash());
}

/// Another process, or another replica running another build, must compute
/// the same hash for the same Config; a hash seeded per process (std's
/// `RandomState`) or tied to one Rust release (std's `DefaultHasher`) would
/// not. This pins the value that xxh3 gives for one fixed Config: if it
/// changes, replicas of different versions disagree on every Config.
#[test]
fn the_hash_is_the_same_in_every_process() {
    let config = config_with_labels(labels(0..2));
    assert_eq!(
        config.content_hash(),
        PINNED_HASH,
        "{:#x}",
        config.content_hash()
    );
}

const PINNED_HASH: u64 = 0xe996_0c33_ef71_9e60;
