use std::path::PathBuf;

use super::*;
use crate::types::*;

const MESH: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata:
  name: default
";

const SERVICE: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata:
  name: catalog
  namespace: shop
spec:
  selector: {app: catalog}
  ports:
  - name: http
    port: 80
    protocol: http
";

const WORKLOAD: &str = "\
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata:
  name: catalog-v1
  labels: {app: catalog, version: v1}
spec:
  replicas: 2
  command: [trellis, demo-app, --version, v1]
";

const ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: catalog-split
spec:
  parentRefs:
  - name: catalog
    kind: Service
    group: \"\"
  rules:
  - matches:
    - path: {type: PathPrefix, value: /api}
      headers:
      - name: x-canary
        value: \"true\"
    backendRefs:
    - name: catalog-v1
      weight: 90
    - name: catalog-v2
      weight: 10
    timeouts: {request: 10s}
    retry: {codes: [503], attempts: 2, backoff: 100ms}
";

fn all_four() -> String {
    format!("# the demo\n---\n{MESH}---\n{SERVICE}\n---\n{WORKLOAD}---\n\n\n---\n{ROUTE}")
}

#[test]
fn multi_document_file_gives_each_resource_with_its_source() {
    let parsed = parse_documents_with_sources("demo.yaml", &all_four()).unwrap();
    let kinds: Vec<Kind> = parsed.iter().map(|(r, _)| r.kind()).collect();
    assert_eq!(
        kinds,
        [Kind::Mesh, Kind::Service, Kind::Workload, Kind::HttpRoute]
    );

    // Empty documents (the comment-only head, the blank one) are not counted.
    let docs: Vec<usize> = parsed.iter().map(|(_, s)| s.document).collect();
    assert_eq!(docs, [1, 2, 3, 4]);
    let (mesh, mesh_src) = &parsed[0];
    assert_eq!(mesh_src.file, "demo.yaml");
    assert_eq!(mesh_src.line, Some(3));
    assert_eq!(mesh.as_mesh().unwrap(), &MeshSpec::default());

    let (svc, svc_src) = &parsed[1];
    assert_eq!(svc_src.line, Some(8));
    assert_eq!(svc.key().to_string(), "Service shop/catalog");
    assert_eq!(
        svc.as_service().unwrap().ports[0].protocol,
        Some(Protocol::Http)
    );

    let wl = parsed[2].0.as_workload().unwrap();
    assert_eq!(wl.replicas, 2);
    assert_eq!(wl.port, 8080, "default port");
    assert_eq!(parsed[2].0.metadata.namespace, "default");

    let route = parsed[3].0.as_route().unwrap();
    assert_eq!(route.rules[0].backend_refs[1].weight, 10);
    assert_eq!(
        route.rules[0].matches[0].path.as_ref().unwrap().value,
        "/api"
    );
}

#[test]
fn misspelt_field_names_file_document_line_and_path() {
    let text = format!("{MESH}---\n{}", WORKLOAD.replace("replicas", "replicsa"));
    let err = parse_documents("apps.yaml", &text).unwrap_err();
    assert_eq!(err.errors.len(), 1);
    let e = &err.errors[0];
    assert_eq!(e.file, "apps.yaml");
    assert_eq!(e.document, 2);
    // Mesh is lines 1-4, `---` line 5, `replicsa:` is the 7th line after it.
    assert_eq!(e.line, Some(12));
    assert_eq!(e.field, "spec.replicsa");
    assert!(e.reason.contains("unknown field `replicsa`"), "{e}");
    assert!(
        e.reason.contains("`replicas`"),
        "suggests the real fields: {e}"
    );
    assert!(
        e.to_string()
            .starts_with("apps.yaml: document 2 (line 12): spec.replicsa: unknown field"),
        "{e}"
    );
}

#[test]
fn type_error_deep_in_a_route_has_the_full_path() {
    let text = ROUTE.replace("weight: 10", "weight: ten");
    let e = &parse_documents("r.yaml", &text).unwrap_err().errors[0];
    assert_eq!(e.field, "spec.rules[0].backendRefs[1].weight");
    assert_eq!(e.line, Some(20));
    assert_eq!(e.reason, "invalid type: string \"ten\", expected u32");
}

