//! The embedded trace receiver: keeps the last `MAX_TRACES` traces that
//! proxies (over their stream) or anyone else (OTLP/gRPC on the proxy API
//! port, OTLP/HTTP protobuf at `POST /v1/traces`) sent, for `trellis trace`
//! and the dashboard when no Jaeger runs.
//!
//! Everything is bounded: traces, spans per trace, attributes per span and
//! the length of every string kept.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::TraceService;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::auth::{Auth, AuthError, Role};
use serde_json::Value;

/// Traces kept; the oldest go first.
pub const MAX_TRACES: usize = 2000;
const MAX_SPANS_PER_TRACE: usize = 500;
const MAX_ATTRIBUTES: usize = 64;
const MAX_STRING: usize = 512;

/// One span as kept and shown.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpanView {
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent_span_id: String,
    pub name: String,
    pub kind: &'static str,
    /// `service.name` of the sender's resource.
    pub service: String,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub duration_ms: f64,
    pub error: bool,
    pub attributes: BTreeMap<String, Value>,
}

/// A trace in a list.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TraceSummary {
    pub trace_id: String,
    /// The service and name of the earliest span whose parent is not here.
    pub root_service: String,
    pub root_name: String,
    pub start_unix_nanos: u64,
    pub duration_ms: f64,
    pub spans: usize,
    pub services: Vec<String>,
    pub errors: usize,
}

#[derive(Default)]
struct Inner {
    traces: HashMap<String, Vec<SpanView>>,
    /// Trace ids, oldest first.
    order: VecDeque<String>,
}

#[derive(Default)]
pub struct Traces {
    inner: Mutex<Inner>,
    pub spans_received: Counter,
    pub spans_dropped: Counter,
}

impl Traces {
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps the spans of an OTLP export request; malformed spans (ids of
    /// the wrong length) are dropped and counted.
    pub fn ingest(&self, req: ExportTraceServiceRequest) {
        let mut accepted = Vec::new();
        let mut dropped = 0u64;
        for rs in req.resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
                .and_then(|kv| kv.value.as_ref())
                .map(any_to_string)
                .unwrap_or_else(|| "unknown".into());
            for ss in rs.scope_spans {
                for s in ss.spans {
                    if s.trace_id.len() != 16 || s.span_id.len() != 8 {
                        dropped += 1;
                        continue;
                    }
                    let parent = if s.parent_span_id.len() == 8 {
                        hex(&s.parent_span_id)
                    } else {
                        String::new()
                    };
                    let kind = match SpanKind::try_from(s.kind).unwrap_or(SpanKind::Unspecified) {
                        SpanKind::Server => "server",
                        SpanKind::Client => "client",
                        SpanKind::Producer => "producer",
                        SpanKind::Consumer => "consumer",
                        SpanKind::Internal => "internal",
                        SpanKind::Unspecified => "unspecified",
                    };
                    let error = s
                        .status
                        .as_ref()
                        .is_some_and(|st| st.code == StatusCode::Error as i32);
                    let attributes = s
                        .attributes
                        .iter()
                        .take(MAX_ATTRIBUTES)
                        .map(|kv| (cut(&kv.key), kv_value(kv)))
                        .collect();
                    let end = s.end_time_unix_nano.max(s.start_time_unix_nano);
                    accepted.push(SpanView {
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: parent,
                        name: cut(&s.name),
                        kind,
                        service: cut(&service),
                        start_unix_nanos: s.start_time_unix_nano,
                        end_unix_nanos: end,
                        duration_ms: (end - s.start_time_unix_nano) as f64 / 1e6,
                        error,
                        attributes,
                    });
                }
            }
        }
        self.spans_received.inc_by(accepted.len() as u64);
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for span in accepted {
            let id = span.trace_id.clone();
            let spans = match inner.traces.get_mut(&id) {
                Some(spans) => spans,
                None => {
                    inner.order.push_back(id.clone());
                    inner.traces.entry(id).or_default()
                }
            };
            // A retried export may send a span twice.
            if spans.len() >= MAX_SPANS_PER_TRACE || spans.iter().any(|s| s.span_id == span.span_id)
            {
                dropped += 1;
                continue;
            }
            spans.push(span);
        }
        while inner.order.len() > MAX_TRACES {
            if let Some(old) = inner.order.pop_front() {
                inner.traces.remove(&old);
            }
        }
        drop(inner);
        self.spans_dropped.inc_by(dropped);
    }

    /// The newest traces first; only those with a span of `service` when
    /// given.
    pub fn list(&self, service: Option<&str>, limit: usize) -> Vec<TraceSummary> {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<TraceSummary> = inner
            .traces
            .iter()
            .filter(|(_, spans)| service.is_none_or(|svc| spans.iter().any(|s| s.service == svc)))
            .map(|(id, spans)| summary(id, spans))
            .collect();
        drop(inner);
        out.sort_by_key(|t| std::cmp::Reverse(t.start_unix_nanos));
        out.truncate(limit);
        out
    }

    /// A trace's spans, earliest first.
    pub fn get(&self, trace_id: &str) -> Option<Vec<SpanView>> {
        let id = trace_id.trim().to_ascii_lowercase();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut spans = inner.traces.get(&id)?.clone();
        drop(inner);
        spans.sort_by_key(|s| (s.start_unix_nanos, s.end_unix_nanos));
        Some(spans)
    }
}

