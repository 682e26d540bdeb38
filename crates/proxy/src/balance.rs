//! Load balancing over a service's endpoints.
//!
//! Peak-EWMA with power-of-two-choices is the default: it picks two
//! endpoints at random and takes the one with the lower expected cost,
//! where cost = peak-sensitive moving average of latency × (in-flight + 1).
//! A slow or overloaded endpoint thus gets fewer requests within a few
//! round trips, without any coordination between proxies. The average
//! decays while an endpoint gets no traffic, so one that was slow once is
//! tried again after a while.
//!
//! Least-request is P2C on requests in flight; round robin takes turns;
//! ring-hash maps a key (header, cookie or the calling instance) onto a
//! ring of virtual nodes, so that a key keeps its endpoint, and when an
//! endpoint leaves only the keys it held move.
//!
//! Every algorithm picks among the endpoints that are available (not
//! ejected, not failing health checks) and, when the caller has a zone,
//! among those of its zone while enough of them are healthy. When no
//! endpoint is available, all of them are candidates again: sending to a
//! maybe-broken endpoint beats failing for sure.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use trellis_resource::{LoadBalancerType, ZONE_LABEL};

use crate::endpoint::Endpoint;
use crate::traffic::policy::LocalityConfig;
use crate::traffic::{now_nanos, stable_hash};

/// How fast the moving average forgets: the decay time constant.
const DECAY: Duration = Duration::from_secs(10);
/// Cost assumed for an endpoint that has not answered yet, so that new
/// endpoints get traffic soon without being flooded.
const DEFAULT_RTT_NANOS: f64 = 1_000_000.0;
/// The least an endpoint's latency estimate decays to.
const MIN_COST_NANOS: f64 = 10_000.0;
/// Virtual nodes per endpoint on a hash ring. Fixed, so that an endpoint
/// leaving moves only its own keys; 256 keeps shares within a few percent.
const VNODES: usize = 256;

pub type Algorithm = LoadBalancerType;

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
        // An idle endpoint's estimate decays, so that one that was slow
        // once is tried again; the floor keeps in-flight requests counting.
        let now = self.epoch.elapsed().as_nanos() as u64;
        let idle = now.saturating_sub(self.stamp.load(Ordering::Relaxed)) as f64;
        let decayed = (ewma * (-idle / DECAY.as_nanos() as f64).exp()).max(MIN_COST_NANOS);
        decayed * (self.pending.load(Ordering::Relaxed) + 1) as f64
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

/// A hash ring: sorted (point, endpoint index) pairs.
#[derive(Debug, Default)]
pub struct Ring {
    points: Vec<(u64, u32)>,
}

