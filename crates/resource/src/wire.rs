//! The Kubernetes envelope of a resource: `{apiVersion, kind, metadata,
//! spec}` on the wire, `Resource { metadata, spec: Spec }` in memory.
//!
//! Deserialization is hand-written because the type of `spec` depends on
//! `kind`, and serde's internally tagged enums buffer the whole document,
//! which loses the field path and line of every error inside `spec`.
//! Streaming with a kind known up front keeps both: [`ResourceSeed`] takes
//! the kind as a hint (the loader reads it in a first pass), so `spec` may
//! come before `kind` in the document and still be reported precisely.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, Visitor};
use serde::ser::SerializeStruct;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::types::{Kind, MeshSpec, Metadata, Resource, Spec};

const FIELDS: &[&str] = &["apiVersion", "kind", "metadata", "spec"];

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let kind = self.kind();
        let mut s = serializer.serialize_struct("Resource", 4)?;
        s.serialize_field("apiVersion", kind.api_version())?;
        s.serialize_field("kind", kind.as_str())?;
        s.serialize_field("metadata", &self.metadata)?;
        match &self.spec {
            Spec::Mesh(spec) => s.serialize_field("spec", spec)?,
            Spec::Service(spec) => s.serialize_field("spec", spec)?,
            Spec::Workload(spec) => s.serialize_field("spec", spec)?,
            Spec::HttpRoute(spec) => s.serialize_field("spec", spec)?,
            Spec::GrpcRoute(spec) => s.serialize_field("spec", spec)?,
            Spec::TrafficPolicy(spec) => s.serialize_field("spec", spec)?,
            Spec::AuthorizationPolicy(spec) => s.serialize_field("spec", spec)?,
        }
        s.end()
    }
}

impl<'de> Deserialize<'de> for Resource {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ResourceSeed::default().deserialize(deserializer)
    }
}

/// Deserializes a [`Resource`], optionally told its kind in advance.
///
/// With a hint, a `spec` that precedes `kind` is still read in one pass
/// (exact paths and lines); without one it is buffered and its errors name
/// the path in the message instead. A hint that contradicts the document's
/// own `kind` is ignored in favour of the document.
#[derive(Clone, Copy, Debug, Default)]
pub struct ResourceSeed {
    pub kind_hint: Option<Kind>,
}

impl<'de> DeserializeSeed<'de> for ResourceSeed {
    type Value = Resource;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Resource, D::Error> {
        deserializer.deserialize_struct(
            "Resource",
            FIELDS,
            ResourceVisitor {
                hint: self.kind_hint,
            },
        )
    }
}

