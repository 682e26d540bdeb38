//! Who is connected, and what each proxy should be told.
//!
//! The registry holds the proxies connected to this control plane (what
//! they follow, what they were sent), the endpoint records of every proxy
//! of the mesh (`EndpointRecord`, from the store: each replica publishes
//! those of its own proxies, and every replica sees them all; another
//! source, such as Kubernetes EndpointSlices, can feed the same map), and
//! an index of the stored resources (`index`). `Registry::config_for`
//! (`config`) turns them, with the endpoints of each Service
//! (`endpoints`), into the `Config` of one proxy. It is plain data, owned
//! by the xds actor, so nothing here locks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Instant, SystemTime};

use serde::{Deserialize, Serialize};
use trellis_api::v1::Register;
use trellis_resource::DEFAULT_NAMESPACE;

mod budget;
mod config;
mod endpoints;
mod index;
mod records;

pub use budget::{Breach, Part};
pub use endpoints::{EndpointCache, SelectionMemo};
pub use index::ResourceIndex;
pub use records::EndpointRecords;

/// Identifies one stream; an instance that reconnects gets a new one.
pub type ConnId = u64;

/// A service's `namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceName {
    pub namespace: String,
    pub name: String,
}

impl ServiceName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        ServiceName {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// Parses `namespace/name`; a bare `name` is in the default namespace.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => (ns, name),
            None => (DEFAULT_NAMESPACE, s),
        };
        if ns.is_empty() || name.is_empty() || name.contains('/') {
            return None;
        }
        Some(ServiceName::new(ns, name))
    }
}

impl std::fmt::Display for ServiceName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A proxy as an endpoint of the Services whose selectors match it: what
/// the control plane replica holding its stream publishes in the store, so
/// that every replica's proxies can reach it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointRecord {
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    /// Where peers reach its inbound listener; empty: nowhere.
    pub inbound_addr: String,
    /// Its admin server, for Prometheus discovery.
    #[serde(default)]
    pub admin_addr: String,
    /// The replica holding its stream, and which stream: tells one
    /// registration of an instance from the next.
    #[serde(default)]
    pub replica: String,
    #[serde(default)]
    pub session: u64,
}

impl EndpointRecord {
    /// Whether this is an endpoint of a service with this selector.
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        selects(
            selector,
            namespace,
            &self.namespace,
            &self.labels,
            &self.inbound_addr,
        )
    }

    pub fn identity(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }
}

/// One connected proxy.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub conn: ConnId,
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub inbound_addr: String,
    pub admin_addr: String,
    pub app_port: u32,
    pub connected_at: Instant,
    pub connected_since: SystemTime,
    /// What the proxy follows, as sent by it (`namespace/name`).
    pub subscriptions: BTreeSet<String>,
    /// The version of the config it ran when it registered (from another
    /// replica, its cache, or an earlier stream): every version sent is
    /// greater.
    pub running_version: u64,
    /// The store revision this replica must reach before it sends the
    /// proxy anything: the one its running config was made at.
    pub waiting_for: Option<u64>,
    /// The endpoint record published for it (to withdraw that very one).
    pub published: Vec<u8>,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_error: Option<String>,
    /// Why its newest Config was not sent (over the Config budget); it
    /// keeps running the last one it was sent.
    pub config_withheld: Option<String>,
    /// Hash of the Config withheld, so that one is counted once.
    pub withheld_hash: Option<u64>,
    /// Hash of the content of the last Config sent (version excluded).
    pub sent_hash: Option<u64>,
    /// The encoded size of the last Config computed for it (sent or
    /// withheld): what an apply's budget check compares against.
    pub config_bytes: Option<usize>,
    /// Services whose endpoints the last Config holds: a proxy joining or
    /// leaving one of them changes this proxy's Config.
    pub depends_on: BTreeSet<ServiceName>,
}

impl Proxy {
    pub fn from_register(conn: ConnId, reg: &Register) -> Self {
        // Every field named, so one added to Register is a compile error
        // here rather than something the control plane silently ignores.
        let Register {
            instance,
            workload,
            namespace,
            labels,
            service_account,
            inbound_addr,
            admin_addr,
            app_port,
            subscriptions,
            running_version,
            // Checked by the stream before it registers the proxy.
            token: _,
        } = reg;
        let namespace = if namespace.is_empty() {
            DEFAULT_NAMESPACE
        } else {
            namespace
        };
        // Same default as a Workload's serviceAccount: the app label, else
        // the workload's name.
        let service_account = if !service_account.is_empty() {
            service_account
        } else if let Some(app) = labels.get("app") {
            app
        } else {
            workload
        };
        Proxy {
            conn,
            instance: instance.clone(),
            workload: workload.clone(),
            namespace: namespace.to_string(),
            labels: labels.clone(),
            service_account: service_account.clone(),
            inbound_addr: inbound_addr.clone(),
            admin_addr: admin_addr.clone(),
            app_port: *app_port,
            connected_at: Instant::now(),
            connected_since: SystemTime::now(),
            subscriptions: subscriptions.iter().cloned().collect(),
            running_version: *running_version,
            waiting_for: None,
            published: Vec::new(),
            sent_version: 0,
            acked_version: *running_version,
            last_error: None,
            config_withheld: None,
            withheld_hash: None,
            sent_hash: None,
            config_bytes: None,
            depends_on: BTreeSet::new(),
        }
    }

