//! `trellis install` and `trellis uninstall`: the control plane's
//! manifests, and the same manifests as a Helm chart, from ONE template.
//!
//! The objects (`objects`) are built twice, for the default and for
//! `--ha`, with the namespace and image as placeholders; [`template`] joins
//! them into one Go-template text (`{{ if .Values.ha }}` where the two
//! differ, `{{ .Values.image }}` and `{{ .Release.Namespace }}` for the
//! placeholders). `trellis install` renders that text (`crate::template`,
//! which renders as Helm does), and the chart's `templates/trellis.yaml`
//! *is* that text, so the two cannot disagree. Output is deterministic:
//! the same options give the same bytes.

use std::collections::BTreeSet;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::Value;

use crate::names::{self, DEFAULT_NAMESPACE};
use crate::template::{self, Values};

mod objects;

/// Placeholders in the built objects; each must be a whole YAML scalar.
const NAMESPACE: &str = "__TRELLIS_NAMESPACE__";
const IMAGE: &str = "__TRELLIS_IMAGE__";
const PROXY_IMAGE: &str = "__TRELLIS_PROXY_IMAGE__";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("`{0}` is not a namespace name: use at most 63 lowercase letters, digits and `-`, starting and ending with a letter or digit")]
    BadNamespace(String),
    #[error("`{0}` is not an image reference: use e.g. `trellis.local/trellis:0.1.0` (letters, digits and . _ - / : @ only)")]
    BadImage(String),
    #[error(transparent)]
    Template(#[from] template::TemplateError),
}

/// What `trellis install` takes.
#[derive(Clone, Debug, PartialEq)]
pub struct InstallOptions {
    pub namespace: String,
    pub image: String,
    /// The sidecar's and its init container's image (`scripts/image
    /// --proxy`); `None`: `image`.
    pub proxy_image: Option<String>,
    /// 3 replicas, anti-affinity, a PodDisruptionBudget, failurePolicy Fail.
    pub ha: bool,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            namespace: DEFAULT_NAMESPACE.to_string(),
            image: default_image(),
            proxy_image: None,
            ha: false,
        }
    }
}

/// The image `trellis install` uses without `--image`: this build's version.
pub fn default_image() -> String {
    format!("trellis.local/trellis:{}", env!("CARGO_PKG_VERSION"))
}

impl InstallOptions {
    fn check(&self) -> Result<(), InstallError> {
        let ns = &self.namespace;
        let label_ok = !ns.is_empty()
            && ns.len() <= 63
            && ns
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            && !ns.starts_with('-')
            && !ns.ends_with('-');
        if !label_ok {
            return Err(InstallError::BadNamespace(ns.clone()));
        }
        for image in std::iter::once(&self.image).chain(&self.proxy_image) {
            let image_ok = !image.is_empty()
                && image
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c));
            if !image_ok {
                return Err(InstallError::BadImage(image.clone()));
            }
        }
        Ok(())
    }

    /// The values the template reads (`createNamespace`: whether the
    /// Namespace object is part of the output, as it is for `install`).
    pub fn values(&self, create_namespace: bool) -> Values {
        Values {
            values: [
                (
                    "image".to_string(),
                    template::Value::Str(self.image.clone()),
                ),
                (
                    "proxyImage".to_string(),
                    template::Value::Str(
                        self.proxy_image
                            .clone()
                            .unwrap_or_else(|| self.image.clone()),
                    ),
                ),
                ("ha".to_string(), template::Value::Bool(self.ha)),
                (
                    "createNamespace".to_string(),
                    template::Value::Bool(create_namespace),
                ),
            ]
            .into(),
            namespace: self.namespace.clone(),
        }
    }
}

/// One object as YAML, placeholders turned into template actions.
fn to_yaml(v: &Value) -> String {
    let text = serde_yaml_ng::to_string(v).expect("JSON values serialise to YAML");
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let line = line
            .replace(NAMESPACE, "\"{{ .Release.Namespace }}\"")
            .replace(IMAGE, "\"{{ .Values.image }}\"")
            .replace(PROXY_IMAGE, "\"{{ .Values.proxyImage }}\"");
        out.push_str(&line);
        out.push('\n');
    }
    out
}

/// A piece of the template: `---` and one object.
fn chunk(v: &Value) -> String {
    format!("\n---\n{}", to_yaml(v).trim_end())
}

fn when(cond: &str, v: &Value) -> String {
    // Each action on a line of its own; `{{-` eats the newline before it.
    format!("\n{{{{- if .Values.{cond} }}}}{}\n{{{{- end }}}}", chunk(v))
}

/// The object as built for `--ha` and for the default: once if they are
/// the same, else both under `if .Values.ha`.
fn ha_or(build: impl Fn(bool) -> Value) -> String {
    let (ha, plain) = (build(true), build(false));
    if ha == plain {
        chunk(&plain)
    } else {
        format!(
            "\n{{{{- if .Values.ha }}}}{}\n{{{{- else }}}}{}\n{{{{- end }}}}",
            chunk(&ha),
            chunk(&plain)
        )
    }
}

