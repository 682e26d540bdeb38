use serde_json::json;

use super::*;

fn cfg() -> InjectConfig {
    InjectConfig::new("trellis.local/trellis:test", "trellis-system")
}

fn pod(v: serde_json::Value) -> Pod {
    serde_json::from_value(v).unwrap()
}

/// A Deployment's pod as the ReplicaSet controller creates it.
fn web_pod() -> Pod {
    pod(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "generateName": "web-7d9f8b6c5-", "namespace": "shop",
            "labels": { "app": "web", "pod-template-hash": "7d9f8b6c5" },
            "ownerReferences": [{ "apiVersion": "apps/v1", "kind": "ReplicaSet",
                "name": "web-7d9f8b6c5", "uid": "u1", "controller": true }],
        },
        "spec": {
            "serviceAccountName": "web",
            "initContainers": [{ "name": "migrate", "image": "app:1" }],
            "containers": [{
                "name": "app", "image": "app:1",
                "ports": [{ "name": "http", "containerPort": 8080 }],
                "livenessProbe": { "httpGet": { "path": "/healthz", "port": "http" } },
                "readinessProbe": { "tcpSocket": { "port": 8080 } },
                "startupProbe": { "exec": { "command": ["true"] } },
            }],
        },
    }))
}

fn labelled() -> BTreeMap<String, String> {
    BTreeMap::from([(INJECT_LABEL.to_string(), "enabled".to_string())])
}

fn with_annotation(mut p: Pod, k: &str, v: &str) -> Pod {
    p.metadata
        .annotations
        .get_or_insert_default()
        .insert(k.into(), v.into());
    p
}

#[test]
fn the_namespace_label_opts_in_and_the_pods_annotation_overrides_it() {
    let c = cfg();
    let none = BTreeMap::new();
    assert_eq!(
        decide(&web_pod(), "shop", &labelled(), &c),
        Decision::Inject
    );
    assert!(matches!(
        decide(&web_pod(), "shop", &none, &c),
        Decision::Skip(_)
    ));
    let off = with_annotation(web_pod(), INJECT_ANNOTATION, "disabled");
    assert!(matches!(
        decide(&off, "shop", &labelled(), &c),
        Decision::Skip(_)
    ));
    let on = with_annotation(web_pod(), INJECT_ANNOTATION, "enabled");
    assert_eq!(decide(&on, "shop", &none, &c), Decision::Inject);
    // The label, which the second webhook selects on, says the same.
    let mut by_label = web_pod();
    by_label
        .metadata
        .labels
        .get_or_insert_default()
        .insert(INJECT_LABEL.into(), "enabled".into());
    assert_eq!(decide(&by_label, "shop", &none, &c), Decision::Inject);
    let odd = with_annotation(web_pod(), INJECT_ANNOTATION, "yes");
    match decide(&odd, "shop", &labelled(), &c) {
        Decision::Skip(why) => assert!(why.contains("neither `enabled` nor `disabled`"), "{why}"),
        d => panic!("{d:?}"),
    }
}

#[test]
fn kube_system_the_control_plane_and_host_network_pods_are_never_injected() {
    let c = cfg();
    let on = with_annotation(web_pod(), INJECT_ANNOTATION, "enabled");
    for ns in ["kube-system", "trellis-system"] {
        assert!(
            matches!(decide(&on, ns, &labelled(), &c), Decision::Skip(_)),
            "{ns}"
        );
    }
    let mut host = on.clone();
    host.spec.as_mut().unwrap().host_network = Some(true);
    assert!(matches!(
        decide(&host, "shop", &labelled(), &c),
        Decision::Skip(_)
    ));
}

#[test]
fn injection_is_idempotent() {
    let c = cfg();
    let once = inject(&web_pod(), &c).unwrap();
    assert_eq!(
        decide(&once, "shop", &labelled(), &c),
        Decision::Skip("already injected".into())
    );
    // Even a pod whose annotation was stripped is recognised by its sidecar.
    let mut stripped = once.clone();
    stripped.metadata.annotations = None;
    assert!(is_injected(&stripped));
}

fn init_containers(p: &Pod) -> Vec<Container> {
    p.spec.as_ref().unwrap().init_containers.clone().unwrap()
}

