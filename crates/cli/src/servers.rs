//! `trellis control` and `trellis proxy`: map the flags onto the library
//! configs, run, and shut down gracefully on SIGTERM or Ctrl-C.

use std::process::ExitCode;

use trellis_control::{ControlConfig, ControlPlane};
use trellis_proxy::ProxyConfig;

use crate::cli::{ControlArgs, Global, ProxyArgs, StoreArg};

pub fn control_config(global: &Global, args: &ControlArgs) -> anyhow::Result<ControlConfig> {
    let mut cfg = ControlConfig::new(&global.data_dir);
    cfg.http_addr = args.http_addr;
    cfg.ca.cert = args.ca_cert.clone();
    cfg.ca.key = args.ca_key.clone();
    cfg.ca.bundle = args.ca_bundle.clone();
    cfg.grpc_addr = args.grpc_addr;
    cfg.http_tls = match (&args.http_tls_cert, &args.http_tls_key) {
        (Some(cert), Some(key)) => trellis_control::HttpTls::Files {
            cert: cert.clone(),
            key: key.clone(),
        },
        _ if args.http_tls_mesh_ca => trellis_control::HttpTls::MeshCa,
        _ => trellis_control::HttpTls::Off,
    };
    cfg.http_hosts = args.http_hosts.clone();
    cfg.kek_file = args.kek_file.clone();
    cfg.store = match args.store {
        StoreArg::Embedded => {
            if !args.etcd_endpoints.is_empty() {
                anyhow::bail!("--etcd-endpoints needs --store etcd");
            }
            trellis_control::StoreKind::Embedded
        }
        StoreArg::Etcd => {
            if args.etcd_endpoints.is_empty() {
                anyhow::bail!(
                    "--store etcd needs --etcd-endpoints URL[,URL...]: the etcd members' client URLs, e.g. https://10.0.0.5:2379"
                );
            }
            trellis_control::StoreKind::Etcd(trellis_control::EtcdConfig {
                endpoints: args.etcd_endpoints.clone(),
                prefix: args.etcd_prefix.clone(),
                ca: args.etcd_ca.clone(),
                cert: args.etcd_cert.clone(),
                key: args.etcd_key.clone(),
                ..trellis_control::EtcdConfig::default()
            })
        }
    };
    Ok(cfg)
}

pub async fn control(global: &Global, args: &ControlArgs) -> anyhow::Result<ExitCode> {
    if args.kubernetes {
        return crate::kube_control::control(global, args).await;
    }
    let cfg = control_config(global, args)?;
    let cp = ControlPlane::start(cfg).await?;
    tracing::info!(http = %cp.http_addr, grpc = %cp.grpc_addr, "control plane serving; SIGTERM or Ctrl-C stops it");
    crate::signals::shutdown().await;
    tracing::info!("shutting down");
    // `let _` whether shutdown reports an error or nothing: either way the
    // process is ending, and the library logs what went wrong.
    #[allow(clippy::let_unit_value)]
    let _ = cp.shutdown().await;
    Ok(ExitCode::SUCCESS)
}

pub fn proxy_config(global: &Global, args: &ProxyArgs) -> anyhow::Result<ProxyConfig> {
    trellis_proxy::cli::config(global.namespace.as_deref(), args)
}

pub async fn proxy(global: &Global, args: &ProxyArgs) -> anyhow::Result<ExitCode> {
    trellis_proxy::cli::run(proxy_config(global, args)?).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Command};
    use clap::Parser;

    #[test]
    fn proxy_flags_map_onto_the_config() {
        let cli = Cli::try_parse_from([
            "trellis",
            "proxy",
            "--control-plane",
            "http://cp:15010",
            "--workload",
            "web",
            "-n",
            "shop",
            "--labels",
            "app=web",
            "--app-port",
            "9000",
            "--admin-addr",
            "127.0.0.1:0",
            "--upstream",
            "catalog:8080=127.0.0.1:9100",
            "--instance",
            "web-0",
            "--cache-dir",
            "/c",
            "--drain-grace",
            "2s",
        ])
        .unwrap();
        let Command::Proxy(args) = &cli.command else {
            panic!()
        };
        let cfg = proxy_config(&cli.global, args).unwrap();
        assert_eq!(cfg.control_plane, "http://cp:15010");
        assert_eq!(cfg.namespace, "shop");
        assert_eq!(cfg.labels["app"], "web");
        assert_eq!(cfg.service_account(), "web");
        assert_eq!(cfg.app_port, 9000);
        assert_eq!(cfg.admin_addr.port(), 0);
        assert_eq!(cfg.upstreams[0].port, 8080);
        assert_eq!(cfg.instance.as_deref(), Some("web-0"));
        assert_eq!(cfg.cache_dir.as_deref(), Some(std::path::Path::new("/c")));
        assert_eq!(cfg.drain_grace, std::time::Duration::from_secs(2));
    }

    #[test]
    fn control_flags_map_onto_the_config() {
        let cli = Cli::try_parse_from([
            "trellis",
            "control",
            "--data-dir",
            "/d",
            "--http-addr",
            "127.0.0.1:0",
        ])
        .unwrap();
        let Command::Control(args) = &cli.command else {
            panic!()
        };
        let cfg = control_config(&cli.global, args).unwrap();
        assert_eq!(cfg.data_dir, std::path::PathBuf::from("/d"));
        assert_eq!(cfg.http_addr.port(), 0);
        assert_eq!(cfg.grpc_addr.port(), 15010);
        assert!(matches!(cfg.store, trellis_control::StoreKind::Embedded));
    }

    #[test]
    fn etcd_flags_map_onto_the_config() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["trellis", "control", "--data-dir", "/d"];
            argv.extend(extra);
            let cli = Cli::try_parse_from(argv).unwrap();
            let Command::Control(args) = &cli.command else {
                panic!()
            };
            control_config(&cli.global, args)
        };
        let cfg = parse(&[
            "--store",
            "etcd",
            "--etcd-endpoints",
            "https://a:2379,https://b:2379",
            "--etcd-ca",
            "/ca.pem",
            "--etcd-prefix",
            "/prod",
            "--kek-file",
            "/kek",
        ])
        .unwrap();
        let trellis_control::StoreKind::Etcd(etcd) = &cfg.store else {
            panic!("{:?}", cfg.store)
        };
        assert_eq!(etcd.endpoints, ["https://a:2379", "https://b:2379"]);
        assert_eq!(etcd.prefix, "/prod");
        assert_eq!(etcd.ca.as_deref(), Some(std::path::Path::new("/ca.pem")));
        assert_eq!(cfg.kek_file.as_deref(), Some(std::path::Path::new("/kek")));
        let e = parse(&["--store", "etcd"]).unwrap_err().to_string();
        assert!(e.contains("--etcd-endpoints"), "{e}");
        assert!(parse(&["--etcd-endpoints", "http://a:2379"]).is_err());
    }
}