/// The one template behind `trellis install` and the Helm chart.
pub fn template() -> String {
    let mut t = format!(
        "# The Trellis control plane, version {}: `trellis install` renders this\n\
         # template, and the Helm chart (charts/trellis) is made of it.",
        env!("CARGO_PKG_VERSION")
    );
    t.push_str(&when("createNamespace", &objects::namespace()));
    for v in [
        objects::service_account(),
        objects::cluster_role(),
        objects::cluster_role_binding(),
        objects::role(),
        objects::role_binding(),
        objects::observer_account(names::VIEWER_ACCOUNT),
        objects::observer_account(names::TAP_ACCOUNT),
        objects::observer_role(names::VIEWER_ACCOUNT),
        objects::observer_role(names::TAP_ACCOUNT),
        objects::control_service(),
        objects::webhook_service(),
    ] {
        t.push_str(&chunk(&v));
    }
    t.push_str(&ha_or(objects::deployment));
    t.push_str(&when("ha", &objects::pod_disruption_budget()));
    t.push_str(&ha_or(objects::webhook_configuration));
    t.push('\n');
    t
}

/// `trellis install`: the control plane, for `kubectl apply -f -`.
pub fn manifests(opts: &InstallOptions) -> Result<String, InstallError> {
    opts.check()?;
    Ok(template::render(&template(), &opts.values(true))?)
}

/// `trellis install --crds`: the Trellis CRDs, and the Gateway API CRDs
/// the cluster lacks (`present`: the CRD names it has).
pub fn crds_manifest(present: &BTreeSet<String>) -> String {
    let mut out = String::from(
        "# Trellis CRDs, and the Gateway API CRDs this cluster lacks (never one it has).\n",
    );
    let gateway = crate::gateway::missing_gateway_crds(present);
    if gateway.is_empty() {
        out.push_str("# The cluster has every Gateway API CRD Trellis needs: left as they are.\n");
    }
    for crd in crate::crd::trellis_crds().iter().chain(&gateway) {
        out.push_str("---\n");
        out.push_str(&crd_yaml(crd));
    }
    out
}

fn crd_yaml(crd: &CustomResourceDefinition) -> String {
    serde_yaml_ng::to_string(crd).expect("a CRD serialises")
}

/// `trellis uninstall`: what to delete, for `kubectl delete -f -`. The
/// webhook goes first, so no pod creation waits on a control plane that
/// is going away. With `crds`, the Trellis CRDs too (and with them every
/// Mesh, TrafficPolicy and AuthorizationPolicy); never the Gateway API's,
/// which other software may use.
pub fn uninstall(namespace: &str, crds: bool) -> Result<String, InstallError> {
    let opts = InstallOptions {
        namespace: namespace.to_string(),
        ..Default::default()
    };
    opts.check()?;
    let mut refs: Vec<(&str, &str, String)> = vec![
        (
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            names::WEBHOOK_CONFIG.into(),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRoleBinding",
            names::CONTROL_PLANE.into(),
        ),
        (
            "rbac.authorization.k8s.io/v1",
            "ClusterRole",
            names::CONTROL_PLANE.into(),
        ),
        // Its objects (the Deployment, the CA Secret, the Lease...) go with it.
        ("v1", "Namespace", namespace.into()),
    ];
    if crds {
        for crd in crate::crd::trellis_crds() {
            let name = crd.metadata.name.unwrap_or_default();
            refs.push(("apiextensions.k8s.io/v1", "CustomResourceDefinition", name));
        }
    }
    let mut out = String::from(
        "# Delete with `kubectl delete --ignore-not-found -f -`. Injected pods keep their\n\
         # sidecar until restarted: remove the trellis.dev/inject labels and restart them.\n",
    );
    for (api, kind, name) in refs {
        out.push_str(&format!(
            "---\napiVersion: {api}\nkind: {kind}\nmetadata:\n  name: {name}\n"
        ));
    }
    Ok(out)
}

/// The files of the Helm chart (paths relative to `charts/trellis`): the
/// template, the default values, Chart.yaml, and every CRD under `crds/`
/// (Helm installs those only when absent and never upgrades them, which is
/// the Gateway API rule; Trellis CRD upgrades go through `trellis install --crds`).
pub fn chart_files() -> Vec<(String, String)> {
    let version = env!("CARGO_PKG_VERSION");
    let defaults = InstallOptions::default();
    let mut files = vec![
        (
            "Chart.yaml".to_string(),
            format!(
                "# Generated by `cargo run -p trellis-k8s --example chart`; do not edit.\n\
                 apiVersion: v2\nname: trellis\ndescription: The Trellis service mesh control plane\n\
                 type: application\nversion: {version}\nappVersion: \"{version}\"\n"
            ),
        ),
        (
            "values.yaml".to_string(),
            format!(
                "# Generated by `cargo run -p trellis-k8s --example chart`; do not edit.\n\
                 # The image that runs the control plane.\n\
                 image: {}\n\
                 # The image the webhook injects (the sidecar and its init container): the\n\
                 # proxy-only image of `scripts/image --proxy` holds a third less memory.\n\
                 proxyImage: {}\n\
                 # 3 replicas with anti-affinity, a PodDisruptionBudget, webhook failurePolicy Fail.\n\
                 ha: {}\n\
                 # Whether the chart makes the namespace; with `helm install --create-namespace`, leave it false.\n\
                 createNamespace: false\n",
                defaults.image, defaults.image, defaults.ha
            ),
        ),
        ("templates/trellis.yaml".to_string(), template()),
    ];
    for crd in crate::crd::trellis_crds()
        .iter()
        .chain(&crate::gateway::gateway_crds())
    {
        let name = crd.metadata.name.clone().unwrap_or_default();
        files.push((format!("crds/{name}.yaml"), crd_yaml(crd)));
    }
    files
}

#[cfg(test)]
#[path = "install_tests.rs"]
mod tests;
