//! The HTTP API (`docs/dev/contracts.md`), the metrics endpoint and a
//! minimal dashboard.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info, warn};
use trellis_resource::{Kind, LoadError, Resource, ResourceError, ResourceKey};

use crate::auth::{self, Auth, AuthError};
use crate::mesh_identity::MeshIdentity;
use crate::metrics::{ApplyResultLabel, Metrics};
use crate::stats::{parse_window, StatKind, Stats};
use crate::store::{Action, Store, StoreError};
use crate::xds::XdsHandle;

/// What errors name as the file when an apply came as a request body.
const BODY_FILE: &str = "request";
/// Room for a large mesh's resources in one apply, still bounded.
const MAX_APPLY_BYTES: usize = trellis_resource::limits::MAX_INPUT_BYTES;
/// Applies read, parse and validate at most this many at once, each on a
/// blocking thread: a flood of them can take neither every blocking thread
/// nor the memory of many 16 MiB bodies. The write itself is one at a time.
const APPLY_SLOTS: usize = 2;
/// How long an apply waits for a slot before it is told to retry.
const APPLY_SLOT_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{message}")]
    Invalid {
        message: String,
        details: Vec<ResourceError>,
    },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Internal(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl ApiError {
    fn invalid(what: &str, e: LoadError) -> Self {
        let n = e.errors.len();
        let message = if n == 1 {
            format!("{what} refused: {}", e.errors[0])
        } else {
            format!("{what} refused: {n} errors")
        };
        ApiError::Invalid {
            message,
            details: e.errors,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) | ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            // etcd without a majority: the request may succeed later.
            ApiError::Store(e) if e.is_unavailable() => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Store(StoreError::Conflict) => StatusCode::CONFLICT,
            ApiError::Internal(_) | ApiError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            warn!(error = %self, "API request failed");
        }
        let details = match &self {
            ApiError::Invalid { details, .. } => details.clone(),
            _ => Vec::new(),
        };
        let body = json!({"error": self.to_string(), "details": details});
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Everything the handlers share.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

/// What `router` serves from.
pub struct AppDeps {
    pub store: Arc<dyn Store>,
    pub xds: XdsHandle,
    pub stats: Arc<Stats>,
    pub metrics: Arc<Metrics>,
    pub observers: crate::xds::Observers,
    pub identity: Arc<MeshIdentity>,
    pub auth: Arc<Auth>,
    /// Where the API listens.
    pub bind: SocketAddr,
    /// Names besides loopback and the bound IP that clients use (`--http-host`).
    pub hosts: Vec<String>,
}

struct Inner {
    deps: AppDeps,
    /// Applies and deletes validate against the store, then write it: one
    /// at a time, so that nothing changes in between.
    write_lock: tokio::sync::Mutex<()>,
    /// See `APPLY_SLOTS`.
    apply_slots: tokio::sync::Semaphore,
}

impl AppState {
    pub fn new(deps: AppDeps) -> Self {
        AppState {
            inner: Arc::new(Inner {
                deps,
                write_lock: tokio::sync::Mutex::new(()),
                apply_slots: tokio::sync::Semaphore::new(APPLY_SLOTS),
            }),
        }
    }

    pub(crate) fn observers(&self) -> &crate::xds::Observers {
        &self.inner.deps.observers
    }

    pub(crate) fn stats(&self) -> &Stats {
        &self.inner.deps.stats
    }

    pub(crate) fn xds(&self) -> &XdsHandle {
        &self.inner.deps.xds
    }

    pub(crate) fn store(&self) -> &Arc<dyn Store> {
        &self.inner.deps.store
    }

    pub(crate) fn identity(&self) -> &MeshIdentity {
        &self.inner.deps.identity
    }

    pub(crate) fn auth(&self) -> &Auth {
        &self.inner.deps.auth
    }
}

/// Every route of the HTTP API, the identity routes included, behind one
/// guard (`guard`): Host and Origin checks, then the credential the route
/// needs (`auth::access`).
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(crate::observe_api::index))
        .route("/dashboard.js", get(crate::observe_api::dashboard_js))
        .route("/dashboard.css", get(crate::observe_api::dashboard_css))
        .route("/api/v1/traces", get(crate::observe_api::list_traces))
        .route("/api/v1/traces/{id}", get(crate::observe_api::get_trace))
        .route(
            "/v1/traces",
            axum::routing::post(crate::observe_api::otlp_traces)
                .layer(DefaultBodyLimit::max(crate::observe_api::MAX_OTLP_BYTES)),
        )
        .route("/api/v1/edges", get(crate::observe_api::edges))
        .route("/api/v1/tap", get(crate::observe_api::tap))
        .route("/healthz", get(ok))
        .route("/readyz", get(ok))
        .route("/metrics", get(metrics))
        .route("/api/v1/apply", axum::routing::post(apply))
        .route("/api/v1/resources/{kind}", get(list_resources))
        .route(
            "/api/v1/resources/{kind}/{namespace}/{name}",
            get(get_resource).delete(delete_resource),
        )
        .route("/api/v1/services", get(services))
        .route("/api/v1/proxies", get(proxies))
        .route("/api/v1/stat", get(stat))
        .route("/api/v1/prometheus/targets", get(prometheus_targets))
        .merge(crate::identity_api::routes())
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::NotFound("no such route: see docs/control-plane.md for the HTTP API".into())
}

