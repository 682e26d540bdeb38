//! `trellis init`: the redirect rules of a pod (its network namespace), as
//! one nftables table, `ip trellis`, installed and replaced atomically.
//!
//! - outbound TCP from the app → the proxy's outbound port (15001)
//! - DNS (UDP and TCP port 53) → the proxy's DNS server (15053)
//! - inbound TCP from other hosts/pods → the proxy's inbound port (15006)
//!
//! Left alone: packets of the proxy itself (it marks its sockets, see
//! `trellis_proxy::transparent`; the ports and the mark are the pod
//! contract, `trellis_proxy::pod`), the app's loopback traffic, the proxy's
//! admin port and any `--exclude-inbound-ports`.
//!
//! Why nftables rather than iptables: one table holds every rule and is
//! replaced in one kernel transaction (`nft -f`), so `init` is idempotent
//! without check-then-insert races, and `--remove` deletes exactly our
//! table without touching anyone else's chains. The Kubernetes init
//! container will use the same rules.

use std::io::Write as _;
use std::process::{Command, ExitCode, Stdio};

use crate::{pod, transparent};
use anyhow::Context as _;
use clap::Args;

/// The nftables table `init` owns in the namespace.
pub const TABLE: &str = "trellis";

#[derive(Clone, Debug, Args)]
pub struct InitArgs {
    /// Print the rules instead of installing them.
    #[arg(long)]
    pub dry_run: bool,
    /// Remove the rules (nothing to remove is fine).
    #[arg(long, conflicts_with = "dry_run")]
    pub remove: bool,
    /// Where outbound TCP goes (the proxy's outbound listener).
    #[arg(long, default_value_t = pod::OUTBOUND_PORT)]
    pub outbound_port: u16,
    /// Where inbound TCP goes (the proxy's inbound listener).
    #[arg(long, default_value_t = pod::INBOUND_PORT)]
    pub inbound_port: u16,
    /// Where DNS goes (the proxy's DNS server).
    #[arg(long, default_value_t = pod::DNS_PORT)]
    pub dns_port: u16,
    /// The proxy's admin port: reachable from outside, never redirected.
    #[arg(long, default_value_t = pod::ADMIN_PORT)]
    pub admin_port: u16,
    /// The socket mark of the proxy's own connections, which pass unredirected.
    #[arg(long, default_value_t = Mark(pod::MARK), value_parser = parse_mark)]
    pub mark: Mark,
    /// The uid the proxy runs as, whose traffic passes unredirected like
    /// marked traffic: on Kubernetes the sidecar runs as its own uid with no
    /// capability, so it cannot mark its sockets.
    #[arg(long, value_name = "UID")]
    pub proxy_uid: Option<u32>,
    /// Inbound ports that reach the app directly (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub exclude_inbound_ports: Vec<u16>,
    /// Do not redirect DNS.
    #[arg(long)]
    pub no_dns: bool,
    /// Destinations the app reaches directly (comma-separated IPv4 CIDRs),
    /// e.g. the control plane's address for the proxy's own API calls.
    #[arg(long, value_delimiter = ',', value_name = "CIDR,...", value_parser = parse_cidr)]
    pub exclude_outbound_cidrs: Vec<String>,
    /// Destination ports the app reaches directly (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub exclude_outbound_ports: Vec<u16>,
    /// Redirect only the outbound traffic (and DNS) of processes running as
    /// these users (comma-separated uids): on a plain host, where the app
    /// shares the network namespace with everything else, the app's user.
    #[arg(long, value_delimiter = ',', value_name = "UID,...")]
    pub redirect_uid: Vec<u32>,
    /// Redirect only inbound TCP to these ports (comma-separated), e.g. the
    /// app's port on a plain host; default: every port but the admin port
    /// and --exclude-inbound-ports (a pod).
    #[arg(long, value_delimiter = ',', value_name = "PORT,...")]
    pub include_inbound_ports: Vec<u16>,
}

fn parse_cidr(s: &str) -> Result<String, String> {
    let (ip, len) = s.split_once('/').unwrap_or((s, "32"));
    match (ip.parse::<std::net::Ipv4Addr>(), len.parse::<u8>()) {
        (Ok(ip), Ok(len)) if len <= 32 => Ok(format!("{ip}/{len}")),
        _ => Err(format!("{s:?} is not an IPv4 CIDR (e.g. 10.1.0.1/32)")),
    }
}

