//! Work the process does once the control plane is idle after a large
//! change: returning the memory that change freed.
//!
//! A mesh-wide change replaces the Config and the published view of every
//! connected proxy (12,000 at the scale benchmark's size). The allocator
//! keeps the freed pages and gives them back to the kernel lazily, at a
//! later allocation or free once its purge delay has passed; in a quiet
//! control plane that is the next change, which then pays for the last one (a route change seen
//! by 6 proxies took twice its own CPU right after a mesh-wide change,
//! `docs/performance.md`, "Control plane, round 3"). So the actor says when
//! it has been idle for `TIDY_IDLE` after a large round ([`Tidy`]), and the
//! binary, which owns the allocator and the runtime, returns the memory on
//! each worker thread as it parks (`crates/cli/src/memory.rs`).
//!
//! The request is a generation count, not a callback: the binary's park
//! hook compares it with what its thread saw last, which costs one atomic
//! load per park.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

/// A round that changed at least this many proxies is a large one.
pub const LARGE_ROUND: usize = 1024;
/// How long the actor must have been idle after a large round.
pub const TIDY_IDLE: Duration = Duration::from_millis(100);

static GENERATION: AtomicU64 = AtomicU64::new(0);

/// How many times a tidy-up was asked for, process-wide. A worker thread
/// that last tidied at an older generation should tidy when it parks.
pub fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// Asks every worker thread to tidy at its next park, and wakes the
/// parked ones: a worker woken for a task that another has already run
/// parks again at once, and tidies then, instead of at the start of the
/// next change.
fn request() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get());
    for _ in 0..workers {
        tokio::spawn(async {});
    }
}

/// When the actor should ask for a tidy-up: once it has been idle for
/// `TIDY_IDLE` after a round that changed `LARGE_ROUND` proxies or more.
/// Every round, large or small, pushes a pending tidy-up back: acks of a
/// mesh-wide change trickle in for half a second, and the memory of the
/// old Configs is freed as the new ones go out.
#[derive(Debug, Default)]
pub(crate) struct Tidy {
    due: Option<Instant>,
}

impl Tidy {
    /// A round of the actor ended at `now`, having changed `changed`
    /// proxies.
    pub(crate) fn round(&mut self, changed: usize, now: Instant) {
        if changed >= LARGE_ROUND || self.due.is_some() {
            self.due = Some(now + TIDY_IDLE);
        }
    }

    /// When to ask, if a tidy-up is pending.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.due
    }

    /// The actor was idle until the due time: ask.
    pub(crate) fn fire(&mut self) {
        if self.due.take().is_some() {
            request();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_rounds_never_ask_for_a_tidy_up() {
        let mut tidy = Tidy::default();
        let t = Instant::now();
        for i in 0..100 {
            tidy.round(LARGE_ROUND - 1, t + Duration::from_millis(i));
        }
        assert_eq!(tidy.due(), None);
    }

    // `fire` spawns tasks to wake the workers: a runtime is needed.
    #[tokio::test]
    async fn a_large_round_asks_once_the_actor_is_idle() {
        let mut tidy = Tidy::default();
        let t = Instant::now();
        tidy.round(12_000, t);
        assert_eq!(tidy.due(), Some(t + TIDY_IDLE));
        // The acks that follow push it back, each by the idle time.
        let later = t + Duration::from_millis(450);
        tidy.round(3, later);
        assert_eq!(tidy.due(), Some(later + TIDY_IDLE));
        tidy.fire();
        assert_eq!(tidy.due(), None);
        // Done: small rounds after it ask for nothing more.
        tidy.round(6, later + Duration::from_secs(1));
        assert_eq!(tidy.due(), None);
    }

    #[tokio::test]
    async fn firing_when_due_bumps_the_generation() {
        let mut tidy = Tidy::default();
        let before = generation();
        // Other tests may bump it too; they only ever add.
        tidy.round(LARGE_ROUND, Instant::now());
        tidy.fire();
        assert!(generation() > before);
        assert_eq!(tidy.due(), None);
    }
}
