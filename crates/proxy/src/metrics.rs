//! Metrics: the SPEC's Prometheus families for `/metrics`, and the traffic
//! figures reported to the control plane for `trellis stat`.
//!
//! Both are fed from one call per request (`Metrics::record_request`) into
//! one table of atomics (`crate::series`), so the two views never disagree
//! and the request path takes no lock and allocates nothing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use trellis_api::v1::StatsReport;

pub use crate::series::PeerNames;
use crate::series::{RequestCollector, SeriesTable};

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    inbound,
    outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::inbound => "inbound",
            Direction::outbound => "outbound",
        }
    }
}

/// Who talks to whom; the labels shared by every traffic metric.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Peers {
    pub direction: Direction,
    pub source_namespace: String,
    pub source_workload: String,
    pub destination_namespace: String,
    pub destination_service: String,
    pub destination_workload: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub route: String,
    pub status_code: u16,
    pub tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DurationLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub route: String,
    pub tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    #[prometheus(flatten)]
    pub peers: Peers,
    pub tls: bool,
}

pub struct Metrics {
    registry: Registry,
    /// Request counts and latencies per label set (both `trellis_requests`
    /// and `trellis_request_duration_seconds`, and the traffic reports).
    series: Arc<SeriesTable>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    pub config_rejections: Counter,
    pub control_plane_connects: Counter,
    pub stats_dropped: Counter,
    /// Requests and connections refused by an AuthorizationPolicy.
    pub authz_denied: Counter,
    pub tls_handshake_failures: Counter,
    /// Handshakes with peer proxies, full and resumed.
    pub tls_handshakes: crate::tls::Handshakes,
    /// Plaintext connections refused at the inbound in strict mTLS mode.
    pub plaintext_refused: Counter,
    /// Per listener: connections open, shed and closed by a limit, failed
    /// accepts, the proxy's own error answers (see `listener`).
    pub conns: crate::listener::ConnMetrics,
    /// Spans, access log lines and tap events sent or dropped.
    pub telemetry: crate::telemetry::Counters,
    /// Retries, ejections, circuit breaking, rate limits, faults, mirrors.
    pub traffic: crate::traffic::TrafficMetrics,
    in_flight: AtomicU64,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::default();
        let series = Arc::new(SeriesTable::default());
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let config_rejections = Counter::default();
        let control_plane_connects = Counter::default();
        let stats_dropped = Counter::default();
        let authz_denied = Counter::default();
        let tls_handshake_failures = Counter::default();
        let plaintext_refused = Counter::default();
        registry.register(
            "trellis_authz_denied",
            "Inbound requests and connections refused by an AuthorizationPolicy",
            authz_denied.clone(),
        );
        registry.register(
            "trellis_tls_handshake_failures",
            "Inbound TLS handshakes that failed (bad or missing certificate, stalled peer)",
            tls_handshake_failures.clone(),
        );
        registry.register(
            "trellis_plaintext_refused",
            "Plaintext inbound connections refused in strict mTLS mode",
            plaintext_refused.clone(),
        );
        registry.register_collector(Box::new(RequestCollector(series.clone())));
        registry.register(
            "trellis_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "trellis_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "trellis_tcp_sent_bytes",
            "Bytes sent to the peer of a TCP connection",
            tcp_sent.clone(),
        );
        registry.register(
            "trellis_tcp_received_bytes",
            "Bytes received from the peer of a TCP connection",
            tcp_received.clone(),
        );
        registry.register(
            "trellis_proxy_config_rejections",
            "Configs from the control plane that this proxy refused",
            config_rejections.clone(),
        );
        registry.register(
            "trellis_proxy_control_plane_connects",
            "Connections made to the control plane",
            control_plane_connects.clone(),
        );
        registry.register(
            "trellis_proxy_stats_reports_dropped",
            "Traffic reports dropped because the control plane was away",
            stats_dropped.clone(),
        );
        let telemetry = crate::telemetry::Counters::default();
        telemetry.register(&mut registry);
        let traffic = crate::traffic::TrafficMetrics::default();
        traffic.register(&mut registry);
        let conns = crate::listener::ConnMetrics::default();
        conns.register(&mut registry);
        let tls_handshakes = crate::tls::Handshakes::default();
        tls_handshakes.register(&mut registry);
        registry.register_collector(Box::new(crate::process::ProcessCollector));
        Arc::new(Metrics {
            registry,
            series,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            config_rejections,
            control_plane_connects,
            stats_dropped,
            authz_denied,
            tls_handshake_failures,
            tls_handshakes,
            plaintext_refused,
            conns,
            telemetry,
            traffic,
            in_flight: AtomicU64::new(0),
        })
    }

    /// Records one finished request. `status` is 0 when no response came.
    pub fn record_request(
        &self,
        peers: PeerNames<'_>,
        route: &str,
        status: u16,
        tls: bool,
        elapsed: Duration,
    ) {
        self.series.record(peers, route, status, tls, elapsed);
    }

    pub fn tcp_opened(&self, labels: &TcpLabels) {
        let labels = &TcpLabels {
            peers: bounded_labels(&labels.peers).into_owned(),
            tls: labels.tls,
        };
        self.tcp_opened.get_or_create(labels).inc();
    }

    pub fn tcp_closed(&self, labels: &TcpLabels, sent: u64, received: u64) {
        let labels = &TcpLabels {
            peers: bounded_labels(&labels.peers).into_owned(),
            tls: labels.tls,
        };
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_received.get_or_create(labels).inc_by(received);
    }

    /// Takes the figures since the last call, for the control plane.
    pub fn take_report(&self, interval: Duration) -> Option<StatsReport> {
        let entries = self.series.take_deltas();
        if entries.is_empty() {
            return None;
        }
        Some(StatsReport {
            interval_seconds: interval.as_secs_f64(),
            entries,
        })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn in_flight(&self) -> &AtomicU64 {
        &self.in_flight
    }

    pub fn in_flight_now(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// Longest label value kept: names a caller controls (a Host header, an
/// identity header from a plain client) must not make huge series.
pub const MAX_LABEL: usize = 128;

pub(crate) fn bounded_label(s: &str) -> &str {
    if s.len() <= MAX_LABEL {
        return s;
    }
    let mut end = MAX_LABEL;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn bounded_labels(p: &Peers) -> std::borrow::Cow<'_, Peers> {
    let fields = [
        &p.source_namespace,
        &p.source_workload,
        &p.destination_namespace,
        &p.destination_service,
        &p.destination_workload,
    ];
    if fields.iter().all(|f| f.len() <= MAX_LABEL) {
        return std::borrow::Cow::Borrowed(p);
    }
    let cut = |s: &String| bounded_label(s).to_owned();
    std::borrow::Cow::Owned(Peers {
        direction: p.direction,
        source_namespace: cut(&p.source_namespace),
        source_workload: cut(&p.source_workload),
        destination_namespace: cut(&p.destination_namespace),
        destination_service: cut(&p.destination_service),
        destination_workload: cut(&p.destination_workload),
    })
}

/// Counts a request as in flight until dropped (graceful drain waits on it).
pub struct InFlight(Arc<Metrics>);

impl InFlight {
    pub fn new(m: &Arc<Metrics>) -> Self {
        m.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(m.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl InFlight {
    /// Keeps the request counted until its response body has been sent
    /// (or dropped): a proxy draining on SIGTERM must not exit while a body
    /// is still streaming, which would cut the caller's response short.
    pub fn hold(self, resp: http::Response<crate::Body>) -> http::Response<crate::Body> {
        use http_body_util::BodyExt as _;
        resp.map(|inner| {
            InFlightBody {
                inner,
                _guard: self,
            }
            .boxed_unsync()
        })
    }
}

/// A response body that counts its request in flight until it ends.
struct InFlightBody {
    inner: crate::Body,
    _guard: InFlight,
}

impl http_body::Body for InFlightBody {
    type Data = bytes::Bytes;
    type Error = crate::http::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers() -> PeerNames<'static> {
        PeerNames {
            direction: Direction::outbound,
            source_namespace: "default",
            source_workload: "frontend",
            destination_namespace: "default",
            destination_service: "catalog",
            destination_workload: "catalog-v1",
        }
    }

    #[test]
    fn report_holds_deltas_and_metrics_hold_totals() {
        let m = Metrics::new();
        m.record_request(peers(), "split", 200, false, Duration::from_millis(3));
        m.record_request(peers(), "split", 503, false, Duration::from_millis(30));
        let r = m.take_report(Duration::from_secs(2)).unwrap();
        assert_eq!(r.entries.len(), 1);
        assert_eq!(r.entries[0].requests, 2);
        assert_eq!(r.entries[0].failures, 1);
        assert_eq!(r.entries[0].latency_buckets.iter().sum::<u64>(), 2);
        assert!(
            m.take_report(Duration::from_secs(2)).is_none(),
            "a report empties the table"
        );
        let text = m.encode();
        assert!(
            text.contains("trellis_requests_total{direction=\"outbound\""),
            "{text}"
        );
        assert!(text.contains("status_code=\"503\""));
        assert!(text.contains("trellis_request_duration_seconds_bucket"));
    }
}
