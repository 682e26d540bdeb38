//! The observability commands against a mesh on Kubernetes: `stat`,
//! `edges`, `trace`, `tap`, `top`, `get` and `dashboard` with
//! `--kubernetes`.
//!
//! Each control-plane replica keeps the reports, traces and tap sessions
//! of the sidecars connected to it, so the CLI asks every ready replica
//! and merges the answers: rows by their key with counts and latency
//! histograms added (the quantiles are computed again from the sum, not
//! averaged), traces by id, tap streams line by line. A replica is
//! reached through a port-forward of its HTTPS API (as kubectl's), checked
//! against the mesh CA's public roots (ConfigMap `trellis-ca-roots`) under
//! its Service's name. The credential is a one-hour token the API server
//! makes for the ServiceAccount `trellis-viewer` (or `trellis-tap`), which
//! the replicas check with a TokenReview: who may observe the mesh is
//! Kubernetes RBAC (the Roles of the same names), and no secret is stored.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use clap::Args;
use http_body_util::BodyExt;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, ServiceAccount};
use kube::api::{ListParams, PostParams};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_k8s::names::{
    APP_LABEL, CONTROL_PLANE, CONTROL_SERVICE, DEFAULT_NAMESPACE, HTTP_PORT, ROOTS_CONFIG_MAP,
    ROOTS_KEY, TAP_ACCOUNT, VIEWER_ACCOUNT,
};

use crate::cli::Global;
use crate::client::Api;

/// How long the CLI's token lives (as `kubectl create token`'s); a tap
/// ends with its token. Long-running commands (`dashboard`) make a new one
/// every `TOKEN_RENEW`.
const TOKEN_SECONDS: i64 = 3600;
const TOKEN_RENEW: Duration = Duration::from_secs(1800);

/// `--kubernetes` and where to find the control plane on the cluster.
#[derive(Clone, Debug, Default, Args)]
pub struct KubeArgs {
    /// Ask the control plane on the Kubernetes cluster of the kubeconfig
    /// (found as kubectl finds it): every replica, through port-forwards.
    // Global, so that `trace show ID --kubernetes` parses.
    #[arg(long, global = true)]
    pub kubernetes: bool,
    /// The kubeconfig (default: as kubectl finds it).
    #[arg(long, global = true, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
    /// The namespace `trellis install` put the control plane in.
    #[arg(long, global = true, value_name = "NS", default_value = DEFAULT_NAMESPACE)]
    pub control_plane_namespace: String,
}

/// What the command needs: reading (`trellis-viewer`) or tapping
/// (`trellis-tap`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    View,
    Tap,
}

/// The control plane the command talks to: the one of `--server` (or the
/// local mesh), or every replica on the cluster.
pub enum Mesh {
    One(Box<Api>),
    Cluster(Replicas),
}

impl Mesh {
    pub async fn open(global: &Global, kube: &KubeArgs, access: Access) -> anyhow::Result<Mesh> {
        if kube.kubernetes {
            Ok(Mesh::Cluster(Replicas::connect(kube, access).await?))
        } else {
            Ok(Mesh::One(Box::new(Api::discover(global)?)))
        }
    }

    /// The APIs to ask: one, or a replica each.
    pub fn apis(&self) -> Vec<&Api> {
        match self {
            Mesh::One(api) => vec![api],
            Mesh::Cluster(r) => r.replicas.iter().map(|(_, api)| api).collect(),
        }
    }

    /// One API that answers for the whole mesh what every replica knows
    /// alike (resources, services): the local one, or the first replica.
    pub fn first(&self) -> &Api {
        self.apis()[0]
    }

    /// GETs `path` from every replica and merges the answers with `merge`
    /// (one answer is passed through as it is). A replica that fails is
    /// reported on stderr, and the others' answers are used; when all fail,
    /// the first error is the command's.
    pub async fn get(&self, path: &str, merge: fn(Vec<Value>) -> Value) -> anyhow::Result<Value> {
        match self {
            Mesh::One(api) => Ok(api.get(path).await?),
            Mesh::Cluster(r) => Ok(merge(r.get_all(path).await?)),
        }
    }

