//! The proxy's TCP listeners: binding each one once at start-up (a taken
//! port is a start-up error naming the flag to change), and the one accept
//! loop that every listener runs.
//!
//! When accepting fails (above all for want of file descriptors, which
//! leaves the connection queued, so the next accept fails at once) the loop
//! backs off, 5 ms doubling to 1 s, instead of spinning; it logs at most
//! once every 10 s per listener and counts every error in
//! `trellis_accept_errors_total`. Connections already accepted run in their
//! own tasks and are served on meanwhile.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// The first wait after a failed accept; it doubles up to `BACKOFF_MAX`.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// While accepting keeps failing, one log line per listener this often.
const LOG_EVERY: Duration = Duration::from_secs(10);
const BACKLOG: u32 = 1024;

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
}

impl Accept for TcpListener {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        let (tcp, peer) = TcpListener::accept(self).await?;
        let _ = tcp.set_nodelay(true);
        Ok((tcp, peer))
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
    last_logged: Option<Instant>,
}

impl Failing {
    fn new(kind: Kind) -> Failing {
        Failing {
            kind,
            next_wait: BACKOFF_MIN,
            errors: 0,
            unlogged: 0,
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
            "the {} listener cannot accept connections: {}; connections already accepted are served on",
            self.kind,
            reason.advice(),
        );
        self.last_logged = Some(now);
        self.unlogged = 0;
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
/// must not block (it spawns the connection's task).
pub async fn serve<L, F>(
    mut listener: L,
    kind: Kind,
    errors: AcceptErrors,
    mut shutdown: watch::Receiver<bool>,
    mut on_conn: F,
) where
    L: Accept,
    F: FnMut(L::Conn, SocketAddr),
{
    let mut failing = Failing::new(kind);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.changed() => return,
        };
        match accepted {
            Ok((conn, peer)) => {
                failing.accepted();
                on_conn(conn, peer);
            }
            Err(e) => {
                let reason = Reason::of(&e);
                errors.inc(kind, reason);
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
        let errors = AcceptErrors::default();
        let (shutdown_tx, shutdown) = watch::channel(false);
        let (served_tx, mut served) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(
            listener,
            Kind::inbound,
            errors.clone(),
            shutdown,
            move |c, _| served_tx.send(c).unwrap(),
        ));

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
}
