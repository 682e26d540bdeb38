//! Descriptor exhaustion for real: a child process (this test binary run
//! again) with a low open-file limit runs a listener with the proxy's
//! accept loop, and this process opens more connections than the child has
//! descriptors for. The ones it cannot take are reset at once (shed), the
//! ones it has are served on, and once descriptors come back new ones are
//! taken again. No root needed.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{ChildStdin, ChildStdout, Command};
use tokio::sync::watch;
use trellis_proxy::listener::{self, ConnMetrics, Kind, Listening, Reason, Shed};
use trellis_testkit::assert_eventually;

const CHILD: &str = "TRELLIS_ACCEPT_TEST_CHILD";
const TEST: &str = "out_of_descriptors_the_accept_loop_sheds_serves_on_and_recovers";
/// The child's open-file limit: a few for the runtime and the listener,
/// the rest for connections.
const NOFILE: usize = 64;
/// More than the child can hold.
const CLIENTS: usize = 80;

#[tokio::test]
async fn out_of_descriptors_the_accept_loop_sheds_serves_on_and_recovers() {
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
    // no descriptor left, and resets the rest.
    let mut clients = Vec::new();
    let mut reset_at_connect = 0;
    for _ in 0..CLIENTS {
        match TcpStream::connect(addr).await {
            Ok(c) => clients.push(c),
            // Shed so soon that the reset came before connect returned.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset_at_connect += 1,
            Err(e) => panic!("connecting to the child: {e}"),
        }
    }
    assert_eventually!(
        timeout = Duration::from_secs(20),
        control.get("errors").await > 0,
        "the child never ran out of descriptors"
    );

    // A shed client learns at once: its connection is reset.
    let reads = clients.into_iter().map(|mut c| async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(3), c.read(&mut b)).await;
        (matches!(r, Ok(Ok(0)) | Ok(Err(_))), c)
    });
    let (shed, held): (Vec<_>, Vec<_>) = futures::future::join_all(reads)
        .await
        .into_iter()
        .partition(|(shed, _)| *shed);
    let shed = shed.len() + reset_at_connect;
    let mut held: Vec<TcpStream> = held.into_iter().map(|(_, c)| c).collect();
    println!(
        "{CLIENTS} clients at an open-file limit of {NOFILE}: {shed} shed, {} held",
        held.len()
    );
    assert!(shed >= CLIENTS - NOFILE, "only {shed} shed");
    assert_eq!(
        control.get("shed").await,
        shed as u64,
        "every shed one is counted"
    );

    // The connections it holds are served meanwhile.
    for c in &mut held {
        echo(c).await;
    }

    // With nothing queued, the loop waits: no failed accepts pile up.
    let before = control.get("errors").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let in_two_seconds = control.get("errors").await - before;
    assert!(
        in_two_seconds <= 12,
        "{in_two_seconds} failed accepts in 2 s: the accept loop spins"
    );

    // Descriptors come back: new connections are accepted and served.
    held.truncate(held.len() / 2);
    let mut fresh = Vec::new();
    for _ in 0..10 {
        fresh.push(TcpStream::connect(addr).await.unwrap());
    }
    for c in &mut fresh {
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

    /// `errors` (failed accepts for want of descriptors) or `shed`
    /// (connections reset for want of them) so far, as the child counts.
    async fn get(&mut self, what: &str) -> u64 {
        self.stdin
            .write_all(format!("{what}\n").as_bytes())
            .await
            .unwrap();
        self.read(what).await.parse().unwrap()
    }
}

/// Serves echo connections with the accept loop, and answers `errors` and
/// `shed` on stdin until stdin closes.
async fn child() {
    let l = listener::bind(([127, 0, 0, 1], 0).into(), Kind::inbound)
        .await
        .unwrap();
    println!("listening {}", l.local_addr().unwrap());
    let metrics = ConnMetrics::default();
    let (_shutdown, shutdown) = watch::channel(false);
    let how = Listening {
        kind: Kind::inbound,
        cap: 10_000,
        metrics: metrics.clone(),
    };
    tokio::spawn(listener::serve(l, how, shutdown, |tcp, _| {
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(tcp);
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }));
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = stdin.next_line().await.unwrap() {
        match line.as_str() {
            "errors" => println!(
                "errors {}",
                metrics
                    .accept_errors
                    .get(Kind::inbound, Reason::descriptors)
            ),
            "shed" => println!("shed {}", metrics.shed(Kind::inbound, Shed::descriptors)),
            _ => {}
        }
    }
}
