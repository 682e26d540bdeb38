//! Load balancing over a service's endpoints.
//!
//! Peak-EWMA with power-of-two-choices is the default: it picks two
//! endpoints at random and takes the one with the lower expected cost,
//! where cost = peak-sensitive moving average of latency × (in-flight + 1).
//! A slow or overloaded endpoint thus gets fewer requests within a few
//! round trips, without any coordination between proxies.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;

use crate::endpoint::Endpoint;

/// How fast the moving average forgets: the decay time constant.
const DECAY: Duration = Duration::from_secs(10);
/// Cost assumed for an endpoint that has not answered yet, so that new
/// endpoints get traffic soon without being flooded.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    PeakEwma,
    RoundRobin,
}

/// Per-endpoint load figures, shared across config versions.
pub struct Load {
    pending: AtomicU64,
    /// f64 bits of the moving average, in nanoseconds.
    ewma: AtomicU64,
    /// Nanoseconds since `epoch` of the last update.
    stamp: AtomicU64,
    epoch: Instant,
}

impl Default for Load {
    fn default() -> Self {
        Load {
            pending: AtomicU64::new(0),
            ewma: AtomicU64::new(DEFAULT_RTT_NANOS.to_bits()),
            stamp: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Load {
    pub fn cost(&self) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        ewma * (self.pending.load(Ordering::Relaxed) + 1) as f64
    }

    /// Marks a request as started; the guard ends it and records its latency.
    pub fn start(self: &Arc<Self>) -> LoadGuard {
        self.pending.fetch_add(1, Ordering::Relaxed);
        LoadGuard {
            load: self.clone(),
            started: Instant::now(),
            done: false,
        }
    }

    fn observe(&self, rtt: Duration) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let last = self.stamp.swap(now, Ordering::Relaxed);
        let rtt = rtt.as_nanos() as f64;
        let prev = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        // Peak sensitivity: a slower answer replaces the average at once;
        // faster answers pull it down with exponential decay.
        let next = if rtt > prev {
            rtt
        } else {
            let elapsed = now.saturating_sub(last) as f64;
            let w = (-elapsed / DECAY.as_nanos() as f64).exp();
            prev * w + rtt * (1.0 - w)
        };
        // Races between two updates lose one sample; that is fine for an average.
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
    }

    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Relaxed)
    }
}

pub struct LoadGuard {
    load: Arc<Load>,
    started: Instant,
    done: bool,
}

impl LoadGuard {
    /// Records the latency of a completed exchange.
    pub fn finish(mut self) {
        self.load.observe(self.started.elapsed());
        self.done = true;
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        if !self.done {
            // A failed or cancelled request counts as slow, so a broken
            // endpoint is avoided until it answers again.
            self.load
                .observe(self.started.elapsed().max(Duration::from_millis(50)));
        }
        self.load.pending.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks an endpoint. `rr` is the service's round-robin cursor.
pub fn pick<'a>(
    alg: Algorithm,
    endpoints: &'a [Arc<Endpoint>],
    rr: &AtomicUsize,
) -> Option<&'a Arc<Endpoint>> {
    match endpoints.len() {
        0 => None,
        1 => endpoints.first(),
        n => match alg {
            Algorithm::RoundRobin => endpoints.get(rr.fetch_add(1, Ordering::Relaxed) % n),
            Algorithm::PeakEwma => {
                let mut rng = rand::rng();
                let a = rng.random_range(0..n);
                let mut b = rng.random_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let (ea, eb) = (&endpoints[a], &endpoints[b]);
                Some(if ea.load.cost() <= eb.load.cost() {
                    ea
                } else {
                    eb
                })
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::endpoint;

    #[test]
    fn round_robin_cycles() {
        let eps: Vec<_> = (0..3)
            .map(|i| endpoint(&format!("127.0.0.1:{}", 1000 + i)))
            .collect();
        let rr = AtomicUsize::new(0);
        let picks: Vec<_> = (0..6)
            .map(|_| pick(Algorithm::RoundRobin, &eps, &rr).unwrap().addr.port())
            .collect();
        assert_eq!(picks, vec![1000, 1001, 1002, 1000, 1001, 1002]);
    }

    #[test]
    fn peak_ewma_avoids_a_slow_endpoint() {
        let eps: Vec<_> = (0..2)
            .map(|i| endpoint(&format!("127.0.0.1:{}", 2000 + i)))
            .collect();
        eps[0].load.observe(Duration::from_millis(200));
        eps[1].load.observe(Duration::from_micros(500));
        let rr = AtomicUsize::new(0);
        let slow = (0..100)
            .filter(|_| pick(Algorithm::PeakEwma, &eps, &rr).unwrap().addr.port() == 2000)
            .count();
        assert_eq!(
            slow, 0,
            "with two endpoints P2C compares both and takes the fast one"
        );
    }

    #[test]
    fn pending_requests_raise_cost() {
        let load = Arc::new(Load::default());
        let idle = load.cost();
        let g = load.start();
        assert!(load.cost() > idle);
        g.finish();
        assert_eq!(load.pending(), 0);
    }
}
