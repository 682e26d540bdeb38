use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::*;

fn docs(yaml: &str) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(yaml)
        .map(|de| serde::Deserialize::deserialize(de).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn default_docs() -> Vec<Value> {
    docs(&manifests(&InstallOptions::default()).unwrap())
}

fn ha_docs() -> Vec<Value> {
    docs(
        &manifests(&InstallOptions {
            ha: true,
            ..Default::default()
        })
        .unwrap(),
    )
}

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/trellis")
}

#[test]
fn the_same_options_give_the_same_bytes() {
    let opts = InstallOptions::default();
    assert_eq!(manifests(&opts).unwrap(), manifests(&opts).unwrap());
    assert_eq!(template(), template());
}

#[test]
fn every_object_is_a_well_formed_kubernetes_object() {
    // Read into the typed k8s-openapi object and written back, an object
    // loses any field Kubernetes does not know: a misspelt field fails here.
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::apps::v1::Deployment;
    use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
    use k8s_openapi::api::policy::v1::PodDisruptionBudget;
    use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
    fn round_trip<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> Value {
        serde_json::to_value(serde_json::from_value::<T>(v.clone()).unwrap()).unwrap()
    }
    for d in default_docs().iter().chain(&ha_docs()) {
        let back = match d["kind"].as_str().unwrap() {
            "Namespace" => round_trip::<Namespace>(d),
            "ServiceAccount" => round_trip::<ServiceAccount>(d),
            "ClusterRole" => round_trip::<ClusterRole>(d),
            "ClusterRoleBinding" => round_trip::<ClusterRoleBinding>(d),
            "Role" => round_trip::<Role>(d),
            "RoleBinding" => round_trip::<RoleBinding>(d),
            "Service" => round_trip::<Service>(d),
            "Deployment" => round_trip::<Deployment>(d),
            "PodDisruptionBudget" => round_trip::<PodDisruptionBudget>(d),
            "MutatingWebhookConfiguration" => round_trip::<MutatingWebhookConfiguration>(d),
            other => panic!("unexpected kind {other}"),
        };
        assert_eq!(
            &back, d,
            "{} {} lost a field",
            d["kind"], d["metadata"]["name"]
        );
    }
}

#[test]
fn install_lists_what_the_control_plane_needs_in_apply_order() {
    let kinds: Vec<String> = default_docs()
        .iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "Namespace/trellis-system",
            "ServiceAccount/trellis-control",
            "ClusterRole/trellis-control",
            "ClusterRoleBinding/trellis-control",
            "Role/trellis-control",
            "RoleBinding/trellis-control",
            "ServiceAccount/trellis-viewer",
            "ServiceAccount/trellis-tap",
            "Role/trellis-viewer",
            "Role/trellis-tap",
            "Service/trellis-control",
            "Service/trellis-webhook",
            "Deployment/trellis-control",
            "MutatingWebhookConfiguration/trellis-sidecar-injector",
        ]
    );
}

#[test]
fn ha_means_three_spread_replicas_a_budget_and_a_failing_webhook() {
    let (plain, ha) = (default_docs(), ha_docs());
    let dep = find(&plain, "Deployment", "trellis-control");
    assert_eq!(dep["spec"]["replicas"], 2);
    assert!(dep["spec"]["template"]["spec"]["affinity"].is_null());
    let dep = find(&ha, "Deployment", "trellis-control");
    assert_eq!(dep["spec"]["replicas"], 3);
    assert_eq!(
        dep["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
            ["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
            ["topologyKey"],
        "kubernetes.io/hostname"
    );
    assert!(!plain.iter().any(|d| d["kind"] == "PodDisruptionBudget"));
    let pdb = find(&ha, "PodDisruptionBudget", "trellis-control");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    for (docs, policy) in [(&plain, "Ignore"), (&ha, "Fail")] {
        let wh = find(
            docs,
            "MutatingWebhookConfiguration",
            "trellis-sidecar-injector",
        );
        for w in wh["webhooks"].as_array().unwrap() {
            assert_eq!(w["failurePolicy"], policy);
        }
    }
}

#[test]
fn the_control_plane_runs_locked_down() {
    let d = default_docs();
    let pod = &find(&d, "Deployment", "trellis-control")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    assert_eq!(
        c["securityContext"],
        json!({"allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true,
               "capabilities": {"drop": ["ALL"]}})
    );
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], "webhook");
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["image"], default_image());
    // The sidecar image the webhook injects is the control plane's own.
    let env = c["env"].as_array().unwrap();
    assert!(env.contains(&json!({"name": "TRELLIS_PROXY_IMAGE", "value": default_image()})));
}

