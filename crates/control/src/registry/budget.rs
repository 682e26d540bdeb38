//! The size budget of a proxy's Config (`trellis_api::CONFIG_BUDGET_BYTES`):
//! building a proxy's whole Config, and telling which resource of it is
//! the largest, so that an apply refused for the budget, and a Config
//! withheld for it, name what to shrink.

use std::collections::{BTreeSet, HashSet};

use prost::Message;
use trellis_api::v1::Config;
use trellis_api::CONFIG_BUDGET_BYTES;
use trellis_resource::ResourceKey;

use super::{EndpointCache, Proxy, Registry, SelectionMemo, ServiceName};

/// One thing a Config carries, for naming the largest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    /// The resource, when the part is one (endpoints are not).
    pub key: Option<ResourceKey>,
    /// What to call it: `Service default/catalog`, `the endpoints of ...`.
    pub what: String,
    pub bytes: usize,
}

/// A Config that would be, or is, over the budget.
#[derive(Clone, Debug)]
pub struct Breach {
    pub instance: String,
    pub namespace: String,
    pub workload: String,
    pub bytes: usize,
    /// The largest part to blame (see [`Registry::blame`]).
    pub part: Part,
}

impl Breach {
    pub fn reason(&self) -> String {
        format!(
            "its Config would be {} bytes, over the budget of {CONFIG_BUDGET_BYTES} bytes (2 MiB) \
             for one proxy's Config; the largest part of it is {} ({} bytes as sent): make that \
             smaller, or split it",
            self.bytes, self.part.what, self.part.bytes
        )
    }
}

impl Registry {
    /// A proxy's whole Config, as the xds actor sends it (version 0), and
    /// the Services whose endpoints it holds.
    pub fn full_config(
        &self,
        p: &Proxy,
        cache: &mut EndpointCache,
        memo: &mut SelectionMemo,
    ) -> (Config, BTreeSet<ServiceName>) {
        let (mut config, deps) = self.config_for(&p.subscriptions, cache);
        let own = self.services_selecting_memo(p, memo);
        self.add_own_config(p, own, &mut config);
        (config, deps)
    }

    /// What a Config is made of, by resource, with the bytes each takes.
    pub fn parts(&self, config: &Config) -> Vec<Part> {
        let resource = |r: &trellis_resource::Resource, bytes: usize| Part {
            key: Some(r.key()),
            what: r.key().to_string(),
            bytes,
        };
        let mut parts = Vec::new();
        for sc in &config.services {
            let name = ServiceName::new(&sc.namespace, &sc.name);
            if let Some(svc) = self.resources.services.get(&name) {
                parts.push(resource(svc, sc.service_json.len()));
            }
            let routes = |by_parent: &std::collections::BTreeMap<ServiceName, Vec<_>>| {
                by_parent.get(&name).cloned().unwrap_or_default()
            };
            for (r, json) in routes(&self.resources.routes_by_parent)
                .iter()
                .zip(&sc.routes_json)
                .chain(
                    routes(&self.resources.grpc_routes_by_parent)
                        .iter()
                        .zip(&sc.grpc_routes_json),
                )
            {
                parts.push(resource(r, json.len()));
            }
            if let Some(tp) = self.resources.policy_by_target.get(&name) {
                parts.push(resource(tp, sc.traffic_policy_json.len()));
            }
            let endpoints: usize = sc.endpoints.iter().map(Message::encoded_len).sum();
            parts.push(Part {
                key: None,
                what: format!("the {} endpoints of Service {name}", sc.endpoints.len()),
                bytes: endpoints,
            });
        }
        let sent: HashSet<&str> = config
            .authorization_policies_json
            .iter()
            .map(String::as_str)
            .collect();
        for ap in &self.resources.authorization_policies {
            let json = self.resources.json(ap);
            if sent.contains(json.as_str()) {
                parts.push(resource(ap, json.len()));
            }
        }
        parts
    }

    /// The part to blame for an oversized Config: the largest of those
    /// `preferred` names (what an apply changes), else the largest of all.
    pub fn blame(&self, config: &Config, preferred: &BTreeSet<ResourceKey>) -> Part {
        let parts = self.parts(config);
        let largest = |it: &mut dyn Iterator<Item = &Part>| it.max_by_key(|p| p.bytes).cloned();
        largest(
            &mut parts
                .iter()
                .filter(|p| p.key.as_ref().is_some_and(|k| preferred.contains(k))),
        )
        .or_else(|| largest(&mut parts.iter()))
        .unwrap_or(Part {
            key: None,
            what: "the Mesh and trust bundle".into(),
            bytes: config.encoded_len(),
        })
    }
}
