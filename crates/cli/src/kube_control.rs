//! `trellis control --kubernetes`: the same control plane as on a host,
//! with the API server as its source. This module only glues trellis-k8s
//! to it:
//!
//! - the CA comes from the Secret `trellis-ca` (made by the first replica);
//! - the source's resources are synced into the replica's own store, and
//!   its endpoints and ClusterIPs go to the registry as its endpoint
//!   source, so one code path computes every proxy's config;
//! - sidecars' ServiceAccount tokens are reviewed by the API server
//!   (TokenReview) and grant their pod's identity, labels and IP;
//! - the injection webhook is served over HTTPS with a certificate from
//!   the mesh CA, whose roots every replica keeps in the webhook's
//!   `caBundle`;
//! - the Lease holder writes route status;
//! - the CLI's tokens (of the `trellis-viewer`/`trellis-tap` accounts) are
//!   reviewed by the API server and grant the HTTP API's viewer/tap role,
//!   and every replica keeps the CA's public roots in a ConfigMap for it.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{info, warn};
use trellis_control::auth::Role;
use trellis_control::registry::ServiceName;
use trellis_control::ControlPlane;
use trellis_identity::token::Claims;
use trellis_k8s::inject::InjectConfig;
use trellis_k8s::names::{DEFAULT_NAMESPACE, WEBHOOK_SERVICE};
use trellis_k8s::source::MeshState;

use crate::cli::{ControlArgs, Global};

/// How often every replica checks the webhook's caBundle.
const CA_BUNDLE_EVERY: Duration = Duration::from_secs(30);
/// How often every replica looks for a change of the CA's roots.
const CA_BUNDLE_CHANGED: Duration = Duration::from_secs(1);

/// Reviews sidecars' tokens with the API server.
struct Reviewer {
    client: kube::Client,
    state: watch::Receiver<Arc<MeshState>>,
}

#[tonic::async_trait]
impl trellis_control::mesh_identity::ExternalTokens for Reviewer {
    async fn review(&self, token: &str) -> Result<Claims, tonic::Status> {
        let state = self.state.borrow().clone();
        let (reviewed, pod) = trellis_k8s::control::grant(self.client.clone(), &state, token)
            .await
            .map_err(|e| {
                warn!(error = %e, "refused a sidecar's token");
                tonic::Status::unauthenticated(e.to_string())
            })?;
        let pod_name = reviewed.pod_name.clone().unwrap_or_default();
        Ok(Claims {
            id: format!("pod:{}/{pod_name}", reviewed.namespace),
            namespace: reviewed.namespace,
            service_account: reviewed.service_account,
            labels: pod.labels,
            advertise_addr: pod.ip.and_then(|ip| ip.parse().ok()),
            exp: u64::MAX,
            ca: String::new(),
        })
    }
}

/// Reviews the CLI's tokens (`stat --kubernetes` and the others) with the
/// API server: a token of `trellis-viewer` or `trellis-tap` in the control
/// plane's namespace, audience `trellis-api`. A good answer is kept for
/// `REVIEW_CACHE` so a dashboard's polling costs one review a half-minute.
struct ApiReviewer {
    client: kube::Client,
    namespace: String,
    cache: std::sync::Mutex<std::collections::HashMap<String, (Instant, String, Role)>>,
}

const REVIEW_CACHE: Duration = Duration::from_secs(30);
const REVIEW_CACHE_ENTRIES: usize = 256;

