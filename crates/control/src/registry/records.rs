//! Every proxy of the mesh as an endpoint (`EndpointRecord`), by instance,
//! with an index by namespace and label: one Service's endpoints are found
//! among the records that carry one of its selector's labels, not by
//! looking at every record of the mesh (10,000 of them at the scale
//! benchmark's size, for each Service of each Config a change recomputes).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use super::EndpointRecord;

/// Instances by label value, by label key, by namespace.
type LabelIndex = HashMap<String, HashMap<String, HashMap<String, BTreeSet<String>>>>;

/// The endpoint records, by instance. Records are shared (`Arc`) with the
/// snapshot the HTTP API reads, so publishing one costs no copy.
#[derive(Clone, Debug, Default)]
pub struct EndpointRecords {
    by_instance: BTreeMap<String, Arc<EndpointRecord>>,
    by_label: LabelIndex,
    /// Every record in instance order, as last handed out by `shared`;
    /// `None` once a record changed since.
    shared: Option<Arc<Vec<Arc<EndpointRecord>>>>,
}

impl EndpointRecords {
    pub fn len(&self) -> usize {
        self.by_instance.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_instance.is_empty()
    }

    pub fn get(&self, instance: &str) -> Option<&EndpointRecord> {
        self.by_instance.get(instance).map(|r| &**r)
    }

    /// Every record, in instance order.
    pub fn values(&self) -> impl Iterator<Item = &EndpointRecord> {
        self.by_instance.values().map(|r| &**r)
    }

    /// Every instance, in order.
    pub fn instances(&self) -> impl Iterator<Item = &str> {
        self.by_instance.keys().map(String::as_str)
    }

    /// Adds or replaces the record of `record.instance`; the one replaced.
    pub fn insert(&mut self, record: EndpointRecord) -> Option<Arc<EndpointRecord>> {
        let old = self.remove(&record.instance);
        let ns = self.by_label.entry(record.namespace.clone()).or_default();
        for (k, v) in &record.labels {
            ns.entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .insert(record.instance.clone());
        }
        self.by_instance
            .insert(record.instance.clone(), Arc::new(record));
        self.shared = None;
        old
    }

    /// Removes the record of `instance`; the one removed.
    pub fn remove(&mut self, instance: &str) -> Option<Arc<EndpointRecord>> {
        let old = self.by_instance.remove(instance)?;
        if let Some(ns) = self.by_label.get_mut(&old.namespace) {
            for (k, v) in &old.labels {
                let Some(values) = ns.get_mut(k) else {
                    continue;
                };
                if let Some(instances) = values.get_mut(v) {
                    instances.remove(instance);
                    if instances.is_empty() {
                        values.remove(v);
                    }
                }
                if values.is_empty() {
                    ns.remove(k);
                }
            }
            if ns.is_empty() {
                self.by_label.remove(&old.namespace);
            }
        }
        self.shared = None;
        Some(old)
    }

