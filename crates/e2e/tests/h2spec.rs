//! h2spec, the HTTP/2 conformance tester (RFC 7540/9113 and HPACK, every
//! case including `--strict`), against each proxy listener that speaks
//! HTTP/2 to a client: an `--upstream` listener (h2c, then mutual TLS to the
//! server's proxy), the outbound listener as an explicit proxy (h2c with
//! prior knowledge, same path), and the inbound listener in permissive mode
//! (h2c plaintext, straight to the app). Behind them an app that reads each
//! request whole and answers it.
//!
//! Needs the h2spec binary: `TRELLIS_H2SPEC=PATH`, else the one
//! `scripts/test-peers h2spec` cached under
//! `${TRELLIS_CACHE_DIR:-/var/cache/trellis}/peers/`. Skipped with a message
//! where there is none; under CI it must be there (scripts/test builds it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use trellis_e2e::{eventually, TestMesh};

/// h2spec cases that do not apply to a protocol-detecting proxy listener,
/// as (section, case, why). Each is still run and printed; what the proxy
/// does instead is asserted by `bytes_that_are_not_a_preface_are_not_http2`.
const NOT_APPLICABLE: &[(&str, &str, &str)] = &[(
    "http2/3.5",
    "Sends invalid connection preface",
    "RFC 9113 §3.4 makes an invalid preface a connection error for an endpoint that \
     speaks HTTP/2 on that connection. These listeners serve HTTP/1.1, h2c with prior \
     knowledge and (upstream, inbound) opaque TCP on one port, and tell them apart by the \
     first bytes, as §3.3 says a server identifies prior-knowledge connections: by the \
     preface. Bytes that are not the preface are not HTTP/2 to them: the outbound listener \
     answers them as HTTP/1.1 (400), the others carry them to the app as opaque TCP, and \
     h2spec reads that HTTP/1.1 answer where it wants a bare close",
)];

/// Fewer cases than this in a report means h2spec did not really run.
const MIN_CASES: usize = 140;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_http2_listener_passes_h2spec() {
    let Some(h2spec) = h2spec() else {
        return;
    };
    let mesh = MeshUnderTest::start().await;
    let reports = mesh.dir().join("h2spec");
    std::fs::create_dir_all(&reports).expect("report dir");

    let mut unexpected = Vec::new();
    let mut inapplicable = std::collections::BTreeMap::new();
    for target in mesh.targets() {
        let junit = reports.join(format!("{}.xml", target.name));
        let out = run_h2spec(&h2spec, &target, &junit).await;
        let xml = std::fs::read_to_string(&junit).unwrap_or_else(|e| {
            panic!(
                "h2spec wrote no report for the {} listener ({e}); it printed:\n{out}",
                target.name
            )
        });
        let cases = junit_cases(&xml);
        assert!(
            cases.len() >= MIN_CASES,
            "h2spec ran only {} cases against the {} listener; it printed:\n{out}",
            cases.len(),
            target.name
        );
        let failed: Vec<&Case> = cases.iter().filter(|c| c.failure.is_some()).collect();
        let skipped = cases.iter().filter(|c| c.skipped).count();
        eprintln!(
            "h2spec, {} listener ({}): {} cases, {} passed, {} failed, {} skipped",
            target.name,
            target.authority,
            cases.len(),
            cases.len() - failed.len() - skipped,
            failed.len(),
            skipped
        );
        for case in failed {
            match not_applicable(case) {
                Some(why) => {
                    eprintln!("  not applicable: {}: {}", case.section, case.name);
                    inapplicable.insert(format!("{}: {}", case.section, case.name), why);
                }
                None => unexpected.push(format!(
                    "{} listener: {}: {}\n    h2spec got: {}",
                    target.name,
                    case.section,
                    case.name,
                    case.failure
                        .as_deref()
                        .unwrap_or_default()
                        .replace('\n', " / ")
                )),
            }
        }
    }
    for (case, why) in inapplicable {
        eprintln!("{case}: not applicable to these listeners: {why}");
    }
    assert!(
        unexpected.is_empty(),
        "h2spec cases failed:\n{}",
        unexpected.join("\n")
    );
}

/// What each listener does instead of the not-applicable case: no HTTP/2
/// (no SETTINGS frame), an HTTP/1.1 400 (the proxy's own on the outbound
/// listener, the app's through opaque TCP on the others), then a close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_a_preface_are_not_http2() {
    let mesh = MeshUnderTest::start().await;
    for target in mesh.targets() {
        let mut tcp = TcpStream::connect(target.addr).await.expect("connects");
        tcp.write_all(b"INVALID CONNECTION PREFACE\r\n\r\n")
            .await
            .expect("writes");
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("the {} listener kept the connection open", target.name))
            .expect("reads");
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 400 "),
            "the {} listener answered {text:?}",
            target.name
        );
    }
}

