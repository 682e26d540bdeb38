//! The data path's threads. Each worker is an OS thread running its own
//! single-threaded tokio runtime, with its own accept loop on every data
//! listener (inbound, outbound, `--upstream`): a connection is served to
//! completion on the worker it is placed on (below), and so are the tasks it
//! spawns (hyper's per-stream tasks, the HTTP/2 connection to a peer proxy,
//! the pooled connection to the app). Each worker keeps its own
//! connections to peers and to the app (`PerWorker`), so that a request,
//! its stream to the peer and its response never cross threads: no futex
//! wake-up of a parked thread per hand-off, no lock shared by every stream
//! of one peer connection. This is how Envoy and HAProxy lay out their
//! threads; docs/performance.md has what it changed.
//!
//! The control-plane client, certificate rotation, the admin server, DNS,
//! health checks and telemetry export stay on the runtime `Proxy::start`
//! runs on. With no workers (`ProxyConfig::workers` 0, for embedding) the
//! data path runs there too, as tasks of that runtime.
//!
//! Workers share listeners by duplicated descriptors: the kernel hands
//! each new connection to one of the workers waiting in `accept`, and the
//! first to wake takes whatever is queued. So each accept loop then places
//! the connection on the worker serving the fewest of that listener's
//! connections (`Balanced`), as HAProxy does: it keeps it when it serves no
//! more than any other, else hands it over. The second of two connections
//! from a peer proxy (one per worker there) always goes to the other
//! worker, and a burst of clients is spread evenly.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::{mpsc, oneshot};

use crate::listener::{Accept, ConnMetrics, Kind};

/// The most workers a proxy may have.
pub const MAX: usize = 64;

thread_local! {
    /// The index of the worker this thread is; `usize::MAX` on any other
    /// thread.
    static CURRENT: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// The worker the calling thread is, if it is one.
pub fn current() -> Option<usize> {
    let i = CURRENT.with(Cell::get);
    (i != usize::MAX).then_some(i)
}

/// The default number of workers: one per CPU the process may use (which
/// counts a cgroup's CPU quota), at most two, as a sidecar shares its pod's
/// CPUs with the app (Istio's default concurrency is 2 too).
pub fn default_count() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(2)
}

/// The running workers; dropping this stops them (their connections are
/// closed with their runtimes).
pub struct Workers {
    set: WorkerSet,
    stops: Vec<oneshot::Sender<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

/// Where the data path's tasks go: the workers' runtimes, or none.
#[derive(Clone, Default)]
pub struct WorkerSet(Arc<[Handle]>);

impl Workers {
    /// Starts `n` workers (none for 0).
    pub fn start(n: usize) -> io::Result<Workers> {
        if n > MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("--workers {n} is more than {MAX}; use at most one per CPU"),
            ));
        }
        let mut handles = Vec::with_capacity(n);
        let mut stops = Vec::with_capacity(n);
        let mut threads = Vec::with_capacity(n);
        for i in 0..n {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(rt.handle().clone());
            let thread = std::thread::Builder::new()
                .name(format!("trellis-worker-{i}"))
                .spawn(move || {
                    CURRENT.with(|c| c.set(i));
                    // Runs until the proxy is dropped (or its `Workers`
                    // are); dropping the runtime here, off any async
                    // context, then closes what its tasks still hold.
                    rt.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            stops.push(stop);
            threads.push(thread);
        }
        Ok(Workers {
            set: WorkerSet(handles.into()),
            stops,
            threads,
        })
    }

    /// Tells every worker to stop; their threads, to join if one must know
    /// they are gone.
    fn stop(&mut self) -> Vec<std::thread::JoinHandle<()>> {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        std::mem::take(&mut self.threads)
    }

    pub fn set(&self) -> WorkerSet {
        self.set.clone()
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Not joined: this may run on an async task, which must not block.
        self.stop();
    }
}

