//! HTTP API of the CA and join tokens:
//!
//! - `POST /api/v1/tokens` `{namespace, serviceAccount, ttl}` → a join token
//! - `DELETE /api/v1/tokens/{id}` → revokes it
//! - `GET /api/v1/ca` → the trust bundle and its fingerprints
//! - `POST /api/v1/ca/rotate`, `POST /api/v1/ca/retire` → root rotation
//!
//! Tokens are secrets: they are returned once and never logged. Like every
//! write of the API, these refuse requests that carry an `Origin` header, so
//! that no web page can mint tokens through a user's browser.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::mesh_identity::MeshIdentity;
use crate::xds::XdsHandle;

#[derive(Clone)]
struct IdState {
    identity: Arc<MeshIdentity>,
    xds: XdsHandle,
}

pub fn router(identity: Arc<MeshIdentity>, xds: XdsHandle) -> Router {
    Router::new()
        .route("/api/v1/tokens", post(create_token))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/ca", get(ca))
        .route("/api/v1/ca/rotate", post(rotate))
        .route("/api/v1/ca/retire", post(retire))
        .with_state(IdState { identity, xds })
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(json!({"error": msg.into()}))).into_response()
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TokenRequest {
    namespace: String,
    service_account: String,
    /// Duration such as `24h` (default 24h).
    #[serde(default)]
    ttl: Option<String>,
}

fn dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

async fn create_token(
    State(s): State<IdState>,
    headers: HeaderMap,
    body: Json<TokenRequest>,
) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    if !dns_label(&body.namespace) || !dns_label(&body.service_account) {
        return error(
            StatusCode::BAD_REQUEST,
            "namespace and serviceAccount must be DNS labels (lower-case letters, digits, '-')",
        );
    }
    let ttl = match body.ttl.as_deref().map(trellis_resource::parse_duration) {
        None => Duration::from_secs(24 * 3600),
        Some(Ok(d)) if d >= Duration::from_secs(1) => d,
        Some(Ok(_)) => return error(StatusCode::BAD_REQUEST, "ttl must be at least 1s"),
        Some(Err(e)) => return error(StatusCode::BAD_REQUEST, format!("ttl: {e}")),
    };
    let (token, claims) = s
        .identity
        .create_token(&body.namespace, &body.service_account, ttl);
    tracing::info!(id = %claims.id, namespace = %claims.namespace, service_account = %claims.service_account, "made a join token");
    Json(json!({
        "token": token,
        "id": claims.id,
        "namespace": claims.namespace,
        "serviceAccount": claims.service_account,
        "expiresAt": claims.exp,
    }))
    .into_response()
}

async fn revoke_token(
    State(s): State<IdState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    match s.identity.revoke(&id) {
        Ok(()) => {
            tracing::info!(%id, "revoked a join token");
            Json(json!({"revoked": id})).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
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

async fn ca(State(s): State<IdState>) -> Response {
    Json(bundle_json(&s.identity.bundle())).into_response()
}

async fn rotate(State(s): State<IdState>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    let td = s.xds.snapshot().trust_domain.clone();
    match s.identity.rotate(&td) {
        Ok(bundle) => {
            s.xds.set_trust_bundle(bundle.clone()).await;
            Json(bundle_json(&bundle)).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

async fn retire(State(s): State<IdState>, headers: HeaderMap) -> Response {
    if let Some(r) = refuse_browsers(&headers) {
        return r;
    }
    match s.identity.retire() {
        Ok(bundle) => {
            s.xds.set_trust_bundle(bundle.clone()).await;
            Json(bundle_json(&bundle)).into_response()
        }
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}
