//! The local mesh of `trellis up` and the commands that work on it from
//! other shells: `down`, `ps` and `exec`. One runner (`runner`) with two
//! placements: host processes on loopback ports (`host`, process mode) and
//! network-namespace pods (`pods`, with `podnet`).

pub mod host;
pub mod plan;
pub mod podnet;
pub mod pods;
pub mod process;
pub mod runner;
pub mod state;

use std::io::Write;
use std::process::ExitCode;

use crate::cli::{ExecArgs, Global, Mode, Output, UpArgs};
use crate::table::Table;
use host::Host;
use pods::Pods;
use runner::{Options, Placement, Runner};
use state::{ProcessInfo, RunState};

fn no_mesh(global: &Global) -> String {
    let dir = global.data_dir.display();
    format!("no mesh is running here ({dir}): start one with `trellis up -f FILE --detach`")
}

/// Whether pods mode can run here: root, network namespaces, and the `ip`
/// and `nft` tools.
pub fn pods_available() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective uid.
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    let netns = std::path::Path::new("/proc/self/ns/net").exists();
    let tool = |name: &str| {
        std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(name).is_file()))
    };
    root && netns && tool("ip") && tool("nft")
}

pub async fn up(global: &Global, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let pods = match args.mode {
        Mode::Process => false,
        Mode::Pods => true,
        Mode::Auto => {
            let ok = pods_available();
            eprintln!(
                "mode: {}",
                if ok {
                    "pods (root, network namespaces, ip and nft are available)"
                } else {
                    "process (pods mode needs root, network namespaces, ip and nft)"
                }
            );
            ok
        }
    };
    let loaded = crate::resources::load(&args.file)?;
    let opts = Options {
        data_dir: global.data_dir.clone(),
        detach: args.detach,
        timeout: args.timeout,
    };
    if pods {
        let mesh = Runner::<Pods>::start(loaded, &opts, args.subnet.clone()).await?;
        serve(mesh, global, args.detach).await
    } else {
        let mesh = Runner::<Host>::start(loaded, &opts, ()).await?;
        serve(mesh, global, args.detach).await
    }
}

/// A started mesh: in the background, or until Ctrl-C, SIGTERM or `down`.
async fn serve<P: Placement>(
    mut mesh: Runner<P>,
    global: &Global,
    detach: bool,
) -> anyhow::Result<ExitCode> {
    println!("{}", mesh.ready_line());
    if detach {
        eprintln!(
            "running in the background: {} (--data-dir {})",
            P::DETACHED,
            global.data_dir.display()
        );
        mesh.detach();
        return Ok(ExitCode::SUCCESS);
    }
    eprintln!("press Ctrl-C to stop");
    mesh.wait().await;
    eprintln!("stopping");
    mesh.stop();
    Ok(ExitCode::SUCCESS)
}

pub fn down(global: &Global) -> anyhow::Result<ExitCode> {
    let dir = &global.data_dir;
    let Some(state) = RunState::read(dir)? else {
        // A pods-mode run that died before writing run.json: its network.
        let removed = podnet::cleanup(dir)?;
        if removed.is_empty() {
            say(format_args!("nothing to stop in {}", dir.display()));
        } else {
            say(format_args!("removed {}", removed.join(", ")));
        }
        return Ok(ExitCode::SUCCESS);
    };
    let marker = dir.join(runner::STOPPING);
    let _ = std::fs::write(&marker, b"");
    let stopped = runner::stop_state(&state);
    // Pods mode: namespaces, links, bridge (after their processes stopped).
    let removed = podnet::cleanup(dir)?;
    if !removed.is_empty() {
        say(format_args!("removed {}", removed.join(", ")));
    }
    RunState::remove(dir)?;
    let _ = std::fs::remove_file(&marker);
    if let Err(e) = runner::remove_state_dirs(dir) {
        let _ = writeln!(std::io::stderr(), "warning: {e:#}");
    }
    if stopped == 0 {
        say(format_args!(
            "nothing was running; removed the state of the last mesh in {}",
            dir.display()
        ));
    } else {
        say(format_args!(
            "stopped {stopped} processes; their logs stay in {}",
            dir.join("logs").display()
        ));
    }
    Ok(ExitCode::SUCCESS)
}

