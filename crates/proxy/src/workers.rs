//! The data path's threads. Each worker is an OS thread running its own
//! single-threaded tokio runtime, with its own accept loop on every data
//! listener (inbound, outbound, `--upstream`): a connection is served to
//! completion on the worker that accepted it, and so are the tasks it
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
//! each new connection to one of the workers waiting in `accept`.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

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
    /// (`serve` of a duplicate of it), until every loop ends; with no
    /// workers, on the calling task.
    pub async fn serve_listener<F, Fut>(&self, listener: TcpListener, serve: F)
    where
        F: Fn(TcpListener) -> Fut + Send + Clone + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        if self.0.is_empty() {
            return serve(listener).await;
        }
        let addr = listener.local_addr().ok();
        let std = match listener.into_std() {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(?addr, error = %e, "cannot hand the listener to the workers");
                return;
            }
        };
        let mut loops = Vec::with_capacity(self.0.len());
        for h in self.0.iter() {
            let dup = match std.try_clone() {
                Ok(d) => d,
                Err(e) => {
                    tracing::error!(?addr, error = %e, "cannot share the listener with a worker");
                    continue;
                }
            };
            let serve = serve.clone();
            loops.push(h.spawn(async move {
                // Registered with this worker's own reactor.
                match TcpListener::from_std(dup) {
                    Ok(l) => serve(l).await,
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
                set.serve_listener(l, move |l| {
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
