//! The proxy API: one long-lived bidirectional gRPC stream per proxy.
//!
//! Up the stream a proxy registers its workload, subscribes to the services
//! its app calls, acks or nacks each config version and reports traffic
//! figures. Down the stream the control plane sends versioned configs that
//! hold the whole state of the services the proxy subscribed to.
#![forbid(unsafe_code)]

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("trellis.proxy.v1");
}

/// Upper bounds, in milliseconds, of the latency buckets that proxies report
/// in `StatEntry::latency_buckets`. A last, implicit bucket holds the rest.
pub const LATENCY_BUCKETS_MS: &[f64] = &[
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0,
    2500.0, 5000.0, 10000.0,
];
