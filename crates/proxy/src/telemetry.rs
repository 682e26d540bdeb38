//! What the proxy tells about each request besides forwarding it: metrics,
//! a span, an access log line and tap events, all from one pair of calls on
//! the request path (`begin` when a request arrives, `end` when its
//! response headers are ready).
//!
//! Everything past the metrics leaves the request path through a bounded
//! queue that drops and counts when full, so telemetry never blocks or
//! grows a proxy. Settings come from the Mesh resource (`configure`, on
//! every config) and are read lock-free.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderMap, Request, Response, Version};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc;
use trellis_api::v1::{proxy_message, TapEvent};
use trellis_resource::{MeshSpec, OtlpProtocol, TracingSpec};

use crate::accesslog::{self, AccessLog, Destination, Entry};
use crate::metrics::{Direction, Metrics, PeerNames};
use crate::otlp::{self, Attr, Exporter, FinishedSpan, Kind};
use crate::tap::Taps;
use crate::trace::{self, SpanContext};
use crate::Body;

/// Messages waiting for the control plane stream (span batches, tap
/// events); past this they are dropped and counted by their producer.
const UPLINK_QUEUE: usize = 64;
/// Longest path, authority or identity kept in logs, spans and tap events.
pub const MAX_VALUE: usize = 1024;

/// Where spans go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Export {
    /// The control plane's embedded receiver, over the proxy API stream.
    ControlPlane,
    /// OTLP/HTTP protobuf: the full URL, `.../v1/traces`.
    Http(String),
    /// OTLP/gRPC.
    Grpc(String),
}

/// The telemetry part of the Mesh, as this proxy applies it.
#[derive(Clone, Debug)]
pub struct Settings {
    pub sampling: f64,
    pub export: Export,
    pub access_log: Option<Destination>,
    pub trust_domain: String,
}

impl Settings {
    pub fn from_mesh(mesh: &MeshSpec, workload: &str, instance: &str) -> Settings {
        let tracing = mesh.tracing.clone().unwrap_or(TracingSpec {
            sampling: TracingSpec::DEFAULT_SAMPLING,
            ..Default::default()
        });
        let export = match tracing.otlp_endpoint.as_deref().map(str::trim) {
            None | Some("") => Export::ControlPlane,
            Some(url) => {
                let uri: Option<http::Uri> = url.parse().ok();
                let path = uri.as_ref().map(|u| u.path()).unwrap_or("");
                let port = uri.as_ref().and_then(|u| u.port_u16());
                let http = match tracing.otlp_protocol {
                    Some(OtlpProtocol::HttpProtobuf) => true,
                    Some(OtlpProtocol::Grpc) => false,
                    None => path.ends_with("/v1/traces") || port == Some(4318),
                };
                if http {
                    let url = url.trim_end_matches('/');
                    Export::Http(if url.ends_with("/v1/traces") {
                        url.to_string()
                    } else {
                        format!("{url}/v1/traces")
                    })
                } else {
                    Export::Grpc(url.to_string())
                }
            }
        };
        let access_log = mesh.access_log.as_ref().and_then(|a| match &a.path {
            _ if a.stdout => Some(Destination::Stdout),
            Some(p) => Some(Destination::File(PathBuf::from(
                p.replace("{workload}", workload)
                    .replace("{instance}", instance),
            ))),
            None => None,
        });
        Settings {
            sampling: tracing.sampling.clamp(0.0, 1.0),
            export,
            access_log,
            trust_domain: mesh.trust_domain.clone(),
        }
    }
}

/// Counters of what telemetry dropped or sent, on the proxy's `/metrics`.
#[derive(Clone, Default)]
pub struct Counters {
    pub spans: otlp::Counters,
    pub access_log_dropped: Counter,
    pub tap_dropped: Counter,
}

impl Counters {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "trellis_proxy_spans_exported",
            "Spans exported",
            self.spans.exported.clone(),
        );
        r.register(
            "trellis_proxy_spans_dropped",
            "Spans dropped: the export queue was full or the collector failed",
            self.spans.dropped.clone(),
        );
        r.register(
            "trellis_proxy_access_log_dropped",
            "Access log lines dropped because the writer fell behind",
            self.access_log_dropped.clone(),
        );
        r.register(
            "trellis_proxy_tap_events_dropped",
            "Tap events dropped because the control plane fell behind",
            self.tap_dropped.clone(),
        );
    }
}

