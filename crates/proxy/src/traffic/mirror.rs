//! RequestMirror: a copy of the request goes to another Service, fire and
//! forget. The copy is sent from its own task, so it never delays the
//! primary request; its answer is read and dropped, so it never changes
//! the primary's. A request whose body was not kept (streaming, or over
//! 64 KiB) is not mirrored, and at most `MAX_IN_FLIGHT` copies are out at
//! once per proxy: a slow mirror must not pile up memory.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::request::Parts;
use http::{HeaderValue, Request, Uri, Version};
use http_body_util::BodyExt;

use super::chance;
use super::metrics::MirrorOutcome;
use crate::balance::PickCtx;
use crate::discovery::Lookup;
use crate::http::{full, DESTINATION};
use crate::inputs::Inputs;
use crate::route::Mirror;
use crate::tls::Credentials;

const MAX_IN_FLIGHT: usize = 256;
/// How long a copy may take before it is abandoned.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends a copy of the request (headers as prepared for the peer) to the
/// mirror's service, for its share of requests.
pub fn send(
    inputs: &Inputs,
    mirror: &Mirror,
    parts: &Parts,
    uri: &Uri,
    body: Option<Bytes>,
    creds: Option<Arc<Credentials>>,
) {
    if !chance(mirror.share) {
        return;
    }
    let metrics = inputs.metrics.clone();
    let key = mirror.service.clone();
    let Some(body) = body else {
        metrics.traffic.mirror(&key, MirrorOutcome::skipped);
        return;
    };
    if IN_FLIGHT.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
        metrics.traffic.mirror(&key, MirrorOutcome::dropped);
        return;
    }
    let slot = Slot;
    let discovery = inputs.discovery.clone();
    let method = parts.method.clone();
    let mut headers = parts.headers.clone();
    if let Ok(v) = HeaderValue::try_from(key.to_string()) {
        headers.insert(DESTINATION, v);
    }
    let uri = uri.clone();
    tokio::spawn(async move {
        let _slot = slot;
        let svc = match discovery.resolve(&key).await {
            Lookup::Found(svc) => svc,
            _ => {
                metrics.traffic.mirror(&key, MirrorOutcome::dropped);
                return;
            }
        };
        let Some(ep) = svc
            .balancer
            .pick(&svc.endpoints, &svc.rr, &PickCtx::default())
            .map(|p| p.endpoint.clone())
        else {
            metrics.traffic.mirror(&key, MirrorOutcome::dropped);
            return;
        };
        metrics.traffic.mirror(&key, MirrorOutcome::sent);
        let exchange = async {
            let mut conn = ep.h2(creds.as_deref()).await.ok()?;
            let mut req = Request::new(full(body));
            *req.method_mut() = method;
            *req.uri_mut() = uri;
            *req.version_mut() = Version::HTTP_2;
            *req.headers_mut() = headers;
            let resp = conn.send(req).await.ok()?;
            // Read the answer to the end so the stream closes cleanly.
            resp.into_body().collect().await.ok()
        };
        if tokio::time::timeout(MIRROR_TIMEOUT, exchange)
            .await
            .is_err()
        {
            tracing::debug!(service = %key, "mirrored request timed out");
        }
    });
}