#[test]
fn every_bad_document_is_reported() {
    let bad_port = SERVICE.replace("port: 80", "port: x");
    let bad_kind = MESH.replace("kind: Mesh", "kind: Gateway");
    let text = format!("{bad_port}---\n{MESH}---\n{bad_kind}---\nkind: [\n");
    let err = parse_documents("f.yaml", &text).unwrap_err();
    let got: Vec<(usize, Option<usize>, &str)> = err
        .errors
        .iter()
        .map(|e| (e.document, e.line, e.field.as_str()))
        .collect();
    assert_eq!(
        got,
        [
            (1, Some(10), "spec.ports[0].port"),
            (3, Some(18), "kind"),
            // libyaml notices the unclosed `[` at the end of the input.
            (4, Some(24), ""),
        ]
    );
    assert!(err.errors[1]
        .reason
        .contains("Mesh, Service, Workload, HTTPRoute"));
    assert!(err.errors[2].reason.starts_with("invalid YAML"), "{err}");
    // Display: one error per line.
    assert_eq!(err.to_string().lines().count(), 3);
}

#[test]
fn wrong_api_version_and_unknown_top_level_field_point_at_the_field() {
    let text = format!(
        "{}---\n{MESH}status: {{}}\n",
        ROUTE.replace("gateway.networking.k8s.io/v1", "trellis.dev/v1alpha1")
    );
    let err = parse_documents("f.yaml", &text).unwrap_err();
    assert_eq!(err.errors[0].field, "apiVersion");
    assert_eq!(err.errors[0].line, Some(1));
    assert!(err.errors[0]
        .reason
        .contains("use `gateway.networking.k8s.io/v1`"));
    assert_eq!(err.errors[1].field, "status");
    assert!(err.errors[1].reason.contains("unknown field `status`"));
}

#[test]
fn duplicate_keys_in_a_document_are_errors() {
    let text = WORKLOAD.replace("  replicas: 2\n", "  replicas: 2\n  replicas: 3\n");
    let e = &parse_documents("w.yaml", &text).unwrap_err().errors[0];
    assert_eq!(e.field, "spec");
    assert!(
        e.reason.contains("duplicate entry with key \"replicas\""),
        "{e}"
    );
    // The YAML library points at the start of the mapping that repeats it.
    assert_eq!(e.line, Some(7));
}

#[test]
fn spec_before_kind_still_reports_exact_path_and_line() {
    let text = "spec:\n  ports:\n  - port: -1\nkind: Service\napiVersion: trellis.dev/v1alpha1\nmetadata: {name: s}\n";
    let e = &parse_documents("f.yaml", text).unwrap_err().errors[0];
    assert_eq!((e.field.as_str(), e.line), ("spec.ports[0].port", Some(3)));
}

#[test]
fn json_documents_and_arrays_are_accepted() {
    let resources = parse_documents("a.yaml", &all_four()).unwrap();
    let one = serde_json::to_string_pretty(&resources[1]).unwrap();
    assert_eq!(
        parse_documents("s.json", &one).unwrap(),
        vec![resources[1].clone()]
    );
    let many = serde_json::to_string(&resources).unwrap();
    assert_eq!(parse_documents("all.json", &many).unwrap(), resources);

    let bad = many.replace("\"weight\":10", "\"weight\":-10");
    let e = &parse_documents("all.json", &bad).unwrap_err().errors[0];
    assert_eq!(e.field, "[3].spec.rules[0].backendRefs[1].weight");
}

#[test]
fn empty_text_gives_no_resources() {
    assert_eq!(parse_documents("e.yaml", "").unwrap(), vec![]);
    assert_eq!(
        parse_documents("e.yaml", "---\n# nothing\n---\n...\n").unwrap(),
        vec![]
    );
}

#[test]
fn inline_document_after_separator() {
    let text = "--- {apiVersion: trellis.dev/v1alpha1, kind: Mesh, metadata: {name: default}}\n";
    assert_eq!(parse_documents("f.yaml", text).unwrap().len(), 1);
}

#[test]
fn yaml_round_trip_is_lossless() {
    let resources = parse_documents("a.yaml", &all_four()).unwrap();
    let yaml = to_yaml(&resources);
    assert_eq!(yaml.matches("\n---\n").count(), 3);
    assert_eq!(parse_documents("b.yaml", &yaml).unwrap(), resources);
    assert_eq!(to_yaml(&[]), "");
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

#[test]
fn folder_loads_yaml_and_json_files_in_name_order_not_recursively() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "b-route.yml", ROUTE);
    write(dir.path(), "a-mesh.yaml", &format!("{MESH}---\n{SERVICE}"));
    let wl = parse_documents("w", WORKLOAD).unwrap();
    write(
        dir.path(),
        "c-workload.json",
        &serde_json::to_string(&wl[0]).unwrap(),
    );
    write(dir.path(), "notes.txt", "not a resource");
    fs::create_dir(dir.path().join("sub")).unwrap();
    write(&dir.path().join("sub"), "x.yaml", "kind: Nope\n");

    let loaded = load_path_with_sources(dir.path()).unwrap();
    let kinds: Vec<Kind> = loaded.iter().map(|(r, _)| r.kind()).collect();
    assert_eq!(
        kinds,
        [Kind::Mesh, Kind::Service, Kind::HttpRoute, Kind::Workload]
    );
    assert!(loaded[1].1.file.ends_with("a-mesh.yaml"));
    assert_eq!(loaded[1].1.document, 2);
    assert!(loaded[3].1.file.ends_with("c-workload.json"));
    assert_eq!(load_path(dir.path()).unwrap().len(), 4);
}

