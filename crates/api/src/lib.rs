//! The proxy API: one long-lived bidirectional gRPC stream per proxy.
//!
//! Up the stream a proxy registers its workload, subscribes to the services
//! its app calls, acks or nacks each config version and reports traffic
//! figures. Down the stream the control plane sends versioned configs that
//! hold the whole state of the services the proxy subscribed to. This crate
//! also owns what identifies a Config's content (`Config::content_hash`).
#![forbid(unsafe_code)]

use prost::Message;

pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("trellis.proxy.v1");
}

/// The most bytes a Config may take, protobuf-encoded: the control plane
/// refuses an apply that would make any proxy's Config larger, and sends
/// none larger (the proxy keeps its last config and its state says why).
/// A proxy that follows 1,000 Services of 10 endpoints each gets about
/// 1.5 MiB.
pub const CONFIG_BUDGET_BYTES: usize = 2 << 20;

/// The most bytes a proxy decodes in one message from the control plane:
/// twice the budget, so a Config within it always arrives, even from a
/// control plane built with a larger budget during an upgrade.
pub const MAX_CONTROL_MESSAGE_BYTES: usize = 2 * CONFIG_BUDGET_BYTES;

/// Upper bounds, in milliseconds, of the latency buckets that proxies report
/// in `StatEntry::latency_buckets`. A last, implicit bucket holds the rest.
pub const LATENCY_BUCKETS_MS: &[f64] = &[
    1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 25.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0,
    2500.0, 5000.0, 10000.0,
];

impl v1::Config {
    /// A hash of the Config's content, its version excluded: what the
    /// control plane compares to know whether a proxy needs a new Config.
    ///
    /// It hashes the protobuf encoding, so every field counts, a field added
    /// later included. The encoding is deterministic: fields go in tag order
    /// and maps are `BTreeMap`s (see build.rs), and the resources inside are
    /// canonical JSON (see trellis-resource). xxh3 is a fixed algorithm with
    /// no per-process seed, so every control plane replica, of any build,
    /// computes the same hash for the same Config.
    pub fn content_hash(&self) -> u64 {
        let unversioned;
        let config = if self.version == 0 {
            self
        } else {
            unversioned = v1::Config {
                version: 0,
                ..self.clone()
            };
            &unversioned
        };
        xxhash_rust::xxh3::xxh3_64(&config.encode_to_vec())
    }
}

#[cfg(test)]
mod tests;