/// `trellis proxy` flags for pods mode.
#[derive(Clone, Debug, Args)]
pub struct TransparentArgs {
    /// Take connections redirected by `trellis init` (SO_ORIGINAL_DST),
    /// mark the proxy's own sockets and serve DNS for service names.
    #[arg(long)]
    pub transparent: bool,
    /// The mark of the proxy's sockets (must match `trellis init --mark`);
    /// `off` when the rules let the proxy's uid pass instead (`trellis init
    /// --proxy-uid`), as on Kubernetes, where it has no CAP_NET_ADMIN.
    #[arg(long = "mark", default_value_t = Mark(pod::MARK), value_parser = parse_proxy_mark, requires = "transparent")]
    pub transparent_mark: Mark,
    /// Where the DNS server listens (UDP and TCP); `off` for none.
    #[arg(long, default_value_t = DnsAddr(Some(pod::DNS_ADDR)), value_parser = parse_dns_addr, requires = "transparent")]
    pub dns_addr: DnsAddr,
    /// Nameservers for names outside the mesh (default: the non-loopback
    /// nameservers of /etc/resolv.conf).
    #[arg(
        long = "dns-upstream",
        value_name = "IP:PORT",
        requires = "transparent"
    )]
    pub dns_upstreams: Vec<std::net::SocketAddr>,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DnsAddr(pub Option<std::net::SocketAddr>);

impl std::fmt::Display for DnsAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => a.fmt(f),
            None => f.write_str("off"),
        }
    }
}

/// A socket mark, shown in hex as `nft` shows marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mark(pub u32);

impl std::fmt::Display for Mark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            0 => f.write_str("off"),
            m => write!(f, "{m:#x}"),
        }
    }
}

/// The proxy's `--mark`: a mark, or `off` (0: its sockets are not marked).
fn parse_proxy_mark(s: &str) -> Result<Mark, String> {
    if s == "off" {
        return Ok(Mark(0));
    }
    parse_mark(s)
}

fn parse_dns_addr(s: &str) -> Result<DnsAddr, String> {
    if s == "off" {
        return Ok(DnsAddr(None));
    }
    s.parse()
        .map(|a| DnsAddr(Some(a)))
        .map_err(|_| format!("{s:?} is not IP:PORT or `off`"))
}

impl TransparentArgs {
    pub fn settings(&self) -> Option<transparent::Settings> {
        self.transparent.then(|| transparent::Settings {
            mark: self.transparent_mark.0,
            dns_addr: self.dns_addr.0,
            dns_upstreams: self.dns_upstreams.clone(),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("`nft` was not found: install nftables (e.g. `apt-get install nftables`)")]
    NoNft,
    #[error("installing redirect rules needs root (CAP_NET_ADMIN): run `sudo trellis init` or inside the pod's namespace as root")]
    NotRoot,
    #[error("nft refused the rules: {0}")]
    Nft(String),
}

pub fn parse_mark(s: &str) -> Result<Mark, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    match r {
        Ok(0) => Err("the mark must not be 0 (0 is every unmarked packet)".into()),
        Ok(m) => Ok(Mark(m)),
        Err(_) => Err(format!(
            "{s:?} is not a number (e.g. {:#x} or {})",
            pod::MARK,
            pod::MARK
        )),
    }
}

/// The nft script that (re)installs the table. Declaring the table before
/// deleting it makes the delete succeed on first install; the whole script
/// is one transaction, so traffic never sees a half-built rule set.
pub fn rules(a: &InitArgs) -> String {
    let mut inbound_excluded: Vec<u16> = vec![a.admin_port];
    inbound_excluded.extend(&a.exclude_inbound_ports);
    inbound_excluded.sort_unstable();
    inbound_excluded.dedup();
    let excluded = inbound_excluded
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let excluded_out = if a.exclude_outbound_cidrs.is_empty() {
        String::new()
    } else {
        format!(
            "\t\tip daddr {{ {} }} return\n",
            a.exclude_outbound_cidrs.join(", ")
        )
    };
    let mut out_ports = a.exclude_outbound_ports.clone();
    out_ports.sort_unstable();
    out_ports.dedup();
    let excluded_out = if out_ports.is_empty() {
        excluded_out
    } else {
        let ports: Vec<String> = out_ports.iter().map(u16::to_string).collect();
        format!(
            "{excluded_out}\t\ttcp dport {{ {} }} return\n",
            ports.join(", ")
        )
    };
    let owners = if a.redirect_uid.is_empty() {
        String::new()
    } else {
        let mut uids = a.redirect_uid.clone();
        uids.sort_unstable();
        uids.dedup();
        let uids: Vec<String> = uids.iter().map(u32::to_string).collect();
        format!("\t\tmeta skuid != {{ {} }} return\n", uids.join(", "))
    };
    let included_in = if a.include_inbound_ports.is_empty() {
        String::new()
    } else {
        let mut ports = a.include_inbound_ports.clone();
        ports.sort_unstable();
        ports.dedup();
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!("\t\ttcp dport != {{ {} }} return\n", ports.join(", "))
    };
    let uid = match a.proxy_uid {
        Some(uid) => format!("\t\tmeta skuid {uid} return\n"),
        None => String::new(),
    };
    let dns = if a.no_dns {
        String::new()
    } else {
        format!(
            "\t\tudp dport {ns} redirect to :{p}\n\t\ttcp dport {ns} redirect to :{p}\n",
            ns = pod::NAMESERVER_PORT,
            p = a.dns_port
        )
    };
    format!(
        "table ip {TABLE}\n\
         delete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tchain output {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta mark {mark:#x} return\n\
         {uid}\
         {owners}\
         {dns}\
         \t\toifname \"lo\" return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         {excluded_out}\
         \t\tmeta l4proto tcp redirect to :{out}\n\
         \t}}\n\
         \tchain prerouting {{\n\
         \t\ttype nat hook prerouting priority -100; policy accept;\n\
         \t\tiifname \"lo\" return\n\
         \t\ttcp dport {{ {excluded} }} return\n\
         {included_in}\
         \t\tmeta l4proto tcp redirect to :{inb}\n\
         \t}}\n\
         }}\n",
        mark = a.mark.0,
        out = a.outbound_port,
        inb = a.inbound_port,
    )
}

/// The nft script that removes the table (fine when it is not there).
pub fn remove_rules() -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n")
}

