//! The peak-EWMA cost model: what an endpoint is expected to cost, from
//! the latency of its answers and its requests in flight.
//!
//! cost = latency estimate × (requests in flight + 1), where the estimate
//! follows the endpoint's answers:
//!
//! - A slower answer raises the estimate at once (peak sensitivity), but
//!   only as high as the two answers before it: a rise needs three slow
//!   answers in a row, so a slow sample or two (a scheduling stall of a
//!   busy host, a cold cache) move nothing, while a slow endpoint is seen
//!   on its third answer. Two were not enough: on a host whose CPU is
//!   contended, a tenth of answers or more can be stalled for a few
//!   milliseconds, and two in a row on one endpoint then held it down
//!   for tens of answers at a time (the `stalls_*` test of `balance.rs`).
//! - A faster answer pulls the estimate a quarter of the way down.
//! - A failure (no answer, or a 5xx) counts as a slow answer at once:
//!   at least `FAILURE_MIN`, and ten times the service's typical latency.
//! - Establishing a connection never counts: the clock of a request starts
//!   when its connection is ready.
//! - Between answers, the estimate returns toward the service's typical
//!   latency (the moving average of its endpoints' answers), by a factor e
//!   every `IDLE_TIME` and every `IDLE_ANSWERS` answers of the service.
//!   So an endpoint that was slow is tried again after a while, sooner the
//!   more traffic the service has, and an endpoint that gets no traffic
//!   is not left behind by one bad moment. Each time an endpoint is found
//!   slow or failing again when it is tried again (its estimate more than
//!   doubles at once, in a row), the return takes twice as long, up to 16
//!   times; a fast answer starts it over.
//! - An endpoint that has not answered yet costs the typical latency: a
//!   new endpoint gets its share of traffic at once.
//! - While requests wait on an endpoint that has not answered since, its
//!   latency is at least that wait: requests do not pile up on one that
//!   hangs. And while one tries again an endpoint last found slow or
//!   failing, the estimate it was found with counts until the answer.
//!
//! Everything is atomics: the request path reads and writes them with no
//! lock and no allocation. Two updates racing may lose one sample, which
//! a moving average can afford.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::traffic::now_nanos;
use crate::traffic::outlier::Outcome;

/// Typical latency assumed for a service none of whose endpoints answered
/// yet; all its endpoints then cost the same, so the value hardly matters.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;
/// How fast an idle estimate returns to the typical latency in time (a
/// factor e per this long)...
const IDLE_TIME: Duration = Duration::from_secs(10);
/// ...and in traffic: a factor e per this many answers of the service. An
/// endpoint wrongly held slow (by stalls of the host) is back within a few
/// tens of answers; one really slow is found slow again when tried, and
/// then held longer (strikes).
const IDLE_ANSWERS: f64 = 10.0;
/// Strikes counted at most: the return to typical slows down (doubles)
/// from the second strike in a row on, so up to 16 times.
const MAX_STRIKES: u32 = 5;
/// The share of the way a faster answer pulls the estimate down.
const DOWN: f64 = 0.25;
/// The weight of one answer in the service's typical latency.
const TYPICAL_WEIGHT: f64 = 1.0 / 16.0;
/// A failure counts as at least this slow...
const FAILURE_MIN_NANOS: f64 = 50_000_000.0;
/// ...and as at least this many times the service's typical latency.
const FAILURE_FACTOR: f64 = 10.0;

/// What the endpoints of one service share: their typical latency, which
/// new and idle endpoints are assumed to have, and a count of answers that
/// idle estimates decay by. Carried from one config version to the next
/// with the endpoints.
#[derive(Debug)]
pub struct Peers {
    /// f64 bits of the moving average of confirmed latencies, in
    /// nanoseconds.
    typical: AtomicU64,
    /// Answers (and failures) of every endpoint so far.
    answers: AtomicU64,
}

impl Default for Peers {
    fn default() -> Self {
        Peers {
            typical: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            answers: AtomicU64::new(0),
        }
    }
}

impl Peers {
    /// The service's typical latency, in nanoseconds.
    pub fn typical(&self) -> f64 {
        f64::from_bits(self.typical.load(Ordering::Relaxed))
    }

    fn answers(&self) -> u64 {
        self.answers.load(Ordering::Relaxed)
    }