/// Who this proxy is, for spans and logs.
#[derive(Clone, Debug)]
pub struct Own {
    pub namespace: String,
    pub workload: String,
    pub service_account: String,
    pub instance: String,
    /// `service.name` of its spans: the `app` label, else the workload.
    pub service: String,
}

pub struct Telemetry {
    settings: Arc<ArcSwap<Settings>>,
    metrics: Arc<Metrics>,
    exporter: Exporter,
    access_log: AccessLog,
    pub taps: Arc<Taps>,
    uplink: tokio::sync::Mutex<mpsc::Receiver<proxy_message::Msg>>,
    own: Own,
}

/// A request as it arrived, kept until its response. Holds cheap clones
/// (the method, the URI and the Host header share the request's bytes);
/// strings are made only for what is sampled, tapped or logged.
pub struct Begun {
    pub ctx: SpanContext,
    started: Instant,
    wall: SystemTime,
    direction: Direction,
    method: http::Method,
    uri: http::Uri,
    host: Option<http::HeaderValue>,
    protocol: &'static str,
    bytes_received: u64,
}

impl Begun {
    fn authority(&self) -> String {
        let a = self
            .uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| self.host.as_ref()?.to_str().ok())
            .unwrap_or("");
        bounded(a)
    }

    fn path(&self) -> String {
        bounded(self.uri.path())
    }
}

impl Begun {
    pub fn started(&self) -> Instant {
        self.started
    }
}

/// What is known once a response is ready.
pub struct Done<'a> {
    pub peers: PeerNames<'a>,
    pub route: &'a str,
    pub tls: bool,
    /// The peer's identity: the caller's (inbound) or the endpoint's
    /// (outbound); empty when unknown.
    pub peer_identity: &'a str,
}

/// Marks why a response is not the upstream's own answer (Envoy-style
/// response flags, e.g. `UO` for a circuit breaker); put it in the
/// response's extensions. Without one, flags follow from `x-trellis-error`.
#[derive(Clone, Debug)]
pub struct ResponseFlags(pub String);

impl Telemetry {
    pub fn new(own: Own, mesh: &MeshSpec, metrics: Arc<Metrics>) -> Arc<Telemetry> {
        let settings = Arc::new(ArcSwap::from_pointee(Settings::from_mesh(
            mesh,
            &own.workload,
            &own.instance,
        )));
        let (uplink_tx, uplink_rx) = mpsc::channel(UPLINK_QUEUE);
        let counters = metrics.telemetry.clone();
        let exporter = Exporter::start(
            settings.clone(),
            vec![
                ("service.name", own.service.clone()),
                ("service.namespace", own.namespace.clone()),
                ("service.instance.id", own.instance.clone()),
                ("k8s.namespace.name", own.namespace.clone()),
                ("trellis.workload", own.workload.clone()),
            ],
            uplink_tx.clone(),
            counters.spans.clone(),
        );
        let access_log = AccessLog::start(settings.clone(), counters.access_log_dropped.clone());
        let taps = Taps::start_task(uplink_tx, counters.tap_dropped.clone());
        Arc::new(Telemetry {
            settings,
            metrics,
            exporter,
            access_log,
            taps,
            uplink: tokio::sync::Mutex::new(uplink_rx),
            own,
        })
    }

    /// Applies the Mesh of a new config.
    pub fn configure(&self, mesh: &MeshSpec) {
        let new = Settings::from_mesh(mesh, &self.own.workload, &self.own.instance);
        let old = self.settings.load();
        if old.sampling != new.sampling
            || old.export != new.export
            || old.access_log != new.access_log
            || old.trust_domain != new.trust_domain
        {
            tracing::info!(sampling = new.sampling, export = ?new.export, access_log = ?new.access_log, "telemetry settings");
            self.settings.store(Arc::new(new));
        }
    }

