//! The proxy's TCP listeners: binding each one once at start-up (a taken
//! port is a start-up error naming the flag to change), and the one accept
//! loop that every listener runs, with its limits.
//!
//! - Each listener holds at most `--max-connections` connections at once:
//!   one more is closed at once (a reset) and counted in
//!   `trellis_connections_shed_total{reason="cap"}`.
//! - When accepting fails for want of file descriptors the connection
//!   stays queued, so the next accept fails at once. The loop then sheds
//!   what is queued: it frees the one descriptor it keeps in reserve,
//!   accepts and resets each queued connection into it, and takes the
//!   reserve back (`trellis_connections_shed_total{reason="descriptors"}`),
//!   so a client learns at once instead of waiting in the queue. Then it
//!   backs off, 5 ms doubling to 1 s, instead of spinning; it logs at most
//!   once every 10 s per listener and counts every error in
//!   `trellis_accept_errors_total`. Connections already accepted run in
//!   their own tasks and are served on meanwhile.
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// The first wait after a failed accept; it doubles up to `BACKOFF_MAX`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While accepting keeps failing, one log line per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
const BACKLOG: u32 = 1024;
/// Queued connections shed in one go when descriptors run out; the
/// backoff's next round takes the rest.
const SHED_PER_ROUND: usize = 4096;

/// The descriptor kept free for shedding (`/dev/null`, opened at the first
/// bind): with every other one in use, it is what lets the loop accept a
/// queued connection only to reset it. One for the whole process.
static RESERVE: Mutex<Option<std::fs::File>> = Mutex::new(None);

/// Every accept holds this shared while it takes a connection off a queue;
/// shedding holds it alone. With several accept loops on one listener (the
/// proxy's workers), the descriptor that shedding frees would otherwise
/// be taken by another loop's accept, and the reserve could not be opened
/// again: the loops would stop shedding for good. The guard is held only
/// for the `accept` system call, never across an await, and accepts share
/// it: it is never contended but while shedding.
static ACCEPTING: RwLock<()> = RwLock::new(());

fn keep_reserve() {
    let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
    if reserve.is_none() {
        *reserve = std::fs::File::open("/dev/null").ok();
    }
}

/// Which listener: the `listener` label of the accept metrics, and what a
/// bind error names.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Kind {
    inbound,
    outbound,
    /// An `--upstream` listener.
    upstream,
    admin,
    dns,
}

impl Kind {
    /// The flag that sets this listener's address.
    fn flag(self) -> &'static str {
        match self {
            Kind::inbound => "--inbound-addr",
            Kind::outbound => "--outbound-addr",
            Kind::upstream => "--upstream",
            Kind::admin => "--admin-addr",
            Kind::dns => "--dns-addr",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::inbound => "inbound",
            Kind::outbound => "outbound",
            Kind::upstream => "upstream",
            Kind::admin => "admin",
            Kind::dns => "DNS",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{kind} port {addr} is taken: is another proxy running? choose another with {}", kind.flag())]
    Taken { kind: Kind, addr: SocketAddr },
    #[error("cannot bind the {kind} listener on {addr}: {reason}")]
    Other {
        kind: Kind,
        addr: SocketAddr,
        reason: io::Error,
    },
}

/// Binds a listener. The socket bound here is the one served: a port
/// chosen with port 0 cannot be taken by anyone else in between.
pub async fn bind(addr: SocketAddr, kind: Kind) -> Result<TcpListener, BindError> {
    let other = |reason| BindError::Other { kind, addr, reason };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(other)?;
    keep_reserve();
    socket.set_reuseaddr(true).map_err(other)?;
    socket.set_nodelay(true).map_err(other)?;
    socket.bind(addr).map_err(|e| {
        if e.kind() == io::ErrorKind::AddrInUse {
            BindError::Taken { kind, addr }
        } else {
            other(e)
        }
    })?;
    socket.listen(BACKLOG).map_err(other)
}

/// What the accept loop takes connections from: a `TcpListener`, or in
/// tests a listener that fails on demand.
pub trait Accept: Send + 'static {
    type Conn: Send + 'static;
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Conn, SocketAddr)>> + Send;

    /// Out of descriptors: resets the connections waiting in the queue;
    /// returns how many.
    fn shed_queued(&mut self) -> usize {
        0
    }

    /// Closes a connection the listener may not take, at once.
    fn refuse(conn: Self::Conn) {
        drop(conn);
    }

    /// The count of connections served by this loop's worker, if the
    /// listener places connections on workers (`workers::Balanced`): it has
    /// counted each connection it returns there, and the connection's
    /// `Counted` takes it off when it ends.
    fn worker_load(&self) -> Option<Gauge> {
        None
    }
}

