//! The Markdown report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::{Plan, Propagation, Results};

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

fn f1(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.1}"))
}

fn f2(v: Option<f64>) -> String {
    v.map_or("–".into(), |v| format!("{v:.2}"))
}

fn mb(kb: u64) -> String {
    format!("{:.1}", kb as f64 / 1024.0)
}

/// The worst last client ack of the mesh-wide change at the largest N.
pub fn largest_mesh_last(res: &Results) -> Option<(usize, f64, f64, bool)> {
    let n = res.propagation.iter().map(|p| p.n).max()?;
    let runs: Vec<&Propagation> = res
        .propagation
        .iter()
        .filter(|p| p.n == n && p.change == "mesh")
        .collect();
    let lasts: Vec<f64> = runs.iter().filter_map(|p| p.last_ms).collect();
    let complete = runs.iter().all(|p| !p.timed_out);
    Some((n, median(lasts.clone())?, max(&lasts)?, complete))
}

/// The control plane's CPU for the change of one Service's route at the
/// largest N: the median over the runs in ms of all its CPU from the apply
/// until it was idle again (what the target is judged on: it includes
/// what the control plane does anyway), the median of the change's own
/// (that, less the idle rate measured before), and how many proxies it
/// reached.
pub fn largest_route_cpu(res: &Results) -> Option<(usize, f64, f64, usize)> {
    let route = || res.propagation.iter().filter(|p| p.change == "route");
    let n = route().map(|p| p.n).max()?;
    let runs: Vec<&Propagation> = route().filter(|p| p.n == n).collect();
    let cpu_ms = median(runs.iter().map(|p| p.cp_cpu_s * 1000.0).collect())?;
    let own_ms = median(runs.iter().map(|p| p.cp_change_cpu_s * 1000.0).collect())?;
    let reached = runs
        .iter()
        .map(|p| p.expected_clients + p.expected_endpoints)
        .max()?;
    Some((n, cpu_ms, own_ms, reached))
}

/// The report's row for issue 13's target on a route change's
/// control-plane CPU.
fn route_cpu_row(res: &Results) -> String {
    const TARGET: &str = "a route change seen by a few proxies <= 5 ms of control-plane CPU";
    match largest_route_cpu(res) {
        Some((n, cpu_ms, own_ms, reached)) => format!(
            "| {TARGET} | N = {n}: {cpu_ms:.1} ms for a change {reached} proxies see, from the apply until the control plane was idle again ({own_ms:.1} ms less its idle rate); medians; a debug build's figure is not Trellis's speed | {} |\n",
            if cpu_ms <= 5.0 { "**met**" } else { "**not met**" }
        ),
        None => format!("| {TARGET} | not measured | |\n"),
    }
}

/// RSS medians by service count, in order.
pub fn rss_medians(res: &Results) -> Vec<(usize, f64)> {
    let mut by: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for p in &res.rss {
        by.entry(p.services).or_default().push(p.rss_kb as f64);
    }
    by.into_iter()
        .filter_map(|(m, v)| Some((m, median(v)?)))
        .collect()
}

