//! The admin server: `/metrics`, `/ready`, `/live`, `/config`, `/certs`,
//! and on Kubernetes the app's probes (`/app-health/...`, see `app_health`).

use std::net::SocketAddr;
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::ProxyConfig;
use crate::http::{full, text_response};
use crate::inputs::Inputs;
use crate::listener::{self, BindError, Kind, Listening};
use crate::server::{serve_connection, Hop};
use crate::Body;

pub struct Admin {
    listener: TcpListener,
}

impl Admin {
    /// Binds the admin listener (a taken port is a start-up error).
    pub async fn new(cfg: &ProxyConfig) -> Result<Admin, BindError> {
        let listener = listener::bind(cfg.admin_addr, Kind::admin).await?;
        Ok(Admin { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("bound listener has an address")
    }

    pub async fn run(self, inputs: Arc<Inputs>, shutdown: watch::Receiver<bool>) {
        let how = Listening {
            kind: Kind::admin,
            cap: inputs.cfg.limits.max_connections,
            metrics: inputs.metrics.conns.clone(),
        };
        let sd = shutdown.clone();
        listener::serve(self.listener, how, shutdown, move |tcp, _| {
            let inputs = inputs.clone();
            let sd = sd.clone();
            tokio::spawn(async move {
                let i = inputs.clone();
                serve_connection(tcp, &i, Kind::admin, Hop::App, sd, move |req| {
                    let inputs = inputs.clone();
                    async move { handle(&inputs, req).await }
                })
                .await
            });
        })
        .await
    }
}

async fn handle(inputs: &Inputs, req: Request<Incoming>) -> Response<Body> {
    if let Some(probe) = inputs.cfg.app_probes.get(req.uri().path()) {
        let (status, why) = crate::app_health::run(probe).await;
        return text_response(status, why);
    }
    match req.uri().path() {
        "/metrics" => {
            let mut r = Response::new(full(inputs.metrics.encode()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        "/live" => text_response(StatusCode::OK, "live\n"),
        "/ready" => {
            if inputs.discovery.is_loaded() {
                text_response(StatusCode::OK, "ready\n")
            } else {
                text_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "waiting for the first config\n",
                )
            }
        }
        "/certs" => {
            let mut r = Response::new(full(certs_json(inputs).to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        "/config" => {
            let mut r = Response::new(full(config_json(inputs).to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            r
        }
        _ => text_response(
            StatusCode::NOT_FOUND,
            "admin paths: /metrics /ready /live /config /certs\n",
        ),
    }
}

/// The config this proxy runs, with its version, as JSON.
pub fn config_json(inputs: &Inputs) -> serde_json::Value {
    let snap = inputs.discovery.snapshot();
    let parse =
        |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
    let mut services: Vec<_> = snap
        .raw
        .services
        .iter()
        .map(|s| {
            let live = snap
                .services
                .get(&crate::snapshot::SvcKey::new(&s.namespace, &s.name));
            serde_json::json!({
                "namespace": s.namespace,
                "name": s.name,
                "service": parse(&s.service_json),
                "routes": s.routes_json.iter().map(|r| parse(r)).collect::<Vec<_>>(),
                "grpcRoutes": s.grpc_routes_json.iter().map(|r| parse(r)).collect::<Vec<_>>(),
                "trafficPolicy": parse(&s.traffic_policy_json),
                "loadBalancer": live.map(|l| l.policy.balancer.as_str()),
                "endpoints": s.endpoints.iter().map(|e| {
                    let state = live.and_then(|l| {
                        l.endpoints.iter().find(|x| x.addr.to_string() == e.address)
                    });
                    serde_json::json!({
                        "address": e.address, "instance": e.instance, "workload": e.workload,
                        "namespace": e.namespace, "identity": e.identity,
                        // Traffic management's view of the endpoint.
                        "ejected": state.map(|x| x.health.ejected(crate::traffic::now_nanos())),
                        "failingHealthChecks": state.map(|x| x.health.actively_unhealthy()),
                        "inFlight": state.map(|x| x.load.pending()),
                    })
                }).collect::<Vec<_>>(),
            })
        })
        .collect();
    services.sort_by_key(|s| format!("{}/{}", s["namespace"], s["name"]));
    serde_json::json!({
        "version": snap.version,
        "workload": inputs.cfg.workload,
        "namespace": inputs.cfg.namespace,
        "controlPlane": {
            "address": inputs.discovery.control_plane(),
            "replica": inputs.discovery.current_replica(),
            "connected": inputs.discovery.is_connected(),
            "lastError": inputs.discovery.last_error(),
        },
        "mesh": parse(&snap.raw.mesh_json),
        "services": services,
        "missing": snap.raw.missing,
    })
}

/// The workload certificate: identity, serial, validity, and the roots
/// trusted. Never the key.
pub fn certs_json(inputs: &Inputs) -> serde_json::Value {
    let Some(tls) = inputs.discovery.tls() else {
        return serde_json::json!({"identity": null, "certificate": null, "error": "no identity yet: waiting for the first config"});
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    match tls.current() {
        None => serde_json::json!({
            "identity": tls.identity().to_string(),
            "certificate": null,
            "error": "no certificate yet: the CA has not signed one",
        }),
        Some(c) => serde_json::json!({
            "identity": c.info.identity,
            "certificate": {
                "serial": c.info.serial,
                "issuer": c.info.issuer,
                "notBefore": c.info.not_before,
                "notAfter": c.info.not_after,
                "expiresInSeconds": c.info.not_after - now,
                "valid": c.info.not_before <= now && now < c.info.not_after,
            },
            "trustBundle": c.bundle.fingerprints(),
        }),
    }
}
