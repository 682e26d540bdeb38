//! Leader election over a `coordination.k8s.io` Lease, for the work that
//! exactly one control-plane replica must do (route status, CA rotation).
//! Any replica serves proxies; only the holder of the Lease writes.
//!
//! The usual algorithm (client-go's): the holder renews `renewTime` every
//! `renew`; another replica takes the Lease only once `renewTime +
//! leaseDurationSeconds` has passed. Every write carries the
//! resourceVersion read, so of two replicas racing for it one wins and the
//! other's write fails with a conflict. A holder that cannot renew stops
//! acting as leader before its Lease can expire. No lease crate builds
//! with kube 4 (kubert's and kube-leader-election's releases follow other
//! kube versions), and the algorithm is this short.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Clone, Debug, PartialEq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica (its pod name).
    pub holder: String,
    /// How long a Lease lasts unrenewed.
    pub duration: Duration,
    /// How often the holder renews (well under `duration`).
    pub renew: Duration,
}

impl LeaseConfig {
    pub fn new(namespace: impl Into<String>, holder: impl Into<String>) -> Self {
        LeaseConfig {
            namespace: namespace.into(),
            name: crate::names::LEASE.into(),
            holder: holder.into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "Lease {name}: {source}; does the control plane's Role allow get/create/update on it?"
    )]
    Api {
        name: String,
        source: Box<kube::Error>,
    },
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(ae) if ae.code == 409)
}

/// One round: takes or renews the Lease if it may; returns whether this
/// replica holds it now.
pub async fn step(api: &Api<Lease>, cfg: &LeaseConfig, now: Timestamp) -> Result<bool, LeaseError> {
    let err = |source: kube::Error| LeaseError::Api {
        name: cfg.name.clone(),
        source: Box::new(source),
    };
    let mine = |transitions: i32, acquired: Option<MicroTime>| LeaseSpec {
        holder_identity: Some(cfg.holder.clone()),
        lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
        acquire_time: acquired.or(Some(MicroTime(now))),
        renew_time: Some(MicroTime(now)),
        lease_transitions: Some(transitions),
        ..Default::default()
    };
    let Some(mut lease) = api.get_opt(&cfg.name).await.map_err(err)? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                namespace: Some(cfg.namespace.clone()),
                ..Default::default()
            },
            spec: Some(mine(0, None)),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(err(e)),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let transitions = spec.lease_transitions.unwrap_or(0);
    let new_spec = if holder == cfg.holder {
        mine(transitions, spec.acquire_time.clone())
    } else {
        let duration = spec.lease_duration_seconds.unwrap_or(0).max(0) as i64;
        let expired = holder.is_empty()
            || spec
                .renew_time
                .as_ref()
                .is_none_or(|t| t.0.as_second() + duration < now.as_second());
        if !expired {
            return Ok(false);
        }
        mine(transitions + 1, None)
    };
    lease.spec = Some(new_spec);
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(true),
        Err(e) if is_conflict(&e) => Ok(false),
        Err(e) => Err(err(e)),
    }
}

