//! Properties of the resource loader (`trellis_resource::load`): any text
//! loads or fails without a panic, and a failure names a document and a
//! line; resources written as YAML or JSON load back equal; a field broken
//! in one document of many is reported with that document and the field's
//! path; nesting of any depth and shape is refused (or loaded) at once,
//! and the nesting pre-scan never counts fewer levels than the YAML
//! library then finds.

use std::collections::BTreeMap;

use proptest::prelude::*;
use serde_json::{json, Value};
use trellis_resource::{
    parse_documents, to_yaml, AccessLogSpec, DefaultPolicy, MeshSpec, Metadata, MtlsMode,
    OtlpProtocol, Protocol, Resource, ServicePort, ServiceSpec, Spec, TracingSpec, WorkloadSpec,
};

fn name() -> impl Strategy<Value = String> {
    "[a-z][a-z0-9-]{0,20}"
}

/// Free text for values: any string, YAML's special words included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => any::<String>(),
        1 => prop::sample::select(vec!["", "yes", "no", "null", "~", "1.0", "0x10", "---", "- a", "a: b", "#x", "'", "\""])
            .prop_map(str::to_string),
    ]
}

fn labels() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[a-z][a-z0-9./_-]{0,15}", text(), 0..4)
}

fn metadata() -> impl Strategy<Value = Metadata> {
    (name(), name(), labels(), labels()).prop_map(|(name, namespace, labels, annotations)| {
        Metadata {
            name,
            namespace,
            labels,
            annotations,
        }
    })
}

fn protocol() -> impl Strategy<Value = Protocol> {
    prop::sample::select(vec![
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
        Protocol::Tcp,
    ])
}

fn service() -> impl Strategy<Value = Spec> {
    let port = (
        prop::option::of(name()),
        any::<u16>(),
        prop::option::of(any::<u16>()),
        prop::option::of(protocol()),
    )
        .prop_map(|(name, port, target_port, protocol)| ServicePort {
            name,
            port,
            target_port,
            protocol,
        });
    (labels(), prop::collection::vec(port, 0..4))
        .prop_map(|(selector, ports)| Spec::Service(ServiceSpec { selector, ports }))
}

fn workload() -> impl Strategy<Value = Spec> {
    (
        any::<u32>(),
        prop::option::of(name()),
        prop::collection::vec(text(), 0..4),
        labels(),
        any::<u16>(),
    )
        .prop_map(|(replicas, service_account, command, env, port)| {
            Spec::Workload(WorkloadSpec {
                replicas,
                service_account,
                command,
                env,
                port,
            })
        })
}

fn mesh() -> impl Strategy<Value = Spec> {
    let tracing = (
        0.0..=1.0f64,
        prop::option::of(text()),
        prop::option::of(prop::sample::select(vec![
            OtlpProtocol::Grpc,
            OtlpProtocol::HttpProtobuf,
        ])),
    )
        .prop_map(|(sampling, otlp_endpoint, otlp_protocol)| TracingSpec {
            sampling,
            otlp_endpoint,
            otlp_protocol,
        });
    let access_log = (prop::option::of(text()), any::<bool>())
        .prop_map(|(path, stdout)| AccessLogSpec { path, stdout });
    (
        name(),
        prop::sample::select(vec![
            MtlsMode::Strict,
            MtlsMode::Permissive,
            MtlsMode::Disabled,
        ]),
        prop::sample::select(vec![DefaultPolicy::Allow, DefaultPolicy::Deny]),
        "[0-9]{1,4}(s|m|h)",
        prop::option::of(tracing),
        prop::option::of(access_log),
    )
        .prop_map(
            |(trust_domain, mtls, default_policy, certificate_ttl, tracing, access_log)| {
                Spec::Mesh(MeshSpec {
                    trust_domain,
                    mtls,
                    default_policy,
                    certificate_ttl,
                    tracing,
                    access_log,
                })
            },
        )
}

fn resource() -> impl Strategy<Value = Resource> {
    (metadata(), prop_oneof![service(), workload(), mesh()])
        .prop_map(|(metadata, spec)| Resource { metadata, spec })
}

/// One way to break a resource's JSON, and the field path the loader must
/// then name.
fn breakage() -> impl Strategy<Value = (&'static str, Value, &'static str)> {
    prop::sample::select(vec![
        ("/spec/bogus", json!(1), "spec.bogus"),
        ("/metadata/nmae", json!("x"), "metadata.nmae"),
        ("/metadata/name", json!(["a", "list"]), "metadata.name"),
        ("/metadata/labels", json!("not a map"), "metadata.labels"),
    ])
}

