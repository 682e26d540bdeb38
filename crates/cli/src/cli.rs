//! The command line: every command and flag of SPEC.md, as clap derive
//! structs. Only parsing lives here; `commands` runs them.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
pub use trellis_proxy::cli::{LimitArgs, ProxyArgs};
use trellis_proxy::config::parse_labels;

use crate::duration::parse_duration;

#[derive(Debug, Parser)]
#[command(
    name = "trellis",
    version,
    about = "Trellis: a service mesh in one binary"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Flags every command takes.
#[derive(Clone, Debug, Args)]
pub struct Global {
    /// The control plane's HTTP API (default: the mesh `trellis up` runs in
    /// --data-dir, else http://127.0.0.1:15080).
    #[arg(long, global = true, env = "TRELLIS_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The namespace (default: `default`; for lists: all).
    #[arg(short = 'n', long, global = true, value_name = "NS")]
    pub namespace: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Where `trellis up` keeps its state, and `trellis control` its store.
    #[arg(long, global = true, default_value = ".trellis", value_name = "DIR")]
    pub data_dir: PathBuf,
    /// A file holding the control plane credential (default: $TRELLIS_TOKEN,
    /// else the local mesh's own). `trellis proxy --token-file` is the
    /// proxy's join token instead (same flag id, so clap keeps the proxy's).
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) to trust for an https:// --server, e.g. the
    /// control plane's <data-dir>/ca/roots.pem.
    #[arg(long, global = true, env = "TRELLIS_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Yaml,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the built-in demo mesh on this machine; Ctrl-C stops and cleans up.
    Demo(DemoArgs),
    /// Run a local mesh from resource files: a control plane, every Workload
    /// with its sidecar, and the other resources applied.
    Up(UpArgs),
    /// Stop a detached `up` and remove what it created.
    Down,
    /// Run a command as if inside a workload replica.
    Exec(ExecArgs),
    /// The control plane server.
    Control(ControlArgs),
    /// The sidecar proxy.
    Proxy(Box<ProxyArgs>),
    /// Create or update resources from a file or a folder of files.
    Apply(ApplyArgs),
    /// List resources, or show one.
    Get(GetArgs),
    /// Delete a resource.
    Delete(NameArgs),
    /// Show a resource with what the mesh knows about it.
    Describe(NameArgs),
    /// Golden signals per service, workload or route.
    Stat(StatArgs),
    /// Traces kept by the control plane: `trace list`, `trace show ID`.
    Trace(crate::observe_live::TraceArgs),
    /// Who calls whom, with identities and mTLS state.
    Edges(crate::observe_live::EdgesArgs),
    /// Live request metadata (never bodies) from a workload's proxies.
    Tap(crate::observe_live::TapArgs),
    /// The busiest paths right now, from a live tap.
    Top(crate::observe_live::TopArgs),
    /// Serve the dashboard on this machine (127.0.0.1) for the mesh's
    /// control plane; with --kubernetes, for every replica on the cluster.
    Dashboard(crate::dashboard::DashboardArgs),
    /// Check that the mesh is healthy, and say what to do about each failure.
    Check(crate::kube_cmd::CheckArgs),
    /// List what the local mesh of `up` runs.
    Ps,
    /// The small HTTP service of the demo, tests and benchmarks.
    DemoApp(DemoAppArgs),
    /// Join tokens for proxy identities.
    Token(TokenArgs),
    /// The mesh CA: show, rotate or retire roots.
    Ca(CaArgs),
    /// Install a pod's redirect rules (nftables) in this network namespace.
    Init(crate::init::InitArgs),
    /// Print the Kubernetes manifests of the control plane (or, with
    /// --crds, the CRDs), for `kubectl apply -f -`.
    Install(crate::kube_cmd::InstallArgs),
    /// Print what `trellis install` created, for `kubectl delete -f -`.
    Uninstall(crate::kube_cmd::UninstallArgs),
    /// Add the sidecar to the pods of Kubernetes manifests, as the
    /// webhook does, and print them.
    Inject(crate::kube_cmd::InjectArgs),
}

