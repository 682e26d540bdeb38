//! `trellis token create|revoke` and `trellis ca show|rotate|retire`.

use std::process::ExitCode;

use crate::cli::{CaCommand, Global, Output, TokenCommand};
use crate::client::Api;

pub async fn token(global: &Global, cmd: &TokenCommand) -> anyhow::Result<ExitCode> {
    let api = Api::discover(global)?;
    match cmd {
        TokenCommand::Create {
            service_account,
            ttl,
        } => {
            let namespace = global
                .namespace
                .as_deref()
                .unwrap_or(trellis_resource::DEFAULT_NAMESPACE);
            let answer: serde_json::Value = api
                .post(
                    "/api/v1/tokens",
                    &serde_json::json!({"namespace": namespace, "serviceAccount": service_account, "ttl": ttl}),
                )
                .await?;
            match global.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&answer)?),
                // The token alone on stdout, so that `> token` makes a token file.
                _ => {
                    println!("{}", answer["token"].as_str().unwrap_or_default());
                    eprintln!(
                        "token {} grants spiffe://<trust domain>/ns/{namespace}/sa/{service_account} until {} (unix); revoke it with `trellis token revoke {}`",
                        answer["id"].as_str().unwrap_or_default(),
                        answer["expiresAt"],
                        answer["id"].as_str().unwrap_or_default(),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        TokenCommand::Revoke { id } => {
            let _: serde_json::Value = api.delete(&format!("/api/v1/tokens/{id}")).await?;
            println!("token {id} revoked: proxies can no longer join or renew with it");
            Ok(ExitCode::SUCCESS)
        }
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
