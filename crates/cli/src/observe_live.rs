//! `trace list|show`, `edges`, `tap` and `top`: the mesh's traces, who
//! calls whom, and live request metadata from the proxies.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::cli::{Global, Output};
use crate::duration::{format_duration, parse_duration};
use crate::kube_observe::{self, Access, KubeArgs, Mesh};
use crate::table::Table;

#[derive(Debug, Args)]
pub struct TraceArgs {
    #[command(subcommand)]
    pub command: TraceCommand,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Subcommand)]
pub enum TraceCommand {
    /// The newest traces the control plane keeps.
    List {
        /// Only traces with a span of this service.
        #[arg(long)]
        service: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One trace's spans as a tree (`-o json`: every span with its spanId
    /// and parentSpanId).
    Show { trace_id: String },
}

#[derive(Debug, Args)]
pub struct EdgesArgs {
    /// The time window the figures cover.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: Duration,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Args)]
pub struct TapArgs {
    /// The workload to tap (all workloads when omitted).
    pub workload: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub max: Option<u32>,
    /// Stop after this long (default: until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    #[command(flatten)]
    pub kube: KubeArgs,
}

#[derive(Debug, Args)]
pub struct TopArgs {
    #[command(flatten)]
    pub tap: TapArgs,
    /// How often the table is redrawn.
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub interval: Duration,
}

pub async fn trace(global: &Global, args: &TraceArgs) -> anyhow::Result<ExitCode> {
    let mesh = Mesh::open(global, &args.kube, Access::View).await?;
    match &args.command {
        TraceCommand::List { service, limit } => {
            let mut path = format!("/api/v1/traces?limit={limit}");
            if let Some(s) = service {
                path.push_str(&format!("&service={}", query_escape(s)));
            }
            let mut answer = mesh.get(&path, kube_observe::merge_trace_lists).await?;
            if let Some(list) = answer["traces"].as_array_mut() {
                list.truncate(*limit);
            }
            if global.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(ExitCode::SUCCESS);
            }
            let traces = answer["traces"].as_array().cloned().unwrap_or_default();
            if traces.is_empty() {
                eprintln!("No traces kept yet: send traffic, and check Mesh.tracing.sampling (default 0.01).");
                return Ok(ExitCode::SUCCESS);
            }
            let now = unix_nanos_now();
            let mut t = Table::new(&["TRACE ID", "ROOT", "SERVICES", "SPANS", "DURATION", "AGE"]);
            for tr in traces {
                let age = now.saturating_sub(tr["startUnixNanos"].as_u64().unwrap_or(0));
                t.row(vec![
                    s(&tr["traceId"]),
                    format!("{}: {}", s(&tr["rootService"]), s(&tr["rootName"])),
                    tr["services"]
                        .as_array()
                        .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                        .unwrap_or_default(),
                    tr["spans"].to_string(),
                    millis(tr["durationMs"].as_f64()),
                    format_duration(Duration::from_secs(age / 1_000_000_000)),
                ]);
            }
            print!("{}", t.render());
        }
        TraceCommand::Show { trace_id } => {
            let answer = mesh
                .get(
                    &format!("/api/v1/traces/{}", query_escape(trace_id)),
                    kube_observe::merge_trace,
                )
                .await?;
            if global.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(ExitCode::SUCCESS);
            }
            let spans: Vec<Value> = answer["spans"].as_array().cloned().unwrap_or_default();
            print!("{}", trace_tree(&spans));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Spans as an indented tree under their parents, in start order.
pub fn trace_tree(spans: &[Value]) -> String {
    let ids: std::collections::HashSet<&str> =
        spans.iter().filter_map(|s| s["spanId"].as_str()).collect();
    let start = spans
        .iter()
        .filter_map(|s| s["startUnixNanos"].as_u64())
        .min()
        .unwrap_or(0);
    let mut t = Table::new(&["SPAN", "SERVICE", "KIND", "START", "DURATION", "STATUS"]);
    fn walk(
        t: &mut Table,
        spans: &[Value],
        parent: Option<&str>,
        ids: &std::collections::HashSet<&str>,
        depth: usize,
        start: u64,
    ) {
        for s in spans.iter().filter(|s| {
            let p = s["parentSpanId"].as_str().unwrap_or("");
            match parent {
                None => p.is_empty() || !ids.contains(p),
                Some(parent) => p == parent,
            }
        }) {
            let status = s["attributes"]["http.response.status_code"]
                .as_i64()
                .map(|c| c.to_string())
                .unwrap_or_else(|| {
                    if s["error"] == true {
                        "error".into()
                    } else {
                        "-".into()
                    }
                });
            t.row(vec![
                format!("{}{}", "  ".repeat(depth), s["name"].as_str().unwrap_or("")),
                self::s(&s["service"]),
                self::s(&s["kind"]),
                format!(
                    "+{}",
                    millis(Some(
                        s["startUnixNanos"]
                            .as_u64()
                            .unwrap_or(start)
                            .saturating_sub(start) as f64
                            / 1e6
                    ))
                ),
                millis(s["durationMs"].as_f64()),
                status,
            ]);
            if depth < 64 {
                walk(t, spans, s["spanId"].as_str(), ids, depth + 1, start);
            }
        }
    }
    walk(&mut t, spans, None, &ids, 0, start);
    t.render()
}

pub async fn edges(global: &Global, args: &EdgesArgs) -> anyhow::Result<ExitCode> {
    let mesh = Mesh::open(global, &args.kube, Access::View).await?;
    let answer = mesh
        .get(
            &format!("/api/v1/edges?window={}", format_duration(args.window)),
            kube_observe::merge_edges,
        )
        .await?;
    if global.output == Output::Json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
        return Ok(ExitCode::SUCCESS);
    }
    let edges = answer["edges"].as_array().cloned().unwrap_or_default();
    if edges.is_empty() {
        eprintln!(
            "No traffic seen in the last {}: send some requests through the mesh.",
            format_duration(args.window)
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut t = Table::new(&[
        "FROM",
        "TO",
        "RPS",
        "SUCCESS",
        "P99",
        "MTLS",
        "FROM IDENTITY",
        "TO IDENTITY",
    ]);
    for e in edges {
        let from = match s(&e["sourceWorkload"]).as_str() {
            "" => "(outside the mesh)".to_string(),
            w => qualified(&s(&e["sourceNamespace"]), w),
        };
        let ids = |v: &Value| {
            v.as_array()
                .map(|a| a.iter().map(s).collect::<Vec<_>>().join(","))
                .filter(|x| !x.is_empty())
                .unwrap_or_else(|| "-".into())
        };
        t.row(vec![
            from,
            qualified(&s(&e["destinationNamespace"]), &s(&e["destinationService"])),
            format!("{:.1}", e["rps"].as_f64().unwrap_or(0.0)),
            percent(e["successRate"].as_f64()),
            millis(e["p99Ms"].as_f64()),
            s(&e["mtls"]),
            ids(&e["sourceIdentities"]),
            ids(&e["destinationIdentities"]),
        ]);
    }
    print!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}

/// One tap event, as the control plane streams it.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TapLine {
    #[serde(default)]
    pub proxy: String,
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub timestamp_unix_nanos: i64,
    #[serde(default)]
    pub direction: String,
    #[serde(default)]
    pub method: String,
    #[serde(default)]
    pub authority: String,
    #[serde(default)]
    pub path: String,
    #[serde(default)]
    pub status: u32,
    #[serde(default)]
    pub duration_ms: f64,
    #[serde(default)]
    pub source_identity: String,
    #[serde(default)]
    pub destination_identity: String,
    #[serde(default)]
    pub destination_service: String,
    #[serde(default)]
    pub route: String,
    #[serde(default)]
    pub tls: bool,
    #[serde(default)]
    pub trace_id: String,
}

/// Opens a tap and calls `on` for each event until it returns false, the
/// stream ends, or `until` passes.
async fn stream_tap(
    global: &Global,
    args: &TapArgs,
    until: Option<Instant>,
    mut on: impl FnMut(TapLine) -> bool,
) -> anyhow::Result<()> {
    // Tapping needs a credential with the tap role (or admin).
    let mesh = Mesh::open(global, &args.kube, Access::Tap).await?;
    let streams = mesh.apis().len();
    let mut q = Vec::new();
    if let Some(w) = &args.workload {
        let (ns, w) = match w.split_once('/') {
            Some((ns, w)) => (Some(ns.to_string()), w.to_string()),
            None => (global.namespace.clone(), w.clone()),
        };
        q.push(format!("workload={}", query_escape(&w)));
        if let Some(ns) = ns {
            q.push(format!("namespace={}", query_escape(&ns)));
        }
    } else if let Some(ns) = &global.namespace {
        q.push(format!("namespace={}", query_escape(ns)));
    }
    if let Some(p) = &args.path {
        q.push(format!("path={}", query_escape(p)));
    }
    if let Some(m) = args.max {
        q.push(format!("max={m}"));
    }
    let mut lines = mesh
        .lines(&tap_path(&q))
        .await
        .map_err(|e| anyhow::anyhow!("tap refused: {e}"))?;
    // Each replica's stream opens with a line of how many proxies it taps.
    let (mut heads, mut proxies) = (0, 0);
    loop {
        let next = match until {
            Some(t) => match tokio::time::timeout_at(t.into(), lines.recv()).await {
                Ok(l) => l,
                Err(_) => return Ok(()),
            },
            None => lines.recv().await,
        };
        let Some(line) = next else { return Ok(()) };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let v: Value = serde_json::from_slice(&line)?;
        if v.get("tap").is_some() {
            heads += 1;
            proxies += v["proxies"].as_u64().unwrap_or(0);
            if heads == streams && global.output != Output::Json {
                let replicas = if streams > 1 {
                    format!(" through {streams} control-plane replicas")
                } else {
                    String::new()
                };
                eprintln!(
                    "tapping {proxies} prox{}{replicas} (Ctrl-C stops)",
                    if proxies == 1 { "y" } else { "ies" }
                );
            }
            continue;
        }
        if !on(serde_json::from_value(v)?) {
            return Ok(());
        }
    }
}

fn tap_path(query: &[String]) -> String {
    format!("/api/v1/tap?{}", query.join("&"))
}

pub async fn tap(global: &Global, args: &TapArgs) -> anyhow::Result<ExitCode> {
    let until = args.duration.map(|d| Instant::now() + d);
    let json = global.output == Output::Json;
    let mut out = std::io::stdout().lock();
    // `--max` bounds each proxy's tap; several proxies may send that many.
    let mut left = args.max.map(u64::from).unwrap_or(u64::MAX);
    stream_tap(global, args, until, |e| {
        if left == 0 {
            return false;
        }
        left -= 1;
        let line = if json {
            serde_json::to_string(&e).unwrap_or_default()
        } else {
            tap_text(&e)
        };
        // A closed pipe (`| head`) ends the tap.
        writeln!(out, "{line}").and_then(|_| out.flush()).is_ok() && left > 0
    })
    .await?;
    Ok(ExitCode::SUCCESS)
}

fn tap_text(e: &TapLine) -> String {
    let secs = e.timestamp_unix_nanos / 1_000_000_000;
    let millis_part = (e.timestamp_unix_nanos / 1_000_000) % 1000;
    format!(
        "{:02}:{:02}:{:02}.{millis_part:03} {} {:<8} {} {}{} {} {:.1}ms route={} src={} dst={} tls={} trace={}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        e.proxy,
        e.direction,
        e.method,
        e.authority,
        e.path,
        e.status,
        e.duration_ms,
        if e.route.is_empty() { "-" } else { &e.route },
        or_dash(&e.source_identity),
        if e.destination_identity.is_empty() { &e.destination_service } else { &e.destination_identity },
        e.tls,
        e.trace_id,
    )
}

/// One row of `top`: a path as seen by one proxy direction.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TopRow {
    pub source: String,
    pub destination: String,
    pub method: String,
    pub path: String,
    pub count: u64,
    pub success_rate: f64,
    pub best_ms: f64,
    pub worst_ms: f64,
    pub last_ms: f64,
}

/// Tap events summed per (caller, destination, method, path). Outbound
/// events are preferred: each request is seen by both proxies, and the
/// caller's side says who called.
#[derive(Default)]
pub struct Top {
    rows: HashMap<(String, String, String, String), (TopRow, u64)>,
}

impl Top {
    pub fn add(&mut self, e: &TapLine) {
        // Requests between meshed proxies are counted once, on the way out;
        // inbound events count only when the caller is outside the mesh.
        if e.direction == "inbound" && !e.source_identity.is_empty() {
            return;
        }
        let source = if e.direction == "outbound" {
            format!("{}/{}", e.namespace, e.workload)
        } else {
            or_dash(&e.source_identity).to_string()
        };
        let key = (
            source.clone(),
            e.destination_service.clone(),
            e.method.clone(),
            e.path.clone(),
        );
        let (row, ok) = self.rows.entry(key).or_insert_with(|| {
            (
                TopRow {
                    source,
                    destination: e.destination_service.clone(),
                    method: e.method.clone(),
                    path: e.path.clone(),
                    best_ms: f64::MAX,
                    ..Default::default()
                },
                0,
            )
        });
        row.count += 1;
        if e.status != 0 && e.status < 500 {
            *ok += 1;
        }
        row.success_rate = *ok as f64 / row.count as f64;
        row.best_ms = row.best_ms.min(e.duration_ms);
        row.worst_ms = row.worst_ms.max(e.duration_ms);
        row.last_ms = e.duration_ms;
    }