impl Command {
    /// Commands that print a result and exit (as opposed to servers and
    /// runners, which own sockets for a long time).
    pub fn prints_for_a_pipe(&self) -> bool {
        matches!(
            self,
            Command::Get(_)
                | Command::Describe(_)
                | Command::Stat(_)
                | Command::Trace(_)
                | Command::Edges(_)
                | Command::Tap(_)
                | Command::Top(_)
                | Command::Check(_)
                | Command::Ps
                | Command::Apply(_)
                | Command::Delete(_)
                | Command::Token(_)
                | Command::Ca(_)
                | Command::Install(_)
                | Command::Uninstall(_)
                | Command::Inject(_)
        )
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Requests per second of the built-in load generator.
    #[arg(long, default_value_t = 20)]
    pub rps: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Auto,
    Pods,
    Process,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    /// A resource file, or a folder of them.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub file: PathBuf,
    #[arg(long, value_enum, default_value_t = Mode::Auto)]
    pub mode: Mode,
    /// Return once the mesh is ready, leaving it running (stop it with `trellis down`).
    #[arg(long)]
    pub detach: bool,
    /// How long to wait for the mesh to become ready.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: std::time::Duration,
    /// Pods mode: the pods' IPv4 subnet (default: a free /24 in
    /// 10.200.0.0-10.249.255.0); must not overlap the host's routes.
    #[arg(long, value_name = "CIDR")]
    pub subnet: Option<String>,
    /// How many control plane replicas to run (more than one needs
    /// --store etcd).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=9))]
    pub control_replicas: u16,
    /// The control plane's store: `embedded`, or `etcd` (a local etcd
    /// cluster of three members, as child processes; needs the etcd
    /// binary on PATH, or TRELLIS_ETCD).
    #[arg(long, value_enum, default_value_t = StoreArg::Embedded)]
    pub store: StoreArg,
}

#[derive(Debug, Args)]
pub struct ExecArgs {
    /// WORKLOAD or WORKLOAD/N (replica N, default 0).
    pub target: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[arg(long, default_value = "127.0.0.1:15080")]
    pub http_addr: SocketAddr,
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub grpc_addr: SocketAddr,
    /// Your own CA certificate (a root or an intermediate), PEM; default: a
    /// root made in <data-dir>/control/ca on first start.
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The key of --ca-cert, PEM.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// Where resources, tokens and the CA live: `embedded` (a file in the
    /// data dir, one control plane) or `etcd` (shared by any number of
    /// replicas; needs --etcd-endpoints and --kek-file).
    #[arg(long, value_enum, default_value_t = StoreArg::Embedded)]
    pub store: StoreArg,
    /// The etcd members' client URLs (comma-separated), e.g.
    /// https://10.0.0.5:2379,https://10.0.0.6:2379.
    #[arg(long, value_delimiter = ',', value_name = "URL,...")]
    pub etcd_endpoints: Vec<String>,
    /// The CA of the etcd members' certificates (PEM).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// A client certificate for etcd (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// Every key of this mesh lives under this prefix in etcd.
    #[arg(long, default_value = "/trellis", value_name = "PREFIX")]
    pub etcd_prefix: String,
    /// The key-encryption key of the secrets in the store: 32 random bytes
    /// (raw or hex), the same file on every replica; default
    /// <data-dir>/kek, made on first start (embedded store only).
    #[arg(long, value_name = "FILE")]
    pub kek_file: Option<PathBuf>,
    /// The roots to trust (needed when --ca-cert is an intermediate).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    pub ca_bundle: Option<PathBuf>,
    /// Serve the HTTP API over TLS with this certificate chain (PEM);
    /// required for an --http-addr beyond loopback.
    #[arg(long, value_name = "FILE", requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// The key of --http-tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Serve the HTTP API over TLS with a certificate from the mesh CA
    /// (clients trust <data-dir>/ca/roots.pem).
    #[arg(long, conflicts_with = "http_tls_cert")]
    pub http_tls_mesh_ca: bool,
    /// A name (or IP) clients use to reach the HTTP API (repeatable):
    /// accepted as Host, and named in the mesh-CA certificate.
    #[arg(long = "http-host", value_name = "NAME")]
    pub http_hosts: Vec<String>,
    /// Run on Kubernetes: the API server is the source of Services,
    /// endpoints, routes and policies; sidecars present ServiceAccount
    /// tokens; the CA lives in a Secret; the injection webhook is served.
    #[arg(long)]
    pub kubernetes: bool,
    /// Where the injection webhook listens (HTTPS), with --kubernetes.
    #[arg(long, default_value = "0.0.0.0:15017", requires = "kubernetes")]
    pub webhook_addr: SocketAddr,
    /// The kubeconfig (default: in-cluster, else as kubectl finds it).
    #[arg(long, value_name = "FILE", requires = "kubernetes")]
    pub kubeconfig: Option<PathBuf>,
}

/// `trellis control --store`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StoreArg {
    Embedded,
    Etcd,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// A resource file, a folder of them, or `-` for standard input.
    #[arg(short = 'f', long = "filename", value_name = "PATH")]
    pub file: PathBuf,
    /// Validate on the server without changing anything.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Debug, Args)]
pub struct GetArgs {
    /// mesh, service (svc), workload (wl) or httproute (route).
    pub kind: String,
    pub name: Option<String>,
    #[command(flatten)]
    pub kube: crate::kube_observe::KubeArgs,
}

#[derive(Debug, Args)]
pub struct NameArgs {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Args)]
pub struct StatArgs {
    /// KIND or KIND/NAME: service (default), workload or route.
    pub target: Option<String>,
    /// The time window the figures cover.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub window: std::time::Duration,
    /// Show what traffic management did per service instead: retries,
    /// ejections, circuit-breaker rejections, rate limits, faults, mirrors.
    #[arg(long)]
    pub traffic: bool,
    #[command(flatten)]
    pub kube: crate::kube_observe::KubeArgs,
}

