//! One endpoint of a service: a peer proxy's inbound listener, its load
//! figures and the HTTP/2 connections this proxy keeps to it, one per
//! worker (see `workers`); and the warm-up that opens them ahead of the
//! first request.
//!
//! Endpoints outlive config versions: a new config reuses the `Endpoint` of
//! an address it still lists, so load figures and connections carry over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, Semaphore};

use crate::balance::{Load, Peers};
use crate::error::ProxyError;
use crate::h1pool::{Idle, H1};
use crate::inputs::Inputs;
use crate::peer_h2::H2;
use crate::tls::Credentials;
use crate::traffic::now_nanos;
use crate::workers::PerWorker;

/// The default of `--connect-timeout` (see `limits`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How often a peer connection is pinged, and how long its answer may
/// take before the connection is closed.
const PEER_KEEP_ALIVE: Duration = Duration::from_secs(10);
/// Connections the warm-up opens at once.
const WARM_UP_AT_ONCE: usize = 4;
/// The wait before warming up an endpoint again after a failure, doubling
/// with each failure in a row up to `WARM_UP_MAX_BACKOFF`.
const WARM_UP_BACKOFF: Duration = Duration::from_secs(1);
const WARM_UP_MAX_BACKOFF: Duration = Duration::from_secs(60);

/// How many HTTP/2 connection slots each endpoint has: one per worker and
/// one for every other thread (`workers::slots`) of the proxy in this
/// process with the most workers (see `use_slots`).
static SLOTS: AtomicUsize = AtomicUsize::new(1);

/// Makes endpoints made from now on have room for a proxy with
/// `slots` of them (`workers::slots(workers)`). A proxy calls it before it
/// makes any endpoint. Several proxies in one process (tests, embedding)
/// share the largest: each worker `i` uses slot `i` and every other thread
/// the last, which every one of them may.
pub fn use_slots(slots: usize) {
    SLOTS.fetch_max(slots, Ordering::AcqRel);
}

/// One open HTTP/2 connection to the peer, and whether it is mutual TLS.
type Conn = ArcSwapOption<(H2, bool)>;

/// Idle HTTP/1.1 connections kept per endpoint and worker; one given back
/// past this many is closed.
const IDLE_H1: usize = 64;

/// A connection to a peer proxy for one request: the worker's HTTP/2
/// connection, or an HTTP/1.1 one of its own.
pub enum PeerConn {
    H2(H2),
    H1(H1),
}

pub struct Endpoint {
    pub addr: SocketAddr,
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub identity: String,
    pub labels: BTreeMap<String, String>,
    pub load: Arc<Load>,
    /// Outlier ejection and active health-check state.
    pub health: crate::traffic::EndpointHealth,
    /// The HTTP/2 connection each worker shares among its requests. Its
    /// task runs on the worker that opened it, as the requests that use
    /// it do.
    h2: PerWorker<Conn>,
    /// Each worker's idle HTTP/1.1 connections (`--peer-http1`). Only the
    /// worker itself takes and gives back (threads that are no worker
    /// share the last slot): the lock is never contended on the data path.
    pub idle_h1: Arc<Idle>,
    // Serialises connection set-up so a burst opens one connection per
    // worker, not many.
    connecting: tokio::sync::Mutex<()>,
    /// Attempts to open the HTTP/2 connection that failed, so far.
    connect_failures: AtomicU64,
    warm_up: WarmUp,
}

/// When the warm-up may next open this endpoint's connection.
#[derive(Default)]
struct WarmUp {
    /// `now_nanos` from which it may; 0: at once; `u64::MAX`: under way.
    due: AtomicU64,
    /// Failures in a row, for the backoff.
    failures: AtomicU32,
}

impl Endpoint {
    /// An endpoint compared with the others that share `peers` (those of
    /// one service).
    pub fn new(addr: SocketAddr, ep: &trellis_api::v1::Endpoint, peers: &Arc<Peers>) -> Self {
        Endpoint {
            addr,
            instance: ep.instance.clone(),
            workload: ep.workload.clone(),
            namespace: ep.namespace.clone(),
            identity: ep.identity.clone(),
            labels: ep.labels.clone().into_iter().collect(),
            load: Arc::new(Load::new(peers.clone())),
            health: Default::default(),
            h2: PerWorker::new(SLOTS.load(Ordering::Acquire), |_| ArcSwapOption::empty()),
            idle_h1: Arc::new(Idle::new(SLOTS.load(Ordering::Acquire), IDLE_H1)),
            connecting: tokio::sync::Mutex::new(()),
            connect_failures: AtomicU64::new(0),
            warm_up: WarmUp::default(),
        }
    }