/// One listener h2spec talks to: where it connects, and the authority it
/// then sends (h2spec always sends `host:port` of where it connects).
struct Target {
    name: &'static str,
    host: &'static str,
    addr: SocketAddr,
    authority: String,
}

/// A control plane, an app with its sidecar, and a client sidecar with an
/// `--upstream` listener for the app's Service; mTLS permissive.
struct MeshUnderTest {
    mesh: TestMesh,
    _app: tokio::task::JoinHandle<()>,
    server: trellis_proxy::Proxy,
    client: trellis_proxy::Proxy,
}

impl MeshUnderTest {
    async fn start() -> MeshUnderTest {
        let mesh = TestMesh::start().await;
        mesh.apply(
            r#"
apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata: {name: default}
spec: {mtls: permissive}
---
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {name: app}
spec:
  selector: {app: app}
  ports: [{name: http, port: 8080, protocol: http}]
"#,
        )
        .await
        .expect("apply");
        let (app_port, app) = app().await;
        let server = mesh.sidecar("app", &[("app", "app")], app_port).await;
        let client = mesh
            .sidecar_with_upstream("client", app_port, "app", 8080)
            .await;
        // h2spec sends the outbound listener `localhost:<its port>`; a
        // one-label host is a Service of the proxy's namespace, so this
        // Service routes those requests through the mesh to the app
        // (rather than out of the proxy and back to itself).
        mesh.apply(&format!(
            r#"
apiVersion: trellis.dev/v1alpha1
kind: Service
metadata: {{name: localhost}}
spec:
  selector: {{app: app}}
  ports: [{{name: http, port: {}, protocol: http}}]
"#,
            client.outbound_addr.port()
        ))
        .await
        .expect("apply");
        let this = MeshUnderTest {
            mesh,
            _app: app,
            server,
            client,
        };
        for target in this.targets() {
            eventually(
                &format!("the app answers h2c through the {} listener", target.name),
                Duration::from_secs(20),
                || h2c_get(target.addr, &target.authority),
            )
            .await;
        }
        this
    }

    fn dir(&self) -> &Path {
        self.mesh.dir.path()
    }

    fn targets(&self) -> Vec<Target> {
        let upstream = self.client.upstream_addrs[0];
        let outbound = self.client.outbound_addr;
        let inbound = self.server.inbound_addr;
        vec![
            Target {
                name: "upstream",
                host: "127.0.0.1",
                addr: upstream,
                authority: upstream.to_string(),
            },
            Target {
                name: "outbound",
                host: "localhost",
                addr: outbound,
                authority: format!("localhost:{}", outbound.port()),
            },
            Target {
                name: "inbound",
                host: "127.0.0.1",
                addr: inbound,
                authority: inbound.to_string(),
            },
        ]
    }
}

/// The app: HTTP/1.1 and h2c; reads each request whole (up to 1 MiB), so
/// a malformed body is met by the proxy's checks before any answer, then
/// answers 200 with 512 bytes (none to HEAD).
async fn app() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(answer);
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    (port, task)
}

type AppBody = http_body_util::combinators::BoxBody<Bytes, std::convert::Infallible>;

async fn answer(req: Request<Incoming>) -> Result<Response<AppBody>, std::convert::Infallible> {
    let head = req.method() == Method::HEAD;
    let status = match Limited::new(req.into_body(), 1 << 20).collect().await {
        Ok(_) => StatusCode::OK,
        Err(_) => StatusCode::BAD_REQUEST,
    };
    let body = if head {
        Empty::new().boxed()
    } else {
        Full::new(Bytes::from(vec![b'x'; 512])).boxed()
    };
    Ok(Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(body)
        .expect("a valid response"))
}

/// One GET over h2c with prior knowledge; Ok when the answer is 200.
async fn h2c_get(addr: SocketAddr, authority: &str) -> Result<(), String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://{authority}/"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(Duration::from_secs(5), sender.send_request(req))
        .await
        .map_err(|_| "no answer within 5 s".to_string())?
        .map_err(|e| e.to_string())?;
    match resp.status() {
        StatusCode::OK => Ok(()),
        other => Err(format!("status {other}")),
    }
}

/// Runs h2spec (every case, `--strict` included) against one listener,
/// writing a JUnit report; returns what it printed. Its exit status only
/// says whether some case failed: the report says which.
async fn run_h2spec(h2spec: &Path, target: &Target, junit: &Path) -> String {
    let run = tokio::process::Command::new(h2spec)
        .args(["--strict", "-h", target.host, "-p"])
        .arg(target.addr.port().to_string())
        // Seconds h2spec waits for each expected frame: generous, since
        // debug builds on a shared CI machine answer slowly.
        .args(["-o", "5", "-j"])
        .arg(junit)
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run)
        .await
        .unwrap_or_else(|_| panic!("h2spec ran over 10 minutes against {}", target.name))
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", h2spec.display()));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One case of an h2spec JUnit report.
#[derive(Debug)]
struct Case {
    /// e.g. `http2/3.5`
    section: String,
    /// h2spec's description, e.g. `Sends invalid connection preface`
    name: String,
    /// h2spec's expected and actual frames, for a failed case
    failure: Option<String>,
    skipped: bool,
}