/// Keeps trying to hold the Lease; `tx` says whether this replica leads.
/// Runs until `tx` has no receiver left.
pub async fn run(client: kube::Client, cfg: LeaseConfig, tx: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_renewed: Option<std::time::Instant> = None;
    while !tx.is_closed() {
        let leading = match step(&api, &cfg, Timestamp::now()).await {
            Ok(true) => {
                last_renewed = Some(std::time::Instant::now());
                true
            }
            Ok(false) => false,
            Err(e) => {
                warn!(error = %e, "cannot renew the Lease");
                // Stop leading before the Lease can pass to another replica.
                last_renewed.is_some_and(|t| t.elapsed() < cfg.duration - cfg.renew)
            }
        };
        if *tx.borrow() != leading {
            info!(holder = %cfg.holder, leading, "leadership changed");
        }
        tx.send_if_modified(|v| std::mem::replace(v, leading) != leading);
        tokio::time::sleep(cfg.renew).await;
    }
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::testing::{mock, status_error, step as expect};

    const PATH: &str = "/apis/coordination.k8s.io/v1/namespaces/trellis-system/leases";

    fn cfg(holder: &str) -> LeaseConfig {
        LeaseConfig::new("trellis-system", holder)
    }

    fn lease(holder: &str, renewed: &str, transitions: i32) -> serde_json::Value {
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
               "metadata": {"name": "trellis-control", "namespace": "trellis-system", "resourceVersion": "42"},
               "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                        "renewTime": renewed, "acquireTime": "2026-12-01T10:00:00.000000Z",
                        "leaseTransitions": transitions}})
    }

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_leads() {
        let (client, seen, task) = mock(vec![
            expect(
                Method::GET,
                &format!("{PATH}/trellis-control"),
                404,
                status_error(404, "NotFound"),
            ),
            expect(
                Method::POST,
                PATH,
                201,
                lease("a", "2026-12-01T10:00:00.000000Z", 0),
            ),
        ]);
        let api = Api::namespaced(client, "trellis-system");
        assert!(step(&api, &cfg("a"), at("2026-12-01T10:00:00Z"))
            .await
            .unwrap());
        task.await.unwrap();
        assert_eq!(seen.lock().unwrap()[1].body["spec"]["holderIdentity"], "a");
    }

    #[tokio::test]
    async fn a_live_lease_of_another_replica_is_left_alone() {
        let (client, seen, task) = mock(vec![expect(
            Method::GET,
            &format!("{PATH}/trellis-control"),
            200,
            lease("a", "2026-12-01T10:00:00.000000Z", 0),
        )]);
        let api = Api::namespaced(client, "trellis-system");
        assert!(!step(&api, &cfg("b"), at("2026-12-01T10:00:10Z"))
            .await
            .unwrap());
        task.await.unwrap();
        assert_eq!(seen.lock().unwrap().len(), 1, "no write");
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_at_the_version_read() {
        let (client, seen, task) = mock(vec![
            expect(
                Method::GET,
                &format!("{PATH}/trellis-control"),
                200,
                lease("a", "2026-12-01T10:00:00.000000Z", 3),
            ),
            expect(
                Method::PUT,
                &format!("{PATH}/trellis-control"),
                200,
                lease("b", "2026-12-01T10:00:20.000000Z", 4),
            ),
        ]);
        let api = Api::namespaced(client, "trellis-system");
        assert!(step(&api, &cfg("b"), at("2026-12-01T10:00:20Z"))
            .await
            .unwrap());
        task.await.unwrap();
        let put = seen.lock().unwrap()[1].body.clone();
        assert_eq!(put["metadata"]["resourceVersion"], "42");
        assert_eq!(put["spec"]["holderIdentity"], "b");
        assert_eq!(put["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test]
    async fn of_two_replicas_racing_the_one_that_conflicts_does_not_lead() {
        let (client, _, task) = mock(vec![
            expect(
                Method::GET,
                &format!("{PATH}/trellis-control"),
                200,
                lease("a", "2026-12-01T10:00:00.000000Z", 0),
            ),
            expect(
                Method::PUT,
                &format!("{PATH}/trellis-control"),
                409,
                status_error(409, "Conflict"),
            ),
        ]);
        let api = Api::namespaced(client, "trellis-system");
        assert!(!step(&api, &cfg("c"), at("2026-12-01T10:01:00Z"))
            .await
            .unwrap());
        task.await.unwrap();
    }

    #[tokio::test]
    async fn the_holder_renews_and_keeps_its_acquire_time() {
        let (client, seen, task) = mock(vec![
            expect(
                Method::GET,
                &format!("{PATH}/trellis-control"),
                200,
                lease("a", "2026-12-01T10:00:00.000000Z", 2),
            ),
            expect(
                Method::PUT,
                &format!("{PATH}/trellis-control"),
                200,
                lease("a", "2026-12-01T10:00:05.000000Z", 2),
            ),
        ]);
        let api = Api::namespaced(client, "trellis-system");
        assert!(step(&api, &cfg("a"), at("2026-12-01T10:00:05Z"))
            .await
            .unwrap());
        task.await.unwrap();
        let put = seen.lock().unwrap()[1].body.clone();
        assert_eq!(put["spec"]["acquireTime"], "2026-12-01T10:00:00.000000Z");
        assert_eq!(put["spec"]["leaseTransitions"], 2);
    }
}