/// Where a request came from, for the logs of refusals.
#[derive(Clone, Copy, Debug)]
pub struct ClientAddr(pub SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, crate::https::TlsListener>,
    > for ClientAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, crate::https::TlsListener>) -> Self {
        ClientAddr(*s.remote_addr())
    }
}

/// Security headers on every answer; then, in order: the Host check (a
/// DNS-rebinding page reaches this server under its own name), the Origin
/// check on writes (a page of another origin), and the credential the
/// route needs.
async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let deps = &state.inner.deps;
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|m| m.as_str().to_string());
    let client = req
        .extensions()
        .get::<axum::extract::ConnectInfo<ClientAddr>>()
        .map(|c| c.0 .0.to_string())
        .unwrap_or_default();
    // HTTP/2 clients (the kubelet's HTTPS probes) send `:authority`, not Host.
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or(authority.as_deref())
        .unwrap_or("");
    let mut refused = (!host_allowed(host, deps.bind, &deps.hosts)).then(|| {
        format!(
            "host {host:?} is not allowed: use http://localhost:{}/ (or a name given with --http-host)",
            deps.bind.port()
        )
    });
    if refused.is_none() && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS) {
        // The CLI sends no Origin; browsers always do on writes.
        if let Some(origin) = req.headers().get(header::ORIGIN) {
            let origin = origin.to_str().unwrap_or("");
            if !origin_allowed(origin, deps.bind, &deps.hosts) {
                refused = Some(format!(
                    "requests from origin {origin:?} are not allowed: use the trellis CLI, or the dashboard on this server"
                ));
            }
        }
    }
    let mut resp = if let Some(msg) = refused {
        warn!(%msg, path = %req.uri().path(), %client, "refused a request");
        ApiError::Forbidden(msg).into_response()
    } else {
        match auth::access(req.method(), route.as_deref()) {
            auth::Access::Public => next.run(req).await,
            auth::Access::Needs(needed) => {
                let header = req
                    .headers()
                    .get(header::AUTHORIZATION)
                    .and_then(|h| h.to_str().ok());
                let checked = match deps.auth.verify(header).await {
                    Ok(who) if who.role >= needed => Ok(who),
                    Ok(who) => Err(AuthError::Forbidden {
                        id: who.id,
                        has: who.role,
                        needed,
                    }),
                    Err(e) => Err(e),
                };
                match checked {
                    Ok(who) => {
                        req.extensions_mut().insert(who);
                        next.run(req).await
                    }
                    Err(e) => {
                        deps.auth.failed(&e);
                        warn!(
                            method = %req.method(),
                            route = route.as_deref().unwrap_or(req.uri().path()),
                            needed = needed.as_str(),
                            reason = e.reason(),
                            %client,
                            "refused a credential"
                        );
                        auth_refusal(e)
                    }
                }
            }
        }
    };
    security_headers(resp.headers_mut());
    resp
}

/// The headers every answer of the API and the dashboard carries (also
/// those of `trellis dashboard`'s local server): no sniffing, no framing,
/// no referrer, no caching, and a CSP that allows the page's own script
/// and style only.
pub fn security_headers(h: &mut axum::http::HeaderMap) {
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("cache-control", HeaderValue::from_static("no-store"));
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        ),
    );
}

