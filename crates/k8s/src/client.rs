//! A Kubernetes client found as kubectl finds one: `--kubeconfig FILE`,
//! else `$KUBECONFIG`, else `~/.kube/config` (its current context), else
//! the pod's in-cluster service account.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read the kubeconfig {path}: {source}")]
    Kubeconfig {
        path: String,
        source: kube::config::KubeconfigError,
    },
    #[error("no cluster found ({0}): set KUBECONFIG or --kubeconfig, or run inside a pod")]
    Infer(kube::config::InferConfigError),
    #[error("cannot make a client for the cluster: {0}")]
    Client(kube::Error),
}

pub async fn client(kubeconfig: Option<&Path>) -> Result<kube::Client, ClientError> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
                path: path.display().to_string(),
                source,
            })?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|source| ClientError::Kubeconfig {
                    path: path.display().to_string(),
                    source,
                })?
        }
        None => kube::Config::infer().await.map_err(ClientError::Infer)?,
    };
    kube::Client::try_from(config).map_err(ClientError::Client)
}

/// The names of the CRDs the cluster has.
pub async fn crd_names(
    client: kube::Client,
) -> Result<std::collections::BTreeSet<String>, kube::Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: kube::Api<CustomResourceDefinition> = kube::Api::all(client);
    let list = api.list_metadata(&kube::api::ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter_map(|c| c.metadata.name)
        .collect())
}