    /// Busiest first.
    pub fn rows(&self) -> Vec<TopRow> {
        let mut rows: Vec<TopRow> = self.rows.values().map(|(r, _)| r.clone()).collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.path.cmp(&b.path)));
        rows
    }

    pub fn render(&self, limit: usize) -> String {
        let mut t = Table::new(&[
            "SOURCE",
            "DESTINATION",
            "METHOD",
            "PATH",
            "COUNT",
            "BEST",
            "WORST",
            "LAST",
            "SUCCESS",
        ]);
        for r in self.rows().into_iter().take(limit) {
            t.row(vec![
                r.source,
                r.destination,
                r.method,
                r.path,
                r.count.to_string(),
                millis(Some(r.best_ms)),
                millis(Some(r.worst_ms)),
                millis(Some(r.last_ms)),
                percent(Some(r.success_rate)),
            ]);
        }
        t.render()
    }
}

pub async fn top(global: &Global, args: &TopArgs) -> anyhow::Result<ExitCode> {
    let json = global.output == Output::Json;
    let live = !json && std::io::stdout().is_terminal();
    // Without a terminal to redraw, `top` collects for a while and prints once.
    let duration = args
        .tap
        .duration
        .or((!live).then_some(Duration::from_secs(5)));
    let until = duration.map(|d| Instant::now() + d);
    let mut top = Top::default();
    let mut next_draw = Instant::now() + args.interval;
    stream_tap(global, &args.tap, until, |e| {
        top.add(&e);
        if live && Instant::now() >= next_draw {
            next_draw = Instant::now() + args.interval;
            // Clear the screen and go home, then redraw.
            print!("\x1b[2J\x1b[H{}", top.render(40));
            let _ = std::io::stdout().flush();
        }
        true
    })
    .await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&top.rows())?);
    } else if top.rows.is_empty() {
        eprintln!("No requests seen.");
    } else {
        print!("{}", top.render(40));
    }
    Ok(ExitCode::SUCCESS)
}