    /// Whether the peer describes the same endpoint (so it can be reused).
    pub fn same_as(&self, ep: &trellis_api::v1::Endpoint) -> bool {
        self.instance == ep.instance && self.identity == ep.identity && self.workload == ep.workload
    }

    /// Opens a connection to the peer: mutual TLS with `alpn` when `creds`
    /// are given (the peer must prove exactly this endpoint's identity),
    /// else plaintext.
    pub async fn open(
        &self,
        creds: Option<&Credentials>,
        alpn: &[u8],
    ) -> Result<Box<dyn Io>, ProxyError> {
        let tcp = connect(self.addr).await?;
        let Some(creds) = creds else {
            return Ok(Box::new(tcp));
        };
        if self.identity.is_empty() {
            return Err(ProxyError::upstream_connect(
                self.addr,
                "the endpoint has no identity to verify",
            ));
        }
        let tls = tokio::time::timeout(
            crate::limits::connect_timeout(),
            creds.connect(self.addr, &self.identity, alpn, tcp),
        )
        .await
        .map_err(|_| ProxyError::upstream_connect(self.addr, "TLS handshake timed out"))?
        .map_err(|e| {
            ProxyError::upstream_connect(
                self.addr,
                format!("mutual TLS with {} failed: {e}", self.identity),
            )
        })?;
        Ok(Box::new(tls))
    }

    /// This thread's HTTP/2 connection, when it is open (and mutual TLS iff
    /// `tls`).
    fn ready_h2(&self, tls: bool) -> Option<H2> {
        ready(self.h2.get(), tls)
    }

    /// A ready HTTP/2 connection to the peer, made on first use (or by the
    /// warm-up) and shared by every request to this endpoint on this
    /// worker.
    pub async fn h2(&self, creds: Option<&Credentials>) -> Result<H2, ProxyError> {
        let tls = creds.is_some();
        if let Some(c) = self.ready_h2(tls) {
            return Ok(c);
        }
        let failures = self.connect_failures.load(Ordering::Acquire);
        let _guard = self.connecting.lock().await;
        if let Some(c) = self.ready_h2(tls) {
            return Ok(c);
        }
        if self.connect_failures.load(Ordering::Acquire) != failures {
            // The attempt this request waited for (another request's or
            // the warm-up's) failed: fail now, so the request moves to
            // another endpoint instead of waiting for a second attempt.
            return Err(ProxyError::upstream_connect(
                self.addr,
                "connecting to the endpoint failed just now",
            ));
        }
        // Boxed: opening a connection is rare and its future is large;
        // held inline it would grow the state of every request's future.
        let conn = Box::pin(self.connect_h2(creds)).await;
        if conn.is_err() {
            self.connect_failures.fetch_add(1, Ordering::Release);
        }
        conn
    }

    async fn connect_h2(&self, creds: Option<&Credentials>) -> Result<H2, ProxyError> {
        let tls = creds.is_some();
        let io = self.open(creds, trellis_identity::ALPN_H2).await?;
        let settings = crate::peer_h2::Settings {
            // Fixed, large windows, not adaptive ones (see
            // `server::SHARED_CONN_WINDOW`): this connection carries every
            // call to the peer.
            stream_window: crate::server::SHARED_STREAM_WINDOW,
            conn_window: crate::server::SHARED_CONN_WINDOW,
            max_header_list: crate::server::MAX_RESPONSE_HEADERS,
            keep_alive: Some(PEER_KEEP_ALIVE),
        };
        let tx = H2::handshake(io, &settings, self.addr.to_string())
            .await
            .map_err(|e| ProxyError::upstream_connect(self.addr, e))?;
        self.h2.get().store(Some(Arc::new((tx.clone(), tls))));
        Ok(tx)
    }

    /// The connection a request goes over: with `http1`, an HTTP/1.1
    /// connection of this worker's (see `h1`), else its HTTP/2 one.
    pub async fn conn(
        &self,
        creds: Option<&Credentials>,
        http1: bool,
    ) -> Result<PeerConn, ProxyError> {
        if http1 {
            self.h1(creds).await.map(PeerConn::H1)
        } else {
            self.h2(creds).await.map(PeerConn::H2)
        }
    }

