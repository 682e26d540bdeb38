//! The observability part of the HTTP API: traces (and the OTLP/HTTP
//! receiver), edges, live tap, and the dashboard's assets.
//!
//! | path | what |
//! | --- | --- |
//! | `GET /api/v1/traces?service=&limit=` | the newest traces kept |
//! | `GET /api/v1/traces/{traceId}` | one trace's spans |
//! | `POST /v1/traces` | OTLP/HTTP (protobuf) receiver |
//! | `GET /api/v1/edges?window=` | who calls whom, with identities and mTLS share |
//! | `GET /api/v1/tap?workload=&namespace=&path=&max=` | live request metadata as JSON lines; needs the tap role |
//! | `/`, `/dashboard.js`, `/dashboard.css` | the dashboard |

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use prost::Message;
use serde::Deserialize;
use serde_json::{json, Value};
use trellis_resource::Kind;

use crate::auth::Principal;
use crate::http::{ApiError, AppState};
use crate::registry::spiffe_id;
use crate::stats::parse_window;

/// Largest OTLP/HTTP request accepted.
pub const MAX_OTLP_BYTES: usize = 8 << 20;
/// A tap stream sends an empty line this often, so a client that went away
/// is noticed (and the tap stopped) even when no request flows.
const TAP_HEARTBEAT: Duration = Duration::from_secs(10);

const DASHBOARD_HTML: &str = include_str!("dashboard/index.html");
const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");
const DASHBOARD_CSS: &str = include_str!("dashboard/dashboard.css");

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", DASHBOARD_HTML)
}

pub async fn dashboard_js() -> Response {
    asset("text/javascript; charset=utf-8", DASHBOARD_JS)
}