    pub fn identity(&self, trust_domain: &str) -> String {
        spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether this proxy is an endpoint of a service with this selector.
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        selects(
            selector,
            namespace,
            &self.namespace,
            &self.labels,
            &self.inbound_addr,
        )
    }

    /// What this replica publishes about the proxy (`replica`: its own id).
    pub fn record(&self, replica: &str) -> EndpointRecord {
        EndpointRecord {
            instance: self.instance.clone(),
            workload: self.workload.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            service_account: self.service_account.clone(),
            inbound_addr: self.inbound_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            replica: replica.to_string(),
            session: self.conn,
        }
    }

    pub fn view(&self, trust_domain: &str) -> ProxyView {
        ProxyView {
            instance: self.instance.clone(),
            workload: self.workload.clone(),
            namespace: self.namespace.clone(),
            labels: self.labels.clone(),
            service_account: self.service_account.clone(),
            identity: self.identity(trust_domain),
            inbound_addr: self.inbound_addr.clone(),
            admin_addr: self.admin_addr.clone(),
            connected_at: self.connected_at,
            sent_version: self.sent_version,
            acked_version: self.acked_version,
            last_error: self.last_error.clone(),
            config_withheld: self.config_withheld.clone(),
            subscriptions: self.subscriptions.iter().cloned().collect(),
        }
    }
}

pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

/// A connected proxy as the HTTP API shows it (`GET /api/v1/proxies`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyView {
    pub instance: String,
    pub workload: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub identity: String,
    pub inbound_addr: String,
    pub admin_addr: String,
    #[serde(skip)]
    pub connected_at: Instant,
    pub sent_version: u64,
    pub acked_version: u64,
    pub last_error: Option<String>,
    /// Why the proxy's newest Config was not sent (over the budget).
    pub config_withheld: Option<String>,
    pub subscriptions: Vec<String>,
}

impl ProxyView {
    /// Whether this proxy is an endpoint of a service with this selector.
    pub fn selected_by(&self, namespace: &str, selector: &BTreeMap<String, String>) -> bool {
        selects(
            selector,
            namespace,
            &self.namespace,
            &self.labels,
            &self.inbound_addr,
        )
    }
}

/// Whether a proxy is an endpoint of the service `service_ns`/`selector`:
/// same namespace, every selector label matches, and it has an inbound
/// address that peers can reach. An empty selector selects nothing, as for
/// Kubernetes Services without one: it would otherwise select every proxy.
fn selects(
    selector: &BTreeMap<String, String>,
    service_ns: &str,
    proxy_ns: &str,
    labels: &BTreeMap<String, String>,
    inbound_addr: &str,
) -> bool {
    !selector.is_empty()
        && !inbound_addr.is_empty()
        && proxy_ns == service_ns
        && selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
}

/// Where Services' endpoints come from: the one thing universal mode and
/// Kubernetes do differently (resources are the resource model's in both).
#[derive(Clone, Debug, Default)]
pub enum EndpointSource {
    /// Universal mode: each registered proxy is an endpoint of every
    /// Service of its namespace whose selector its labels match.
    #[default]
    Registrations,
    /// Kubernetes: the endpoints the API server's EndpointSlices and Pods
    /// say (trellis-k8s computes them, ready ones first); a registering
    /// proxy only asks for its config and is no endpoint by itself.
    External(std::sync::Arc<BTreeMap<ServiceName, Vec<trellis_api::v1::Endpoint>>>),
}

/// Connected proxies, endpoint records and stored resources: everything
/// configs are made of.
#[derive(Debug, Default)]
pub struct Registry {
    pub proxies: BTreeMap<ConnId, Proxy>,
    /// Every proxy of the mesh as an endpoint, by instance.
    pub endpoints: EndpointRecords,
    pub resources: ResourceIndex,
    /// The roots every proxy must trust, current first.
    pub trust_bundle: Vec<String>,
    /// Each Service's stable virtual IP (pods mode).
    pub vips: std::sync::Arc<crate::vips::Vips>,
    pub endpoint_source: EndpointSource,
}

impl Registry {
    pub fn trust_domain(&self) -> &str {
        self.resources.trust_domain()
    }
}

#[cfg(test)]
mod tests;