impl WorkerSet {
    /// How many workers there are (0: the data path runs on the caller's
    /// runtime).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Runs `fut` on worker `i` and waits for it; with no workers, on the
    /// calling task.
    pub async fn run_on<F>(&self, i: usize, fut: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self.0.get(i) {
            Some(h) => h.spawn(fut).await.ok(),
            None => Some(fut.await),
        }
    }

    /// Serves `listener` on every worker, each with its own accept loop
    /// (`serve` of a duplicate of it, placing connections on the
    /// least-loaded worker), until every loop ends; with no workers, on the
    /// calling task. `kind` and `metrics` say where the per-worker counts
    /// of connections go (`trellis_worker_connections_open`).
    pub async fn serve_listener<F, Fut>(
        &self,
        listener: TcpListener,
        kind: Kind,
        metrics: &ConnMetrics,
        serve: F,
    ) where
        F: Fn(Balanced) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.0.is_empty() {
            return serve(Balanced::alone(listener)).await;
        }
        let addr = listener.local_addr().ok();
        let std = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(?addr, error = %e, "cannot hand the listener to the workers");
                return;
            }
        };
        let n = self.0.len();
        let (inboxes, receivers): (Vec<_>, Vec<_>) =
            (0..n).map(|_| mpsc::unbounded_channel()).unzip();
        let placement = Arc::new(Placement {
            loads: (0..n).map(|i| metrics.worker_open(kind, i)).collect(),
            inboxes: inboxes.into(),
        });
        let mut loops = Vec::with_capacity(n);
        for (me, (h, inbox)) in self.0.iter().zip(receivers).enumerate() {
            let dup = match std.try_clone() {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(?addr, error = %e, "cannot share the listener with a worker");
                    continue;
                }
            };
            let (serve, placement) = (serve.clone(), placement.clone());
            loops.push(h.spawn(async move {
                // Registered with this worker's own reactor.
                match TcpListener::from_std(dup) {
                    Ok(listener) => {
                        serve(Balanced {
                            listener,
                            me,
                            placement,
                            inbox: Some(inbox),
                        })
                        .await
                    }
                    Err(e) => {
                        tracing::error!(?addr, error = %e, "a worker cannot take the listener")
                    }
                }
            }));
        }
        drop(std);
        for l in loops {
            let _ = l.await;
        }
    }
}

/// A connection one worker's accept loop hands to another's: deregistered
/// from the first worker's reactor, to register with the second's.
struct Handed(std::net::TcpStream, SocketAddr);

/// One listener's workers: how many of its connections each serves, and
/// where to hand one a worker is to serve.
struct Placement {
    loads: Box<[Gauge]>,
    inboxes: Box<[mpsc::UnboundedSender<Handed>]>,
}

impl Placement {
    /// The worker to serve the next connection `me` accepts: `me` unless
    /// another serves fewer connections (the first of the fewest).
    fn place(&self, me: usize) -> usize {
        let mine = self.loads[me].get();
        let (least, load) = self
            .loads
            .iter()
            .map(Gauge::get)
            .enumerate()
            .min_by_key(|&(_, l)| l)
            .unwrap_or((me, mine));
        if load < mine {
            least
        } else {
            me
        }
    }
}

/// One worker's accept loop on a listener shared by the workers: it takes
/// connections from the listener and from the other loops, and serves each
/// on its worker or hands it to a worker that serves fewer (see the
/// module's doc). A connection it returns is counted on its worker until
/// its `Counted` ends.
pub struct Balanced {
    listener: TcpListener,
    me: usize,
    placement: Arc<Placement>,
    /// What other loops hand this one; none when it is the only loop.
    inbox: Option<mpsc::UnboundedReceiver<Handed>>,
}

impl Balanced {
    /// The only loop on `listener`: it keeps every connection.
    pub fn alone(listener: TcpListener) -> Balanced {
        Balanced {
            listener,
            me: 0,
            placement: Arc::new(Placement {
                loads: Box::new([Gauge::default()]),
                inboxes: Box::new([]),
            }),
            inbox: None,
        }
    }

