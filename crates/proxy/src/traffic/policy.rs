//! A `TrafficPolicy` compiled for the hot path (durations parsed, header
//! names checked, defaults filled in), and the per-service state that
//! outlives config versions: circuit-breaker counters, the retry budget and
//! the rate limiter.
//!
//! Which service's policy applies: request-level settings (rate limit,
//! faults, retries and their budget) come from the Service the app called;
//! endpoint-level settings (balancer, connection pool, outlier detection,
//! health checks, locality) from the Service whose endpoints serve, which
//! differs when an HTTPRoute sends the request to another backend.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, StatusCode};
use trellis_resource::{
    parse_duration, DurationError, LoadBalancerType, Resource, TrafficPolicySpec,
};

use super::budget::RetryBudget;
use super::ratelimit::RateLimiter;

/// What ring-hash hashes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashKey {
    Header(HeaderName),
    Cookie(String),
    /// The calling workload instance.
    Source,
}

#[derive(Clone, Debug, PartialEq)]
pub struct OutlierConfig {
    /// 0: not counted.
    pub consecutive_5xx: u32,
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejection_percent: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct RetryConfig {
    pub attempts: u32,
    pub codes: Vec<u16>,
    pub backoff: Duration,
    pub max_backoff: Duration,
    pub per_try_timeout: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BudgetConfig {
    pub ratio: f64,
    pub min_per_second: u32,
    pub ttl: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            ratio: 0.2,
            min_per_second: 10,
            ttl: Duration::from_secs(10),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultConfig {
    /// Probability (0 to 1) and delay.
    pub delay: Option<(f64, Duration)>,
    /// Probability (0 to 1) and status.
    pub abort: Option<(f64, StatusCode)>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateConfig {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct HealthCheckConfig {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LocalityConfig {
    pub enabled: bool,
    pub failover_threshold: f64,
}

/// A compiled TrafficPolicy; `Policy::default()` is a Service without one.
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The TrafficPolicy's name, empty when the defaults apply.
    pub name: String,
    pub balancer: LoadBalancerType,
    pub hash_key: Option<HashKey>,
    pub max_connections: Option<u64>,
    pub max_pending: Option<u64>,
    pub max_requests: Option<u64>,
    pub outlier: Option<OutlierConfig>,
    pub retry: RetryConfig,
    pub budget: BudgetConfig,
    pub fault: FaultConfig,
    pub rate_limit: Option<RateConfig>,
    pub health_check: Option<HealthCheckConfig>,
    pub locality: LocalityConfig,
}

/// Statuses a TrafficPolicy retries when it sets `attempts` but no codes.
pub const DEFAULT_RETRY_CODES: [u16; 3] = [502, 503, 504];

impl Default for Policy {
    fn default() -> Self {
        Policy {
            name: String::new(),
            balancer: LoadBalancerType::PeakEwma,
            hash_key: None,
            max_connections: None,
            max_pending: None,
            max_requests: None,
            outlier: None,
            retry: RetryConfig {
                attempts: 0,
                codes: DEFAULT_RETRY_CODES.to_vec(),
                backoff: Duration::from_millis(25),
                max_backoff: Duration::from_millis(250),
                per_try_timeout: None,
            },
            budget: BudgetConfig::default(),
            fault: FaultConfig::default(),
            rate_limit: None,
            health_check: None,
            locality: LocalityConfig {
                enabled: true,
                failover_threshold: 0.7,
            },
        }
    }
}

/// Why a TrafficPolicy cannot be used; the resource's validation refuses
/// most of these before they reach a proxy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("traffic policy: {0}")]
    Json(serde_json::Error),
    #[error("traffic policy: not a TrafficPolicy resource")]
    NotAPolicy,
    #[error("traffic policy: {field}: {reason}")]
    Duration {
        field: &'static str,
        reason: DurationError,
    },
    #[error("traffic policy: loadBalancer: ring-hash needs hashOn")]
    NoHashKey,
    #[error("traffic policy: loadBalancer.hashOn.header: {0}")]
    HashHeader(http::header::InvalidHeaderName),
    #[error("traffic policy: loadBalancer.hashOn: give exactly one of header, cookie, source")]
    HashKeys,
    #[error("traffic policy: faultInjection.abort.httpStatus: {0}")]
    AbortStatus(http::status::InvalidStatusCode),
    #[error("traffic policy: localRateLimit.requestsPerSecond is 0: give a rate above 0, or no localRateLimit")]
    ZeroRate,
    #[error("annotation trellis.dev/load-balancer: unknown load balancer {0:?} (use peak-ewma, round-robin or least-request)")]
    UnknownBalancer(String),
}

fn parse(field: &'static str, s: &str) -> Result<Duration, PolicyError> {
    parse_duration(s).map_err(|reason| PolicyError::Duration { field, reason })
}

fn dur(
    field: &'static str,
    s: &Option<String>,
    default: Duration,
) -> Result<Duration, PolicyError> {
    match s {
        None => Ok(default),
        Some(s) => parse(field, s),
    }
}

impl Policy {
    /// Compiles the `traffic_policy_json` of a service config ("" for
    /// none). `lb_annotation` is the Service's older
    /// `trellis.dev/load-balancer` annotation, used when the policy does
    /// not choose a balancer.
    pub fn from_json(json: &str, lb_annotation: Option<&str>) -> Result<Policy, PolicyError> {
        let res: Option<Resource> = if json.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(json).map_err(PolicyError::Json)?)
        };
        let spec = match &res {
            None => None,
            Some(r) => Some(r.as_traffic_policy().ok_or(PolicyError::NotAPolicy)?),
        };
        let mut policy = match (&res, spec) {
            (Some(r), Some(spec)) => {
                let mut p = Policy::compile(spec)?;
                p.name = r.metadata.name.clone();
                p
            }
            _ => Policy::default(),
        };
        if spec.is_none_or(|s| s.load_balancer.is_none()) {
            policy.balancer = match lb_annotation {
                None | Some("peak-ewma") => LoadBalancerType::PeakEwma,
                Some("round-robin") => LoadBalancerType::RoundRobin,
                Some("least-request") => LoadBalancerType::LeastRequest,
                Some(other) => return Err(PolicyError::UnknownBalancer(other.to_string())),
            };
        }
        Ok(policy)
    }

    pub fn compile(spec: &TrafficPolicySpec) -> Result<Policy, PolicyError> {
        let mut p = Policy::default();
        if let Some(lb) = &spec.load_balancer {
            p.balancer = lb.lb_type;
            if lb.lb_type == LoadBalancerType::RingHash {
                let h = lb.hash_on.as_ref().ok_or(PolicyError::NoHashKey)?;
                p.hash_key = Some(match (&h.header, &h.cookie, h.source) {
                    (Some(name), None, false) => HashKey::Header(
                        HeaderName::try_from(name.to_ascii_lowercase())
                            .map_err(PolicyError::HashHeader)?,
                    ),
                    (None, Some(name), false) => HashKey::Cookie(name.clone()),
                    (None, None, true) => HashKey::Source,
                    _ => return Err(PolicyError::HashKeys),
                });
            }
        }
        if let Some(cp) = &spec.connection_pool {
            p.max_connections = cp.max_connections.map(u64::from);
            p.max_pending = cp.max_pending_requests.map(u64::from);
            p.max_requests = cp.max_requests.map(u64::from);
        }
        if let Some(od) = &spec.outlier_detection {
            let base = dur(
                "baseEjectionTime",
                &od.base_ejection_time,
                Duration::from_secs(30),
            )?;
            let max = dur(
                "maxEjectionTime",
                &od.max_ejection_time,
                Duration::from_secs(300),
            )?;
            p.outlier = Some(OutlierConfig {
                consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(5),
                consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
                interval: dur("interval", &od.interval, Duration::from_secs(10))?,
                base_ejection: base,
                max_ejection: max.max(base),
                max_ejection_percent: od.max_ejection_percent.unwrap_or(10).min(100),
            });
        }
        if let Some(r) = &spec.retry {
            let backoff = dur("retry.backoff", &r.backoff, p.retry.backoff)?;
            p.retry = RetryConfig {
                attempts: r.attempts.unwrap_or(0),
                codes: if r.codes.is_empty() {
                    DEFAULT_RETRY_CODES.to_vec()
                } else {
                    r.codes.clone()
                },
                backoff,
                max_backoff: dur("retry.maxBackoff", &r.max_backoff, backoff * 10)?,
                per_try_timeout: r
                    .per_try_timeout
                    .as_deref()
                    .map(|s| parse("retry.perTryTimeout", s))
                    .transpose()?,
            };
            if let Some(b) = &r.budget {
                p.budget = BudgetConfig {
                    ratio: b.ratio.unwrap_or(p.budget.ratio),
                    min_per_second: b.min_retries_per_second.unwrap_or(p.budget.min_per_second),
                    ttl: dur("retry.budget.ttl", &b.ttl, p.budget.ttl)?,
                };
            }
        }
        if let Some(f) = &spec.fault_injection {
            if let Some(d) = &f.delay {
                let delay = parse("faultInjection.delay.fixedDelay", &d.fixed_delay)?;
                p.fault.delay = Some((d.percent / 100.0, delay));
            }
            if let Some(a) = &f.abort {
                let status = StatusCode::from_u16(a.http_status.unwrap_or(503))
                    .map_err(PolicyError::AbortStatus)?;
                p.fault.abort = Some((a.percent / 100.0, status));
            }
        }
        if let Some(rl) = &spec.local_rate_limit {
            if rl.requests_per_second == 0 {
                return Err(PolicyError::ZeroRate);
            }
            p.rate_limit = Some(RateConfig {
                per_second: rl.requests_per_second,
                burst: rl.burst.unwrap_or(rl.requests_per_second).max(1),
            });
        }
        if let Some(hc) = &spec.health_check {
            p.health_check = Some(HealthCheckConfig {
                path: hc.path.clone(),
                interval: dur("healthCheck.interval", &hc.interval, Duration::from_secs(5))?,
                timeout: dur("healthCheck.timeout", &hc.timeout, Duration::from_secs(1))?,
                healthy_threshold: hc.healthy_threshold.unwrap_or(2).max(1),
                unhealthy_threshold: hc.unhealthy_threshold.unwrap_or(3).max(1),
            });
        }
        if let Some(l) = &spec.locality {
            p.locality = LocalityConfig {
                enabled: l.enabled.unwrap_or(true),
                failover_threshold: l.failover_threshold.unwrap_or(0.7),
            };
        }
        Ok(p)
    }
}

/// Which circuit-breaker counter a permit holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    Connections,
    Pending,
    Requests,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Connections => "connections",
            Limit::Pending => "pending",
            Limit::Requests => "requests",
        }
    }
}

