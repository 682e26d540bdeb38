//! The resource types, in their Kubernetes form.
//!
//! Every struct denies unknown fields: a misspelt field is an error, never
//! silently ignored.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

pub const API_TRELLIS: &str = "trellis.dev/v1alpha1";
pub const API_GATEWAY: &str = "gateway.networking.k8s.io/v1";
pub const DEFAULT_NAMESPACE: &str = "default";

/// The kinds Trellis knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Kind {
    Mesh,
    Service,
    Workload,
    #[serde(rename = "HTTPRoute")]
    HttpRoute,
    #[serde(rename = "GRPCRoute")]
    GrpcRoute,
    TrafficPolicy,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Mesh,
        Kind::Service,
        Kind::Workload,
        Kind::HttpRoute,
        Kind::GrpcRoute,
        Kind::TrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Mesh => "Mesh",
            Kind::Service => "Service",
            Kind::Workload => "Workload",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::TrafficPolicy => "TrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// The apiVersion this kind is written with.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::HttpRoute | Kind::GrpcRoute => API_GATEWAY,
            _ => API_TRELLIS,
        }
    }

    /// Whether resources of this kind live in a namespace.
    pub fn namespaced(self) -> bool {
        !matches!(self, Kind::Mesh)
    }

    /// Parses a kind as users type it on the command line: any case,
    /// singular, plural or short name (`svc`, `route`).
    pub fn parse_loose(s: &str) -> Option<Kind> {
        match s.to_ascii_lowercase().as_str() {
            "mesh" | "meshes" => Some(Kind::Mesh),
            "service" | "services" | "svc" => Some(Kind::Service),
            "workload" | "workloads" | "wl" => Some(Kind::Workload),
            "httproute" | "httproutes" | "route" | "routes" => Some(Kind::HttpRoute),
            "grpcroute" | "grpcroutes" => Some(Kind::GrpcRoute),
            "trafficpolicy" | "trafficpolicies" | "tp" => Some(Kind::TrafficPolicy),
            "authorizationpolicy" | "authorizationpolicies" | "authz" | "ap" => {
                Some(Kind::AuthorizationPolicy)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

fn default_namespace() -> String {
    DEFAULT_NAMESPACE.to_string()
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// One resource: `apiVersion`, `kind`, `metadata` and a typed `spec`.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    pub metadata: Metadata,
    pub spec: Spec,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Spec {
    Mesh(MeshSpec),
    Service(ServiceSpec),
    Workload(WorkloadSpec),
    HttpRoute(HttpRouteSpec),
    GrpcRoute(GrpcRouteSpec),
    TrafficPolicy(TrafficPolicySpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
}

impl Spec {
    pub fn kind(&self) -> Kind {
        match self {
            Spec::Mesh(_) => Kind::Mesh,
            Spec::Service(_) => Kind::Service,
            Spec::Workload(_) => Kind::Workload,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::GrpcRoute(_) => Kind::GrpcRoute,
            Spec::TrafficPolicy(_) => Kind::TrafficPolicy,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }
}

/// Identifies a resource in the store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceKey {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.kind.namespaced() {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        } else {
            write!(f, "{} {}", self.kind, self.name)
        }
    }
}

impl Resource {
    pub fn kind(&self) -> Kind {
        self.spec.kind()
    }

    pub fn key(&self) -> ResourceKey {
        let namespace = if self.kind().namespaced() {
            self.metadata.namespace.clone()
        } else {
            String::new()
        };
        ResourceKey {
            kind: self.kind(),
            namespace,
            name: self.metadata.name.clone(),
        }
    }

    pub fn as_service(&self) -> Option<&ServiceSpec> {
        match &self.spec {
            Spec::Service(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_workload(&self) -> Option<&WorkloadSpec> {
        match &self.spec {
            Spec::Workload(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_route(&self) -> Option<&HttpRouteSpec> {
        match &self.spec {
            Spec::HttpRoute(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_mesh(&self) -> Option<&MeshSpec> {
        match &self.spec {
            Spec::Mesh(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_grpc_route(&self) -> Option<&GrpcRouteSpec> {
        match &self.spec {
            Spec::GrpcRoute(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_traffic_policy(&self) -> Option<&TrafficPolicySpec> {
        match &self.spec {
            Spec::TrafficPolicy(s) => Some(s),
            _ => None,
        }
    }
}

// ---------------------------------------------------------------- Mesh

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MeshSpec {
    #[serde(default = "default_trust_domain")]
    #[cfg_attr(
        feature = "schema",
        schemars(pattern(crate::schema::DNS_SUBDOMAIN), length(max = 253))
    )]
    pub trust_domain: String,
    #[serde(default)]
    pub mtls: MtlsMode,
    #[serde(default)]
    pub default_policy: DefaultPolicy,
    #[serde(default = "default_ttl", rename = "certificateTTL")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub certificate_ttl: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<TracingSpec>,
    /// Where every proxy writes JSON access log lines; omitted: nowhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLogSpec>,
}

impl Default for MeshSpec {
    fn default() -> Self {
        MeshSpec {
            trust_domain: default_trust_domain(),
            mtls: MtlsMode::default(),
            default_policy: DefaultPolicy::default(),
            certificate_ttl: default_ttl(),
            tracing: None,
            access_log: None,
        }
    }
}

fn default_trust_domain() -> String {
    "trellis.local".to_string()
}

fn default_ttl() -> String {
    "24h".to_string()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[default]
    Strict,
    Permissive,
    Disabled,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum DefaultPolicy {
    #[default]
    Allow,
    Deny,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TracingSpec {
    /// Share of new traces that are sampled, 0.0 to 1.0 (default 0.01).
    /// A caller's own decision (the sampled flag it sends) always wins.
    #[serde(default = "default_sampling")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 1.0)))]
    pub sampling: f64,
    /// Where proxies export spans (`http://host:4317` for OTLP/gRPC,
    /// `http://host:4318/v1/traces` for OTLP/HTTP); omitted: the control
    /// plane's embedded receiver.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::HTTP_URL)))]
    pub otlp_endpoint: Option<String>,
    /// `grpc` or `http/protobuf`; omitted: `http/protobuf` when the
    /// endpoint's path ends in `/v1/traces` or its port is 4318, else `grpc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_protocol: Option<OtlpProtocol>,
}

impl TracingSpec {
    /// The sampling share when the Mesh says nothing about it.
    pub const DEFAULT_SAMPLING: f64 = 0.01;
}

fn default_sampling() -> f64 {
    TracingSpec::DEFAULT_SAMPLING
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

/// `accessLog: {stdout: true}` or `accessLog: {path: FILE}`; `{workload}`
/// and `{instance}` in the path are replaced by the proxy's own.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AccessLogSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdout: bool,
}

// ---------------------------------------------------------------- Service

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    #[serde(default)]
    pub ports: Vec<ServicePort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub port: u16,
    /// The workload's port; omitted: the workload's own `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u16>,
    /// Omitted: detected per connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Tcp,
}

// ---------------------------------------------------------------- Workload

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WorkloadSpec {
    #[serde(default = "one")]
    pub replicas: u32,
    /// Omitted: the `app` label, else the workload's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
    /// The program and its arguments. `${PORT}` is expanded.
    pub command: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// The port the app listens on; in process mode each replica gets a free
    /// port instead, in `$PORT`.
    #[serde(default = "default_app_port")]
    pub port: u16,
}

fn one() -> u32 {
    1
}

fn default_app_port() -> u16 {
    8080
}

// ---------------------------------------------------------------- HTTPRoute

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<RouteRule>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ParentRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<RouteMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<RouteTimeouts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<RouteRetry>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathMatch {
    #[serde(default, rename = "type")]
    pub match_type: PathMatchType,
    #[serde(default = "root_path")]
    pub value: String,
}

fn root_path() -> String {
    "/".to_string()
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PathMatchType {
    Exact,
    #[default]
    PathPrefix,
    RegularExpression,
}

/// A header or query parameter match.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub match_type: ValueMatchType,
    pub name: String,
    pub value: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ValueMatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default = "one")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
}

/// A Gateway API filter: `type` names it, and the field of that name holds
/// its settings (`type: RequestRedirect` with `requestRedirect: {...}`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteFilter {
    #[serde(rename = "type")]
    pub filter_type: FilterType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RequestRedirect>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewrite>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<RequestMirror>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum FilterType {
    RequestHeaderModifier,
    ResponseHeaderModifier,
    RequestRedirect,
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    RequestMirror,
}

/// Answers the request with a redirect instead of forwarding it. Omitted
/// parts keep the request's own.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestRedirect {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// 301, 302 (default), 303, 307 or 308.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u16>,
}

/// Rewrites the request before it is forwarded.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UrlRewrite {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PathModifier {
    #[serde(rename = "type")]
    pub modifier_type: PathModifierType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// Replaces the part of the path that a `PathPrefix` match matched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PathModifierType {
    ReplaceFullPath,
    ReplacePrefixMatch,
}

/// Sends a copy of matching requests to another Service, fire and forget:
/// its answers are dropped and never delay or change the primary's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RequestMirror {
    pub backend_ref: MirrorBackendRef,
    /// Share of matching requests mirrored, 0 to 100 (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// The share as a fraction, for shares below 1%; not with `percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MirrorBackendRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: u32,
    #[serde(default = "hundred")]
    pub denominator: u32,
}

fn hundred() -> u32 {
    100
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderModifier {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteTimeouts {
    /// Whole request, retries included (Gateway API duration, e.g. `10s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Each try to a backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteRetry {
    /// Status codes that are retried (idempotent requests only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub codes: Vec<u16>,
    /// Retries after the first try.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

// ---------------------------------------------------------------- policy targets

/// The Service a policy applies to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TargetRef {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
}

// ---------------------------------------------------------------- GRPCRoute

/// Gateway API `GRPCRoute` in mesh form: `parentRefs` name a Service, and
/// rules match gRPC service and method names and headers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match; none matches every gRPC request.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<GrpcRouteMatch>,
    /// RequestHeaderModifier, ResponseHeaderModifier and RequestMirror.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<RouteFilter>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<BackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GrpcMethodMatch>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HeaderMatch>,
}

/// `service` is the full name (`pkg.Service`), `method` the method's; at
/// least one is given, an omitted one matches any.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GrpcMethodMatch {
    #[serde(default, rename = "type")]
    pub match_type: ValueMatchType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

// ---------------------------------------------------------------- TrafficPolicy

/// How the proxies of callers treat traffic to one Service: load balancer,
/// circuit breaking, outlier detection, retries, faults, rate limit, health
/// checks and locality. At most one TrafficPolicy targets a Service. The
/// parts are in [`crate::traffic`] (boxed: most policies set few of them).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    pub target_ref: TargetRef,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Option<Box<crate::traffic::LoadBalancer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<Box<crate::traffic::ConnectionPool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<Box<crate::traffic::OutlierDetection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Box<crate::traffic::RetryPolicy>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault_injection: Option<Box<crate::traffic::FaultInjection>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_rate_limit: Option<Box<crate::traffic::LocalRateLimit>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check: Option<Box<crate::traffic::HealthCheck>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<Box<crate::traffic::Locality>>,
}

impl TrafficPolicySpec {
    /// A policy that only names its target: every setting at its default.
    pub fn for_target(name: &str) -> Self {
        TrafficPolicySpec {
            target_ref: TargetRef {
                group: None,
                kind: Some("Service".into()),
                name: name.to_string(),
            },
            load_balancer: None,
            connection_pool: None,
            outlier_detection: None,
            retry: None,
            fault_injection: None,
            local_rate_limit: None,
            health_check: None,
            locality: None,
        }
    }
}

// ---------------------------------------------------------------- AuthorizationPolicy

/// Who may call a Service (or, without `targetRef`, every Service of the
/// namespace). DENY policies are evaluated first; if any ALLOW policy
/// selects the target, a request must match one of them; otherwise
/// `Mesh.defaultPolicy` decides.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<TargetRef>,
    pub action: AuthzAction,
    /// A request matches the policy if it matches any rule. No rules: the
    /// policy matches nothing (an ALLOW with no rules allows nothing).
    #[serde(default)]
    pub rules: Vec<AuthzRule>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// A rule matches when each of its present parts matches: one of `from`,
/// one of `to`, and every `when`. An empty rule matches every request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzRule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<AuthzSource>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<AuthzOperation>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<AuthzCondition>,
}

/// The verified peer. Each list, when present, must hold a match.
/// Principals are SPIFFE IDs (`spiffe://td/ns/prod/sa/web`), or
/// `*`-prefix/suffix patterns of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzSource {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(pattern(crate::schema::PRINCIPAL))))]
    pub principals: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
}

/// The request. Paths are exact, `prefix*` or `*suffix`, matched against the
/// normalised path.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzOperation {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "schema",
        schemars(inner(pattern(crate::schema::HTTP_METHOD)))
    )]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(
        feature = "schema",
        schemars(inner(pattern(crate::schema::AUTHZ_PATH)))
    )]
    pub paths: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 1))))]
    pub ports: Vec<u16>,
}

/// A request header that must hold one of `values` (same patterns as paths).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AuthzCondition {
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::HEADER_NAME)))]
    pub header: String,
    #[cfg_attr(feature = "schema", schemars(length(min = 1)))]
    pub values: Vec<String>,
}
