//! A small client of etcd's v3 gRPC API: the calls the etcd store makes,
//! with failover between the members given.
//!
//! Why not the etcd-client crate: its build script needs a system `protoc`,
//! and this workspace compiles protobuf with protox only (crates/api says
//! why). The generated stubs of `proto/etcd/rpc.proto` do the protocol;
//! what is here is the member list, TLS, deadlines and retries.
//!
//! Every request carries etcd's `hasleader` metadata: a member that has
//! lost its leader (the minority side of a partition, or the last member
//! standing) refuses at once instead of waiting out a timeout, and the
//! request moves on to another member.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status, Streaming};

use super::EtcdConfig;
use crate::store::{Result, StoreError};

pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("etcdserverpb");
}

use pb::kv_client::KvClient;
use pb::lease_client::LeaseClient;
use pb::watch_client::WatchClient;

/// One try at one member.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// A request's whole life, over every member: long enough to ride out a
/// leader election (about a second with etcd's defaults), short enough
/// that a write without a majority fails while its user still waits.
const DEADLINE: Duration = Duration::from_secs(4);
/// Pause between rounds over the members.
const ROUND_PAUSE: Duration = Duration::from_millis(200);

struct Member {
    url: String,
    channel: Channel,
}

pub struct Client {
    members: Vec<Member>,
    /// The member that answered last: where the next request starts.
    current: AtomicUsize,
    /// The endpoints as given, for messages.
    endpoints: String,
}

/// A request to etcd, marked to be refused by a member without a leader.
pub fn req<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("hasleader", MetadataValue::from_static("true"));
    r
}

fn read_file(path: &Path, flag: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| StoreError::Etcd(format!("{flag} {}: {e}", path.display())))
}

/// Whether an error says this member cannot serve now (try another), as
/// opposed to etcd refusing the request itself.
fn member_failed(s: &Status) -> bool {
    !matches!(
        s.code(),
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::ResourceExhausted
            | Code::NotFound
            | Code::AlreadyExists
    )
}

/// A status as one line: tonic's message, plus the transport's cause.
pub fn describe(s: &Status) -> String {
    use std::error::Error as _;
    let mut out = if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    };
    let mut cur = s.source();
    while let Some(e) = cur {
        let m = e.to_string();
        if !out.contains(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        cur = e.source();
    }
    out
}

