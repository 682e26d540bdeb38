//! Active health checks. For every Service in the snapshot whose
//! TrafficPolicy has a `healthCheck`, this proxy GETs its path on each
//! endpoint (through the peer's proxy, as any request) every `interval`:
//! a 2xx within `timeout` passes. Results flip the endpoint's health after
//! the thresholds; the balancer skips unhealthy endpoints. Only services
//! this proxy's app calls are checked, since only they are in its snapshot.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Method, Request, Version};
use tokio::sync::watch;

use super::metrics::CheckResult;
use super::now_nanos;
use crate::endpoint::Endpoint;
use crate::http::{empty, DESTINATION, ORIG_PROTO, SOURCE};
use crate::inputs::Inputs;
use crate::snapshot::ServiceState;

/// How often the task looks for checks that are due.
const TICK: Duration = Duration::from_millis(100);

/// Runs until shutdown.
pub async fn run(inputs: Arc<Inputs>, mut shutdown: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let snap = inputs.discovery.snapshot();
        let now = now_nanos();
        for svc in snap.services.values() {
            let Some(hc) = &svc.policy.health_check else {
                continue;
            };
            for ep in &svc.endpoints {
                if ep.health.check_due(hc.interval, now) {
                    tokio::spawn(check(inputs.clone(), svc.clone(), ep.clone()));
                }
            }
        }
    }
}

async fn check(inputs: Arc<Inputs>, svc: Arc<ServiceState>, ep: Arc<Endpoint>) {
    let Some(hc) = &svc.policy.health_check else {
        return;
    };
    let port = svc.spec.ports.first().map(|p| p.port).unwrap_or(80);
    let uri = format!("http://{}:{port}{}", svc.key.name, hc.path);
    let exchange = async {
        let creds = crate::outbound::peer_credentials(&inputs).ok()?;
        let mut conn = ep.h2(creds.as_deref()).await.ok()?;
        let mut req = Request::new(empty());
        *req.method_mut() = Method::GET;
        *req.uri_mut() = uri.parse().ok()?;
        *req.version_mut() = Version::HTTP_2;
        let h = req.headers_mut();
        // Ask the peer to speak HTTP/1.1 to its app, which every app does.
        h.insert(ORIG_PROTO, HeaderValue::from_static("HTTP/1.1"));
        if let Ok(v) =
            HeaderValue::try_from(format!("{}/{}", inputs.cfg.namespace, inputs.cfg.workload))
        {
            h.insert(SOURCE, v);
        }
        if let Ok(v) = HeaderValue::try_from(svc.key.to_string()) {
            h.insert(DESTINATION, v);
        }
        let resp = conn.send(req).await.ok()?;
        Some(resp.status().is_success())
    };
    let passed = tokio::time::timeout(hc.timeout, exchange)
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
    let metrics = &inputs.metrics.traffic;
    metrics.check(
        &svc.key,
        if passed {
            CheckResult::pass
        } else {
            CheckResult::fail
        },
    );
    match ep.health.record_check(hc, passed) {
        Some(true) => {
            tracing::info!(service = %svc.key, endpoint = %ep.addr, "health checks pass again: endpoint back in")
        }
        Some(false) => {
            tracing::warn!(service = %svc.key, endpoint = %ep.addr, path = %hc.path, "health checks fail: endpoint taken out")
        }
        None => {}
    }
}
