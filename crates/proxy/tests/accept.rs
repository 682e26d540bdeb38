//! Descriptor exhaustion for real: a child process (this test binary run
//! again) with a low open-file limit runs a listener with the proxy's
//! accept loop, and this process opens more connections than the child has
//! descriptors for. No root needed.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use trellis_proxy::listener::{self, AcceptErrors, Kind, Reason};
use trellis_testkit::assert_eventually;

const CHILD: &str = "TRELLIS_ACCEPT_TEST_CHILD";
const TEST: &str = "out_of_descriptors_the_accept_loop_backs_off_serves_on_and_recovers";
/// The child's open-file limit: a few for the runtime and the listener,
/// the rest for connections.
const NOFILE: usize = 64;
/// More than the child can hold; fewer than it holds plus `FREED`, so
/// that closing `FREED` lets it accept every queued one.
const CLIENTS: usize = 80;
const FREED: usize = 40;

#[tokio::test]
async fn out_of_descriptors_the_accept_loop_backs_off_serves_on_and_recovers() {
    if std::env::var_os(CHILD).is_some() {
        return child().await;
    }
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit -n {NOFILE} && exec \"$0\" \"$@\""))
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", TEST, "--nocapture", "--test-threads", "1"])
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("sh runs the child");
    let mut control = Control {
        stdin: child.stdin.take().unwrap(),
        stdout: BufReader::new(child.stdout.take().unwrap()).lines(),
    };
    let addr: SocketAddr = control.read("listening").await.parse().unwrap();

    // The kernel completes every handshake; the child accepts until it has
    // no descriptor left, and the rest stay queued.
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(TcpStream::connect(addr).await.unwrap());
    }
    assert_eventually!(
        timeout = Duration::from_secs(20),
        control.errors().await > 0,
        "the child never ran out of descriptors"
    );

    // Connections accepted before keep being served meanwhile.
    echo(&mut clients[0]).await;

    // Backing off, the loop tries a few times in 2 s (at most 9 tries in
    // the first 1.3 s, then one a second), where a spinning loop fails
    // hundreds of thousands of times.
    let before = control.errors().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let in_two_seconds = control.errors().await - before;
    assert!(
        in_two_seconds <= 12,
        "{in_two_seconds} failed accepts in 2 s: the accept loop does not back off"
    );

    // Descriptors come back: every queued connection is accepted and
    // served.
    clients.drain(..FREED);
    for c in &mut clients {
        echo(c).await;
    }
    control.finish().await;
    let status = child.wait().await.unwrap();
    assert!(status.success(), "the child failed: {status}");
}

/// Writes a byte and reads it back.
async fn echo(c: &mut TcpStream) {
    let round_trip = async {
        c.write_all(b"x").await?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await?;
        Ok::<_, std::io::Error>(b)
    };
    let got = tokio::time::timeout(Duration::from_secs(20), round_trip).await;
    assert_eq!(got.expect("an echo within 20 s").expect("an echo"), *b"x");
}

/// The parent's line-based conversation with the child.
struct Control {
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl Control {
    /// The value of the child's next `KEY VALUE` (the test harness prints
    /// lines of its own, and the start of one before the first value).
    async fn read(&mut self, key: &str) -> String {
        let key = format!("{key} ");
        while let Some(line) = self.stdout.next_line().await.unwrap() {
            if let Some((_, v)) = line.split_once(&key) {
                return v.to_string();
            }
        }
        panic!("the child ended before saying {key}");
    }

    /// Ends the child: its stdin closes, and its last words are read so
    /// that it can say them.
    async fn finish(mut self) {
        drop(self.stdin);
        while self.stdout.next_line().await.unwrap().is_some() {}
    }

    /// Failed accepts for want of descriptors so far, as the child counts.
    async fn errors(&mut self) -> u64 {
        self.stdin.write_all(b"errors\n").await.unwrap();
        self.read("errors").await.parse().unwrap()
    }
}

/// Serves echo connections with the accept loop, and answers `errors` on
/// stdin until stdin closes.
async fn child() {
    let l = listener::bind(([127, 0, 0, 1], 0).into(), Kind::inbound)
        .await
        .unwrap();
    println!("listening {}", l.local_addr().unwrap());
    let errors = AcceptErrors::default();
    let (_shutdown, shutdown) = watch::channel(false);
    tokio::spawn(listener::serve(
        l,
        Kind::inbound,
        errors.clone(),
        shutdown,
        |mut tcp, _| {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        },
    ));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await.unwrap() {
        if line == "errors" {
            println!("errors {}", errors.get(Kind::inbound, Reason::descriptors));
        }
    }
}
