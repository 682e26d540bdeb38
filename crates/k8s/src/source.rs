//! The API server as a mesh source: one reflector (watch + in-memory store)
//! per kind, and on every change (coalesced), the translation of all of
//! them into a [`MeshState`] published on a `watch` channel. The control
//! plane feeds that state to the same registry that universal mode feeds
//! from its store (see `model` for the seam).
//!
//! Kinds whose CRD the cluster lacks (the Gateway API's, or Trellis's before
//! `install --crds`) are not watched, and say so in the log; everything
//! else works without them.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use gateway_api::grpcroutes::GrpcRoute;
use gateway_api::httproutes::HttpRoute;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::{watch, Notify};
use tracing::{info, warn};

use crate::crd::{AuthorizationPolicy, Mesh, TrafficPolicy};

mod model;
mod translate;

pub use model::{EndpointInfo, MeshState, PodInfo, Rejected, ServiceRef};
pub use translate::{translate, Inputs};

/// Changes closer together than this are translated once.
const COALESCE: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot list {kind} on the API server: {source}; does the control plane's ClusterRole allow it?")]
    List {
        kind: &'static str,
        source: kube::Error,
    },
}

/// A reflector's store, or nothing when the cluster lacks the kind.
struct Watched<K: Resource + 'static>
where
    K::DynamicType: std::hash::Hash + Eq,
{
    store: Option<Store<K>>,
}

impl<K> Watched<K>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone,
{
    fn all(&self) -> Vec<Arc<K>> {
        self.store.as_ref().map(Store::state).unwrap_or_default()
    }
}

/// Starts watching `K` cluster-wide (if `optional`, only when the cluster
/// serves it); every change wakes `changed`.
async fn watch_kind<K>(
    client: &Client,
    kind: &'static str,
    optional: bool,
    changed: Arc<Notify>,
) -> Result<Watched<K>, SourceError>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + std::hash::Hash + Eq + Clone,
{
    let api: Api<K> = Api::all(client.clone());
    if let Err(e) = api.list_metadata(&ListParams::default().limit(1)).await {
        let absent = matches!(&e, kube::Error::Api(ae) if ae.code == 404);
        if optional && absent {
            warn!(kind, "the cluster does not serve {kind}: not watched (`trellis install --crds` installs it)");
            return Ok(Watched { store: None });
        }
        return Err(SourceError::List { kind, source: e });
    }
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default())
            .default_backoff()
            // Nobody reads managedFields; at cluster scale they are most of
            // each object's size.
            .modify(|o: &mut K| o.managed_fields_mut().clear()),
    );
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => changed.notify_one(),
                Err(e) => warn!(kind, error = %e, "watch failed; retrying with backoff"),
            }
        }
    });
    reader.wait_until_ready().await.ok();
    info!(kind, objects = reader.state().len(), "watching");
    Ok(Watched {
        store: Some(reader),
    })
}

/// Watches the cluster and publishes its [`MeshState`] on `tx` after the
/// first full listing of every kind and after each change. Runs until `tx`
/// has no receiver left.
pub async fn run(client: Client, tx: watch::Sender<Arc<MeshState>>) -> Result<(), SourceError> {
    let changed = Arc::new(Notify::new());
    let c = || changed.clone();
    let namespaces = watch_kind::<Namespace>(&client, "Namespace", false, c()).await?;
    let services = watch_kind::<Service>(&client, "Service", false, c()).await?;
    let slices = watch_kind::<EndpointSlice>(&client, "EndpointSlice", false, c()).await?;
    let pods = watch_kind::<Pod>(&client, "Pod", false, c()).await?;
    let nodes = watch_kind::<Node>(&client, "Node", false, c()).await?;
    let meshes = watch_kind::<Mesh>(&client, "Mesh", true, c()).await?;
    let tps = watch_kind::<TrafficPolicy>(&client, "TrafficPolicy", true, c()).await?;
    let aps = watch_kind::<AuthorizationPolicy>(&client, "AuthorizationPolicy", true, c()).await?;
    let http = watch_kind::<HttpRoute>(&client, "HTTPRoute", true, c()).await?;
    let grpc = watch_kind::<GrpcRoute>(&client, "GRPCRoute", true, c()).await?;
    loop {
        let inputs = Inputs {
            namespaces: namespaces.all(),
            services: services.all(),
            endpoint_slices: slices.all(),
            pods: pods.all(),
            nodes: nodes.all(),
            meshes: meshes.all(),
            traffic_policies: tps.all(),
            authorization_policies: aps.all(),
            http_routes: http.all(),
            grpc_routes: grpc.all(),
        };
        let state = translate(&inputs);
        for r in &state.rejected {
            if !tx.borrow().rejected.contains(r) {
                warn!(object = %r.object, reason = %r.reason, "not used by the mesh");
            }
        }
        tx.send_if_modified(|old| {
            if **old == state {
                false
            } else {
                *old = Arc::new(state);
                true
            }
        });
        if tx.is_closed() {
            return Ok(());
        }
        changed.notified().await;
        tokio::time::sleep(COALESCE).await;
    }
}

/// The webhook reads namespace labels from the published state.
impl crate::webhook::NamespaceLabels for watch::Receiver<Arc<MeshState>> {
    fn labels(&self, namespace: &str) -> Option<std::collections::BTreeMap<String, String>> {
        self.borrow().namespace_labels.get(namespace).cloned()
    }

    /// Every cluster has namespaces: none means not read yet.
    fn synced(&self) -> bool {
        !self.borrow().namespace_labels.is_empty()
    }
}

/// A namespaced object's `namespace/name`, for logs.
pub fn object_name(o: &impl ResourceExt) -> String {
    format!("{}/{}", o.namespace().unwrap_or_default(), o.name_any())
}
