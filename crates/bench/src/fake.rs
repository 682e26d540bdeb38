//! Simulated proxies: each is one `ProxyApi/Stream` that registers, acks
//! every Config it gets and notes when a Config carries the change being
//! measured. Many streams share one HTTP/2 connection (TLS, verified
//! against the root the join token pins, as a real proxy does).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::anyhow;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use trellis_api::v1::proxy_api_client::ProxyApiClient;
use trellis_api::v1::{control_message, proxy_message, Ack, Config, ProxyMessage, Register};
use trellis_identity::token::Claims;
use trellis_identity::verify::ControlPlaneVerifier;

/// What a simulated proxy stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// An endpoint of a Service: registers with its labels, follows nothing.
    Endpoint,
    /// A client: follows some Services.
    Client,
}

/// A Config that carried the change being measured, as its proxy acked it.
#[derive(Clone, Debug)]
pub struct Hit {
    pub mark: u64,
    pub role: Role,
    pub at: Instant,
    pub bytes: usize,
}

/// What the simulated proxies share with the benchmark.
#[derive(Default)]
pub struct Shared {
    /// The change being measured: its id and a string only Configs that
    /// carry it contain.
    needle: RwLock<Option<(u64, Arc<str>)>>,
    hits: Mutex<Vec<Hit>>,
    /// Proxies that got their first Config.
    pub ready: AtomicUsize,
    /// Streams that failed or ended.
    pub failed: AtomicUsize,
    pub configs: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
}

impl Shared {
    pub fn set_needle(&self, mark: u64, needle: String) {
        *self.needle.write().unwrap() = Some((mark, needle.into()));
    }

    pub fn clear_needle(&self) {
        *self.needle.write().unwrap() = None;
    }

    /// Hits of `mark` so far, by role.
    pub fn count(&self, mark: u64) -> (usize, usize) {
        let hits = self.hits.lock().unwrap();
        let mut out = (0, 0);
        for h in hits.iter().filter(|h| h.mark == mark) {
            match h.role {
                Role::Endpoint => out.0 += 1,
                Role::Client => out.1 += 1,
            }
        }
        out
    }

    pub fn take_hits(&self, mark: u64) -> Vec<Hit> {
        let mut hits = self.hits.lock().unwrap();
        let (mine, rest) = hits.drain(..).partition(|h| h.mark == mark);
        *hits = rest;
        mine
    }

    fn fail(&self, e: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(e);
        }
    }
}

fn contains(c: &Config, needle: &str) -> bool {
    c.mesh_json.contains(needle)
        || c.services.iter().any(|s| {
            s.service_json.contains(needle) || s.routes_json.iter().any(|r| r.contains(needle))
        })
}

/// A TLS HTTP/2 connection to the proxy API, verifying the control plane
/// against the root the token pins (as `trellis proxy` does).
pub async fn connect(addr: &str, token: &str) -> anyhow::Result<Channel> {
    let pin = Claims::peek(token)
        .map_err(|e| anyhow!("bad join token: {e}"))?
        .ca;
    let mut config = rustls::ClientConfig::builder_with_provider(trellis_identity::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ControlPlaneVerifier::new(vec![pin])))
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let target = addr.to_string();
    let connect = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let target = target.clone();
        async move {
            let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target))
                .await
                .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect"))??;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(trellis_identity::CONTROL_PLANE_NAME)
                .expect("a valid DNS name");
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .http2_keep_alive_interval(Duration::from_secs(5))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect_with_connector(connect)
        .await?;
    Ok(channel)
}

/// A set of simulated proxies over a few shared connections.
pub struct Fleet {
    addr: String,
    pub shared: Arc<Shared>,
    streams_per_conn: usize,
    /// (channel, streams on it)
    channels: Vec<(Channel, usize)>,
    tasks: JoinSet<()>,
    started: usize,
    /// Bounds the registrations in flight.
    opening: Arc<Semaphore>,
}