/// 401 with `WWW-Authenticate` for a missing or bad credential, 403 for a
/// good one with too weak a role.
fn auth_refusal(e: AuthError) -> Response {
    let status = match &e {
        AuthError::Forbidden { .. } => StatusCode::FORBIDDEN,
        AuthError::Store(_) | AuthError::Corrupt(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::UNAUTHORIZED,
    };
    let mut resp = (status, Json(json!({"error": e.to_string(), "details": []}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        let challenge = match e {
            AuthError::Missing => r#"Bearer realm="trellis""#,
            _ => r#"Bearer realm="trellis", error="invalid_token""#,
        };
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    resp
}

/// Whether a Host header (`name[:port]`) names this server safely: a
/// loopback name, the bound address, (when bound to every interface) any
/// IP literal, or a name the operator listed. A rebinding attack needs a
/// DNS name of its own, so IP literals are never one.
pub fn host_allowed(host: &str, bind: SocketAddr, names: &[String]) -> bool {
    let name = strip_port(host.trim()).to_ascii_lowercase();
    if name.is_empty() {
        return false;
    }
    if name == "localhost" || name == "127.0.0.1" || name == "[::1]" {
        return true;
    }
    if names
        .iter()
        .any(|n| n.eq_ignore_ascii_case(name.trim_start_matches('[').trim_end_matches(']')))
    {
        return true;
    }
    let ip: Option<IpAddr> = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(&name)
        .parse()
        .ok();
    match ip {
        Some(ip) => bind.ip().is_unspecified() || ip == bind.ip(),
        None => false,
    }
}

fn origin_allowed(origin: &str, bind: SocketAddr, names: &[String]) -> bool {
    let rest = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    rest.is_some_and(|host| host_allowed(host, bind, names))
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        // [v6]:port
        match host.find(']') {
            Some(end) => &host[..=end],
            None => host,
        }
    } else if host.matches(':').count() == 1 {
        host.split(':').next().unwrap_or(host)
    } else {
        host
    }
}

async fn ok() -> &'static str {
    "ok"
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.inner.deps.metrics.encode(),
    )
}

async fn apply(
    State(state): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let s = &state.inner;
    // Parsed by hand so that a bad value gets a JSON error like the rest.
    let dry_run = match q.get("dryRun").map(|v| v.to_ascii_lowercase()).as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") | Some("") => true,
        Some(other) => {
            return Err(ApiError::BadRequest(format!(
                "dryRun={other:?}: use true or false"
            )))
        }
    };
    let result = apply_slot(s, dry_run, body).await;
    s.deps.metrics.apply(match &result {
        Ok(_) if dry_run => ApplyResultLabel::DryRun,
        Ok(_) => ApplyResultLabel::Success,
        Err(ApiError::Store(_) | ApiError::Internal(_) | ApiError::Busy(_)) => {
            ApplyResultLabel::Error
        }
        Err(_) => ApplyResultLabel::Invalid,
    });
    result
}

/// Takes an apply slot, then reads the body: one waiting apply holds no
/// body in memory.
async fn apply_slot(s: &Inner, dry_run: bool, body: axum::body::Body) -> ApiResult<Json<Value>> {
    let _slot = tokio::time::timeout(APPLY_SLOT_WAIT, s.apply_slots.acquire())
        .await
        .map_err(|_| {
            ApiError::Busy(format!(
                "{APPLY_SLOTS} applies are being processed and this one waited {}s: retry later",
                APPLY_SLOT_WAIT.as_secs()
            ))
        })?
        .map_err(|_| ApiError::Busy("the control plane is shutting down".into()))?;
    let body =
        http_body_util::BodyExt::collect(http_body_util::Limited::new(body, MAX_APPLY_BYTES))
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ApiError::TooLarge(format!(
                    "the body is over the limit of {MAX_APPLY_BYTES} bytes (16 MiB) for one apply: \
                     apply the resources in parts"
                ))
                } else {
                    ApiError::BadRequest(format!("cannot read the body: {e}"))
                }
            })?
            .to_bytes();
    apply_inner(s, dry_run, body).await
}

