//! Counters of traffic management, labelled by the Service they concern:
//! the called Service for request-level decisions (rate limit, faults,
//! retries), the serving Service for endpoint-level ones (circuit
//! breaking, ejections, health checks, hashing, locality).

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

use crate::snapshot::SvcKey;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_namespace: String,
    pub destination_service: String,
}

impl From<&SvcKey> for ServiceLabels {
    fn from(k: &SvcKey) -> Self {
        ServiceLabels {
            destination_namespace: k.namespace.clone(),
            destination_service: k.name.clone(),
        }
    }
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RetryReason {
    /// The connection to the endpoint failed: nothing was sent.
    connect,
    /// A status listed in the retry codes.
    status,
    /// The try was reset or timed out.
    error,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RetryLabels {
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    pub reason: RetryReason,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LimitLabel {
    connections,
    pending,
    requests,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    pub limit: LimitLabel,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum FaultKind {
    abort,
    delay,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    pub fault: FaultKind,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum MirrorOutcome {
    /// Sent to the mirror (its answer is dropped).
    sent,
    /// Not sent: the body was streaming or too large to copy.
    skipped,
    /// Not sent: too many mirror requests in flight, or no endpoint.
    dropped,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    pub outcome: MirrorOutcome,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum CheckResult {
    pass,
    fail,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabels {
    #[prometheus(flatten)]
    pub service: ServiceLabels,
    pub result: CheckResult,
}

#[derive(Clone, Default)]
pub struct TrafficMetrics {
    pub retries: Family<RetryLabels, Counter>,
    pub budget_exhausted: Family<ServiceLabels, Counter>,
    pub ejections: Family<ServiceLabels, Counter>,
    pub overflows: Family<OverflowLabels, Counter>,
    pub rate_limited: Family<ServiceLabels, Counter>,
    pub faults: Family<FaultLabels, Counter>,
    pub mirrored: Family<MirrorLabels, Counter>,
    pub hash_key_missing: Family<ServiceLabels, Counter>,
    pub locality_failovers: Family<ServiceLabels, Counter>,
    pub health_checks: Family<CheckLabels, Counter>,
}

impl TrafficMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "trellis_retries",
            "Retries sent, by reason",
            self.retries.clone(),
        );
        r.register(
            "trellis_retry_budget_exhausted",
            "Retries not sent because the service's retry budget was spent",
            self.budget_exhausted.clone(),
        );
        r.register(
            "trellis_outlier_ejections",
            "Endpoints ejected by outlier detection",
            self.ejections.clone(),
        );
        r.register(
            "trellis_circuit_breaker_rejections",
            "Requests and connections refused at once because a connection pool limit was reached",
            self.overflows.clone(),
        );
        r.register(
            "trellis_rate_limited",
            "Requests answered 429 by the local rate limit",
            self.rate_limited.clone(),
        );
        r.register(
            "trellis_faults_injected",
            "Requests delayed or aborted by fault injection",
            self.faults.clone(),
        );
        r.register(
            "trellis_mirrored_requests",
            "Copies of requests for a RequestMirror filter",
            self.mirrored.clone(),
        );
        r.register(
            "trellis_hash_key_missing",
            "ring-hash requests without their hash key, sent to a random endpoint",
            self.hash_key_missing.clone(),
        );
        r.register(
            "trellis_locality_failovers",
            "Requests sent outside the caller's zone because too few of its endpoints were healthy",
            self.locality_failovers.clone(),
        );
        r.register(
            "trellis_health_checks",
            "Active health checks, by result",
            self.health_checks.clone(),
        );
    }

    pub fn retry(&self, svc: &SvcKey, reason: RetryReason) {
        self.retries
            .get_or_create(&RetryLabels {
                service: svc.into(),
                reason,
            })
            .inc();
    }

    pub fn overflow(&self, svc: &SvcKey, limit: super::policy::Limit) {
        let limit = match limit {
            super::policy::Limit::Connections => LimitLabel::connections,
            super::policy::Limit::Pending => LimitLabel::pending,
            super::policy::Limit::Requests => LimitLabel::requests,
        };
        self.overflows
            .get_or_create(&OverflowLabels {
                service: svc.into(),
                limit,
            })
            .inc();
    }

    pub fn fault(&self, svc: &SvcKey, fault: FaultKind) {
        self.faults
            .get_or_create(&FaultLabels {
                service: svc.into(),
                fault,
            })
            .inc();
    }

    pub fn mirror(&self, svc: &SvcKey, outcome: MirrorOutcome) {
        self.mirrored
            .get_or_create(&MirrorLabels {
                service: svc.into(),
                outcome,
            })
            .inc();
    }

    pub fn check(&self, svc: &SvcKey, result: CheckResult) {
        self.health_checks
            .get_or_create(&CheckLabels {
                service: svc.into(),
                result,
            })
            .inc();
    }

    /// Increments a family labelled by service only.
    pub fn inc(family: &Family<ServiceLabels, Counter>, svc: &SvcKey) {
        family.get_or_create(&svc.into()).inc();
    }
}