impl Client {
    pub fn new(cfg: &EtcdConfig) -> Result<Client> {
        if cfg.endpoints.is_empty() {
            return Err(StoreError::Etcd(
                "--etcd-endpoints is empty: give the etcd members' client URLs, e.g. https://10.0.0.5:2379".into(),
            ));
        }
        let tls = match (&cfg.ca, &cfg.cert, &cfg.key) {
            (None, None, None) => None,
            (ca, cert, key) => {
                let mut tls = ClientTlsConfig::new();
                if let Some(ca) = ca {
                    tls = tls.ca_certificate(Certificate::from_pem(read_file(ca, "--etcd-ca")?));
                }
                match (cert, key) {
                    (Some(c), Some(k)) => {
                        tls = tls.identity(Identity::from_pem(
                            read_file(c, "--etcd-cert")?,
                            read_file(k, "--etcd-key")?,
                        ));
                    }
                    (None, None) => {}
                    _ => {
                        return Err(StoreError::Etcd(
                            "--etcd-cert and --etcd-key go together: give both or neither".into(),
                        ))
                    }
                }
                Some(tls)
            }
        };
        let mut members = Vec::new();
        for raw in &cfg.endpoints {
            let url = if raw.contains("://") {
                raw.trim_end_matches('/').to_string()
            } else if tls.is_some() {
                format!("https://{raw}")
            } else {
                format!("http://{raw}")
            };
            let bad =
                |reason: String| StoreError::Etcd(format!("--etcd-endpoints {raw}: {reason}"));
            let mut ep = Endpoint::from_shared(url.clone())
                .map_err(|e| bad(e.to_string()))?
                .connect_timeout(ATTEMPT_TIMEOUT)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(5))
                .keep_alive_timeout(Duration::from_secs(3))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let Some(tls) = &tls else {
                    return Err(bad(
                        "an https URL needs --etcd-ca (and, for client certificates, --etcd-cert and --etcd-key)".into(),
                    ));
                };
                let host = ep
                    .uri()
                    .host()
                    .unwrap_or_default()
                    .trim_matches(['[', ']'])
                    .to_string();
                ep = ep
                    .tls_config(tls.clone().domain_name(host))
                    .map_err(|e| bad(e.to_string()))?;
            }
            members.push(Member {
                url,
                channel: ep.connect_lazy(),
            });
        }
        Ok(Client {
            endpoints: cfg.endpoints.join(","),
            members,
            current: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    pub fn unavailable(&self, reason: impl Into<String>) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints.clone(),
            reason: reason.into(),
        }
    }

    /// Runs a unary request, starting at the member that answered last and
    /// moving on when a member cannot serve, until one answers or the
    /// deadline passes. A write whose answer was lost may be sent twice:
    /// callers make theirs conditional (compare in a txn) or idempotent.
    pub async fn call<T, F, Fut>(&self, what: &str, f: F) -> Result<T>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        let n = self.members.len();
        let mut last = String::from("no member answered");
        loop {
            let start = self.current.load(Ordering::Relaxed);
            for i in 0..n {
                let k = (start + i) % n;
                let m = &self.members[k];
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if left.is_zero() {
                    return Err(self.unavailable(format!("{what}: {last}")));
                }
                match tokio::time::timeout(left.min(ATTEMPT_TIMEOUT), f(m.channel.clone())).await {
                    Ok(Ok(resp)) => {
                        self.current.store(k, Ordering::Relaxed);
                        return Ok(resp.into_inner());
                    }
                    Ok(Err(s)) if !member_failed(&s) => {
                        return Err(StoreError::Etcd(format!("{what}: {}", describe(&s))))
                    }
                    Ok(Err(s)) => last = format!("{}: {}", m.url, describe(&s)),
                    Err(_) => last = format!("{}: no answer within {ATTEMPT_TIMEOUT:?}", m.url),
                }
            }
            tokio::time::sleep(ROUND_PAUSE).await;
        }
    }

    pub async fn range(&self, r: pb::RangeRequest) -> Result<pb::RangeResponse> {
        self.call("read", |ch| {
            let r = r.clone();
            async move { KvClient::new(ch).range(req(r)).await }
        })
        .await
    }

    pub async fn put(&self, r: pb::PutRequest) -> Result<pb::PutResponse> {
        self.call("write", |ch| {
            let r = r.clone();
            async move { KvClient::new(ch).put(req(r)).await }
        })
        .await
    }

    pub async fn delete(&self, r: pb::DeleteRangeRequest) -> Result<pb::DeleteRangeResponse> {
        self.call("delete", |ch| {
            let r = r.clone();
            async move { KvClient::new(ch).delete_range(req(r)).await }
        })
        .await
    }

    pub async fn txn(&self, r: pb::TxnRequest) -> Result<pb::TxnResponse> {
        self.call("transaction", |ch| {
            let r = r.clone();
            async move { KvClient::new(ch).txn(req(r)).await }
        })
        .await
    }

    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64> {
        let r = pb::LeaseGrantRequest {
            ttl: ttl.as_secs() as i64,
            id: 0,
        };
        let resp = self
            .call("lease grant", |ch| async move {
                LeaseClient::new(ch).lease_grant(req(r)).await
            })
            .await?;
        if !resp.error.is_empty() {
            return Err(StoreError::Etcd(format!("lease grant: {}", resp.error)));
        }
        Ok(resp.id)
    }

    /// Opens a bidirectional stream at the first member that takes it.
    async fn open_stream<Req, Resp, F, Fut>(
        &self,
        what: &str,
        first: Option<Req>,
        open: F,
    ) -> Result<(mpsc::Sender<Req>, Streaming<Resp>)>
    where
        Req: Send + 'static,
        F: Fn(Channel, Request<ReceiverStream<Req>>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<Streaming<Resp>>, Status>>,
        Req: Clone,
    {
        let n = self.members.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::from("no member answered");
        for i in 0..n {
            let k = (start + i) % n;
            let m = &self.members[k];
            let (tx, rx) = mpsc::channel(16);
            if let Some(first) = &first {
                let _ = tx.try_send(first.clone());
            }
            let mut r = Request::new(ReceiverStream::new(rx));
            r.metadata_mut()
                .insert("hasleader", MetadataValue::from_static("true"));
            match tokio::time::timeout(ATTEMPT_TIMEOUT, open(m.channel.clone(), r)).await {
                Ok(Ok(resp)) => {
                    self.current.store(k, Ordering::Relaxed);
                    return Ok((tx, resp.into_inner()));
                }
                Ok(Err(s)) => last = format!("{}: {}", m.url, describe(&s)),
                Err(_) => last = format!("{}: no answer within {ATTEMPT_TIMEOUT:?}", m.url),
            }
        }
        Err(self.unavailable(format!("{what}: {last}")))
    }

    /// A watch of `[key, range_end)` from `start_revision`.
    pub async fn watch(
        &self,
        create: pb::WatchCreateRequest,
    ) -> Result<(mpsc::Sender<pb::WatchRequest>, Streaming<pb::WatchResponse>)> {
        let first = pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(create)),
        };
        self.open_stream("watch", Some(first), |ch, r| async move {
            WatchClient::new(ch).watch(r).await
        })
        .await
    }

    /// A keep-alive stream of lease `id`, its first request sent: etcd
    /// answers a stream's headers with its first response, so a stream
    /// opened empty never opens.
    pub async fn keep_alive(
        &self,
        id: i64,
    ) -> Result<(
        mpsc::Sender<pb::LeaseKeepAliveRequest>,
        Streaming<pb::LeaseKeepAliveResponse>,
    )> {
        let first = pb::LeaseKeepAliveRequest { id };
        self.open_stream("lease keep-alive", Some(first), |ch, r| async move {
            LeaseClient::new(ch).lease_keep_alive(r).await
        })
        .await
    }
}

/// The end of the range of every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte 0xff: to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_the_next_key() {
        assert_eq!(prefix_end(b"/trellis/"), b"/trellis0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), b"\0");
    }

    #[tokio::test]
    async fn bad_endpoints_say_what_to_do() {
        let cfg = |endpoints: Vec<&str>| EtcdConfig {
            endpoints: endpoints.into_iter().map(String::from).collect(),
            ..EtcdConfig::default()
        };
        let e = Client::new(&cfg(vec![])).err().unwrap().to_string();
        assert!(e.contains("--etcd-endpoints"), "{e}");
        let e = Client::new(&cfg(vec!["https://10.0.0.5:2379"]))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("--etcd-ca"), "{e}");
        assert!(Client::new(&cfg(vec!["127.0.0.1:2379", "http://127.0.0.1:2380"])).is_ok());
    }
}