#[test]
fn rbac_grants_only_what_each_part_uses() {
    let d = default_docs();
    let rules = |kind: &str| {
        find(&d, kind, "trellis-control")["rules"]
            .as_array()
            .unwrap()
            .clone()
    };
    let mut granted = Vec::new();
    for (scope, rules) in [
        ("cluster", rules("ClusterRole")),
        ("namespace", rules("Role")),
    ] {
        for r in rules {
            for group in r["apiGroups"].as_array().unwrap() {
                for res in r["resources"].as_array().unwrap() {
                    for verb in r["verbs"].as_array().unwrap() {
                        let names = r
                            .get("resourceNames")
                            .map(|n| n.to_string())
                            .unwrap_or_default();
                        granted.push(format!(
                            "{scope} {}/{} {}{names}",
                            group.as_str().unwrap(),
                            res.as_str().unwrap(),
                            verb.as_str().unwrap()
                        ));
                    }
                }
            }
        }
    }
    assert!(!granted.iter().any(|g| g.contains('*')), "{granted:#?}");
    // Nothing writes but: route status, token reviews, the webhook's own
    // configuration, the CA Secret and the Lease.
    let writes: Vec<&String> = granted
        .iter()
        .filter(|g| {
            !g.ends_with(" get")
                && !g.contains(" get[")
                && !g.contains(" list")
                && !g.contains(" watch")
        })
        .collect();
    assert_eq!(
        writes,
        [
            "cluster gateway.networking.k8s.io/httproutes/status patch",
            "cluster gateway.networking.k8s.io/grpcroutes/status patch",
            "cluster authentication.k8s.io/tokenreviews create",
            "cluster admissionregistration.k8s.io/mutatingwebhookconfigurations patch[\"trellis-sidecar-injector\"]",
            "namespace /secrets create",
            "namespace /secrets update[\"trellis-ca\"]",
            "namespace coordination.k8s.io/leases create",
            "namespace coordination.k8s.io/leases update[\"trellis-control\"]",
            "namespace /configmaps create",
            "namespace /configmaps update[\"trellis-ca-roots\"]",
        ]
    );
    // Secrets are readable in the control plane's namespace only, and only the CA's.
    let secrets: Vec<&String> = granted.iter().filter(|g| g.contains("secrets")).collect();
    assert!(
        secrets.iter().all(|g| g.starts_with("namespace ")),
        "{secrets:?}"
    );
    assert!(secrets
        .iter()
        .filter(|g| !g.ends_with("create"))
        .all(|g| g.contains("trellis-ca")));
}

