//! Live tap: the control plane asks the proxies of a workload (or all) to
//! stream request metadata, and hands what they send to the one HTTP
//! client that asked. The tap stops on every proxy when that client goes.
//!
//! Tapping needs the `tap` role (or `admin`): the HTTP API checks the
//! credential before opening one (see `auth`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::mpsc;
use trellis_api::v1::{control_message, ControlMessage, TapEvent, TapStart, TapStop};

use crate::registry::ConnId;

/// Control messages waiting for one proxy's stream.
const PROXY_QUEUE: usize = 16;
/// Events waiting for one tap client; past this they are dropped.
const CLIENT_QUEUE: usize = 4096;
/// Taps open at once.
pub const MAX_TAPS: usize = 32;

struct ProxyLink {
    workload: String,
    namespace: String,
    instance: String,
    tx: mpsc::Sender<ControlMessage>,
}

/// What a tap client receives: the event and which proxy saw it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TapLine {
    pub proxy: String,
    pub workload: String,
    pub namespace: String,
    pub timestamp_unix_nanos: i64,
    pub direction: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub status: u32,
    pub duration_ms: f64,
    pub source_identity: String,
    pub destination_identity: String,
    pub destination_service: String,
    pub route: String,
    pub tls: bool,
    pub trace_id: String,
}

struct Client {
    tx: mpsc::Sender<TapLine>,
    proxies: Vec<ConnId>,
}

#[derive(Default)]
struct Inner {
    proxies: HashMap<ConnId, ProxyLink>,
    clients: HashMap<String, Client>,
}

#[derive(Default)]
pub struct TapHub {
    inner: Mutex<Inner>,
    next: AtomicU64,
    pub events_dropped: prometheus_client::metrics::counter::Counter,
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("no connected proxy matches {0}")]
    NoProxy(String),
    #[error("{MAX_TAPS} taps are open already: close one and try again")]
    TooMany,
}

/// An open tap; dropping it stops the tap on every proxy.
pub struct TapSession {
    hub: Arc<TapHub>,
    pub id: String,
    pub proxies: usize,
    pub events: mpsc::Receiver<TapLine>,
}

impl Drop for TapSession {
    fn drop(&mut self) {
        self.hub.close(&self.id);
    }
}

impl TapHub {
    pub fn new() -> Arc<TapHub> {
        Arc::new(TapHub::default())
    }

    /// A proxy stream opened: the returned receiver carries the tap
    /// messages for it.
    pub fn connect(
        &self,
        conn: ConnId,
        workload: &str,
        namespace: &str,
        instance: &str,
    ) -> mpsc::Receiver<ControlMessage> {
        let (tx, rx) = mpsc::channel(PROXY_QUEUE);
        self.lock().proxies.insert(
            conn,
            ProxyLink {
                workload: workload.to_string(),
                namespace: namespace.to_string(),
                instance: instance.to_string(),
                tx,
            },
        );
        rx
    }

    pub fn disconnect(&self, conn: ConnId) {
        self.lock().proxies.remove(&conn);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a tap on the proxies of `workload` (every proxy when None)
    /// in `namespace` (every namespace when None).
    pub fn open(
        self: &Arc<Self>,
        workload: Option<&str>,
        namespace: Option<&str>,
        path_prefix: &str,
        max_events: u32,
    ) -> Result<TapSession, TapError> {
        let id = format!("tap-{}", self.next.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = mpsc::channel(CLIENT_QUEUE);
        let mut inner = self.lock();
        if inner.clients.len() >= MAX_TAPS {
            return Err(TapError::TooMany);
        }
        let start = ControlMessage {
            msg: Some(control_message::Msg::TapStart(TapStart {
                id: id.clone(),
                path_prefix: path_prefix.to_string(),
                max_events,
            })),
        };
        let mut proxies = Vec::new();
        for (conn, p) in &inner.proxies {
            let matches = workload.is_none_or(|w| w == p.workload)
                && namespace.is_none_or(|ns| ns == p.namespace);
            if matches && p.tx.try_send(start.clone()).is_ok() {
                proxies.push(*conn);
            }
        }
        if proxies.is_empty() {
            let what = match (workload, namespace) {
                (Some(w), Some(ns)) => format!("workload {ns}/{w}"),
                (Some(w), None) => format!("workload {w}"),
                (None, Some(ns)) => format!("namespace {ns}"),
                (None, None) => "the mesh".to_string(),
            };
            return Err(TapError::NoProxy(what));
        }
        let n = proxies.len();
        inner.clients.insert(id.clone(), Client { tx, proxies });
        drop(inner);
        tracing::info!(tap = %id, proxies = n, ?workload, prefix = %path_prefix, "tap opened");
        Ok(TapSession {
            hub: self.clone(),
            id,
            proxies: n,
            events: rx,
        })
    }

    fn close(&self, id: &str) {
        let mut inner = self.lock();
        let Some(client) = inner.clients.remove(id) else {
            return;
        };
        let stop = ControlMessage {
            msg: Some(control_message::Msg::TapStop(TapStop {
                id: id.to_string(),
            })),
        };
        for conn in client.proxies {
            if let Some(p) = inner.proxies.get(&conn) {
                let _ = p.tx.try_send(stop.clone());
            }
        }
        tracing::info!(tap = %id, "tap closed");
    }

    /// Events a proxy sent for tap `id`.
    pub fn deliver(&self, conn: ConnId, id: &str, events: Vec<TapEvent>) {
        let inner = self.lock();
        let (Some(client), Some(p)) = (inner.clients.get(id), inner.proxies.get(&conn)) else {
            return;
        };
        for e in events {
            let line = TapLine {
                proxy: p.instance.clone(),
                workload: p.workload.clone(),
                namespace: p.namespace.clone(),
                timestamp_unix_nanos: e.timestamp_unix_nanos,
                direction: e.direction,
                method: e.method,
                authority: e.authority,
                path: e.path,
                status: e.status,
                duration_ms: e.duration_ms,
                source_identity: e.source_identity,
                destination_identity: e.destination_identity,
                destination_service: e.destination_service,
                route: e.route,
                tls: e.tls,
                trace_id: e.trace_id,
            };
            if client.tx.try_send(line).is_err() {
                self.events_dropped.inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn taps_reach_matching_proxies_and_stop_when_dropped() {
        let hub = TapHub::new();
        let mut a = hub.connect(1, "web", "default", "web-1");
        let mut b = hub.connect(2, "db", "default", "db-1");
        assert!(matches!(
            hub.open(Some("nope"), None, "", 0),
            Err(TapError::NoProxy(_))
        ));
        let mut tap = hub.open(Some("web"), None, "/api", 10).unwrap();
        assert_eq!(tap.proxies, 1);
        let Some(ControlMessage {
            msg: Some(control_message::Msg::TapStart(s)),
        }) = a.recv().await
        else {
            panic!("TapStart")
        };
        assert_eq!((s.path_prefix.as_str(), s.max_events), ("/api", 10));
        assert!(b.try_recv().is_err());
        hub.deliver(
            1,
            &tap.id,
            vec![TapEvent {
                path: "/api/x".into(),
                ..Default::default()
            }],
        );
        // Events for another tap, or from a proxy not asked, go nowhere.
        hub.deliver(2, &tap.id, vec![TapEvent::default()]);
        let line = tap.events.recv().await.unwrap();
        assert_eq!(
            (line.path.as_str(), line.workload.as_str()),
            ("/api/x", "web")
        );
        drop(tap);
        let Some(ControlMessage {
            msg: Some(control_message::Msg::TapStop(_)),
        }) = a.recv().await
        else {
            panic!("TapStop")
        };
    }
}
