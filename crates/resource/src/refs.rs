//! What routes and policies refer to: a route's parentRefs, backendRefs and
//! mirror backendRefs, a policy's targetRef, and whether each names a core
//! Service (in mesh, GAMMA, form they all do).
//!
//! Validation (apply and delete) and the control plane's index and config
//! building read references only through this module, so they agree on
//! what a route references and on a reference's namespace.

use crate::types::*;

/// The group and kind of a reference name a core Service: omitted, or the
/// core group (`""`, `core`) and kind `Service`.
pub fn names_service(group: Option<&str>, kind: Option<&str>) -> bool {
    matches!(group, None | Some("" | "core")) && matches!(kind, None | Some("Service"))
}

/// One reference, of any of the kinds of ref.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ObjectRef<'a> {
    pub group: Option<&'a str>,
    pub kind: Option<&'a str>,
    pub name: &'a str,
    pub namespace: Option<&'a str>,
    pub port: Option<u16>,
}

impl<'a> ObjectRef<'a> {
    /// Whether it names a core Service.
    pub fn is_service(&self) -> bool {
        names_service(self.group, self.kind)
    }

    /// Its namespace: a reference without one means its resource's own.
    pub fn namespace_or(&self, own: &'a str) -> &'a str {
        self.namespace.unwrap_or(own)
    }
}

/// The three route reference types share the Gateway API's field set.
macro_rules! object_ref {
    ($($t:ty),*) => {$(
        impl $t {
            pub fn as_object_ref(&self) -> ObjectRef<'_> {
                ObjectRef {
                    group: self.group.as_deref(),
                    kind: self.kind.as_deref(),
                    name: &self.name,
                    namespace: self.namespace.as_deref(),
                    port: self.port,
                }
            }
        }
    )*};
}

object_ref!(ParentRef, BackendRef, MirrorBackendRef);

impl TargetRef {
    /// A policy's target is always in the policy's namespace.
    pub fn as_object_ref(&self) -> ObjectRef<'_> {
        ObjectRef {
            group: self.group.as_deref(),
            kind: self.kind.as_deref(),
            name: &self.name,
            namespace: None,
            port: None,
        }
    }
}

/// Where a reference stands in its route's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefPlace {
    Parent(usize),
    Backend {
        rule: usize,
        backend: usize,
    },
    /// A RequestMirror filter of a rule.
    RuleMirror {
        rule: usize,
        filter: usize,
    },
    /// A RequestMirror filter of a rule's backendRef.
    BackendMirror {
        rule: usize,
        backend: usize,
        filter: usize,
    },
}

impl RefPlace {
    /// The field path, as validation errors name it.
    pub fn field(&self) -> String {
        match *self {
            RefPlace::Parent(i) => format!("spec.parentRefs[{i}]"),
            RefPlace::Backend { rule, backend } => {
                format!("spec.rules[{rule}].backendRefs[{backend}]")
            }
            RefPlace::RuleMirror { rule, filter } => {
                format!("spec.rules[{rule}].filters[{filter}].requestMirror.backendRef")
            }
            RefPlace::BackendMirror {
                rule,
                backend,
                filter,
            } => format!(
                "spec.rules[{rule}].backendRefs[{backend}].filters[{filter}].requestMirror.backendRef"
            ),
        }
    }

    /// A parentRef: the Service whose traffic the route steers. Every other
    /// reference is one the route sends requests to.
    pub fn is_parent(&self) -> bool {
        matches!(self, RefPlace::Parent(_))
    }
}

/// A reference of a route, and where it stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRef<'a> {
    pub place: RefPlace,
    pub target: ObjectRef<'a>,
}

/// Every reference of a route: its parentRefs, then rule by rule its
/// backendRefs, its rule's mirrors and its backendRefs' mirrors.
fn refs_of<'a>(
    parents: &'a [ParentRef],
    rules: impl Iterator<Item = (&'a [RouteFilter], &'a [BackendRef])>,
) -> Vec<RouteRef<'a>> {
    let mut out: Vec<RouteRef<'a>> = parents
        .iter()
        .enumerate()
        .map(|(i, p)| RouteRef {
            place: RefPlace::Parent(i),
            target: p.as_object_ref(),
        })
        .collect();
    for (rule, (filters, backends)) in rules.enumerate() {
        for (backend, b) in backends.iter().enumerate() {
            out.push(RouteRef {
                place: RefPlace::Backend { rule, backend },
                target: b.as_object_ref(),
            });
        }
        for (filter, m) in mirrors(filters) {
            out.push(RouteRef {
                place: RefPlace::RuleMirror { rule, filter },
                target: m.backend_ref.as_object_ref(),
            });
        }
        for (backend, b) in backends.iter().enumerate() {
            for (filter, m) in mirrors(&b.filters) {
                out.push(RouteRef {
                    place: RefPlace::BackendMirror {
                        rule,
                        backend,
                        filter,
                    },
                    target: m.backend_ref.as_object_ref(),
                });
            }
        }
    }
    out
}

fn mirrors(filters: &[RouteFilter]) -> impl Iterator<Item = (usize, &RequestMirror)> {
    filters
        .iter()
        .enumerate()
        .filter_map(|(i, f)| Some((i, f.request_mirror.as_ref()?)))
}