    /// An HTTP/1.1 connection for one request: an idle one of this
    /// worker's that is ready, else a new one. `h1pool::send` puts it
    /// back in `idle_h1` once its response has ended.
    pub async fn h1(&self, creds: Option<&Credentials>) -> Result<H1, ProxyError> {
        let tls = creds.is_some();
        if let Some(c) = self.idle_h1.take(tls) {
            return Ok(c);
        }
        // Boxed, as in `h2`.
        Box::pin(self.connect_h1(creds)).await
    }

    /// A new HTTP/1.1 connection (TLS sessions resume: see `tls::peer`).
    pub async fn connect_h1(&self, creds: Option<&Credentials>) -> Result<H1, ProxyError> {
        let io = self.open(creds, trellis_identity::ALPN_HTTP1).await?;
        crate::h1pool::handshake(TokioIo::new(io), self.addr, creds.is_some())
            .await
            .map_err(|e| ProxyError::upstream_connect(self.addr, e))
    }

    /// Whether every worker's connection (with no workers: this thread's)
    /// is open.
    fn warm(&self, tls: bool, workers: usize) -> bool {
        if workers == 0 {
            return self.ready_h2(tls).is_some();
        }
        self.h2
            .iter()
            .take(workers)
            .all(|c| ready(c, tls).is_some())
    }
}

fn ready(conn: &Conn, tls: bool) -> Option<H2> {
    conn.load()
        .as_deref()
        .filter(|c| !c.0.is_closed() && c.1 == tls)
        .map(|c| c.0.clone())
}

