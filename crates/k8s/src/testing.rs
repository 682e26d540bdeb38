//! A scripted API server for unit tests: a kube `Client` over tower-test's
//! mock service that answers each request in turn from a script, checks its
//! method and path, and records its body.

use std::sync::{Arc, Mutex};

use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::Value;

/// One expected request and the answer to it.
pub struct Step {
    pub method: Method,
    /// The request's path and query must start with this.
    pub path: String,
    pub status: StatusCode,
    pub body: Value,
}

pub fn step(method: Method, path: &str, status: u16, body: Value) -> Step {
    Step {
        method,
        path: path.to_string(),
        status: StatusCode::from_u16(status).unwrap(),
        body,
    }
}

/// A request the client made: method, path and query, JSON body.
#[derive(Clone, Debug)]
#[allow(dead_code)] // method and path: for a failing test's debug output
pub struct Seen {
    pub method: Method,
    pub path: String,
    pub body: Value,
}

/// A client that plays `script`, and what it was sent. The task panics
/// (failing the test at `done`) if a request differs from the script.
pub fn mock(
    script: Vec<Step>,
) -> (
    kube::Client,
    Arc<Mutex<Vec<Seen>>>,
    tokio::task::JoinHandle<()>,
) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let task = tokio::spawn(async move {
        for s in script {
            let (req, send) = handle
                .next_request()
                .await
                .expect("the client sent a request");
            let method = req.method().clone();
            let path = req
                .uri()
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            let bytes = req.into_body().collect().await.unwrap().to_bytes();
            let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            record.lock().unwrap().push(Seen {
                method: method.clone(),
                path: path.clone(),
                body,
            });
            assert_eq!(method, s.method, "request {path}");
            assert!(
                path.starts_with(&s.path),
                "expected {} {}, got {method} {path}",
                s.method,
                s.path
            );
            let resp = Response::builder()
                .status(s.status)
                .header("content-type", "application/json")
                .body(Body::from(serde_json::to_vec(&s.body).unwrap()))
                .unwrap();
            send.send_response(resp);
        }
    });
    (kube::Client::new(service, "default"), seen, task)
}

/// A Kubernetes `Status` error body.
pub fn status_error(code: u16, reason: &str) -> Value {
    serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": reason, "reason": reason, "code": code,
    })
}
