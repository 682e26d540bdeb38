//! `trellis init` in a network namespace the test creates (needs root; see
//! `netns::can_run`). Tagged TCP/UDP servers stand in for the proxy's
//! listeners, so each probe shows where the kernel really sent it.

mod netns;

use std::time::Duration;

use netns::{pair, Netns};
use trellis_testkit::eventually_blocking;

const TRELLIS: &str = env!("CARGO_BIN_EXE_trellis");

/// Servers that answer every TCP connection and UDP datagram with a tag.
/// Args: proto:addr:port:tag ...
const SERVERS: &str = r#"
import socket, sys, threading
def tcp(addr, port, tag):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(64)
    while True:
        c, _ = s.accept()
        try: c.sendall(tag.encode())
        finally: c.close()
def udp(addr, port, tag):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((addr, port))
    while True:
        _, peer = s.recvfrom(512); s.sendto(tag.encode(), peer)
for spec in sys.argv[1:]:
    proto, addr, port, tag = spec.split(":")
    threading.Thread(target=tcp if proto == "tcp" else udp, args=(addr, int(port), tag), daemon=True).start()
threading.Event().wait()
"#;

/// One probe: proto host port [mark]; prints the tag it got, or ERR.
const PROBE: &str = r#"
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
mark = int(sys.argv[4], 0) if len(sys.argv) > 4 else 0
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.settimeout(2)
if mark: s.setsockopt(socket.SOL_SOCKET, 36, mark)  # SO_MARK
try:
    if proto == "tcp":
        s.connect((host, port)); print(s.recv(64).decode())
    else:
        s.sendto(b"q", (host, port)); print(s.recvfrom(64)[0].decode())
except Exception as e:
    print("ERR", e)
"#;

fn probe(ns: &Netns, proto: &str, host: &str, port: u16, mark: Option<&str>) -> String {
    let port = port.to_string();
    let mut args = vec!["python3", "-c", PROBE, proto, host, &port];
    if let Some(m) = mark {
        args.push(m);
    }
    ns.exec(&args).trim().to_string()
}

fn table(ns: &Netns) -> String {
    let out = ns.exec_output(&["nft", "list", "table", "ip", "trellis"]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn init_redirects_excludes_is_idempotent_and_removes() {
    if !netns::can_run("init_redirects_excludes_is_idempotent_and_removes") {
        return;
    }
    let mut p = pair();
    let a_servers = [
        "tcp:127.0.0.1:15001:outbound",
        "tcp:0.0.0.0:15006:inbound",
        "tcp:0.0.0.0:15000:admin",
        "tcp:127.0.0.1:8080:app",
        "tcp:127.0.0.1:15053:dns-tcp",
        "udp:127.0.0.1:15053:dns",
    ];
    let mut args = vec!["python3", "-c", SERVERS];
    args.extend(a_servers);
    p.a.spawn(&args);
    p.b.spawn(&[
        "python3",
        "-c",
        SERVERS,
        "tcp:0.0.0.0:80:real-b",
        "tcp:0.0.0.0:53:real-dns",
    ]);
    let a_ip = p.a_ip.clone();
    let b_ip = p.b_ip.clone();
    eventually_blocking("the test servers", Duration::from_secs(10), || {
        (probe(&p.a, "tcp", "127.0.0.1", 15001, None) == "outbound"
            && probe(&p.b, "tcp", &b_ip, 80, None) == "real-b")
            .then_some(())
    });
    // Before init: nothing is redirected.
    assert_eq!(probe(&p.a, "tcp", &b_ip, 80, None), "real-b");

    // Twice: the second run replaces the table instead of adding to it.
    for _ in 0..2 {
        p.a.exec(&[TRELLIS, "init"]);
    }
    let t = table(&p.a);
    assert_eq!(t.matches("redirect to :15001").count(), 1, "{t}");
    assert_eq!(t.matches("redirect to :15006").count(), 1, "{t}");

    assert_eq!(
        probe(&p.a, "tcp", &b_ip, 80, None),
        "outbound",
        "outbound TCP goes to 15001"
    );
    assert_eq!(
        probe(&p.a, "tcp", &b_ip, 80, Some("0x7e11")),
        "real-b",
        "the proxy's marked traffic passes"
    );
    assert_eq!(
        probe(&p.a, "tcp", "127.0.0.1", 8080, None),
        "app",
        "loopback passes"
    );
    // The pod's own IP is loopback traffic too: not sent to the proxy (the
    // app listens on 127.0.0.1 only, so this is refused).
    let own = probe(&p.a, "tcp", &a_ip, 8080, None);
    assert!(own.starts_with("ERR"), "{own}");
    assert_eq!(
        probe(&p.a, "udp", &b_ip, 53, None),
        "dns",
        "DNS over UDP goes to 15053"
    );
    assert_eq!(
        probe(&p.a, "tcp", &b_ip, 53, None),
        "dns-tcp",
        "DNS over TCP goes to 15053"
    );
    assert_eq!(
        probe(&p.b, "tcp", &a_ip, 8080, None),
        "inbound",
        "inbound TCP goes to 15006"
    );
    assert_eq!(
        probe(&p.b, "tcp", &a_ip, 15000, None),
        "admin",
        "the admin port is not redirected"
    );

    // --dry-run prints and changes nothing.
    let dry =
        p.a.exec(&[TRELLIS, "init", "--dry-run", "--outbound-port", "1"]);
    assert!(dry.contains("redirect to :1\n"), "{dry}");
    assert_eq!(table(&p.a), t);

    // --remove, twice: the host (here, the namespace) is as before.
    for _ in 0..2 {
        p.a.exec(&[TRELLIS, "init", "--remove"]);
    }
    assert_eq!(table(&p.a), "");
    let tables = p.a.exec(&["nft", "list", "tables"]);
    assert!(!tables.contains("trellis"), "{tables}");
    assert_eq!(probe(&p.a, "tcp", &b_ip, 80, None), "real-b");
    assert_eq!(probe(&p.b, "tcp", &a_ip, 15000, None), "admin");
    drop(p);
}
