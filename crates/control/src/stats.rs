//! Golden signals from the proxies' traffic reports.
//!
//! Proxies send deltas (`StatsReport`); this module keeps them, time-stamped,
//! for `RETENTION`, and sums any window up to that for `/api/v1/stat`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;
use trellis_api::v1::{StatEntry, StatsReport};
use trellis_api::LATENCY_BUCKETS_MS;

/// How often proxies report (trellis-proxy's STATS_INTERVAL).
const REPORT_INTERVAL: Duration = Duration::from_secs(2);

/// The longest window a query may ask for.
pub const RETENTION: Duration = Duration::from_secs(300);
/// Bounds memory whatever proxies send: about 100 MB at worst. A mesh of
/// 1,000 proxies reporting 20 series every 10s keeps 600,000 for 5 minutes.
const MAX_SAMPLES: usize = 1_000_000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum StatsError {
    #[error("unknown stat kind {0:?}: use service, workload or route")]
    Kind(String),
    #[error("bad window {0:?}: use a duration such as 30s, 1m or 5m (at most 5m)")]
    Window(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatKind {
    Service,
    Workload,
    Route,
}

impl StatKind {
    pub fn parse(s: &str) -> Result<Self, StatsError> {
        match s.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => Ok(StatKind::Service),
            "workload" | "workloads" | "wl" => Ok(StatKind::Workload),
            "route" | "routes" | "httproute" | "httproutes" => Ok(StatKind::Route),
            _ => Err(StatsError::Kind(s.to_string())),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            StatKind::Service => "service",
            StatKind::Workload => "workload",
            StatKind::Route => "route",
        }
    }
}

/// Parses a window such as `30s`, `5m`, `1m30s` or `500ms`, between 1s and
/// `RETENTION`.
pub fn parse_window(s: &str) -> Result<Duration, StatsError> {
    match trellis_resource::parse_duration_loose(s) {
        Ok(d) if (Duration::from_secs(1)..=RETENTION).contains(&d) => Ok(d),
        _ => Err(StatsError::Window(s.to_string())),
    }
}

/// One entry of a report, as kept.
#[derive(Clone, Debug)]
struct Sample {
    at: Instant,
    inbound: bool,
    source_namespace: String,
    source_workload: String,
    destination_namespace: String,
    destination_service: String,
    destination_workload: String,
    route: String,
    requests: u64,
    failures: u64,
    tls_requests: u64,
    /// Always `LATENCY_BUCKETS_MS.len() + 1` long.
    buckets: Vec<u64>,
}

impl Sample {
    fn new(at: Instant, e: &StatEntry) -> Self {
        let n = LATENCY_BUCKETS_MS.len();
        let mut buckets = vec![0; n + 1];
        for (i, c) in e.latency_buckets.iter().enumerate() {
            // A proxy built with more buckets: the extra ones overflow.
            buckets[i.min(n)] += c;
        }
        Sample {
            at,
            inbound: e.direction == "inbound",
            source_namespace: e.source_namespace.clone(),
            source_workload: e.source_workload.clone(),
            destination_namespace: e.destination_namespace.clone(),
            destination_service: e.destination_service.clone(),
            destination_workload: e.destination_workload.clone(),
            route: e.route.clone(),
            requests: e.requests,
            failures: e.failures.min(e.requests),
            tls_requests: e.tls_requests.min(e.requests),
            buckets,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Totals {
    /// When the oldest sample in the window arrived.
    first: Option<Instant>,
    requests: u64,
    failures: u64,
    tls_requests: u64,
    buckets: Vec<u64>,
}

impl Totals {
    fn add(&mut self, s: &Sample) {
        self.first = Some(self.first.map_or(s.at, |f| f.min(s.at)));
        self.requests += s.requests;
        self.failures += s.failures;
        self.tls_requests += s.tls_requests;
        if self.buckets.len() < s.buckets.len() {
            self.buckets.resize(s.buckets.len(), 0);
        }
        for (t, c) in self.buckets.iter_mut().zip(&s.buckets) {
            *t += c;
        }
    }
}

/// One row of `/api/v1/stat`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct StatRow {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    /// For route rows: the service the route belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    pub requests: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub tls_share: Option<f64>,
    /// The counts behind the shares and quantiles, so a client can merge
    /// rows of several replicas exactly: failed and mTLS requests, and the
    /// latency histogram (`LATENCY_BUCKETS_MS` bounds, then overflow).
    pub failures: u64,
    pub tls_requests: u64,
    pub latency_buckets: Vec<u64>,
}

/// The kept reports. Locked only for short, non-async sections.
#[derive(Debug, Default)]
pub struct Stats {
    samples: Mutex<VecDeque<Sample>>,
}

impl Stats {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn record(&self, report: &StatsReport) {
        self.record_at(Instant::now(), report);
    }

    pub fn record_at(&self, now: Instant, report: &StatsReport) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        for e in &report.entries {
            if e.requests > 0 {
                samples.push_back(Sample::new(now, e));
            }
        }
        // Reports arrive in time order, so the oldest are at the front.
        while samples.len() > MAX_SAMPLES
            || samples
                .front()
                .is_some_and(|s| now.saturating_duration_since(s.at) > RETENTION)
        {
            samples.pop_front();
        }
    }

    pub fn query(&self, kind: StatKind, window: Duration) -> Vec<StatRow> {
        self.query_at(Instant::now(), kind, window)
    }

    pub fn query_at(&self, now: Instant, kind: StatKind, window: Duration) -> Vec<StatRow> {
        // (namespace, name, route) -> totals; route is empty but for routes.
        type Groups = BTreeMap<(String, String, String), Totals>;
        let mut inbound: Groups = BTreeMap::new();
        let mut outbound: Groups = BTreeMap::new();
        {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            for s in samples
                .iter()
                .filter(|s| now.saturating_duration_since(s.at) <= window)
            {
                let key = match kind {
                    StatKind::Service => (
                        s.destination_namespace.clone(),
                        s.destination_service.clone(),
                        String::new(),
                    ),
                    StatKind::Workload if s.inbound => (
                        s.destination_namespace.clone(),
                        s.destination_workload.clone(),
                        String::new(),
                    ),
                    StatKind::Route if !s.inbound => (
                        s.destination_namespace.clone(),
                        s.destination_service.clone(),
                        s.route.clone(),
                    ),
                    _ => continue,
                };
                if key.1.is_empty() {
                    continue;
                }
                let groups = if s.inbound {
                    &mut inbound
                } else {
                    &mut outbound
                };
                groups.entry(key).or_default().add(s);
            }
        }
        let mut groups = inbound;
        // A service whose endpoints report no inbound traffic (no proxy, or
        // a proxy that is not meshed) is seen only by its callers.
        if kind == StatKind::Service {
            for (k, t) in outbound {
                groups.entry(k).or_insert(t);
            }
        } else if kind == StatKind::Route {
            groups = outbound;
        }
        groups
            .into_iter()
            .map(|((namespace, name, route), t)| {
                let (name, service) = match kind {
                    StatKind::Route => (route, Some(name)),
                    _ => (name, None),
                };
                let has = t.requests > 0;
                // Traffic that began less than a window ago is averaged over
                // the time it has run (its first report covers up to one
                // report interval before it arrived), not the whole window.
                let covered = t
                    .first
                    .map(|f| now.saturating_duration_since(f) + REPORT_INTERVAL)
                    .unwrap_or(window)
                    .min(window)
                    .max(Duration::from_secs(1));
                let secs = covered.as_secs_f64();
                let ratio = |n: u64| has.then(|| n as f64 / t.requests as f64);
                StatRow {
                    kind: kind.as_str(),
                    namespace,
                    name,
                    service,
                    requests: t.requests,
                    rps: t.requests as f64 / secs,
                    success_rate: ratio(t.failures).map(|f| 1.0 - f),
                    p50_ms: quantile(&t.buckets, 0.50),
                    p95_ms: quantile(&t.buckets, 0.95),
                    p99_ms: quantile(&t.buckets, 0.99),
                    tls_share: ratio(t.tls_requests),
                    failures: t.failures,
                    tls_requests: t.tls_requests,
                    latency_buckets: t.buckets,
                }
            })
            .collect()
    }
}

/// Who calls whom over a window: one row per caller workload and
/// destination service.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EdgeRow {
    pub source_namespace: String,
    /// Empty when the caller is outside the mesh.
    pub source_workload: String,
    pub destination_namespace: String,
    pub destination_service: String,
    pub requests: u64,
    pub rps: f64,
    pub success_rate: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Share of requests carried over mTLS.
    pub tls_share: Option<f64>,
    /// The counts behind the shares and quantiles, so a client can merge
    /// rows of several replicas exactly: failed and mTLS requests, and the
    /// latency histogram (`LATENCY_BUCKETS_MS` bounds, then overflow).
    pub failures: u64,
    pub tls_requests: u64,
    pub latency_buckets: Vec<u64>,
}

impl Stats {
    /// Edges seen by callers' proxies, plus edges into meshed services from
    /// callers outside the mesh (seen only at the inbound side).
    pub fn edges(&self, window: Duration) -> Vec<EdgeRow> {
        self.edges_at(Instant::now(), window)
    }

    pub fn edges_at(&self, now: Instant, window: Duration) -> Vec<EdgeRow> {
        type Key = (String, String, String, String);
        let mut groups: BTreeMap<Key, Totals> = BTreeMap::new();
        {
            let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
            for s in samples
                .iter()
                .filter(|s| now.saturating_duration_since(s.at) <= window)
            {
                if s.destination_service.is_empty() {
                    continue;
                }
                // Meshed callers are counted once, on their own side.
                if s.inbound && !s.source_workload.is_empty() {
                    continue;
                }
                let key = (
                    s.source_namespace.clone(),
                    s.source_workload.clone(),
                    s.destination_namespace.clone(),
                    s.destination_service.clone(),
                );
                groups.entry(key).or_default().add(s);
            }
        }
        groups
            .into_iter()
            .map(|((sn, sw, dn, ds), t)| {
                let covered = t
                    .first
                    .map(|f| now.saturating_duration_since(f) + REPORT_INTERVAL)
                    .unwrap_or(window)
                    .min(window)
                    .max(Duration::from_secs(1));
                let has = t.requests > 0;
                let ratio = |n: u64| has.then(|| n as f64 / t.requests as f64);
                EdgeRow {
                    source_namespace: sn,
                    source_workload: sw,
                    destination_namespace: dn,
                    destination_service: ds,
                    requests: t.requests,
                    rps: t.requests as f64 / covered.as_secs_f64(),
                    success_rate: ratio(t.failures).map(|f| 1.0 - f),
                    p50_ms: quantile(&t.buckets, 0.50),
                    p99_ms: quantile(&t.buckets, 0.99),
                    tls_share: ratio(t.tls_requests),
                    failures: t.failures,
                    tls_requests: t.tls_requests,
                    latency_buckets: t.buckets,
                }
            })
            .collect()
    }
}

/// The q-quantile of a histogram whose buckets have upper bounds
/// `LATENCY_BUCKETS_MS` plus an overflow bucket, interpolating linearly
/// inside the bucket (as Prometheus' histogram_quantile does). A quantile
/// in the overflow bucket is reported as the highest finite bound.
pub fn quantile(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &count) in buckets.iter().enumerate() {
        if count == 0 {
            continue;
        }
        if (below + count) as f64 >= rank {
            let Some(&upper) = LATENCY_BUCKETS_MS.get(i) else {
                return LATENCY_BUCKETS_MS.last().copied();
            };
            let lower = if i == 0 {
                0.0
            } else {
                LATENCY_BUCKETS_MS[i - 1]
            };
            let into = (rank - below as f64) / count as f64;
            return Some(lower + (upper - lower) * into);
        }
        below += count;
    }
    LATENCY_BUCKETS_MS.last().copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(pairs: &[(usize, u64)]) -> Vec<u64> {
        let mut b = vec![0; LATENCY_BUCKETS_MS.len() + 1];
        for &(i, c) in pairs {
            b[i] = c;
        }
        b
    }

    fn close(a: Option<f64>, b: f64) -> bool {
        a.is_some_and(|a| (a - b).abs() < 1e-9)
    }

    #[test]
    fn quantiles_interpolate_inside_the_bucket() {
        // 100 requests in (5, 7.5]: p50 is halfway through it.
        let b = buckets(&[(4, 100)]);
        assert!(close(quantile(&b, 0.5), 6.25));
        assert!(close(quantile(&b, 0.99), 5.0 + 2.5 * 0.99));
        // 90 in [0, 1], 10 in (100, 150].
        let b = buckets(&[(0, 90), (11, 10)]);
        assert!(close(quantile(&b, 0.5), 1.0 * 50.0 / 90.0));
        assert!(close(quantile(&b, 0.95), 100.0 + 50.0 * 0.5));
        assert!(close(quantile(&b, 0.99), 100.0 + 50.0 * 0.9));
        // Overflow reports the highest bound.
        let b = buckets(&[(LATENCY_BUCKETS_MS.len(), 3)]);
        assert_eq!(quantile(&b, 0.5), Some(10000.0));
        assert_eq!(quantile(&buckets(&[]), 0.5), None);
    }

    fn entry(dir: &str, svc: &str, wl: &str, route: &str, req: u64, fail: u64) -> StatEntry {
        StatEntry {
            direction: dir.into(),
            source_namespace: "default".into(),
            source_workload: "client".into(),
            destination_namespace: "default".into(),
            destination_service: svc.into(),
            destination_workload: wl.into(),
            route: route.into(),
            requests: req,
            failures: fail,
            tls_requests: req,
            latency_buckets: buckets(&[(5, req)]),
        }
    }

    fn report(entries: Vec<StatEntry>) -> StatsReport {
        StatsReport {
            interval_seconds: 10.0,
            entries,
        }
    }

    #[test]
    fn windows_sum_recent_deltas_only() {
        let stats = Stats::new();
        let t0 = Instant::now();
        stats.record_at(t0, &report(vec![entry("inbound", "a", "a-v1", "", 100, 0)]));
        let t1 = t0 + Duration::from_secs(40);
        stats.record_at(t1, &report(vec![entry("inbound", "a", "a-v1", "", 30, 3)]));

        let rows = stats.query_at(t1, StatKind::Service, Duration::from_secs(30));
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].requests, 30);
        // Traffic seen for one report only is averaged over one interval.
        assert!((rows[0].rps - 15.0).abs() < 1e-9, "{}", rows[0].rps);
        assert!(close(rows[0].success_rate, 0.9));
        // Traffic older than the window is averaged over the whole window.
        let t2 = t1 + Duration::from_secs(29);
        let rows = stats.query_at(t2, StatKind::Service, Duration::from_secs(30));
        assert!((rows[0].rps - 1.0).abs() < 1e-9, "{}", rows[0].rps);
        assert!(close(rows[0].tls_share, 1.0));
        assert!(close(rows[0].p50_ms, 7.5 + 2.5 * 0.5));

        let rows = stats.query_at(t1, StatKind::Service, Duration::from_secs(60));
        assert_eq!(rows[0].requests, 130);

        // Past the retention, old samples are dropped.
        let t2 = t1 + RETENTION + Duration::from_secs(1);
        stats.record_at(t2, &report(vec![]));
        assert!(stats.query_at(t2, StatKind::Service, RETENTION).is_empty());
    }

    #[test]
    fn service_falls_back_to_outbound_and_routes_group_by_route() {
        let stats = Stats::new();
        let now = Instant::now();
        stats.record_at(
            now,
            &report(vec![
                entry("outbound", "a", "", "split", 10, 0),
                entry("inbound", "a", "a-v1", "", 8, 0),
                entry("outbound", "ext", "", "", 5, 5),
            ]),
        );
        let w = Duration::from_secs(10);
        let rows = stats.query_at(now, StatKind::Service, w);
        let got: Vec<(&str, u64)> = rows.iter().map(|r| (r.name.as_str(), r.requests)).collect();
        assert_eq!(got, [("a", 8), ("ext", 5)]);
        assert!(close(rows[1].success_rate, 0.0));

        let rows = stats.query_at(now, StatKind::Workload, w);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].name, "a-v1");

        let rows = stats.query_at(now, StatKind::Route, w);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].name, "split");
        assert_eq!(rows[0].service.as_deref(), Some("a"));
        assert_eq!(rows[0].requests, 10);
    }

    #[test]
    fn windows_parse() {
        assert_eq!(parse_window("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_window("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_window("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_window("6m").is_err());
        assert!(parse_window("500ms").is_err());
        assert!(parse_window("x").is_err());
        assert!(parse_window("30").is_err());
        assert!(parse_window("").is_err());
    }

    #[test]
    fn edges_come_from_the_callers_side() {
        let stats = Stats::new();
        let now = Instant::now();
        let mut outside = entry("inbound", "a", "a-v1", "", 4, 1);
        outside.source_workload = String::new();
        stats.record_at(
            now,
            &report(vec![
                entry("outbound", "a", "a-v1", "", 10, 0),
                entry("inbound", "a", "a-v1", "", 10, 0),
                outside,
            ]),
        );
        let edges = stats.edges_at(now, Duration::from_secs(30));
        assert_eq!(edges.len(), 2, "{edges:?}");
        assert_eq!(edges[0].source_workload, "");
        assert_eq!(edges[0].requests, 4);
        assert_eq!(edges[1].source_workload, "client");
        assert_eq!(edges[1].requests, 10);
        assert!(close(edges[1].tls_share, 1.0));
    }
}