fn s(v: &Value) -> String {
    v.as_str().unwrap_or("").to_string()
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn qualified(ns: &str, name: &str) -> String {
    if ns.is_empty() || ns == "default" {
        name.to_string()
    } else {
        format!("{ns}/{name}")
    }
}

fn percent(share: Option<f64>) -> String {
    match share {
        Some(s) if s >= 1.0 => "100%".to_string(),
        Some(s) => format!("{:.2}%", s * 100.0),
        None => "-".to_string(),
    }
}

fn millis(ms: Option<f64>) -> String {
    match ms {
        Some(ms) if ms < 10.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
        None => "-".to_string(),
    }
}

/// Percent-encodes what a query value must not hold raw.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

fn unix_nanos_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(dir: &str, wl: &str, path: &str, status: u32, ms: f64, src: &str) -> TapLine {
        TapLine {
            proxy: format!("{wl}-1"),
            workload: wl.into(),
            namespace: "default".into(),
            timestamp_unix_nanos: 0,
            direction: dir.into(),
            method: "GET".into(),
            authority: "catalog:8080".into(),
            path: path.into(),
            status,
            duration_ms: ms,
            source_identity: src.into(),
            destination_identity: String::new(),
            destination_service: "default/catalog".into(),
            route: String::new(),
            tls: false,
            trace_id: String::new(),
        }
    }

    #[test]
    fn top_counts_each_request_once() {
        let mut top = Top::default();
        top.add(&ev("outbound", "web", "/a", 200, 2.0, "spiffe://x"));
        top.add(&ev("inbound", "catalog", "/a", 200, 1.0, "spiffe://x"));
        top.add(&ev("outbound", "web", "/a", 503, 9.0, "spiffe://x"));
        top.add(&ev("outbound", "web", "/b", 200, 1.0, "spiffe://x"));
        top.add(&ev("inbound", "catalog", "/c", 200, 1.0, ""));
        let rows = top.rows();
        assert_eq!(rows.len(), 3);
        assert_eq!((rows[0].path.as_str(), rows[0].count), ("/a", 2));
        assert_eq!(rows[0].success_rate, 0.5);
        assert_eq!((rows[0].best_ms, rows[0].worst_ms), (2.0, 9.0));
        assert!(top.render(10).starts_with("SOURCE"));
    }

    #[test]
    fn trace_tree_nests_children() {
        let spans: Vec<Value> = serde_json::from_str(
            r#"[
            {"spanId":"a","parentSpanId":"x","name":"GET catalog","service":"web","kind":"client","startUnixNanos":0,"durationMs":5.0,"attributes":{"http.response.status_code":200}},
            {"spanId":"b","parentSpanId":"a","name":"GET catalog","service":"catalog","kind":"server","startUnixNanos":1000000,"durationMs":3.0,"attributes":{}}
        ]"#,
        )
        .unwrap();
        let out = trace_tree(&spans);
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[1].starts_with("GET catalog "), "{out}");
        assert!(lines[2].starts_with("  GET catalog"), "{out}");
        assert!(lines[2].contains("+1.0ms"), "{out}");
    }

    #[test]
    fn escapes_query_values() {
        assert_eq!(query_escape("/a b&c"), "/a%20b%26c");
    }
}
