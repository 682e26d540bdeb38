//! The Kubernetes work of `trellis control --kubernetes` that needs the API
//! server and nothing of the control plane itself: what a sidecar's token
//! grants (its pod), and the route status the Lease holder writes. The CLI
//! glues these to the control plane.

use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::ResourceExt;
use tracing::warn;

use crate::identity::{review, ReviewError, Reviewed};
use crate::source::{MeshState, PodInfo};

#[derive(Debug, thiserror::Error)]
pub enum GrantError {
    #[error(transparent)]
    Review(#[from] ReviewError),
    #[error("the token's pod {namespace}/{pod} does not exist (any more): restart the pod")]
    NoPod { namespace: String, pod: String },
    #[error("the token's pod {namespace}/{pod} has uid {found}, the token names {want}: it is a token of an earlier pod of that name")]
    OtherPod {
        namespace: String,
        pod: String,
        found: String,
        want: String,
    },
    #[error("cannot read the pod {namespace}/{pod}: {source}")]
    Api {
        namespace: String,
        pod: String,
        source: Box<kube::Error>,
    },
}

/// What a sidecar's projected token grants: the ServiceAccount identity the
/// API server vouches for, and the labels and IP of the pod it is bound to
/// (from the watched state, else read now: a pod just started may not have
/// reached the watch yet).
pub async fn grant(
    client: kube::Client,
    state: &MeshState,
    token: &str,
) -> Result<(Reviewed, PodInfo), GrantError> {
    let reviewed = review(client.clone(), token).await?;
    let pod_name = reviewed.pod_name.clone().unwrap_or_default();
    let key = (reviewed.namespace.clone(), pod_name.clone());
    let info = match state.pods.get(&key).filter(|p| p.ip.is_some()) {
        Some(info) => info.clone(),
        None => {
            let api: Api<Pod> = Api::namespaced(client, &reviewed.namespace);
            let pod = api
                .get_opt(&pod_name)
                .await
                .map_err(|e| GrantError::Api {
                    namespace: key.0.clone(),
                    pod: pod_name.clone(),
                    source: Box::new(e),
                })?
                .ok_or_else(|| GrantError::NoPod {
                    namespace: key.0.clone(),
                    pod: pod_name.clone(),
                })?;
            PodInfo {
                uid: pod.uid().unwrap_or_default(),
                service_account: reviewed.service_account.clone(),
                labels: pod.labels().clone(),
                ip: pod.status.as_ref().and_then(|s| s.pod_ip.clone()),
                node: None,
                zone: None,
                injected: crate::inject::is_injected(&pod),
                terminating: pod.metadata.deletion_timestamp.is_some(),
                workload: crate::inject::workload_name(&pod),
            }
        }
    };
    if let Some(want) = &reviewed.pod_uid {
        if !info.uid.is_empty() && &info.uid != want {
            return Err(GrantError::OtherPod {
                namespace: key.0,
                pod: pod_name,
                found: info.uid,
                want: want.clone(),
            });
        }
    }
    Ok((reviewed, info))
}

/// While `leading`, writes route status after each change of the state,
/// and every 30 s (a route another controller rewrote since).
pub async fn route_status(
    client: kube::Client,
    mut state: tokio::sync::watch::Receiver<std::sync::Arc<MeshState>>,
    leading: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if *leading.borrow() {
            let current = state.borrow_and_update().clone();
            let now = k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            let n = sync_route_status(client.clone(), &current, &now).await;
            if n > 0 {
                tracing::info!(routes = n, "wrote route status");
            }
        }
        let next = tokio::time::timeout(std::time::Duration::from_secs(30), state.changed());
        if let Ok(Err(_)) = next.await {
            return;
        }
    }
}

/// Writes Trellis's status on every HTTPRoute and GRPCRoute whose
/// parentRefs name a Service; returns how many were written. Errors are
/// logged per route: one route that cannot be written stops no other.
pub async fn sync_route_status(client: kube::Client, state: &MeshState, now: &str) -> usize {
    let mut written = 0;
    macro_rules! each {
        ($kind:ty, $name:literal) => {{
            let all: Api<$kind> = Api::all(client.clone());
            match all.list(&ListParams::default()).await {
                Ok(list) => {
                    for route in list.items {
                        let ns = route.namespace().unwrap_or_default();
                        let api: Api<$kind> = Api::namespaced(client.clone(), &ns);
                        let mut value = serde_json::to_value(&route).unwrap_or_default();
                        value["kind"] = $name.into();
                        match crate::status::write(&api, &value, state, now).await {
                            Ok(true) => written += 1,
                            Ok(false) => {}
                            Err(e) => warn!(error = %e, "route status not written"),
                        }
                    }
                }
                // A cluster without the Gateway API's CRDs has no routes.
                Err(kube::Error::Api(ae)) if ae.code == 404 => {}
                Err(e) => warn!(kind = $name, error = %e, "cannot list routes for their status"),
            }
        }};
    }
    each!(HttpRoute, "HTTPRoute");
    each!(GrpcRoute, "GRPCRoute");
    written
}
