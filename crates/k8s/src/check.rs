//! `trellis check --kubernetes`. With `--pre` ([`pre`]): can Trellis be
//! installed on this cluster? The API server answers, its version runs
//! native sidecars (1.29 or later), and the user may create what `trellis
//! install` creates. Else ([`post`]): is the installed mesh healthy? CRDs,
//! control-plane replicas, the webhook (its caBundle, and a dry-run pod it
//! must inject), the CA's remaining validity, every pod of an injected
//! namespace with its sidecar ready, proxy and control-plane versions.
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
    (
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "create",
    ),
    (
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "create",
    ),
    ("rbac.authorization.k8s.io", "clusterroles", "create"),
    ("rbac.authorization.k8s.io", "clusterrolebindings", "create"),
    ("", "namespaces", "create"),
    ("apps", "deployments", "create"),
];

/// `v1.37.2`, `1.29+`, `v1.30.1-gke.100` → (1, 37).
fn minor_of(major: &str, minor: &str) -> Option<(u32, u32)> {
    let digits = |s: &str| {
        s.chars()
            .take_while(char::is_ascii_digit)
            .collect::<String>()
    };
    Some((digits(major).parse().ok()?, digits(minor).parse().ok()?))
}

pub async fn pre(client: kube::Client) -> Vec<Finding> {
    let mut out = Vec::new();
    match client.apiserver_version().await {
        Err(e) => {
            out.push(Finding {
                check: "API server reachable".into(),
                ok: false,
                detail: format!(
                    "{e}: check the kubeconfig's current context (`kubectl cluster-info`)"
                ),
            });
            return out;
        }
        Ok(info) => {
            out.push(Finding {
                check: "API server reachable".into(),
                ok: true,
                detail: info.git_version.clone(),
            });
            let ok = minor_of(&info.major, &info.minor)
                .is_some_and(|(ma, mi)| ma > 1 || mi >= MIN_MINOR);
            out.push(Finding {
                check: format!("Kubernetes 1.{MIN_MINOR} or later (native sidecars)"),
                ok,
                detail: if ok {
                    info.git_version
                } else {
                    format!(
                        "{} is too old: upgrade the cluster to 1.{MIN_MINOR} or later",
                        info.git_version
                    )
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
        let what = if group.is_empty() {
            resource.to_string()
        } else {
            format!("{resource}.{group}")
        };
        let (ok, detail) = match api.create(&PostParams::default(), &review).await {
            Ok(r) if r.status.as_ref().is_some_and(|s| s.allowed) => (true, "allowed".to_string()),
            Ok(_) => (
                false,
                format!("you may not {verb} {what}: install as a cluster admin"),
            ),
            Err(e) => (false, format!("cannot ask the API server ({e})")),
        };
        out.push(Finding {
            check: format!("may {verb} {what}"),
            ok,
            detail,
        });
    }
    out
}

/// The CRDs `trellis install --crds` installs.
const CRDS: [&str; 5] = [
    "meshes.trellis.dev",
    "trafficpolicies.trellis.dev",
    "authorizationpolicies.trellis.dev",
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

fn finding(check: impl Into<String>, ok: bool, detail: impl Into<String>) -> Finding {
    Finding {
        check: check.into(),
        ok,
        detail: detail.into(),
    }
}

/// The installed mesh in `namespace`. `ca_days_left` reads the CA roots
/// (PEM) and says how many days the first of them to expire has left.
pub async fn post(
    client: kube::Client,
    namespace: &str,
    ca_days_left: impl Fn(&str) -> Option<i64>,
) -> Vec<Finding> {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
    use kube::api::ListParams;

    use crate::names::{
        CA_SECRET, CONTROL_PLANE, INJECT_ANNOTATION, INJECT_LABEL, PROXY_CONTAINER, WEBHOOK_CONFIG,
    };

    let mut out = Vec::new();
    match crate::client::crd_names(client.clone()).await {
        Err(e) => {
            out.push(finding(
                "API server reachable",
                false,
                format!("{e}: check the kubeconfig's current context (`kubectl cluster-info`)"),
            ));
            return out;
        }
        Ok(names) => {
            let missing: Vec<&str> = CRDS
                .iter()
                .copied()
                .filter(|c| !names.contains(*c))
                .collect();
            out.push(if missing.is_empty() {
                finding("CRDs installed", true, format!("{} CRDs", CRDS.len()))
            } else {
                finding(
                    "CRDs installed",
                    false,
                    format!(
                        "missing {}: run `trellis install --crds | kubectl apply -f -`",
                        missing.join(", ")
                    ),
                )
            });
        }
    }

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let control_image = match deployments.get_opt(CONTROL_PLANE).await {
        Ok(Some(d)) => {
            let want = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
            let ready = d
                .status
                .as_ref()
                .and_then(|s| s.ready_replicas)
                .unwrap_or(0);
            out.push(finding(
                "control plane replicas ready",
                ready >= want && ready > 0,
                if ready >= want && ready > 0 {
                    format!("{ready}/{want}")
                } else {
                    format!("{ready}/{want} ready: see `kubectl -n {namespace} logs deploy/{CONTROL_PLANE}` and `kubectl -n {namespace} describe pods`")
                },
            ));
            // The image the webhook injects (`--proxy-image`), else the
            // control plane's own.
            d.spec
                .and_then(|s| s.template.spec)
                .and_then(|s| s.containers.into_iter().next())
                .and_then(|c| {
                    c.env
                        .iter()
                        .flatten()
                        .find(|e| e.name == crate::names::PROXY_IMAGE_ENV)
                        .and_then(|e| e.value.clone())
                        .or(c.image)
                })
        }
        Ok(None) => {
            out.push(finding("control plane installed", false, format!("no Deployment {namespace}/{CONTROL_PLANE}: run `trellis install | kubectl apply -f -`")));
            None
        }
        Err(e) => {
            out.push(finding(
                "control plane installed",
                false,
                format!("cannot read it: {e}"),
            ));
            None
        }
    };

    // The CA: its roots, their validity, and the webhook's caBundle.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let roots = match secrets.get_opt(CA_SECRET).await {
        Ok(Some(s)) => s.data.and_then(|d| {
            d.get("roots.pem")
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        }),
        Ok(None) => None,
        Err(e) => {
            out.push(finding(
                "mesh CA",
                false,
                format!("cannot read Secret {namespace}/{CA_SECRET}: {e}"),
            ));
            None
        }
    };
    match roots.as_deref().map(|r| (r, ca_days_left(r))) {
        None => out.push(finding("mesh CA", false, format!("no roots in Secret {namespace}/{CA_SECRET}: the control plane makes it on start; see its log"))),
        Some((_, Some(days))) if days >= 60 => out.push(finding("mesh CA valid 60 days or more", true, format!("{days} days left"))),
        Some((_, days)) => out.push(finding(
            "mesh CA valid 60 days or more",
            false,
            format!("{} days left: rotate the CA (docs/kubernetes.md, CA rotation)", days.map_or("unknown".into(), |d| d.to_string())),
        )),
    }
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    match (webhooks.get_opt(WEBHOOK_CONFIG).await, &roots) {
        (Ok(Some(w)), Some(roots)) => {
            let right = w.webhooks.iter().flatten().all(|h| {
                h.client_config.ca_bundle.as_ref().map(|b| b.0.as_slice()) == Some(roots.as_bytes())
            });
            out.push(finding(
                "webhook caBundle is the mesh CA",
                right,
                if right {
                    "matches Secret trellis-ca".to_string()
                } else {
                    format!("the caBundle of MutatingWebhookConfiguration {WEBHOOK_CONFIG} is not the mesh CA's roots, so the API server cannot trust the webhook's certificate: the control plane restores it within 30 s; if it does not, see its log")
                },
            ));
        }
        (Ok(None), _) => out.push(finding("webhook installed", false, format!("no MutatingWebhookConfiguration {WEBHOOK_CONFIG}: run `trellis install | kubectl apply -f -`"))),
        (Err(e), _) => out.push(finding("webhook installed", false, format!("cannot read it: {e}"))),
        (Ok(Some(_)), None) => {}
    }
    // The webhook end to end: a dry-run pod that asks for the sidecar must
    // come back with it (the API server reached the webhook over TLS and
    // trusted its certificate for the Service's name).
    let probe: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        // The label: the webhook's objectSelector matches labels only.
        "metadata": { "generateName": "trellis-check-", "labels": { INJECT_LABEL: "enabled" } },
        "spec": { "containers": [{ "name": "app", "image": "trellis-check" }] },
    }))
    .expect("a Pod");
    let pods_default: Api<Pod> = Api::namespaced(client.clone(), "default");
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    match pods_default.create(&dry, &probe).await {
        Ok(p) if crate::inject::is_injected(&p) => out.push(finding("webhook injects", true, "a dry-run pod got the sidecar")),
        Ok(_) => out.push(finding(
            "webhook injects",
            false,
            format!("a dry-run pod came back without the sidecar: the API server cannot reach the webhook (Service {namespace}/{}) or does not trust its certificate; see `kubectl -n {namespace} logs deploy/{CONTROL_PLANE}`", crate::names::WEBHOOK_SERVICE),
        )),
        Err(e) => out.push(finding("webhook injects", false, format!("the dry-run pod was refused: {e}"))),
    }

    // Every running pod of an injected namespace has its sidecar, ready and
    // of the control plane's version.
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let injected_ns: Vec<String> = match namespaces
        .list(&ListParams::default().labels(&format!("{INJECT_LABEL}=enabled")))
        .await
    {
        Ok(l) => l
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect(),
        Err(e) => {
            out.push(finding(
                "injected namespaces",
                false,
                format!("cannot list namespaces: {e}"),
            ));
            Vec::new()
        }
    };
    let (mut meshed, mut problems) = (0, Vec::new());
    for ns in &injected_ns {
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        let Ok(list) = pods.list(&ListParams::default()).await else {
            continue;
        };
        for pod in list.items {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
            let opted_out = pod
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(INJECT_ANNOTATION))
                .map(String::as_str)
                == Some("disabled");
            if !running || opted_out {
                continue;
            }
            let sidecar = pod.spec.as_ref().and_then(|s| {
                s.init_containers
                    .iter()
                    .flatten()
                    .find(|c| c.name == PROXY_CONTAINER)
                    .cloned()
            });
            let Some(sidecar) = sidecar else {
                problems.push(format!("pod {ns}/{name} has no sidecar: it started before injection was on (or while the webhook was down): restart it, e.g. `kubectl -n {ns} rollout restart deploy/...` or delete the pod"));
                continue;
            };
            let ready = pod
                .status
                .as_ref()
                .and_then(|s| s.init_container_statuses.as_ref())
                .is_some_and(|st| st.iter().any(|c| c.name == PROXY_CONTAINER && c.ready));
            if !ready {
                problems.push(format!("pod {ns}/{name}: its sidecar is not ready (not connected to the control plane, or no certificate): see `kubectl -n {ns} logs {name} -c {PROXY_CONTAINER}`"));
                continue;
            }
            if let (Some(ci), Some(pi)) = (&control_image, &sidecar.image) {
                if ci != pi {
                    problems.push(format!("pod {ns}/{name}: its sidecar runs {pi}, the control plane injects {ci}: restart the pod to take the current proxy"));
                    continue;
                }
            }
            meshed += 1;
        }
    }
    if problems.is_empty() {
        out.push(finding(
            "sidecars ready",
            true,
            format!("{meshed} pods in {} injected namespaces", injected_ns.len()),
        ));
    } else {
        for p in problems {
            out.push(finding("sidecars ready", false, p));
        }
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
        assert!(
            failed[0].detail.contains("upgrade the cluster to 1.29"),
            "{}",
            failed[0].detail
        );
        assert!(
            failed[1].detail.contains("install as a cluster admin"),
            "{}",
            failed[1].detail
        );
    }

    #[test]
    fn versions_parse_as_vendors_write_them() {
        assert_eq!(minor_of("1", "37"), Some((1, 37)));
        assert_eq!(minor_of("1", "30+"), Some((1, 30)));
        assert_eq!(minor_of("", ""), None);
    }
}