fn not_applicable(case: &Case) -> Option<&'static str> {
    NOT_APPLICABLE
        .iter()
        .find(|(section, name, _)| case.section == *section && case.name == *name)
        .map(|(_, _, why)| *why)
}

/// The cases of h2spec's JUnit report. Its shape is fixed and flat
/// (`<testcase package=".." classname="..">` with an optional `<error>`,
/// `<failure>` or `<skipped>` inside), so a scan does; no XML crate needed.
fn junit_cases(xml: &str) -> Vec<Case> {
    let mut cases = Vec::new();
    let mut rest = xml;
    while let Some(start) = rest.find("<testcase ") {
        rest = &rest[start..];
        let tag_end = rest.find('>').unwrap_or(rest.len());
        let tag = &rest[..tag_end];
        let (body, next) = if tag.ends_with('/') {
            ("", &rest[tag_end..])
        } else {
            let close = rest.find("</testcase>").unwrap_or(rest.len());
            (&rest[tag_end.min(close)..close], &rest[close..])
        };
        let failure = ["error", "failure"].iter().find_map(|kind| {
            let open = body.find(&format!("<{kind}"))?;
            let text_start = open + body[open..].find('>')? + 1;
            let text_end = body.find(&format!("</{kind}>")).unwrap_or(body.len());
            Some(unescape(body.get(text_start..text_end).unwrap_or_default()))
        });
        cases.push(Case {
            section: unescape(attr(tag, "package").unwrap_or_default()),
            name: unescape(attr(tag, "classname").unwrap_or_default()),
            failure,
            skipped: body.contains("<skipped"),
        });
        rest = next.get(1..).unwrap_or_default();
    }
    cases
}

fn attr<'a>(tag: &'a str, name: &str) -> Option<&'a str> {
    let key = format!(" {name}=\"");
    let start = tag.find(&key)? + key.len();
    let len = tag[start..].find('"')?;
    Some(&tag[start..start + len])
}

/// Undoes the escapes Go's encoding/xml writes.
fn unescape(s: &str) -> String {
    s.replace("&#34;", "\"")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&apos;", "'")
        .replace("&#x9;", "\t")
        .replace("&#xA;", "\n")
        .replace("&#xD;", "\r")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The h2spec binary, or None (after saying why) where there is none and
/// this is not CI.
fn h2spec() -> Option<PathBuf> {
    let found = std::env::var_os("TRELLIS_H2SPEC")
        .map(PathBuf::from)
        .or_else(cached_h2spec);
    if let Some(path) = &found {
        assert!(
            path.is_file(),
            "TRELLIS_H2SPEC={} is not a file: build it with scripts/test-peers h2spec",
            path.display()
        );
        return found;
    }
    if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false") {
        panic!("h2spec is not built, and CI must run this test: scripts/test builds it (scripts/test-peers h2spec)");
    }
    eprintln!(
        "SKIPPED: no h2spec (run scripts/test-peers h2spec, or set TRELLIS_H2SPEC=PATH; CI always runs this test)"
    );
    None
}

/// The newest h2spec that scripts/test-peers cached.
fn cached_h2spec() -> Option<PathBuf> {
    let cache = std::env::var_os("TRELLIS_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/trellis"))
        .join("peers");
    std::fs::read_dir(cache)
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("h2spec-"))
        .map(|e| e.path().join("h2spec"))
        .filter(|p| p.is_file())
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

#[test]
fn the_junit_scan_reads_passes_failures_and_escapes() {
    let xml = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites>
  <testsuite name="3.5. HTTP/2 Connection Preface" package="http2/3.5" id="3.5" tests="2">
    <testcase package="http2/3.5" classname="Sends client connection preface" time="0.0002"></testcase>
    <testcase package="http2/3.5" classname="Sends invalid connection preface" time="0.0008">
      <error>Connection closed&#xA;Error: unexpected EOF</error>
    </testcase>
    <testcase package="generic/4" classname="Sends a HEADERS frame with &#34;content-length&#34;" time="1"><skipped/></testcase>
  </testsuite>
</testsuites>"#;
    let cases = junit_cases(xml);
    assert_eq!(cases.len(), 3, "{cases:?}");
    assert_eq!(cases[0].section, "http2/3.5");
    assert!(cases[0].failure.is_none() && !cases[0].skipped);
    assert_eq!(
        cases[1].failure.as_deref(),
        Some("Connection closed\nError: unexpected EOF")
    );
    assert!(not_applicable(&cases[1]).is_some());
    assert!(not_applicable(&cases[0]).is_none());
    assert_eq!(
        cases[2].name,
        "Sends a HEADERS frame with \"content-length\""
    );
    assert!(cases[2].skipped && cases[2].failure.is_none());
}