#[derive(Debug, Args)]
pub struct DemoAppArgs {
    /// Service name reported in answers (default: $SERVICE, else `demo-app`).
    #[arg(long, env = "SERVICE")]
    pub name: Option<String>,
    /// Version reported in answers (default: $VERSION).
    #[arg(long, env = "VERSION")]
    pub version: Option<String>,
    /// Instance reported in answers (default: $INSTANCE, else HOSTNAME-PID).
    #[arg(long, env = "INSTANCE")]
    pub instance: Option<String>,
    /// Port to listen on, on all interfaces.
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Address to listen on; overrides --port.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// A URL to call for every request (repeatable); answers go in `calls`.
    #[arg(long = "call", value_name = "URL")]
    pub calls: Vec<String>,
    /// Delay before answering: `50ms`, or a uniform range `10ms-50ms`.
    #[arg(long, value_parser = crate::demo_app::Latency::parse)]
    pub latency: Option<crate::demo_app::Latency>,
    /// Share of requests answered with --error-code, 0.0 to 1.0.
    #[arg(long, default_value_t = 0.0, value_parser = parse_rate)]
    pub error_rate: f64,
    #[arg(long, default_value_t = 503)]
    pub error_code: u16,
    /// A request header copied onto the downstream calls (repeatable), on
    /// top of the trace headers that are always copied.
    #[arg(long = "propagate", value_name = "HEADER")]
    pub propagate: Vec<String>,
    /// Limit for each downstream call.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub call_timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a control plane credential (--role), or a proxy's join token
    /// that grants one identity (--service-account; `-n` sets the namespace).
    Create {
        /// An API credential: admin (everything), viewer (read), tap (read
        /// and live request metadata).
        #[arg(long, value_enum, conflicts_with = "service_account")]
        role: Option<TokenRole>,
        /// A join token for this service account.
        #[arg(long, required_unless_present = "role")]
        service_account: Option<String>,
        /// The labels the proxy may register with (it may claim fewer);
        /// without them it may claim none, and serves no Service.
        #[arg(long, value_parser = parse_labels, value_name = "k=v,...", conflicts_with = "role")]
        labels: Option<BTreeMap<String, String>>,
        /// An IP the proxy may advertise besides the one it connects from.
        #[arg(long, value_name = "IP", conflicts_with = "role")]
        advertise_addr: Option<IpAddr>,
        /// How long the token is valid.
        #[arg(long, default_value = "24h")]
        ttl: String,
    },
    /// List tokens made over the API: ids, kinds, roles or identities,
    /// expiry (never the tokens themselves).
    List,
    /// Revoke a token by its id, at once: a credential stops working, a
    /// proxy can no longer join or renew with a join token.
    Revoke { id: String },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TokenRole {
    Admin,
    Viewer,
    Tap,
}

#[derive(Debug, Args)]
pub struct CaArgs {
    #[command(subcommand)]
    pub command: CaCommand,
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// The roots the mesh trusts.
    Show,
    /// Make a new root; the bundle trusts old and new until `retire`.
    Rotate,
    /// Stop trusting every root but the current one.
    Retire,
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0.0 and 1.0"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("trellis").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn kubernetes_flags_go_after_subcommands_too() {
        let cli = parse(&[
            "trace",
            "show",
            "abc",
            "--kubernetes",
            "--control-plane-namespace",
            "mesh",
        ]);
        let Command::Trace(t) = cli.command else {
            panic!()
        };
        assert!(t.kube.kubernetes);
        assert_eq!(t.kube.control_plane_namespace, "mesh");
        let cli = parse(&["stat", "-n", "shop", "--kubernetes"]);
        let Command::Stat(s) = cli.command else {
            panic!()
        };
        assert!(s.kube.kubernetes);
        assert_eq!(s.kube.control_plane_namespace, "trellis-system");
        let cli = parse(&["top", "web", "--kubernetes"]);
        let Command::Top(t) = cli.command else {
            panic!()
        };
        assert!(t.tap.kube.kubernetes);
        let cli = parse(&["dashboard", "--kubernetes", "--port", "8080"]);
        let Command::Dashboard(d) = cli.command else {
            panic!()
        };
        assert!(d.kube.kubernetes && d.port == 8080);
        // --kubeconfig means a cluster.
        assert!(Cli::try_parse_from(["trellis", "stat", "--kubeconfig", "f"]).is_err());
    }