    /// The messages for the control plane stream, held by the one session
    /// that is connected.
    pub async fn uplink(&self) -> tokio::sync::MutexGuard<'_, mpsc::Receiver<proxy_message::Msg>> {
        self.uplink.lock().await
    }

    fn own_identity(&self) -> String {
        format!(
            "spiffe://{}/ns/{}/sa/{}",
            self.settings.load().trust_domain,
            self.own.namespace,
            self.own.service_account
        )
    }

    /// Starts this hop's span from the caller's trace context and puts the
    /// span's own context on the request, for the next hop.
    pub fn begin<B>(&self, direction: Direction, req: &mut Request<B>) -> Begun {
        let started = Instant::now();
        let sampling = self.settings.load().sampling;
        let parent = trace::extract(req.headers());
        let ctx = SpanContext::new(parent, || {
            sampling > 0.0 && rand::random::<f64>() < sampling
        });
        ctx.inject(req.headers_mut());
        let host = match req.uri().authority() {
            Some(_) => None,
            None => req.headers().get(http::header::HOST).cloned(),
        };
        Begun {
            started,
            wall: SystemTime::now(),
            direction,
            method: req.method().clone(),
            uri: req.uri().clone(),
            host,
            protocol: protocol(req.version(), req.headers()),
            bytes_received: content_length(req.headers()),
            ctx,
        }
    }

    /// Records a finished request: metrics, span, tap event and access log
    /// line (written when the response body ends). Past the metrics, every
    /// part is skipped (and allocates nothing) unless it is wanted.
    pub fn end(&self, b: Begun, done: Done<'_>, resp: &mut Response<Body>) {
        // An answer to HEAD has no content (RFC 9110 §9.3.2): one the
        // proxy made itself is emptied here, before the access log wraps
        // it, so that it ends with its headers and is logged complete.
        if b.method == http::Method::HEAD && !http_body::Body::is_end_stream(resp.body()) {
            *resp.body_mut() = crate::http::empty();
        }
        let elapsed = b.started.elapsed();
        let status = resp.status().as_u16();
        self.metrics
            .record_request(done.peers, done.route, status, done.tls, elapsed);
        let settings = self.settings.load();
        let tapped = self.taps.active();
        if !b.ctx.sampled && !tapped && settings.access_log.is_none() {
            return;
        }
        let p = done.peers;
        let own = self.own_identity();
        let peer = bounded(done.peer_identity);
        let (source_identity, destination_identity) = match b.direction {
            Direction::inbound => (peer, own),
            Direction::outbound => (own, peer),
        };
        let direction = b.direction.as_str();
        let flags = response_flags(resp);
        let (method, authority, path) = (b.method.as_str(), b.authority(), b.path());
        if b.ctx.sampled {
            let start = unix_nanos(b.wall);
            let mut attributes = vec![
                ("http.request.method", Attr::Str(method.to_string())),
                ("url.path", Attr::Str(path.clone())),
                ("server.address", Attr::Str(authority.clone())),
                ("http.response.status_code", Attr::Int(i64::from(status))),
                ("trellis.direction", Attr::Str(direction.into())),
                ("trellis.route", Attr::Str(done.route.to_string())),
                (
                    "trellis.source.namespace",
                    Attr::Str(p.source_namespace.to_string()),
                ),
                (
                    "trellis.source.workload",
                    Attr::Str(p.source_workload.to_string()),
                ),
                (
                    "trellis.source.identity",
                    Attr::Str(source_identity.clone()),
                ),
                (
                    "trellis.destination.namespace",
                    Attr::Str(p.destination_namespace.to_string()),
                ),
                (
                    "trellis.destination.service",
                    Attr::Str(p.destination_service.to_string()),
                ),
                (
                    "trellis.destination.workload",
                    Attr::Str(p.destination_workload.to_string()),
                ),
                (
                    "trellis.destination.identity",
                    Attr::Str(destination_identity.clone()),
                ),
                ("trellis.tls", Attr::Bool(done.tls)),
            ];
            if flags != "-" {
                attributes.push(("trellis.response_flags", Attr::Str(flags.clone())));
            }
            let service = if p.destination_service.is_empty() {
                authority.as_str()
            } else {
                p.destination_service
            };
            self.exporter.submit(FinishedSpan {
                ctx: b.ctx.clone(),
                name: format!("{method} {service}"),
                kind: match b.direction {
                    Direction::inbound => Kind::Server,
                    Direction::outbound => Kind::Client,
                },
                start_unix_nanos: start,
                end_unix_nanos: start + elapsed.as_nanos() as u64,
                attributes,
                error: status == 0 || status >= 500,
            });
        }
        if tapped {
            self.taps.offer(&path, || TapEvent {
                timestamp_unix_nanos: unix_nanos(b.wall) as i64,
                direction: direction.into(),
                method: method.to_string(),
                authority: authority.clone(),
                path: path.clone(),
                status: u32::from(status),
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                source_identity: source_identity.clone(),
                destination_identity: destination_identity.clone(),
                destination_service: format!(
                    "{}/{}",
                    p.destination_namespace, p.destination_service
                ),
                route: done.route.to_string(),
                tls: done.tls,
                trace_id: b.ctx.trace_id_hex(),
            });
        }
        if settings.access_log.is_some() {
            let entry = Entry {
                time: accesslog::rfc3339(b.wall),
                trace_id: b.ctx.trace_id_hex(),
                span_id: b.ctx.span_id_hex(),
                direction,
                source_identity,
                source_namespace: p.source_namespace.to_string(),
                source_workload: p.source_workload.to_string(),
                destination_identity,
                destination_namespace: p.destination_namespace.to_string(),
                destination_service: p.destination_service.to_string(),
                destination_workload: p.destination_workload.to_string(),
                method: method.to_string(),
                authority,
                path,
                protocol: b.protocol,
                route: done.route.to_string(),
                status,
                duration_ms: 0.0,
                bytes_received: b.bytes_received,
                bytes_sent: 0,
                response_flags: flags,
                tls: done.tls,
            };
            let body = std::mem::replace(resp.body_mut(), crate::http::empty());
            *resp.body_mut() = self.access_log.wrap(body, entry, b.started);
        }
    }
}