fn summary(id: &str, spans: &[SpanView]) -> TraceSummary {
    let ids: std::collections::HashSet<&str> = spans.iter().map(|s| s.span_id.as_str()).collect();
    let root = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty() || !ids.contains(s.parent_span_id.as_str()))
        .min_by_key(|s| s.start_unix_nanos)
        .or_else(|| spans.iter().min_by_key(|s| s.start_unix_nanos));
    let start = spans.iter().map(|s| s.start_unix_nanos).min().unwrap_or(0);
    let end = spans
        .iter()
        .map(|s| s.end_unix_nanos)
        .max()
        .unwrap_or(start);
    let mut services: Vec<String> = spans.iter().map(|s| s.service.clone()).collect();
    services.sort();
    services.dedup();
    TraceSummary {
        trace_id: id.to_string(),
        root_service: root.map(|r| r.service.clone()).unwrap_or_default(),
        root_name: root.map(|r| r.name.clone()).unwrap_or_default(),
        start_unix_nanos: start,
        duration_ms: (end - start) as f64 / 1e6,
        spans: spans.len(),
        services,
        errors: spans.iter().filter(|s| s.error).count(),
    }
}

fn kv_value(kv: &KeyValue) -> Value {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::IntValue(i)) => Value::from(*i),
        Some(any_value::Value::BoolValue(b)) => Value::from(*b),
        Some(any_value::Value::DoubleValue(d)) => Value::from(*d),
        Some(_) => Value::from(kv.value.as_ref().map(any_to_string).unwrap_or_default()),
        None => Value::Null,
    }
}

fn any_to_string(v: &AnyValue) -> String {
    let s = match &v.value {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BytesValue(b)) => hex(b),
        Some(_) => "(complex)".to_string(),
        None => String::new(),
    };
    cut(&s)
}

fn cut(s: &str) -> String {
    if s.len() <= MAX_STRING {
        return s.to_string();
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// OTLP/gRPC `TraceService`, served beside the proxy API. Spans sent here
/// need the same credential as `POST /v1/traces`: an admin API token as
/// `authorization: Bearer TOKEN` metadata (the proxies' own spans travel on
/// their authenticated config stream instead).
pub struct Receiver {
    traces: std::sync::Arc<Traces>,
    auth: std::sync::Arc<Auth>,
}

impl Receiver {
    pub fn new(traces: std::sync::Arc<Traces>, auth: std::sync::Arc<Auth>) -> Receiver {
        Receiver { traces, auth }
    }

    async fn admit(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), AuthError> {
        let header = metadata.get("authorization").and_then(|v| v.to_str().ok());
        let who = self.auth.verify(header).await?;
        if who.role < Role::Admin {
            return Err(AuthError::Forbidden {
                id: who.id,
                has: who.role,
                needed: Role::Admin,
            });
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        if let Err(e) = self.admit(request.metadata()).await {
            self.auth.failed(&e);
            return Err(match e {
                AuthError::Forbidden { .. } => tonic::Status::permission_denied(e.to_string()),
                AuthError::Store(_) | AuthError::Corrupt(_) => {
                    tonic::Status::unavailable(e.to_string())
                }
                _ => tonic::Status::unauthenticated(e.to_string()),
            });
        }
        self.traces.ingest(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};

    fn span(trace: u8, id: u8, parent: Option<u8>, start: u64) -> Span {
        Span {
            trace_id: vec![trace; 16],
            span_id: vec![id; 8],
            parent_span_id: parent.map(|p| vec![p; 8]).unwrap_or_default(),
            name: format!("GET s{id}"),
            start_time_unix_nano: start,
            end_time_unix_nano: start + 1_000_000,
            ..Default::default()
        }
    }

    fn request(service: &str, spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![KeyValue {
                        key: "service.name".into(),
                        value: Some(AnyValue {
                            value: Some(any_value::Value::StringValue(service.into())),
                        }),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                scope_spans: vec![ScopeSpans {
                    spans,
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn keeps_traces_and_finds_roots() {
        let t = Traces::new();
        t.ingest(request(
            "frontend",
            vec![span(1, 1, Some(9), 10), span(1, 2, Some(1), 20)],
        ));
        t.ingest(request(
            "catalog",
            vec![span(1, 3, Some(2), 30), span(2, 4, None, 5)],
        ));
        // Malformed and duplicate spans are dropped.
        let mut bad = span(3, 5, None, 1);
        bad.trace_id = vec![1; 3];
        t.ingest(request("x", vec![bad, span(1, 3, Some(2), 30)]));
        assert_eq!(t.spans_dropped.get(), 2);
        let list = t.list(None, 10);
        assert_eq!(list.len(), 2);
        let one = list.iter().find(|s| s.trace_id == hex(&[1; 16])).unwrap();
        assert_eq!(one.spans, 3);
        assert_eq!(one.root_service, "frontend");
        assert_eq!(one.root_name, "GET s1");
        assert_eq!(one.services, ["catalog", "frontend"]);
        assert_eq!(t.list(Some("catalog"), 10).len(), 2);
        assert_eq!(t.list(Some("frontend"), 10).len(), 1);
        let spans = t.get(&hex(&[1; 16]).to_uppercase()).unwrap();
        assert_eq!(spans[2].parent_span_id, spans[1].span_id);
        assert!(t.get("nope").is_none());
    }

    #[test]
    fn forgets_the_oldest_traces() {
        let t = Traces::new();
        for i in 0..(MAX_TRACES + 10) {
            let mut s = span(0, 1, None, i as u64);
            s.trace_id = (i as u128 + 1).to_be_bytes().to_vec();
            t.ingest(request("a", vec![s]));
        }
        assert_eq!(t.list(None, usize::MAX).len(), MAX_TRACES);
        assert!(t.get(&hex(&1u128.to_be_bytes())).is_none());
    }
}
