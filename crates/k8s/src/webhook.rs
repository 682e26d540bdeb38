//! The sidecar injector's admission handler (AdmissionReview v1), and the
//! upkeep of its MutatingWebhookConfiguration's `caBundle`.
//!
//! The control plane serves [`router`] over HTTPS with a certificate from
//! the mesh CA for `trellis-webhook.<namespace>.svc`, and keeps `caBundle`
//! equal to the mesh CA's roots ([`ensure_ca_bundle`]), so the API server
//! trusts exactly that certificate. The handler never refuses a pod: a pod
//! it cannot inject is admitted as it is, with a warning that says why
//! (with `--ha`, the configuration's failurePolicy Fail covers the other
//! case, a webhook that cannot be reached).

use std::collections::BTreeMap;

use base64::Engine as _;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch, PatchParams};
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview};
use kube::core::DynamicObject;
use tracing::{debug, info, warn};

use crate::inject::{decide, inject, patch, Decision, InjectConfig};
use crate::names::WEBHOOK_CONFIG;

/// The largest AdmissionReview accepted (the API server's own request
/// limit is 3 MiB; a pod is far smaller).
pub const MAX_BODY: usize = 4 << 20;

/// The labels of a namespace, from the control plane's watch of them.
pub trait NamespaceLabels: Send + Sync {
    fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>>;
    /// Whether the cluster's namespaces have been read once.
    fn synced(&self) -> bool {
        true
    }
}

impl NamespaceLabels for BTreeMap<String, BTreeMap<String, String>> {
    fn labels(&self, namespace: &str) -> Option<BTreeMap<String, String>> {
        self.get(namespace).cloned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("cannot read the MutatingWebhookConfiguration {WEBHOOK_CONFIG}: {0}; was `trellis install` applied?")]
    Get(kube::Error),
    #[error("cannot update the caBundle of {WEBHOOK_CONFIG}: {0}; does the control plane's ClusterRole allow patching it?")]
    Patch(kube::Error),
}

/// Answers one AdmissionReview: allowed, with the injection as a JSON patch
/// when the pod gets the mesh.
pub fn review(
    review: AdmissionReview<DynamicObject>,
    cfg: &InjectConfig,
    namespaces: &dyn NamespaceLabels,
) -> serde_json::Value {
    let req: Result<AdmissionRequest<DynamicObject>, _> = review.try_into();
    let out = match req {
        Ok(req) => respond(&req, cfg, namespaces).into_review(),
        Err(e) => {
            warn!(error = %e, "an AdmissionReview without a request");
            AdmissionResponse::invalid(e.to_string()).into_review()
        }
    };
    let mut v = serde_json::to_value(&out).expect("an AdmissionReview serialises");
    // kube writes the patch's bytes as a JSON array of numbers; the API
    // (Go's []byte) documents base64, which is what every webhook sends.
    if let Some(bytes) = v["response"]["patch"].as_array() {
        let raw: Vec<u8> = bytes
            .iter()
            .filter_map(|b| b.as_u64())
            .map(|b| b as u8)
            .collect();
        v["response"]["patch"] =
            serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(raw));
    }
    v
}

fn respond(
    req: &AdmissionRequest<DynamicObject>,
    cfg: &InjectConfig,
    namespaces: &dyn NamespaceLabels,
) -> AdmissionResponse {
    let allow = AdmissionResponse::from(req);
    let Some(object) = &req.object else {
        return allow;
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(e) => return warn_allow(allow, format!("not injected: the pod cannot be read: {e}")),
    };
    let namespace = req
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".into());
    let labels = namespaces.labels(&namespace).unwrap_or_default();
    match decide(&pod, &namespace, &labels, cfg) {
        Decision::Skip(why) => {
            debug!(%namespace, pod = ?pod.metadata.name.as_ref().or(pod.metadata.generate_name.as_ref()), %why, "not injected");
            allow
        }
        Decision::Inject => match inject(&pod, cfg) {
            Ok(injected) => {
                info!(%namespace, workload = %crate::inject::workload_name(&pod), "injecting the sidecar");
                match allow.clone().with_patch(patch(&pod, &injected)) {
                    Ok(r) => r,
                    Err(e) => warn_allow(allow, format!("not injected: {e}")),
                }
            }
            Err(e) => warn_allow(allow, format!("trellis: not injected: {e}")),
        },
    }
}