impl Accept for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = std::future::poll_fn(|cx| {
            let _accepting = ACCEPTING.read().unwrap_or_else(|e| e.into_inner());
            self.poll_accept(cx)
        })
        .await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
    }

    fn shed_queued(&mut self) -> usize {
        // No other loop accepts until the reserve is back (see `ACCEPTING`).
        let _alone = ACCEPTING.write().unwrap_or_else(|e| e.into_inner());
        let mut reserve = RESERVE.lock().unwrap_or_else(|e| e.into_inner());
        // Freeing the reserve gives the next accept a descriptor; each
        // connection reset returns it for the next.
        if reserve.take().is_none() {
            *reserve = std::fs::File::open("/dev/null").ok();
            return 0;
        }
        let mut cx = Context::from_waker(futures::task::noop_waker_ref());
        let mut shed = 0;
        while shed < SHED_PER_ROUND {
            match self.poll_accept(&mut cx) {
                Poll::Ready(Ok((tcp, _))) => {
                    Self::refuse(tcp);
                    shed += 1;
                }
                _ => break,
            }
        }
        *reserve = std::fs::File::open("/dev/null").ok();
        shed
    }

    fn refuse(tcp: TcpStream) {
        // A reset: the client learns at once, and no TIME_WAIT is left here.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        drop(tcp);
    }
}

/// Why an accept failed: the `reason` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reason {
    /// EMFILE or ENFILE: the process or the system is out of file
    /// descriptors.
    descriptors,
    /// ENOBUFS or ENOMEM: the kernel is short of memory for sockets.
    memory,
    /// That one connection failed before it was accepted (aborted or
    /// reset by the peer); the next one may be fine.
    connection,
    other,
}

impl Reason {
    pub fn of(e: &io::Error) -> Reason {
        match e.raw_os_error() {
            Some(libc::EMFILE | libc::ENFILE) => return Reason::descriptors,
            Some(libc::ENOBUFS | libc::ENOMEM) => return Reason::memory,
            _ => {}
        }
        match e.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused => Reason::connection,
            _ => Reason::other,
        }
    }

    /// What an operator can do about it.
    fn advice(self) -> &'static str {
        match self {
            Reason::descriptors => {
                "out of file descriptors: raise the limit (ulimit -n, systemd LimitNOFILE=) or lower the load"
            }
            Reason::memory => "the kernel is short of socket memory: lower the load",
            Reason::connection | Reason::other => "check the proxy's host",
        }
    }
}

/// Why a connection was shed as it came: the `reason` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Shed {
    /// The listener holds `--max-connections` already.
    cap,
    /// The process is out of file descriptors.
    descriptors,
}

/// Why a served connection was closed by a limit: the `reason` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Closed {
    /// A request's header (or a new connection's first request) did not
    /// arrive within `--header-read-timeout`.
    header_timeout,
    /// No request for `--http1-idle-timeout` / `--http2-idle-timeout`.
    idle,
    /// More than half of the last `--http2-reset-flood-streams` streams
    /// were reset by the client early.
    reset_flood,
    /// Permissive inbound plaintext that said nothing within the
    /// detection timeout, for an app whose Service declares no tcp port.
    detect_timeout,
    /// Opaque TCP that carried nothing for `--tcp-idle-timeout`.
    tcp_idle,
}