    /// The records that a Service of `namespace` with `selector` selects
    /// (see `EndpointRecord::selected_by`), in instance order: the
    /// candidates are the records with the selector's rarest label.
    pub fn selected<'a>(
        &'a self,
        namespace: &'a str,
        selector: &'a BTreeMap<String, String>,
    ) -> impl Iterator<Item = &'a EndpointRecord> + 'a {
        let by_key = self.by_label.get(namespace);
        // An empty selector selects nothing; a label no record carries
        // leaves no candidate.
        let candidates = match by_key {
            Some(by_key) if !selector.is_empty() => selector
                .iter()
                .map(|(k, v)| by_key.get(k).and_then(|values| values.get(v)))
                .try_fold(None::<&BTreeSet<String>>, |best, set| {
                    let set = set?;
                    Some(Some(match best {
                        Some(b) if b.len() <= set.len() => b,
                        _ => set,
                    }))
                })
                .flatten(),
            _ => None,
        };
        candidates
            .into_iter()
            .flatten()
            .filter_map(|instance| self.by_instance.get(instance))
            .map(|r| &**r)
            .filter(move |r| r.selected_by(namespace, selector))
    }

    /// Every record in instance order, shared until a record changes.
    pub fn shared(&mut self) -> Arc<Vec<Arc<EndpointRecord>>> {
        self.shared
            .get_or_insert_with(|| Arc::new(self.by_instance.values().cloned().collect()))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn record(instance: &str, ns: &str, labels: &[(&str, &str)]) -> EndpointRecord {
        EndpointRecord {
            instance: instance.into(),
            namespace: ns.into(),
            inbound_addr: format!("{instance}:15006"),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn selector(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn names<'a>(it: impl Iterator<Item = &'a EndpointRecord>) -> Vec<&'a str> {
        it.map(|r| r.instance.as_str()).collect()
    }

    #[test]
    fn selection_follows_inserts_replacements_and_removals() {
        let mut recs = EndpointRecords::default();
        recs.insert(record("a", "shop", &[("app", "web"), ("v", "1")]));
        recs.insert(record("b", "shop", &[("app", "web"), ("v", "2")]));
        recs.insert(record("c", "other", &[("app", "web")]));
        let web = selector(&[("app", "web")]);
        assert_eq!(names(recs.selected("shop", &web)), ["a", "b"]);
        assert_eq!(
            names(recs.selected("shop", &selector(&[("app", "web"), ("v", "2")]))),
            ["b"]
        );
        assert_eq!(names(recs.selected("other", &web)), ["c"]);
        // An empty selector, a label nobody has, a namespace nobody is in.
        assert!(recs.selected("shop", &selector(&[])).next().is_none());
        assert!(recs
            .selected("shop", &selector(&[("app", "web"), ("zone", "x")]))
            .next()
            .is_none());
        assert!(recs.selected("none", &web).next().is_none());

        // A replacement moves the record out of its old labels' sets.
        let old = recs.insert(record("a", "shop", &[("app", "api")]));
        assert_eq!(old.unwrap().labels["app"], "web");
        assert_eq!(names(recs.selected("shop", &web)), ["b"]);
        assert_eq!(
            names(recs.selected("shop", &selector(&[("app", "api")]))),
            ["a"]
        );
        assert!(recs.remove("b").is_some());
        assert!(recs.remove("b").is_none());
        assert!(recs.selected("shop", &web).next().is_none());
        assert_eq!(recs.len(), 2);
    }

    #[test]
    fn a_record_without_an_inbound_address_is_never_selected() {
        let mut recs = EndpointRecords::default();
        let mut r = record("a", "shop", &[("app", "web")]);
        r.inbound_addr.clear();
        recs.insert(r);
        assert!(recs
            .selected("shop", &selector(&[("app", "web")]))
            .next()
            .is_none());
    }

    #[test]
    fn the_shared_list_is_kept_until_a_record_changes() {
        let mut recs = EndpointRecords::default();
        recs.insert(record("b", "shop", &[("app", "web")]));
        recs.insert(record("a", "shop", &[("app", "web")]));
        let first = recs.shared();
        assert!(Arc::ptr_eq(&first, &recs.shared()));
        assert_eq!(names(first.iter().map(|r| &**r)), ["a", "b"]);
        recs.remove("a");
        let second = recs.shared();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(names(second.iter().map(|r| &**r)), ["b"]);
    }

    proptest! {
        /// The index selects exactly what a look at every record would.
        #[test]
        fn the_index_selects_what_a_full_scan_does(
            ops in proptest::collection::vec(
                (0..12usize, 0..2usize, proptest::option::of((0..3usize, 0..3usize)), any::<bool>()),
                1..60,
            ),
            sel in proptest::collection::btree_map(0..3usize, 0..3usize, 0..3),
            sel_ns in 0..2usize,
        ) {
            let mut recs = EndpointRecords::default();
            for (i, ns, extra, remove) in ops {
                let instance = format!("i{i}");
                if remove {
                    recs.remove(&instance);
                    continue;
                }
                let mut labels = vec![(format!("k{}", i % 3), format!("v{}", i % 2))];
                if let Some((k, v)) = extra {
                    labels.push((format!("k{k}"), format!("v{v}")));
                }
                recs.insert(EndpointRecord {
                    instance,
                    namespace: format!("ns{ns}"),
                    inbound_addr: "x:1".into(),
                    labels: labels.into_iter().collect(),
                    ..Default::default()
                });
            }
            let selector: BTreeMap<String, String> =
                sel.iter().map(|(k, v)| (format!("k{k}"), format!("v{v}"))).collect();
            let ns = format!("ns{sel_ns}");
            let indexed = names(recs.selected(&ns, &selector));
            let scanned = names(recs.values().filter(|r| r.selected_by(&ns, &selector)));
            prop_assert_eq!(indexed, scanned);
        }
    }
}
