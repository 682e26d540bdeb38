//! Per-endpoint health, kept on the `Endpoint` (so it survives config
//! versions) in atomics.
//!
//! Passive (outlier detection): answers count in a row; at the threshold
//! the endpoint is ejected for baseEjectionTime × the number of times it
//! was ejected (each `interval` without an ejection forgives one), capped
//! at maxEjectionTime, unless that would put more than
//! maxEjectionPercent of the service's endpoints out at once (one may
//! always be out). It comes back by itself when the time is up; if it
//! still fails, it is ejected again, for longer.
//!
//! Active: the health-check task marks an endpoint unhealthy after
//! `unhealthyThreshold` failed checks in a row and healthy again after
//! `healthyThreshold` good ones.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use super::policy::{HealthCheckConfig, OutlierConfig};
use crate::endpoint::Endpoint;

/// How one try to an endpoint ended, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// An answer with this status.
    Status(u16),
    /// No answer: the connection failed, was reset, or the try timed out.
    Failed,
}

impl Outcome {
    fn is_5xx(self) -> bool {
        match self {
            Outcome::Status(s) => s >= 500,
            Outcome::Failed => true,
        }
    }

    fn is_gateway(self) -> bool {
        matches!(self, Outcome::Status(502..=504) | Outcome::Failed)
    }
}

#[derive(Default)]
pub struct EndpointHealth {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    /// Nanoseconds since the process epoch; 0 or past: not ejected.
    ejected_until: AtomicU64,
    /// How many ejections the next one multiplies the base time by, minus one.
    ejections: AtomicU32,
    /// Set by active checks.
    unhealthy: AtomicBool,
    checks_passed: AtomicU32,
    checks_failed: AtomicU32,
    /// When the next active check is due (nanoseconds since the epoch).
    next_check: AtomicU64,
}