impl Fleet {
    pub fn new(addr: String, streams_per_conn: usize, in_flight: usize) -> Fleet {
        Fleet {
            addr,
            shared: Arc::new(Shared::default()),
            streams_per_conn: streams_per_conn.max(1),
            channels: Vec::new(),
            tasks: JoinSet::new(),
            started: 0,
            opening: Arc::new(Semaphore::new(in_flight.max(1))),
        }
    }

    pub fn connections(&self) -> usize {
        self.channels.len()
    }

    pub fn started(&self) -> usize {
        self.started
    }

    /// Starts one simulated proxy (its Register carries the token).
    pub async fn start(&mut self, register: Register, role: Role) -> anyhow::Result<()> {
        let need_new = self
            .channels
            .last()
            .is_none_or(|(_, n)| *n >= self.streams_per_conn);
        if need_new {
            let ch = connect(&self.addr, &register.token).await?;
            self.channels.push((ch, 0));
        }
        let (ch, n) = self.channels.last_mut().expect("a channel");
        *n += 1;
        let channel = ch.clone();
        let permit = self.opening.clone().acquire_owned().await?;
        let shared = self.shared.clone();
        self.started += 1;
        self.tasks.spawn(async move {
            if let Err(e) = run(channel, register, role, shared.clone(), permit).await {
                shared.fail(e);
            }
        });
        Ok(())
    }

    /// Waits until `count` proxies got their first Config.
    pub async fn wait_ready(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let ready = self.shared.ready.load(Ordering::Relaxed);
            if ready >= count {
                return Ok(());
            }
            let failed = self.shared.failed.load(Ordering::Relaxed);
            if failed > 0 {
                let e = self.shared.first_error.lock().unwrap().clone();
                return Err(anyhow!(
                    "{failed} simulated proxies failed; first error: {}",
                    e.unwrap_or_default()
                ));
            }
            if Instant::now() >= deadline {
                return Err(anyhow!(
                    "only {ready} of {count} simulated proxies got a Config within {timeout:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Ends every stream.
    pub async fn shutdown(&mut self) {
        self.tasks.abort_all();
        while self.tasks.join_next().await.is_some() {}
        self.channels.clear();
    }
}

async fn run(
    channel: Channel,
    register: Register,
    role: Role,
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
) -> Result<(), String> {
    let mut permit = Some(permit);
    let instance = register.instance.clone();
    let mut client = ProxyApiClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let msg = |m| ProxyMessage { msg: Some(m) };
    // The server answers only after Register, so it goes first.
    tx.send(msg(proxy_message::Msg::Register(register)))
        .await
        .map_err(|_| "send".to_string())?;
    let mut inbound = tokio::time::timeout(
        Duration::from_secs(120),
        client.stream(ReceiverStream::new(rx)),
    )
    .await
    .map_err(|_| format!("{instance}: no answer to Register within 120s"))?
    .map_err(|s| format!("{instance}: {s}"))?
    .into_inner();
    let mut last_mark = 0;
    loop {
        let m = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(format!("{instance}: the control plane ended the stream")),
            Err(s) => return Err(format!("{instance}: {s}")),
        };
        let Some(control_message::Msg::Config(config)) = m.msg else {
            continue;
        };
        let ack = Ack {
            version: config.version,
            accepted: true,
            error: String::new(),
        };
        if tx.send(msg(proxy_message::Msg::Ack(ack))).await.is_err() {
            return Err(format!("{instance}: the request stream closed"));
        }
        let at = Instant::now();
        shared.configs.fetch_add(1, Ordering::Relaxed);
        if permit.take().is_some() {
            shared.ready.fetch_add(1, Ordering::Relaxed);
        }
        let needle = shared.needle.read().unwrap().clone();
        if let Some((mark, needle)) = needle {
            if mark != last_mark && contains(&config, &needle) {
                last_mark = mark;
                let bytes = prost::Message::encoded_len(&config);
                shared.hits.lock().unwrap().push(Hit {
                    mark,
                    role,
                    at,
                    bytes,
                });
            }
        }
    }
}
