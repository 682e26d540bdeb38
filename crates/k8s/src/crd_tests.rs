use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;

/// The openAPIV3Schema of the CRD for `kind`, as JSON.
fn schema_of(kind: &str) -> Value {
    let crd = trellis_crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap_or_else(|| panic!("no CRD for {kind}"));
    let v = serde_json::to_value(&crd).unwrap();
    v["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The schema as the API server applies it, in JSON Schema terms: a field
/// outside an object's `properties` is unknown and refused (Strict field
/// validation, no `x-kubernetes-preserve-unknown-fields`), and `nullable`
/// admits null.
fn as_api_server(schema: &Value) -> Value {
    let mut s = schema.clone();
    fn walk(v: &mut Value) {
        let Value::Object(node) = v else { return };
        if node.get("nullable") == Some(&Value::Bool(true)) {
            if let Some(Value::String(t)) = node.get("type").cloned() {
                node.insert("type".into(), json!([t, "null"]));
            }
        }
        let preserves = node.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
        if node.contains_key("properties")
            && !node.contains_key("additionalProperties")
            && !preserves
        {
            node.insert("additionalProperties".into(), Value::Bool(false));
        }
        if let Some(Value::Object(props)) = node.get_mut("properties") {
            props.values_mut().for_each(walk);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = node.get_mut(key) {
                walk(sub);
            }
        }
        for key in ["allOf", "anyOf", "oneOf"] {
            if let Some(Value::Array(subs)) = node.get_mut(key) {
                subs.iter_mut().for_each(walk);
            }
        }
    }
    walk(&mut s);
    s
}

/// What the API server says of `doc` (apiVersion, kind and metadata are
/// checked by the server itself, apart from the schema): the errors, each
/// with its field path.
fn api_server_errors(doc: &Value) -> Vec<String> {
    let kind = doc["kind"].as_str().unwrap();
    let schema = as_api_server(&schema_of(kind));
    let validator = jsonschema::validator_for(&schema).expect("the schema compiles");
    let mut body = doc.clone();
    for k in ["apiVersion", "kind", "metadata"] {
        body.as_object_mut().unwrap().remove(k);
    }
    validator
        .iter_errors(&body)
        .map(|e| format!("{}: {e}", e.instance_path()))
        .collect()
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            yaml_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            out.push(path);
        }
    }
}

/// Every document of the examples whose kind is a Trellis CRD.
fn crd_examples() -> Vec<(String, Value)> {
    let mut files = Vec::new();
    yaml_files(&examples_dir(), &mut files);
    files.sort();
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
            let doc: Value = serde::Deserialize::deserialize(de).unwrap();
            let kind = doc["kind"].as_str().unwrap_or_default();
            if ["Mesh", "TrafficPolicy", "AuthorizationPolicy"].contains(&kind) {
                docs.push((format!("{} document {}", file.display(), i + 1), doc));
            }
        }
    }
    docs
}

/// Whether the universal loader accepts the document alone (its checks of
/// references to Services aside, which the schema cannot make).
fn loader_accepts(doc: &Value) -> bool {
    let text = serde_yaml_ng::to_string(doc).unwrap();
    trellis_resource::parse_documents("test.yaml", &text).is_ok()
}

#[test]
fn the_schemas_accept_every_example_of_their_kinds() {
    let docs = crd_examples();
    let kinds: std::collections::BTreeSet<&str> = docs
        .iter()
        .map(|(_, d)| d["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds.into_iter().collect::<Vec<_>>(),
        ["AuthorizationPolicy", "Mesh", "TrafficPolicy"],
        "the examples should hold every Trellis kind, or this test proves less"
    );
    for (place, doc) in &docs {
        assert!(loader_accepts(doc), "{place}: the loader refuses it");
        let errors = api_server_errors(doc);
        assert!(errors.is_empty(), "{place}: {errors:?}");
    }
}

#[test]
fn unknown_fields_are_refused_at_any_depth_as_the_loader_refuses_them() {
    let cases = [
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
               "metadata": {"name": "p"},
               "spec": {"targetRef": {"name": "web"}, "loadBalancr": {"type": "round-robin"}}}),
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
               "metadata": {"name": "p"},
               "spec": {"targetRef": {"name": "web"}, "retry": {"attempts": 2, "budget": {"ratoi": 0.1}}}}),
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "a"},
               "spec": {"action": "ALLOW", "rules": [{"from": [{"namespace": ["prod"]}]}]}}),
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
               "metadata": {"name": "default"}, "spec": {"mTLS": "strict"}}),
    ];
    for doc in cases {
        let errors = api_server_errors(&doc);
        assert!(!errors.is_empty(), "accepted {doc}");
        assert!(!loader_accepts(&doc), "the loader accepts {doc}");
    }
    // Where the unknown field is, is said.
    let errors = api_server_errors(&json!({"kind": "AuthorizationPolicy",
        "spec": {"action": "ALLOW", "rules": [{"from": [{"namespace": ["prod"]}]}]}}));
    assert!(
        errors.iter().any(|e| e.starts_with("/spec/rules/0/from/0")),
        "{errors:?}"
    );
}

