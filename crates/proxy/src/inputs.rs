//! What both traffic directions share: config, discovery, metrics and the
//! HTTP clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;

use crate::config::ProxyConfig;
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::telemetry::Telemetry;
use crate::workers::{PerWorker, WorkerSet};
use crate::Body;

/// Idle HTTP/1.1 connections to the app kept per worker; one given back
/// past this many is closed.
const APP_IDLE_H1: usize = 256;

pub struct Inputs {
    pub cfg: ProxyConfig,
    pub discovery: Arc<Discovery>,
    pub metrics: Arc<Metrics>,
    /// Spans, access logs and tap, beside the metrics.
    pub telemetry: Arc<Telemetry>,
    /// Idle connections to the local app over HTTP/1.1, per worker, so a
    /// request's connection to the app is served on its own thread.
    pub app_http1: Arc<crate::h1pool::Idle>,
    /// To the local app over HTTP/2 (h2c prior knowledge), for HTTP/2
    /// callers; one connection per worker.
    pub app_http2: PerWorker<Client<AppConnector, Body>>,
    /// To addresses outside the mesh (never to this proxy's own listeners).
    pub egress: PerWorker<Client<crate::loops::EgressConnector, Body>>,
    /// The data path's worker threads (none: it runs on the proxy's runtime).
    pub workers: WorkerSet,
    /// This proxy's listeners, which no request may be sent to.
    pub own: Arc<crate::loops::Own>,
    pub app_addr: SocketAddr,
    /// `namespace/workload`, for the source header every outbound mesh
    /// request carries; made once.
    pub source_header: Option<http::HeaderValue>,
}

impl Inputs {
    pub fn new(
        cfg: ProxyConfig,
        discovery: Arc<Discovery>,
        metrics: Arc<Metrics>,
        telemetry: Arc<Telemetry>,
        workers: WorkerSet,
    ) -> Arc<Inputs> {
        let app_addr: SocketAddr = ([127, 0, 0, 1], cfg.app_port).into();
        let connector = AppConnector(app_addr);
        let slots = crate::workers::slots(workers.len());
        let app_http1 = Arc::new(crate::h1pool::Idle::new(slots, APP_IDLE_H1));
        // One connection carries every HTTP/2 caller's streams to the app:
        // fixed, large windows (see `server::SHARED_CONN_WINDOW`).
        let app_http2 = PerWorker::new(slots, |_| {
            Client::builder(TokioExecutor::new())
                .http2_only(true)
                .http2_initial_stream_window_size(crate::server::SHARED_STREAM_WINDOW)
                .http2_initial_connection_window_size(crate::server::SHARED_CONN_WINDOW)
                .http2_max_header_list_size(crate::server::MAX_RESPONSE_HEADERS)
                .timer(TokioTimer::new())
                .pool_timer(TokioTimer::new())
                .build(connector.clone())
        });
        let own = Arc::new(crate::loops::Own::new(&cfg));
        let egress = PerWorker::new(slots, |_| {
            Client::builder(TokioExecutor::new())
                .pool_timer(TokioTimer::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(crate::loops::EgressConnector {
                    own: own.clone(),
                    timeout: cfg.limits.connect_timeout,
                })
        });
        let source_header =
            http::HeaderValue::try_from(format!("{}/{}", cfg.namespace, cfg.workload)).ok();
        Arc::new(Inputs {
            source_header,
            cfg,
            discovery,
            metrics,
            telemetry,
            app_http1,
            app_http2,
            egress,
            workers,
            own,
            app_addr,
        })
    }
}

/// Connects to the local app whatever the request's authority says, so the
/// app sees the `Host` its caller used.
#[derive(Clone)]
pub struct AppConnector(pub SocketAddr);

impl tower::Service<http::Uri> for AppConnector {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let addr = self.0;
        Box::pin(async move {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            Ok(TokioIo::new(tcp))
        })
    }
}