impl EndpointHealth {
    pub fn ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Acquire) > now
    }

    /// Whether the balancer may send it requests.
    pub fn available(&self, now: u64) -> bool {
        !self.ejected(now) && !self.unhealthy.load(Ordering::Acquire)
    }

    pub fn actively_unhealthy(&self) -> bool {
        self.unhealthy.load(Ordering::Acquire)
    }

    /// Records how a try ended; true when this ejected the endpoint.
    /// `peers` is every endpoint of its service (the ejection cap).
    pub fn record(
        &self,
        cfg: &OutlierConfig,
        outcome: Outcome,
        peers: &[Arc<Endpoint>],
        now: u64,
    ) -> bool {
        if !outcome.is_5xx() {
            self.consecutive_5xx.store(0, Ordering::Release);
            self.consecutive_gateway.store(0, Ordering::Release);
            return false;
        }
        // Answers that arrive while it is out were sent before: they must
        // not count towards the next ejection.
        let until = self.ejected_until.load(Ordering::Acquire);
        if until > now {
            return false;
        }
        let c5 = self.consecutive_5xx.fetch_add(1, Ordering::AcqRel) + 1;
        let cg = if outcome.is_gateway() {
            self.consecutive_gateway.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.consecutive_gateway.store(0, Ordering::Release);
            0
        };
        let tripped = (cfg.consecutive_5xx > 0 && c5 >= cfg.consecutive_5xx)
            || (cfg.consecutive_gateway > 0 && cg >= cfg.consecutive_gateway);
        if !tripped {
            return false;
        }
        let out = peers.iter().filter(|p| p.health.ejected(now)).count();
        let total = peers.len().max(1);
        if out > 0 && (out + 1) * 100 > cfg.max_ejection_percent as usize * total {
            return false;
        }
        // Each quiet interval since the last ejection ended forgives one.
        let interval = cfg.interval.as_nanos().max(1) as u64;
        let forgiven = if until == 0 {
            0
        } else {
            (now.saturating_sub(until) / interval).min(u32::MAX as u64) as u32
        };
        let times = self
            .ejections
            .load(Ordering::Acquire)
            .saturating_sub(forgiven)
            + 1;
        let length = cfg
            .base_ejection
            .saturating_mul(times)
            .min(cfg.max_ejection);
        let new_until = now + length.as_nanos() as u64;
        if self
            .ejected_until
            .compare_exchange(until, new_until, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // Someone else ejected it (or moved the deadline) just now.
            return false;
        }
        self.ejections.store(times, Ordering::Release);
        self.consecutive_5xx.store(0, Ordering::Release);
        self.consecutive_gateway.store(0, Ordering::Release);
        true
    }

    /// Claims the next active check if it is due; false if not yet (or
    /// another task claimed it).
    pub fn check_due(&self, interval: std::time::Duration, now: u64) -> bool {
        let next = self.next_check.load(Ordering::Acquire);
        if next > now {
            return false;
        }
        // Spread the first checks of many endpoints over the interval.
        let jitter = if next == 0 {
            (rand::random::<f64>() * interval.as_nanos() as f64 * 0.1) as u64
        } else {
            0
        };
        self.next_check
            .compare_exchange(
                next,
                now + interval.as_nanos() as u64 + jitter,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
    }

    /// Records an active check; returns Some(healthy) when the state flipped.
    pub fn record_check(&self, cfg: &HealthCheckConfig, passed: bool) -> Option<bool> {
        if passed {
            self.checks_failed.store(0, Ordering::Release);
            let n = self.checks_passed.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= cfg.healthy_threshold && self.unhealthy.swap(false, Ordering::AcqRel) {
                return Some(true);
            }
        } else {
            self.checks_passed.store(0, Ordering::Release);
            let n = self.checks_failed.fetch_add(1, Ordering::AcqRel) + 1;
            if n >= cfg.unhealthy_threshold && !self.unhealthy.swap(true, Ordering::AcqRel) {
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::endpoint;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    fn cfg(max_percent: u32) -> OutlierConfig {
        OutlierConfig {
            consecutive_5xx: 3,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(1),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: max_percent,
        }
    }

    #[test]
    fn ejects_after_consecutive_errors_for_longer_each_time() {
        let eps: Vec<_> = (0..4)
            .map(|i| endpoint(&format!("127.0.0.1:{}", 3000 + i)))
            .collect();
        let h = &eps[0].health;
        let c = cfg(50);
        let t = 100 * SEC;
        assert!(!h.record(&c, Outcome::Status(500), &eps, t));
        // A success in between starts the count again.
        assert!(!h.record(&c, Outcome::Status(200), &eps, t));
        assert!(!h.record(&c, Outcome::Status(503), &eps, t));
        assert!(!h.record(&c, Outcome::Failed, &eps, t));
        assert!(h.record(&c, Outcome::Status(500), &eps, t));
        assert!(!h.available(t + SEC / 2));
        assert!(h.available(t + SEC + 1), "back after baseEjectionTime");
        // Still failing: out again, for twice as long.
        let t2 = t + 2 * SEC;
        for _ in 0..2 {
            assert!(!h.record(&c, Outcome::Status(500), &eps, t2));
        }
        assert!(h.record(&c, Outcome::Status(500), &eps, t2));
        assert!(!h.available(t2 + 3 * SEC / 2));
        assert!(h.available(t2 + 2 * SEC + 1));
        // Errors sent before the ejection do not count while it is out.
        let t3 = t2 + 100 * SEC;
        for _ in 0..2 {
            h.record(&c, Outcome::Status(500), &eps, t3);
        }
        assert!(h.record(&c, Outcome::Status(500), &eps, t3));
        for _ in 0..5 {
            assert!(!h.record(&c, Outcome::Status(500), &eps, t3 + 1));
        }
        // Quiet intervals since the last ejection forgave it: this one
        // lasts the base time again.
        assert!(h.available(t3 + SEC + 1));
    }

    #[test]
    fn max_ejection_percent_caps_ejections_but_one_is_allowed() {
        let eps: Vec<_> = (0..4)
            .map(|i| endpoint(&format!("127.0.0.1:{}", 4000 + i)))
            .collect();
        let c = cfg(10);
        let t = 10 * SEC;
        let eject =
            |i: usize| (0..3).any(|_| eps[i].health.record(&c, Outcome::Status(500), &eps, t));
        assert!(eject(0), "10% of 4 is below one endpoint, yet one may go");
        assert!(!eject(1), "a second would be 50%");
        assert!(eps[1].health.available(t));
    }

    #[test]
    fn active_checks_flip_after_thresholds() {
        let h = EndpointHealth::default();
        let c = HealthCheckConfig {
            path: "/healthz".into(),
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: 2,
            unhealthy_threshold: 2,
        };
        assert_eq!(h.record_check(&c, false), None);
        assert_eq!(h.record_check(&c, false), Some(false));
        assert!(!h.available(SEC));
        assert_eq!(h.record_check(&c, true), None);
        assert_eq!(h.record_check(&c, true), Some(true));
        assert!(h.available(SEC));
        assert!(h.check_due(Duration::from_secs(1), SEC));
        assert!(!h.check_due(Duration::from_secs(1), SEC + 1));
    }
}
