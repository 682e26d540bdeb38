//! Per-label-set request figures, recorded with atomics only.
//!
//! Every finished HTTP request lands in one [`Series`]: the label set
//! (who called whom, over which route, with or without mTLS) owns a status
//! code table, a latency histogram and a failure count, all atomics. The
//! request path finds its series in a read-mostly table without allocating
//! and without taking a lock: the table is an immutable map behind an
//! `ArcSwap`, hashed by the borrowed label values, and replaced wholesale
//! (under a mutex, off the fast path) only when a label set is new.
//!
//! Both views of the figures read the same atomics: `/metrics` through the
//! [`RequestCollector`] at scrape time, and the traffic reports for `trellis
//! stat` as deltas against what the previous report saw.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::MetricType;
use trellis_api::v1::StatEntry;
use trellis_api::LATENCY_BUCKETS_MS;

use crate::metrics::{bounded_label, Direction, DurationLabels, Peers, RequestLabels};

/// Latency buckets: one per bound of `LATENCY_BUCKETS_MS`, plus overflow.
pub const BUCKETS: usize = LATENCY_BUCKETS_MS.len() + 1;

/// Distinct status codes a series counts without a lock; more are rare
/// (a service answers a handful of codes) and go to a mutex-guarded list.
const STATUS_SLOTS: usize = 8;

/// Label sets kept before new ones share one overflow series. Label values
/// can come from callers (a Host header, a plaintext caller's identity), so
/// their number must be bounded.
pub const MAX_SERIES: usize = 4096;

/// The label value every overflowed label set is recorded under.
pub const OVERFLOW: &str = "_overflow";

/// Who talks to whom, borrowed from the request's context: building one
/// costs nothing. [`Peers`] is the owned form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerNames<'a> {
    pub direction: Direction,
    pub source_namespace: &'a str,
    pub source_workload: &'a str,
    pub destination_namespace: &'a str,
    pub destination_service: &'a str,
    pub destination_workload: &'a str,
}

impl PeerNames<'_> {
    /// Every value cut to `MAX_LABEL` bytes, as the metrics keep them.
    fn bounded(&self) -> Self {
        PeerNames {
            direction: self.direction,
            source_namespace: bounded_label(self.source_namespace),
            source_workload: bounded_label(self.source_workload),
            destination_namespace: bounded_label(self.destination_namespace),
            destination_service: bounded_label(self.destination_service),
            destination_workload: bounded_label(self.destination_workload),
        }
    }

    pub fn to_owned(&self) -> Peers {
        Peers {
            direction: self.direction,
            source_namespace: self.source_namespace.to_owned(),
            source_workload: self.source_workload.to_owned(),
            destination_namespace: self.destination_namespace.to_owned(),
            destination_service: self.destination_service.to_owned(),
            destination_workload: self.destination_workload.to_owned(),
        }
    }
}

struct StatusSlot {
    /// The status code plus one (status 0 means "no response"); 0 = free.
    code: AtomicU32,
    count: AtomicU64,
}

/// Cumulative figures a traffic report last saw, read only by the reporter.
#[derive(Default)]
struct Reported {
    failures: u64,
    buckets: [u64; BUCKETS],
}

/// The figures of one label set.
pub struct Series {
    peers: Peers,
    route: String,
    tls: bool,
    statuses: [StatusSlot; STATUS_SLOTS],
    more_statuses: Mutex<Vec<(u16, u64)>>,
    /// Requests per latency bucket (not cumulative); their sum is the count.
    buckets: [AtomicU64; BUCKETS],
    sum_nanos: AtomicU64,
    /// Responses >= 500 and requests without a response. Incremented after
    /// the bucket (Release), so a reader that loads it first (Acquire) never
    /// sees a failure whose request it cannot see.
    failures: AtomicU64,
    reported: Mutex<Reported>,
}

impl Series {
    fn new(peers: Peers, route: String, tls: bool) -> Series {
        Series {
            peers,
            route,
            tls,
            statuses: std::array::from_fn(|_| StatusSlot {
                code: AtomicU32::new(0),
                count: AtomicU64::new(0),
            }),
            more_statuses: Mutex::new(Vec::new()),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            reported: Mutex::new(Reported::default()),
        }
    }

