//! The mesh CA's files kept in a Secret, so every control-plane replica
//! signs with the same CA. The first replica to start makes the CA and
//! creates the Secret; creation is atomic on the API server, so when two
//! race, one gets `AlreadyExists`, drops what it made and takes the
//! winner's. A user-supplied CA is the same Secret, created beforehand.
//!
//! The files (the CA directory of `trellis-identity`: roots, signer and
//! its key, and the token authority's key) are copied into a memory-backed
//! directory, 0600 in 0700, where the control plane loads them as on a
//! host. The key is never logged.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{Api, ObjectMeta, PostParams};
use tracing::info;

use crate::names::{CA_SECRET, PART_OF, PART_OF_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("cannot read the Secret {namespace}/{CA_SECRET}: {source}; does the control plane's Role allow it?")]
    Get {
        namespace: String,
        source: Box<kube::Error>,
    },
    #[error("cannot create the Secret {namespace}/{CA_SECRET}: {source}")]
    Create {
        namespace: String,
        source: Box<kube::Error>,
    },
    #[error("cannot update the Secret {namespace}/{CA_SECRET}: {source}")]
    Update {
        namespace: String,
        source: Box<kube::Error>,
    },
    #[error("the CA directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the Secret {0} holds no CA files: delete it to have one made, or fill it with the CA's files")]
    Empty(String),
    #[error("making the CA failed: {0}")]
    Make(String),
}

/// Whether this replica made the CA or took an existing one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bootstrap {
    Created,
    Loaded,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaSecretError + '_ {
    move |source| CaSecretError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the Secret's files into `dir` (made 0700; files 0600).
/// Makes `dir` (0700): the CA's files are the control plane's alone.
fn private_dir(dir: &Path) -> Result<(), CaSecretError> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io(dir))
}

fn write_files(dir: &Path, data: &BTreeMap<String, ByteString>) -> Result<(), CaSecretError> {
    use std::os::unix::fs::OpenOptionsExt;
    private_dir(dir)?;
    for (name, bytes) in data {
        // Secret keys are file names; refuse anything that is not one.
        if name.contains('/') || name.starts_with('.') {
            continue;
        }
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp))?;
        std::io::Write::write_all(&mut f, &bytes.0).map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
    }
    Ok(())
}

/// The regular files at the top of `dir`.
fn read_files(dir: &Path) -> Result<BTreeMap<String, ByteString>, CaSecretError> {
    let mut data = BTreeMap::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if entry.file_type().map_err(io(&path))?.is_file() {
            let name = entry.file_name().to_string_lossy().to_string();
            if !name.starts_with('.') {
                data.insert(name, ByteString(std::fs::read(&path).map_err(io(&path))?));
            }
        }
    }
    Ok(data)
}

/// Fills `dir` with the CA from the Secret, or, when there is none, has
/// `make` make one in `dir` and stores it in the Secret (or, when another
/// replica stored one first, takes that one instead).
pub async fn bootstrap(
    client: kube::Client,
    namespace: &str,
    dir: &Path,
    make: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<Bootstrap, CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let get_err = |source: kube::Error| CaSecretError::Get {
        namespace: namespace.into(),
        source: Box::new(source),
    };
    if let Some(secret) = api.get_opt(CA_SECRET).await.map_err(get_err)? {
        load(&secret, namespace, dir)?;
        return Ok(Bootstrap::Loaded);
    }
    private_dir(dir)?;
    make(dir).map_err(CaSecretError::Make)?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(CA_SECRET.into()),
            namespace: Some(namespace.into()),
            labels: Some([(PART_OF_LABEL.to_string(), PART_OF.to_string())].into()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(read_files(dir)?),
        ..Default::default()
    };
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            info!(
                namespace,
                "made the mesh CA and stored it in Secret {CA_SECRET}"
            );
            Ok(Bootstrap::Created)
        }
        Err(kube::Error::Api(ae)) if ae.code == 409 => {
            // Another replica won the race: its CA is the mesh's.
            for name in read_files(dir)?.keys() {
                let _ = std::fs::remove_file(dir.join(name));
            }
            let secret = api.get(CA_SECRET).await.map_err(get_err)?;
            load(&secret, namespace, dir)?;
            Ok(Bootstrap::Loaded)
        }
        Err(source) => Err(CaSecretError::Create {
            namespace: namespace.into(),
            source: Box::new(source),
        }),
    }
}

fn load(secret: &Secret, namespace: &str, dir: &Path) -> Result<(), CaSecretError> {
    let data = secret.data.clone().unwrap_or_default();
    if data.is_empty() {
        return Err(CaSecretError::Empty(format!("{namespace}/{CA_SECRET}")));
    }
    write_files(dir, &data)?;
    info!(
        namespace,
        files = data.len(),
        "loaded the mesh CA from Secret {CA_SECRET}"
    );
    Ok(())
}

