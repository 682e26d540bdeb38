//! `stat` (golden signals from the control plane) and `check` (is the mesh
//! healthy, and what to do about each thing that is not).

use std::process::ExitCode;
use std::time::Duration;

use crate::cli::{Global, Output, StatArgs};
use crate::client::{Api, ApiError, ProxyInfo, StatAnswer, StatRow};
use crate::duration::format_duration;
use crate::kube_observe::{merge_stat, Access, Mesh};
use crate::local::state::{Role, RunState};
use crate::resources::version;
use crate::table::Table;

/// What `stat` shows: a kind of the stat API, and maybe one name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatTarget {
    pub kind: &'static str,
    pub name: Option<String>,
}

impl StatTarget {
    /// `KIND` or `KIND/NAME`; no target means every service.
    pub fn parse(target: Option<&str>) -> anyhow::Result<StatTarget> {
        let Some(target) = target else {
            return Ok(StatTarget {
                kind: "service",
                name: None,
            });
        };
        let (kind, name) = match target.split_once('/') {
            Some((k, n)) if !n.is_empty() => (k, Some(n.to_string())),
            Some(_) => {
                anyhow::bail!("{target:?}: expected KIND or KIND/NAME, e.g. service/catalog")
            }
            None => (target, None),
        };
        let kind = match kind.to_ascii_lowercase().as_str() {
            "service" | "services" | "svc" => "service",
            "workload" | "workloads" | "wl" => "workload",
            "route" | "routes" | "httproute" | "httproutes" => "route",
            _ => anyhow::bail!("cannot stat {kind:?}: use service (svc), workload (wl) or route"),
        };
        Ok(StatTarget { kind, name })
    }
}

fn stat_path(kind: &str, window: Duration) -> String {
    format!(
        "/api/v1/stat?kind={kind}&window={}",
        format_duration(window)
    )
}

pub async fn fetch_stat(api: &Api, kind: &str, window: Duration) -> anyhow::Result<StatAnswer> {
    Ok(api.get(&stat_path(kind, window)).await?)
}