    fn matches(&self, p: &PeerNames<'_>, route: &str, tls: bool) -> bool {
        self.tls == tls
            && self.peers.direction == p.direction
            && self.route == route
            && self.peers.destination_service == p.destination_service
            && self.peers.destination_workload == p.destination_workload
            && self.peers.source_workload == p.source_workload
            && self.peers.source_namespace == p.source_namespace
            && self.peers.destination_namespace == p.destination_namespace
    }

    fn record(&self, status: u16, elapsed: Duration) {
        self.count_status(status);
        let ms = elapsed.as_secs_f64() * 1000.0;
        let bucket = LATENCY_BUCKETS_MS
            .iter()
            .position(|b| ms <= *b)
            .unwrap_or(LATENCY_BUCKETS_MS.len());
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        if status == 0 || status >= 500 {
            self.failures.fetch_add(1, Ordering::Release);
        }
    }

    fn count_status(&self, status: u16) {
        let code = u32::from(status) + 1;
        for slot in &self.statuses {
            match slot.code.load(Ordering::Acquire) {
                c if c == code => {
                    slot.count.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                0 => match slot
                    .code
                    .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
                {
                    Ok(_) => {
                        slot.count.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    // Another request claimed it meanwhile, maybe for this code.
                    Err(c) if c == code => {
                        slot.count.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(_) => continue,
                },
                _ => continue,
            }
        }
        let mut more = self.more_statuses.lock().unwrap_or_else(|e| e.into_inner());
        match more.iter_mut().find(|(c, _)| *c == status) {
            Some((_, n)) => *n += 1,
            None => more.push((status, 1)),
        }
    }

    /// (status code, requests) for every code seen, in no particular order.
    fn statuses(&self) -> Vec<(u16, u64)> {
        let mut out: Vec<(u16, u64)> = self
            .statuses
            .iter()
            .filter_map(|s| {
                let code = s.code.load(Ordering::Acquire);
                (code != 0).then(|| ((code - 1) as u16, s.count.load(Ordering::Relaxed)))
            })
            .collect();
        out.extend(
            self.more_statuses
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .copied(),
        );
        out
    }

    /// What changed since the previous call, as a report entry; `None`
    /// when nothing did.
    fn delta(&self) -> Option<StatEntry> {
        let failures = self.failures.load(Ordering::Acquire);
        let now: [u64; BUCKETS] = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let mut last = self.reported.lock().unwrap_or_else(|e| e.into_inner());
        let buckets: Vec<u64> = now
            .iter()
            .zip(last.buckets.iter())
            .map(|(n, l)| n - l)
            .collect();
        let requests: u64 = buckets.iter().sum();
        if requests == 0 {
            return None;
        }
        // A failure is counted after its bucket, so the failures seen are
        // never more than the requests seen in all; within one delta they
        // are capped, and what is capped is carried to the next report.
        let failed = (failures - last.failures).min(requests);
        last.failures += failed;
        last.buckets = now;
        let p = &self.peers;
        Some(StatEntry {
            direction: p.direction.as_str().to_string(),
            source_namespace: p.source_namespace.clone(),
            source_workload: p.source_workload.clone(),
            destination_namespace: p.destination_namespace.clone(),
            destination_service: p.destination_service.clone(),
            destination_workload: p.destination_workload.clone(),
            route: self.route.clone(),
            requests,
            failures: failed,
            tls_requests: if self.tls { requests } else { 0 },
            latency_buckets: buckets,
        })
    }
}

type Buckets = HashMap<u64, Vec<Arc<Series>>, BuildNoHash>;

/// The table of every series, read without locks.
pub struct SeriesTable {
    hasher: foldhash::fast::RandomState,
    map: ArcSwap<Buckets>,
    /// Serialises inserts; never taken by a request whose series exists.
    insert: Mutex<()>,
}

impl Default for SeriesTable {
    fn default() -> Self {
        SeriesTable {
            hasher: foldhash::fast::RandomState::default(),
            map: ArcSwap::from_pointee(Buckets::default()),
            insert: Mutex::new(()),
        }
    }
}

impl SeriesTable {
    fn hash(&self, p: &PeerNames<'_>, route: &str, tls: bool) -> u64 {
        let mut h = self.hasher.build_hasher();
        (p.direction as u8).hash(&mut h);
        p.source_namespace.hash(&mut h);
        p.source_workload.hash(&mut h);
        p.destination_namespace.hash(&mut h);
        p.destination_service.hash(&mut h);
        p.destination_workload.hash(&mut h);
        route.hash(&mut h);
        tls.hash(&mut h);
        h.finish()
    }

    /// Records one finished request. `status` is 0 when no response came.
    pub fn record(
        &self,
        peers: PeerNames<'_>,
        route: &str,
        status: u16,
        tls: bool,
        elapsed: Duration,
    ) {
        let peers = peers.bounded();
        let route = bounded_label(route);
        let hash = self.hash(&peers, route, tls);
        {
            let map = self.map.load();
            if let Some(s) = find(&map, hash, &peers, route, tls) {
                s.record(status, elapsed);
                return;
            }
        }
        self.insert(hash, peers, route, tls).record(status, elapsed);
    }

    #[cold]
    fn insert(&self, hash: u64, peers: PeerNames<'_>, route: &str, tls: bool) -> Arc<Series> {
        let _guard = self.insert.lock().unwrap_or_else(|e| e.into_inner());
        let map = self.map.load_full();
        if let Some(s) = find(&map, hash, &peers, route, tls) {
            return s.clone();
        }
        let len: usize = map.values().map(Vec::len).sum();
        if len >= MAX_SERIES {
            let overflow = PeerNames {
                direction: peers.direction,
                source_namespace: OVERFLOW,
                source_workload: OVERFLOW,
                destination_namespace: OVERFLOW,
                destination_service: OVERFLOW,
                destination_workload: OVERFLOW,
            };
            let hash = self.hash(&overflow, OVERFLOW, tls);
            if let Some(s) = find(&map, hash, &overflow, OVERFLOW, tls) {
                return s.clone();
            }
            tracing::warn!(
                max = MAX_SERIES,
                "too many distinct request label sets; new ones are counted under {OVERFLOW}"
            );
            return self.add(&map, hash, &overflow, OVERFLOW, tls);
        }
        self.add(&map, hash, &peers, route, tls)
    }

    fn add(
        &self,
        map: &Buckets,
        hash: u64,
        peers: &PeerNames<'_>,
        route: &str,
        tls: bool,
    ) -> Arc<Series> {
        let series = Arc::new(Series::new(peers.to_owned(), route.to_owned(), tls));
        let mut next = map.clone();
        next.entry(hash).or_default().push(series.clone());
        self.map.store(Arc::new(next));
        series
    }

    fn all(&self) -> Vec<Arc<Series>> {
        self.map.load().values().flatten().cloned().collect()
    }

    /// Figures since the previous call, one entry per series that changed.
    pub fn take_deltas(&self) -> Vec<StatEntry> {
        self.all().iter().filter_map(|s| s.delta()).collect()
    }

    /// How many label sets are kept.
    pub fn series_count(&self) -> usize {
        self.map.load().values().map(Vec::len).sum()
    }
}

fn find<'m>(
    map: &'m Buckets,
    hash: u64,
    peers: &PeerNames<'_>,
    route: &str,
    tls: bool,
) -> Option<&'m Arc<Series>> {
    map.get(&hash)?
        .iter()
        .find(|s| s.matches(peers, route, tls))
}

/// The keys are already hashes.
#[derive(Clone, Copy, Default)]
pub struct BuildNoHash;

impl BuildHasher for BuildNoHash {
    type Hasher = NoHash;
    fn build_hasher(&self) -> NoHash {
        NoHash(0)
    }
}

pub struct NoHash(u64);

impl Hasher for NoHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// `trellis_requests_total` and `trellis_request_duration_seconds`, read
/// from the series table at scrape time.
#[derive(Clone)]
pub struct RequestCollector(pub Arc<SeriesTable>);

impl std::fmt::Debug for RequestCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestCollector").finish_non_exhaustive()
    }
}