    /// Streams `path` (newline-delimited JSON) from every replica as one
    /// stream of lines. A replica whose stream fails to open is reported,
    /// as in `get`; the stream ends when every replica's has.
    pub async fn lines(&self, path: &str) -> anyhow::Result<mpsc::Receiver<Bytes>> {
        let apis = self.apis();
        let opened = futures::future::join_all(apis.iter().map(|api| api.stream(path))).await;
        let (tx, rx) = mpsc::channel(256);
        let mut first_err = None;
        let mut any = false;
        for (i, body) in opened.into_iter().enumerate() {
            match body {
                Ok(mut body) => {
                    any = true;
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let mut buf: Vec<u8> = Vec::new();
                        while let Some(Ok(frame)) = body.frame().await {
                            let Some(data) = frame.data_ref() else {
                                continue;
                            };
                            buf.extend_from_slice(data);
                            while let Some(at) = buf.iter().position(|&b| b == b'\n') {
                                let line: Vec<u8> = buf.drain(..=at).collect();
                                if tx.send(Bytes::from(line)).await.is_err() {
                                    return;
                                }
                            }
                        }
                    });
                }
                // None of this replica's sidecars match: others may have some.
                Err(e @ crate::client::ApiError::NotFound(_)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    if let Mesh::Cluster(r) = self {
                        eprintln!(
                            "warning: control-plane replica {} refused the stream ({e}); its sidecars are not in it",
                            r.replicas[i].0
                        );
                    }
                    first_err.get_or_insert(e);
                }
            }
        }
        match (any, first_err) {
            (false, Some(e)) => Err(e.into()),
            _ => Ok(rx),
        }
    }
}

/// The ready replicas of the control plane, each behind a local
/// port-forward (stopped when this is dropped).
pub struct Replicas {
    /// (pod name, its API).
    pub replicas: Vec<(String, Api)>,
    forwards: Vec<JoinHandle<()>>,
}

impl Drop for Replicas {
    fn drop(&mut self) {
        for f in &self.forwards {
            f.abort();
        }
    }
}

impl Replicas {
    /// GETs `path` from every replica: the answers of those that gave one
    /// (a failure is named on stderr), or the first error when none did.
    async fn get_all(&self, path: &str) -> anyhow::Result<Vec<Value>> {
        let answers =
            futures::future::join_all(self.replicas.iter().map(|(_, api)| api.get::<Value>(path)))
                .await;
        let mut ok = Vec::new();
        let mut first_err = None;
        for ((pod, _), a) in self.replicas.iter().zip(answers) {
            match a {
                Ok(v) => ok.push(v),
                // Not kept by this replica (a trace): others may have it.
                Err(e @ crate::client::ApiError::NotFound(_)) => {
                    first_err.get_or_insert(e);
                }
                Err(e) => {
                    eprintln!("warning: control-plane replica {pod} did not answer ({e}); its sidecars' figures are missing");
                    first_err.get_or_insert(e);
                }
            }
        }
        match (ok.is_empty(), first_err) {
            (true, Some(e)) => Err(e.into()),
            _ => Ok(ok),
        }
    }

