//! `trellis token create|list|revoke` and `trellis ca show|rotate|retire`.

use std::process::ExitCode;

use crate::cli::{CaCommand, Global, Output, TokenCommand, TokenRole};
use crate::client::Api;
use crate::table::Table;

pub async fn token(global: &Global, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    let api = Api::discover(global)?;
    match cmd {
        TokenCommand::Create {
            role,
            service_account,
            labels,
            advertise_addr,
            ttl,
        } => {
            let namespace = global
                .namespace
                .as_deref()
                .unwrap_or(trellis_resource::DEFAULT_NAMESPACE);
            let body = match (role, service_account) {
                (Some(role), _) => serde_json::json!({"role": role_name(*role), "ttl": ttl}),
                (None, Some(sa)) => serde_json::json!({
                    "namespace": namespace, "serviceAccount": sa, "ttl": ttl,
                    "labels": labels.clone().unwrap_or_default(),
                    "advertiseAddr": advertise_addr,
                }),
                (None, None) => anyhow::bail!("give --role ROLE or --service-account SA"),
            };
            let answer: serde_json::Value = api.post("/api/v1/tokens", &body).await?;
            let id = answer["id"].as_str().unwrap_or_default();
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                // The token alone on stdout, so that `> token` makes a token file.
                _ => {
                    println!("{}", answer["token"].as_str().unwrap_or_default());
                    let what = match (role, service_account) {
                        (Some(role), _) => format!("the {} role", role_name(*role)),
                        (_, sa) => {
                            let sa = sa.as_deref().unwrap_or_default();
                            let labels = match labels {
                                Some(l) if !l.is_empty() => l
                                    .iter()
                                    .map(|(k, v)| format!("{k}={v}"))
                                    .collect::<Vec<_>>()
                                    .join(","),
                                _ => "no labels (add --labels to serve a Service)".to_string(),
                            };
                            format!("spiffe://<trust domain>/ns/{namespace}/sa/{sa} with {labels}")
                        }
                    };
                    eprintln!(
                        "token {id} grants {what} until {} (unix); revoke it with `trellis token revoke {id}`",
                        answer["expiresAt"],
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::List => {
            let answer: serde_json::Value = api.get("/api/v1/tokens").await?;
            if global.output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&answer)?);
                return Ok(ExitCode::SUCCESS);
            }
            let mut t = Table::new(&["ID", "KIND", "GRANTS", "EXPIRES IN", "STATE"]);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            for item in answer["items"].as_array().into_iter().flatten() {
                let grants = match item["kind"].as_str() {
                    Some("api") => item["role"].as_str().unwrap_or_default().to_string(),
                    _ => {
                        let labels: Vec<String> = item["labels"]
                            .as_object()
                            .into_iter()
                            .flatten()
                            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                            .collect();
                        format!(
                            "{}/{} {}",
                            item["namespace"].as_str().unwrap_or_default(),
                            item["serviceAccount"].as_str().unwrap_or_default(),
                            labels.join(",")
                        )
                    }
                };
                let expires = item["expiresAt"].as_u64();
                let state = if !item["revokedAt"].is_null() {
                    "revoked"
                } else if expires.is_some_and(|e| e <= now) {
                    "expired"
                } else {
                    "active"
                };
                t.row(vec![
                    item["id"].as_str().unwrap_or_default().to_string(),
                    item["kind"].as_str().unwrap_or_default().to_string(),
                    grants.trim().to_string(),
                    expires.map_or("never".to_string(), |e| {
                        crate::duration::format_duration(std::time::Duration::from_secs(
                            e.saturating_sub(now),
                        ))
                    }),
                    state.to_string(),
                ]);
            }
            print!("{}", t.render());
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { id } => {
            let answer: serde_json::Value = api.delete(&format!("/api/v1/tokens/{id}")).await?;
            if answer["kind"] == "api" {
                println!("token {id} revoked: it no longer opens the control plane's API");
            } else {
                println!("token {id} revoked: proxies can no longer join or renew with it");
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn role_name(role: TokenRole) -> &'static str {
    match role {
        TokenRole::Admin => "admin",
        TokenRole::Viewer => "viewer",
        TokenRole::Tap => "tap",
    }
}

pub async fn ca(global: &Global, cmd: &CaCommand) -> anyhow::Result<ExitCode> {
    let api = Api::discover(global)?;
    let answer: serde_json::Value = match cmd {
        CaCommand::Show => api.get("/api/v1/ca").await?,
        CaCommand::Rotate => {
            api.post("/api/v1/ca/rotate", &serde_json::json!({}))
                .await?
        }
        CaCommand::Retire => {
            api.post("/api/v1/ca/retire", &serde_json::json!({}))
                .await?
        }
    };
    match global.output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
        _ => {
            println!("trusted roots (current first):");
            for f in answer["fingerprints"].as_array().into_iter().flatten() {
                println!("  sha256:{}", f.as_str().unwrap_or_default());
            }
            if matches!(cmd, CaCommand::Rotate) {
                println!("new certificates are signed by the new root; proxies renew within half their certificate TTL. Run `trellis ca retire` after that.");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