#[test]
fn bad_values_are_refused_where_the_schema_can_say_so() {
    let policy = |spec: Value| {
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "TrafficPolicy",
               "metadata": {"name": "p"}, "spec": spec})
    };
    let authz = |spec: Value| {
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": "a"}, "spec": spec})
    };
    let mesh = |spec: Value| {
        json!({"apiVersion": "trellis.dev/v1alpha1", "kind": "Mesh",
               "metadata": {"name": "default"}, "spec": spec})
    };
    let bad = [
        ("enum", authz(json!({"action": "PERMIT"}))),
        ("enum", mesh(json!({"mtls": "sometimes"}))),
        (
            "enum",
            policy(json!({"targetRef": {"name": "web"}, "loadBalancer": {"type": "random"}})),
        ),
        (
            "duration",
            policy(json!({"targetRef": {"name": "web"}, "retry": {"backoff": "1.5s"}})),
        ),
        ("duration", mesh(json!({"certificateTTL": "1d"}))),
        (
            "range",
            policy(json!({"targetRef": {"name": "web"}, "retry": {"codes": [200]}})),
        ),
        (
            "range",
            policy(json!({"targetRef": {"name": "web"},
            "faultInjection": {"abort": {"percent": 150.0}}})),
        ),
        ("range", mesh(json!({"tracing": {"sampling": 2.0}}))),
        (
            "range",
            authz(json!({"action": "ALLOW", "rules": [{"to": [{"ports": [0]}]}]})),
        ),
        (
            "pattern",
            authz(json!({"action": "ALLOW", "rules": [{"to": [{"methods": ["FETCH"]}]}]})),
        ),
        (
            "pattern",
            authz(json!({"action": "DENY", "rules": [{"from": [{"principals": ["web"]}]}]})),
        ),
        (
            "required",
            policy(json!({"loadBalancer": {"type": "round-robin"}})),
        ),
        (
            "type",
            policy(json!({"targetRef": {"name": "web"}, "retry": {"attempts": "two"}})),
        ),
    ];
    for (what, doc) in bad {
        assert!(
            !api_server_errors(&doc).is_empty(),
            "{what}: accepted {doc}"
        );
        // The loader refuses the same (parsing, or its checks).
        let text = serde_yaml_ng::to_string(&doc).unwrap();
        let refused = match trellis_resource::parse_documents("t.yaml", &text) {
            Err(_) => true,
            Ok(rs) => {
                let svc = trellis_resource::parse_documents(
                    "s.yaml",
                    "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 80}]}\n",
                )
                .unwrap();
                trellis_resource::validate_apply(&rs, &[], &svc).is_err()
            }
        };
        assert!(refused, "{what}: the loader accepts {doc}");
    }
}

#[test]
fn the_schemas_are_structural() {
    // Every node has a type, nothing is a $ref, no default is stored and
    // no node says additionalProperties: false (the API server refuses a
    // CRD that does).
    fn walk(path: &str, v: &Value, problems: &mut Vec<String>) {
        let Value::Object(node) = v else { return };
        let typed = node.contains_key("type")
            || node.contains_key("x-kubernetes-int-or-string")
            || node.contains_key("x-kubernetes-preserve-unknown-fields");
        if !typed {
            problems.push(format!("{path}: no type"));
        }
        if node
            .get("enum")
            .and_then(Value::as_array)
            .is_some_and(|e| e.contains(&Value::Null))
        {
            problems.push(format!("{path}: null in an enum (nullable says it)"));
        }
        for key in ["$ref", "default", "definitions", "$defs"] {
            if node.contains_key(key) {
                problems.push(format!("{path}: has {key}"));
            }
        }
        if node.get("additionalProperties") == Some(&Value::Bool(false)) {
            problems.push(format!("{path}: additionalProperties: false"));
        }
        if node.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true)) {
            problems.push(format!("{path}: preserves unknown fields"));
        }
        if let Some(Value::Object(props)) = node.get("properties") {
            for (name, sub) in props {
                walk(&format!("{path}.{name}"), sub, problems);
            }
        }
        if let Some(items) = node.get("items") {
            walk(&format!("{path}[]"), items, problems);
        }
        if let Some(sub @ Value::Object(_)) = node.get("additionalProperties") {
            walk(&format!("{path}{{}}"), sub, problems);
        }
    }
    for kind in ["Mesh", "TrafficPolicy", "AuthorizationPolicy"] {
        let mut problems = Vec::new();
        walk(kind, &schema_of(kind), &mut problems);
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

#[test]
fn scopes_names_and_the_mesh_name_rule() {
    let crds = trellis_crds();
    let names: Vec<(&str, &str)> = crds
        .iter()
        .map(|c| (c.metadata.name.as_deref().unwrap(), c.spec.scope.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("meshes.trellis.dev", "Cluster"),
            ("trafficpolicies.trellis.dev", "Namespaced"),
            ("authorizationpolicies.trellis.dev", "Namespaced"),
        ]
    );
    let rules = schema_of("Mesh")["x-kubernetes-validations"].clone();
    assert_eq!(rules[0]["rule"], "self.metadata.name == 'default'");
}