/// Runs CPU-bound work on a blocking thread, off the async workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("an apply failed unexpectedly: {e}")))
}

async fn apply_inner(s: &Inner, dry_run: bool, body: Bytes) -> ApiResult<Json<Value>> {
    // One parser for JSON and YAML (JSON is YAML), so errors carry field
    // paths and lines either way; Content-Type need not be exact.
    let (parsed, is_json) = blocking(move || {
        let text = std::str::from_utf8(&body)
            .map_err(|_| ApiError::BadRequest("the body is not UTF-8 text".into()))?;
        let parsed = trellis_resource::parse_documents_with_sources(BODY_FILE, text)
            .map_err(|e| ApiError::invalid("apply", e))?;
        Ok::<_, ApiError>((parsed, text.trim_start().starts_with(['[', '{'])))
    })
    .await??;
    if parsed.is_empty() {
        return Err(ApiError::BadRequest(
            "nothing to apply: send a JSON array of resources or YAML documents".into(),
        ));
    }
    let (resources, mut sources): (Vec<Resource>, Vec<_>) = parsed.into_iter().unzip();
    // The items of a JSON array all come from "document 1"; without
    // sources, validation names each resource instead, which says more.
    if is_json {
        sources.clear();
    }

    let _write = s.write_lock.lock().await;
    let (existing, revision) = stored_resources(s).await?;
    let (resources, sources, existing) = blocking(move || {
        trellis_resource::validate_apply(&resources, &sources, &existing)
            .map(|()| (resources, sources, existing))
            .map_err(|e| ApiError::invalid("apply", e))
    })
    .await??;
    check_budget(s, &resources, &sources).await?;

    if dry_run {
        let results: Vec<Value> = resources
            .iter()
            .map(|r| {
                let key = r.key();
                let action = match existing.iter().find(|e| e.key() == key) {
                    None => Action::Created,
                    Some(old) if same_resource(old, r) => Action::Unchanged,
                    Some(_) => Action::Configured,
                };
                result_json(&key, action)
            })
            .collect();
        return Ok(Json(
            json!({"revision": revision, "dryRun": true, "results": results}),
        ));
    }

    // Refused if another replica changed the resources since they were
    // validated against (`revision`).
    let outcome = s.deps.store.apply_since(resources, revision).await?;
    let changed = outcome
        .results
        .iter()
        .filter(|r| r.action != Action::Unchanged)
        .count();
    info!(
        revision = outcome.revision,
        changed,
        total = outcome.results.len(),
        "applied"
    );
    let results: Vec<Value> = outcome
        .results
        .iter()
        .map(|r| result_json(&r.key, r.action))
        .collect();
    Ok(Json(
        json!({"revision": outcome.revision, "results": results}),
    ))
}

/// How long a write waits for the xds actor to see every change committed
/// before it (`stored_resources`); it reads the store itself after that.
const ACTOR_CATCH_UP: Duration = Duration::from_secs(1);

/// The stored resources a write validates against, and the revision they
/// are at. They are the xds actor's, once it has seen every change
/// committed so far (the store's revision now), as Kubernetes' API server
/// serves a consistent list from its watch cache: the same as reading the
/// store, without fetching and decoding every resource on each write. When
/// the actor lags (it is reading the whole store, or stopped), the store
/// is read.
async fn stored_resources(s: &Inner) -> ApiResult<(Arc<Vec<Arc<Resource>>>, u64)> {
    let now = s.deps.store.revision().await?;
    if let Some(found) = s.deps.xds.resources_at(now, ACTOR_CATCH_UP).await {
        return Ok(found);
    }
    debug!(
        revision = now,
        "the xds actor lags the store; reading the resources from the store"
    );
    let (list, revision) = s.deps.store.list(None).await?;
    Ok((Arc::new(list.into_iter().map(Arc::new).collect()), revision))
}

