//! Span export as OTLP: to the control plane's embedded receiver (over the
//! proxy API stream), or to a collector over OTLP/HTTP (protobuf) or
//! OTLP/gRPC.
//!
//! The request path only `try_send`s a finished span into a bounded queue;
//! one task batches the queue and exports. A dead or slow collector makes
//! the queue fill, and further spans are dropped and counted: it never
//! slows a request nor grows the proxy.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;
use trellis_api::v1::{proxy_message, TraceBatch};

use crate::telemetry::{Export, Settings};
use crate::trace::SpanContext;

/// Spans waiting for export; past this they are dropped.
pub const QUEUE: usize = 2048;
/// Spans per export request.
/// Why a batch of spans was not exported (it is dropped and counted).
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("the control plane stream is busy or away")]
    Uplink,
    #[error("bad OTLP endpoint {url}: {reason}")]
    Endpoint { url: String, reason: String },
    #[error("{url} answered {reason}")]
    Refused { url: String, reason: String },
    #[error("{url}: {reason}")]
    Failed { url: String, reason: String },
    #[error("{url}: timed out")]
    TimedOut { url: String },
}

const MAX_BATCH: usize = 512;
/// How long a span may wait for its batch to fill.
const FLUSH_INTERVAL: Duration = Duration::from_millis(500);
/// Bounds one export, so a black-holed collector holds the task this long
/// at most (the queue drops meanwhile).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Server,
    Client,
}

pub enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, as the request path hands it over.
pub struct FinishedSpan {
    pub ctx: SpanContext,
    pub name: String,
    pub kind: Kind,
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, Attr)>,
    pub error: bool,
}

#[derive(Clone, Default)]
pub struct Counters {
    pub exported: Counter,
    pub dropped: Counter,
}

pub struct Exporter {
    tx: mpsc::Sender<FinishedSpan>,
    counters: Counters,
}

impl Exporter {
    /// Starts the export task; it ends when the exporter is dropped.
    pub fn start(
        settings: Arc<ArcSwap<Settings>>,
        resource: Vec<(&'static str, String)>,
        uplink: mpsc::Sender<proxy_message::Msg>,
        counters: Counters,
    ) -> Exporter {
        let (tx, rx) = mpsc::channel(QUEUE);
        let resource = Resource {
            attributes: resource
                .into_iter()
                .map(|(k, v)| kv(k, Attr::Str(v)))
                .collect(),
            ..Default::default()
        };
        tokio::spawn(run(rx, settings, resource, uplink, counters.clone()));
        Exporter { tx, counters }
    }

    /// Queues a span, or drops and counts it when the queue is full.
    pub fn submit(&self, span: FinishedSpan) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.inc();
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<FinishedSpan>,
    settings: Arc<ArcSwap<Settings>>,
    resource: Resource,
    uplink: mpsc::Sender<proxy_message::Msg>,
    counters: Counters,
) {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(EXPORT_TIMEOUT));
    http.set_nodelay(true);
    let http: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let mut grpc: Option<(String, TraceServiceClient<tonic::transport::Channel>)> = None;
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut last_error_logged: Option<tokio::time::Instant> = None;
    loop {
        let Some(first) = rx.recv().await else { return };
        batch.push(first);
        let flush = tokio::time::sleep(FLUSH_INTERVAL);
        tokio::pin!(flush);
        while batch.len() < MAX_BATCH {
            tokio::select! {
                s = rx.recv() => match s {
                    Some(s) => batch.push(s),
                    None => break,
                },
                _ = &mut flush => break,
            }
        }
        let n = batch.len() as u64;
        let request = encode(&resource, batch.drain(..));
        let export = settings.load().export.clone();
        let result = match &export {
            Export::ControlPlane => uplink
                .try_send(proxy_message::Msg::Traces(TraceBatch {
                    otlp: request.encode_to_vec(),
                }))
                .map_err(|_| ExportError::Uplink),
            Export::Http(url) => post(&http, url, request.encode_to_vec()).await,
            Export::Grpc(url) => export_grpc(&mut grpc, url, request).await,
        };
        match result {
            Ok(()) => {
                counters.exported.inc_by(n);
            }
            Err(e) => {
                counters.dropped.inc_by(n);
                // Say so at most once a minute: a dead collector is not news
                // every half second.
                let now = tokio::time::Instant::now();
                if last_error_logged.is_none_or(|t| now - t > Duration::from_secs(60)) {
                    last_error_logged = Some(now);
                    tracing::warn!(spans = n, error = %e, "span export failed; dropping spans");
                }
            }
        }
    }
}

