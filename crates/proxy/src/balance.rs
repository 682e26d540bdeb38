//! Load balancing over a service's endpoints.
//!
//! Peak-EWMA with power-of-two-choices is the default: it picks two
//! endpoints at random and takes the cheaper more often, where cost =
//! peak-sensitive moving average of latency × (in-flight + 1) (the model
//! is `load.rs`'s). The cheaper of the two wins with probability
//! cost_b² / (cost_a² + cost_b²): equal costs are a coin flip, so equal
//! endpoints share sequential traffic evenly whatever the noise in their
//! figures, while one three times as costly wins one time in ten, and a
//! slow or failing one (ten times and more) about never. A slow or
//! overloaded endpoint thus gets fewer requests within a few round trips,
//! without any coordination between proxies.
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
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use rand::Rng;
use trellis_resource::{LoadBalancerType, ZONE_LABEL};

use crate::endpoint::Endpoint;
use crate::traffic::policy::LocalityConfig;
use crate::traffic::{now_nanos, stable_hash};

mod load;

pub use load::{Load, LoadGuard, Peers};

/// Virtual nodes per endpoint on a hash ring. Fixed, so that an endpoint
/// leaving moves only its own keys; 256 keeps shares within a few percent.
const VNODES: usize = 256;

pub type Algorithm = LoadBalancerType;

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
    /// with). `rr` is the service's round-robin cursor. Allocates nothing:
    /// the candidates are a filter over `endpoints`, not a list.
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
        let mut c = Candidates {
            endpoints,
            avoid: ctx.avoid,
            now,
            level: Level::Available,
            zone: None,
        };
        if !(0..n).any(|i| c.contains(i)) {
            c.level = Level::Fresh;
            if !(0..n).any(|i| c.contains(i)) {
                c.level = Level::Any;
            }
        }
        let mut failover = false;
        // The zone's endpoints when the caller's zone is not the cached one.
        let computed;
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
                let in_zone = Candidates {
                    zone: Some(local),
                    ..c
                };
                if healthy as f64 >= self.locality.failover_threshold * local.len() as f64
                    && local.iter().any(|i| in_zone.contains(*i))
                {
                    c = in_zone;
                } else {
                    failover = true;
                }
            }
        }
        let count = (0..n).filter(|i| c.contains(*i)).count();
        let mut hash_missing = false;
        let i = match self.algorithm {
            Algorithm::RoundRobin => c.nth(rr.fetch_add(1, Ordering::Relaxed) % count),
            Algorithm::PeakEwma => {
                let (a, b) = two(&c, count);
                weighted_cheaper(a, b, |i| endpoints[i].load.cost(now))
            }
            Algorithm::LeastRequest => {
                let (a, b) = two(&c, count);
                // `a` is the random one of the two: ties go either way.
                if endpoints[b].load.pending() < endpoints[a].load.pending() {
                    b
                } else {
                    a
                }
            }
            Algorithm::RingHash => match (ctx.hash, &self.ring) {
                (Some(h), Some(ring)) => ring
                    .walk(h)
                    .find(|i| c.contains(*i))
                    .unwrap_or_else(|| c.nth(0)),
                _ => {
                    hash_missing = true;
                    c.nth(rand::rng().random_range(0..count))
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

/// Which endpoints a pick may choose: the first level that leaves any.
#[derive(Clone, Copy)]
enum Level {
    /// Not tried for this request, not ejected, passing health checks.
    Available,
    /// Not tried for this request.
    Fresh,
    Any,
}

/// The candidates of one pick, as a filter over the service's endpoints.
#[derive(Clone, Copy)]
struct Candidates<'a> {
    endpoints: &'a [Arc<Endpoint>],
    avoid: &'a [SocketAddr],
    now: u64,
    level: Level,
    /// The indexes (sorted) of the endpoints in the caller's zone, when
    /// the pick keeps to it.
    zone: Option<&'a [usize]>,
}

impl Candidates<'_> {
    fn contains(&self, i: usize) -> bool {
        let ep = &self.endpoints[i];
        let fresh = || !self.avoid.contains(&ep.addr);
        let level = match self.level {
            Level::Available => fresh() && ep.health.available(self.now),
            Level::Fresh => fresh(),
            Level::Any => true,
        };
        level && self.zone.is_none_or(|z| z.binary_search(&i).is_ok())
    }

    /// The index of the `k`th candidate (`k` < their count).
    fn nth(&self, k: usize) -> usize {
        (0..self.endpoints.len())
            .filter(|i| self.contains(*i))
            .nth(k)
            .expect("k is less than the number of candidates")
    }
}

/// Power of two choices: two distinct candidates at random (the same one
/// twice when there is only one), of `count`.
fn two(c: &Candidates<'_>, count: usize) -> (usize, usize) {
    if count == 1 {
        let only = c.nth(0);
        return (only, only);
    }
    let mut rng = rand::rng();
    let a = rng.random_range(0..count);
    let mut b = rng.random_range(0..count - 1);
    if b >= a {
        b += 1;
    }
    (c.nth(a), c.nth(b))
}

/// One of `a` and `b`, the cheaper more likely: `a` with probability
/// cost_b² / (cost_a² + cost_b²). Equal costs are a coin flip, so noise
/// in the figures of equal endpoints does not send all sequential traffic
/// to whichever looks a little cheaper; a cost 3× the other's wins 1 time
/// in 10, 10× 1 in 100.
fn weighted_cheaper(a: usize, b: usize, cost: impl Fn(usize) -> f64) -> usize {
    if a == b {
        return a;
    }
    let (ca, cb) = (cost(a), cost(b));
    let (wa, wb) = (cb * cb, ca * ca);
    let total = wa + wb;
    let r: f64 = rand::rng().random();
    if !(total.is_finite() && total > 0.0) {
        return if r < 0.5 { a } else { b };
    }
    if r * total < wa {
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
    use std::time::Duration;

    use crate::endpoint::tests::endpoint_among;
    use crate::traffic::outlier::Outcome;
    use crate::traffic::policy::OutlierConfig;

    /// `n` endpoints of one service.
    fn endpoints(n: usize, base: u16) -> Vec<Arc<Endpoint>> {
        let peers = Arc::new(Peers::default());
        (0..n)
            .map(|i| endpoint_among(&format!("127.0.0.1:{}", base as usize + i), &peers))
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
                    &Arc::default(),
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

    /// How many of `picks` go to each endpoint, each pick answered at
    /// once after `latency(endpoint index, pick number)`: sequential
    /// traffic, on a clock that runs ahead of the real one (so estimates
    /// decay by traffic only).
    fn sequential(
        b: &Balancer,
        eps: &[Arc<Endpoint>],
        picks: usize,
        latency: impl Fn(usize, usize) -> Duration,
    ) -> Vec<usize> {
        let rr = AtomicUsize::new(0);
        let mut now = now_nanos();
        let mut got = vec![0; eps.len()];
        for k in 0..picks {
            let ep = b.pick(eps, &rr, &PickCtx::default()).unwrap().endpoint;
            let i = eps.iter().position(|e| Arc::ptr_eq(e, ep)).unwrap();
            got[i] += 1;
            let l = latency(i, k);
            now += l.as_nanos() as u64;
            ep.load.observe(now, l, true);
        }
        got
    }

    #[test]
    fn peak_ewma_sends_a_slow_endpoint_almost_nothing() {
        let eps = endpoints(3, 2000);
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        let got = sequential(&b, &eps, 1000, |i, _| {
            Duration::from_micros(if i == 0 { 200_500 } else { 500 })
        });
        // Its first answers (it started neutral) and rare probes.
        assert!(got[0] <= 20, "{got:?}");
    }

    #[test]
    fn peak_ewma_shares_sequential_traffic_evenly_despite_noise() {
        let eps = endpoints(2, 2200);
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        // Equal endpoints whose answers vary from 0.6 to 1.4 ms, one in
        // 25 of them 40 ms (a scheduling hiccup), two in a row now and then.
        let got = sequential(&b, &eps, 2000, |_, k| {
            let hiccup = k % 25 == 0 || k % 301 == 1;
            Duration::from_micros(if hiccup {
                40_000
            } else {
                600 + (k * 7919 % 800) as u64
            })
        });
        assert!(got.iter().all(|n| *n >= 800), "{got:?}");
    }

    /// A busy host: one answer in ten, at random, is stalled 5 to 10 ms
    /// (the proxy or the app was not scheduled), twenty times the usual
    /// 0.3 ms. Each of two equal endpoints still gets at least 35% of 300
    /// sequential requests in nearly every run. When two stalls in a row
    /// were enough to raise an estimate, about one run in nine fell below.
    #[test]
    fn stalls_of_a_busy_host_do_not_starve_an_equal_endpoint() {
        let runs = 200;
        let unfair = (0..runs)
            .filter(|_| {
                let eps = endpoints(2, 2250);
                let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
                let got = sequential(&b, &eps, 300, |_, _| {
                    let mut r = rand::rng();
                    Duration::from_micros(if r.random_bool(0.1) {
                        r.random_range(5_000..10_000)
                    } else {
                        r.random_range(300..450)
                    })
                });
                got.iter().any(|n| (*n as f64) < 0.35 * 300.0)
            })
            .count();
        assert!(unfair <= runs / 25, "{unfair} of {runs} runs were unfair");
    }

    #[test]
    fn a_new_endpoint_gets_its_share_at_once() {
        let peers = Arc::new(Peers::default());
        let mut eps: Vec<_> = (0..2)
            .map(|i| endpoint_among(&format!("127.0.0.1:{}", 2300 + i), &peers))
            .collect();
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        sequential(&b, &eps, 500, |_, _| Duration::from_millis(2));
        // A scale-up: the newcomer costs what the others typically do.
        eps.push(endpoint_among("127.0.0.1:2302", &peers));
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        let got = sequential(&b, &eps, 300, |_, _| Duration::from_millis(2));
        assert!(got[2] >= 60, "{got:?}");
    }

    #[test]
    fn equal_costs_are_a_coin_flip() {
        let eps = endpoints(2, 2400);
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        let rr = AtomicUsize::new(0);
        let first = (0..1000)
            .filter(|_| {
                let p = b.pick(&eps, &rr, &PickCtx::default()).unwrap();
                Arc::ptr_eq(p.endpoint, &eps[0])
            })
            .count();
        assert!((400..=600).contains(&first), "{first}");
    }

    #[test]
    fn a_failing_endpoint_is_avoided_after_one_failure() {
        let eps = endpoints(2, 2500);
        let b = Balancer::new(Algorithm::PeakEwma, no_locality(), &eps);
        sequential(&b, &eps, 100, |_, _| Duration::from_millis(1));
        eps[0]
            .load
            .observe(now_nanos(), Duration::from_millis(1), false);
        let rr = AtomicUsize::new(0);
        let failing = (0..100)
            .filter(|_| {
                let p = b.pick(&eps, &rr, &PickCtx::default()).unwrap();
                Arc::ptr_eq(p.endpoint, &eps[0])
            })
            .count();
        assert!(failing <= 3, "{failing}");
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