fn response_flags(resp: &Response<Body>) -> String {
    if let Some(f) = resp.extensions().get::<ResponseFlags>() {
        return f.0.clone();
    }
    let Some(source) = resp.headers().get("x-trellis-error") else {
        return "-".into();
    };
    let status = resp.status().as_u16();
    match (source.as_bytes(), status) {
        (_, 504) => "UT",
        (b"upstream", 503) => "UH",
        (b"upstream", _) => "UF",
        (b"downstream", 503) | (b"internal", 503) => "NR",
        (b"downstream", _) => "DPE",
        _ => "-",
    }
    .into()
}

fn protocol(v: Version, headers: &HeaderMap) -> &'static str {
    if headers.contains_key(crate::http::ORIG_PROTO) {
        return "HTTP/1.1";
    }
    match v {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

fn content_length(h: &HeaderMap) -> u64 {
    h.get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Cuts a value to `MAX_VALUE` bytes, on a character boundary.
pub fn bounded(s: &str) -> String {
    if s.len() <= MAX_VALUE {
        return s.to_string();
    }
    let mut end = MAX_VALUE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resource::AccessLogSpec;

    #[test]
    fn settings_follow_the_mesh() {
        let s = Settings::from_mesh(&MeshSpec::default(), "w", "w-1");
        assert_eq!(s.export, Export::ControlPlane);
        assert_eq!(s.sampling, TracingSpec::DEFAULT_SAMPLING);
        assert_eq!(s.access_log, None);
        let mut mesh = MeshSpec {
            tracing: Some(TracingSpec {
                sampling: 1.0,
                otlp_endpoint: Some("http://127.0.0.1:4318".into()),
                otlp_protocol: None,
            }),
            access_log: Some(AccessLogSpec {
                path: Some("/tmp/{workload}/{instance}.log".into()),
                stdout: false,
            }),
            ..Default::default()
        };
        let s = Settings::from_mesh(&mesh, "w", "w-1");
        assert_eq!(
            s.export,
            Export::Http("http://127.0.0.1:4318/v1/traces".into())
        );
        assert_eq!(
            s.access_log,
            Some(Destination::File("/tmp/w/w-1.log".into()))
        );
        mesh.tracing.as_mut().unwrap().otlp_endpoint = Some("http://collector:4317".into());
        let s = Settings::from_mesh(&mesh, "w", "w-1");
        assert_eq!(s.export, Export::Grpc("http://collector:4317".into()));
    }

    #[test]
    fn long_values_are_cut_on_char_boundaries() {
        let s = "é".repeat(MAX_VALUE);
        let b = bounded(&s);
        assert!(b.len() <= MAX_VALUE && b.chars().all(|c| c == 'é'));
    }
}
