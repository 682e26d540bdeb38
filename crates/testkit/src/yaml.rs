//! Resource YAML that many tests apply: a Service selecting `app: NAME`,
//! and the Mesh. Tests join documents with `---`.

/// A Service `name` in `default` on port 8080 selecting `app: name`.
pub fn service(name: &str) -> String {
    service_in("default", name)
}

/// [`service`] in `namespace`.
pub fn service_in(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: trellis.dev/v1alpha1\nkind: Service\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  selector: {{app: {name}}}\n  ports: [{{name: http, port: 8080}}]\n"
    )
}

/// The Mesh with `spec` as its spec, in flow form (`{mtls: permissive}`)
/// or as lines indented by two (`  mtls: permissive`).
pub fn mesh(spec: &str) -> String {
    let spec = spec.trim_start_matches('\n');
    let sep = if spec.starts_with('{') { " " } else { "\n" };
    format!("apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: {{name: default}}\nspec:{sep}{spec}\n")
}

#[cfg(test)]
mod tests {
    use trellis_resource::{parse_documents, MtlsMode};

    #[test]
    fn the_documents_load_as_the_resources_they_name() {
        let text = format!(
            "{}---\n{}---\n{}",
            super::service_in("prod", "api"),
            super::mesh("{mtls: permissive}"),
            super::mesh("  tracing: {sampling: 1.0}\n  mtls: disabled"),
        );
        let r = parse_documents("test.yaml", &text).unwrap();
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].metadata.namespace, "prod");
        assert_eq!(r[0].metadata.name, "api");
        let svc = r[0].as_service().unwrap();
        assert_eq!(svc.selector.get("app").map(String::as_str), Some("api"));
        assert_eq!(svc.ports[0].port, 8080);
        assert_eq!(r[1].as_mesh().unwrap().mtls, MtlsMode::Permissive);
        let block = r[2].as_mesh().unwrap();
        assert!(block.tracing.is_some());
        assert_eq!(block.mtls, MtlsMode::Disabled);
    }
}