pub fn markdown(plan: &Plan, res: &Results) -> String {
    let mut s = String::new();
    let env = |k: &str| {
        res.env
            .get(k)
            .map(|v| {
                v.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    let _ = writeln!(
        s,
        "# Trellis control-plane scale benchmark ({} run, {})\n",
        plan.mode,
        env("date")
    );
    let _ = writeln!(
        s,
        "Commit {}, binary `{}`, {} cores ({}), kernel {}; load average {} at start, {} at end; \
         wall time {:.0} s; the benchmark process itself used {:.1} CPU-s. \
         Everything on 127.0.0.1; the simulated proxies, the control plane and the real proxies share the cores.\n",
        env("trellis_commit"),
        std::path::Path::new(&env("trellis"))
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default(),
        env("nproc"),
        env("cpu"),
        env("kernel"),
        env("load_start"),
        env("load_end"),
        res.env.get("wall_seconds").and_then(|v| v.as_f64()).unwrap_or(0.0),
        res.env
            .get("bench_cpu_seconds")
            .and_then(|v| v.as_f64())
            .unwrap_or(0.0),
    );

    if !res.propagation.is_empty() || !res.setup.is_empty() {
        let _ = writeln!(
            s,
            "## Propagation: M = {} Services, E = {} endpoint proxies, N client proxies following {} Services each\n",
            plan.services, plan.endpoints, plan.subscriptions
        );
        let _ = writeln!(
            s,
            "Milliseconds from the start of the apply (HTTP API) to a simulated proxy acking the Config that carries the change; \
             {} runs of each kind per N. *mesh*: the Mesh resource changes, every proxy (E + N) gets a new Config; \
             *route*: an HTTPRoute is added to one Service, only its subscribers get one. \
             p50/p99/last are over the client proxies of a run (median of the runs; *last max* is the worst run). \
             *cp busy*: from the apply until the control plane's CPU was idle again (it still handles acks after the last one is sent).\n",
            plan.repeats
        );
        s.push_str("| N | change | proxies to ack | apply ms | first ms | p50 ms | p99 ms | last ms | last max ms | all E+N last ms | config bytes (client / endpoint) | cp busy s | cp CPU s | the change's own cp CPU ms | complete |\n");
        s.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n");
        let mut groups: BTreeMap<(usize, &str), Vec<&Propagation>> = BTreeMap::new();
        for p in &res.propagation {
            groups.entry((p.n, p.change)).or_default().push(p);
        }
        for ((n, change), runs) in &groups {
            let col = |f: &dyn Fn(&Propagation) -> Option<f64>| -> Vec<f64> {
                runs.iter().filter_map(|p| f(p)).collect()
            };
            let expected: Vec<String> = runs
                .iter()
                .map(|p| (p.expected_clients + p.expected_endpoints).to_string())
                .collect();
            let expected = if expected.iter().all(|e| *e == expected[0]) {
                expected[0].clone()
            } else {
                expected.join(", ")
            };
            let lasts = col(&|p| p.last_ms);
            let bytes = |f: &dyn Fn(&Propagation) -> Option<usize>| {
                runs.iter()
                    .filter_map(|p| f(p))
                    .max()
                    .map_or("–".into(), |b| b.to_string())
            };
            let complete = runs
                .iter()
                .filter(|p| {
                    !p.timed_out
                        && p.acked_clients >= p.expected_clients
                        && p.acked_endpoints >= p.expected_endpoints
                })
                .count();
            let _ = writeln!(
                s,
                "| {n} | {change} | {expected} | {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} | {} | {complete}/{} |",
                f1(median(col(&|p| Some(p.apply_ms)))),
                f1(median(col(&|p| p.first_ms))),
                f1(median(col(&|p| p.p50_ms))),
                f1(median(col(&|p| p.p99_ms))),
                f1(median(lasts.clone())),
                f1(max(&lasts)),
                if *change == "mesh" {
                    f1(median(col(&|p| p.all_last_ms)))
                } else {
                    "–".into()
                },
                bytes(&|p| p.client_config_bytes),
                bytes(&|p| p.endpoint_config_bytes),
                f2(median(col(&|p| Some(p.cp_busy_s)))),
                f2(median(col(&|p| Some(p.cp_cpu_s)))),
                f1(median(col(&|p| Some(p.cp_change_cpu_s * 1000.0)))),
                runs.len(),
            );
        }
        s.push('\n');
        let _ = writeln!(s, "### Registration and control-plane memory\n");
        s.push_str("| step | streams added | streams in all | HTTP/2 connections | all got a Config s | cp idle after s | cp CPU s | cp RSS MB | cp peak RSS MB |\n");
        s.push_str("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        for st in res.setup.iter().chain(res.cp_after_run.iter()) {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {:.2} | {} | {} |",
                st.what,
                st.added,
                st.streams_total,
                st.connections,
                if st.added > 0 {
                    format!("{:.2}", st.seconds)
                } else {
                    "–".into()
                },
                if st.added > 0 {
                    format!("{:.2}", st.settle_seconds)
                } else {
                    "–".into()
                },
                st.cp_cpu_seconds,
                mb(st.cp_rss_kb),
                mb(st.cp_hwm_kb),
            );
        }
        s.push_str("\n(*after the run*: CPU is that of all the measurements.)\n\n");
    }

    if !res.rss.is_empty() {
        let _ = writeln!(
            s,
            "## One proxy's RSS as the mesh grows\n\n\
             A fresh real `trellis proxy` per run; its app sends {} requests (HTTP/1.1 through the outbound listener) \
             spread over 3 Services served by demo-app behind a second real proxy; the other Services have {} simulated endpoints each. \
             VmRSS 1 s after the last request; median of {} proxies (min–max).\n",
            plan.requests, plan.rss_endpoints_per_service, plan.rss_repeats
        );
        s.push_str("| Services in the mesh | endpoints | requests ok | RSS MB | min–max | peak RSS MB | vs smallest mesh | services in /config | /config bytes | cp RSS MB |\n");
        s.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
        let medians = rss_medians(res);
        let base = medians.first().map(|(_, v)| *v);
        let mut by: BTreeMap<usize, Vec<&crate::RssPoint>> = BTreeMap::new();
        for p in &res.rss {
            by.entry(p.services).or_default().push(p);
        }
        for (m, pts) in &by {
            let rss: Vec<f64> = pts.iter().map(|p| p.rss_kb as f64).collect();
            let med = median(rss.clone()).unwrap_or(0.0);
            let lo = rss.iter().copied().fold(f64::MAX, f64::min);
            let hi = rss.iter().copied().fold(0.0, f64::max);
            let hwm = median(pts.iter().map(|p| p.hwm_kb as f64).collect()).unwrap_or(0.0);
            let vs = base.map_or("–".into(), |b| {
                format!("{:+.1}%", (med / b - 1.0) * 100.0)
            });
            let _ = writeln!(
                s,
                "| {m} | {} | {}/{} | {} | {}–{} | {} | {vs} | {} | {} | {} |",
                pts[0].endpoints,
                pts.iter().map(|p| p.ok).sum::<usize>(),
                pts.iter().map(|p| p.requests).sum::<usize>(),
                mb(med as u64),
                mb(lo as u64),
                mb(hi as u64),
                mb(hwm as u64),
                pts[0].config_services,
                pts.iter().map(|p| p.admin_config_bytes).max().unwrap_or(0),
                mb(pts.iter().map(|p| p.cp_rss_kb).max().unwrap_or(0)),
            );
        }
        s.push('\n');
    }

    s.push_str(
        "## Against the targets (issues 7 and 13)\n\n| target | measured | |\n| --- | --- | --- |\n",
    );
    match largest_mesh_last(res) {
        Some((n, med, worst, complete)) => {
            let met = complete && worst <= 1000.0;
            let _ = writeln!(
                s,
                "| config propagation to 2,000 proxies <= 1 s | N = {n}: last client ack {med:.0} ms (median), {worst:.0} ms (worst run){} | {} |",
                if complete { "" } else { ", some runs incomplete" },
                if n < 2000 {
                    "not measured at 2,000 (smaller run)"
                } else if met {
                    "**met**"
                } else {
                    "**not met**"
                }
            );
        }
        None => s.push_str("| config propagation to 2,000 proxies <= 1 s | not measured | |\n"),
    }
    s.push_str(&route_cpu_row(res));
    let medians = rss_medians(res);
    match (medians.first(), medians.last()) {
        (Some(&(m0, base)), Some(&(m1, _))) if medians.len() > 1 => {
            let worst = medians
                .iter()
                .map(|(_, v)| (v / base - 1.0).abs())
                .fold(0.0, f64::max);
            let list: Vec<String> = medians
                .iter()
                .map(|(m, v)| format!("{} MB at {m}", mb(*v as u64)))
                .collect();
            let _ = writeln!(
                s,
                "| proxy RSS flat (±10%) from 10 to 1,000 services | {}: at most {:.1}% from M = {m0} | {} |",
                list.join(", "),
                worst * 100.0,
                if m0 > 10 || m1 < 1000 {
                    "not measured over 10–1,000 (smaller run)"
                } else if worst <= 0.10 {
                    "**met**"
                } else {
                    "**not met**"
                }
            );
        }
        _ => s.push_str("| proxy RSS flat (±10%) from 10 to 1,000 services | not measured | |\n"),
    }
    for n in &res.notes {
        let _ = writeln!(s, "\nNote: {n}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: usize, change: &'static str, cp_cpu_s: f64) -> Propagation {
        Propagation {
            n,
            change,
            expected_clients: 6,
            cp_cpu_s,
            cp_change_cpu_s: cp_cpu_s - 0.002,
            ..Default::default()
        }
    }

    #[test]
    fn the_route_change_target_reads_the_largest_n_in_ms() {
        let res = Results {
            propagation: vec![
                run(100, "route", 0.001),
                run(2000, "mesh", 0.9),
                run(2000, "route", 0.004),
                run(2000, "route", 0.007),
                run(2000, "route", 0.003),
            ],
            ..Default::default()
        };
        let (n, cpu_ms, own_ms, reached) = largest_route_cpu(&res).unwrap();
        assert_eq!((n, reached), (2000, 6));
        assert!((cpu_ms - 4.0).abs() < 1e-9, "{cpu_ms}");
        assert!((own_ms - 2.0).abs() < 1e-9, "{own_ms}");
        let row = route_cpu_row(&res);
        assert!(
            row.contains("N = 2000: 4.0 ms for a change 6 proxies see") && row.contains("**met**"),
            "{row}"
        );
        assert!(route_cpu_row(&Results::default()).contains("not measured"));
    }

    #[test]
    fn a_route_change_over_5_ms_is_not_met() {
        let res = Results {
            propagation: vec![run(2000, "route", 0.0051)],
            ..Default::default()
        };
        assert!(route_cpu_row(&res).contains("**not met**"));
    }
}
