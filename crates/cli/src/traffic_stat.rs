//! `trellis stat --traffic`: what traffic management did, per Service —
//! retries, retries the budget stopped, ejections, circuit-breaker
//! rejections, rate-limited and fault-injected requests, mirrored copies,
//! failed health checks, locality failovers and requests without a hash
//! key. The figures are the counters of every connected proxy's
//! `/metrics`, summed (totals since each proxy started).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::cli::{Global, Output, StatArgs};
use crate::client::{Api, ProxyInfo};
use crate::http::HttpClient;
use crate::observe::StatTarget;
use crate::table::Table;

const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// One row: a Service and its counters.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrafficRow {
    pub namespace: String,
    pub service: String,
    pub retries: f64,
    pub budget_exhausted: f64,
    pub ejections: f64,
    pub circuit_breaker_rejections: f64,
    pub rate_limited: f64,
    pub faults_injected: f64,
    pub mirrored: f64,
    pub health_check_failures: f64,
    pub locality_failovers: f64,
    pub hash_key_missing: f64,
}

impl TrafficRow {
    fn field(&mut self, metric: &str, labels: &BTreeMap<String, String>) -> Option<&mut f64> {
        Some(match metric {
            "trellis_retries_total" => &mut self.retries,
            "trellis_retry_budget_exhausted_total" => &mut self.budget_exhausted,
            "trellis_outlier_ejections_total" => &mut self.ejections,
            "trellis_circuit_breaker_rejections_total" => &mut self.circuit_breaker_rejections,
            "trellis_rate_limited_total" => &mut self.rate_limited,
            "trellis_faults_injected_total" => &mut self.faults_injected,
            "trellis_mirrored_requests_total"
                if labels.get("outcome").map(String::as_str) == Some("sent") =>
            {
                &mut self.mirrored
            }
            "trellis_health_checks_total"
                if labels.get("result").map(String::as_str) == Some("fail") =>
            {
                &mut self.health_check_failures
            }
            "trellis_locality_failovers_total" => &mut self.locality_failovers,
            "trellis_hash_key_missing_total" => &mut self.hash_key_missing,
            _ => return None,
        })
    }
}

/// Parses one sample line of Prometheus text: name, labels and value.
fn parse_sample(line: &str) -> Option<(&str, BTreeMap<String, String>, f64)> {
    if line.starts_with('#') {
        return None;
    }
    let (name, rest) = match line.find('{') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => {
            let (name, value) = line.split_once(' ')?;
            return Some((name, BTreeMap::new(), value.trim().parse().ok()?));
        }
    };
    let close = rest.rfind('}')?;
    let value = rest[close + 1..].trim().split(' ').next()?.parse().ok()?;
    let mut labels = BTreeMap::new();
    let mut s = &rest[..close];
    while let Some((key, after)) = s.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(if n == 'n' { '\n' } else { n });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').trim().to_string(), value);
        s = &after[end..];
    }
    Some((name, labels, value))
}

/// Adds one proxy's `/metrics` text to the rows.
pub fn add_metrics(rows: &mut BTreeMap<(String, String), TrafficRow>, text: &str) {
    for line in text.lines() {
        let Some((name, labels, value)) = parse_sample(line) else {
            continue;
        };
        if !name.starts_with("trellis_") {
            continue;
        }
        let (Some(ns), Some(svc)) = (
            labels.get("destination_namespace"),
            labels.get("destination_service"),
        ) else {
            continue;
        };
        let key = (ns.clone(), svc.clone());
        let mut row = rows.get(&key).cloned().unwrap_or_else(|| TrafficRow {
            namespace: ns.clone(),
            service: svc.clone(),
            ..Default::default()
        });
        if let Some(f) = row.field(name, &labels) {
            *f += value;
            rows.insert(key, row);
        }
    }
}

pub fn traffic_table(rows: &[TrafficRow]) -> String {
    let mut t = Table::new(&[
        "SERVICE",
        "RETRIES",
        "BUDGET-STOPPED",
        "EJECTIONS",
        "CB-REJECTED",
        "RATE-LIMITED",
        "FAULTS",
        "MIRRORED",
        "HC-FAILED",
        "FAILOVERS",
        "NO-HASH-KEY",
    ]);
    for r in rows {
        let name = if r.namespace == "default" {
            r.service.clone()
        } else {
            format!("{}/{}", r.namespace, r.service)
        };
        let n = |v: f64| format!("{v:.0}");
        t.row(vec![
            name,
            n(r.retries),
            n(r.budget_exhausted),
            n(r.ejections),
            n(r.circuit_breaker_rejections),
            n(r.rate_limited),
            n(r.faults_injected),
            n(r.mirrored),
            n(r.health_check_failures),
            n(r.locality_failovers),
            n(r.hash_key_missing),
        ]);
    }
    t.render()
}