/// Names the kinds Trellis knows, for error messages.
pub(crate) fn known_kinds() -> String {
    Kind::ALL
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn kind_from_str(s: &str) -> Option<Kind> {
    Kind::ALL.into_iter().find(|k| k.as_str() == s)
}

fn wrong_api_version(kind: Kind, found: &str) -> String {
    format!(
        "apiVersion `{found}` is wrong for kind {kind}: use `{}`",
        kind.api_version()
    )
}

enum Field {
    ApiVersion,
    Kind,
    Metadata,
    Spec,
}

/// Reads a top-level key, refusing unknown ones while the key is being
/// read, so the error's path names the offending key (as derived structs do).
struct FieldSeed;

impl<'de> DeserializeSeed<'de> for FieldSeed {
    type Value = Field;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Field, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for FieldSeed {
    type Value = Field;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("one of `apiVersion`, `kind`, `metadata`, `spec`")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Field, E> {
        match v {
            "apiVersion" => Ok(Field::ApiVersion),
            "kind" => Ok(Field::Kind),
            "metadata" => Ok(Field::Metadata),
            "spec" => Ok(Field::Spec),
            other => Err(E::unknown_field(other, FIELDS)),
        }
    }
}

/// Reads `apiVersion`, checking it against the kind when that is known, so
/// the error points at `apiVersion` rather than the whole document.
struct ApiVersionSeed(Option<Kind>);

impl<'de> DeserializeSeed<'de> for ApiVersionSeed {
    type Value = String;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let v = String::deserialize(deserializer)?;
        match self.0 {
            Some(kind) if v != kind.api_version() => Err(de::Error::custom(format!(
                "`{v}` is wrong for kind {kind}: use `{}`",
                kind.api_version()
            ))),
            _ => Ok(v),
        }
    }
}

struct KindSeed;

impl<'de> DeserializeSeed<'de> for KindSeed {
    type Value = Kind;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Kind, D::Error> {
        let v = String::deserialize(deserializer)?;
        kind_from_str(&v).ok_or_else(|| {
            de::Error::custom(format!(
                "`{v}` is not a kind Trellis knows: use one of {}",
                known_kinds()
            ))
        })
    }
}

/// Reads a `spec` of a known kind. A Mesh's spec may be null (`spec:` with
/// nothing under it), meaning all defaults.
struct SpecSeed(Kind);

impl<'de> DeserializeSeed<'de> for SpecSeed {
    type Value = Spec;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Spec, D::Error> {
        Ok(match self.0 {
            Kind::Mesh => {
                Spec::Mesh(Option::<MeshSpec>::deserialize(deserializer)?.unwrap_or_default())
            }
            Kind::Service => Spec::Service(Deserialize::deserialize(deserializer)?),
            Kind::Workload => Spec::Workload(Deserialize::deserialize(deserializer)?),
            Kind::HttpRoute => Spec::HttpRoute(Deserialize::deserialize(deserializer)?),
            Kind::GrpcRoute => Spec::GrpcRoute(Deserialize::deserialize(deserializer)?),
            Kind::TrafficPolicy => Spec::TrafficPolicy(Deserialize::deserialize(deserializer)?),
            Kind::AuthorizationPolicy => {
                Spec::AuthorizationPolicy(Deserialize::deserialize(deserializer)?)
            }
        })
    }
}

struct ResourceVisitor {
    hint: Option<Kind>,
}

impl<'de> Visitor<'de> for ResourceVisitor {
    type Value = Resource;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a resource with apiVersion, kind, metadata and spec")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Resource, A::Error> {
        let mut api_version: Option<String> = None;
        let mut kind: Option<Kind> = None;
        let mut metadata: Option<Metadata> = None;
        let mut spec: Option<Spec> = None;
        let mut buffered_spec: Option<serde_json::Value> = None;
        let mut spec_seen = false;

        while let Some(field) = map.next_key_seed(FieldSeed)? {
            match field {
                Field::ApiVersion => {
                    if api_version.is_some() {
                        return Err(de::Error::duplicate_field("apiVersion"));
                    }
                    api_version = Some(map.next_value_seed(ApiVersionSeed(kind.or(self.hint)))?);
                }
                Field::Kind => {
                    if kind.is_some() {
                        return Err(de::Error::duplicate_field("kind"));
                    }
                    kind = Some(map.next_value_seed(KindSeed)?);
                }
                Field::Metadata => {
                    if metadata.is_some() {
                        return Err(de::Error::duplicate_field("metadata"));
                    }
                    metadata = Some(map.next_value()?);
                }
                Field::Spec => {
                    if spec_seen {
                        return Err(de::Error::duplicate_field("spec"));
                    }
                    spec_seen = true;
                    match kind.or(self.hint) {
                        Some(k) => spec = Some(map.next_value_seed(SpecSeed(k))?),
                        None => buffered_spec = Some(map.next_value()?),
                    }
                }
            }
        }

        let kind = kind.ok_or_else(|| {
            de::Error::custom(format!(
                "missing field `kind`: set it to one of {}",
                known_kinds()
            ))
        })?;
        let api_version = api_version.ok_or_else(|| {
            de::Error::custom(format!(
                "missing field `apiVersion`: {kind} uses `{}`",
                kind.api_version()
            ))
        })?;
        if api_version != kind.api_version() {
            return Err(de::Error::custom(wrong_api_version(kind, &api_version)));
        }
        let metadata = metadata.ok_or_else(|| de::Error::missing_field("metadata"))?;

        let spec = match (spec, buffered_spec) {
            // A hint that disagreed with the real kind read the wrong type.
            (Some(s), _) if s.kind() == kind => s,
            (Some(_), _) => {
                return Err(de::Error::custom(
                    "spec was read for a different kind than the document's `kind`",
                ))
            }
            (None, Some(value)) => {
                let mut track = serde_path_to_error::Track::new();
                let de = serde_path_to_error::Deserializer::new(value, &mut track);
                SpecSeed(kind).deserialize(de).map_err(|e| {
                    let path = track.path().to_string();
                    let at = if path.is_empty() {
                        "spec".to_string()
                    } else {
                        format!("spec.{path}")
                    };
                    de::Error::custom(format!("{at}: {e}"))
                })?
            }
            (None, None) if kind == Kind::Mesh => Spec::Mesh(MeshSpec::default()),
            (None, None) => return Err(de::Error::missing_field("spec")),
        };

        Ok(Resource { metadata, spec })
    }
}

