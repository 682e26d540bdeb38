//! Live tap: request metadata (never bodies) streamed to the control plane
//! while a tap it started is active.
//!
//! With no tap active the request path pays one atomic load. Events go
//! through a bounded queue to a task that batches them per tap into
//! `TapEvents`; a full queue drops and counts.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use tokio::sync::mpsc;
use trellis_api::v1::{proxy_message, TapEvent, TapEvents, TapStart};

/// A tap that names no bound stops after this many events.
pub const DEFAULT_MAX_EVENTS: u32 = 100_000;
const QUEUE: usize = 1024;
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
const MAX_BATCH: usize = 200;
/// At most this many taps at once on one proxy.
const MAX_TAPS: usize = 16;

struct Active {
    id: Arc<str>,
    prefix: String,
    remaining: AtomicU32,
}

pub struct Taps {
    active: ArcSwap<Vec<Arc<Active>>>,
    tx: mpsc::Sender<(Arc<str>, TapEvent)>,
    dropped: Counter,
}

impl Taps {
    pub fn start_task(uplink: mpsc::Sender<proxy_message::Msg>, dropped: Counter) -> Arc<Taps> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, uplink, dropped.clone()));
        Arc::new(Taps {
            active: ArcSwap::from_pointee(Vec::new()),
            tx,
            dropped,
        })
    }

    pub fn is_active(&self) -> bool {
        !self.active.load().is_empty()
    }

    pub fn start(&self, s: TapStart) {
        let max = if s.max_events == 0 {
            DEFAULT_MAX_EVENTS
        } else {
            s.max_events.min(DEFAULT_MAX_EVENTS)
        };
        tracing::info!(tap = %s.id, prefix = %s.path_prefix, "tap started");
        let tap = Arc::new(Active {
            id: s.id.into(),
            prefix: s.path_prefix,
            remaining: AtomicU32::new(max),
        });
        self.active.rcu(|list| {
            let mut list: Vec<_> = list.iter().filter(|t| t.id != tap.id).cloned().collect();
            if list.len() >= MAX_TAPS {
                list.remove(0);
            }
            list.push(tap.clone());
            list
        });
    }

    pub fn stop(&self, id: &str) {
        self.active.rcu(|list| {
            list.iter()
                .filter(|t| &*t.id != id)
                .cloned()
                .collect::<Vec<_>>()
        });
    }

    /// Every tap ends with the stream that started it.
    pub fn stop_all(&self) {
        self.active.store(Arc::new(Vec::new()));
    }

    /// Offers one request to every active tap whose prefix matches `path`.
    /// Whether any tap is running (one atomic load; no event is made
    /// when none is).
    pub fn active(&self) -> bool {
        !self.active.load().is_empty()
    }

    pub fn offer(&self, path: &str, event: impl FnOnce() -> TapEvent) {
        let list = self.active.load();
        if list.is_empty() {
            return;
        }
        let mut event = Some(event);
        let mut made: Option<TapEvent> = None;
        let mut finished = Vec::new();
        for tap in list.iter() {
            if !path.starts_with(&tap.prefix) {
                continue;
            }
            let left = tap
                .remaining
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
            match left {
                Err(_) => continue,
                Ok(1) => finished.push(tap.id.clone()),
                Ok(_) => {}
            }
            if made.is_none() {
                made = event.take().map(|f| f());
            }
            if let Some(ev) = &made {
                if self.tx.try_send((tap.id.clone(), ev.clone())).is_err() {
                    self.dropped.inc();
                }
            }
        }
        for id in finished {
            self.stop(&id);
        }
    }
}

async fn run(
    mut rx: mpsc::Receiver<(Arc<str>, TapEvent)>,
    uplink: mpsc::Sender<proxy_message::Msg>,
    dropped: Counter,
) {
    let mut pending: HashMap<Arc<str>, Vec<TapEvent>> = HashMap::new();
    loop {
        let Some((id, ev)) = rx.recv().await else {
            return;
        };
        pending.entry(id).or_default().push(ev);
        let flush = tokio::time::sleep(FLUSH_INTERVAL);
        tokio::pin!(flush);
        let mut n = 1;
        while n < MAX_BATCH {
            tokio::select! {
                got = rx.recv() => match got {
                    Some((id, ev)) => {
                        pending.entry(id).or_default().push(ev);
                        n += 1;
                    }
                    None => break,
                },
                _ = &mut flush => break,
            }
        }
        for (id, events) in pending.drain() {
            let count = events.len() as u64;
            let msg = proxy_message::Msg::TapEvents(TapEvents {
                id: id.to_string(),
                events,
            });
            if uplink.try_send(msg).is_err() {
                dropped.inc_by(count);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taps_filter_by_prefix_and_stop_at_their_bound() {
        let (up_tx, mut up_rx) = mpsc::channel(16);
        let taps = Taps::start_task(up_tx, Counter::default());
        assert!(!taps.is_active());
        taps.offer("/x", || panic!("no tap: no event is made"));
        taps.start(TapStart {
            id: "t1".into(),
            path_prefix: "/api".into(),
            max_events: 2,
        });
        assert!(taps.is_active());
        let ev = |p: &str| TapEvent {
            path: p.into(),
            ..Default::default()
        };
        taps.offer("/other", || ev("/other"));
        taps.offer("/api/1", || ev("/api/1"));
        taps.offer("/api/2", || ev("/api/2"));
        assert!(!taps.is_active(), "the bound ends the tap");
        taps.offer("/api/3", || ev("/api/3"));
        let Some(proxy_message::Msg::TapEvents(batch)) = up_rx.recv().await else {
            panic!("a batch")
        };
        assert_eq!(batch.id, "t1");
        let paths: Vec<_> = batch.events.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/api/1", "/api/2"]);
    }
}