impl HttpRouteSpec {
    /// Every reference of the route (see `RouteRef`).
    pub fn refs(&self) -> Vec<RouteRef<'_>> {
        refs_of(
            &self.parent_refs,
            self.rules
                .iter()
                .map(|r| (r.filters.as_slice(), r.backend_refs.as_slice())),
        )
    }
}

impl GrpcRouteSpec {
    /// Every reference of the route (see `RouteRef`).
    pub fn refs(&self) -> Vec<RouteRef<'_>> {
        refs_of(
            &self.parent_refs,
            self.rules
                .iter()
                .map(|r| (r.filters.as_slice(), r.backend_refs.as_slice())),
        )
    }
}

/// A Service as `(namespace, name)`.
pub type ServiceRefKey<'a> = (&'a str, &'a str);

impl Resource {
    /// Every reference of an HTTPRoute or GRPCRoute; none for other kinds.
    pub fn route_refs(&self) -> Vec<RouteRef<'_>> {
        match &self.spec {
            Spec::HttpRoute(r) => r.refs(),
            Spec::GrpcRoute(r) => r.refs(),
            _ => Vec::new(),
        }
    }

    /// The Services a route is attached to: its parentRefs that name one.
    /// In order, and each once.
    pub fn parent_services(&self) -> Vec<ServiceRefKey<'_>> {
        self.referenced_services(true)
    }

    /// The Services a route sends requests to: its backendRefs and
    /// RequestMirror backendRefs that name one. In order, and each once.
    pub fn backend_services(&self) -> Vec<ServiceRefKey<'_>> {
        self.referenced_services(false)
    }

    fn referenced_services(&self, parents: bool) -> Vec<ServiceRefKey<'_>> {
        let own = self.metadata.namespace.as_str();
        let mut out: Vec<ServiceRefKey<'_>> = Vec::new();
        for r in self.route_refs() {
            if r.place.is_parent() != parents || !r.target.is_service() {
                continue;
            }
            let key = (r.target.namespace_or(own), r.target.name);
            if !out.contains(&key) {
                out.push(key);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse_documents;

    fn one(yaml: &str) -> Resource {
        parse_documents("t.yaml", yaml).unwrap().remove(0)
    }

    const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: shop}
spec:
  parentRefs:
  - {name: catalog}
  - {name: catalog, port: 80}
  - {name: gw, group: gateway.networking.k8s.io, kind: Gateway}
  - {name: other, namespace: default, group: core, kind: Service}
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}
    backendRefs:
    - name: v1
      filters:
      - {type: RequestMirror, requestMirror: {backendRef: {name: shadow2, namespace: x}}}
    - {name: v2, namespace: default, group: ""}
  - backendRefs: [{name: v1}, {name: bucket, group: example.com, kind: Bucket}]
"#;

    #[test]
    fn group_and_kind_name_a_service_only_in_core_form() {
        assert!(names_service(None, None));
        assert!(names_service(Some(""), Some("Service")));
        assert!(names_service(Some("core"), None));
        assert!(!names_service(Some("gateway.networking.k8s.io"), None));
        assert!(!names_service(None, Some("Gateway")));
        assert!(!names_service(Some("core"), Some("service")));
    }

    #[test]
    fn route_refs_list_every_reference_with_its_field() {
        let r = one(ROUTE);
        let fields: Vec<String> = r.route_refs().iter().map(|r| r.place.field()).collect();
        assert_eq!(
            fields,
            [
                "spec.parentRefs[0]",
                "spec.parentRefs[1]",
                "spec.parentRefs[2]",
                "spec.parentRefs[3]",
                "spec.rules[0].backendRefs[0]",
                "spec.rules[0].backendRefs[1]",
                "spec.rules[0].filters[0].requestMirror.backendRef",
                "spec.rules[0].backendRefs[0].filters[0].requestMirror.backendRef",
                "spec.rules[1].backendRefs[0]",
                "spec.rules[1].backendRefs[1]",
            ]
        );
    }

    #[test]
    fn services_resolve_namespaces_skip_other_kinds_and_repeat_once() {
        let r = one(ROUTE);
        assert_eq!(
            r.parent_services(),
            [("shop", "catalog"), ("default", "other")]
        );
        assert_eq!(
            r.backend_services(),
            [
                ("shop", "v1"),
                ("default", "v2"),
                ("shop", "shadow"),
                ("x", "shadow2")
            ]
        );
    }

    #[test]
    fn grpc_routes_have_the_same_references() {
        let r = one(r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: greeter}]
  rules:
  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow}}}]
    backendRefs: [{name: greeter-v2}]
"#);
        assert_eq!(r.parent_services(), [("default", "greeter")]);
        assert_eq!(
            r.backend_services(),
            [("default", "greeter-v2"), ("default", "shadow")]
        );
    }

    #[test]
    fn other_kinds_reference_nothing() {
        let svc = one(r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: s}
spec: {selector: {app: s}}
"#);
        assert!(svc.route_refs().is_empty());
        assert!(svc.parent_services().is_empty());
    }
}