#[cfg(test)]
mod tests {
    use crate::types::*;

    fn route() -> Resource {
        Resource {
            metadata: Metadata {
                name: "catalog-split".into(),
                namespace: "shop".into(),
                labels: [("app".to_string(), "catalog".to_string())].into(),
                annotations: Default::default(),
            },
            spec: Spec::HttpRoute(HttpRouteSpec {
                parent_refs: vec![ParentRef {
                    group: Some(String::new()),
                    kind: Some("Service".into()),
                    name: "catalog".into(),
                    namespace: None,
                    port: Some(80),
                    section_name: None,
                }],
                hostnames: vec![],
                rules: vec![RouteRule {
                    matches: vec![RouteMatch {
                        path: Some(PathMatch {
                            match_type: PathMatchType::PathPrefix,
                            value: "/api".into(),
                        }),
                        method: Some("GET".into()),
                        ..Default::default()
                    }],
                    backend_refs: vec![BackendRef {
                        group: None,
                        kind: None,
                        name: "catalog-v1".into(),
                        namespace: None,
                        port: Some(8080),
                        weight: 90,
                        filters: vec![],
                    }],
                    timeouts: Some(RouteTimeouts {
                        request: Some("10s".into()),
                        backend_request: None,
                    }),
                    ..Default::default()
                }],
            }),
        }
    }

