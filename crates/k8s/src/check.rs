//! `trellis check --kubernetes --pre`: can Trellis be installed on this
//! cluster? The API server answers, its version runs native sidecars
//! (1.29 or later), and the user may create what `trellis install` creates.
//! Each failure says what to do.

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// The oldest Kubernetes whose native sidecars (init containers with
/// `restartPolicy: Always`) are on by default.
pub const MIN_MINOR: u32 = 29;

/// One check's outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    pub check: String,
    pub ok: bool,
    /// What was found, or what to do.
    pub detail: String,
}

/// What `trellis install` (and `install --crds`) create, as RBAC sees it.
const NEEDED: [(&str, &str, &str); 6] = [
    ("apiextensions.k8s.io", "customresourcedefinitions", "create"),
    ("admissionregistration.k8s.io", "mutatingwebhookconfigurations", "create"),
    ("rbac.authorization.k8s.io", "clusterroles", "create"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
    ("", "namespaces", "create"),
    ("apps", "deployments", "create"),
];

/// `v1.37.2`, `1.29+`, `v1.30.1-gke.100` → (1, 37).
fn minor_of(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| s.chars().take_while(char::is_ascii_digit).collect::<String>();
    Some((digits(major).parse().ok()?, digits(minor).parse().ok()?))
}

pub async fn pre(client: kube::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Err(e) => {
            out.push(Finding {
                check: "API server reachable".into(),
                ok: false,
                detail: format!("{e}: check the kubeconfig's current context (`kubectl cluster-info`)"),
            });
            return out;
        }
        Ok(info) => {
            out.push(Finding {
                check: "API server reachable".into(),
                ok: true,
                detail: info.git_version.clone(),
            });
            let ok = minor_of(&info.major, &info.minor).is_some_and(|(ma, mi)| ma > 1 || mi >= MIN_MINOR);
            out.push(Finding {
                check: format!("Kubernetes 1.{MIN_MINOR} or later (native sidecars)"),
                ok,
                detail: if ok {
                    info.git_version
                } else {
                    format!("{} is too old: upgrade the cluster to 1.{MIN_MINOR} or later", info.git_version)
                },
            });
        }
    }
    let api: Api<SelfSubjectAccessReview> = Api::all(client);
    for (group, resource, verb) in NEEDED {
        let review = SelfSubjectAccessReview {
            spec: SelfSubjectAccessReviewSpec {
                resource_attributes: Some(ResourceAttributes {
                    group: Some(group.into()),
                    resource: Some(resource.into()),
                    verb: Some(verb.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let what = if group.is_empty() { resource.to_string() } else { format!("{resource}.{group}") };
        let (ok, detail) = match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => (true, "allowed".to_string()),
            Ok(_) => (false, format!("you may not {verb} {what}: install as a cluster admin")),
            Err(e) => (false, format!("cannot ask the API server ({e})")),
        };
        out.push(Finding { check: format!("may {verb} {what}"), ok, detail });
    }
    out
}

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::testing::{mock, step};

    fn version(minor: &str) -> serde_json::Value {
        json!({"major": "1", "minor": minor, "gitVersion": format!("v1.{minor}.2"), "gitCommit": "",
               "gitTreeState": "", "buildDate": "2026-11-01T00:00:00Z", "goVersion": "go1.26",
               "compiler": "gc", "platform": "linux/amd64"})
    }

    fn review(allowed: bool) -> serde_json::Value {
        json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
               "spec": {}, "status": {"allowed": allowed}})
    }

    const SSAR: &str = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews";

    #[tokio::test]
    async fn a_recent_cluster_and_an_admin_pass_every_check() {
        let mut script = vec![step(Method::GET, "/version", 200, version("37"))];
        script.extend((0..NEEDED.len()).map(|_| step(Method::POST, SSAR, 201, review(true))));
        let (client, seen, task) = mock(script);
        let found = pre(client).await;
        task.await.unwrap();
        assert!(found.iter().all(|f| f.ok), "{found:#?}");
        assert_eq!(found.len(), 2 + NEEDED.len());
        let first = seen.lock().unwrap()[1].body.clone();
        assert_eq!(
            first["spec"]["resourceAttributes"],
            json!({"group": "apiextensions.k8s.io", "resource": "customresourcedefinitions", "verb": "create"})
        );
    }

    #[tokio::test]
    async fn an_old_cluster_and_a_missing_permission_say_what_to_do() {
        let mut script = vec![step(Method::GET, "/version", 200, version("28+"))];
        script.push(step(Method::POST, SSAR, 201, review(false)));
        script.extend((1..NEEDED.len()).map(|_| step(Method::POST, SSAR, 201, review(true))));
        let (client, _, task) = mock(script);
        let found = pre(client).await;
        task.await.unwrap();
        let failed: Vec<&Finding> = found.iter().filter(|f| !f.ok).collect();
        assert_eq!(failed.len(), 2, "{found:#?}");
        assert!(failed[0].detail.contains("upgrade the cluster to 1.29"), "{}", failed[0].detail);
        assert!(failed[1].detail.contains("install as a cluster admin"), "{}", failed[1].detail);
    }

    #[test]
    fn versions_parse_as_vendors_write_them() {
        assert_eq!(minor_of("1", "37"), Some((1, 37)));
        assert_eq!(minor_of("1", "30+"), Some((1, 30)));
        assert_eq!(minor_of("", ""), None);
    }
}
