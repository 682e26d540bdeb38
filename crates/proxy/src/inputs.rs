//! What both traffic directions share: config, discovery, metrics and the
//! HTTP clients.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;

use crate::config::ProxyConfig;
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::peer_h2::H2;
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
    pub app_http2: PerWorker<AppH2>,
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
        let slots = crate::workers::slots(workers.len());
        let app_http1 = Arc::new(crate::h1pool::Idle::new(slots, APP_IDLE_H1));
        let app_http2 = PerWorker::new(slots, |_| AppH2::new(app_addr));
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

/// This worker's HTTP/2 connection to the local app (h2c, prior
/// knowledge), made on first use and again once it has closed. It is
/// driven by `peer_h2::H2`, as the connections to peers are, rather than
/// by hyper's client: hyper waits for a new stream's flow-control window
/// before it sends the body, which `h2` grants only once the stream has
/// been opened, so a unary call's body went out in a second write (and a
/// task of its own) after its head, and the app woke twice per call.
/// The request's authority is kept, so the app sees the `Host` its caller
/// used.
pub struct AppH2 {
    addr: SocketAddr,
    conn: ArcSwapOption<H2>,
    /// Held while connecting, so that concurrent first requests share one
    /// connection.
    connecting: tokio::sync::Mutex<()>,
}

impl AppH2 {
    pub fn new(addr: SocketAddr) -> AppH2 {
        AppH2 {
            addr,
            conn: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The connection, when it is open.
    pub fn ready(&self) -> Option<H2> {
        let guard = self.conn.load();
        guard
            .as_ref()
            .filter(|c| !c.is_closed())
            .map(|c| H2::clone(c))
    }

    /// The open connection (another request's, made meanwhile), or a new
    /// one.
    pub async fn connect(&self) -> Result<H2, String> {
        if let Some(c) = self.ready() {
            return Ok(c);
        }
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.ready() {
            return Ok(c);
        }
        let settings = crate::peer_h2::Settings {
            // Fixed, large windows (see `server::SHARED_CONN_WINDOW`): this
            // connection carries every HTTP/2 caller's streams.
            stream_window: crate::server::SHARED_STREAM_WINDOW,
            conn_window: crate::server::SHARED_CONN_WINDOW,
            max_header_list: crate::server::MAX_RESPONSE_HEADERS,
            // No pings: the app is on this host, and a gRPC server counts
            // pings on an idle connection against its caller.
            keep_alive: None,
        };
        let connect = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| e.to_string())?;
            let _ = tcp.set_nodelay(true);
            H2::handshake(tcp, &settings, self.addr.to_string())
                .await
                .map_err(|e| format!("HTTP/2 handshake: {e}"))
        };
        let c = tokio::time::timeout(crate::limits::connect_timeout(), connect)
            .await
            .map_err(|_| "connect timed out".to_string())??;
        self.conn.store(Some(Arc::new(c.clone())));
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use hyper_util::rt::TokioIo;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::net::TcpListener;
    use tokio::sync::watch;

    /// An h2c app that answers "ok", counts the connections it accepted,
    /// and closes them all when `close` changes.
    async fn app(accepted: Arc<AtomicUsize>, close: watch::Receiver<u32>) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                // Only a change after this connection came closes it.
                let mut close = close.clone();
                close.borrow_and_update();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(crate::http::full(
                            "ok",
                        )))
                    });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc);
                    tokio::select! {
                        _ = conn => {}
                        _ = close.changed() => {}
                    }
                });
            }
        });
        addr
    }

    async fn get(app: &AppH2, addr: SocketAddr) -> bool {
        let mut c = match app.ready() {
            Some(c) => c,
            None => app.connect().await.unwrap(),
        };
        let req = http::Request::get(format!("http://{addr}/"))
            .body(crate::http::empty())
            .unwrap();
        match c.send(req).await {
            Ok(r) => r.into_body().collect().await.unwrap().to_bytes() == "ok",
            Err(_) => false,
        }
    }

    #[tokio::test]
    async fn the_apps_connection_is_shared_and_made_again_once_it_closed() {
        let accepted = Arc::new(AtomicUsize::new(0));
        let (close, closed) = watch::channel(0);
        let addr = app(accepted.clone(), closed).await;
        let conn = AppH2::new(addr);
        // Concurrent first requests share one connection.
        let (a, b, c) = tokio::join!(get(&conn, addr), get(&conn, addr), get(&conn, addr));
        assert!(a && b && c);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // The app closes it (a restart): it is no longer offered, and the
        // next request gets a new one.
        close.send(1).unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while conn.ready().is_some() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(
            conn.ready().is_none(),
            "a closed connection is still offered"
        );
        assert!(get(&conn, addr).await);
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_app_that_is_not_listening_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let Err(err) = AppH2::new(addr).connect().await else {
            panic!("connected to a closed port");
        };
        assert!(err.contains("refused"), "{err}");
    }
}