#[test]
fn the_webhook_injects_the_proxy_image_when_given_and_the_control_planes_otherwise() {
    let env = |docs: &[Value]| {
        find(docs, "Deployment", "trellis-control")["spec"]["template"]["spec"]["containers"][0]
            .clone()
    };
    let plain = env(&default_docs());
    assert!(plain["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "TRELLIS_PROXY_IMAGE", "value": default_image()})));
    let opts = InstallOptions {
        proxy_image: Some("reg.example/trellis-proxy:1".into()),
        ..Default::default()
    };
    let split = env(&docs(&manifests(&opts).unwrap()));
    assert_eq!(
        split["image"],
        default_image(),
        "the control plane keeps its image"
    );
    assert!(split["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "TRELLIS_PROXY_IMAGE", "value": "reg.example/trellis-proxy:1"})));
    // The chart's value does the same.
    let t = std::fs::read_to_string(chart_dir().join("templates/trellis.yaml")).unwrap();
    let rendered = template::render(
        &t,
        &chart_values(&[
            ("createNamespace", template::Value::Bool(true)),
            (
                "proxyImage",
                template::Value::Str("reg.example/trellis-proxy:1".into()),
            ),
        ]),
    )
    .unwrap();
    assert_eq!(rendered, manifests(&opts).unwrap());
    let bad = InstallOptions {
        proxy_image: Some("no spaces".into()),
        ..Default::default()
    };
    assert!(manifests(&bad)
        .unwrap_err()
        .to_string()
        .contains("no spaces"));
}

#[test]
fn observers_may_forward_to_the_replicas_and_make_only_their_own_tokens() {
    let d = default_docs();
    for account in ["trellis-viewer", "trellis-tap"] {
        let sa = find(&d, "ServiceAccount", account);
        assert_eq!(sa["metadata"]["namespace"], "trellis-system");
        assert_eq!(sa["automountServiceAccountToken"], false);
        // The accounts hold no Kubernetes permission of their own.
        assert!(!d
            .iter()
            .any(|doc| doc["kind"].as_str().unwrap().ends_with("Binding")
                && doc["subjects"].to_string().contains(account)));
    }
    let tokens = |role: &str| {
        let rules = find(&d, "Role", role)["rules"].as_array().unwrap().clone();
        assert!(
            !rules.iter().any(|r| r.to_string().contains('*')),
            "{rules:?}"
        );
        assert!(!rules
            .iter()
            .any(|r| r["resources"].to_string().contains("secrets")));
        rules
            .iter()
            .find(|r| r["resources"] == json!(["serviceaccounts/token"]))
            .unwrap()["resourceNames"]
            .clone()
    };
    assert_eq!(tokens("trellis-viewer"), json!(["trellis-viewer"]));
    assert_eq!(
        tokens("trellis-tap"),
        json!(["trellis-viewer", "trellis-tap"])
    );
}

#[test]
fn the_webhook_never_sees_kube_system_or_the_control_planes_namespace() {
    let d = docs(
        &manifests(&InstallOptions {
            namespace: "mesh".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let wh = find(
        &d,
        "MutatingWebhookConfiguration",
        "trellis-sidecar-injector",
    );
    for w in wh["webhooks"].as_array().unwrap() {
        let exprs = w["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap();
        assert!(exprs.contains(
            &json!({"key": "kubernetes.io/metadata.name", "operator": "NotIn",
                                       "values": ["kube-system", "mesh"]})
        ));
        assert_eq!(w["clientConfig"]["service"]["namespace"], "mesh");
        assert!(
            w["clientConfig"].get("caBundle").is_none(),
            "the control plane fills caBundle"
        );
        assert_eq!(w["sideEffects"], "None");
        assert_eq!(w["rules"][0]["operations"], json!(["CREATE"]));
    }
    // The namespace is substituted everywhere and no placeholder is left.
    let text = manifests(&InstallOptions {
        namespace: "mesh".into(),
        ..Default::default()
    })
    .unwrap();
    assert!(
        !text.contains("__TRELLIS") && !text.contains("{{"),
        "{text}"
    );
    assert!(!text.contains("trellis-system"));
    assert_eq!(
        find(&d, "ClusterRoleBinding", "trellis-control")["subjects"][0]["namespace"],
        "mesh"
    );
}

#[test]
fn bad_options_are_refused_with_what_to_do() {
    let bad_ns = InstallOptions {
        namespace: "Trellis_System".into(),
        ..Default::default()
    };
    assert!(matches!(
        manifests(&bad_ns),
        Err(InstallError::BadNamespace(_))
    ));
    let bad_image = InstallOptions {
        image: "x\" y".into(),
        ..Default::default()
    };
    let err = manifests(&bad_image).unwrap_err();
    assert!(
        err.to_string().contains("e.g. `trellis.local/trellis"),
        "{err}"
    );
}

#[test]
fn uninstall_deletes_the_webhook_first_and_crds_only_when_asked() {
    let plain = docs(&uninstall("trellis-system", false).unwrap());
    assert_eq!(plain[0]["kind"], "MutatingWebhookConfiguration");
    assert!(plain
        .iter()
        .any(|d| d["kind"] == "Namespace" && d["metadata"]["name"] == "trellis-system"));
    assert!(!plain
        .iter()
        .any(|d| d["kind"] == "CustomResourceDefinition"));
    let with = docs(&uninstall("trellis-system", true).unwrap());
    let crds: Vec<&str> = with
        .iter()
        .filter(|d| d["kind"] == "CustomResourceDefinition")
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        crds,
        [
            "meshes.trellis.dev",
            "trafficpolicies.trellis.dev",
            "authorizationpolicies.trellis.dev"
        ]
    );
}

#[test]
fn crds_print_the_trellis_ones_and_only_absent_gateway_ones() {
    let all = docs(&crds_manifest(&Default::default()));
    assert_eq!(all.len(), 6);
    let present = crate::gateway::NEEDED
        .iter()
        .map(|s| s.to_string())
        .collect();
    let some = docs(&crds_manifest(&present));
    let names: Vec<&str> = some
        .iter()
        .map(|d| d["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "meshes.trellis.dev",
            "trafficpolicies.trellis.dev",
            "authorizationpolicies.trellis.dev"
        ]
    );
}

#[test]
fn the_chart_in_the_repo_is_the_generated_one() {
    for (path, contents) in chart_files() {
        let on_disk = std::fs::read_to_string(chart_dir().join(&path)).unwrap_or_default();
        assert!(
            on_disk == contents,
            "charts/trellis/{path} is not what the generator writes: run `cargo run -p trellis-k8s --example chart`"
        );
    }
}

/// The chart's values.yaml, read as Helm reads it, into template values.
fn chart_values(overrides: &[(&str, template::Value)]) -> Values {
    let text = std::fs::read_to_string(chart_dir().join("values.yaml")).unwrap();
    let map: std::collections::BTreeMap<String, serde_yaml_ng::Value> =
        serde_yaml_ng::from_str(&text).unwrap();
    let mut values = Values {
        namespace: DEFAULT_NAMESPACE.into(),
        ..Default::default()
    };
    for (k, v) in map {
        let v = match v {
            serde_yaml_ng::Value::Bool(b) => template::Value::Bool(b),
            serde_yaml_ng::Value::String(s) => template::Value::Str(s),
            other => panic!("values.yaml: {k} is {other:?}"),
        };
        values.values.insert(k, v);
    }
    for (k, v) in overrides {
        values.values.insert(k.to_string(), v.clone());
    }
    values
}

#[test]
fn install_is_the_chart_rendered_with_its_default_values() {
    let t = std::fs::read_to_string(chart_dir().join("templates/trellis.yaml")).unwrap();
    // The chart leaves the namespace to `helm install --create-namespace`;
    // `trellis install` makes it.
    let rendered = template::render(
        &t,
        &chart_values(&[("createNamespace", template::Value::Bool(true))]),
    )
    .unwrap();
    assert_eq!(rendered, manifests(&InstallOptions::default()).unwrap());
    let ha = template::render(
        &t,
        &chart_values(&[
            ("createNamespace", template::Value::Bool(true)),
            ("ha", template::Value::Bool(true)),
        ]),
    )
    .unwrap();
    assert_eq!(
        ha,
        manifests(&InstallOptions {
            ha: true,
            ..Default::default()
        })
        .unwrap()
    );
    let helm_default = template::render(&t, &chart_values(&[])).unwrap();
    assert!(!docs(&helm_default).iter().any(|d| d["kind"] == "Namespace"));
}

/// helm, if this machine has it: `TRELLIS_HELM` (set by scripts/test
/// from `scripts/test-peers helm`, which builds it from its Go module into
/// the peers cache), the cache itself, or PATH.
fn helm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("TRELLIS_HELM") {
        return Some(PathBuf::from(p));
    }
    let cache = std::env::var("TRELLIS_CACHE_DIR").unwrap_or_else(|_| "/var/cache/trellis".into());
    let cached = Path::new(&cache)
        .join("peers")
        .join(format!("helm-{HELM_VERSION}"))
        .join("helm");
    if cached.exists() {
        return Some(cached);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("helm"))
            .find(|p| p.exists())
    })
}

/// The helm release `scripts/test-peers helm` builds.
const HELM_VERSION: &str = "v3.22.0";

#[test]
fn helm_renders_the_chart_as_trellis_install_does() {
    let Some(helm) = helm() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "helm is missing under CI=true: scripts/test-peers helm builds it"
        );
        eprintln!("skipped: no helm (scripts/test-peers helm builds it into the peers cache)");
        return;
    };
    for (ha, opts) in [
        ("false", InstallOptions::default()),
        (
            "true",
            InstallOptions {
                ha: true,
                ..Default::default()
            },
        ),
    ] {
        let out = std::process::Command::new(&helm)
            .args(["template", "trellis"])
            .arg(chart_dir())
            .args([
                "--namespace",
                DEFAULT_NAMESPACE,
                "--set",
                "createNamespace=true",
                "--set",
            ])
            .arg(format!("ha={ha}"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut from_helm = docs(&String::from_utf8(out.stdout).unwrap());
        let mut ours = docs(&manifests(&opts).unwrap());
        // Helm orders objects by kind; compare them as sets.
        let key = |d: &Value| format!("{}/{}", d["kind"], d["metadata"]["name"]);
        from_helm.sort_by_key(key);
        ours.sort_by_key(key);
        assert_eq!(from_helm, ours, "ha={ha}");
    }
    let lint = std::process::Command::new(&helm)
        .arg("lint")
        .arg(chart_dir())
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "{}",
        String::from_utf8_lossy(&lint.stdout)
    );
}