impl Collector for RequestCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut all = self.0.all();
        // A stable order makes scrapes easy to compare.
        all.sort_by(|a, b| {
            (
                a.peers.direction as u8,
                &a.peers.destination_service,
                &a.route,
            )
                .cmp(&(
                    b.peers.direction as u8,
                    &b.peers.destination_service,
                    &b.route,
                ))
        });
        {
            let mut family = encoder.encode_descriptor(
                "trellis_requests",
                "HTTP requests handled",
                None,
                MetricType::Counter,
            )?;
            for s in &all {
                let mut statuses = s.statuses();
                statuses.sort_unstable();
                for (code, n) in statuses {
                    let labels = RequestLabels {
                        peers: s.peers.clone(),
                        route: s.route.clone(),
                        status_code: code,
                        tls: s.tls,
                    };
                    ConstCounter::new(n).encode(family.encode_family(&labels)?)?;
                }
            }
        }
        let mut family = encoder.encode_descriptor(
            "trellis_request_duration_seconds",
            "Time from request to response headers",
            None,
            MetricType::Histogram,
        )?;
        for s in &all {
            let counts: [u64; BUCKETS] =
                std::array::from_fn(|i| s.buckets[i].load(Ordering::Relaxed));
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_MS
                .iter()
                .map(|ms| ms / 1000.0)
                .chain(std::iter::once(f64::MAX))
                .zip(counts)
                .collect();
            let count = counts.iter().sum();
            let sum = s.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
            let labels = DurationLabels {
                peers: s.peers.clone(),
                route: s.route.clone(),
                tls: s.tls,
            };
            family
                .encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    sum, count, &buckets, None,
                )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(service: &str) -> PeerNames<'_> {
        PeerNames {
            direction: Direction::outbound,
            source_namespace: "default",
            source_workload: "frontend",
            destination_namespace: "default",
            destination_service: service,
            destination_workload: "v1",
        }
    }

    #[test]
    fn concurrent_requests_are_all_counted_once() {
        let table = Arc::new(SeriesTable::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let table = table.clone();
                std::thread::spawn(move || {
                    for i in 0..2_500u32 {
                        let service = ["a", "b"][(i % 2) as usize];
                        let status = if i % 10 == t { 503 } else { 200 };
                        table.record(names(service), "r", status, true, Duration::from_millis(2));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(table.series_count(), 2);
        let entries = table.take_deltas();
        assert_eq!(entries.iter().map(|e| e.requests).sum::<u64>(), 10_000);
        assert_eq!(entries.iter().map(|e| e.tls_requests).sum::<u64>(), 10_000);
        assert_eq!(entries.iter().map(|e| e.failures).sum::<u64>(), 1_000);
        for e in &entries {
            assert_eq!(e.latency_buckets.iter().sum::<u64>(), e.requests);
            // 2 ms falls in the (1, 2] bucket.
            assert_eq!(e.latency_buckets[1], e.requests);
        }
        assert!(table.take_deltas().is_empty(), "a report takes the deltas");
        table.record(names("a"), "r", 200, true, Duration::from_millis(2));
        let again = table.take_deltas();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].requests, 1);
    }

    #[test]
    fn many_status_codes_are_all_kept() {
        let table = SeriesTable::default();
        for code in 200..220u16 {
            for _ in 0..code - 199 {
                table.record(names("a"), "", code, false, Duration::from_millis(1));
            }
        }
        table.record(names("a"), "", 0, false, Duration::from_millis(1));
        let s = &table.all()[0];
        let mut st = s.statuses();
        st.sort_unstable();
        assert_eq!(st.len(), 21);
        assert_eq!(st[0], (0, 1));
        assert_eq!(st[20], (219, 20));
    }

    #[test]
    fn label_sets_beyond_the_bound_share_one_series() {
        let table = SeriesTable::default();
        for i in 0..MAX_SERIES + 50 {
            let service = format!("svc-{i}");
            table.record(names(&service), "", 200, false, Duration::from_millis(1));
        }
        assert_eq!(table.series_count(), MAX_SERIES + 1);
        let entries = table.take_deltas();
        let overflow = entries
            .iter()
            .find(|e| e.destination_service == OVERFLOW)
            .expect("an overflow series");
        assert_eq!(overflow.requests, 50);
    }

    #[test]
    fn long_label_values_are_cut() {
        let table = SeriesTable::default();
        let long = "x".repeat(1000);
        table.record(names(&long), "", 200, false, Duration::from_millis(1));
        table.record(
            names(&long[..500]),
            "",
            200,
            false,
            Duration::from_millis(1),
        );
        assert_eq!(table.series_count(), 1, "both cut to the same value");
        let e = &table.take_deltas()[0];
        assert_eq!(e.destination_service.len(), crate::metrics::MAX_LABEL);
        assert_eq!(e.requests, 2);
    }
}