/// Sets `pointer` (its parent must exist) in `v`.
/// How deeply a parsed YAML value nests (a scalar is 0).
fn value_depth(v: &serde_yaml_ng::Value) -> usize {
    match v {
        serde_yaml_ng::Value::Sequence(items) => {
            1 + items.iter().map(value_depth).max().unwrap_or(0)
        }
        serde_yaml_ng::Value::Mapping(m) => {
            1 + m
                .iter()
                .map(|(k, v)| value_depth(k).max(value_depth(v)))
                .max()
                .unwrap_or(0)
        }
        serde_yaml_ng::Value::Tagged(t) => value_depth(&t.value),
        _ => 0,
    }
}

/// Pieces of flow-style YAML, with the characters that could confuse a
/// scan inside scalars and comments.
fn flow_piece() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec![
        "[",
        "[",
        "{",
        "{",
        "]",
        "}",
        ", ",
        ",",
        "a",
        "a: ",
        "\"k\": ",
        "\"]]}\"",
        "'}]''['",
        "x[y",
        "it's",
        "a\"b",
        " # ]]]\n",
        "\n",
        " ",
        "? ",
        "!t ",
        "&a ",
        "*a",
        "- ",
        "\"\\\"]\"",
        "\u{2028}",
        "!<x[]> ",
    ])
}