/// Per-service runtime state, carried from one config version to the next
/// so that counters stay true while a new config swaps in.
#[derive(Default)]
pub struct ServiceTraffic {
    connections: AtomicU64,
    pending: AtomicU64,
    requests: AtomicU64,
    pub budget: RetryBudget,
    pub limiter: RateLimiter,
}

impl ServiceTraffic {
    fn counter(&self, which: Limit) -> &AtomicU64 {
        match which {
            Limit::Connections => &self.connections,
            Limit::Pending => &self.pending,
            Limit::Requests => &self.requests,
        }
    }

    /// Takes one unit of `which`, or None when `max` are taken already.
    pub fn acquire(self: &Arc<Self>, which: Limit, max: Option<u64>) -> Option<Permit> {
        let c = self.counter(which);
        let now = c.fetch_add(1, Ordering::AcqRel) + 1;
        if max.is_some_and(|m| now > m) {
            c.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Permit {
            traffic: self.clone(),
            which,
        })
    }

    pub fn in_use(&self, which: Limit) -> u64 {
        self.counter(which).load(Ordering::Relaxed)
    }
}

/// One unit of a circuit-breaker counter, given back when dropped.
pub struct Permit {
    traffic: Arc<ServiceTraffic>,
    which: Limit,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.traffic
            .counter(self.which)
            .fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(yaml_spec: &str) -> Policy {
        let yaml = format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {{name: p}}\nspec:\n  targetRef: {{name: s}}\n{yaml_spec}"
        );
        let r = trellis_resource::parse_documents("t.yaml", &yaml)
            .unwrap()
            .remove(0);
        Policy::from_json(&serde_json::to_string(&r).unwrap(), None).unwrap()
    }

    #[test]
    fn defaults_and_overrides() {
        let d = Policy::from_json("", None).unwrap();
        assert_eq!(d, Policy::default());
        assert_eq!(
            Policy::from_json("", Some("round-robin")).unwrap().balancer,
            LoadBalancerType::RoundRobin
        );
        assert!(Policy::from_json("", Some("random")).is_err());

        let p = policy(
            "  loadBalancer: {type: ring-hash, hashOn: {cookie: session}}\n  outlierDetection: {consecutive5xxErrors: 2, baseEjectionTime: 1s}\n  retry: {attempts: 3, backoff: 10ms}\n  localRateLimit: {requestsPerSecond: 5}\n",
        );
        assert_eq!(p.name, "p");
        assert_eq!(p.hash_key, Some(HashKey::Cookie("session".into())));
        let od = p.outlier.unwrap();
        assert_eq!(od.consecutive_5xx, 2);
        assert_eq!(od.max_ejection, Duration::from_secs(300));
        assert_eq!(p.retry.max_backoff, Duration::from_millis(100));
        assert_eq!(p.retry.codes, DEFAULT_RETRY_CODES);
        assert_eq!(p.rate_limit.unwrap().burst, 5);
        // A policy without a balancer leaves the annotation in charge.
        let r = trellis_resource::parse_documents(
            "t.yaml",
            "apiVersion: trellis.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: p}\nspec: {targetRef: {name: s}}\n",
        )
        .unwrap()
        .remove(0);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(
            Policy::from_json(&json, Some("least-request"))
                .unwrap()
                .balancer,
            LoadBalancerType::LeastRequest
        );
    }

    #[test]
    fn permits_respect_their_limit_and_come_back() {
        let t = Arc::new(ServiceTraffic::default());
        let a = t.acquire(Limit::Requests, Some(2)).unwrap();
        let _b = t.acquire(Limit::Requests, Some(2)).unwrap();
        assert!(t.acquire(Limit::Requests, Some(2)).is_none());
        assert_eq!(t.in_use(Limit::Requests), 2);
        drop(a);
        assert!(t.acquire(Limit::Requests, Some(2)).is_some());
        // Unlimited counters still count.
        let _c = t.acquire(Limit::Pending, None).unwrap();
        assert_eq!(t.in_use(Limit::Pending), 1);
    }

    #[test]
    fn counters_and_endpoint_health_outlive_config_versions() {
        use crate::snapshot::{Snapshot, SvcKey};
        use trellis_api::v1::{Config, Endpoint, ServiceConfig};
        let service = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"Service","metadata":{"name":"catalog"},"spec":{"selector":{"app":"catalog"},"ports":[{"port":80}]}}"#;
        let policy = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"TrafficPolicy","metadata":{"name":"catalog"},"spec":{"targetRef":{"name":"catalog"},"loadBalancer":{"type":"least-request"},"connectionPool":{"maxRequests":3}}}"#;
        let config = |version: u64, policy: &str| Config {
            version,
            services: vec![ServiceConfig {
                namespace: "default".into(),
                name: "catalog".into(),
                service_json: service.into(),
                traffic_policy_json: policy.into(),
                endpoints: vec![Endpoint {
                    address: "127.0.0.1:7000".into(),
                    instance: "catalog-0".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let key = SvcKey::new("default", "catalog");
        let first = Snapshot::build(config(1, policy), &Snapshot::default()).unwrap();
        let svc = first.service(&key).unwrap();
        assert_eq!(svc.policy.balancer, LoadBalancerType::LeastRequest);
        assert_eq!(svc.policy.max_requests, Some(3));
        let _held = svc.traffic.acquire(Limit::Requests, Some(3)).unwrap();
        let second = Snapshot::build(config(2, ""), &first).unwrap();
        let svc2 = second.service(&key).unwrap();
        assert!(Arc::ptr_eq(&svc.traffic, &svc2.traffic));
        assert_eq!(svc2.traffic.in_use(Limit::Requests), 1);
        assert!(Arc::ptr_eq(&svc.endpoints[0], &svc2.endpoints[0]));
        assert_eq!(svc2.policy, Policy::default());
        // A policy the proxy cannot use rejects the whole config.
        let bad = r#"{"apiVersion":"trellis.dev/v1alpha1","kind":"TrafficPolicy","metadata":{"name":"catalog"},"spec":{"targetRef":{"name":"catalog"},"retry":{"backoff":"soon"}}}"#;
        let err = Snapshot::build(config(3, bad), &second).err().unwrap();
        assert!(
            matches!(
                &err,
                crate::snapshot::SnapshotError::Policy {
                    reason: PolicyError::Duration {
                        field: "retry.backoff",
                        ..
                    },
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("retry.backoff"), "{err}");
    }
}