fn warn_allow(mut resp: AdmissionResponse, warning: String) -> AdmissionResponse {
    warn!(%warning, "admitting a pod without the sidecar");
    resp.warnings.get_or_insert_default().push(warning);
    resp
}

/// The HTTP routes of the webhook (served over TLS by the control plane).
/// With a `client`, a pod's namespace labels are read from the API server
/// at admission: `kubectl label namespace ... && kubectl apply ...` must
/// inject even when the watch has not seen the label yet. `namespaces`
/// (the watch) answers when the API server does not.
pub fn router(
    cfg: Arc<InjectConfig>,
    namespaces: Arc<dyn NamespaceLabels>,
    client: Option<kube::Client>,
) -> axum::Router {
    use axum::extract::{DefaultBodyLimit, State};
    use axum::Json;
    type Shared = (
        Arc<InjectConfig>,
        Arc<dyn NamespaceLabels>,
        Option<kube::Client>,
    );
    async fn handle(
        State((cfg, namespaces, client)): State<Shared>,
        Json(body): Json<AdmissionReview<DynamicObject>>,
    ) -> Json<serde_json::Value> {
        let namespace = body.request.as_ref().and_then(|r| r.namespace.clone());
        let fresh = match (&client, namespace) {
            (Some(client), Some(ns)) => {
                let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
                match api.get_opt(&ns).await {
                    Ok(Some(found)) => Some(BTreeMap::from([(
                        ns,
                        found.metadata.labels.unwrap_or_default(),
                    )])),
                    Ok(None) => None,
                    Err(e) => {
                        warn!(namespace = %ns, error = %e, "cannot read the namespace; using the watched labels");
                        None
                    }
                }
            }
            _ => None,
        };
        Json(match fresh {
            Some(labels) => review(body, &cfg, &labels),
            None => review(body, &cfg, namespaces.as_ref()),
        })
    }
    async fn ready(
        State((_, namespaces, _)): State<Shared>,
    ) -> (axum::http::StatusCode, &'static str) {
        if namespaces.synced() {
            (axum::http::StatusCode::OK, "ready\n")
        } else {
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "reading the cluster\n",
            )
        }
    }
    axum::Router::new()
        .route(crate::names::WEBHOOK_PATH, axum::routing::post(handle))
        .route(crate::names::WEBHOOK_READY_PATH, axum::routing::get(ready))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state((cfg, namespaces, client))
}

/// Makes every webhook of the configuration trust `ca_bundle_pem` (the
/// mesh CA's roots); returns whether anything changed.
pub async fn ensure_ca_bundle(
    client: kube::Client,
    ca_bundle_pem: &str,
) -> Result<bool, WebhookError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client);
    let current = api.get(WEBHOOK_CONFIG).await.map_err(WebhookError::Get)?;
    let want = k8s_openapi::ByteString(ca_bundle_pem.as_bytes().to_vec());
    let mut ops = Vec::new();
    for (i, w) in current.webhooks.iter().flatten().enumerate() {
        if w.client_config.ca_bundle.as_ref() != Some(&want) {
            // Test the name first, so a configuration changed since the
            // read is never patched at the wrong index.
            ops.push(serde_json::json!({ "op": "test", "path": format!("/webhooks/{i}/name"), "value": w.name }));
            ops.push(serde_json::json!({
                "op": "add",
                "path": format!("/webhooks/{i}/clientConfig/caBundle"),
                "value": want,
            }));
        }
    }
    if ops.is_empty() {
        return Ok(false);
    }
    let patch: json_patch::Patch =
        serde_json::from_value(serde_json::Value::Array(ops)).expect("the ops are JSON patch ops");
    api.patch(
        WEBHOOK_CONFIG,
        &PatchParams::default(),
        &Patch::Json::<()>(patch),
    )
    .await
    .map_err(WebhookError::Patch)?;
    info!("the webhook's caBundle now holds the mesh CA's roots");
    Ok(true)
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