fn set(v: &mut Value, pointer: &str, to: Value) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    v.pointer_mut(parent).unwrap()[key] = to;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn any_text_loads_or_fails_naming_a_document(s in any::<String>()) {
        if let Err(e) = parse_documents("any.yaml", &s) {
            prop_assert!(!e.errors.is_empty());
            for err in &e.errors {
                prop_assert!(err.document >= 1, "{err:?}");
                prop_assert!(err.line.is_some_and(|l| l >= 1), "{err:?}");
                prop_assert!(!err.reason.is_empty(), "{err:?}");
                prop_assert_eq!(&err.file, "any.yaml");
            }
        }
    }

    /// YAML-shaped text: documents of nested maps, lists and scalars with
    /// resource-like keys.
    #[test]
    fn yaml_shaped_text_never_panics(
        docs in prop::collection::vec(
            prop::collection::vec(
                (
                    "( {0,4})",
                    prop::sample::select(vec![
                        "apiVersion", "kind", "metadata", "spec", "name", "ports", "port",
                        "selector", "- name", "-", "replicas", "tracing",
                    ]),
                    prop::sample::select(vec![
                        "", " Service", " Mesh", " trellis.dev/v1alpha1", " [1, 2]", " {a: b}",
                        " 8080", " -1", " \"x\"", " |", " &a", " *a", " !!str 1", " ?",
                    ]),
                ),
                0..10,
            ),
            0..4,
        ),
    ) {
        let text = docs
            .iter()
            .map(|lines| {
                lines
                    .iter()
                    .map(|(indent, key, value)| format!("{indent}{key}:{value}\n"))
                    .collect::<String>()
            })
            .collect::<Vec<_>>()
            .join("---\n");
        if let Err(e) = parse_documents("shaped.yaml", &text) {
            for err in &e.errors {
                prop_assert!(
                    (1..=docs.len()).contains(&err.document),
                    "{err:?} in\n{text}"
                );
            }
        }
    }

    #[test]
    fn resources_written_as_yaml_or_json_load_back_equal(
        resources in prop::collection::vec(resource(), 1..5),
    ) {
        let yaml = to_yaml(&resources);
        let back = parse_documents("gen.yaml", &yaml);
        prop_assert_eq!(back.as_ref(), Ok(&resources), "{}", yaml);
        let json = serde_json::to_string(&resources).unwrap();
        prop_assert_eq!(parse_documents("gen.json", &json), Ok(resources));
    }

    #[test]
    fn a_broken_field_is_reported_with_its_document_and_path(
        resources in prop::collection::vec(resource(), 1..5),
        broken in any::<prop::sample::Index>(),
        (pointer, value, field) in breakage(),
    ) {
        let broken = broken.index(resources.len());
        let docs: Vec<String> = resources
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let mut v = serde_json::to_value(r).unwrap();
                if i == broken {
                    set(&mut v, pointer, value.clone());
                }
                serde_yaml_ng::to_string(&v).unwrap()
            })
            .collect();
        let text = docs.join("---\n");
        let err = parse_documents("broken.yaml", &text).expect_err("a broken field is refused");
        prop_assert_eq!(err.errors.len(), 1, "{}", err);
        let e = &err.errors[0];
        prop_assert_eq!(e.document, broken + 1, "{}", e);
        prop_assert_eq!(e.field.as_str(), field, "{}", e);
    }

    /// Nesting of any depth and shape, JSON or YAML, flow or block, is
    /// refused (or loaded) without a panic: each case is up to 20,000
    /// levels, which took libyaml seconds to minutes before the pre-scan.
    #[test]
    fn any_nesting_is_refused_without_a_panic(
        levels in prop::collection::vec(
            prop::sample::select(vec!["[", "{\"a\":", "{a: ", "- ", "a:\n", "? "]),
            1..64,
        ),
        repeat in 1usize..320,
        filler in prop::sample::select(vec!["", "\"]]]}}}\", ", "# ]]]\n", "'[[['", "x]"]),
    ) {
        let mut text = String::new();
        let mut indent = 0;
        for _ in 0..repeat {
            for level in &levels {
                text.push_str(filler);
                match *level {
                    "a:\n" | "? " | "- " if indent < 4000 => {
                        text.push_str(level);
                        if level.ends_with('\n') {
                            indent += 2;
                            text.push_str(&" ".repeat(indent));
                        }
                    }
                    other => text.push_str(other),
                }
            }
        }
        text.push('1');
        let result = parse_documents("deep.yaml", &text);
        let deep: usize = levels.iter().filter(|l| matches!(**l, "[" | "{\"a\":" | "{a: ")).count() * repeat;
        // With filler, some openers sit inside scalars: only no panic then.
        if filler.is_empty() && deep > trellis_resource::limits::MAX_NESTING {
            let err = result.expect_err("nested too deep");
            prop_assert!(
                err.errors[0].reason.contains("nested deeper than"),
                "{}",
                err
            );
        }
    }

    /// The pre-scan never counts fewer levels than libyaml finds: whatever
    /// serde_yaml_ng reads nested deeper than the limit, the loader refuses
    /// as too deep. (Pieces are kept few, so libyaml stays fast.)
    #[test]
    fn the_nesting_scan_never_undercounts(
        pieces in prop::collection::vec(flow_piece(), 1..160),
    ) {
        let text: String = pieces.concat();
        let limit = trellis_resource::limits::MAX_NESTING;
        if let Ok(v) = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text) {
            if value_depth(&v) > limit {
                let err = parse_documents("scan.yaml", &text).expect_err("too deep");
                prop_assert!(err.to_string().contains("nested deeper than"), "{err}\n{text:?}");
            }
        }
    }

    /// Valid flow documents whose sequences hold scalars that look like
    /// structure (brackets and quotes in strings, comments, anchors, tags)
    /// are refused as too deep exactly when they nest deeper than the
    /// limit.
    #[test]
    fn tricky_scalars_neither_hide_nor_add_levels(
        levels in prop::collection::vec(
            (any::<bool>(), prop::sample::select(vec![
                "\"]]}}\"", "'}]''['", "it's", "a\"b", "\"\\\"]\"", "!t x", "&a x",
                "# ]]]}\n x", "\u{2028}x", "x#]", "'a\n ]]'", "\"a\n ]}\"",
            ])),
            20..48,
        ),
    ) {
        let mut text = String::new();
        for (seq, noise) in &levels {
            if *seq {
                text.push('[');
                text.push_str(noise);
                text.push_str(", ");
            } else {
                text.push_str("{\"k\": ");
            }
        }
        text.push('1');
        for (seq, _) in levels.iter().rev() {
            text.push(if *seq { ']' } else { '}' });
        }
        // A few combinations are not YAML (a comment right after a key):
        // those prove nothing here.
        let v = serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&text);
        prop_assume!(v.is_ok());
        prop_assert_eq!(value_depth(&v.unwrap()), levels.len());
        let err = parse_documents("flow.yaml", &text).expect_err("not a resource");
        let too_deep = err.to_string().contains("nested deeper than");
        prop_assert_eq!(too_deep, levels.len() > trellis_resource::limits::MAX_NESTING, "{}\n{}", err, text);
    }
}
