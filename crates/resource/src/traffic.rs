//! The parts of a `TrafficPolicy`. Every part is optional, and every field
//! of a part has a default, so a policy says only what differs. Durations
//! are strings such as `250ms` or `30s`.

use serde::{Deserialize, Serialize};

/// Endpoint label that places an endpoint (and a caller) in a zone.
pub const ZONE_LABEL: &str = "topology.trellis.dev/zone";

/// Annotation on an HTTPRoute that lets its retries resend requests that
/// are not idempotent (POST, PATCH) after their body was sent.
pub const RETRY_NON_IDEMPOTENT_ANNOTATION: &str = "trellis.dev/retry-non-idempotent";

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum LoadBalancerType {
    /// Two endpoints at random, the one with the lower moving-average
    /// latency × (requests in flight + 1).
    #[default]
    PeakEwma,
    RoundRobin,
    /// Two endpoints at random, the one with fewer requests in flight.
    LeastRequest,
    /// Consistent hashing on `hashOn`: a key keeps its endpoint while the
    /// endpoint stays.
    RingHash,
}

impl LoadBalancerType {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancerType::PeakEwma => "peak-ewma",
            LoadBalancerType::RoundRobin => "round-robin",
            LoadBalancerType::LeastRequest => "least-request",
            LoadBalancerType::RingHash => "ring-hash",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LoadBalancer {
    #[serde(default, rename = "type")]
    pub lb_type: LoadBalancerType,
    /// What `ring-hash` hashes; required with it, refused without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash_on: Option<HashOn>,
}

/// Exactly one of `header`, `cookie` or `source: true`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HashOn {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cookie: Option<String>,
    /// The calling workload instance: all its requests stick to one endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub source: bool,
}

/// Circuit breaking: past a limit, requests fail at once with 503 and the
/// response flag `UO`. Omitted limits are unlimited.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ConnectionPool {
    /// Connections to the Service's endpoints: each opaque TCP or upgraded
    /// (WebSocket) connection counts one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection to an endpoint to open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight to the Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub max_requests: Option<u32>,
}

/// Passive health: endpoints that fail in a row are ejected for a while.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OutlierDetection {
    /// 5xx answers (and failed connections) in a row that eject (default 5; 0 off).
    #[serde(
        default,
        rename = "consecutive5xxErrors",
        skip_serializing_if = "Option::is_none"
    )]
    pub consecutive_5xx_errors: Option<u32>,
    /// 502, 503, 504 and failed connections in a row that eject (default 0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_gateway_errors: Option<u32>,
    /// How long an endpoint must behave for its next ejection to be shorter
    /// (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub interval: Option<String>,
    /// Ejection time, multiplied by the number of times the endpoint was
    /// ejected (default 30s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub base_ejection_time: Option<String>,
    /// The longest an ejection lasts (default 300s, or baseEjectionTime if longer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub max_ejection_time: Option<String>,
    /// Endpoints may be ejected only while fewer than this share of the
    /// Service's are (default 10; one endpoint may always be ejected).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(max = 100)))]
    pub max_ejection_percent: Option<u32>,
}

/// Retries of requests to the Service. An HTTPRoute's `retry` and
/// `timeouts.backendRequest` take precedence for the requests it matches;
/// the budget always applies.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first try (default 0: only failed connections are retried).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(max = 10)))]
    pub attempts: Option<u32>,
    /// Statuses that are retried (default 502, 503, 504).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[cfg_attr(feature = "schema", schemars(inner(range(min = 400, max = 599))))]
    pub codes: Vec<u16>,
    /// The first backoff; each retry doubles it, with jitter (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub backoff: Option<String>,
    /// The longest backoff (default 10 × backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub max_backoff: Option<String>,
    /// Bound on each try (default none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub per_try_timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<RetryBudget>,
}

/// Retries are allowed while retries ≤ ratio × requests + minRetriesPerSecond
/// × ttl over the last `ttl`. Applies even without a policy, with the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetryBudget {
    /// Default 0.2: retries add at most 20% to the load.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 1.0)))]
    pub ratio: Option<f64>,
    /// Default 10.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
    /// The window (default 10s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub ttl: Option<String>,
}

/// Chaos testing: delay or fail a share of requests before they leave the
/// caller's proxy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultInjection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, 0 to 100 (fractions allowed).
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub fixed_delay: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests answered with `httpStatus`, 0 to 100.
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 100.0)))]
    pub percent: f64,
    /// 200 to 599 (default 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 200, max = 599)))]
    pub http_status: Option<u16>,
}

/// A token bucket in each calling proxy: requests past it get 429.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LocalRateLimit {
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub requests_per_second: u32,
    /// Requests allowed at once after a quiet spell (default requestsPerSecond).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub burst: Option<u32>,
}

/// Active health checks: every calling proxy GETs `path` on each endpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HealthCheck {
    #[cfg_attr(feature = "schema", schemars(pattern("^/")))]
    pub path: String,
    /// Default 5s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub interval: Option<String>,
    /// Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(pattern(crate::schema::DURATION)))]
    pub timeout: Option<String>,
    /// Passing checks in a row that make an endpoint healthy again (default 2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub healthy_threshold: Option<u32>,
    /// Failing checks in a row that take it out (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 1)))]
    pub unhealthy_threshold: Option<u32>,
}

/// Zone-aware routing: a caller whose proxy has the `topology.trellis.dev/zone`
/// label prefers endpoints of its zone while enough of them are healthy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Locality {
    /// Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The healthy share of the caller's zone below which traffic spreads
    /// over every zone, 0 to 1 (default 0.7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "schema", schemars(range(min = 0.0, max = 1.0)))]
    pub failover_threshold: Option<f64>,
}
