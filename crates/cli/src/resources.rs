//! `apply`, `get`, `delete` and `describe`: kubectl-like resource
//! management against the control plane's HTTP API.

use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use trellis_resource::{Kind, Resource, Source, Spec};

use crate::cli::{ApplyArgs, GetArgs, Global, NameArgs, Output};
use crate::client::{Api, ApiError, ApplyAnswer, Items, ProxyInfo, ServiceInfo};
use crate::table::Table;

/// Reads resources from a file, a folder (its *.yaml, *.yml, *.json) or
/// `-` (standard input), with where each came from.
pub fn load(path: &Path) -> anyhow::Result<Vec<(Resource, Source)>> {
    if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading resources from standard input")?;
        return trellis_resource::parse_documents_with_sources("<stdin>", &text)
            .map_err(load_error);
    }
    trellis_resource::load_path_with_sources(path).map_err(load_error)
}

/// One problem on one line; several as an indented list under a count.
fn load_error(e: trellis_resource::LoadError) -> anyhow::Error {
    match e.errors.len() {
        1 => anyhow::anyhow!("{e}"),
        n => anyhow::anyhow!("{n} problems in the resources:\n{}", indent(&e.to_string())),
    }
}

/// A kind as typed on the command line.
pub fn parse_kind(s: &str) -> anyhow::Result<Kind> {
    Kind::parse_loose(s).ok_or_else(|| {
        anyhow::anyhow!(
            "unknown kind {s:?}: use mesh, service (svc), workload (wl) or httproute (route)"
        )
    })
}

/// The path segment of a kind in the API.
fn kind_path(kind: Kind) -> String {
    kind.as_str().to_ascii_lowercase()
}

/// `kind/name`, as kubectl names what it changed.
fn shown(kind: &str, name: &str) -> String {
    format!("{}/{name}", kind.to_ascii_lowercase())
}

/// The API path of one resource. The Mesh is cluster-wide: its namespace
/// segment is `-`.
fn resource_path(kind: Kind, namespace: &str, name: &str) -> String {
    let ns = if kind.namespaced() { namespace } else { "-" };
    format!("/api/v1/resources/{}/{ns}/{name}", kind_path(kind))
}