    #[test]
    fn global_flags_go_anywhere() {
        let cli = parse(&[
            "get",
            "svc",
            "-n",
            "shop",
            "-o",
            "yaml",
            "--server",
            "http://x:1",
        ]);
        assert_eq!(cli.global.namespace.as_deref(), Some("shop"));
        assert_eq!(cli.global.output, Output::Yaml);
        assert_eq!(cli.global.server.as_deref(), Some("http://x:1"));
        assert_eq!(cli.global.data_dir, PathBuf::from(".trellis"));
        let Command::Get(g) = cli.command else {
            panic!()
        };
        assert_eq!(g.kind, "svc");
        assert_eq!(g.name, None);
    }

    #[test]
    fn proxy_flags_and_defaults() {
        let cli = parse(&[
            "proxy",
            "--control-plane",
            "127.0.0.1:15010",
            "--workload",
            "web",
            "--labels",
            "app=web,version=v2",
            "--app-port",
            "9000",
            "--upstream",
            "catalog:8080=127.0.0.1:9100",
            "--upstream",
            "reviews:80=127.0.0.1:9101",
        ]);
        let Command::Proxy(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.labels.unwrap()["version"], "v2");
        assert_eq!(p.app_port, 9000);
        assert_eq!(p.upstreams.len(), 2);
        assert_eq!(p.upstreams[1].service, "reviews");
        assert_eq!(p.inbound_addr, "0.0.0.0:15006".parse().unwrap());
        assert_eq!(p.outbound_addr, "127.0.0.1:15001".parse().unwrap());
        assert_eq!(p.admin_addr, "127.0.0.1:15000".parse().unwrap());
        assert_eq!(p.drain_grace, std::time::Duration::from_secs(10));
        // Limits left out keep the proxy's defaults.
        let mut limits = trellis_proxy::limits::Limits::default();
        p.limits.apply(&mut limits);
        assert_eq!(limits, trellis_proxy::limits::Limits::default());
    }

    #[test]
    fn limit_flags_set_their_limit() {
        let cli = parse(&[
            "proxy",
            "--control-plane",
            "127.0.0.1:15010",
            "--workload",
            "web",
            "--app-port",
            "9000",
            "--header-read-timeout",
            "2s",
            "--max-connections",
            "50",
            "--max-request-headers-kb",
            "96",
        ]);
        let Command::Proxy(p) = cli.command else {
            panic!()
        };
        let mut limits = trellis_proxy::limits::Limits::default();
        p.limits.apply(&mut limits);
        assert_eq!(
            limits.header_read_timeout,
            std::time::Duration::from_secs(2)
        );
        assert_eq!(limits.max_connections, 50);
        assert_eq!(limits.max_request_headers_kb, 96);
        assert_eq!(limits.max_hops, 16);
    }