pub async fn stat(global: &Global, args: &StatArgs) -> anyhow::Result<ExitCode> {
    let target = StatTarget::parse(args.target.as_deref())?;
    let mesh = Mesh::open(global, &args.kube, Access::View).await?;
    let merged = mesh
        .get(&stat_path(target.kind, args.window), merge_stat)
        .await?;
    let mut answer: StatAnswer = serde_json::from_value(merged)?;
    answer.rows.retain(|r| {
        target.name.as_ref().is_none_or(|n| *n == r.name)
            && global
                .namespace
                .as_ref()
                .is_none_or(|ns| *ns == r.namespace)
    });
    match global.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        Output::Yaml => print!("{}", serde_yaml_ng::to_string(&answer)?),
        Output::Table => {
            if answer.rows.is_empty() {
                if let Some(name) = &target.name {
                    // A known name with no traffic still gets its row, so
                    // scripts and eyes find it where they look.
                    answer.rows.push(StatRow {
                        kind: target.kind.to_string(),
                        namespace: global.namespace.clone().unwrap_or_else(|| "default".into()),
                        name: name.clone(),
                        service: None,
                        requests: 0.0,
                        rps: 0.0,
                        success_rate: None,
                        p50_ms: None,
                        p95_ms: None,
                        p99_ms: None,
                        tls_share: None,
                        ..Default::default()
                    });
                } else {
                    eprintln!(
                        "No traffic seen in the last {}: send some requests through the mesh.",
                        format_duration(args.window)
                    );
                    return Ok(ExitCode::SUCCESS);
                }
            }
            print!("{}", stat_table(&answer.rows));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// NAME RPS SUCCESS P50 P95 P99 MTLS; names outside `default` carry their
/// namespace. Route rows also say which service the traffic went to, and
/// traffic that matched no HTTPRoute shows as `<none>`.
pub fn stat_table(rows: &[StatRow]) -> String {
    let mut rows: Vec<&StatRow> = rows.iter().collect();
    rows.sort_by(|a, b| {
        (&a.namespace, &a.name, &a.service).cmp(&(&b.namespace, &b.name, &b.service))
    });
    let routes = rows.iter().any(|r| r.service.is_some());
    let mut header = vec!["NAME"];
    if routes {
        header.push("SERVICE");
    }
    header.extend(["RPS", "SUCCESS", "P50", "P95", "P99", "MTLS"]);
    let mut t = Table::new(&header);
    for r in rows {
        let name = match (r.name.as_str(), r.namespace.as_str()) {
            ("", _) => "<none>".to_string(),
            (name, "default" | "") => name.to_string(),
            (name, ns) => format!("{ns}/{name}"),
        };
        let mut row = vec![name];
        if routes {
            row.push(r.service.clone().unwrap_or_else(|| "-".into()));
        }
        row.extend([
            format!("{:.1}", r.rps),
            percent(r.success_rate),
            millis(r.p50_ms),
            millis(r.p95_ms),
            millis(r.p99_ms),
            percent(r.tls_share),
        ]);
        t.row(row);
    }
    t.render()
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

/// Collects `✔`/`✘` lines and whether any failed.
struct Report {
    failed: bool,
}

impl Report {
    fn ok(&mut self, what: impl AsRef<str>) {
        println!("✔ {}", what.as_ref());
    }
    fn fail(&mut self, what: impl AsRef<str>, todo: impl AsRef<str>) {
        self.failed = true;
        println!("✘ {}: {}", what.as_ref(), todo.as_ref());
    }
}

pub async fn check(global: &Global) -> anyhow::Result<ExitCode> {
    let api = Api::discover(global)?;
    let mut report = Report { failed: false };
    let cp = format!("control plane {}", api.base());

    match api.ok("/healthz").await {
        Ok(true) => report.ok(format!("{cp} is healthy")),
        Ok(false) => report.fail(
            format!("{cp} answers /healthz with an error"),
            "see its log",
        ),
        Err(e) => {
            let why = match &e {
                ApiError::Unreachable { cause, .. } => cause.reason(),
                e => e.to_string(),
            };
            report.fail(
                format!("{cp} is unreachable ({why})"),
                "start a local mesh with `trellis up -f FILE --detach`, or pass --server URL",
            );
            return Ok(ExitCode::FAILURE);
        }
    }
    match api.ok("/readyz").await {
        Ok(true) => report.ok(format!("{cp} is ready")),
        _ => report.fail(
            format!("{cp} is not ready"),
            "it is still starting or cannot open its store; see its log",
        ),
    }

    let mut proxies: Vec<ProxyInfo> = api.get("/api/v1/proxies").await?;
    // When this is the mesh of `trellis up`, its processes say which
    // proxies should be connected, and where their logs are.
    let local = RunState::read(&global.data_dir)
        .ok()
        .flatten()
        .filter(|s| s.control_url() == api.base());
    // Each control plane replica lists the proxies connected to it.
    for other in local
        .iter()
        .flat_map(|s| &s.processes)
        .filter(|p| p.role == Role::Control && p.name != "control" && p.is_running())
    {
        let Some(http) = other.addresses.http else {
            continue;
        };
        let mut replica = Api::new(
            &format!("http://{http}"),
            "a control plane replica of `trellis up`",
        )?;
        if let Some(t) = api.token() {
            replica = replica.with_token(t);
        }
        if let Ok(more) = replica.get::<Vec<ProxyInfo>>("/api/v1/proxies").await {
            proxies.extend(more);
        }
    }
    if let Some(state) = &local {
        for p in &state.processes {
            if !p.is_running() {
                let who = match p.role {
                    Role::Control => format!("the control plane ({})", p.name),
                    Role::Etcd => format!("etcd member {}", p.name),
                    Role::App => format!("app {}", p.name),
                    Role::Proxy => format!("proxy {}", p.name.trim_end_matches("-proxy")),
                };
                report.fail(
                    format!("{who} has exited"),
                    format!(
                        "see {}; restart the mesh with `trellis down` then `trellis up`",
                        p.log.display()
                    ),
                );
            } else if p.role == Role::Proxy {
                let instance = p.name.trim_end_matches("-proxy");
                if !proxies.iter().any(|c| c.instance == instance) {
                    report.fail(
                        format!("proxy {instance} is not connected to the control plane"),
                        format!("see {}", p.log.display()),
                    );
                }
            }
        }
    }

    if proxies.is_empty() && local.is_none() {
        report.ok("no proxies are connected (nothing to check)");
    }
    for p in &proxies {
        let who = format!("proxy {} ({}/{})", p.instance, p.namespace, p.workload);
        let (sent, acked) = (version(&p.sent_version), version(&p.acked_version));
        if let Some(why) = p.config_withheld.as_deref() {
            report.fail(
                format!("{who} is not sent its new config: {why}"),
                "shrink or delete the resource it names; the proxy keeps its last config meanwhile",
            );
        } else if let Some(err) = p.last_error.as_deref().filter(|e| !e.is_empty()) {
            report.fail(
                format!("{who} rejected config {sent}: {err}"),
                "fix the resource it names and apply it again; the proxy keeps its last good config",
            );
        } else if p.sent_version.is_null() {
            report.fail(
                format!("{who} has not been sent a config yet"),
                "wait a moment and check again; if it stays, see the control plane's log",
            );
        } else if p.sent_version != p.acked_version {
            report.fail(
                format!("{who} has not acknowledged config {sent} (acknowledged: {acked})"),
                "check that it is running and see its log",
            );
        } else {
            report.ok(format!("{who} is connected and in sync (config {sent})"));
        }
    }
    check_certificates(&proxies, &mut report).await;

    Ok(if report.failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Each proxy's workload certificate, read from its admin `/certs`: present,
/// valid now, and not about to expire without renewal.
async fn check_certificates(proxies: &[ProxyInfo], report: &mut Report) {
    let client = crate::http::HttpClient::direct();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    for p in proxies {
        let who = format!("proxy {} certificate", p.instance);
        let Some(admin) = p.admin_addr.as_deref().filter(|a| !a.is_empty()) else {
            continue;
        };
        let certs = match client
            .get(
                &format!("http://{admin}/certs"),
                std::time::Duration::from_secs(3),
            )
            .await
        {
            Ok(r) => serde_json::from_slice::<serde_json::Value>(r.body()).unwrap_or_default(),
            Err(e) => {
                report.fail(
                    format!(
                        "{who}: its admin port {admin} does not answer ({})",
                        e.reason()
                    ),
                    "check that the proxy runs and that --admin-addr is reachable from here",
                );
                continue;
            }
        };
        let cert = &certs["certificate"];
        if cert.is_null() {
            report.fail(
                format!("{who}: none ({})", certs["error"].as_str().unwrap_or("no certificate")),
                "check its join token (`trellis token create`) and that it reaches the control plane",
            );
            continue;
        }
        let (nb, na) = (
            cert["notBefore"].as_i64().unwrap_or(0),
            cert["notAfter"].as_i64().unwrap_or(0),
        );
        let life = (na - nb).max(1);
        let left = na - now;
        if left <= 0 {
            report.fail(
                format!("{who}: expired {}s ago", -left),
                "the proxy cannot renew: check that the control plane runs and that its token is valid and not revoked",
            );
        } else if left * 10 < life {
            report.fail(
                format!("{who}: expires in {left}s and was not renewed"),
                "renewal happens at half-life: see the proxy's log for why it fails",
            );
        } else {
            report.ok(format!(
                "{who} for {} is valid for {left}s more",
                certs["identity"].as_str().unwrap_or("?")
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_targets() {
        assert_eq!(
            StatTarget::parse(None).unwrap(),
            StatTarget {
                kind: "service",
                name: None
            }
        );
        assert_eq!(
            StatTarget::parse(Some("svc/catalog")).unwrap(),
            StatTarget {
                kind: "service",
                name: Some("catalog".into())
            }
        );
        assert_eq!(StatTarget::parse(Some("routes")).unwrap().kind, "route");
        assert_eq!(
            StatTarget::parse(Some("wl/reviews")).unwrap().kind,
            "workload"
        );
        assert!(StatTarget::parse(Some("pods")).is_err());
        assert!(StatTarget::parse(Some("svc/")).is_err());
    }

    #[test]
    fn formats_stat_rows() {
        let row = |ns: &str, name: &str, rate: Option<f64>| StatRow {
            kind: "service".into(),
            namespace: ns.into(),
            name: name.into(),
            service: None,
            requests: 600.0,
            rps: 20.0,
            success_rate: rate,
            p50_ms: rate.map(|_| 2.345),
            p95_ms: rate.map(|_| 12.6),
            p99_ms: rate.map(|_| 40.0),
            tls_share: rate.map(|_| 0.0),
            ..Default::default()
        };
        let out = stat_table(&[
            row("shop", "cart", None),
            row("default", "catalog", Some(0.995)),
        ]);
        assert_eq!(
            out,
            "NAME        RPS    SUCCESS   P50     P95    P99    MTLS\n\
             catalog     20.0   99.50%    2.3ms   13ms   40ms   0.00%\n\
             shop/cart   20.0   -         -       -      -      -\n"
        );
        let mut split = row("default", "split", Some(1.0));
        split.service = Some("catalog-v2".into());
        let mut unrouted = row("default", "", Some(1.0));
        unrouted.service = Some("frontend".into());
        let out = stat_table(&[split, unrouted]);
        assert!(out.starts_with("NAME     SERVICE      RPS"), "{out}");
        assert!(out.contains("\n<none>   frontend     20.0   100%"), "{out}");
        assert!(out.contains("\nsplit    catalog-v2   20.0"), "{out}");
    }
}
