//! The Gateway API CRDs Trellis needs (HTTPRoute and GRPCRoute v1, and
//! ReferenceGrant, which cross-namespace backendRefs refer to), generated
//! from the `gateway-api` crate's types, and the rule that decides which
//! to print: only those the cluster lacks. A cluster's Gateway API CRDs
//! belong to whoever installed them (another mesh, an ingress controller,
//! the cluster's vendor), so Trellis never overwrites or downgrades one.
//!
//! Gateway and GatewayClass are left out: in the mesh form (GAMMA) routes
//! attach to Services, and a Gateway CRD on the cluster makes other
//! controllers believe a Gateway implementation is wanted.

use std::collections::BTreeSet;

use gateway_api::{grpcroutes::GrpcRoute, httproutes::HttpRoute, referencegrants::ReferenceGrant};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// The Gateway API release whose types the `gateway-api` crate carries.
pub const BUNDLE_VERSION: &str = "v1.5.1";
pub const BUNDLE_VERSION_ANNOTATION: &str = "gateway.networking.k8s.io/bundle-version";
pub const CHANNEL_ANNOTATION: &str = "gateway.networking.k8s.io/channel";
/// CRDs in `*.k8s.io` groups must carry it, or the API server refuses them.
const API_APPROVED_ANNOTATION: &str = "api-approved.kubernetes.io";
const API_APPROVED: &str = "https://github.com/kubernetes/enhancements/pull/1111";
/// Says where these CRDs came from, for whoever finds them on a cluster.
pub const GENERATED_BY_ANNOTATION: &str = "trellis.dev/generated-by";

/// The names of the Gateway API CRDs Trellis needs.
pub const NEEDED: [&str; 3] = [
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
    "referencegrants.gateway.networking.k8s.io",
];

/// Every Gateway API CRD Trellis needs, in [`NEEDED`]'s order.
pub fn gateway_crds() -> Vec<CustomResourceDefinition> {
    let mut crds = vec![HttpRoute::crd(), GrpcRoute::crd(), ReferenceGrant::crd()];
    for crd in &mut crds {
        let annotations = crd.metadata.annotations.get_or_insert_default();
        for (k, v) in [
            (API_APPROVED_ANNOTATION, API_APPROVED),
            (BUNDLE_VERSION_ANNOTATION, BUNDLE_VERSION),
            (CHANNEL_ANNOTATION, "standard"),
            (
                GENERATED_BY_ANNOTATION,
                "trellis install --crds, from the gateway-api crate's types",
            ),
        ] {
            annotations.insert(k.into(), v.into());
        }
    }
    crds
}

/// The Gateway API CRDs to print for a cluster that has the CRDs named
/// in `present`: those it lacks, never one it has, whatever its version.
pub fn missing_gateway_crds(present: &BTreeSet<String>) -> Vec<CustomResourceDefinition> {
    gateway_crds()
        .into_iter()
        .filter(|c| {
            c.metadata
                .name
                .as_ref()
                .is_some_and(|n| !present.contains(n))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(crds: &[CustomResourceDefinition]) -> Vec<String> {
        crds.iter()
            .map(|c| c.metadata.name.clone().unwrap())
            .collect()
    }

    #[test]
    fn every_needed_crd_is_generated_as_v1_with_its_annotations() {
        let crds = gateway_crds();
        assert_eq!(names(&crds), NEEDED);
        for crd in &crds {
            assert_eq!(crd.spec.group, "gateway.networking.k8s.io");
            let versions: Vec<&str> = crd.spec.versions.iter().map(|v| v.name.as_str()).collect();
            assert_eq!(versions, ["v1"], "{:?}", crd.metadata.name);
            let annotations = crd.metadata.annotations.as_ref().unwrap();
            assert!(annotations.contains_key(API_APPROVED_ANNOTATION));
            assert_eq!(annotations[BUNDLE_VERSION_ANNOTATION], BUNDLE_VERSION);
        }
        // Route status is a subresource, so the status writer can patch it.
        for crd in &crds[..2] {
            assert!(crd.spec.versions[0]
                .subresources
                .as_ref()
                .is_some_and(|s| s.status.is_some()));
        }
    }

    #[test]
    fn only_absent_crds_are_printed_whatever_the_present_ones_version() {
        let all: BTreeSet<String> = NEEDED.iter().map(|s| s.to_string()).collect();
        assert!(missing_gateway_crds(&all).is_empty());
        assert_eq!(names(&missing_gateway_crds(&BTreeSet::new())), NEEDED);
        let some: BTreeSet<String> = ["httproutes.gateway.networking.k8s.io".to_string()].into();
        assert_eq!(names(&missing_gateway_crds(&some)), NEEDED[1..].to_vec());
    }
}