#[test]
fn folder_reports_errors_from_every_file() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "1.yaml", &MESH.replace("name:", "nmae:"));
    write(dir.path(), "2.yaml", SERVICE);
    write(
        dir.path(),
        "3.yaml",
        &WORKLOAD.replace("replicas: 2", "replicas: many"),
    );
    let err = load_path(dir.path()).unwrap_err();
    assert_eq!(err.errors.len(), 2, "{err}");
    assert!(err.errors[0].file.ends_with("1.yaml"));
    assert_eq!(err.errors[0].field, "metadata.nmae");
    assert!(err.errors[1].file.ends_with("3.yaml"));
    assert_eq!(err.errors[1].field, "spec.replicas");
}

#[test]
fn empty_folder_or_no_resources_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let err = load_path(dir.path()).unwrap_err();
    assert!(
        err.to_string()
            .contains("has no .yaml, .yml or .json files"),
        "{err}"
    );

    let empty = write(dir.path(), "empty.yaml", "# nothing yet\n");
    for path in [dir.path(), empty.as_path()] {
        let err = load_path(path).unwrap_err();
        assert!(
            err.to_string()
                .contains("no resources found: add documents"),
            "{err}"
        );
    }
}

#[test]
fn missing_file_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nope.yaml");
    let err = load_path(&path).unwrap_err();
    let e = &err.errors[0];
    assert_eq!(e.file, path.display().to_string());
    assert!(
        e.to_string().contains("nope.yaml: no such file or folder"),
        "{e}"
    );
}

#[test]
fn single_file_is_read_whatever_its_extension() {
    let dir = tempfile::tempdir().unwrap();
    let p = write(dir.path(), "mesh.txt", MESH);
    assert_eq!(load_path(&p).unwrap().len(), 1);
}

#[test]
fn error_display_forms() {
    let mut e = ResourceError {
        file: "catalog.yaml".into(),
        document: 2,
        line: Some(14),
        field: "spec.ports[0].port".into(),
        reason: "invalid type: string \"x\", expected u16".into(),
    };
    assert_eq!(
        e.to_string(),
        "catalog.yaml: document 2 (line 14): spec.ports[0].port: invalid type: string \"x\", expected u16"
    );
    e.document = 0;
    e.line = None;
    e.field.clear();
    assert_eq!(
        e.to_string(),
        "catalog.yaml: invalid type: string \"x\", expected u16"
    );
    let json = serde_json::to_value(&e).unwrap();
    assert_eq!(json["document"], 0);
    assert!(json["line"].is_null());
}

#[test]
fn input_documents_and_nesting_have_limits() {
    let many = "{kind: Mesh}\n---\n".repeat(crate::limits::MAX_DOCUMENTS + 1);
    let e = parse_documents("many.yaml", &many).unwrap_err();
    assert!(
        e.errors[0].reason.contains("over the limit of 10000"),
        "{e}"
    );

    let big = " ".repeat(crate::limits::MAX_INPUT_BYTES + 1);
    let e = parse_documents("big.yaml", &big).unwrap_err();
    assert!(e.errors[0].reason.contains("16 MiB"), "{e}");

    let deep = format!(
        "kind: Service\n---\nkind: Service\nspec: {}1{}\n",
        "{\"a\":".repeat(100_000),
        "}".repeat(100_000)
    );
    let e = parse_documents("deep.yaml", &deep).unwrap_err();
    assert_eq!(e.errors.len(), 2, "{e}");
    let deep_error = &e.errors[1];
    assert_eq!((deep_error.document, deep_error.line), (2, Some(4)), "{e}");
    assert!(deep_error.reason.contains("nested deeper than 32"), "{e}");
    assert!(deep_error.reason.len() < 200, "{e}");
}

#[test]
fn serde_messages_never_echo_huge_input() {
    let value = "k".repeat(1 << 20);
    let doc = format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\nmetadata: {{name: s}}\n\
         spec: {{ports: [{{port: \"{value}\"}}]}}\n"
    );
    let e = parse_documents("huge.yaml", &doc).unwrap_err();
    let text = e.to_string();
    assert!(text.len() < 1500, "{} bytes", text.len());
    assert!(
        text.contains("(1048576 bytes)"),
        "{}",
        &text[..text.len().min(300)]
    );
}
