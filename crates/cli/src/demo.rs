//! `trellis demo`: the mesh of `examples/demo/` (built into the binary),
//! run in the foreground from a temporary folder, with a load generator
//! and a live `stat` table. Ctrl-C stops and removes everything.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;

use crate::cli::DemoArgs;
use crate::client::Api;
use crate::http::HttpClient;
use crate::local::host::Host;
use crate::local::plan::ReplicaPorts;
use crate::local::runner::{Options, Runner};

/// The demo's resource files, as `trellis up -f examples/demo` reads them.
pub const FILES: &[(&str, &str)] = &[
    (
        "examples/demo/mesh.yaml",
        include_str!("../../../examples/demo/mesh.yaml"),
    ),
    (
        "examples/demo/routes.yaml",
        include_str!("../../../examples/demo/routes.yaml"),
    ),
    (
        "examples/demo/services.yaml",
        include_str!("../../../examples/demo/services.yaml"),
    ),
    (
        "examples/demo/workloads.yaml",
        include_str!("../../../examples/demo/workloads.yaml"),
    ),
];

/// What the load generator sends to, through the frontend's sidecar.
const TARGET: &str = "http://frontend:8080/";
/// Requests allowed in flight at once: the load stays bounded even when
/// the mesh is slow or down.
const MAX_IN_FLIGHT: usize = 64;

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    ok: AtomicU64,
    failed: AtomicU64,
}

pub async fn run(args: &DemoArgs) -> anyhow::Result<ExitCode> {
    let mut loaded = Vec::new();
    for (file, text) in FILES {
        loaded.extend(trellis_resource::parse_documents_with_sources(file, text)?);
    }
    let data_dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    let opts = Options {
        data_dir: data_dir.clone(),
        detach: false,
        timeout: Duration::from_secs(60),
    };
    let result = async {
        let mut mesh = Runner::<Host>::start(loaded, &opts, ()).await?;
        let outcome = show(&mut mesh, args).await;
        eprintln!("stopping the demo");
        mesh.stop();
        outcome
    }
    .await;
    match result {
        Ok(()) => {
            let _ = std::fs::remove_dir_all(&data_dir);
            Ok(ExitCode::SUCCESS)
        }
        // Errors point into the logs, so keep them.
        Err(e) => {
            eprintln!(
                "the demo's logs stay in {}",
                data_dir.join("logs").display()
            );
            Err(e)
        }
    }
}

async fn show(mesh: &mut Runner<Host>, args: &DemoArgs) -> anyhow::Result<()> {
    let url = format!("http://{}", mesh.control_http());
    let frontend = mesh
        .replicas
        .iter()
        .find(|r| r.workload == "frontend")
        .ok_or_else(|| anyhow::anyhow!("the demo has no frontend workload"))?;
    let outbound = ReplicaPorts::addr(frontend.ports.outbound);
    let api = Api::new(&url, "the demo's control plane")?
        .with_token(crate::client::local_admin_token(&mesh.data_dir)?);
    // The dashboard link logs the browser in with a credential of its own
    // that can read and tap but not change anything, carried in the
    // fragment (which browsers never send, so no server logs it); the page
    // moves it to sessionStorage.
    let dashboard: serde_json::Value = api
        .post(
            "/api/v1/tokens",
            &serde_json::json!({"role": "tap", "ttl": "24h", "description": "demo dashboard link"}),
        )
        .await
        .context("making the dashboard's credential")?;
    let token = format!("#token={}", dashboard["token"].as_str().unwrap_or_default());
    let header = format!(
        "{}\n\
         Trellis demo: frontend -> catalog (90% v1, 10% v2) -> reviews (2 replicas)\n  \
         dashboard:  {url}/{token}\n  \
         golden signals:  trellis stat --data-dir {dir}\n  \
         traces:  trellis trace list --data-dir {dir}\n  \
         load:  {} rps to {TARGET} through the frontend's sidecar ({outbound})\n  \
         Ctrl-C stops the demo and removes everything it started.",
        mesh.ready_line(),
        args.rps,
        // The demo's folder: there the CLI finds its control plane and credential.
        dir = mesh.data_dir.display(),
    );
    println!("{header}");

    let counters = Arc::new(Counters::default());
    let load = tokio::spawn(generate_load(
        HttpClient::with_proxy(&outbound.to_string(), "")?,
        args.rps.max(1),
        counters.clone(),
    ));

    let redraw = std::io::stdout().is_terminal();
    let shutdown = crate::signals::shutdown();
    tokio::pin!(shutdown);
    let until = tokio::time::sleep(
        args.duration
            .unwrap_or(Duration::from_secs(365 * 24 * 3600)),
    );
    tokio::pin!(until);
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = &mut until => break,
            _ = tick.tick() => {}
        }
        if mesh.poll_exits() {
            break;
        }
        let table = match crate::observe::fetch_stat(&api, "service", Duration::from_secs(10)).await
        {
            Ok(answer) if answer.rows.is_empty() => "(no traffic yet)\n".to_string(),
            Ok(answer) => crate::observe::stat_table(&answer.rows),
            Err(e) => format!("(stat unavailable: {e})\n"),
        };
        let load_line = format!(
            "load: {} sent, {} ok, {} failed",
            counters.sent.load(Ordering::Relaxed),
            counters.ok.load(Ordering::Relaxed),
            counters.failed.load(Ordering::Relaxed)
        );
        if redraw {
            // Clear the screen and draw from the top, like `watch`.
            print!("\x1b[2J\x1b[H{header}\n\n{table}\n{load_line}\n");
        } else {
            println!("\n{table}{load_line}");
        }
    }
    load.abort();
    Ok(())
}

async fn generate_load(client: HttpClient, rps: u32, counters: Arc<Counters>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rps);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // Skip a beat rather than queue when the mesh falls behind.
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            continue;
        };
        let (client, counters) = (client.clone(), counters.clone());
        counters.sent.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let ok = client
                .get(TARGET, Duration::from_secs(5))
                .await
                .is_ok_and(|r| r.status().is_success());
            let c = if ok { &counters.ok } else { &counters.failed };
            c.fetch_add(1, Ordering::Relaxed);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_resource::Kind;

    #[test]
    fn embedded_demo_parses_and_has_what_it_promises() {
        let mut all = Vec::new();
        for (file, text) in FILES {
            all.extend(trellis_resource::parse_documents(file, text).unwrap());
        }
        let names = |k: Kind| -> Vec<String> {
            all.iter()
                .filter(|r| r.kind() == k)
                .map(|r| r.metadata.name.clone())
                .collect()
        };
        assert_eq!(names(Kind::Mesh), ["default"]);
        assert_eq!(
            names(Kind::Service),
            ["frontend", "catalog", "catalog-v1", "catalog-v2", "reviews"]
        );
        assert_eq!(
            names(Kind::Workload),
            ["frontend", "catalog-v1", "catalog-v2", "reviews"]
        );
        assert_eq!(names(Kind::HttpRoute), ["catalog-split"]);
        assert_eq!(crate::local::plan::replica_count(&all), 5);
        // The files on disk are the ones built in.
        let on_disk = trellis_resource::load_path(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/demo"
        )))
        .unwrap();
        assert_eq!(on_disk, all);
    }
}