/// Who is to blame for an answer the proxy made itself (its
/// `x-trellis-error` header): the `source` label.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Blame {
    downstream,
    upstream,
    internal,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Kind,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabels {
    pub listener: Kind,
    pub worker: usize,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShedLabels {
    pub listener: Kind,
    pub reason: Shed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClosedLabels {
    pub listener: Kind,
    pub reason: Closed,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub listener: Kind,
    pub source: Blame,
    pub status_code: u16,
}

/// What the listeners count: connections open, shed and closed by a limit,
/// failed accepts, and the proxy's own error answers by whom they blame.
#[derive(Clone, Debug, Default)]
pub struct ConnMetrics {
    pub accept_errors: AcceptErrors,
    open: Family<ListenerLabels, Gauge>,
    per_worker: Family<WorkerLabels, Gauge>,
    shed: Family<ShedLabels, Counter>,
    closed: Family<ClosedLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
}

impl ConnMetrics {
    pub fn register(&self, registry: &mut Registry) {
        self.accept_errors.register(registry);
        registry.register(
            "trellis_connections_open",
            "Connections each listener holds now",
            self.open.clone(),
        );
        registry.register(
            "trellis_worker_connections_open",
            "Connections each listener holds now, by the worker thread that serves them",
            self.per_worker.clone(),
        );
        registry.register(
            "trellis_connections_shed",
            "Connections closed as they came (cap: --max-connections reached; descriptors: out of file descriptors)",
            self.shed.clone(),
        );
        registry.register(
            "trellis_connections_closed_by_limit",
            "Connections closed by a timeout or limit (header_timeout, idle, reset_flood, detect_timeout, tcp_idle)",
            self.closed.clone(),
        );
        registry.register(
            "trellis_proxy_errors",
            "Answers the proxy made itself for an error, by whom they blame (downstream: the client; upstream: the peer or app; internal)",
            self.errors.clone(),
        );
    }

    pub fn open(&self, listener: Kind) -> i64 {
        self.open.get_or_create(&ListenerLabels { listener }).get()
    }

    /// The count of `listener`'s connections that `worker` serves.
    pub fn worker_open(&self, listener: Kind, worker: usize) -> Gauge {
        self.per_worker
            .get_or_create(&WorkerLabels { listener, worker })
            .clone()
    }

    pub fn shed(&self, listener: Kind, reason: Shed) -> u64 {
        self.shed
            .get_or_create(&ShedLabels { listener, reason })
            .get()
    }

    pub fn closed_by_limit(&self, listener: Kind, reason: Closed) {
        self.closed
            .get_or_create(&ClosedLabels { listener, reason })
            .inc();
    }

    pub fn proxy_error(&self, listener: Kind, source: Blame, status_code: u16) {
        self.errors
            .get_or_create(&ErrorLabels {
                listener,
                source,
                status_code,
            })
            .inc();
    }
}

/// An accepted connection, counted as open on its listener until dropped
/// (wherever it ends up: an upgraded or tunnelled connection too).
pub struct Counted<C> {
    conn: C,
    open: Gauge,
    /// Its worker's count, if the listener places connections on workers.
    on_worker: Option<Gauge>,
}

impl<C> Counted<C> {
    pub fn get_ref(&self) -> &C {
        &self.conn
    }
}

impl<C> Drop for Counted<C> {
    fn drop(&mut self) {
        self.open.dec();
        if let Some(w) = &self.on_worker {
            w.dec();
        }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Counted<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Counted<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.conn).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.conn).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.conn.is_write_vectored()
    }
}

/// What one listener's loop is told: which listener, its cap and where to
/// count.
#[derive(Clone, Debug)]
pub struct Listening {
    pub kind: Kind,
    /// `--max-connections`.
    pub cap: usize,
    pub metrics: ConnMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AcceptErrorLabels {
    pub listener: Kind,
    pub reason: Reason,
}

/// `trellis_accept_errors_total{listener, reason}`.
#[derive(Clone, Debug, Default)]
pub struct AcceptErrors(Family<AcceptErrorLabels, Counter>);

impl AcceptErrors {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "trellis_accept_errors",
            "Failed accepts of incoming connections, by listener and reason (descriptors: the file-descriptor limit is reached)",
            self.0.clone(),
        );
    }

    pub fn get(&self, listener: Kind, reason: Reason) -> u64 {
        self.0
            .get_or_create(&AcceptErrorLabels { listener, reason })
            .get()
    }

    fn inc(&self, listener: Kind, reason: Reason) {
        self.0
            .get_or_create(&AcceptErrorLabels { listener, reason })
            .inc();
    }
}

/// One listener's run of failed accepts: the next wait, and the log
/// lines it is owed.
struct Failing {
    kind: Kind,
    next_wait: Duration,
    /// Errors since accepting last worked.
    errors: u64,
    /// Errors not logged since the last line.
    unlogged: u64,
    /// Queued connections shed since the last line.
    shed: u64,
    last_logged: Option<Instant>,
}

impl Failing {
    fn new(kind: Kind) -> Failing {
        Failing {
            kind,
            next_wait: BACKOFF_MIN,
            errors: 0,
            unlogged: 0,
            shed: 0,
            last_logged: None,
        }
    }