    /// Counts an answer (with its confirmed latency when it succeeded);
    /// the answer count after it.
    fn answered(&self, latency: Option<f64>) -> u64 {
        if let Some(l) = latency {
            // An answer lifts the typical latency by a sixteenth at most:
            // one slow endpoint (or a slow first answer) hardly moves what
            // the others set, while a whole service that slows down moves
            // it within tens of answers.
            let t = self.typical();
            let next = t + TYPICAL_WEIGHT * (l.min(2.0 * t) - t);
            self.typical.store(next.to_bits(), Ordering::Relaxed);
        }
        self.answers.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// One endpoint's load figures, shared across config versions.
#[derive(Debug)]
pub struct Load {
    pending: AtomicU64,
    /// f64 bits of the latency estimate, in nanoseconds; 0 until the first
    /// answer.
    estimate: AtomicU64,
    /// f64 bits of the latencies of the previous answer and the one
    /// before it: a rise needs them.
    previous: AtomicU64,
    before: AtomicU64,
    /// `now_nanos` at the last update of the estimate...
    updated_at: AtomicU64,
    /// ...and the service's answer count then.
    updated_after: AtomicU64,
    /// `now_nanos` when the requests in flight started to wait (when
    /// `pending` last left 0).
    waiting_since: AtomicU64,
    /// Times in a row the endpoint was found slow or failing at once.
    strikes: AtomicU32,
    peers: Arc<Peers>,
}

impl Load {
    pub fn new(peers: Arc<Peers>) -> Self {
        Load {
            pending: AtomicU64::new(0),
            estimate: AtomicU64::new(0),
            previous: AtomicU64::new(0),
            before: AtomicU64::new(0),
            updated_at: AtomicU64::new(0),
            updated_after: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            strikes: AtomicU32::new(0),
            peers,
        }
    }

    /// The endpoints this one is compared with share these.
    pub fn peers(&self) -> &Arc<Peers> {
        &self.peers
    }

    /// The expected cost of one more request at `now` (`now_nanos`).
    pub fn cost(&self, now: u64) -> f64 {
        let pending = self.pending();
        let mut latency = self.latency(now);
        if pending > 0 {
            // No answer for this long, with requests waiting: the endpoint
            // is at least this slow now.
            let since = self
                .waiting_since
                .load(Ordering::Relaxed)
                .max(self.updated_at.load(Ordering::Relaxed));
            latency = latency.max(now.saturating_sub(since) as f64);
            if self.strikes.load(Ordering::Relaxed) > 0 {
                // Found slow or failing last time: one request tries it
                // again, the others wait for its answer.
                latency = latency.max(f64::from_bits(self.estimate.load(Ordering::Relaxed)));
            }
        }
        latency * (pending + 1) as f64
    }

    /// The latency estimate at `now`, in nanoseconds: the last one,
    /// returned toward the typical latency by the time and traffic since.
    pub fn latency(&self, now: u64) -> f64 {
        let typical = self.peers.typical();
        let estimate = f64::from_bits(self.estimate.load(Ordering::Relaxed));
        if estimate <= 0.0 {
            return typical;
        }
        let time = now.saturating_sub(self.updated_at.load(Ordering::Relaxed)) as f64
            / IDLE_TIME.as_nanos() as f64;
        let answers =
            self.peers
                .answers()
                .saturating_sub(self.updated_after.load(Ordering::Relaxed)) as f64
                / IDLE_ANSWERS;
        let strikes = self.strikes.load(Ordering::Relaxed);
        let slower = (1u32 << strikes.saturating_sub(1)) as f64;
        typical + (estimate - typical) * (-(time + answers) / slower).exp()
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard ends it and records its
    /// outcome.
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        let now = now_nanos();
        if self.pending.fetch_add(1, Ordering::Relaxed) == 0 {
            self.waiting_since.store(now, Ordering::Relaxed);
        }
        LoadGuard {
            load: self.clone(),
            started: now,
            done: false,
        }
    }

    /// Records one answer (`ok`) or failure that took `latency`, at `now`.
    pub fn observe(&self, now: u64, latency: Duration, ok: bool) {
        let rtt = (latency.as_nanos() as f64).max(1.0);
        let typical = self.peers.typical();
        let current = self.latency(now);
        let previous = f64::from_bits(self.previous.load(Ordering::Relaxed));
        let (next, latest, sample) = if ok {
            // What the last three answers agree on. A new endpoint's first
            // answers are confirmed by what it was assumed to cost.
            let known = |l: f64| if l > 0.0 { l } else { current };
            let before = f64::from_bits(self.before.load(Ordering::Relaxed));
            let confirmed = rtt.min(known(previous)).min(known(before));
            let next = if rtt > current {
                current.max(confirmed)
            } else {
                current + DOWN * (rtt - current)
            };
            (next, rtt, Some(confirmed))
        } else {
            let penalty = rtt.max(FAILURE_MIN_NANOS).max(FAILURE_FACTOR * typical);
            (current.max(penalty), penalty, None)
        };
        if next > 2.0 * current {
            let s = self.strikes.load(Ordering::Relaxed);
            self.strikes
                .store((s + 1).min(MAX_STRIKES), Ordering::Relaxed);
        } else if ok && rtt <= 2.0 * typical {
            self.strikes.store(0, Ordering::Relaxed);
        }
        self.estimate.store(next.to_bits(), Ordering::Relaxed);
        self.before.store(previous.to_bits(), Ordering::Relaxed);
        self.previous.store(latest.to_bits(), Ordering::Relaxed);
        self.updated_at.store(now, Ordering::Relaxed);
        let after = self.peers.answered(sample);
        self.updated_after.store(after, Ordering::Relaxed);
    }
}

/// A request in flight to an endpoint. Dropped without
/// [`finish`](Self::finish), it counts as a failure.
pub struct LoadGuard {
    load: Arc<Load>,
    /// `now_nanos` when the request's latency started to count.
    started: u64,
    done: bool,
}

impl LoadGuard {
    /// The request's connection is ready: its latency counts from now, so
    /// that a TCP and TLS handshake is never taken for a slow endpoint.
    pub fn connected(&mut self) {
        self.connected_at(now_nanos());
    }

    fn connected_at(&mut self, now: u64) {
        self.started = now;
    }

    /// Records the outcome of a completed exchange: a 5xx is a failure.
    pub fn finish(self, outcome: Outcome) {
        self.finish_at(now_nanos(), outcome);
    }

    fn finish_at(mut self, now: u64, outcome: Outcome) {
        let ok = matches!(outcome, Outcome::Status(s) if s < 500);
        self.load.observe(now, self.since(now), ok);
        self.done = true;
    }

    fn since(&self, now: u64) -> Duration {
        Duration::from_nanos(now.saturating_sub(self.started))
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if !self.done {
            // No answer (a failed connection, a reset, a timeout) or one
            // that was retried: a broken endpoint is avoided until it
            // answers again.
            let now = now_nanos();
            self.load.observe(now, self.since(now), false);
        }
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn pair() -> (Load, Load) {
        let peers = Arc::new(Peers::default());
        (Load::new(peers.clone()), Load::new(peers))
    }

    #[test]
    fn a_new_endpoint_costs_what_its_peers_typically_do() {
        let (a, b) = pair();
        assert_eq!(a.cost(0), DEFAULT_RTT_NANOS, "nothing known yet");
        for i in 0..100 {
            a.observe(i * MS, ms(4), true);
        }
        let typical = a.peers().typical();
        assert!((typical - 4e6).abs() < 1e5, "{typical}");
        assert_eq!(b.cost(100 * MS), typical, "a newcomer starts neutral");
    }

    #[test]
    fn two_slow_answers_move_nothing_and_three_in_a_row_do() {
        let (a, _) = pair();
        for i in 0..10 {
            a.observe(i * MS, ms(2), true);
        }
        let before = a.latency(10 * MS);
        let unmoved = |a: &Load, at: u64| (a.latency(at) - before).abs() < before * 1e-3;
        a.observe(10 * MS, ms(200), true);
        assert!(unmoved(&a, 10 * MS), "one slow sample is a hiccup");
        a.observe(11 * MS, ms(2), true);
        a.observe(12 * MS, ms(200), true);
        a.observe(13 * MS, ms(200), true);
        assert!(unmoved(&a, 13 * MS), "two are a stall of the host, maybe");
        a.observe(14 * MS, ms(200), true);
        assert!(
            a.latency(14 * MS) >= 199e6,
            "three in a row: the endpoint is slow"
        );
        // Fast answers pull it down a quarter of the way each.
        a.observe(15 * MS, ms(2), true);
        let l = a.latency(15 * MS);
        assert!((149e6..151e6).contains(&l), "{l}");
    }

    #[test]
    fn idle_estimates_return_to_the_typical_latency_with_time_and_traffic() {
        let (a, b) = pair();
        for i in 0..40 {
            b.observe(i * MS, ms(2), true);
        }
        let slow = |at: u64| {
            for _ in 0..3 {
                a.observe(at, ms(100), true);
            }
            a.latency(at)
        };
        // Time alone: a factor e per IDLE_TIME.
        let was = slow(40 * MS);
        assert!(was > 90e6, "{was}");
        let typical = a.peers().typical();
        let later = 40 * MS + 2 * IDLE_TIME.as_nanos() as u64;
        let expected = typical + (was - typical) * (-2.0f64).exp();
        assert!(
            (a.latency(later) - expected).abs() < 1e3,
            "{}",
            a.latency(later)
        );
        // Traffic alone: another endpoint's answers, a factor e per
        // IDLE_ANSWERS.
        let (c, d) = pair();
        for i in 0..40 {
            d.observe(i * MS, ms(2), true);
        }
        for _ in 0..3 {
            c.observe(40 * MS, ms(100), true);
        }
        let was = c.latency(40 * MS);
        for _ in 0..(IDLE_ANSWERS as u64 * 5) {
            d.observe(40 * MS, ms(2), true);
        }
        let typical = c.peers().typical();
        assert!(
            (typical - 2e6).abs() < 2e5,
            "the slow one hardly moved it: {typical}"
        );
        let l = c.latency(40 * MS);
        assert!(l < typical + (was - typical) * 0.01, "{l} from {was}");
        assert!(l >= typical, "it decays toward typical, not below");
    }

    #[test]
    fn found_slow_again_it_is_forgiven_more_slowly_until_it_answers_fast() {
        let (a, b) = pair();
        let mut now = 0;
        let mut others = |n: u64| {
            for _ in 0..n {
                now += MS;
                b.observe(now, ms(2), true);
            }
            now
        };
        let t = others(100);
        // Slow three times in a row, then 2 × IDLE_ANSWERS answers
        // elsewhere; twice.
        let after_2n = |at: u64, others: &mut dyn FnMut(u64) -> u64| {
            for _ in 0..3 {
                a.observe(at, ms(200), true);
            }
            a.latency(others(2 * IDLE_ANSWERS as u64))
        };
        let first = after_2n(t, &mut others);
        let t = others(0);
        let second = after_2n(t, &mut others);
        let typical = a.peers().typical();
        assert!(first < typical + 200e6 * 0.2, "e^-2 of the way: {first}");
        assert!(
            second > typical + 200e6 * 0.3,
            "again slow: half as fast, e^-1: {second}"
        );
        // A fast answer: forgiven at the first pace again.
        let t = others(0);
        a.observe(t, ms(2), true);
        let third = after_2n(others(0), &mut others);
        assert!(third < typical + 200e6 * 0.2, "{third}");
    }

    #[test]
    fn establishing_the_connection_is_not_latency() {
        let answer = |load: &Arc<Load>, connect: bool| {
            let mut guard = load.start();
            let t = guard.started;
            if connect {
                // A 60 ms handshake, then a 1 ms answer.
                guard.connected_at(t + 60 * MS);
            }
            guard.finish_at(t + 61 * MS, Outcome::Status(200));
        };
        let with = Arc::new(Load::new(Arc::default()));
        let without = Arc::new(Load::new(Arc::default()));
        for _ in 0..3 {
            answer(&with, true);
            answer(&without, false);
        }
        let now = now_nanos();
        assert!(with.latency(now) < 2e6, "{}", with.latency(now));
        assert!(without.latency(now) > 60e6, "{}", without.latency(now));
        assert_eq!(with.pending(), 0);
    }

    #[test]
    fn failures_cost_at_once_and_a_5xx_is_a_failure() {
        let (a, b) = pair();
        for i in 0..20 {
            b.observe(i * MS, ms(1), true);
        }
        a.observe(20 * MS, ms(1), false);
        assert!(
            a.latency(20 * MS) >= FAILURE_MIN_NANOS,
            "one failure is enough"
        );
        let load = Arc::new(Load::new(Arc::default()));
        load.start().finish(Outcome::Status(503));
        assert!(load.latency(now_nanos()) >= FAILURE_MIN_NANOS * 0.99);
        let load = Arc::new(Load::new(Arc::default()));
        drop(load.start());
        assert!(load.latency(now_nanos()) >= FAILURE_MIN_NANOS * 0.99);
        assert_eq!(load.pending(), 0);
    }

    #[test]
    fn pending_requests_raise_cost_and_so_does_waiting_long() {
        let load = Arc::new(Load::new(Arc::default()));
        let g = load.start();
        let t = g.started;
        assert_eq!(load.cost(t), 2.0 * DEFAULT_RTT_NANOS);
        // No answer after 50 ms: at least 50 ms, for each of the two.
        assert_eq!(load.cost(t + 50 * MS), 2.0 * 50e6);
        g.finish_at(t + 51 * MS, Outcome::Status(200));
        assert_eq!(load.pending(), 0);
        assert!(
            load.cost(t + 100 * MS) < 2e6,
            "idle again, the wait is over"
        );
    }
}
