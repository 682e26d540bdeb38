//! `trellis dashboard [--kubernetes]`: the dashboard served on this
//! machine's loopback for the mesh's control plane.
//!
//! The page is the control plane's own; its API requests come here and go
//! on with the CLI's credential: to the one control plane, or (with
//! `--kubernetes`) to every replica through port-forwards, with the answers
//! merged as `stat` and the others merge them. So the browser needs
//! neither the mesh CA nor a token of the mesh: the link it is given
//! carries a random secret of this process, which every API request must
//! show, and only `localhost`/`127.0.0.1` are answered (a DNS-rebinding
//! page cannot use it).

use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use rand::Rng;
use serde_json::{json, Value};
use subtle::ConstantTimeEq;

use crate::cli::Global;
use crate::client::ApiError;
use crate::kube_observe::{self, Access, KubeArgs, Mesh, NoTokenAccess, Replicas};

#[derive(Debug, Args)]
pub struct DashboardArgs {
    /// The local port to serve on (default: a free one).
    #[arg(long, default_value_t = 0)]
    pub port: u16,
    #[command(flatten)]
    pub kube: KubeArgs,
}

struct Dash {
    mesh: Mesh,
    /// What the browser's requests must carry: `Bearer <secret>`.
    secret: String,
}

pub async fn run(global: &Global, args: &DashboardArgs) -> anyhow::Result<ExitCode> {
    let mesh = if args.kube.kubernetes {
        // The tap view needs a tap token; without it, the rest still works.
        match Replicas::connect(&args.kube, Access::Tap).await {
            Ok(r) => Mesh::Cluster(r),
            Err(e) if e.downcast_ref::<NoTokenAccess>().is_some() => {
                eprintln!("note: {e}\n  the dashboard shows everything but the live tap");
                Mesh::Cluster(Replicas::connect(&args.kube, Access::View).await?)
            }
            Err(e) => return Err(e),
        }
    } else {
        Mesh::open(global, &args.kube, Access::View).await?
    };
    let secret: String = {
        let bytes: [u8; 24] = rand::rng().random();
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port))
        .await
        .with_context(|| {
            format!(
                "cannot listen on 127.0.0.1:{}: pick another --port",
                args.port
            )
        })?;
    let port = listener.local_addr()?.port();
    let replicas = match &mesh {
        Mesh::Cluster(r) => format!("{} control-plane replicas", r.replicas.len()),
        Mesh::One(api) => format!("the control plane at {}", api.base()),
    };
    let app = router(Arc::new(Dash {
        mesh,
        secret: secret.clone(),
    }));
    println!("dashboard of {replicas}:\n  http://127.0.0.1:{port}/#token={secret}\n(the link logs the browser in; Ctrl-C stops)");
    axum::serve(listener, app)
        .with_graceful_shutdown(crate::signals::shutdown())
        .await
        .context("the dashboard server stopped")?;
    Ok(ExitCode::SUCCESS)
}

fn router(dash: Arc<Dash>) -> Router {
    use trellis_control::observe_api::{dashboard_css, dashboard_js, index};
    Router::new()
        .route("/", get(index))
        .route("/dashboard.js", get(dashboard_js))
        .route("/dashboard.css", get(dashboard_css))
        .route("/api/v1/tap", get(tap))
        .route("/api/v1/{*rest}", get(relay))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not served by `trellis dashboard`") })
        .layer(middleware::from_fn_with_state(dash.clone(), guard))
        .with_state(dash)
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response {
    (status, Json(json!({"error": msg.to_string()}))).into_response()
}

/// The status an upstream failure is answered with.
fn upstream_error(e: anyhow::Error) -> Response {
    let status = match e.downcast_ref::<ApiError>() {
        Some(ApiError::NotFound(_)) => StatusCode::NOT_FOUND,
        Some(ApiError::Refused { status, .. }) => *status,
        _ => StatusCode::BAD_GATEWAY,
    };
    error(status, format!("{e:#}"))
}

/// The Host check (as the control plane's: loopback names only, against
/// DNS rebinding), the secret on API requests, and the control plane's
/// security headers.
async fn guard(State(dash): State<Arc<Dash>>, req: Request, next: Next) -> Response {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let mut resp = if !trellis_control::http::host_allowed(host, loopback, &[]) {
        error(
            StatusCode::FORBIDDEN,
            format!("host {host:?} is not allowed: open the link `trellis dashboard` printed"),
        )
    } else if req.uri().path().starts_with("/api/") {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.strip_prefix("Bearer "))
            .unwrap_or("");
        // Compared in constant time.
        if bool::from(given.trim().as_bytes().ct_eq(dash.secret.as_bytes())) {
            next.run(req).await
        } else {
            error(
                StatusCode::UNAUTHORIZED,
                "open the link `trellis dashboard` printed: it carries this server's credential",
            )
        }
    } else {
        next.run(req).await
    };
    trellis_control::http::security_headers(resp.headers_mut());
    resp
}

/// The read routes the page uses, merged across replicas.
async fn relay(State(dash): State<Arc<Dash>>, uri: Uri) -> Response {
    let merge: fn(Vec<Value>) -> Value = match uri.path() {
        "/api/v1/stat" => kube_observe::merge_stat,
        "/api/v1/edges" => kube_observe::merge_edges,
        "/api/v1/traces" => kube_observe::merge_trace_lists,
        p if p.starts_with("/api/v1/traces/") => kube_observe::merge_trace,
        "/api/v1/services" => kube_observe::first,
        _ => return error(StatusCode::NOT_FOUND, "not served by `trellis dashboard`"),
    };
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    match dash.mesh.get(path, merge).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => upstream_error(e),
    }
}

/// The live tap: every replica's stream, line by line.
async fn tap(State(dash): State<Arc<Dash>>, uri: Uri) -> Response {
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    match dash.mesh.lines(path).await {
        Ok(rx) => {
            let stream = futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|line| (Ok::<_, Infallible>(line), rx))
            });
            (
                [(header::CONTENT_TYPE, "application/x-ndjson")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        Err(e) => upstream_error(e),
    }
}
