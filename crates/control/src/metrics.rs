//! The control plane's own Prometheus metrics, served at `/metrics`.

use prometheus_client::collector::Collector;
use std::fmt::Write;

use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum ApplyResultLabel {
    Success,
    /// Refused by validation (400).
    Invalid,
    /// The store failed (500).
    Error,
    DryRun,
}

impl ApplyResultLabel {
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyResultLabel::Success => "success",
            ApplyResultLabel::Invalid => "invalid",
            ApplyResultLabel::Error => "error",
            ApplyResultLabel::DryRun => "dry_run",
        }
    }
}

// Written by hand: the derive has no renaming, and Prometheus label values
// are lower case by convention.
impl EncodeLabelValue for ApplyResultLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        encoder.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApplyLabels {
    pub result: ApplyResultLabel,
}

/// Why the HTTP API refused a credential (see `auth::AuthError::reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthFailureLabels {
    pub reason: &'static str,
}

#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub connected_proxies: Gauge,
    pub configs_sent: Counter,
    pub nacks: Counter,
    pub configs_over_budget: Counter,
    pub applies: Family<ApplyLabels, Counter>,
    pub auth_failures: Family<AuthFailureLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let connected_proxies = Gauge::default();
        registry.register(
            "trellis_control_connected_proxies",
            "Proxies with an open stream",
            connected_proxies.clone(),
        );
        let configs_sent = Counter::default();
        registry.register(
            "trellis_control_configs_sent",
            "Configs sent to proxies",
            configs_sent.clone(),
        );
        let nacks = Counter::default();
        registry.register(
            "trellis_control_nacks",
            "Configs that proxies rejected",
            nacks.clone(),
        );
        let configs_over_budget = Counter::default();
        registry.register(
            "trellis_control_configs_over_budget",
            "Configs not sent because they were over a proxy's Config budget",
            configs_over_budget.clone(),
        );
        let applies = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "trellis_control_applies",
            "Apply requests, by result",
            applies.clone(),
        );
        let auth_failures = Family::<AuthFailureLabels, Counter>::default();
        registry.register(
            "trellis_control_auth_failures",
            "HTTP API requests refused for their credential, by reason",
            auth_failures.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            connected_proxies,
            configs_sent,
            nacks,
            configs_over_budget,
            applies,
            auth_failures,
        }
    }

    pub fn apply(&self, result: ApplyResultLabel) {
        self.applies.get_or_create(&ApplyLabels { result }).inc();
    }

    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures
            .get_or_create(&AuthFailureLabels { reason })
            .inc();
    }

    /// OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Memory and CPU of this process, read from /proc on each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// Linux reports CPU times in USER_HZ ticks, which the kernel ABI fixes at
/// 100 per second on every architecture Trellis runs on; reading it with
/// sysconf would need unsafe code for no gain.
const TICKS_PER_SECOND: f64 = 100.0;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if let Some(rss) = resident_memory_bytes() {
            let g = ConstGauge::new(rss as i64);
            let m = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        if let Some(cpu) = cpu_seconds() {
            let c = ConstCounter::new(cpu);
            let m = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        Ok(())
    }
}

fn resident_memory_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_rss(&status)
}

fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    parse_cpu_seconds(&stat)
}

fn parse_cpu_seconds(stat: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // are counted from after its last ')'. utime and stime are fields 14
    // and 15, so the 12th and 13th after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let utime: f64 = fields.nth(11)?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        assert_eq!(
            parse_vm_rss("Name:\tx\nVmRSS:\t  2048 kB\n"),
            Some(2048 * 1024)
        );
        let stat = "1234 (a (b) c) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1";
        assert_eq!(parse_cpu_seconds(stat), Some(3.0));
    }

    #[test]
    fn encodes_all_metrics() {
        let m = Metrics::new();
        m.apply(ApplyResultLabel::Success);
        m.configs_sent.inc();
        let text = m.encode();
        for name in [
            "trellis_control_connected_proxies ",
            "trellis_control_configs_sent_total 1",
            "trellis_control_nacks_total 0",
            "trellis_control_applies_total{result=\"success\"} 1",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }
}
