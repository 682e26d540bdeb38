//! Endpoint indexing: which Services select each proxy, and each Service's
//! endpoints (from the endpoint records, or from an external source such
//! as Kubernetes), memoised for one round of config updates.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use trellis_api::v1::Endpoint;

use super::{EndpointRecord, EndpointSource, Proxy, Registry, ServiceName};

/// Endpoints per service, computed once per round of config updates.
pub type EndpointCache = HashMap<ServiceName, Vec<Endpoint>>;

/// The Services selecting each (namespace, labels) met in one round of
/// config updates.
#[derive(Debug, Default)]
pub struct SelectionMemo(HashMap<String, HashMap<BTreeMap<String, String>, BTreeSet<ServiceName>>>);

fn endpoint_of(p: &EndpointRecord, trust_domain: &str) -> Endpoint {
    Endpoint {
        address: p.inbound_addr.clone(),
        instance: p.instance.clone(),
        workload: p.workload.clone(),
        namespace: p.namespace.clone(),
        labels: p.labels.clone(),
        identity: p.identity(trust_domain),
    }
}

/// Stable order, so that equal content hashes equal.
fn sort_endpoints(eps: &mut [Endpoint]) {
    eps.sort_by(|a, b| (&a.address, &a.instance).cmp(&(&b.address, &b.instance)));
}

impl Registry {
    /// The services that select a proxy with these namespace and labels.
    pub fn services_selecting(&self, proxy: &Proxy) -> BTreeSet<ServiceName> {
        self.services_where(|ns, sel| proxy.selected_by(ns, sel))
    }

    /// The services that have this record among their endpoints: theirs
    /// change when it comes or goes.
    pub fn services_of(&self, record: &EndpointRecord) -> BTreeSet<ServiceName> {
        self.services_where(|ns, sel| record.selected_by(ns, sel))
    }

    fn services_where(
        &self,
        selected: impl Fn(&str, &BTreeMap<String, String>) -> bool,
    ) -> BTreeSet<ServiceName> {
        self.resources
            .services
            .iter()
            .filter(|(_, r)| {
                r.as_service()
                    .is_some_and(|s| selected(&r.metadata.namespace, &s.selector))
            })
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// `services_selecting`, memoised by the proxy's namespace and labels:
    /// proxies of one workload share them, so a round over every proxy
    /// compares each distinct label set with each selector once.
    pub fn services_selecting_memo(
        &self,
        proxy: &Proxy,
        memo: &mut SelectionMemo,
    ) -> BTreeSet<ServiceName> {
        self.selecting_memo(&proxy.namespace, &proxy.labels, &proxy.inbound_addr, memo)
    }

    fn selecting_memo(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
        inbound_addr: &str,
        memo: &mut SelectionMemo,
    ) -> BTreeSet<ServiceName> {
        if inbound_addr.is_empty() {
            // Nothing selects a proxy that peers cannot reach.
            return BTreeSet::new();
        }
        if let Some(own) = memo
            .0
            .get(namespace)
            .and_then(|by_labels| by_labels.get(labels))
        {
            return own.clone();
        }
        let own =
            self.services_where(|ns, sel| super::selects(sel, ns, namespace, labels, inbound_addr));
        memo.0
            .entry(namespace.to_string())
            .or_default()
            .insert(labels.clone(), own.clone());
        own
    }

    /// Every Service's endpoints, in one pass over the records (rather than
    /// one pass per Service): what a round that recomputes every proxy's
    /// Config starts from.
    pub fn all_endpoints(&self, memo: &mut SelectionMemo) -> EndpointCache {
        if let EndpointSource::External(by_service) = &self.endpoint_source {
            return self
                .resources
                .services
                .keys()
                .map(|n| (n.clone(), by_service.get(n).cloned().unwrap_or_default()))
                .collect();
        }
        let td = self.trust_domain().to_string();
        let mut cache: EndpointCache = self
            .resources
            .services
            .keys()
            .map(|n| (n.clone(), Vec::new()))
            .collect();
        for r in self.endpoints.values() {
            for name in self.selecting_memo(&r.namespace, &r.labels, &r.inbound_addr, memo) {
                if let Some(eps) = cache.get_mut(&name) {
                    eps.push(endpoint_of(r, &td));
                }
            }
        }
        for eps in cache.values_mut() {
            sort_endpoints(eps);
        }
        cache
    }

    /// One Service's endpoints, from the cache or computed into it.
    pub fn endpoints(&self, name: &ServiceName, cache: &mut EndpointCache) -> Vec<Endpoint> {
        if let Some(eps) = cache.get(name) {
            return eps.clone();
        }
        if let EndpointSource::External(by_service) = &self.endpoint_source {
            let eps = match self.resources.services.get(name) {
                Some(_) => by_service.get(name).cloned().unwrap_or_default(),
                None => Vec::new(),
            };
            cache.insert(name.clone(), eps.clone());
            return eps;
        }
        let td = self.trust_domain().to_string();
        let mut eps: Vec<Endpoint> = match self.resources.services.get(name) {
            Some(r) => {
                let selector = r.as_service().map(|s| &s.selector);
                selector
                    .into_iter()
                    .flat_map(|sel| self.endpoints.selected(&name.namespace, sel))
                    .map(|p| endpoint_of(p, &td))
                    .collect()
            }
            None => Vec::new(),
        };
        sort_endpoints(&mut eps);
        cache.insert(name.clone(), eps.clone());
        eps
    }
}
