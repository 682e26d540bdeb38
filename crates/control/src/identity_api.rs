//! HTTP API of tokens and the CA (admin only, but `GET /api/v1/ca`):
//!
//! - `POST /api/v1/tokens` `{role, ttl}` → an API token; `{namespace,
//!   serviceAccount, labels, advertiseAddr, ttl}` → a proxy's join token
//! - `GET /api/v1/tokens` → ids, kinds, roles or grants, expiry
//! - `DELETE /api/v1/tokens/{id}` → revokes either kind
//! - `GET /api/v1/ca` → the trust bundle and its fingerprints
//! - `POST /api/v1/ca/rotate`, `POST /api/v1/ca/retire` → root rotation
//!
//! Tokens are secrets: they are returned once and never logged. These
//! writes also refuse any request that carries an `Origin` header, so that
//! no web page can mint tokens through a user's browser.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde_json::json;
use trellis_identity::token::Grant;

use crate::auth::{JoinToken, Principal, Role};
use crate::http::AppState;

/// Join tokens live a day unless asked otherwise; so do API tokens.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/tokens", post(create_token).get(list_tokens))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/ca", get(ca))
        .route("/api/v1/ca/rotate", post(rotate))
        .route("/api/v1/ca/retire", post(retire))
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into(), "details": []}))).into_response()
}

/// The refusal for a request from a web page (it carries `Origin`).
fn refuse_browsers(headers: &HeaderMap) -> Option<Response> {
    headers.contains_key(axum::http::header::ORIGIN).then(|| {
        error(
            StatusCode::FORBIDDEN,
            "requests from web pages may not manage identities: use the trellis CLI",
        )
    })
}

/// Either an API token (`role`) or a join token (`namespace` and
/// `serviceAccount`, with the labels and address it grants).
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenRequest {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    advertise_addr: Option<IpAddr>,
    /// Duration such as `24h` (default 24h).
    #[serde(default)]
    ttl: Option<String>,
    #[serde(default)]
    description: Option<String>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn create_token(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    body: Json<TokenRequest>,
) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    let ttl = match body.ttl.as_deref().map(trellis_resource::parse_duration) {
        None => DEFAULT_TTL,
        Some(Ok(d)) if d >= Duration::from_secs(1) => d,
        Some(Ok(_)) => return error(StatusCode::BAD_REQUEST, "ttl must be at least 1s"),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    match (&body.role, &body.namespace, &body.service_account) {
        (Some(role), None, None) if body.labels.is_empty() && body.advertise_addr.is_none() => {
            let Some(role) = Role::parse(role) else {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("role {role:?}: use admin, viewer or tap"),
                );
            };
            let description = body.description.clone().unwrap_or_default();
            match s.auth().create(role, Some(ttl), &description).await {
                Ok((token, record)) => {
                    tracing::info!(id = %record.id, role = %role, by = %who.id, "made an API token");
                    Json(json!({
                        "token": token,
                        "id": record.id,
                        "role": role,
                        "expiresAt": record.expires_at,
                    }))
                    .into_response()
                }
                Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            }
        }
        (None, Some(namespace), Some(service_account)) => {
            let grant = Grant {
                namespace: namespace.clone(),
                service_account: service_account.clone(),
                labels: body.labels.clone(),
                advertise_addr: body.advertise_addr,
            };
            if let Err(e) = grant.check() {
                return error(StatusCode::BAD_REQUEST, e);
            }
            let (token, claims) = s.identity().create_token(&grant, ttl);
            let record = JoinToken {
                id: claims.id.clone(),
                namespace: claims.namespace.clone(),
                service_account: claims.service_account.clone(),
                labels: claims.labels.clone(),
                advertise_addr: claims.advertise_addr,
                created_at: now(),
                expires_at: claims.exp,
                revoked_at: None,
            };
            if let Err(e) = s.auth().record_join(&record).await {
                return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
            }
            tracing::info!(id = %claims.id, namespace = %claims.namespace, service_account = %claims.service_account, labels = ?claims.labels, by = %who.id, "made a join token");
            Json(json!({
                "token": token,
                "id": claims.id,
                "namespace": claims.namespace,
                "serviceAccount": claims.service_account,
                "labels": claims.labels,
                "advertiseAddr": claims.advertise_addr,
                "expiresAt": claims.exp,
            }))
            .into_response()
        }
        _ => error(
            StatusCode::BAD_REQUEST,
            "give either role (an API token: admin, viewer or tap) or namespace and serviceAccount (a proxy's join token, with optional labels and advertiseAddr)",
        ),
    }
}

/// Every token made over the API: ids, roles or identities, expiry —
/// never a secret.
async fn list_tokens(State(s): State<AppState>) -> Response {
    let (api, join) = match (s.auth().list().await, s.auth().list_join().await) {
        (Ok(a), Ok(j)) => (a, j),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let mut items: Vec<serde_json::Value> = api
        .into_iter()
        .map(|t| {
            json!({
                "id": t.id, "kind": "api", "role": t.role, "description": t.description,
                "createdAt": t.created_at, "expiresAt": t.expires_at, "revokedAt": t.revoked_at,
            })
        })
        .collect();
    items.extend(join.into_iter().map(|t| {
        json!({
            "id": t.id, "kind": "join", "namespace": t.namespace,
            "serviceAccount": t.service_account, "labels": t.labels,
            "advertiseAddr": t.advertise_addr,
            "createdAt": t.created_at, "expiresAt": t.expires_at, "revokedAt": t.revoked_at,
        })
    }));
    items.sort_by_key(|v| v["createdAt"].as_u64().unwrap_or(0));
    Json(json!({"items": items})).into_response()
}

/// Revokes an API token, or else a join token, by id; effective at once.
async fn revoke_token(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    let valid = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
    if !valid {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not a token id: `trellis token list` shows them"),
        );
    }
    match s.auth().revoke(&id).await {
        Ok(Some(record)) => {
            tracing::info!(%id, role = %record.role, by = %who.id, "revoked an API token");
            return Json(json!({"revoked": id, "kind": "api"})).into_response();
        }
        Ok(None) => {}
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
    // Join tokens are verified by signature; the id joins the revocation
    // list whether or not a record of it exists (tokens of older versions).
    let revoked = s
        .identity()
        .revoke(&id)
        .map_err(|e| e.to_string())
        .and(s.auth().revoke_join(&id).await.map_err(|e| e.to_string()));
    match revoked {
        Ok(()) => {
            tracing::info!(%id, by = %who.id, "revoked a join token");
            Json(json!({"revoked": id, "kind": "join"})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn bundle_json(bundle: &[String]) -> serde_json::Value {
    let fingerprints: Vec<String> = bundle
        .iter()
        .filter_map(|p| trellis_identity::certs::certs_from_pem(p).ok())
        .filter_map(|c| c.first().map(|c| trellis_identity::certs::fingerprint(c)))
        .collect();
    json!({"fingerprints": fingerprints, "bundle": bundle})
}

async fn ca(State(s): State<AppState>) -> Response {
    Json(bundle_json(&s.identity().bundle())).into_response()
}

async fn rotate(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    let td = s.xds().snapshot().trust_domain.clone();
    match s.identity().rotate(&td) {
        Ok(bundle) => {
            s.xds().set_trust_bundle(bundle.clone()).await;
            Json(bundle_json(&bundle)).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn retire(State(s): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    match s.identity().retire() {
        Ok(bundle) => {
            s.xds().set_trust_bundle(bundle.clone()).await;
            Json(bundle_json(&bundle)).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}