pub async fn apply(global: &Global, args: &ApplyArgs) -> anyhow::Result<ExitCode> {
    let loaded = load(&args.file)?;
    if loaded.is_empty() {
        anyhow::bail!("{}: no resources found", args.file.display());
    }
    let (resources, sources): (Vec<Resource>, Vec<Source>) = loaded.into_iter().unzip();
    let api = Api::discover(global)?;
    // Validate here too, against what the control plane holds: only here
    // are the files known, so errors can name file, document and line.
    let mut existing = Vec::new();
    for kind in Kind::ALL {
        let path = format!("/api/v1/resources/{}", kind_path(kind));
        existing.extend(api.get::<Items<Resource>>(&path).await?.items);
    }
    if let Err(e) = trellis_resource::validate_apply(&resources, &sources, &existing) {
        anyhow::bail!("nothing was applied:\n{}", indent(&e.to_string()));
    }
    let path = if args.dry_run {
        "/api/v1/apply?dryRun=true"
    } else {
        "/api/v1/apply"
    };
    let answer: ApplyAnswer = api.post(path, &resources).await.map_err(|e| match e {
        ApiError::Refused { .. } => anyhow::anyhow!("nothing was applied: {e}"),
        e => e.into(),
    })?;
    let suffix = if args.dry_run { " (dry run)" } else { "" };
    for r in &answer.results {
        println!("{} {}{suffix}", shown(&r.kind, &r.name), r.action);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn get(global: &Global, args: &GetArgs) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(&args.kind)?;
    // On a cluster every replica holds the cluster's resources: one answers.
    let mesh =
        crate::kube_observe::Mesh::open(global, &args.kube, crate::kube_observe::Access::View)
            .await?;
    let api = mesh.first();
    let resources = match &args.name {
        Some(name) => {
            let ns = global
                .namespace
                .as_deref()
                .unwrap_or(trellis_resource::DEFAULT_NAMESPACE);
            vec![fetch_one(api, kind, ns, name).await?]
        }
        None => {
            let mut path = format!("/api/v1/resources/{}", kind_path(kind));
            if let Some(ns) = &global.namespace {
                path.push_str(&format!("?namespace={ns}"));
            }
            api.get::<Items<Resource>>(&path).await?.items
        }
    };
    match global.output {
        Output::Json => {
            let v = match (&args.name, resources.first()) {
                (Some(_), Some(r)) => serde_json::to_value(r)?,
                _ => serde_json::json!({ "items": resources }),
            };
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Output::Yaml => print!("{}", trellis_resource::to_yaml(&resources)),
        Output::Table if resources.is_empty() => match &global.namespace {
            Some(ns) => eprintln!("No resources found in namespace {ns}."),
            None => eprintln!("No resources found."),
        },
        Output::Table => {
            let endpoints = if kind == Kind::Service {
                api.get::<Vec<ServiceInfo>>("/api/v1/services").await.ok()
            } else {
                None
            };
            print!("{}", table(kind, &resources, endpoints.as_deref()).render());
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn fetch_one(api: &Api, kind: Kind, ns: &str, name: &str) -> anyhow::Result<Resource> {
    match api.get::<Resource>(&resource_path(kind, ns, name)).await {
        Err(ApiError::NotFound(_)) if kind.namespaced() => {
            anyhow::bail!(
                "{} {ns}/{name} not found: `trellis get {}` lists them",
                kind,
                kind_path(kind)
            )
        }
        Err(ApiError::NotFound(_)) => anyhow::bail!("{kind} {name} not found"),
        r => Ok(r?),
    }
}

/// The table of `get`: NAMESPACE and NAME, then columns for the kind.
fn table(kind: Kind, resources: &[Resource], services: Option<&[ServiceInfo]>) -> Table {
    let mut t = match kind {
        Kind::Mesh => Table::new(&["NAME", "MTLS", "TRUST-DOMAIN", "DEFAULT-POLICY"]),
        Kind::Service => Table::new(&["NAMESPACE", "NAME", "SELECTOR", "PORTS", "ENDPOINTS"]),
        Kind::Workload => Table::new(&["NAMESPACE", "NAME", "REPLICAS", "COMMAND"]),
        Kind::HttpRoute | Kind::GrpcRoute => {
            Table::new(&["NAMESPACE", "NAME", "PARENTS", "BACKENDS"])
        }
        Kind::TrafficPolicy => Table::new(&["NAMESPACE", "NAME", "TARGET"]),
        Kind::AuthorizationPolicy => {
            Table::new(&["NAMESPACE", "NAME", "TARGET", "ACTION", "RULES"])
        }
    };
    for r in resources {
        let (ns, name) = (r.metadata.namespace.clone(), r.metadata.name.clone());
        let row = match &r.spec {
            Spec::Mesh(m) => vec![
                name,
                format!("{:?}", m.mtls).to_ascii_lowercase(),
                m.trust_domain.clone(),
                format!("{:?}", m.default_policy).to_ascii_lowercase(),
            ],
            Spec::Service(s) => {
                let selector = join(s.selector.iter().map(|(k, v)| format!("{k}={v}")));
                let ports = join(s.ports.iter().map(|p| match p.protocol {
                    Some(proto) => {
                        format!("{}/{}", p.port, format!("{proto:?}").to_ascii_lowercase())
                    }
                    None => p.port.to_string(),
                }));
                let endpoints = services
                    .and_then(|svcs| svcs.iter().find(|s| s.namespace == ns && s.name == name))
                    .map(|s| s.endpoints.len().to_string())
                    .unwrap_or_else(|| if services.is_some() { "0" } else { "?" }.to_string());
                vec![ns, name, selector, ports, endpoints]
            }
            Spec::Workload(w) => vec![ns, name, w.replicas.to_string(), w.command.join(" ")],
            Spec::HttpRoute(h) => {
                let parents = join(h.parent_refs.iter().map(|p| p.name.clone()));
                let backends = join(h.rules.iter().flat_map(|rule| {
                    let weighted = rule.backend_refs.len() > 1;
                    rule.backend_refs
                        .iter()
                        .map(move |b| match (weighted, b.port) {
                            (true, _) => format!("{}={}", b.name, b.weight),
                            (false, Some(port)) => format!("{}:{port}", b.name),
                            (false, None) => b.name.clone(),
                        })
                }));
                vec![ns, name, parents, backends]
            }
            Spec::GrpcRoute(g) => {
                let parents = join(g.parent_refs.iter().map(|p| p.name.clone()));
                vec![ns, name, parents, "-".into()]
            }
            Spec::TrafficPolicy(tp) => vec![ns, name, tp.target_ref.name.clone()],
            Spec::AuthorizationPolicy(ap) => vec![
                ns,
                name,
                ap.target_ref
                    .as_ref()
                    .map(|t| t.name.clone())
                    .unwrap_or_else(|| "<namespace>".into()),
                format!("{:?}", ap.action).to_ascii_uppercase(),
                ap.rules.len().to_string(),
            ],
        };
        t.row(row);
    }
    t
}

pub fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn join(items: impl Iterator<Item = String>) -> String {
    let v: Vec<String> = items.collect();
    if v.is_empty() {
        "<none>".to_string()
    } else {
        v.join(",")
    }
}

pub async fn delete(global: &Global, args: &NameArgs) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(&args.kind)?;
    let ns = global
        .namespace
        .as_deref()
        .unwrap_or(trellis_resource::DEFAULT_NAMESPACE);
    let api = Api::discover(global)?;
    match api
        .delete::<serde_json::Value>(&resource_path(kind, ns, &args.name))
        .await
    {
        Ok(_) => {
            println!("{} deleted", shown(kind.as_str(), &args.name));
            Ok(ExitCode::SUCCESS)
        }
        Err(ApiError::NotFound(_)) => anyhow::bail!("{kind} {ns}/{} not found", args.name),
        Err(e) => Err(e.into()),
    }
}

pub async fn describe(global: &Global, args: &NameArgs) -> anyhow::Result<ExitCode> {
    let kind = parse_kind(&args.kind)?;
    let ns = global
        .namespace
        .as_deref()
        .unwrap_or(trellis_resource::DEFAULT_NAMESPACE);
    let api = Api::discover(global)?;
    let resource = fetch_one(&api, kind, ns, &args.name).await?;
    print!(
        "{}",
        trellis_resource::to_yaml(std::slice::from_ref(&resource))
    );
    match kind {
        Kind::Service => {
            let services: Vec<ServiceInfo> = api.get("/api/v1/services").await?;
            let svc = services
                .into_iter()
                .find(|s| s.namespace == ns && s.name == args.name);
            let endpoints = svc
                .as_ref()
                .map(|s| s.endpoints.as_slice())
                .unwrap_or_default();
            println!();
            if let Some(vip) = svc
                .as_ref()
                .and_then(|s| s.vip.as_deref())
                .filter(|v| !v.is_empty())
            {
                println!("VIP: {vip}");
            }
            println!("Endpoints ({}):", endpoints.len());
            let mut t = Table::new(&["ADDRESS", "INSTANCE", "WORKLOAD", "IDENTITY"]);
            for e in endpoints {
                t.row(vec![
                    e.address.clone(),
                    e.instance.clone(),
                    format!("{}/{}", e.namespace, e.workload),
                    e.identity.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            if !t.is_empty() {
                print_indented(&t);
            }
        }
        Kind::Workload => {
            let proxies: Vec<ProxyInfo> = api.get("/api/v1/proxies").await?;
            let mine: Vec<_> = proxies
                .iter()
                .filter(|p| p.namespace == ns && p.workload == args.name)
                .collect();
            println!();
            println!("Proxies ({}):", mine.len());
            let mut t = Table::new(&[
                "INSTANCE",
                "ADMIN",
                "CONNECTED",
                "SENT",
                "ACKED",
                "LAST-ERROR",
            ]);
            for p in mine {
                t.row(vec![
                    p.instance.clone(),
                    p.admin_addr.clone().unwrap_or_else(|| "-".into()),
                    p.connected_seconds
                        .map(|s| format!("{s:.0}s"))
                        .unwrap_or_else(|| "-".into()),
                    version(&p.sent_version),
                    version(&p.acked_version),
                    p.last_error.clone().unwrap_or_else(|| "-".into()),
                ]);
            }
            if !t.is_empty() {
                print_indented(&t);
            }
        }
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}

fn print_indented(t: &Table) {
    for line in t.render().lines() {
        println!("  {line}");
    }
}

/// A config version as the API gives it (a number or a string; null when
/// nothing was sent or acknowledged yet).
pub fn version(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: catalog}
spec:
  selector: {app: catalog}
  ports: [{name: http, port: 8080, protocol: http}]
---
apiVersion: trellis.dev/v1alpha1
kind: Workload
metadata: {name: reviews, labels: {app: reviews}}
spec:
  replicas: 2
  command: [trellis, demo-app]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split}
spec:
  parentRefs: [{name: catalog, kind: Service}]
  rules:
  - backendRefs: [{name: catalog-v1, port: 8080, weight: 90}, {name: catalog-v2, port: 8080, weight: 10}]
"#;

    #[test]
    fn tables_have_kind_specific_columns() {
        let rs = trellis_resource::parse_documents("t.yaml", DOCS).unwrap();
        let svc: Vec<_> = rs
            .iter()
            .filter(|r| r.kind() == Kind::Service)
            .cloned()
            .collect();
        let out = table(Kind::Service, &svc, Some(&[])).render();
        assert_eq!(
            out,
            "NAMESPACE   NAME      SELECTOR      PORTS       ENDPOINTS\n\
             default     catalog   app=catalog   8080/http   0\n"
        );
        let wl: Vec<_> = rs
            .iter()
            .filter(|r| r.kind() == Kind::Workload)
            .cloned()
            .collect();
        assert!(table(Kind::Workload, &wl, None)
            .render()
            .contains("reviews   2          trellis demo-app"));
        let rt: Vec<_> = rs
            .iter()
            .filter(|r| r.kind() == Kind::HttpRoute)
            .cloned()
            .collect();
        assert!(table(Kind::HttpRoute, &rt, None)
            .render()
            .contains("catalog   catalog-v1=90,catalog-v2=10"));
    }

    #[test]
    fn kinds_and_paths() {
        assert_eq!(parse_kind("svc").unwrap(), Kind::Service);
        assert!(parse_kind("pods")
            .unwrap_err()
            .to_string()
            .contains("use mesh"));
        assert_eq!(
            resource_path(Kind::Service, "default", "catalog"),
            "/api/v1/resources/service/default/catalog"
        );
        assert_eq!(
            resource_path(Kind::Mesh, "default", "default"),
            "/api/v1/resources/mesh/-/default"
        );
        assert_eq!(shown("HTTPRoute", "split"), "httproute/split");
    }
}