/// Refuses an apply that would push a connected proxy's Config over the
/// budget (`trellis_api::CONFIG_BUDGET_BYTES`), naming the resource to
/// shrink: sending such a Config would fail the proxy's decoding.
async fn check_budget(
    s: &Inner,
    resources: &[Resource],
    sources: &[trellis_resource::Source],
) -> ApiResult<()> {
    let breaches = s.deps.xds.check_budget(resources.to_vec()).await;
    let mut errors: Vec<ResourceError> = Vec::new();
    let mut named = std::collections::BTreeSet::new();
    for b in &breaches {
        if !named.insert(b.part.what.clone()) {
            continue;
        }
        let others = breaches
            .iter()
            .filter(|o| o.part.what == b.part.what)
            .count()
            - 1;
        let at = b
            .part
            .key
            .as_ref()
            .and_then(|k| resources.iter().position(|r| &r.key() == k));
        let (file, document, line) = match at.and_then(|i| sources.get(i)) {
            Some(src) => (src.file.clone(), src.document, src.line),
            None => (b.part.what.clone(), 0, None),
        };
        errors.push(ResourceError {
            file,
            document,
            line,
            field: String::new(),
            reason: format!(
                "{} ({} bytes as sent) would make the Config of proxy {} ({}/{}){} {} bytes, over \
                 the budget of {} bytes (2 MiB) for one proxy's Config: make it smaller, or split it",
                b.part.what,
                b.part.bytes,
                b.instance,
                b.namespace,
                b.workload,
                if others > 0 {
                    format!(" and {others} other proxies")
                } else {
                    String::new()
                },
                b.bytes,
                trellis_api::CONFIG_BUDGET_BYTES,
            ),
        });
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::invalid("apply", LoadError { errors }))
    }
}

fn same_resource(a: &Resource, b: &Resource) -> bool {
    serde_json::to_value(a).ok() == serde_json::to_value(b).ok()
}

fn result_json(key: &ResourceKey, action: Action) -> Value {
    json!({"kind": key.kind.as_str(), "namespace": key.namespace, "name": key.name, "action": action})
}

fn parse_kind(s: &str) -> ApiResult<Kind> {
    Kind::parse_loose(s).ok_or_else(|| {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        ApiError::NotFound(format!(
            "unknown kind {s:?}: use one of {}",
            known.join(", ")
        ))
    })
}

fn key_from_path(kind: &str, namespace: &str, name: &str) -> ApiResult<ResourceKey> {
    let kind = parse_kind(kind)?;
    Ok(ResourceKey {
        kind,
        // Cluster-wide kinds are stored without one; the URL may hold `-`.
        namespace: if kind.namespaced() {
            namespace.to_string()
        } else {
            String::new()
        },
        name: name.to_string(),
    })
}

#[derive(Debug, Deserialize)]
struct NamespaceQuery {
    namespace: Option<String>,
}

async fn list_resources(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    Query(q): Query<NamespaceQuery>,
) -> ApiResult<Json<Value>> {
    let kind = parse_kind(&kind)?;
    let (mut items, _) = state.store().list(Some(kind)).await?;
    if let (Some(ns), true) = (q.namespace.as_deref(), kind.namespaced()) {
        items.retain(|r| r.metadata.namespace == ns);
    }
    Ok(Json(json!({"items": items})))
}

async fn get_resource(
    State(state): State<AppState>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Resource>> {
    let key = key_from_path(&kind, &namespace, &name)?;
    match state.store().get(&key).await? {
        Some(r) => Ok(Json(r)),
        None => Err(ApiError::NotFound(format!("{key} not found"))),
    }
}

async fn delete_resource(
    State(state): State<AppState>,
    Path((kind, namespace, name)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let s = &state.inner;
    let key = key_from_path(&kind, &namespace, &name)?;
    let _write = s.write_lock.lock().await;
    let (all, seen) = stored_resources(s).await?;
    if !all.iter().any(|r| r.key() == key) {
        return Err(ApiError::NotFound(format!("{key} not found")));
    }
    let remaining: Vec<&Resource> = all
        .iter()
        .map(|r| &**r)
        .filter(|r| r.key() != key)
        .collect();
    trellis_resource::validate_delete(&key, &remaining)
        .map_err(|e| ApiError::invalid("delete", e))?;
    let revision = s
        .deps
        .store
        .delete_since(&key, seen)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("{key} not found")))?;
    info!(%key, revision, "deleted");
    Ok(Json(json!({
        "deleted": {"kind": key.kind.as_str(), "namespace": key.namespace, "name": key.name},
        "revision": revision,
    })))
}