    /// Hands `tcp` to worker `to`, counted there at once, so that the
    /// rest of a burst sees it. When that worker's loop has ended (it
    /// stops, or never started), the connection comes back, to be served
    /// here; when its descriptor cannot leave this reactor, it is closed.
    fn hand(&self, to: usize, tcp: TcpStream, peer: SocketAddr) -> Option<std::net::TcpStream> {
        let load = &self.placement.loads[to];
        load.inc();
        let back = match tcp.into_std() {
            Ok(std) => match self.placement.inboxes[to].send(Handed(std, peer)) {
                Ok(()) => return None,
                Err(mpsc::error::SendError(Handed(std, _))) => Some(std),
            },
            Err(e) => {
                tracing::debug!(%peer, error = %e, "cannot hand a connection to another worker");
                None
            }
        };
        load.dec();
        back
    }
}

impl Accept for Balanced {
    type Conn = TcpStream;

    async fn accept(&mut self) -> io::Result<(TcpStream, SocketAddr)> {
        loop {
            let inbox = &mut self.inbox;
            let handed = async {
                match inbox.as_mut() {
                    Some(inbox) => inbox.recv().await,
                    None => std::future::pending().await,
                }
            };
            let (tcp, peer) = tokio::select! {
                biased;
                Some(Handed(std, peer)) = handed => match TcpStream::from_std(std) {
                    // Counted here by the loop that handed it.
                    Ok(tcp) => return Ok((tcp, peer)),
                    Err(e) => {
                        self.placement.loads[self.me].dec();
                        tracing::debug!(%peer, error = %e, "a worker cannot take a connection handed to it");
                        continue;
                    }
                },
                accepted = Accept::accept(&mut self.listener) => accepted?,
            };
            let to = self.placement.place(self.me);
            let tcp = if to == self.me {
                tcp
            } else {
                match self.hand(to, tcp, peer).map(TcpStream::from_std) {
                    Some(Ok(tcp)) => tcp,
                    Some(Err(_)) | None => continue,
                }
            };
            self.placement.loads[self.me].inc();
            return Ok((tcp, peer));
        }
    }

    fn shed_queued(&mut self) -> usize {
        self.listener.shed_queued()
    }

    fn refuse(tcp: TcpStream) {
        TcpListener::refuse(tcp)
    }

    fn worker_load(&self) -> Option<Gauge> {
        Some(self.placement.loads[self.me].clone())
    }
}

/// One `T` per worker, and one more for every other thread: each worker
/// uses its own, so what `T` holds (a pooled connection, the HTTP/2
/// connection to a peer) is only used on the thread whose runtime runs
/// its task.
pub struct PerWorker<T>(Box<[T]>);

impl<T> PerWorker<T> {
    /// `slots` of them (at least one), made by `make`.
    pub fn new(slots: usize, make: impl FnMut(usize) -> T) -> Self {
        PerWorker((0..slots.max(1)).map(make).collect())
    }

    /// The calling thread's: its worker's, else the last one.
    pub fn get(&self) -> &T {
        let last = self.0.len() - 1;
        &self.0[current().map_or(last, |i| i.min(last))]
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter()
    }
}