#[test]
fn the_init_container_then_the_native_sidecar_come_before_the_pods_own() {
    let p = inject(&web_pod(), &cfg()).unwrap();
    let inits = init_containers(&p);
    let names: Vec<&str> = inits.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
    // The app's containers are untouched in number: nothing but the native
    // sidecar runs beside them, and the kubelet stops it when they exit,
    // so a Job's pod completes.
    let spec = p.spec.as_ref().unwrap();
    assert_eq!(spec.containers.len(), 1);
    assert_eq!(inits[1].restart_policy.as_deref(), Some("Always"));
    assert!(inits[0].restart_policy.is_none() && inits[2].restart_policy.is_none());
    assert_eq!(
        p.metadata.annotations.as_ref().unwrap()[INJECTED_ANNOTATION],
        env!("CARGO_PKG_VERSION")
    );
}

#[test]
fn the_init_container_has_net_admin_and_net_raw_and_nothing_else() {
    let p = inject(&web_pod(), &cfg()).unwrap();
    let init = &init_containers(&p)[0];
    let sc = serde_json::to_value(init.security_context.as_ref().unwrap()).unwrap();
    assert_eq!(
        sc["capabilities"],
        json!({"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]})
    );
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["runAsUser"], 0);
    let args = init.args.clone().unwrap();
    assert_eq!(args[..3], ["init", "--proxy-uid", "1337"]);
}

#[test]
fn the_proxy_runs_as_its_uid_without_capabilities_and_presents_a_projected_token() {
    let p = inject(&web_pod(), &cfg()).unwrap();
    let proxy = &init_containers(&p)[1];
    let sc = serde_json::to_value(proxy.security_context.as_ref().unwrap()).unwrap();
    assert_eq!(sc["runAsUser"], PROXY_UID);
    assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}));
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let startup = serde_json::to_value(proxy.startup_probe.as_ref().unwrap()).unwrap();
    assert_eq!(startup["httpGet"]["path"], "/ready");
    assert_eq!(startup["httpGet"]["port"], 15000);
    let args = proxy.args.clone().unwrap();
    let arg = |flag: &str| args[args.iter().position(|a| a == flag).unwrap() + 1].clone();
    assert_eq!(
        arg("--control-plane"),
        "trellis-control.trellis-system.svc:15010"
    );
    assert_eq!(arg("--token-file"), TOKEN_FILE);
    assert_eq!(arg("--workload"), "web");
    assert_eq!(arg("--app-port"), "8080");
    assert_eq!(arg("--labels"), "app=web");
    let env: Vec<String> = proxy.env.iter().flatten().map(|e| e.name.clone()).collect();
    for name in [
        "TRELLIS_POD_NAME",
        "TRELLIS_POD_NAMESPACE",
        "TRELLIS_SERVICE_ACCOUNT",
        "TRELLIS_POD_IP",
        "TRELLIS_NODE_NAME",
    ] {
        assert!(env.contains(&name.to_string()), "{name}");
    }
    let spec = serde_json::to_value(p.spec.as_ref().unwrap()).unwrap();
    let token = spec["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == TOKEN_VOLUME)
        .unwrap();
    assert_eq!(
        token["projected"]["sources"][0]["serviceAccountToken"],
        json!({"audience": "trellis", "expirationSeconds": 3600, "path": "token"})
    );
    let mounts = serde_json::to_value(proxy.volume_mounts.as_ref().unwrap()).unwrap();
    assert!(mounts
        .as_array()
        .unwrap()
        .contains(&json!({"name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true})));
}

#[test]
fn http_and_tcp_probes_go_through_the_proxys_admin_port() {
    let p = inject(&web_pod(), &cfg()).unwrap();
    let app = &p.spec.as_ref().unwrap().containers[0];
    let live = serde_json::to_value(app.liveness_probe.as_ref().unwrap()).unwrap();
    assert_eq!(
        live["httpGet"],
        json!({"path": "/app-health/app/liveness", "port": 15000, "scheme": "HTTP"})
    );
    let ready = serde_json::to_value(app.readiness_probe.as_ref().unwrap()).unwrap();
    assert_eq!(ready["httpGet"]["path"], "/app-health/app/readiness");
    assert!(ready.get("tcpSocket").is_none());
    // exec probes need no network and stay.
    let startup = serde_json::to_value(app.startup_probe.as_ref().unwrap()).unwrap();
    assert_eq!(startup, json!({"exec": {"command": ["true"]}}));
    // The proxy gets the originals, named ports resolved.
    let proxy = &init_containers(&p)[1];
    let probes = proxy
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TRELLIS_APP_PROBES")
        .unwrap();
    let probes: serde_json::Value = serde_json::from_str(probes.value.as_ref().unwrap()).unwrap();
    assert_eq!(
        probes,
        json!({
            "/app-health/app/liveness": {"httpGet": {"path": "/healthz", "port": 8080, "scheme": "HTTP", "httpHeaders": []}},
            "/app-health/app/readiness": {"tcpSocket": {"port": 8080}},
        })
    );
}

#[test]
fn annotations_exclude_ports_and_cidrs_and_bad_ones_are_refused() {
    let p = with_annotation(web_pod(), EXCLUDE_INBOUND_PORTS, "9090, 9091");
    let p = with_annotation(p, EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/8,192.168.1.5");
    let p = with_annotation(p, EXCLUDE_OUTBOUND_PORTS, "5432");
    let injected = inject(&p, &cfg()).unwrap();
    let args = init_containers(&injected)[0].args.clone().unwrap();
    assert_eq!(
        args,
        [
            "init",
            "--proxy-uid",
            "1337",
            "--exclude-inbound-ports",
            "9090,9091",
            "--exclude-outbound-ports",
            "5432",
            "--exclude-outbound-cidrs",
            "10.0.0.0/8,192.168.1.5/32"
        ]
    );
    let bad = with_annotation(web_pod(), EXCLUDE_INBOUND_PORTS, "http");
    assert!(matches!(
        inject(&bad, &cfg()),
        Err(InjectError::BadPorts { .. })
    ));
    let bad = with_annotation(web_pod(), EXCLUDE_OUTBOUND_CIDRS, "10.0.0.0/33");
    assert!(inject(&bad, &cfg())
        .unwrap_err()
        .to_string()
        .contains("e.g. `10.0.0.0/8"));
}

#[test]
fn the_app_port_comes_from_the_annotation_then_the_containers() {
    let arg = |p: &Pod| {
        let args = init_containers(&inject(p, &cfg()).unwrap())[1]
            .args
            .clone()
            .unwrap();
        args[args.iter().position(|a| a == "--app-port").unwrap() + 1].clone()
    };
    assert_eq!(
        arg(&with_annotation(web_pod(), APP_PORT_ANNOTATION, "9000")),
        "9000"
    );
    let mut bare = web_pod();
    bare.spec.as_mut().unwrap().containers[0].ports = None;
    assert_eq!(arg(&bare), "8080");
}

#[test]
fn workloads_are_named_after_their_owner() {
    assert_eq!(workload_name(&web_pod()), "web");
    let job = pod(
        json!({"metadata": {"name": "backup-x1", "ownerReferences": [
        {"apiVersion": "batch/v1", "kind": "Job", "name": "backup", "uid": "u", "controller": true}]}}),
    );
    assert_eq!(workload_name(&job), "backup");
    let bare = pod(json!({"metadata": {"name": "debug", "labels": {"app": "tools"}}}));
    assert_eq!(workload_name(&bare), "tools");
}

#[test]
fn the_patch_turns_the_pod_into_the_injected_pod() {
    let before = web_pod();
    let after = inject(&before, &cfg()).unwrap();
    let ops = patch(&before, &after);
    let mut doc = serde_json::to_value(&before).unwrap();
    json_patch::patch(&mut doc, &ops).unwrap();
    assert_eq!(doc, serde_json::to_value(&after).unwrap());
}

#[test]
fn inject_files_injects_every_kind_of_pod_template_and_passes_the_rest() {
    let text = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: app, image: "app:1"}]}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: nightly}
spec:
  schedule: "0 3 * * *"
  jobTemplate:
    spec:
      template:
        metadata: {annotations: {trellis.dev/inject: disabled}}
        spec: {restartPolicy: Never, containers: [{name: job, image: "job:1"}]}
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: kube-system}
spec: {containers: [{name: c, image: "c:1"}]}
"#;
    let (out, outcomes) = crate::inject_files::inject_yaml(text, &cfg()).unwrap();
    let decisions: Vec<(String, bool)> = outcomes
        .iter()
        .map(|o| {
            (
                format!("{}/{}", o.kind, o.name),
                o.decision == Decision::Inject,
            )
        })
        .collect();
    assert_eq!(
        decisions,
        [
            ("Deployment/web".into(), true),
            ("CronJob/nightly".into(), false),
            ("Pod/dns".into(), false)
        ]
    );
    let docs: Vec<serde_json::Value> = serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    assert_eq!(docs.len(), 4);
    let tmpl = &docs[0]["spec"]["template"];
    assert_eq!(tmpl["spec"]["initContainers"][1]["name"], PROXY_CONTAINER);
    assert!(tmpl.get("apiVersion").is_none() && tmpl.get("kind").is_none());
    assert!(docs[1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        .get("initContainers")
        .is_none());
    assert_eq!(docs[2]["kind"], "Service");
    assert_eq!(docs[3]["kind"], "Pod");
    // Offline injection is as deterministic as install.
    assert_eq!(
        crate::inject_files::inject_yaml(text, &cfg()).unwrap().0,
        out
    );
}