/// Opens the connection to every endpoint of the snapshot's services
/// ahead of their first request, when an endpoint appears and again when
/// a new config comes with the connection closed: a request then never
/// waits for a TCP and TLS handshake, and its latency is the endpoint's.
/// At most `WARM_UP_AT_ONCE` at a time; an endpoint whose warm-up failed
/// is tried again after a backoff (1 s doubling to 60 s). Requests never
/// wait for the warm-up: one that needs a connection being opened shares
/// the attempt (or its failure, then moves to another endpoint).
///
/// (Named `open_ahead`, not `warm_up…`: LLVM BOLT 19, which `scripts/pgo
/// --bolt` runs, reads `.warm` and `.cold` in a symbol as a split-off part
/// of another function and stops; generic types make `endpoint..warm_up`.)
pub async fn open_ahead(inputs: Arc<Inputs>, mut shutdown: watch::Receiver<bool>) {
    let mut configs = inputs.discovery.watch_applied();
    let at_once = Arc::new(Semaphore::new(WARM_UP_AT_ONCE));
    // Told when a warm-up failed, so its retry gets scheduled.
    let failed = Arc::new(Notify::new());
    loop {
        let next = match crate::outbound::peer_credentials(&inputs) {
            Ok(creds) => open_due_connections(&inputs, &creds, &at_once, &failed).await,
            Err(_) => Some(now_nanos() + WARM_UP_BACKOFF.as_nanos() as u64),
        };
        let wait = next.map(|at| Duration::from_nanos(at.saturating_sub(now_nanos())));
        tokio::select! {
            changed = configs.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(wait.unwrap_or(Duration::MAX)), if wait.is_some() => {}
            _ = failed.notified() => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Starts the warm-ups that are due; the earliest time one is due later.
async fn open_due_connections(
    inputs: &Inputs,
    creds: &Option<Arc<Credentials>>,
    at_once: &Arc<Semaphore>,
    failed: &Arc<Notify>,
) -> Option<u64> {
    // Held across awaits: a full Arc, not an arc-swap guard.
    let snap = arc_swap::Guard::into_inner(inputs.discovery.snapshot());
    let mut next: Option<u64> = None;
    // Opaque TCP opens a connection per client connection and never uses
    // the shared HTTP/2 one: a Service that declares only TCP ports gets
    // none.
    let http = |s: &&Arc<crate::snapshot::ServiceState>| {
        s.spec.ports.is_empty()
            || s.spec
                .ports
                .iter()
                .any(|p| p.protocol != Some(trellis_resource::Protocol::Tcp))
    };
    for ep in snap
        .services
        .values()
        .filter(http)
        .flat_map(|s| &s.endpoints)
    {
        let workers = inputs.workers.len();
        if ep.warm(creds.is_some(), workers) {
            continue;
        }
        let now = now_nanos();
        let due = ep.warm_up.due.load(Ordering::Acquire);
        if due > now {
            if due != u64::MAX {
                next = Some(next.map_or(due, |n| n.min(due)));
            }
            continue;
        }
        if ep
            .warm_up
            .due
            .compare_exchange(due, u64::MAX, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            continue;
        }
        let Ok(permit) = at_once.clone().acquire_owned().await else {
            return None;
        };
        let (ep, creds, failed) = (ep.clone(), creds.clone(), failed.clone());
        let on = inputs.workers.clone();
        tokio::spawn(async move {
            // Each worker opens its own, so that its task runs there.
            let mut result = Ok(());
            for i in 0..workers.max(1) {
                let (ep, creds) = (ep.clone(), creds.clone());
                let opened = on
                    .run_on(i, async move { ep.h2(creds.as_deref()).await.map(drop) })
                    .await;
                if let Some(Err(e)) = opened {
                    result = Err(e);
                    break;
                }
            }
            drop(permit);
            let w = &ep.warm_up;
            match result {
                Ok(_) => {
                    w.failures.store(0, Ordering::Relaxed);
                    w.due.store(0, Ordering::Release);
                }
                Err(e) => {
                    let failures = w.failures.fetch_add(1, Ordering::Relaxed);
                    let backoff = WARM_UP_BACKOFF
                        .saturating_mul(1 << failures.min(16))
                        .min(WARM_UP_MAX_BACKOFF);
                    tracing::debug!(endpoint = %ep.addr, error = %e, ?backoff, "warm-up failed");
                    w.due
                        .store(now_nanos() + backoff.as_nanos() as u64, Ordering::Release);
                    failed.notify_one();
                }
            }
        });
    }
    next
}

/// A connection to a peer, plaintext or TLS.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Opens a TCP connection with a bounded wait and Nagle off.
pub async fn connect(addr: SocketAddr) -> Result<TcpStream, ProxyError> {
    // Marked in pods mode, so the redirect rules let it pass.
    let tcp = tokio::time::timeout(
        crate::limits::connect_timeout(),
        crate::transparent::connect_marked(addr),
    )
    .await
    .map_err(|_| ProxyError::upstream_connect(addr, "connect timed out"))?
    .map_err(|e| ProxyError::upstream_connect(addr, e))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use hyper_util::rt::TokioExecutor;

    /// A plaintext HTTP/2 server answering 200; counts the connections it
    /// accepted.
    async fn h2_server() -> (SocketAddr, Arc<AtomicU64>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(
                            TokioIo::new(tcp),
                            hyper::service::service_fn(|_| async {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    crate::http::empty(),
                                ))
                            }),
                        ),
                );
            }
        });
        (addr, accepted)
    }

    /// A GET over the calling thread's connection to `ep`.
    async fn get(ep: Arc<Endpoint>) -> http::StatusCode {
        let mut conn = ep.h2(None).await.unwrap();
        let req = http::Request::get("http://peer/")
            .body(crate::http::empty())
            .unwrap();
        conn.send(req).await.unwrap().status()
    }

    #[tokio::test]
    async fn each_worker_opens_and_reuses_its_own_connection_to_a_peer() {
        use crate::workers::{self, Workers};
        use_slots(workers::slots(2));
        let workers = Workers::start(2).unwrap();
        let set = workers.set();
        let (addr, accepted) = h2_server().await;
        let ep = endpoint(&addr.to_string());
        // Two rounds of a request from each worker: each opens one
        // connection, then reuses it.
        for _ in 0..2 {
            for i in 0..2 {
                let status = set.run_on(i, get(ep.clone())).await;
                assert_eq!(status, Some(http::StatusCode::OK));
            }
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert!(ep.warm(false, 2), "both workers' connections are open");
        // This thread is no worker: it has a slot of its own.
        assert!(ep.ready_h2(false).is_none());
        assert_eq!(get(ep.clone()).await, http::StatusCode::OK);
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    pub fn endpoint(addr: &str) -> Arc<Endpoint> {
        endpoint_among(addr, &Arc::default())
    }

    /// An endpoint of the service whose endpoints share `peers`.
    pub fn endpoint_among(addr: &str, peers: &Arc<Peers>) -> Arc<Endpoint> {
        Arc::new(Endpoint::new(
            addr.parse().unwrap(),
            &trellis_api::v1::Endpoint {
                address: addr.into(),
                instance: addr.into(),
                workload: "w".into(),
                namespace: "default".into(),
                ..Default::default()
            },
            peers,
        ))
    }
}