/// `PerWorker` slots for a proxy with `workers` workers.
pub fn slots(workers: usize) -> usize {
    workers + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_worker_and_every_other_thread_has_its_own_slot() {
        let workers = Workers::start(2).unwrap();
        let set = workers.set();
        let per = Arc::new(PerWorker::new(slots(2), |i| i));
        let mut seen = Vec::new();
        for i in 0..2 {
            let per = per.clone();
            let got = set.run_on(i, async move { (current(), *per.get()) }).await;
            seen.push(got.unwrap());
        }
        assert_eq!(seen, vec![(Some(0), 0), (Some(1), 1)]);
        // This thread is no worker: the last slot.
        assert_eq!((current(), *per.get()), (None, 2));
    }

    #[tokio::test]
    async fn a_listener_is_served_on_every_worker_until_shutdown() {
        let workers = Workers::start(2).unwrap();
        let set = workers.set();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let serving = tokio::spawn({
            let set = set.clone();
            async move {
                let metrics = ConnMetrics::default();
                set.serve_listener(l, Kind::inbound, &metrics, move |mut l| {
                    let (tx, mut stopped) = (tx.clone(), stopped.clone());
                    async move {
                        loop {
                            tokio::select! {
                                a = l.accept() => {
                                    let _ = tx.send((current(), a.is_ok()));
                                }
                                _ = stopped.changed() => return,
                            }
                        }
                    }
                })
                .await
            }
        });
        // Every connection is accepted, on a worker.
        let mut conns = Vec::new();
        for _ in 0..20 {
            conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
            let (worker, ok) = rx.recv().await.unwrap();
            assert!(ok && worker.is_some_and(|w| w < 2), "{worker:?}");
        }
        stop.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), serving)
            .await
            .expect("the loops end at shutdown")
            .unwrap();
    }

    /// Serves `l` on `set` with `listener::serve`: each connection echoes
    /// what it reads, and reports the worker that serves it.
    fn serve_echo(
        set: &WorkerSet,
        l: TcpListener,
        metrics: ConnMetrics,
        served_on: mpsc::UnboundedSender<Option<usize>>,
    ) -> tokio::sync::watch::Sender<bool> {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let set = set.clone();
        tokio::spawn(async move {
            let m = metrics.clone();
            set.serve_listener(l, Kind::inbound, &m, move |l| {
                let how = crate::listener::Listening {
                    kind: Kind::inbound,
                    cap: 1000,
                    metrics: metrics.clone(),
                };
                let served_on = served_on.clone();
                crate::listener::serve(l, how, stopped.clone(), move |mut tcp, _| {
                    let _ = served_on.send(current());
                    tokio::spawn(async move {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = [0u8; 64];
                        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                            if tcp.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    });
                })
            })
            .await
        });
        stop
    }

    /// An echo server on a listener served by two workers: its address,
    /// its metrics, the worker of each connection as it is served, and
    /// what keeps it running.
    async fn echo_on_two_workers() -> (
        SocketAddr,
        ConnMetrics,
        mpsc::UnboundedReceiver<Option<usize>>,
        (Workers, tokio::sync::watch::Sender<bool>),
    ) {
        let workers = Workers::start(2).unwrap();
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let metrics = ConnMetrics::default();
        let (tx, served_on) = mpsc::unbounded_channel();
        let stop = serve_echo(&workers.set(), l, metrics.clone(), tx);
        (addr, metrics, served_on, (workers, stop))
    }

    async fn echoes(c: &mut tokio::net::TcpStream) -> bool {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut got = [0u8; 4];
        c.write_all(b"ping").await.is_ok()
            && c.read_exact(&mut got).await.is_ok()
            && &got == b"ping"
    }

    #[tokio::test]
    async fn two_connections_at_once_are_served_by_two_workers() {
        // A peer proxy with two workers opens one connection from each, at
        // the same moment: whichever worker wakes first, one serves each.
        let (addr, metrics, mut served_on, _serving) = echo_on_two_workers().await;
        for round in 0..20 {
            let (mut a, mut b) = tokio::try_join!(
                tokio::net::TcpStream::connect(addr),
                tokio::net::TcpStream::connect(addr)
            )
            .unwrap();
            let on = [
                served_on.recv().await.unwrap(),
                served_on.recv().await.unwrap(),
            ];
            assert!(on[0].is_some() && on[1].is_some(), "{on:?}");
            assert_ne!(on[0], on[1], "round {round}: both on one worker");
            assert!(
                echoes(&mut a).await && echoes(&mut b).await,
                "round {round}"
            );
            assert_eq!(
                (0..2)
                    .map(|w| metrics.worker_open(Kind::inbound, w).get())
                    .collect::<Vec<_>>(),
                vec![1, 1]
            );
            drop((a, b));
            // Each worker's count falls back as its connection ends.
            trellis_testkit::assert_eventually!(
                metrics.worker_open(Kind::inbound, 0).get() == 0
                    && metrics.worker_open(Kind::inbound, 1).get() == 0
            );
        }
        assert_eq!(metrics.open(Kind::inbound), 0);
    }

    #[tokio::test]
    async fn a_burst_of_connections_is_spread_evenly_and_served() {
        let (addr, metrics, mut served_on, _serving) = echo_on_two_workers().await;
        let mut conns =
            futures::future::try_join_all((0..64).map(|_| tokio::net::TcpStream::connect(addr)))
                .await
                .unwrap();
        let mut per_worker = [0; 2];
        for _ in 0..64 {
            per_worker[served_on.recv().await.unwrap().unwrap()] += 1;
        }
        assert!(
            per_worker.iter().all(|&n| (31..=33).contains(&n)),
            "{per_worker:?}"
        );
        for c in &mut conns {
            assert!(echoes(c).await, "a handed-over connection is served");
        }
        assert_eq!(metrics.open(Kind::inbound), 64);
    }

    #[tokio::test]
    async fn a_connection_for_a_worker_whose_loop_ended_is_served_where_it_came() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (to_0, inbox_0) = mpsc::unbounded_channel();
        let (to_1, inbox_1) = mpsc::unbounded_channel();
        drop(inbox_1);
        let placement = Arc::new(Placement {
            loads: Box::new([Gauge::default(), Gauge::default()]),
            inboxes: Box::new([to_0, to_1]),
        });
        // Worker 1 serves fewer, but its loop is gone.
        placement.loads[0].set(1);
        let mut first = Balanced {
            listener: l,
            me: 0,
            placement: placement.clone(),
            inbox: Some(inbox_0),
        };
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut tcp, _) = tokio::time::timeout(std::time::Duration::from_secs(5), first.accept())
            .await
            .expect("served by the loop that accepted it")
            .unwrap();
        assert_eq!(
            placement.loads.iter().map(Gauge::get).collect::<Vec<_>>(),
            vec![2, 0]
        );
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        client.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tcp.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping", "the connection still works");
    }

    #[test]
    fn a_connection_goes_to_the_first_of_the_least_loaded_workers() {
        let placement = |loads: &[i64]| Placement {
            loads: loads
                .iter()
                .map(|&l| {
                    let g = Gauge::default();
                    g.set(l);
                    g
                })
                .collect(),
            inboxes: Box::new([]),
        };
        // Kept while no worker serves fewer: no hand-over for a tie.
        assert_eq!(placement(&[0, 0]).place(0), 0);
        assert_eq!(placement(&[3, 3, 3]).place(1), 1);
        assert_eq!(placement(&[1, 0]).place(0), 1);
        assert_eq!(placement(&[2, 5, 1, 1]).place(1), 2);
        assert_eq!(placement(&[4]).place(0), 0);
    }

    #[test]
    fn more_workers_than_the_maximum_is_an_error_that_says_what_to_do() {
        let err = Workers::start(MAX + 1).err().unwrap();
        assert!(err.to_string().contains("at most one per CPU"), "{err}");
    }

    #[test]
    fn stopped_workers_end_their_threads_and_run_nothing_more() {
        let mut workers = Workers::start(1).unwrap();
        let set = workers.set();
        for t in workers.stop() {
            t.join().unwrap();
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        // A stopped worker runs nothing more: the task is cancelled.
        let ran = rt.block_on(async {
            tokio::time::timeout(
                std::time::Duration::from_secs(5),
                set.run_on(0, async { 1 }),
            )
            .await
        });
        assert_eq!(ran.expect("answers at once"), None);
    }
}