    #[test]
    fn bad_flags_are_refused() {
        let bad = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("trellis").chain(args.iter().copied())).is_err()
        };
        assert!(bad(&[
            "proxy",
            "--control-plane",
            "x:1",
            "--workload",
            "w",
            "--app-port",
            "1",
            "--labels",
            "app"
        ]));
        assert!(bad(&[
            "proxy",
            "--control-plane",
            "x:1",
            "--workload",
            "w",
            "--app-port",
            "1",
            "--upstream",
            "x"
        ]));
        assert!(bad(&["demo-app", "--error-rate", "1.5"]));
        assert!(bad(&["demo-app", "--latency", "fast"]));
        assert!(bad(&["up", "-f", "x", "--mode", "vm"]));
        assert!(bad(&["exec", "web"]));
    }

    #[test]
    fn control_defaults() {
        let cli = parse(&["control", "--data-dir", "/tmp/x"]);
        let Command::Control(c) = cli.command else {
            panic!()
        };
        assert_eq!(c.http_addr.port(), 15080);
        assert_eq!(c.grpc_addr.port(), 15010);
        assert_eq!(cli.global.data_dir, PathBuf::from("/tmp/x"));
    }

    #[test]
    fn token_flags() {
        let cli = parse(&["token", "create", "--role", "viewer", "--token-file", "/t"]);
        assert_eq!(cli.global.token_file, Some(PathBuf::from("/t")));
        let Command::Token(TokenArgs {
            command: TokenCommand::Create { role, .. },
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(role, Some(TokenRole::Viewer));
        let cli = parse(&[
            "token",
            "create",
            "--service-account",
            "reviews",
            "--labels",
            "app=reviews,version=v1",
            "--advertise-addr",
            "10.0.0.7",
        ]);
        let Command::Token(TokenArgs {
            command: TokenCommand::Create { labels, .. },
        }) = cli.command
        else {
            panic!()
        };
        assert_eq!(labels.unwrap()["version"], "v1");
        let bad = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("trellis").chain(args.iter().copied())).is_err()
        };
        assert!(bad(&["token", "create"]));
        assert!(bad(&["token", "create", "--role", "root"]));
        assert!(bad(&[
            "token",
            "create",
            "--role",
            "admin",
            "--service-account",
            "x"
        ]));
        assert!(bad(&[
            "token", "create", "--role", "admin", "--labels", "app=x"
        ]));
        // The proxy's --token-file is its join token, not the credential.
        let cli = parse(&[
            "proxy",
            "--control-plane",
            "x:1",
            "--workload",
            "w",
            "--app-port",
            "1",
            "--token-file",
            "/join",
        ]);
        let Command::Proxy(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.token_file, Some(PathBuf::from("/join")));
    }

    #[test]
    fn exec_takes_the_command_after_dashes() {
        let cli = parse(&["exec", "web/1", "--", "curl", "-s", "http://catalog:8080/"]);
        let Command::Exec(e) = cli.command else {
            panic!()
        };
        assert_eq!(e.target, "web/1");
        assert_eq!(e.command, ["curl", "-s", "http://catalog:8080/"]);
    }

    #[test]
    fn demo_app_flags() {
        let cli = parse(&[
            "demo-app",
            "--name",
            "catalog",
            "--port",
            "9000",
            "--call",
            "http://a:1/",
            "--call",
            "http://b:2/",
            "--latency",
            "10ms-50ms",
            "--error-rate",
            "0.1",
        ]);
        let Command::DemoApp(d) = cli.command else {
            panic!()
        };
        assert_eq!(d.name.as_deref(), Some("catalog"));
        assert_eq!(d.port, 9000);
        assert_eq!(d.calls.len(), 2);
        assert_eq!(d.error_code, 503);
        assert!(d.latency.is_some());
    }
}