/// Runs `nft -f -` with `script`.
pub fn nft(script: &str) -> Result<(), InitError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => InitError::NoNft,
            _ => InitError::Nft(e.to_string()),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| InitError::Nft(e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| InitError::Nft(e.to_string()))?;
    if out.status.success() {
        return Ok(());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if err.contains("Operation not permitted") {
        return Err(InitError::NotRoot);
    }
    Err(InitError::Nft(err))
}

pub fn is_root() -> bool {
    // The effective uid of /proc/self is ours: no libc call needed.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// Installs (or with `--remove`, removes) the rules in the current network
/// namespace; with `--dry-run` only prints them.
pub fn apply(a: &InitArgs) -> Result<(), InitError> {
    let script = if a.remove { remove_rules() } else { rules(a) };
    if !is_root() {
        return Err(InitError::NotRoot);
    }
    nft(&script)
}

pub fn run(a: &InitArgs) -> anyhow::Result<ExitCode> {
    if a.dry_run {
        print!("{}", rules(a));
        return Ok(ExitCode::SUCCESS);
    }
    apply(a).context(if a.remove {
        "trellis init --remove"
    } else {
        "trellis init"
    })?;
    if a.remove {
        eprintln!("removed table ip {TABLE}");
    } else {
        eprintln!(
            "installed table ip {TABLE}: outbound TCP → :{}, inbound TCP → :{}{}, mark {:#x} and loopback pass",
            a.outbound_port,
            a.inbound_port,
            if a.no_dns {
                String::new()
            } else {
                format!(", DNS → :{}", a.dns_port)
            },
            a.mark.0
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct T {
        #[command(flatten)]
        a: InitArgs,
    }

    fn args(extra: &[&str]) -> InitArgs {
        let mut v = vec!["t"];
        v.extend(extra);
        T::parse_from(v).a
    }

    #[test]
    fn default_rules_redirect_and_exclude() {
        let r = rules(&args(&[]));
        assert!(r.starts_with("table ip trellis\ndelete table ip trellis\n"));
        assert!(r.contains("meta mark 0x7e11 return"));
        assert!(r.contains("udp dport 53 redirect to :15053"));
        assert!(r.contains("tcp dport 53 redirect to :15053"));
        assert!(r.contains("meta l4proto tcp redirect to :15001"));
        assert!(r.contains("tcp dport { 15000 } return"));
        assert!(r.contains("meta l4proto tcp redirect to :15006"));
        // The mark is checked before anything is redirected, DNS before the
        // loopback exclusion (a resolver on 127.0.0.53 is still caught).
        let at = |s: &str| r.find(s).unwrap();
        assert!(at("meta mark") < at("udp dport 53"));
        assert!(at("udp dport 53") < at("oifname \"lo\""));
        assert!(at("oifname \"lo\"") < at("redirect to :15001"));
    }

    #[test]
    fn the_proxys_uid_passes_before_anything_is_redirected() {
        let r = rules(&args(&["--proxy-uid", "1337"]));
        let at = |s: &str| r.find(s).unwrap();
        // Before DNS too: the proxy's own queries to the upstream
        // nameservers must not come back to it.
        assert!(at("meta skuid 1337 return") < at("udp dport 53"));
        assert!(at("meta skuid 1337 return") < at("redirect to :15001"));
        assert!(!rules(&args(&[])).contains("skuid"));
    }

    #[test]
    fn the_proxy_may_run_without_a_mark_and_init_may_not() {
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            t: TransparentArgs,
        }
        let p = P::parse_from(["p", "--transparent", "--mark", "off"]);
        assert_eq!(p.t.settings().unwrap().mark, 0);
        assert_eq!(Mark(0).to_string(), "off");
        assert!(T::try_parse_from(["t", "--mark", "off"]).is_err());
    }

    #[test]
    fn flags_change_ports_and_exclusions() {
        let r = rules(&args(&[
            "--outbound-port",
            "1",
            "--inbound-port",
            "2",
            "--admin-port",
            "3",
            "--mark",
            "77",
            "--exclude-inbound-ports",
            "22,3",
            "--no-dns",
            "--exclude-outbound-cidrs",
            "10.9.0.1,10.8.0.0/16",
        ]));
        assert!(r.contains("ip daddr { 10.9.0.1/32, 10.8.0.0/16 } return"));
        let p = rules(&args(&["--exclude-outbound-ports", "9000,80"]));
        assert!(p.contains("tcp dport { 80, 9000 } return"), "{p}");
        assert!(p.find("dport { 80, 9000 }") < p.find("redirect to :15001"));
        assert!(r.contains("redirect to :1\n"));
        assert!(r.contains("redirect to :2\n"));
        assert!(r.contains("tcp dport { 3, 22 } return"));
        assert!(r.contains("meta mark 0x4d return"));
        assert!(!r.contains("dport 53"));
    }

    #[test]
    fn plain_hosts_scope_the_rules_to_the_app() {
        let r = rules(&args(&[
            "--redirect-uid",
            "1001,1000",
            "--include-inbound-ports",
            "8080",
        ]));
        assert!(r.contains("meta skuid != { 1000, 1001 } return"), "{r}");
        assert!(r.contains("tcp dport != { 8080 } return"), "{r}");
        // Other users' traffic, DNS included, passes before any redirect.
        let at = |s: &str| r.find(s).unwrap();
        assert!(at("meta mark") < at("meta skuid"));
        assert!(at("meta skuid") < at("udp dport 53"));
        assert!(at("dport != { 8080 }") < at("redirect to :15006"));
        let pod = rules(&args(&[]));
        assert!(!pod.contains("skuid") && !pod.contains("!="), "{pod}");
    }

    #[test]
    fn transparent_defaults_are_the_pod_contract() {
        use clap::CommandFactory;
        #[derive(Parser)]
        struct P {
            #[command(flatten)]
            t: TransparentArgs,
        }
        let t = P::parse_from(["p", "--transparent"]).t;
        assert_eq!(t.settings(), Some(transparent::Settings::default()));
        let help = P::command().render_help().to_string();
        assert!(help.contains("[default: 0x7e11]"), "{help}");
        assert!(help.contains("[default: 127.0.0.1:15053]"), "{help}");
        let off = P::parse_from(["p", "--transparent", "--dns-addr", "off"]).t;
        assert_eq!(off.settings().unwrap().dns_addr, None);
    }

    #[test]
    fn marks_parse_in_hex_and_decimal() {
        assert_eq!(parse_mark("0x7e11"), Ok(Mark(0x7e11)));
        assert_eq!(parse_mark("12"), Ok(Mark(12)));
        assert!(parse_mark("0").is_err());
        assert!(parse_mark("x").is_err());
    }

    #[test]
    fn removal_is_idempotent_by_construction() {
        assert_eq!(
            remove_rules(),
            "table ip trellis\ndelete table ip trellis\n"
        );
    }
}