    fn mesh() -> Resource {
        Resource {
            metadata: Metadata {
                name: "default".into(),
                namespace: "default".into(),
                labels: Default::default(),
                annotations: Default::default(),
            },
            spec: Spec::Mesh(MeshSpec {
                tracing: Some(TracingSpec {
                    sampling: 0.25,
                    otlp_endpoint: Some("http://127.0.0.1:4317".into()),
                    otlp_protocol: None,
                }),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn json_round_trip_is_lossless() {
        let all = vec![route(), mesh()];
        let json = serde_json::to_string(&all).unwrap();
        let back: Vec<Resource> = serde_json::from_str(&json).unwrap();
        assert_eq!(back, all);
        let v: serde_json::Value = serde_json::to_value(route()).unwrap();
        assert_eq!(v["apiVersion"], API_GATEWAY);
        assert_eq!(v["kind"], "HTTPRoute");
        assert_eq!(
            serde_json::to_value(mesh()).unwrap()["apiVersion"],
            API_TRELLIS
        );
    }

    #[test]
    fn wrong_api_version_names_the_expected_one() {
        for doc in [
            r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"HTTPRoute","metadata":{"name":"r"},"spec":{}}"#,
            r#"{"kind":"HTTPRoute","apiVersion":"trellis.dev/v1alpha1","metadata":{"name":"r"},"spec":{}}"#,
        ] {
            let err = serde_json::from_str::<Resource>(doc)
                .unwrap_err()
                .to_string();
            assert!(err.contains("gateway.networking.k8s.io/v1"), "{err}");
        }
        let err = serde_json::from_str::<Resource>(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"s"},"spec":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("trellis.dev/v1alpha1"), "{err}");
    }

    #[test]
    fn unknown_kind_lists_known_kinds() {
        let err = serde_json::from_str::<Resource>(
            r#"{"apiVersion":"v1","kind":"Deployment","metadata":{"name":"x"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("Deployment"), "{err}");
        assert!(err.contains("Mesh, Service, Workload, HTTPRoute"), "{err}");
    }

    #[test]
    fn unknown_top_level_field_is_an_error() {
        let err = serde_json::from_str::<Resource>(
            r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"Mesh","metadata":{"name":"default"},"status":{}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `status`"), "{err}");
    }

    #[test]
    fn mesh_spec_may_be_omitted_or_null_but_others_may_not() {
        for doc in [
            r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"Mesh","metadata":{"name":"default"}}"#,
            r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"Mesh","metadata":{"name":"default"},"spec":null}"#,
        ] {
            let r: Resource = serde_json::from_str(doc).unwrap();
            assert_eq!(r.spec, Spec::Mesh(MeshSpec::default()));
        }
        let err = serde_json::from_str::<Resource>(
            r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"Service","metadata":{"name":"s"}}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing field `spec`"), "{err}");
    }

    #[test]
    fn spec_before_kind_still_parses_and_reports_paths() {
        let ok = r#"{"spec":{"ports":[{"port":80}]},"metadata":{"name":"s"},"kind":"Service","apiVersion":"trellis.dev/v1alpha1"}"#;
        let r: Resource = serde_json::from_str(ok).unwrap();
        assert_eq!(r.as_service().unwrap().ports[0].port, 80);

        let bad = r#"{"spec":{"ports":[{"port":"x"}]},"metadata":{"name":"s"},"kind":"Service","apiVersion":"trellis.dev/v1alpha1"}"#;
        let err = serde_json::from_str::<Resource>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("spec.ports[0].port"), "{err}");
    }

    /// Configs carry resources as this JSON and are hashed whole, so equal
    /// resources must give equal bytes: struct fields go in declaration
    /// order and every map of the model must be ordered (a HashMap here
    /// would write its keys in a per-process order).
    #[test]
    fn json_is_canonical_whatever_order_the_input_had() {
        let map = |order: &mut dyn Iterator<Item = u32>| {
            order
                .map(|i| format!("k{i:02}: v{i}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let docs = |order: fn() -> Box<dyn Iterator<Item = u32>>| {
            format!(
                "kind: Workload\napiVersion: trellis.dev/v1alpha1\n\
                 metadata: {{name: w, labels: {{{}}}, annotations: {{{}}}}}\n\
                 spec: {{env: {{{}}}, command: [x], port: 8080}}\n---\n\
                 spec: {{selector: {{{}}}}}\nmetadata: {{name: s}}\n\
                 apiVersion: trellis.dev/v1alpha1\nkind: Service\n",
                map(&mut order()),
                map(&mut order()),
                map(&mut order()),
                map(&mut order()),
            )
        };
        let json = |yaml: &str| -> Vec<String> {
            crate::parse_documents("t.yaml", yaml)
                .unwrap()
                .iter()
                .map(|r| serde_json::to_string(r).unwrap())
                .collect()
        };
        let forward = json(&docs(|| Box::new(0..16)));
        let backward = json(&docs(|| Box::new((0..16).rev())));
        assert_eq!(forward, backward);
        for j in &forward {
            let again: Resource = serde_json::from_str(j).unwrap();
            assert_eq!(&serde_json::to_string(&again).unwrap(), j);
        }
    }
}