    /// Records a failed accept; returns how long to wait before the next.
    fn failed(&mut self, e: &io::Error, reason: Reason) -> Duration {
        self.errors += 1;
        if reason == Reason::connection {
            // The failed connection left the queue: nothing to wait for.
            tracing::debug!(listener = %self.kind, error = %e, "a connection failed before it was accepted");
            return Duration::ZERO;
        }
        let wait = self.next_wait;
        self.next_wait = (wait * 2).min(BACKOFF_MAX);
        let now = Instant::now();
        if self
            .last_logged
            .is_some_and(|t| now.duration_since(t) < LOG_EVERY)
        {
            self.unlogged += 1;
            return wait;
        }
        tracing::warn!(
            listener = %self.kind,
            error = %e,
            retry_in = ?wait,
            errors_not_logged = self.unlogged,
            connections_shed = self.shed,
            "the {} listener cannot accept connections: {}; connections already accepted are served on, new ones are reset",
            self.kind,
            reason.advice(),
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
        self.shed = 0;
        wait
    }

    /// Accepting works (again): the next failure starts the backoff over.
    fn accepted(&mut self) {
        if self.errors == 0 {
            return;
        }
        if self.last_logged.is_some() {
            tracing::info!(listener = %self.kind, errors = self.errors, "the {} listener accepts connections again", self.kind);
        }
        *self = Failing::new(self.kind);
    }
}

/// Accepts connections until shutdown and hands each to `on_conn`, which
/// must not block (it spawns the connection's task). Past the cap, and
/// out of descriptors, connections are shed (see the module's doc).
pub async fn serve<L, F>(
    mut listener: L,
    how: Listening,
    mut shutdown: watch::Receiver<bool>,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(Counted<L::Conn>, SocketAddr),
{
    let Listening { kind, cap, metrics } = how;
    let open = metrics
        .open
        .get_or_create(&ListenerLabels { listener: kind })
        .clone();
    let shed = |reason| {
        metrics
            .shed
            .get_or_create(&ShedLabels {
                listener: kind,
                reason,
            })
            .clone()
    };
    let (shed_cap, shed_descriptors) = (shed(Shed::cap), shed(Shed::descriptors));
    let cap = i64::try_from(cap).unwrap_or(i64::MAX);
    let on_worker = listener.worker_load();
    let mut failing = Failing::new(kind);
    let mut last_cap_log: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                failing.accepted();
                if open.get() >= cap {
                    L::refuse(conn);
                    if let Some(w) = &on_worker {
                        w.dec();
                    }
                    shed_cap.inc();
                    if last_cap_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
                        tracing::warn!(listener = %kind, cap, "the {kind} listener holds its cap of {cap} connections: new ones are closed until some end; raise --max-connections if this is normal load");
                        last_cap_log = Some(Instant::now());
                    }
                    continue;
                }
                open.inc();
                on_conn(
                    Counted {
                        conn,
                        open: open.clone(),
                        on_worker: on_worker.clone(),
                    },
                    peer,
                );
            }
            Err(e) => {
                let reason = Reason::of(&e);
                metrics.accept_errors.inc(kind, reason);
                if reason == Reason::descriptors {
                    let n = listener.shed_queued();
                    shed_descriptors.inc_by(n as u64);
                    failing.shed += n as u64;
                }
                let wait = failing.failed(&e, reason);
                if wait.is_zero() {
                    continue;
                }
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use tokio::sync::mpsc;

    use super::*;

    /// A listener that fails with EMFILE while `exhausted` is set (at once,
    /// as the kernel does while the connection stays queued), and else
    /// hands out the connections sent to it.
    struct Exhaustible {
        exhausted: Arc<AtomicBool>,
        attempts: Arc<AtomicU64>,
        conns: mpsc::UnboundedReceiver<u32>,
    }

    /// A loop that spins would never let the paused clock move: past this
    /// many attempts the listener stops answering, so the test fails on
    /// its count instead of hanging.
    const SPIN_GUARD: u64 = 10_000;

    impl Accept for Exhaustible {
        type Conn = u32;

        async fn accept(&mut self) -> io::Result<(u32, SocketAddr)> {
            let n = self.attempts.fetch_add(1, Ordering::SeqCst) + 1;
            if n > SPIN_GUARD {
                std::future::pending::<()>().await;
            }
            if self.exhausted.load(Ordering::SeqCst) {
                return Err(io::Error::from_raw_os_error(libc::EMFILE));
            }
            match self.conns.recv().await {
                Some(c) => Ok((c, ([127, 0, 0, 1], 1).into())),
                None => std::future::pending().await,
            }
        }
    }

    #[test]
    fn errors_are_told_apart() {
        let of = |errno| Reason::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(of(libc::EMFILE), Reason::descriptors);
        assert_eq!(of(libc::ENFILE), Reason::descriptors);
        assert_eq!(of(libc::ENOBUFS), Reason::memory);
        assert_eq!(of(libc::ECONNABORTED), Reason::connection);
        assert_eq!(of(libc::EINVAL), Reason::other);
    }

    #[tokio::test(start_paused = true)]
    async fn descriptor_exhaustion_backs_off_and_accepting_recovers() {
        let exhausted = Arc::new(AtomicBool::new(true));
        let attempts = Arc::new(AtomicU64::new(0));
        let (conn_tx, conns) = mpsc::unbounded_channel();
        let listener = Exhaustible {
            exhausted: exhausted.clone(),
            attempts: attempts.clone(),
            conns,
        };
        let metrics = ConnMetrics::default();
        let errors = metrics.accept_errors.clone();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let how = Listening {
            kind: Kind::inbound,
            cap: 100,
            metrics,
        };
        let task = tokio::spawn(serve(listener, how, shutdown, move |c, _| {
            served_tx.send(*c.get_ref()).unwrap()
        }));

        // Tries at 0, 5, 15, 35, 75, 155, 315, 635 and 1275 ms (the waits
        // double from 5 ms), then one a second at the 1 s cap, the last at
        // 9275 ms: 17 in 10 s, where a loop without backoff never stops.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let in_ten_seconds = attempts.load(Ordering::SeqCst);
        assert_eq!(
            in_ten_seconds, 17,
            "accept attempts in 10 s of descriptor exhaustion"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
        let in_the_next_five = attempts.load(Ordering::SeqCst) - in_ten_seconds;
        assert_eq!(in_the_next_five, 5, "at the cap, one try a second");
        assert_eq!(
            errors.get(Kind::inbound, Reason::descriptors),
            attempts.load(Ordering::SeqCst),
            "every failed accept is counted"
        );

        // Descriptors come back: the queued connection is accepted
        // within one (capped) wait.
        exhausted.store(false, Ordering::SeqCst);
        conn_tx.send(7).unwrap();
        let got = tokio::time::timeout(BACKOFF_MAX, served.recv()).await;
        assert_eq!(got.ok().flatten(), Some(7), "accepting never recovered");

        // Success starts the backoff over: the next failure waits 5 ms.
        let before = attempts.load(Ordering::SeqCst);
        exhausted.store(true, Ordering::SeqCst);
        conn_tx.send(8).unwrap();
        // The loop was waiting in the attempt that now gets 8.
        assert_eq!(served.recv().await, Some(8));
        tokio::time::sleep(BACKOFF_MIN * 2).await;
        assert_eq!(
            attempts.load(Ordering::SeqCst) - before,
            // Failures at 0 and 5 ms (the next is due at 15 ms); without
            // the reset the second would wait a whole second.
            2,
            "after a success the backoff starts again at {BACKOFF_MIN:?}"
        );

        // Shutdown ends the loop even in the middle of a wait.
        shutdown_tx.send(true).unwrap();
        task.await.unwrap();
    }

    #[tokio::test]
    async fn past_the_cap_connections_are_shed_until_one_ends() {
        let (conn_tx, conns) = mpsc::unbounded_channel();
        let listener = Exhaustible {
            exhausted: Arc::new(AtomicBool::new(false)),
            attempts: Arc::new(AtomicU64::new(0)),
            conns,
        };
        let metrics = ConnMetrics::default();
        let (_shutdown_tx, shutdown) = watch::channel(false);
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let how = Listening {
            kind: Kind::outbound,
            cap: 2,
            metrics: metrics.clone(),
        };
        tokio::spawn(serve(listener, how, shutdown, move |c, _| {
            served_tx.send(c).unwrap()
        }));
        for c in 1..=5 {
            conn_tx.send(c).unwrap();
        }
        let first = served.recv().await.unwrap();
        let second = served.recv().await.unwrap();
        assert_eq!((*first.get_ref(), *second.get_ref()), (1, 2));
        assert_eq!(metrics.open(Kind::outbound), 2);
        // 3, 4 and 5 come while two are held: shed.
        trellis_testkit::assert_eventually!(metrics.shed(Kind::outbound, Shed::cap) == 3);
        assert!(
            served.try_recv().is_err(),
            "a connection past the cap was served"
        );

        // One ends: the next is taken.
        drop(first);
        assert_eq!(metrics.open(Kind::outbound), 1);
        conn_tx.send(6).unwrap();
        let sixth = served.recv().await.unwrap();
        assert_eq!(*sixth.get_ref(), 6);
        assert_eq!(metrics.open(Kind::outbound), 2);
        assert_eq!(metrics.shed(Kind::outbound, Shed::cap), 3);
    }
}