async fn services(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let (svcs, _) = state.store().list(Some(Kind::Service)).await?;
    let snap = state.xds().snapshot();
    let out: Vec<Value> = svcs
        .iter()
        .filter_map(|r| Some((r, r.as_service()?)))
        .map(|(r, spec)| {
            let ns = &r.metadata.namespace;
            let mut endpoints: Vec<Value> = snap
                .endpoints
                .iter()
                .filter(|p| p.selected_by(ns, &spec.selector))
                .map(|p| {
                    json!({
                        "address": p.inbound_addr, "instance": p.instance,
                        "workload": p.workload, "namespace": p.namespace,
                        "identity": p.identity(&snap.trust_domain), "labels": p.labels,
                    })
                })
                .collect();
            endpoints.sort_by(|a, b| a["address"].as_str().cmp(&b["address"].as_str()));
            json!({
                "namespace": ns, "name": r.metadata.name,
                "vip": snap.vips.get(&crate::registry::ServiceName::new(ns, &r.metadata.name))
                    .map(|v| v.to_string()).unwrap_or_default(),
                "ports": spec.ports, "endpoints": endpoints,
            })
        })
        .collect();
    Ok(Json(Value::Array(out)))
}

async fn proxies(State(state): State<AppState>) -> Json<Value> {
    let snap = state.xds().snapshot();
    let out: Vec<Value> = snap
        .proxies
        .iter()
        .map(|p| {
            let mut v = serde_json::to_value(&**p).unwrap_or_default();
            v["connectedSeconds"] = json!(p.connected_at.elapsed().as_secs());
            v
        })
        .collect();
    Json(Value::Array(out))
}

#[derive(Debug, Deserialize)]
struct StatQuery {
    kind: Option<String>,
    window: Option<String>,
}

async fn stat(State(state): State<AppState>, Query(q): Query<StatQuery>) -> ApiResult<Json<Value>> {
    let bad = |e: crate::stats::StatsError| ApiError::BadRequest(e.to_string());
    let kind = StatKind::parse(q.kind.as_deref().unwrap_or("service")).map_err(bad)?;
    let window = match q.window.as_deref() {
        Some(w) => parse_window(w).map_err(bad)?,
        None => Duration::from_secs(30),
    };
    let rows = state.stats().query(kind, window);
    Ok(Json(
        json!({"windowSeconds": window.as_secs(), "rows": rows}),
    ))
}

async fn prometheus_targets(State(state): State<AppState>) -> Json<Value> {
    let snap = state.xds().snapshot();
    // Every proxy of the mesh, whichever replica holds its stream.
    let out: Vec<Value> = snap
        .endpoints
        .iter()
        .filter(|p| !p.admin_addr.is_empty())
        .map(|p| {
            json!({
                "targets": [p.admin_addr],
                "labels": {
                    "__metrics_path__": "/metrics",
                    "workload": p.workload,
                    "namespace": p.namespace,
                    "instance": p.instance,
                },
            })
        })
        .collect();
    Json(Value::Array(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        let local: SocketAddr = "127.0.0.1:15080".parse().unwrap();
        let none: &[String] = &[];
        assert!(host_allowed("localhost:15080", local, none));
        assert!(host_allowed("127.0.0.1:15080", local, none));
        assert!(host_allowed("[::1]:15080", local, none));
        assert!(host_allowed("LOCALHOST", local, none));
        assert!(!host_allowed("evil.example:15080", local, none));
        assert!(!host_allowed("10.1.2.3:15080", local, none));
        assert!(!host_allowed("", local, none));
        let any: SocketAddr = "0.0.0.0:15080".parse().unwrap();
        assert!(host_allowed("10.1.2.3:15080", any, none));
        assert!(!host_allowed("evil.example", any, none));
        let named = ["cp.example".to_string()];
        assert!(host_allowed("CP.example:15080", any, &named));
        assert!(!host_allowed("evil.example", any, &named));
        let v6: SocketAddr = "[fd00::1]:15080".parse().unwrap();
        assert!(host_allowed("[fd00::1]:15080", v6, none));
        assert!(origin_allowed("http://localhost:15080", local, none));
        assert!(!origin_allowed("http://evil.example:15080", local, none));
        assert!(!origin_allowed("null", local, none));
    }
}
