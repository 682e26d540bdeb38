//! The retry budget of a service: over the last `ttl`, retries may be at
//! most `ratio` × requests + `minRetriesPerSecond` × ttl. When every
//! endpoint fails, retries then add a bounded share of load instead of
//! multiplying it (a retry storm).
//!
//! Requests and retries are counted in one-second slots of a ring, with
//! atomics only: a slot is reset by whoever first sees it hold an old
//! second. Two callers racing on that reset may lose a count, which shifts
//! the budget by a request, not the bound.

use std::sync::atomic::{AtomicU64, Ordering};

use super::policy::BudgetConfig;

/// Longest window the ring can hold, in seconds.
const SLOTS: usize = 64;

#[derive(Default)]
struct Slot {
    /// The second (since the process epoch) the counts belong to, plus one.
    second: AtomicU64,
    requests: AtomicU64,
    retries: AtomicU64,
}

pub struct RetryBudget {
    slots: [Slot; SLOTS],
}

impl Default for RetryBudget {
    fn default() -> Self {
        RetryBudget {
            slots: std::array::from_fn(|_| Slot::default()),
        }
    }
}

impl RetryBudget {
    fn slot(&self, second: u64) -> &Slot {
        let slot = &self.slots[(second % SLOTS as u64) as usize];
        let tag = second + 1;
        let seen = slot.second.load(Ordering::Acquire);
        if seen != tag
            && slot
                .second
                .compare_exchange(seen, tag, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            slot.requests.store(0, Ordering::Release);
            slot.retries.store(0, Ordering::Release);
        }
        slot
    }

    /// Counts a request (not its retries).
    pub fn deposit(&self, now_nanos: u64) {
        self.slot(now_nanos / 1_000_000_000)
            .requests
            .fetch_add(1, Ordering::AcqRel);
    }

    /// Takes one retry from the budget; false when it is spent.
    pub fn try_withdraw(&self, cfg: &BudgetConfig, now_nanos: u64) -> bool {
        let now = now_nanos / 1_000_000_000;
        let window = cfg.ttl.as_secs().clamp(1, SLOTS as u64 - 1);
        let (mut requests, mut retries) = (0u64, 0u64);
        for age in 0..window {
            let Some(second) = now.checked_sub(age) else {
                break;
            };
            let slot = &self.slots[(second % SLOTS as u64) as usize];
            if slot.second.load(Ordering::Acquire) == second + 1 {
                requests += slot.requests.load(Ordering::Acquire);
                retries += slot.retries.load(Ordering::Acquire);
            }
        }
        let allowed = cfg.ratio * requests as f64 + (cfg.min_per_second as u64 * window) as f64;
        if (retries as f64) < allowed {
            self.slot(now).retries.fetch_add(1, Ordering::AcqRel);
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn retries_stay_within_ratio_plus_reserve() {
        let cfg = BudgetConfig {
            ratio: 0.2,
            min_per_second: 1,
            ttl: Duration::from_secs(10),
        };
        let b = RetryBudget::default();
        let t = 100 * SEC;
        for _ in 0..1000 {
            b.deposit(t);
        }
        let granted = (0..1000).filter(|_| b.try_withdraw(&cfg, t)).count();
        // 0.2 × 1000 + 1/s × 10s.
        assert_eq!(granted, 210);
    }

    #[test]
    fn old_seconds_leave_the_window() {
        let cfg = BudgetConfig {
            ratio: 0.5,
            min_per_second: 0,
            ttl: Duration::from_secs(2),
        };
        let b = RetryBudget::default();
        for _ in 0..10 {
            b.deposit(5 * SEC);
        }
        assert!(b.try_withdraw(&cfg, 6 * SEC));
        // Two seconds later the requests of second 5 are out of the window.
        assert!(!b.try_withdraw(&cfg, 7 * SEC + 1));
        // A slot reused for a new second starts from zero.
        for _ in 0..2 {
            b.deposit((5 + SLOTS as u64) * SEC);
        }
        assert!(b.try_withdraw(&cfg, (5 + SLOTS as u64) * SEC));
        assert!(!b.try_withdraw(&cfg, (5 + SLOTS as u64) * SEC));
    }
}
