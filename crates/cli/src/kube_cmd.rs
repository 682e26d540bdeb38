//! `trellis install`, `trellis uninstall` and `trellis inject`: manifests
//! for `kubectl`, from trellis-k8s. Output goes to stdout, notes to stderr.

use std::collections::BTreeSet;
use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use trellis_k8s::inject::{Decision, InjectConfig};
use trellis_k8s::install::{self, InstallOptions};
use trellis_k8s::names::DEFAULT_NAMESPACE;

use crate::cli::Global;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GatewayApi {
    /// Ask the cluster, and print those it lacks.
    Auto,
    /// Print them all (for a cluster known to lack them).
    Include,
    /// Print none.
    Skip,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Print the CRDs (Trellis's, and the Gateway API's the cluster lacks)
    /// instead of the control plane.
    #[arg(long)]
    pub crds: bool,
    /// 3 replicas with anti-affinity, a PodDisruptionBudget, and a webhook
    /// that fails closed.
    #[arg(long)]
    pub ha: bool,
    /// The image of the control plane (and, without --proxy-image, of the
    /// sidecar and its init container).
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// The image of the sidecar and its init container: the proxy-only
    /// image of `scripts/image --proxy` (default: --image).
    #[arg(long, value_name = "REF")]
    pub proxy_image: Option<String>,
    /// With --crds: which Gateway API CRDs to print.
    #[arg(long, value_enum, default_value_t = GatewayApi::Auto, requires = "crds")]
    pub gateway_api: GatewayApi,
    /// The kubeconfig (default: as kubectl finds it).
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Check the mesh on the Kubernetes cluster of the kubeconfig (as
    /// kubectl finds it) instead of a local one.
    #[arg(long)]
    pub kubernetes: bool,
    /// Before install: can Trellis be installed on this cluster?
    #[arg(long, requires = "kubernetes")]
    pub pre: bool,
    /// The kubeconfig (default: as kubectl finds it).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct UninstallArgs {
    /// Also delete the Trellis CRDs, and with them every Mesh,
    /// TrafficPolicy and AuthorizationPolicy (never the Gateway API's).
    #[arg(long)]
    pub crds: bool,
}

#[derive(Debug, Args)]
pub struct InjectArgs {
    /// The manifests (`-` for stdin).
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,
    /// The image of the sidecar and its init container.
    #[arg(long, value_name = "REF")]
    pub image: Option<String>,
    /// The control plane's namespace (where proxies reach it).
    #[arg(long, value_name = "NS", default_value = DEFAULT_NAMESPACE)]
    pub control_plane_namespace: String,
    /// SHA-256 of the mesh CA's root, which the sidecars trust for the
    /// control plane (default: read from the cluster's Secret trellis-ca).
    #[arg(long, value_name = "SHA256")]
    pub ca_pin: Option<String>,
}

/// Days until the first of the PEM roots expires.
fn days_left(roots: &str) -> Option<i64> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    trellis_identity::certs::certs_from_pem(roots)
        .ok()?
        .iter()
        .filter_map(|c| trellis_identity::certs::info(c).ok())
        .map(|i| (i.not_after - now) / 86_400)
        .min()
}

/// `trellis check --kubernetes [--pre]`.
pub async fn check(g: &Global, a: &CheckArgs) -> anyhow::Result<ExitCode> {
    let client = trellis_k8s::client::client(a.kubeconfig.as_deref()).await?;
    let ns = g
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    let findings = if a.pre {
        trellis_k8s::check::pre(client).await
    } else {
        trellis_k8s::check::post(client, &ns, days_left).await
    };
    let mut failed = 0;
    for f in &findings {
        if f.ok {
            println!("✔ {}: {}", f.check, f.detail);
        } else {
            failed += 1;
            println!("✘ {}: {}", f.check, f.detail);
        }
    }
    if failed > 0 {
        println!("{failed} of {} checks failed", findings.len());
        return Ok(ExitCode::FAILURE);
    }
    println!("all {} checks passed", findings.len());
    Ok(ExitCode::SUCCESS)
}