pub async fn dashboard_css() -> Response {
    asset("text/css; charset=utf-8", DASHBOARD_CSS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[derive(Debug, Deserialize)]
pub struct TracesQuery {
    service: Option<String>,
    limit: Option<usize>,
}

pub async fn list_traces(
    State(state): State<AppState>,
    Query(q): Query<TracesQuery>,
) -> Json<Value> {
    let traces = &state.observers().traces;
    let limit = q.limit.unwrap_or(50).min(crate::traces::MAX_TRACES);
    let items = traces.list(q.service.as_deref().filter(|s| !s.is_empty()), limit);
    Json(json!({
        "traces": items,
        "spansReceived": traces.spans_received.get(),
        "spansDropped": traces.spans_dropped.get(),
    }))
}

pub async fn get_trace(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let valid = id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return Err(ApiError::BadRequest(
            "a trace id is 32 hex digits, as `trellis trace list` shows".into(),
        ));
    }
    match state.observers().traces.get(&id) {
        Some(spans) => Ok(Json(json!({"traceId": id.to_ascii_lowercase(), "spans": spans}))),
        None => Err(ApiError::NotFound(format!(
            "trace {id} is not kept here: it may not have been sampled, or is older than the last {} traces",
            crate::traces::MAX_TRACES
        ))),
    }
}

/// OTLP/HTTP: protobuf bodies only.
pub async fn otlp_traces(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.is_empty() && !ct.starts_with("application/x-protobuf") {
        return (
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send OTLP as application/x-protobuf\n",
        )
            .into_response();
    }
    match opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(body)
    {
        Ok(req) => {
            state.observers().traces.ingest(req);
            let resp =
                opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::default();
            (
                [(header::CONTENT_TYPE, "application/x-protobuf")],
                resp.encode_to_vec(),
            )
                .into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            format!("not an OTLP ExportTraceServiceRequest: {e}\n"),
        )
            .into_response(),
    }
}

#[derive(Debug, Deserialize)]
pub struct WindowQuery {
    window: Option<String>,
}

pub async fn edges(
    State(state): State<AppState>,
    Query(q): Query<WindowQuery>,
) -> Result<Json<Value>, ApiError> {
    let window = match q.window.as_deref() {
        Some(w) => parse_window(w).map_err(|e| ApiError::BadRequest(e.to_string()))?,
        None => Duration::from_secs(30),
    };
    let snap = state.xds().snapshot();
    let td = if snap.trust_domain.is_empty() {
        "trellis.local".to_string()
    } else {
        snap.trust_domain.clone()
    };
    // Identities of the workloads and of each service's endpoints, as the
    // connected proxies say.
    let mut workload_ids: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for p in snap.proxies.iter() {
        workload_ids
            .entry((p.namespace.clone(), p.workload.clone()))
            .or_default()
            .insert(p.identity.clone());
    }
    let (services, _) = state.store().list(Some(Kind::Service)).await?;
    let mut service_ids: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for r in &services {
        let Some(spec) = r.as_service() else { continue };
        let ids = snap
            .proxies
            .iter()
            .filter(|p| p.selected_by(&r.metadata.namespace, &spec.selector))
            .map(|p| p.identity.clone())
            .collect();
        service_ids.insert((r.metadata.namespace.clone(), r.metadata.name.clone()), ids);
    }
    let rows: Vec<Value> = state
        .stats()
        .edges(window)
        .into_iter()
        .map(|e| {
            let source_ids: Vec<String> = if e.source_workload.is_empty() {
                Vec::new()
            } else {
                workload_ids
                    .get(&(e.source_namespace.clone(), e.source_workload.clone()))
                    .map(|s| s.iter().cloned().collect())
                    // A workload no longer connected: its default identity.
                    .unwrap_or_else(|| {
                        vec![spiffe_id(&td, &e.source_namespace, &e.source_workload)]
                    })
            };
            let dest_ids: Vec<String> = service_ids
                .get(&(
                    e.destination_namespace.clone(),
                    e.destination_service.clone(),
                ))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default();
            let mtls = match e.tls_share {
                Some(s) if s >= 1.0 => "mtls",
                Some(s) if s > 0.0 => "partial",
                _ => "plaintext",
            };
            let mut v = serde_json::to_value(&e).unwrap_or_default();
            v["sourceIdentities"] = json!(source_ids);
            v["destinationIdentities"] = json!(dest_ids);
            v["mtls"] = json!(mtls);
            v
        })
        .collect();
    Ok(Json(
        json!({"windowSeconds": window.as_secs(), "edges": rows}),
    ))
}

#[derive(Debug, Deserialize)]
pub struct TapQuery {
    workload: Option<String>,
    namespace: Option<String>,
    path: Option<String>,
    max: Option<u32>,
}

/// Streams tap events as JSON lines until the client goes away, or its
/// credential is revoked or expires (checked at every heartbeat). The
/// guard checked the tap role before this runs.
pub async fn tap(
    State(state): State<AppState>,
    Extension(who): Extension<Principal>,
    Query(q): Query<TapQuery>,
) -> Result<Response, ApiError> {
    let prefix = q.path.unwrap_or_default();
    if !prefix.is_empty() && !prefix.starts_with('/') {
        return Err(ApiError::BadRequest(format!(
            "path {prefix:?}: a path prefix starts with /"
        )));
    }
    let nonempty = |s: Option<String>| s.filter(|s| !s.is_empty());
    let session = state
        .observers()
        .taps
        .open(
            nonempty(q.workload).as_deref(),
            nonempty(q.namespace).as_deref(),
            &prefix,
            q.max.unwrap_or(0),
        )
        .map_err(|e| match e {
            crate::tap::TapError::NoProxy(_) => ApiError::NotFound(e.to_string()),
            crate::tap::TapError::TooMany => ApiError::BadRequest(e.to_string()),
        })?;
    tracing::info!(tap = %session.id, by = %who.id, "tap opened for a credential");
    let hello = json!({"tap": session.id, "proxies": session.proxies}).to_string() + "\n";
    let stream = futures::stream::unfold(
        (Some(Bytes::from(hello)), session, state, who),
        |(first, mut session, state, who)| async move {
            if let Some(b) = first {
                return Some((Ok::<_, Infallible>(b), (None, session, state, who)));
            }
            tokio::select! {
                ev = session.events.recv() => {
                    let ev = ev?;
                    let line = serde_json::to_string(&ev).unwrap_or_default() + "\n";
                    Some((Ok(Bytes::from(line)), (None, session, state, who)))
                }
                _ = tokio::time::sleep(TAP_HEARTBEAT) => {
                    if let Err(e) = state.auth().still_valid(&who).await {
                        tracing::info!(tap = %session.id, token = %who.id, reason = e.reason(), "tap ended: its credential is no longer valid");
                        return None;
                    }
                    Some((Ok(Bytes::from_static(b"\n")), (None, session, state, who)))
                }
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(stream),
    )
        .into_response())
}
