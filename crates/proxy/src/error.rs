//! Errors on the data path: where they came from and whether a retry is safe.

use std::fmt;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};

use crate::Body;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The caller sent something we cannot serve.
    Downstream,
    /// The peer or app failed.
    Upstream,
    /// This proxy (config, discovery).
    Internal,
}

/// On an answer of a peer proxy: the request reached no app, so it may go
/// to another endpoint whatever its method.
pub const NOT_SENT: http::HeaderName = http::HeaderName::from_static("x-trellis-not-sent");

#[derive(Debug)]
pub struct ProxyError {
    pub status: StatusCode,
    pub source: Source,
    /// Nothing reached the upstream, so any request may be tried again.
    pub retry_safe: bool,
    pub message: String,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ProxyError {}

impl ProxyError {
    pub fn new(status: StatusCode, source: Source, message: impl Into<String>) -> Self {
        ProxyError {
            status,
            source,
            retry_safe: false,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Source::Downstream, message)
    }

    /// The client's request body broke off while it was sent on (bad
    /// chunked framing, a reset): the client's fault, whatever the
    /// upstream then said.
    pub fn bad_body() -> Self {
        Self::bad_request(
            "the request body broke off before its end (malformed chunked encoding, or the client reset it); send it whole",
        )
    }

    pub fn upstream_connect(addr: SocketAddr, e: impl fmt::Display) -> Self {
        ProxyError {
            status: StatusCode::BAD_GATEWAY,
            source: Source::Upstream,
            retry_safe: true,
            message: format!("cannot connect to {addr}: {e}"),
        }
    }

    pub fn upstream(e: impl fmt::Display) -> Self {
        Self::new(
            StatusCode::BAD_GATEWAY,
            Source::Upstream,
            format!("upstream failed: {e}"),
        )
    }

    pub fn timeout(what: &str) -> Self {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            Source::Upstream,
            format!("{what} timed out"),
        )
    }

    /// The answer the caller gets: the status and a one-line reason.
    pub fn into_response(self) -> Response<Body> {
        let mut resp = Response::new(
            Full::new(Bytes::from(format!("trellis: {}\n", self.message)))
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
        *resp.status_mut() = self.status;
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
        if self.retry_safe {
            // The request reached no app (the peer proxy could not connect
            // to it, e.g. a pod whose app has exited while it terminates):
            // the caller's proxy may send it to another endpoint.
            resp.headers_mut()
                .insert(NOT_SENT, http::HeaderValue::from_static("1"));
        }
        resp.headers_mut().insert(
            "x-trellis-error",
            http::HeaderValue::from_static(match self.source {
                Source::Downstream => "downstream",
                Source::Upstream => "upstream",
                Source::Internal => "internal",
            }),
        );
        resp
    }
}
