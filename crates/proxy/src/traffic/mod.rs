//! Traffic management on the outbound path: what a `TrafficPolicy` and the
//! traffic filters of a route make the caller's proxy do.
//!
//! - `policy`: a TrafficPolicy compiled for the hot path, and the per-service
//!   runtime state (circuit-breaker counters, retry budget, rate limiter)
//!   that outlives config versions.
//! - `outlier`: per-endpoint health, passive (ejection) and active (checks).
//! - `admit`: what happens before a backend is chosen: local rate limit,
//!   fault injection, redirects and rewrites.
//! - `forward`: the tries to a backend's endpoints: circuit breaking,
//!   retries within the budget, outlier detection, mirroring.
//! - `health`: the task that runs active health checks.
//!
//! Per-endpoint and per-service state is atomics; nothing on the request
//! path takes a lock.

use std::sync::LazyLock;
use std::time::Instant;

use http::{HeaderValue, Response};

use crate::Body;

pub mod admit;
pub mod budget;
pub mod forward;
pub mod health;
pub mod metrics;
pub mod mirror;
pub mod outlier;
pub mod policy;
pub mod ratelimit;

pub use metrics::TrafficMetrics;
pub use outlier::EndpointHealth;
pub use policy::{Policy, ServiceTraffic};

/// Response header listing what the caller's proxy did to a request, as
/// Envoy's response flags: `UO` circuit breaker overflow, `RL` rate
/// limited, `FI` fault abort, `DI` fault delay, `URX` retries stopped by
/// the budget.
pub const FLAGS_HEADER: &str = "x-trellis-flags";

/// Adds a flag to a response's `x-trellis-flags` (comma separated).
pub fn add_flag(resp: &mut Response<Body>, flag: &'static str) {
    let value = match resp
        .headers()
        .get(FLAGS_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        Some(old) if !old.is_empty() => HeaderValue::try_from(format!("{old},{flag}")).ok(),
        _ => Some(HeaderValue::from_static(flag)),
    };
    if let Some(v) = value {
        resp.headers_mut().insert(FLAGS_HEADER, v);
    }
}

static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

/// Nanoseconds since this process first asked: the time base of every
/// deadline kept in an atomic. Never 0, so 0 can mean "never".
pub fn now_nanos() -> u64 {
    EPOCH.elapsed().as_nanos() as u64 + 1
}

/// A 64-bit hash that is the same in every proxy and every run, so a
/// hash key maps to the same endpoint whichever caller sends it.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    // FNV-1a, then a finaliser so that close inputs spread over the ring.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Whether a method may be sent again without changing its effect.
pub fn is_idempotent(m: &http::Method) -> bool {
    use http::Method;
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether an event with this probability (0 to 1) happens this time.
pub fn chance(p: f64) -> bool {
    p >= 1.0 || (p > 0.0 && rand::random::<f64>() < p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_accumulate() {
        let mut r = crate::http::text_response(http::StatusCode::OK, "");
        add_flag(&mut r, "DI");
        add_flag(&mut r, "URX");
        assert_eq!(r.headers()[FLAGS_HEADER], "DI,URX");
    }

    #[test]
    fn hash_is_stable_and_spreads() {
        assert_eq!(stable_hash(b"user-1"), stable_hash(b"user-1"));
        assert_ne!(stable_hash(b"user-1"), stable_hash(b"user-2"));
        // The top bit is set for about half of sequential keys.
        let high = (0..1000)
            .filter(|i| stable_hash(format!("k{i}").as_bytes()) >> 63 == 1)
            .count();
        assert!((400..600).contains(&high), "{high}");
    }
}