/// The rows of every Service with traffic-management counters, and the
/// proxies whose metrics could not be read.
pub async fn collect(api: &Api) -> anyhow::Result<(Vec<TrafficRow>, Vec<String>)> {
    let proxies: Vec<ProxyInfo> = api.get("/api/v1/proxies").await?;
    let client = HttpClient::direct();
    let mut rows = BTreeMap::new();
    let mut unreachable = Vec::new();
    for p in &proxies {
        let Some(admin) = p.admin_addr.as_deref().filter(|a| !a.is_empty()) else {
            continue;
        };
        match client
            .get(&format!("http://{admin}/metrics"), SCRAPE_TIMEOUT)
            .await
        {
            Ok(resp) => add_metrics(&mut rows, &String::from_utf8_lossy(resp.body())),
            Err(_) => unreachable.push(format!("{} ({admin})", p.instance)),
        }
    }
    Ok((rows.into_values().collect(), unreachable))
}

pub async fn stat(global: &Global, args: &StatArgs) -> anyhow::Result<ExitCode> {
    let target = StatTarget::parse(args.target.as_deref())?;
    if target.kind != "service" {
        anyhow::bail!("--traffic shows services: use `trellis stat --traffic [service[/NAME]]`");
    }
    if args.kube.kubernetes {
        // The counters live in each sidecar, which the CLI does not reach
        // on a cluster.
        anyhow::bail!(
            "--traffic reads each sidecar's metrics, which the CLI cannot reach on a cluster: \
             scrape the sidecars' :15000/metrics with Prometheus (docs/observability.md)"
        );
    }
    let api = Api::discover(global)?;
    let (mut rows, unreachable) = collect(&api).await?;
    rows.retain(|r| {
        target.name.as_ref().is_none_or(|n| *n == r.service)
            && global
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == r.namespace)
    });
    if !unreachable.is_empty() {
        eprintln!(
            "Could not read the metrics of {} of the proxies: {}",
            unreachable.len(),
            unreachable.join(", ")
        );
    }
    match global.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&rows)?),
        Output::Table if rows.is_empty() => eprintln!(
            "No traffic management events yet (retries, ejections, rejections, faults, ...)."
        ),
        Output::Table => print!("{}", traffic_table(&rows)),
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"# HELP trellis_retries Retries sent, by reason
# TYPE trellis_retries counter
trellis_retries_total{destination_namespace="default",destination_service="catalog",reason="status"} 12
trellis_retries_total{destination_namespace="default",destination_service="catalog",reason="connect"} 3
trellis_outlier_ejections_total{destination_namespace="shop",destination_service="cart"} 2
trellis_mirrored_requests_total{destination_namespace="default",destination_service="shadow",outcome="sent"} 40
trellis_mirrored_requests_total{destination_namespace="default",destination_service="shadow",outcome="skipped"} 1
trellis_requests_total{direction="outbound",destination_namespace="default",destination_service="catalog",route="a \"b\""} 99
"#;

    #[test]
    fn sums_the_traffic_counters_of_every_proxy() {
        let mut rows = BTreeMap::new();
        add_metrics(&mut rows, METRICS);
        add_metrics(&mut rows, METRICS);
        let rows: Vec<TrafficRow> = rows.into_values().collect();
        assert_eq!(rows.len(), 3);
        let catalog = rows.iter().find(|r| r.service == "catalog").unwrap();
        assert_eq!(catalog.retries, 30.0);
        let shadow = rows.iter().find(|r| r.service == "shadow").unwrap();
        assert_eq!(shadow.mirrored, 80.0);
        let table = traffic_table(&rows);
        assert!(table.starts_with("SERVICE"), "{table}");
        assert!(table.contains("shop/cart"), "{table}");
    }

    #[test]
    fn parses_escaped_label_values() {
        let (name, labels, value) = parse_sample(r#"m_total{a="x \"y\"",b="z"} 1.5"#).unwrap();
        assert_eq!(name, "m_total");
        assert_eq!(labels["a"], "x \"y\"");
        assert_eq!(labels["b"], "z");
        assert_eq!(value, 1.5);
    }
}