#[tonic::async_trait]
impl trellis_control::auth::ExternalCredentials for ApiReviewer {
    async fn review(&self, token: &str) -> Result<(String, Role), String> {
        let now = Instant::now();
        if let Some((at, id, role)) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
        {
            if now.duration_since(*at) < REVIEW_CACHE {
                return Ok((id.clone(), *role));
            }
        }
        let (id, role) =
            trellis_k8s::identity::review_api(self.client.clone(), token, &self.namespace)
                .await
                .map_err(|e| e.to_string())?;
        let role = match role {
            trellis_k8s::identity::ApiRole::Viewer => Role::Viewer,
            trellis_k8s::identity::ApiRole::Tap => Role::Tap,
        };
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= REVIEW_CACHE_ENTRIES {
            cache.retain(|_, (at, _, _)| now.duration_since(*at) < REVIEW_CACHE);
            if cache.len() >= REVIEW_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(token.to_string(), (now, id.clone(), role));
        Ok((id, role))
    }
}

fn service_name((namespace, name): &(String, String)) -> ServiceName {
    ServiceName::new(namespace.clone(), name.clone())
}

/// Makes the replica's store hold exactly the source's resources: changed
/// ones are applied at once, removed ones deleted.
async fn sync_store(
    store: &dyn trellis_control::Store,
    want: &[trellis_resource::Resource],
) -> anyhow::Result<()> {
    let (have, _) = store.list(None).await?;
    let have: BTreeMap<_, _> = have.into_iter().map(|r| (r.key(), r)).collect();
    let want_keys: std::collections::BTreeSet<_> = want.iter().map(|r| r.key()).collect();
    let changed: Vec<_> = want
        .iter()
        .filter(|r| have.get(&r.key()) != Some(*r))
        .cloned()
        .collect();
    if !changed.is_empty() {
        store.apply(changed).await?;
    }
    for key in have.keys().filter(|k| !want_keys.contains(*k)) {
        store.delete(key).await?;
    }
    Ok(())
}

/// Follows the source: endpoints and VIPs first (so a new Service never
/// gets a VIP of the mesh's own before its ClusterIP), then resources.
/// Each state taken is sent on `applied`, which the replica's readiness
/// follows.
///
/// The channel's first value is an empty state, not the cluster's: it is
/// skipped. Taken, it deleted every resource from the store a restarted
/// container keeps (its data dir outlives it), and a proxy that came to
/// this replica before the first real state got a Config without them.
async fn follow(
    xds: trellis_control::xds::XdsHandle,
    store: Arc<dyn trellis_control::Store>,
    mut rx: watch::Receiver<Arc<MeshState>>,
    applied: watch::Sender<Arc<MeshState>>,
) {
    if rx.changed().await.is_err() {
        return;
    }
    loop {
        let state = rx.borrow_and_update().clone();
        let endpoints = state
            .endpoints
            .keys()
            .map(|k| (service_name(k), state.proxy_endpoints(k)))
            .collect();
        let vips = state
            .vips
            .iter()
            .map(|(k, ip)| (service_name(k), *ip))
            .collect();
        xds.set_external_endpoints(Arc::new(endpoints), Some(vips))
            .await;
        let synced = match sync_store(store.as_ref(), &state.resources).await {
            Ok(()) => store.revision().await.map_err(anyhow::Error::from),
            Err(e) => Err(e),
        };
        match synced {
            Ok(revision) => {
                xds.source_synced(revision).await;
                applied.send_replace(state);
            }
            Err(e) => {
                warn!(error = %e, "cannot take the cluster's resources; retrying on the next change")
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

pub async fn control(global: &Global, args: &ControlArgs) -> anyhow::Result<ExitCode> {
    let client = trellis_k8s::client::client(args.kubeconfig.as_deref()).await?;
    let namespace =
        std::env::var("TRELLIS_NAMESPACE").unwrap_or_else(|_| DEFAULT_NAMESPACE.to_string());
    let pod = std::env::var("TRELLIS_POD_NAME")
        .unwrap_or_else(|_| format!("trellis-control-{}", std::process::id()));

    let ca_dir = global.data_dir.join("ca");
    let made = trellis_k8s::ca_secret::bootstrap(client.clone(), &namespace, &ca_dir, |dir| {
        // What the Secret holds: the files a control plane reads on start
        // and moves into its store.
        if trellis_identity::ca::Ca::load_dir(dir)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            trellis_identity::ca::Ca::generate("trellis.local")
                .and_then(|ca| ca.write_dir(dir))
                .map_err(|e| e.to_string())?;
        }
        if trellis_identity::token::read_legacy(dir).0.is_none() {
            trellis_identity::token::write_legacy_key(
                dir,
                &trellis_identity::token::generate_key(),
            )
            .map_err(|e| e.to_string())?;
        }
        Ok(())
    })
    .await?;
    info!(?made, "mesh CA from Secret");

    let mut cfg = crate::servers::control_config(global, args)?;
    // Proxies get Configs once the cluster's state is in (`follow`).
    cfg.external_source = true;
    for host in [
        format!("{}.{namespace}.svc", trellis_k8s::names::CONTROL_SERVICE),
        format!(
            "{}.{namespace}.svc.cluster.local",
            trellis_k8s::names::CONTROL_SERVICE
        ),
    ] {
        cfg.http_hosts.push(host);
    }
    let cp = ControlPlane::start(cfg).await?;
    let identity = cp.identity();

    let (tx, rx) = watch::channel(Arc::new(MeshState::default()));
    identity.set_external(Arc::new(Reviewer {
        client: client.clone(),
        state: rx.clone(),
    }));
    cp.auth().set_external(Arc::new(ApiReviewer {
        client: client.clone(),
        namespace: namespace.clone(),
        cache: Default::default(),
    }));
    let source = tokio::spawn(trellis_k8s::source::run(client.clone(), tx));
    // Ready (the webhook's /ready) once the replica took the cluster's
    // state: before, a proxy sent here would get a Config without it.
    let (applied_tx, applied_rx) = watch::channel(Arc::new(MeshState::default()));
    tokio::spawn(follow(cp.xds(), cp.store(), rx.clone(), applied_tx));

    let (lead_tx, lead_rx) = watch::channel(false);
    tokio::spawn(trellis_k8s::lease::run(
        client.clone(),
        trellis_k8s::lease::LeaseConfig::new(namespace.clone(), pod.clone()),
        lead_tx,
    ));
    tokio::spawn(trellis_k8s::control::route_status(
        client.clone(),
        rx.clone(),
        lead_rx,
    ));

    // The webhook: HTTPS with a certificate for its Service's names.
    let image = std::env::var(trellis_k8s::names::PROXY_IMAGE_ENV).context(
        "TRELLIS_PROXY_IMAGE is not set: the injected sidecar's image (`trellis install` sets it)",
    )?;
    let mut inject = InjectConfig::new(image, namespace.clone());
    inject.ca_pin = Some(identity.pin());
    let names: Vec<String> = [
        WEBHOOK_SERVICE.to_string(),
        format!("{WEBHOOK_SERVICE}.{namespace}"),
        format!("{WEBHOOK_SERVICE}.{namespace}.svc"),
        format!("{WEBHOOK_SERVICE}.{namespace}.svc.cluster.local"),
    ]
    .into();
    // Follows the mesh CA (rotation, retire), as the proxy API's does.
    let tls =
        trellis_control::https::mesh_ca_config(identity.clone(), names, &[b"h2", b"http/1.1"])?;
    let listener = tokio::net::TcpListener::bind(args.webhook_addr)
        .await
        .with_context(|| format!("cannot listen on --webhook-addr {}", args.webhook_addr))?;
    let listener = trellis_control::https::TlsListener::new(listener, tls)?;
    let app =
        trellis_k8s::webhook::router(Arc::new(inject), Arc::new(applied_rx), Some(client.clone()));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            warn!(error = %e, "the injection webhook stopped");
        }
    });

    let ca_client = client.clone();
    let roots_namespace = namespace.clone();
    let ca = identity.clone();
    tokio::spawn(async move {
        loop {
            // Read each round: a CA rotation changes the roots.
            let bundle = ca.bundle().concat();
            if let Err(e) = trellis_k8s::webhook::ensure_ca_bundle(ca_client.clone(), &bundle).await
            {
                warn!(error = %e, "cannot keep the webhook's caBundle");
            }
            if let Err(e) = trellis_k8s::ca_secret::ensure_roots_config_map(
                ca_client.clone(),
                &roots_namespace,
                &bundle,
            )
            .await
            {
                warn!(error = %e, "cannot keep the ConfigMap of the CA's roots");
            }
            // Sooner when the roots change: the webhook's certificate
            // follows a rotation at its next handshake, and the API
            // server must trust the new root by then.
            let until = tokio::time::Instant::now() + CA_BUNDLE_EVERY;
            while tokio::time::Instant::now() < until && ca.bundle().concat() == bundle {
                tokio::time::sleep(CA_BUNDLE_CHANGED).await;
            }
        }
    });

    info!(http = %cp.http_addr, grpc = %cp.grpc_addr, webhook = %args.webhook_addr, %namespace, %pod, "control plane serving on Kubernetes; SIGTERM stops it");
    tokio::select! {
        _ = crate::signals::shutdown() => {}
        r = source => match r {
            Ok(Err(e)) => warn!(error = %e, "the Kubernetes source failed"),
            _ => warn!("the Kubernetes source stopped"),
        },
    }
    info!("shutting down");
    cp.shutdown().await;
    Ok(ExitCode::SUCCESS)
}