/// A line on stdout for `down`, which must finish tearing down whatever
/// happens to its reader: `trellis down | head -1` closes the pipe early, and
/// `println!` would panic half-way, leaving namespaces or state behind.
fn say(line: std::fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

fn state_of(p: &ProcessInfo) -> &'static str {
    if p.is_running() {
        "running"
    } else {
        "exited"
    }
}

pub fn ps(global: &Global) -> anyhow::Result<ExitCode> {
    let state = RunState::read(&global.data_dir)?;
    if global.output == Output::Json || global.output == Output::Yaml {
        let v = match &state {
            Some(s) => {
                let mut v = serde_json::to_value(s)?;
                for (p, info) in v["processes"]
                    .as_array_mut()
                    .into_iter()
                    .flatten()
                    .zip(&s.processes)
                {
                    p["state"] = state_of(info).into();
                }
                v
            }
            None => serde_json::json!({ "processes": [] }),
        };
        match global.output {
            Output::Json => println!("{}", serde_json::to_string_pretty(&v)?),
            _ => print!("{}", serde_yaml_ng::to_string(&v)?),
        }
        return Ok(ExitCode::SUCCESS);
    }
    let Some(state) = state else {
        eprintln!("{}", no_mesh(global));
        return Ok(ExitCode::SUCCESS);
    };
    let mut t = Table::new(&["NAME", "ROLE", "WORKLOAD", "PID", "STATE", "ADDRESSES"]);
    for p in &state.processes {
        let a = &p.addresses;
        let addrs: Vec<String> = [
            ("http", a.http),
            ("grpc", a.grpc),
            ("inbound", a.inbound),
            ("outbound", a.outbound),
            ("admin", a.admin),
            ("app", a.app),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
        .collect();
        t.row(vec![
            p.name.clone(),
            p.role.as_str().to_string(),
            match (&p.workload, &p.namespace) {
                (Some(w), Some(ns)) => format!("{ns}/{w}"),
                _ => "-".to_string(),
            },
            p.pid.to_string(),
            state_of(p).to_string(),
            addrs.join(" "),
        ]);
    }
    print!("{}", t.render());
    Ok(ExitCode::SUCCESS)
}

/// `WORKLOAD` or `WORKLOAD/N`.
fn parse_target(target: &str) -> anyhow::Result<(&str, u32)> {
    match target.split_once('/') {
        None => Ok((target, 0)),
        Some((w, n)) => {
            let n = n.parse().map_err(|_| {
                anyhow::anyhow!("{target:?}: expected WORKLOAD or WORKLOAD/N, e.g. frontend/0")
            })?;
            Ok((w, n))
        }
    }
}

pub fn exec(global: &Global, args: &ExecArgs) -> anyhow::Result<ExitCode> {
    let (workload, replica) = parse_target(&args.target)?;
    if let Some(code) = pods::exec(global, args, workload, replica)? {
        return Ok(code);
    }
    host::exec(global, args, workload, replica)
}

/// `exec`'s error for a replica the mesh does not have; `n` is how many
/// replicas `workload` has.
fn no_replica(global: &Global, workload: &str, replica: u32, n: usize) -> anyhow::Error {
    if n == 0 {
        return anyhow::anyhow!(
            "no workload {workload} in the mesh of {}: `trellis ps` lists them",
            global.data_dir.display()
        );
    }
    anyhow::anyhow!(
        "workload {workload} has no replica {replica}: it has {n} (0 to {})",
        n - 1
    )
}

/// The exit code of a child, shells' way: 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_exec_targets() {
        assert_eq!(parse_target("web").unwrap(), ("web", 0));
        assert_eq!(parse_target("web/2").unwrap(), ("web", 2));
        assert!(parse_target("web/x").is_err());
    }
}
