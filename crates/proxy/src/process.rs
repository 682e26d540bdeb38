//! `process_resident_memory_bytes` and `process_cpu_seconds_total`, read
//! from /proc/self on each scrape.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

// Linux reports CPU time in clock ticks (USER_HZ, 100 on every mainstream
// architecture) and RSS in pages; reading sysconf would need unsafe code.
const TICKS_PER_SECOND: f64 = 100.0;
const PAGE_SIZE: i64 = 4096;

#[derive(Debug)]
pub struct ProcessCollector;

/// (resident bytes, cpu seconds) of this process.
pub fn sample() -> Option<(i64, f64)> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let rss_pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name may hold spaces; fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((rss_pages * PAGE_SIZE, (utime + stime) / TICKS_PER_SECOND))
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some((rss, cpu)) = sample() else {
            return Ok(());
        };
        let gauge = ConstGauge::new(rss);
        let e = encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            None,
            gauge.metric_type(),
        )?;
        gauge.encode(e)?;
        let counter = ConstCounter::new(cpu);
        let e = encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            counter.metric_type(),
        )?;
        counter.encode(e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn samples_this_process() {
        let (rss, cpu) = super::sample().expect("/proc/self is readable on Linux");
        assert!(rss > 1_000_000, "a test binary uses more than 1 MB: {rss}");
        assert!(cpu >= 0.0);
    }
}
