//! `process_resident_memory_bytes` and `process_cpu_seconds_total`, read
//! from /proc/self on each scrape (through `procfs`, which the benchmark
//! and the test kit read processes with too).

use procfs::WithCurrentSystemInfo;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

#[derive(Debug)]
pub struct ProcessCollector;

/// (resident bytes, cpu seconds) of this process.
pub fn sample() -> Option<(i64, f64)> {
    let stat = procfs::process::Process::myself().ok()?.stat().ok()?;
    let rss = i64::try_from(stat.rss_bytes().get()).ok()?;
    let cpu = (stat.utime + stat.stime) as f64 / procfs::ticks_per_second() as f64;
    Some((rss, cpu))
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