impl Ring {
    /// Places `VNODES` points per endpoint, from its instance name (or
    /// address), so every proxy builds the same ring.
    pub fn build(endpoints: &[Arc<Endpoint>]) -> Ring {
        let vnodes = (65_536 / endpoints.len().max(1)).clamp(16, VNODES);
        let mut points = Vec::with_capacity(endpoints.len() * vnodes);
        for (i, ep) in endpoints.iter().enumerate() {
            let id = if ep.instance.is_empty() {
                ep.addr.to_string()
            } else {
                ep.instance.clone()
            };
            for v in 0..vnodes {
                points.push((stable_hash(format!("{id}#{v}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring { points }
    }

    /// Endpoint indexes clockwise from `hash`, each point once.
    fn walk(&self, hash: u64) -> impl Iterator<Item = usize> + '_ {
        let start = self.points.partition_point(|(p, _)| *p < hash);
        self.points[start..]
            .iter()
            .chain(&self.points[..start])
            .map(|(_, i)| *i as usize)
    }
}

/// What a pick may take into account besides the endpoints themselves.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickCtx<'a> {
    /// The request's hash key, for ring-hash.
    pub hash: Option<u64>,
    /// Endpoints already tried for this request.
    pub avoid: &'a [SocketAddr],
    /// The caller's zone.
    pub zone: Option<&'a str>,
}

/// The chosen endpoint, and what the choice had to do.
pub struct Picked<'a> {
    pub endpoint: &'a Arc<Endpoint>,
    /// The caller's zone had too few healthy endpoints: others were used.
    pub failover: bool,
    /// ring-hash without a key: a random endpoint was taken.
    pub hash_missing: bool,
}

/// How one service's endpoints are chosen: built with its snapshot.
#[derive(Debug)]
pub struct Balancer {
    pub algorithm: Algorithm,
    ring: Option<Ring>,
    locality: LocalityConfig,
    /// The caller's zone and the indexes of the endpoints in it (the zone
    /// is the proxy's own, so the first answer holds for the snapshot).
    local: OnceLock<(String, Vec<usize>)>,
}

impl Balancer {
    pub fn new(
        algorithm: Algorithm,
        locality: LocalityConfig,
        endpoints: &[Arc<Endpoint>],
    ) -> Self {
        Balancer {
            algorithm,
            ring: (algorithm == Algorithm::RingHash).then(|| Ring::build(endpoints)),
            locality,
            local: OnceLock::new(),
        }
    }

    /// Picks an endpoint of `endpoints` (the ones this balancer was built
    /// with). `rr` is the service's round-robin cursor.
    pub fn pick<'a>(
        &self,
        endpoints: &'a [Arc<Endpoint>],
        rr: &AtomicUsize,
        ctx: &PickCtx<'_>,
    ) -> Option<Picked<'a>> {
        let n = endpoints.len();
        if n == 0 {
            return None;
        }
        let now = now_nanos();
        let fresh = |i: &usize| !ctx.avoid.contains(&endpoints[*i].addr);
        let mut candidates: Vec<usize> = (0..n)
            .filter(fresh)
            .filter(|i| endpoints[*i].health.available(now))
            .collect();
        if candidates.is_empty() {
            candidates = (0..n).filter(fresh).collect();
        }
        if candidates.is_empty() {
            candidates = (0..n).collect();
        }
        let mut failover = false;
        if let (true, Some(zone)) = (self.locality.enabled, ctx.zone) {
            let in_zone_of = |zone: &str| -> Vec<usize> {
                (0..n)
                    .filter(|i| {
                        endpoints[*i].labels.get(ZONE_LABEL).map(String::as_str) == Some(zone)
                    })
                    .collect()
            };
            let cached = self
                .local
                .get_or_init(|| (zone.to_string(), in_zone_of(zone)));
            let computed;
            let local = if cached.0 == zone {
                &cached.1
            } else {
                computed = in_zone_of(zone);
                &computed
            };
            if !local.is_empty() && local.len() < n {
                let healthy = local
                    .iter()
                    .filter(|i| endpoints[**i].health.available(now))
                    .count();
                let in_zone: Vec<usize> = candidates
                    .iter()
                    .copied()
                    .filter(|i| local.contains(i))
                    .collect();
                if healthy as f64 >= self.locality.failover_threshold * local.len() as f64
                    && !in_zone.is_empty()
                {
                    candidates = in_zone;
                } else {
                    failover = true;
                }
            }
        }
        let mut hash_missing = false;
        let i = match self.algorithm {
            Algorithm::RoundRobin => {
                candidates[rr.fetch_add(1, Ordering::Relaxed) % candidates.len()]
            }
            Algorithm::PeakEwma => p2c(&candidates, |i| endpoints[i].load.cost()),
            Algorithm::LeastRequest => p2c(&candidates, |i| endpoints[i].load.pending() as f64),
            Algorithm::RingHash => match (ctx.hash, &self.ring) {
                (Some(h), Some(ring)) => {
                    let mut allowed = vec![false; n];
                    for c in &candidates {
                        allowed[*c] = true;
                    }
                    ring.walk(h).find(|i| allowed[*i]).unwrap_or(candidates[0])
                }
                _ => {
                    hash_missing = true;
                    candidates[rand::rng().random_range(0..candidates.len())]
                }
            },
        };
        Some(Picked {
            endpoint: &endpoints[i],
            failover,
            hash_missing,
        })
    }
}

/// Power of two choices: two distinct candidates at random, the cheaper.
fn p2c(candidates: &[usize], cost: impl Fn(usize) -> f64) -> usize {
    if candidates.len() == 1 {
        return candidates[0];
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..candidates.len());
    let mut b = rng.random_range(0..candidates.len() - 1);
    if b >= a {
        b += 1;
    }
    let (a, b) = (candidates[a], candidates[b]);
    if cost(a) <= cost(b) {
        a
    } else {
        b
    }
}

/// Picks with no hash key, nothing to avoid and no zone.
pub fn pick<'a>(
    algorithm: Algorithm,
    endpoints: &'a [Arc<Endpoint>],
    rr: &AtomicUsize,
) -> Option<&'a Arc<Endpoint>> {
    let locality = LocalityConfig {
        enabled: false,
        failover_threshold: 0.0,
    };
    Balancer::new(algorithm, locality, endpoints)
        .pick(endpoints, rr, &PickCtx::default())
        .map(|p| p.endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::endpoint::tests::endpoint;
    use crate::traffic::outlier::Outcome;
    use crate::traffic::policy::OutlierConfig;

    fn endpoints(n: usize, base: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| endpoint(&format!("127.0.0.1:{}", base as usize + i)))
            .collect()
    }

    fn zoned(zones: &[&str], base: u16) -> Vec<Arc<Endpoint>> {
        zones
            .iter()
            .enumerate()
            .map(|(i, z)| {
                let addr = format!("127.0.0.1:{}", base as usize + i);
                Arc::new(Endpoint::new(
                    addr.parse().unwrap(),
                    &trellis_api::v1::Endpoint {
                        address: addr.clone(),
                        instance: addr,
                        labels: [(ZONE_LABEL.to_string(), z.to_string())].into(),
                        ..Default::default()
                    },
                ))
            })
            .collect()
    }

    fn no_locality() -> LocalityConfig {
        LocalityConfig {
            enabled: false,
            failover_threshold: 0.0,
        }
    }

    fn eject(eps: &[Arc<Endpoint>], i: usize) {
        let cfg = OutlierConfig {
            consecutive_5xx: 1,
            consecutive_gateway: 0,
            interval: Duration::from_secs(10),
            base_ejection: Duration::from_secs(60),
            max_ejection: Duration::from_secs(60),
            max_ejection_percent: 100,
        };
        assert!(eps[i]
            .health
            .record(&cfg, Outcome::Status(500), eps, now_nanos()));
    }

    #[test]
    fn round_robin_cycles_and_skips_ejected_endpoints() {
        let eps = endpoints(3, 1000);
        let b = Balancer::new(Algorithm::RoundRobin, no_locality(), &eps);
        let rr = AtomicUsize::new(0);
        let port = || {
            b.pick(&eps, &rr, &PickCtx::default())
                .unwrap()
                .endpoint
                .addr
                .port()
        };
        let picks: Vec<_> = (0..6).map(|_| port()).collect();
        assert_eq!(picks, vec![1000, 1001, 1002, 1000, 1001, 1002]);
        eject(&eps, 1);
        assert!((0..10).all(|_| port() != 1001));
    }

    #[test]
    fn peak_ewma_avoids_a_slow_endpoint() {
        let eps = endpoints(2, 2000);
        eps[0].load.observe(Duration::from_millis(200));
        eps[1].load.observe(Duration::from_micros(500));
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        let rr = AtomicUsize::new(0);
        let slow = (0..100)
            .filter(|_| {
                b.pick(&eps, &rr, &PickCtx::default())
                    .unwrap()
                    .endpoint
                    .addr
                    .port()
                    == 2000
            })
            .count();
        assert_eq!(
            slow, 0,
            "with two endpoints P2C compares both and takes the fast one"
        );
    }

    #[test]
    fn least_request_prefers_the_idle_endpoint() {
        let eps = endpoints(2, 2100);
        let _busy: Vec<_> = (0..3).map(|_| eps[0].load.start()).collect();
        let b = Balancer::new(Algorithm::LeastRequest, no_locality(), &eps);
        let rr = AtomicUsize::new(0);
        assert!((0..50).all(|_| {
            b.pick(&eps, &rr, &PickCtx::default())
                .unwrap()
                .endpoint
                .addr
                .port()
                == 2101
        }));
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

    #[test]
    fn ring_hash_is_sticky_and_moves_only_the_keys_of_a_leaving_endpoint() {
        let eps = endpoints(5, 3000);
        let b = Balancer::new(Algorithm::RingHash, no_locality(), &eps);
        let rr = AtomicUsize::new(0);
        let owner = |b: &Balancer, eps: &[Arc<Endpoint>], key: u64| {
            let ctx = PickCtx {
                hash: Some(key),
                ..Default::default()
            };
            b.pick(eps, &rr, &ctx).unwrap().endpoint.addr
        };
        let keys: Vec<u64> = (0..2000)
            .map(|k| stable_hash(format!("user-{k}").as_bytes()))
            .collect();
        let before: Vec<_> = keys.iter().map(|k| owner(&b, &eps, *k)).collect();
        assert!(keys
            .iter()
            .zip(&before)
            .all(|(k, o)| owner(&b, &eps, *k) == *o));
        for ep in &eps {
            let share = before.iter().filter(|o| **o == ep.addr).count() as f64 / 2000.0;
            assert!((0.12..0.28).contains(&share), "{}: {share}", ep.addr);
        }
        let gone = eps[2].addr;
        let rest: Vec<_> = eps.iter().filter(|e| e.addr != gone).cloned().collect();
        let b2 = Balancer::new(Algorithm::RingHash, no_locality(), &rest);
        let mut moved = 0;
        for (k, old) in keys.iter().zip(&before) {
            let new = owner(&b2, &rest, *k);
            if new != *old {
                assert_eq!(*old, gone, "a key of a staying endpoint moved");
                moved += 1;
            }
        }
        assert!(moved < 2000 * 28 / 100, "{moved}");
        // Skipping an endpoint (a retry) lands where its removal would.
        let avoid = [gone];
        for k in &keys[..200] {
            let ctx = PickCtx {
                hash: Some(*k),
                avoid: &avoid,
                ..Default::default()
            };
            assert_eq!(
                b.pick(&eps, &rr, &ctx).unwrap().endpoint.addr,
                owner(&b2, &rest, *k)
            );
        }
        // No key: a random endpoint, and the caller is told.
        assert!(b.pick(&eps, &rr, &PickCtx::default()).unwrap().hash_missing);
    }

    #[test]
    fn locality_prefers_the_callers_zone_until_it_is_unhealthy() {
        let eps = zoned(&["a", "a", "b", "b", "b"], 4000);
        let locality = LocalityConfig {
            enabled: true,
            failover_threshold: 0.7,
        };
        let b = Balancer::new(Algorithm::RoundRobin, locality, &eps);
        let rr = AtomicUsize::new(0);
        let ctx = PickCtx {
            zone: Some("a"),
            ..Default::default()
        };
        for _ in 0..20 {
            let p = b.pick(&eps, &rr, &ctx).unwrap();
            assert_eq!(p.endpoint.labels[ZONE_LABEL], "a");
            assert!(!p.failover);
        }
        // One of two zone-a endpoints out: 50% < 70%, so every zone serves.
        eject(&eps, 0);
        let mut zones = std::collections::HashSet::new();
        for _ in 0..20 {
            let p = b.pick(&eps, &rr, &ctx).unwrap();
            assert!(p.failover);
            assert_ne!(p.endpoint.addr.port(), 4000);
            zones.insert(p.endpoint.labels[ZONE_LABEL].clone());
        }
        assert_eq!(zones.len(), 2);
        // A caller of a zone without endpoints uses them all, no failover.
        let other = PickCtx {
            zone: Some("c"),
            ..Default::default()
        };
        assert!(!b.pick(&eps, &rr, &other).unwrap().failover);
    }

    #[test]
    fn with_every_endpoint_out_all_are_candidates() {
        let eps = endpoints(2, 5000);
        eject(&eps, 0);
        // The ejection cap does not matter here: record() was told 100%.
        eject(&eps, 1);
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        assert!(b
            .pick(&eps, &AtomicUsize::new(0), &PickCtx::default())
            .is_some());
    }
}
