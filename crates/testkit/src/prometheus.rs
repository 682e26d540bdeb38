//! Reading Prometheus/OpenMetrics text, as tests check a `/metrics` page.
//!
//! Written here rather than taken from a crate: `prometheus-parse` (no
//! release since 2023) merges every label set of a histogram into one
//! sample and splits label values at commas, and `openmetrics-parser` is
//! LGPL. Tests need only samples (name, labels, value), which is this.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// One sample line: `name{labels} value [timestamp] [# exemplar]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Metrics {
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses a whole page; an error names the line it could not read.
    pub fn parse(text: &str) -> anyhow::Result<Metrics> {
        let mut samples = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample = parse_sample(line)
                .ok_or_else(|| anyhow::anyhow!("line {}: not a sample: {line:?}", i + 1))?;
            samples.push(sample);
        }
        Ok(Metrics { samples })
    }

    /// The samples named `name` whose labels include every `(label, value)`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|got| got == v))
        })
    }

    /// The sum of the samples named `name` that carry every `(label, value)`
    /// (0 when there are none: a counter not yet incremented is absent).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }
}

/// GETs `http://{addr}/metrics` and parses it; panics when either fails.
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let url = format!("http://{addr}/metrics");
    let (status, body) = crate::http_get(&url, None).await;
    assert!(status.is_success(), "GET {url}: {status}");
    let text = String::from_utf8_lossy(&body);
    Metrics::parse(&text).unwrap_or_else(|e| panic!("GET {url}: {e:#}\n{text}"))
}

fn parse_sample(line: &str) -> Option<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        rest = parse_labels(inner, &mut labels)?;
    }
    // The value, then an optional timestamp and an optional exemplar
    // (` # {trace_id="..."} 1.0`), which tests do not need.
    let value = rest.split_whitespace().next()?;
    Some(Sample {
        name: name.to_string(),
        labels,
        value: parse_value(value)?,
    })
}

/// Reads `k="v",...}` into `labels`; returns what follows the `}`.
fn parse_labels<'a>(mut s: &'a str, labels: &mut BTreeMap<String, String>) -> Option<&'a str> {
    loop {
        s = s.trim_start().trim_start_matches(',').trim_start();
        if let Some(after) = s.strip_prefix('}') {
            return Some(after);
        }
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i + 1,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim().to_string(), value);
        s = &after[end..];
    }
}

fn parse_value(s: &str) -> Option<f64> {
    match s {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        s => s.parse().ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = r#"# HELP trellis_requests Requests.
# TYPE trellis_requests counter
trellis_requests_total{direction="inbound",route="a,b=c",status_code="200"} 3
trellis_requests_total{direction="outbound",status_code="200"} 2 1700000000000
trellis_requests_total{direction="inbound",status_code="503"} 1
# TYPE trellis_request_duration_seconds histogram
trellis_request_duration_seconds_bucket{direction="inbound",le="0.005"} 1 # {trace_id="4bf9"} 0.001
trellis_request_duration_seconds_bucket{direction="inbound",le="+Inf"} 4
process_cpu_seconds_total 0.25
odd{path="say \"hi\"\\n",empty=""} NaN
# EOF
"#;

    #[test]
    fn parses_labels_values_timestamps_and_exemplars() {
        let m = Metrics::parse(PAGE).unwrap();
        assert_eq!(m.samples.len(), 7);
        assert_eq!(m.sum("trellis_requests_total", &[]), 6.0);
        assert_eq!(
            m.sum("trellis_requests_total", &[("direction", "inbound")]),
            4.0
        );
        assert_eq!(
            m.sum(
                "trellis_requests_total",
                &[("direction", "inbound"), ("status_code", "200")]
            ),
            3.0
        );
        // A value holding `,` and `=` stays whole.
        assert_eq!(m.sum("trellis_requests_total", &[("route", "a,b=c")]), 3.0);
        assert_eq!(
            m.sum("trellis_request_duration_seconds_bucket", &[("le", "+Inf")]),
            4.0
        );
        assert_eq!(
            m.sum(
                "trellis_request_duration_seconds_bucket",
                &[("le", "0.005")]
            ),
            1.0
        );
        assert_eq!(m.sum("process_cpu_seconds_total", &[]), 0.25);
        let odd = m.matching("odd", &[]).next().unwrap();
        // `\\` is a backslash, so the `n` after it is a letter.
        assert_eq!(odd.labels["path"], "say \"hi\"\\n");
        assert_eq!(odd.labels["empty"], "");
        assert!(odd.value.is_nan());
    }

    #[test]
    fn a_label_must_match_exactly_and_absent_metrics_sum_to_zero() {
        let m = Metrics::parse(PAGE).unwrap();
        // `direction="inbound"` is not a prefix match of other values.
        assert_eq!(m.sum("trellis_requests_total", &[("direction", "in")]), 0.0);
        assert_eq!(m.sum("trellis_requests", &[]), 0.0, "the family name");
        assert_eq!(m.sum("nosuch_total", &[]), 0.0);
    }

    #[test]
    fn a_broken_line_is_an_error_naming_it() {
        for bad in [
            "x{a=\"1\" 2",
            "x{a=1} 2",
            "x{a=\"1\"}",
            "x notanumber",
            "{a=\"1\"} 2",
        ] {
            let err = Metrics::parse(&format!("ok 1\n{bad}\n")).unwrap_err();
            assert!(err.to_string().starts_with("line 2:"), "{bad}: {err}");
        }
    }
}