    pub async fn connect(kube: &KubeArgs, access: Access) -> anyhow::Result<Replicas> {
        let ns = kube.control_plane_namespace.as_str();
        let client = trellis_k8s::client::client(kube.kubeconfig.as_deref()).await?;
        let pods: kube::Api<Pod> = kube::Api::namespaced(client.clone(), ns);
        let list = pods
            .list(&ListParams::default().labels(&format!("{APP_LABEL}={CONTROL_PLANE}")))
            .await
            .with_context(|| format!("cannot list the control plane's pods in {ns}: does your kubeconfig allow it (the Role trellis-viewer in {ns})?"))?;
        let ready: Vec<String> = list
            .items
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none() && pod_ready(p))
            .filter_map(|p| p.metadata.name.clone())
            .collect();
        if ready.is_empty() {
            anyhow::bail!(
                "no ready control-plane replica in namespace {ns}: is Trellis installed there? \
                 `trellis check --kubernetes -n {ns}` says what is wrong (another namespace: --control-plane-namespace NS)"
            );
        }
        let maps: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), ns);
        let roots = maps
            .get_opt(ROOTS_CONFIG_MAP)
            .await
            .with_context(|| format!("cannot read the ConfigMap {ns}/{ROOTS_CONFIG_MAP} (the mesh CA's public roots): does your kubeconfig allow it (the Role trellis-viewer in {ns})?"))?
            .and_then(|cm| cm.data?.remove(ROOTS_KEY))
            .with_context(|| format!("the ConfigMap {ns}/{ROOTS_CONFIG_MAP} with the mesh CA's roots is missing: every replica writes it on start; is the control plane of this version running (`trellis check --kubernetes`)?"))?;
        let token = Arc::new(RwLock::new(token(client.clone(), ns, access).await?));
        let server_name = format!("{CONTROL_SERVICE}.{ns}.svc");
        let mut replicas = Vec::new();
        let mut forwards = vec![tokio::spawn(renew(
            client.clone(),
            ns.to_string(),
            access,
            token.clone(),
        ))];
        for pod in ready {
            let listener = TcpListener::bind(("127.0.0.1", 0))
                .await
                .context("cannot listen on 127.0.0.1 for a port-forward")?;
            let url = format!("https://{}", listener.local_addr()?);
            forwards.push(tokio::spawn(forward(pods.clone(), pod.clone(), listener)));
            let api = Api::with_roots(
                &url,
                &format!("control-plane replica {ns}/{pod} through a port-forward"),
                &roots,
                &server_name,
            )?
            .with_renewed_token(token.clone());
            replicas.push((pod, api));
        }
        Ok(Replicas { replicas, forwards })
    }
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The user may not make tokens of the observer account a command needs.
#[derive(Debug, thiserror::Error)]
#[error("you may not make tokens of {namespace}/{account}, which this needs: ask for the Role {account} (`kubectl create rolebinding -n {namespace} {account}-$USER --role {account} --user $USER`)")]
pub struct NoTokenAccess {
    pub namespace: String,
    pub account: &'static str,
}

/// A token for the observer account that `access` needs, audience
/// `trellis-api`, made by the API server for this user.
async fn token(client: kube::Client, ns: &str, access: Access) -> anyhow::Result<String> {
    let account = match access {
        Access::View => VIEWER_ACCOUNT,
        Access::Tap => TAP_ACCOUNT,
    };
    let accounts: kube::Api<ServiceAccount> = kube::Api::namespaced(client, ns);
    let request = TokenRequest {
        spec: Some(TokenRequestSpec {
            audiences: Some(vec![trellis_k8s::names::API_AUDIENCE.to_string()]),
            expiration_seconds: Some(TOKEN_SECONDS),
            ..Default::default()
        }),
        ..Default::default()
    };
    let made: TokenRequest = accounts
        .create_subresource("token", account, &PostParams::default(), &request)
        .await
        .map_err(|e| match &e {
            kube::Error::Api(s) if s.code == 403 => anyhow::Error::new(NoTokenAccess {
                namespace: ns.to_string(),
                account,
            }),
            kube::Error::Api(s) if s.code == 404 => anyhow::anyhow!(
                "the ServiceAccount {ns}/{account} is missing: apply `trellis install` of this version"
            ),
            _ => anyhow::anyhow!("cannot make a token of {ns}/{account}: {e}"),
        })?;
    made.status
        .and_then(|s| s.token)
        .filter(|t| !t.is_empty())
        .context("the API server made no token")
}

/// Makes a new token every `TOKEN_RENEW`, for commands that outlive one.
async fn renew(client: kube::Client, ns: String, access: Access, into: Arc<RwLock<String>>) {
    loop {
        tokio::time::sleep(TOKEN_RENEW).await;
        match token(client.clone(), &ns, access).await {
            Ok(t) => *into.write().unwrap_or_else(|e| e.into_inner()) = t,
            Err(e) => eprintln!(
                "warning: cannot renew the token (the old one expires within 30 min): {e:#}"
            ),
        }
    }
}

/// Serves `listener` as `kubectl port-forward` does: each connection gets
/// its own forward to the pod's HTTP API port.
async fn forward(pods: kube::Api<Pod>, pod: String, listener: TcpListener) {
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            return;
        };
        let (pods, pod) = (pods.clone(), pod.clone());
        tokio::spawn(async move {
            let mut pf = match pods.portforward(&pod, &[HTTP_PORT]).await {
                Ok(pf) => pf,
                Err(e) => {
                    eprintln!(
                        "warning: cannot port-forward to {pod}:{HTTP_PORT} ({e}): does your kubeconfig allow pods/portforward (the Role trellis-viewer)?"
                    );
                    return;
                }
            };
            let Some(mut upstream) = pf.take_stream(HTTP_PORT) else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
            drop(upstream);
            let _ = tokio::time::timeout(Duration::from_secs(5), pf.join()).await;
        });
    }
}