/// The mesh CA root's fingerprint, from the cluster's Secret.
async fn cluster_ca_pin(namespace: &str) -> anyhow::Result<String> {
    let client = trellis_k8s::client::client(None).await?;
    let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
        kube::Api::namespaced(client, namespace);
    let secret = secrets.get(trellis_k8s::names::CA_SECRET).await?;
    let roots = secret
        .data
        .and_then(|d| {
            d.get("roots.pem")
                .map(|b| String::from_utf8_lossy(&b.0).into_owned())
        })
        .context("the Secret holds no roots.pem")?;
    let certs = trellis_identity::certs::certs_from_pem(&roots)?;
    // The root the control plane pins (`Ca::root_fingerprint`): the first.
    let root = certs.first().context("roots.pem holds no certificate")?;
    Ok(trellis_identity::certs::fingerprint(root))
}

pub async fn install(g: &Global, a: &InstallArgs) -> anyhow::Result<ExitCode> {
    if a.crds {
        let present = match a.gateway_api {
            GatewayApi::Skip => trellis_k8s::gateway::NEEDED
                .iter()
                .map(|s| s.to_string())
                .collect(),
            GatewayApi::Include => BTreeSet::new(),
            GatewayApi::Auto => {
                let client = trellis_k8s::client::client(a.kubeconfig.as_deref()).await;
                let names = match client {
                    Ok(c) => trellis_k8s::client::crd_names(c)
                        .await
                        .map_err(anyhow::Error::from),
                    Err(e) => Err(e.into()),
                };
                names.context(
                    "cannot ask the cluster which Gateway API CRDs it has (Trellis never overwrites \
                     them): fix the kubeconfig, or say --gateway-api include (a cluster without them) \
                     or --gateway-api skip (a cluster with them)",
                )?
            }
        };
        print!("{}", install::crds_manifest(&present));
        return Ok(ExitCode::SUCCESS);
    }
    let opts = InstallOptions {
        namespace: g
            .namespace
            .clone()
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into()),
        image: a.image.clone().unwrap_or_else(install::default_image),
        proxy_image: a.proxy_image.clone(),
        ha: a.ha,
    };
    print!("{}", install::manifests(&opts)?);
    Ok(ExitCode::SUCCESS)
}

pub fn uninstall(g: &Global, a: &UninstallArgs) -> anyhow::Result<ExitCode> {
    let ns = g
        .namespace
        .clone()
        .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
    print!("{}", install::uninstall(&ns, a.crds)?);
    Ok(ExitCode::SUCCESS)
}

pub async fn inject(a: &InjectArgs) -> anyhow::Result<ExitCode> {
    let text = if a.file.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading stdin")?;
        s
    } else {
        std::fs::read_to_string(&a.file).with_context(|| format!("reading {}", a.file.display()))?
    };
    let mut cfg = InjectConfig::new(
        a.image.clone().unwrap_or_else(install::default_image),
        a.control_plane_namespace.clone(),
    );
    cfg.ca_pin = match &a.ca_pin {
        Some(pin) => Some(pin.clone()),
        None => match cluster_ca_pin(&a.control_plane_namespace).await {
            Ok(pin) => Some(pin),
            Err(e) => {
                eprintln!("warning: cannot read the mesh CA from the cluster ({e:#}): the sidecars will not trust the control plane until injected again with --ca-pin SHA256 or with the cluster reachable");
                None
            }
        },
    };
    let (out, outcomes) = trellis_k8s::inject_files::inject_yaml(&text, &cfg)
        .with_context(|| format!("{}", a.file.display()))?;
    for o in &outcomes {
        match &o.decision {
            Decision::Inject => eprintln!("{} {}: injected", o.kind, o.name),
            Decision::Skip(why) => eprintln!("{} {}: left as it is ({why})", o.kind, o.name),
        }
    }
    print!("{out}");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    /// trellis-k8s repeats the pod contract's ports (it must not depend on
    /// the proxy crate); they must stay the proxy's.
    #[test]
    fn the_injected_ports_are_the_pod_contracts() {
        use trellis_k8s::inject::trellis_pod;
        assert_eq!(trellis_pod::ADMIN_PORT, trellis_proxy::pod::ADMIN_PORT);
        assert_eq!(trellis_pod::INBOUND_PORT, trellis_proxy::pod::INBOUND_PORT);
        assert_eq!(
            trellis_k8s::names::PROXY_UID,
            1337,
            "docs/kubernetes.md and the image's user name this uid"
        );
    }
}