/// Exports over OTLP/gRPC, keeping the client for the next batch.
async fn export_grpc(
    cached: &mut Option<(String, TraceServiceClient<tonic::transport::Channel>)>,
    url: &str,
    request: ExportTraceServiceRequest,
) -> Result<(), ExportError> {
    let mut client = match cached.take() {
        Some((u, c)) if u == url => c,
        _ => grpc_client(url)?,
    };
    let result = match tokio::time::timeout(EXPORT_TIMEOUT, client.export(request)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(status)) => Err(ExportError::Refused {
            url: url.to_string(),
            reason: status.message().to_string(),
        }),
        Err(_) => Err(ExportError::TimedOut {
            url: url.to_string(),
        }),
    };
    *cached = Some((url.to_string(), client));
    result
}

fn grpc_client(url: &str) -> Result<TraceServiceClient<tonic::transport::Channel>, ExportError> {
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| ExportError::Endpoint {
            url: url.to_string(),
            reason: e.to_string(),
        })?
        .connect_timeout(EXPORT_TIMEOUT)
        .timeout(EXPORT_TIMEOUT)
        .connect_lazy();
    Ok(TraceServiceClient::new(channel))
}

async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: Vec<u8>,
) -> Result<(), ExportError> {
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/x-protobuf")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| ExportError::Endpoint {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let url = url.to_string();
    match tokio::time::timeout(EXPORT_TIMEOUT, client.request(req)).await {
        Ok(Ok(resp)) if resp.status().is_success() => Ok(()),
        Ok(Ok(resp)) => Err(ExportError::Refused {
            url,
            reason: resp.status().to_string(),
        }),
        Ok(Err(e)) => Err(ExportError::Failed {
            url,
            reason: e.to_string(),
        }),
        Err(_) => Err(ExportError::TimedOut { url }),
    }
}

fn kv(key: &str, value: Attr) -> KeyValue {
    let value = match value {
        Attr::Str(s) => any_value::Value::StringValue(s),
        Attr::Int(i) => any_value::Value::IntValue(i),
        Attr::Bool(b) => any_value::Value::BoolValue(b),
    };
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

/// One export request holding `spans` under this proxy's resource.
pub fn encode(
    resource: &Resource,
    spans: impl Iterator<Item = FinishedSpan>,
) -> ExportTraceServiceRequest {
    let spans = spans
        .map(|s| Span {
            trace_id: s.ctx.trace_id.to_vec(),
            span_id: s.ctx.span_id.to_vec(),
            trace_state: s.ctx.tracestate.clone().unwrap_or_default(),
            parent_span_id: s.ctx.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            flags: u32::from(s.ctx.sampled),
            name: s.name,
            kind: match s.kind {
                Kind::Server => span::SpanKind::Server as i32,
                Kind::Client => span::SpanKind::Client as i32,
            },
            start_time_unix_nano: s.start_unix_nanos,
            end_time_unix_nano: s.end_unix_nanos,
            attributes: s.attributes.into_iter().map(|(k, v)| kv(k, v)).collect(),
            status: Some(Status {
                code: if s.error {
                    status::StatusCode::Error as i32
                } else {
                    status::StatusCode::Unset as i32
                },
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource.clone()),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "trellis-proxy".into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                    ..Default::default()
                }),
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
