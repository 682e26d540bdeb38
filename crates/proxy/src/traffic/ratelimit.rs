//! Local rate limit: a token bucket per calling proxy and destination
//! Service, kept as one atomic.
//!
//! The bucket is the generic cell rate algorithm: it holds the theoretical
//! arrival time (TAT) of the next request. A request at `now` is allowed
//! when max(TAT, now) + T − now ≤ burst × T, with T = 1s / rate, and moves
//! TAT on by T. That is a bucket of `burst` tokens refilled at `rate`.

use std::sync::atomic::{AtomicU64, Ordering};

use super::policy::RateConfig;

#[derive(Default)]
pub struct RateLimiter {
    /// Nanoseconds since the process epoch; 0: the bucket is full.
    tat: AtomicU64,
}

impl RateLimiter {
    /// Takes a token; false when the bucket is empty (answer 429).
    pub fn try_acquire(&self, cfg: &RateConfig, now_nanos: u64) -> bool {
        let t = 1_000_000_000 / cfg.per_second.max(1) as u64;
        let limit = t.saturating_mul(cfg.burst.max(1) as u64);
        let mut tat = self.tat.load(Ordering::Acquire);
        loop {
            let next = tat.max(now_nanos) + t;
            if next - now_nanos > limit {
                return false;
            }
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return true,
                Err(seen) => tat = seen,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let cfg = RateConfig {
            per_second: 50,
            burst: 10,
        };
        let rl = RateLimiter::default();
        let t0 = 1_000_000_000;
        let burst = (0..100).filter(|_| rl.try_acquire(&cfg, t0)).count();
        assert_eq!(burst, 10);
        // Offered at 200/s for 2s: the bucket lets 50/s through.
        let passed = (1..=400)
            .filter(|i| rl.try_acquire(&cfg, t0 + i * 5_000_000))
            .count();
        assert_eq!(passed, 100);
    }
}