// ---------------------------------------------------------------- merging

/// Numbers that add up across replicas.
const SUMMED: [&str; 4] = ["requests", "rps", "failures", "tlsRequests"];

/// Rows of several replicas' answers (`field` of each) as one list: rows
/// with equal `key` fields are added up, their shares and quantiles
/// computed again from the sums; identity lists are joined.
pub fn merge_rows(answers: &[Value], field: &str, key: &[&str]) -> Vec<Value> {
    let mut merged: BTreeMap<Vec<String>, Value> = BTreeMap::new();
    for row in answers.iter().filter_map(|a| a[field].as_array()).flatten() {
        let k: Vec<String> = key.iter().map(|f| row[*f].to_string()).collect();
        match merged.get_mut(&k) {
            None => {
                merged.insert(k, row.clone());
            }
            Some(into) => add_row(into, row),
        }
    }
    merged.into_values().collect()
}

fn add_row(into: &mut Value, row: &Value) {
    for f in SUMMED {
        let sum = into[f].as_f64().unwrap_or(0.0) + row[f].as_f64().unwrap_or(0.0);
        // Counts stay integers in JSON.
        into[f] = if f == "rps" {
            json!(sum)
        } else {
            json!(sum as u64)
        };
    }
    let (a, b) = (
        into["latencyBuckets"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
        row["latencyBuckets"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    let buckets: Vec<u64> = (0..a.len().max(b.len()))
        .map(|i| {
            a.get(i).and_then(Value::as_u64).unwrap_or(0)
                + b.get(i).and_then(Value::as_u64).unwrap_or(0)
        })
        .collect();
    let requests = into["requests"].as_f64().unwrap_or(0.0);
    let share = |n: &str| (requests > 0.0).then(|| into[n].as_f64().unwrap_or(0.0) / requests);
    let (failed, tls) = (share("failures"), share("tlsRequests"));
    into["successRate"] = json!(failed.map(|f| 1.0 - f));
    into["tlsShare"] = json!(tls);
    if into.get("mtls").is_some() {
        into["mtls"] = json!(match tls {
            Some(s) if s >= 1.0 => "mtls",
            Some(s) if s > 0.0 => "partial",
            _ => "plaintext",
        });
    }
    for (name, q) in [("p50Ms", 0.50), ("p95Ms", 0.95), ("p99Ms", 0.99)] {
        if into.get(name).is_some() {
            into[name] = json!(trellis_control::stats::quantile(&buckets, q));
        }
    }
    into["latencyBuckets"] = json!(buckets);
    for ids in ["sourceIdentities", "destinationIdentities"] {
        if into.get(ids).is_some() {
            let joined: BTreeSet<&str> = into[ids]
                .as_array()
                .into_iter()
                .chain(row[ids].as_array())
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            let joined: Vec<String> = joined.into_iter().map(String::from).collect();
            into[ids] = json!(joined);
        }
    }
}

/// `/api/v1/stat` of every replica as one answer.
pub fn merge_stat(answers: Vec<Value>) -> Value {
    let rows = merge_rows(&answers, "rows", &["kind", "namespace", "name", "service"]);
    json!({"windowSeconds": answers.first().map(|a| a["windowSeconds"].clone()), "rows": rows})
}

/// `/api/v1/edges` of every replica as one answer.
pub fn merge_edges(answers: Vec<Value>) -> Value {
    let edges = merge_rows(
        &answers,
        "edges",
        &[
            "sourceNamespace",
            "sourceWorkload",
            "destinationNamespace",
            "destinationService",
        ],
    );
    json!({"windowSeconds": answers.first().map(|a| a["windowSeconds"].clone()), "edges": edges})
}

/// `/api/v1/traces` of every replica as one list, newest first: a trace
/// whose spans went to several replicas is one entry (its spans and
/// services joined, its root the earliest part's).
pub fn merge_trace_lists(answers: Vec<Value>) -> Value {
    let mut by_id: BTreeMap<String, Value> = BTreeMap::new();
    let (mut received, mut dropped) = (0u64, 0u64);
    for a in &answers {
        received += a["spansReceived"].as_u64().unwrap_or(0);
        dropped += a["spansDropped"].as_u64().unwrap_or(0);
        for t in a["traces"].as_array().into_iter().flatten() {
            let id = t["traceId"].as_str().unwrap_or_default().to_string();
            match by_id.get_mut(&id) {
                None => {
                    by_id.insert(id, t.clone());
                }
                Some(into) => join_trace(into, t),
            }
        }
    }
    let mut traces: Vec<Value> = by_id.into_values().collect();
    traces.sort_by_key(|t| std::cmp::Reverse(t["startUnixNanos"].as_u64().unwrap_or(0)));
    json!({"traces": traces, "spansReceived": received, "spansDropped": dropped})
}

fn join_trace(into: &mut Value, t: &Value) {
    let start = |v: &Value| v["startUnixNanos"].as_u64().unwrap_or(0);
    let end = |v: &Value| start(v) + (v["durationMs"].as_f64().unwrap_or(0.0) * 1e6) as u64;
    let (s, e) = (start(into).min(start(t)), end(into).max(end(t)));
    if start(t) < start(into) {
        into["rootService"] = t["rootService"].clone();
        into["rootName"] = t["rootName"].clone();
    }
    for n in ["spans", "errors"] {
        into[n] = json!(into[n].as_u64().unwrap_or(0) + t[n].as_u64().unwrap_or(0));
    }
    let services: BTreeSet<&str> = into["services"]
        .as_array()
        .into_iter()
        .chain(t["services"].as_array())
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let services: Vec<&str> = services.into_iter().collect();
    into["services"] = json!(services);
    into["startUnixNanos"] = json!(s);
    into["durationMs"] = json!(e.saturating_sub(s) as f64 / 1e6);
}

/// `/api/v1/traces/{id}` of the replicas that keep part of it, as one
/// trace: every span once, in start order.
pub fn merge_trace(answers: Vec<Value>) -> Value {
    let mut spans: BTreeMap<String, Value> = BTreeMap::new();
    for s in answers
        .iter()
        .filter_map(|a| a["spans"].as_array())
        .flatten()
    {
        spans
            .entry(s["spanId"].as_str().unwrap_or_default().to_string())
            .or_insert_with(|| s.clone());
    }
    let mut spans: Vec<Value> = spans.into_values().collect();
    spans.sort_by_key(|s| s["startUnixNanos"].as_u64().unwrap_or(0));
    json!({"traceId": answers.first().map(|a| a["traceId"].clone()), "spans": spans})
}

/// The answer of the first replica (what every replica knows alike).
pub fn first(answers: Vec<Value>) -> Value {
    answers.into_iter().next().unwrap_or(Value::Null)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets(pairs: &[(usize, u64)]) -> Vec<u64> {
        let mut b = vec![0; trellis_api::LATENCY_BUCKETS_MS.len() + 1];
        for (i, n) in pairs {
            b[*i] = *n;
        }
        b
    }

    fn stat_row(name: &str, requests: u64, failures: u64, tls: u64, b: Vec<u64>) -> Value {
        json!({"kind": "service", "namespace": "prod", "name": name, "requests": requests,
               "rps": requests as f64 / 30.0, "failures": failures, "tlsRequests": tls,
               "successRate": 1.0 - failures as f64 / requests as f64,
               "p50Ms": 0.0, "p95Ms": 0.0, "p99Ms": 0.0,
               "tlsShare": tls as f64 / requests as f64, "latencyBuckets": b})
    }

    #[test]
    fn rows_of_replicas_add_up_and_quantiles_come_from_the_summed_histogram() {
        // Replica A saw 90 fast requests of `web`, replica B 10 slow ones
        // (and all of `db`): the p99 is the slow bucket's, which neither
        // replica's own p99 nor their mean would give.
        let a =
            json!({"windowSeconds": 30, "rows": [stat_row("web", 90, 0, 90, buckets(&[(0, 90)]))]});
        let b = json!({"windowSeconds": 30, "rows": [
            stat_row("web", 10, 5, 0, buckets(&[(10, 10)])),
            stat_row("db", 4, 0, 4, buckets(&[(1, 4)])),
        ]});
        let merged = merge_stat(vec![a, b]);
        let rows = merged["rows"].as_array().unwrap();
        assert_eq!(rows.len(), 2);
        let web = rows.iter().find(|r| r["name"] == "web").unwrap();
        assert_eq!(web["requests"], 100);
        assert_eq!(web["failures"], 5);
        assert!((web["successRate"].as_f64().unwrap() - 0.95).abs() < 1e-9);
        assert!((web["tlsShare"].as_f64().unwrap() - 0.9).abs() < 1e-9);
        assert!((web["rps"].as_f64().unwrap() - 100.0 / 30.0).abs() < 1e-9);
        let summed = buckets(&[(0, 90), (10, 10)]);
        assert_eq!(web["latencyBuckets"], json!(summed));
        for (q, name) in [(0.5, "p50Ms"), (0.99, "p99Ms")] {
            assert_eq!(
                web[name].as_f64(),
                trellis_control::stats::quantile(&summed, q),
                "{name}"
            );
        }
        assert!(web["p99Ms"].as_f64() > web["p50Ms"].as_f64());
        // A row only one replica has is passed through.
        let db = rows.iter().find(|r| r["name"] == "db").unwrap();
        assert_eq!(db, &stat_row("db", 4, 0, 4, buckets(&[(1, 4)])));
    }

    #[test]
    fn edges_join_identities_and_say_mtls_from_the_summed_share() {
        let edge = |tls: u64, ids: &[&str]| {
            json!({"sourceNamespace": "dev", "sourceWorkload": "web", "destinationNamespace": "prod",
                   "destinationService": "api", "requests": 10, "rps": 1.0, "failures": 0,
                   "tlsRequests": tls, "successRate": 1.0, "p50Ms": 1.0, "p99Ms": 1.0,
                   "tlsShare": tls as f64 / 10.0, "latencyBuckets": buckets(&[(2, 10)]),
                   "sourceIdentities": ids, "destinationIdentities": ["spiffe://t/ns/prod/sa/api"],
                   "mtls": if tls == 10 { "mtls" } else { "plaintext" }})
        };
        let merged = merge_edges(vec![
            json!({"edges": [edge(10, &["spiffe://t/ns/dev/sa/web"])]}),
            json!({"edges": [edge(0, &["spiffe://t/ns/dev/sa/web2"])]}),
        ]);
        let e = &merged["edges"][0];
        assert_eq!(merged["edges"].as_array().unwrap().len(), 1);
        assert_eq!(e["requests"], 20);
        assert_eq!(e["mtls"], "partial");
        assert_eq!(
            e["sourceIdentities"],
            json!(["spiffe://t/ns/dev/sa/web", "spiffe://t/ns/dev/sa/web2"])
        );
        assert_eq!(
            e["destinationIdentities"],
            json!(["spiffe://t/ns/prod/sa/api"])
        );
    }

    #[test]
    fn a_trace_split_across_replicas_is_listed_once_and_shown_whole() {
        let summary = |id: &str, start: u64, ms: f64, root: &str, services: &[&str], spans: u64| {
            json!({"traceId": id, "rootService": root, "rootName": "GET /", "startUnixNanos": start,
                   "durationMs": ms, "spans": spans, "services": services, "errors": 0})
        };
        let list = merge_trace_lists(vec![
            json!({"traces": [summary("t1", 2_000_000, 1.0, "api", &["api"], 1),
                              summary("t0", 1_000, 0.5, "x", &["x"], 1)],
                   "spansReceived": 2, "spansDropped": 0}),
            json!({"traces": [summary("t1", 1_000_000, 3.0, "web", &["web"], 2)],
                   "spansReceived": 2, "spansDropped": 1}),
        ]);
        let traces = list["traces"].as_array().unwrap();
        assert_eq!(traces.len(), 2);
        let t1 = &traces[0];
        assert_eq!(t1["traceId"], "t1", "newest first");
        assert_eq!(t1["rootService"], "web", "the earliest part is the root");
        assert_eq!(t1["spans"], 3);
        assert_eq!(t1["services"], json!(["api", "web"]));
        assert_eq!(t1["startUnixNanos"], 1_000_000);
        assert!((t1["durationMs"].as_f64().unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(
            (list["spansReceived"].clone(), list["spansDropped"].clone()),
            (json!(4), json!(1))
        );

        let span = |id: &str, start: u64| json!({"spanId": id, "startUnixNanos": start});
        let shown = merge_trace(vec![
            json!({"traceId": "t1", "spans": [span("b", 2), span("a", 1)]}),
            json!({"traceId": "t1", "spans": [span("c", 3), span("a", 1)]}),
        ]);
        let ids: Vec<&str> = shown["spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["spanId"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["a", "b", "c"]);
    }
}
