//! Trellis on Kubernetes. Everything the control plane and the CLI need
//! to run a mesh on a cluster, and nothing the proxy needs:
//!
//! - `crd`: the Trellis CRDs, schemas from the resource model's own types;
//! - `gateway`: the Gateway API CRDs, installed only when absent;
//! - `install`: the control plane's manifests and the Helm chart, from one
//!   template;
//! - `inject`: the sidecar injection of a pod (pure), and of workloads in
//!   files (`trellis inject -f`); `webhook`: the admission handler;
//! - `source`: the API server as a mesh source: watchers, and their
//!   translation into the resource model and each Service's endpoints;
//! - `identity`: TokenReview of the sidecars' projected tokens;
//! - `ca_secret`: the mesh CA kept in a Secret; `lease`: leader election
//!   for singleton work; `status`: route status;
//! - `check`: `trellis check --kubernetes --pre`; `client`: a client found
//!   as kubectl finds one; `control`: what a sidecar's token grants, and
//!   the route status sync, for `trellis control --kubernetes`.
#![forbid(unsafe_code)]

pub mod ca_secret;
pub mod check;
pub mod client;
pub mod control;
pub mod crd;
pub mod gateway;
pub mod identity;
pub mod inject;
pub mod inject_files;
pub mod install;
pub mod lease;
pub mod names;
pub mod source;
pub mod status;
pub mod template;
pub mod webhook;

#[cfg(test)]
mod testing;