/// Stores `dir`'s files in the Secret after a rotation (done by the
/// leader only; the others see the Secret change and reload).
pub async fn store(client: kube::Client, namespace: &str, dir: &Path) -> Result<(), CaSecretError> {
    let api: Api<Secret> = Api::namespaced(client, namespace);
    let mut secret = api
        .get(CA_SECRET)
        .await
        .map_err(|source| CaSecretError::Get {
            namespace: namespace.into(),
            source: Box::new(source),
        })?;
    secret.data = Some(read_files(dir)?);
    // The resourceVersion read makes this fail, not overwrite, if someone
    // changed the Secret since.
    api.replace(CA_SECRET, &PostParams::default(), &secret)
        .await
        .map_err(|source| CaSecretError::Update {
            namespace: namespace.into(),
            source: Box::new(source),
        })?;
    Ok(())
}

/// Keeps the ConfigMap of the CA's public roots equal to `roots_pem`, for
/// the CLI's `--kubernetes` commands (which trust the control plane's
/// HTTPS API by them, reading no Secret). Every replica calls it; a create
/// lost to another replica, or an update lost to a newer write, is left
/// for the next round. Returns whether it wrote.
pub async fn ensure_roots_config_map(
    client: kube::Client,
    namespace: &str,
    roots_pem: &str,
) -> Result<bool, kube::Error> {
    use crate::names::{ROOTS_CONFIG_MAP, ROOTS_KEY};
    use k8s_openapi::api::core::v1::ConfigMap;
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let data = BTreeMap::from([(ROOTS_KEY.to_string(), roots_pem.to_string())]);
    let conflict = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 409);
    match api.get_opt(ROOTS_CONFIG_MAP).await? {
        Some(cm) if cm.data.as_ref() == Some(&data) => Ok(false),
        Some(mut cm) => {
            cm.data = Some(data);
            match api
                .replace(ROOTS_CONFIG_MAP, &PostParams::default(), &cm)
                .await
            {
                Err(e) if conflict(&e) => Ok(false),
                r => r.map(|_| true),
            }
        }
        None => {
            let cm = ConfigMap {
                metadata: ObjectMeta {
                    name: Some(ROOTS_CONFIG_MAP.to_string()),
                    namespace: Some(namespace.to_string()),
                    labels: Some(BTreeMap::from([(
                        PART_OF_LABEL.to_string(),
                        PART_OF.to_string(),
                    )])),
                    ..Default::default()
                },
                data: Some(data),
                ..Default::default()
            };
            match api.create(&PostParams::default(), &cm).await {
                Err(e) if conflict(&e) => Ok(false),
                r => r.map(|_| true),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use base64::Engine as _;
    use http::Method;
    use serde_json::json;

    use super::*;
    use crate::testing::{mock, status_error, step};

    const PATH: &str = "/api/v1/namespaces/trellis-system/secrets";

    fn secret(files: &[(&str, &str)]) -> serde_json::Value {
        let data: serde_json::Map<String, serde_json::Value> = files
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    json!(base64::engine::general_purpose::STANDARD.encode(v)),
                )
            })
            .collect();
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": CA_SECRET, "namespace": "trellis-system", "resourceVersion": "7"},
               "data": data})
    }

    /// Writes into `dir` as the control plane's maker does: it expects
    /// bootstrap to have made the directory.
    fn make_ca(dir: &Path) -> Result<(), String> {
        std::fs::write(dir.join("signer.key"), "OUR KEY").map_err(|e| e.to_string())?;
        std::fs::write(dir.join("roots.pem"), "OUR ROOT").map_err(|e| e.to_string())
    }

    #[tokio::test]
    async fn the_roots_config_map_is_made_then_kept_equal_to_the_roots() {
        let cms = "/api/v1/namespaces/trellis-system/configmaps";
        let cm = |roots: &str| {
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": "trellis-ca-roots", "namespace": "trellis-system", "resourceVersion": "3"},
                   "data": {"roots.pem": roots}})
        };
        let (client, seen, task) = mock(vec![
            step(
                Method::GET,
                &format!("{cms}/trellis-ca-roots"),
                404,
                status_error(404, "NotFound"),
            ),
            step(Method::POST, cms, 201, cm("A")),
            step(
                Method::GET,
                &format!("{cms}/trellis-ca-roots"),
                200,
                cm("A"),
            ),
            step(
                Method::GET,
                &format!("{cms}/trellis-ca-roots"),
                200,
                cm("A"),
            ),
            step(
                Method::PUT,
                &format!("{cms}/trellis-ca-roots"),
                200,
                cm("A\nB"),
            ),
        ]);
        assert!(
            ensure_roots_config_map(client.clone(), "trellis-system", "A")
                .await
                .unwrap()
        );
        assert!(
            !ensure_roots_config_map(client.clone(), "trellis-system", "A")
                .await
                .unwrap()
        );
        assert!(ensure_roots_config_map(client, "trellis-system", "A\nB")
            .await
            .unwrap());
        task.await.unwrap();
        let seen = seen.lock().unwrap();
        assert_eq!(seen[1].body["data"], json!({"roots.pem": "A"}));
        // The update carries the version it read, so a newer write wins.
        assert_eq!(seen[4].body["metadata"]["resourceVersion"], "3");
        assert_eq!(seen[4].body["data"], json!({"roots.pem": "A\nB"}));
    }

    #[tokio::test]
    async fn the_first_replica_makes_the_ca_and_stores_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let (client, seen, task) = mock(vec![
            step(
                Method::GET,
                &format!("{PATH}/{CA_SECRET}"),
                404,
                status_error(404, "NotFound"),
            ),
            step(
                Method::POST,
                PATH,
                201,
                secret(&[("signer.key", "OUR KEY"), ("roots.pem", "OUR ROOT")]),
            ),
        ]);
        let out = bootstrap(client, "trellis-system", &ca, make_ca)
            .await
            .unwrap();
        task.await.unwrap();
        assert_eq!(out, Bootstrap::Created);
        let mode = std::fs::metadata(&ca).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "the CA directory is the control plane's alone");
        let created = seen.lock().unwrap()[1].body.clone();
        assert_eq!(
            created["data"]["signer.key"],
            base64::engine::general_purpose::STANDARD.encode("OUR KEY")
        );
        assert_eq!(created["type"], "Opaque");
    }

    #[tokio::test]
    async fn a_replica_that_loses_the_race_takes_the_winners_ca() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let (client, _, task) = mock(vec![
            step(
                Method::GET,
                &format!("{PATH}/{CA_SECRET}"),
                404,
                status_error(404, "NotFound"),
            ),
            step(Method::POST, PATH, 409, status_error(409, "AlreadyExists")),
            step(
                Method::GET,
                &format!("{PATH}/{CA_SECRET}"),
                200,
                secret(&[("signer.key", "THEIR KEY"), ("roots.pem", "THEIR ROOT")]),
            ),
        ]);
        let out = bootstrap(client, "trellis-system", &ca, make_ca)
            .await
            .unwrap();
        task.await.unwrap();
        assert_eq!(out, Bootstrap::Loaded);
        assert_eq!(
            std::fs::read_to_string(ca.join("signer.key")).unwrap(),
            "THEIR KEY"
        );
        assert_eq!(
            std::fs::read_to_string(ca.join("roots.pem")).unwrap(),
            "THEIR ROOT"
        );
    }

    #[tokio::test]
    async fn an_existing_secret_is_loaded_with_private_modes_and_nothing_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        let (client, _, task) = mock(vec![step(
            Method::GET,
            &format!("{PATH}/{CA_SECRET}"),
            200,
            secret(&[("signer.key", "K"), ("../escape", "X")]),
        )]);
        let out = bootstrap(client, "trellis-system", &ca, |_| {
            panic!("must not make a CA")
        })
        .await
        .unwrap();
        task.await.unwrap();
        assert_eq!(out, Bootstrap::Loaded);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&ca), 0o700);
        assert_eq!(mode(&ca.join("signer.key")), 0o600);
        assert!(!dir.path().join("escape").exists());
    }

    #[tokio::test]
    async fn rotation_replaces_the_secret_at_the_version_read() {
        let dir = tempfile::tempdir().unwrap();
        make_ca(dir.path()).unwrap();
        let (client, seen, task) = mock(vec![
            step(
                Method::GET,
                &format!("{PATH}/{CA_SECRET}"),
                200,
                secret(&[("signer.key", "OLD")]),
            ),
            step(
                Method::PUT,
                &format!("{PATH}/{CA_SECRET}"),
                200,
                secret(&[("signer.key", "OUR KEY")]),
            ),
        ]);
        store(client, "trellis-system", dir.path()).await.unwrap();
        task.await.unwrap();
        let put = seen.lock().unwrap()[1].body.clone();
        assert_eq!(put["metadata"]["resourceVersion"], "7");
        assert_eq!(
            put["data"]["roots.pem"],
            base64::engine::general_purpose::STANDARD.encode("OUR ROOT")
        );
    }
}
