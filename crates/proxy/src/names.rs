//! The names an app uses for a service (`NAME`, `NAME.NS`, `NAME.NS.svc`,
//! `NAME.NS.svc.<trustDomain>`), and what each form means: a mesh service,
//! maybe one, or a host outside the mesh. The outbound proxy and the DNS
//! server both read names this way, so an app gets the same service
//! whichever way it calls.

use crate::snapshot::SvcKey;

/// A name an app used, mapped to a mesh service.
#[derive(Debug, PartialEq)]
pub enum Name {
    /// `NAME`, `NAME.NS.svc[.<trustDomain>]`: a mesh name, or an error.
    Mesh(SvcKey),
    /// `NAME.NS`: a mesh service if one exists, else a host outside.
    Maybe(SvcKey),
    /// An IP address or a name that cannot be a mesh service.
    External,
}

/// Classifies the host an app used; `namespace` is the caller's own.
pub fn classify(host: &str, namespace: &str, trust_domain: &str) -> Name {
    if host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[') {
        return Name::External;
    }
    let host = host.trim_end_matches('.');
    // Label by label, without collecting them: this runs for every request.
    let Some((name, rest)) = host.split_once('.') else {
        return Name::Mesh(SvcKey::new(namespace, host));
    };
    let Some((ns, rest)) = rest.split_once('.') else {
        return Name::Maybe(SvcKey::new(rest, name));
    };
    let (svc, domain) = rest.split_once('.').unwrap_or((rest, ""));
    match (svc, domain) {
        ("svc", "") => Name::Mesh(SvcKey::new(ns, name)),
        ("svc", d) if d == trust_domain => Name::Mesh(SvcKey::new(ns, name)),
        // Kubernetes' cluster domain: a Service of the cluster, which the
        // mesh may not know (then the cluster's DNS answers).
        ("svc", "cluster.local") => Name::Maybe(SvcKey::new(ns, name)),
        _ => Name::External,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_services() {
        let td = "trellis.local";
        assert_eq!(
            classify("catalog", "shop", td),
            Name::Mesh(SvcKey::new("shop", "catalog"))
        );
        assert_eq!(
            classify("catalog.prod", "shop", td),
            Name::Maybe(SvcKey::new("prod", "catalog"))
        );
        assert_eq!(
            classify("catalog.prod.svc", "shop", td),
            Name::Mesh(SvcKey::new("prod", "catalog"))
        );
        assert_eq!(
            classify("catalog.prod.svc.trellis.local", "shop", td),
            Name::Mesh(SvcKey::new("prod", "catalog"))
        );
        assert_eq!(
            classify("catalog.prod.svc.other.domain", "shop", td),
            Name::External
        );
        assert_eq!(
            classify("catalog.prod.svc.cluster.local", "shop", td),
            Name::Maybe(SvcKey::new("prod", "catalog"))
        );
        assert_eq!(classify("127.0.0.1", "shop", td), Name::External);
        assert_eq!(classify("www.example.com", "shop", td), Name::External);
        assert_eq!(
            classify("catalog.prod.svc.trellis.local.x", "shop", td),
            Name::External
        );
        assert_eq!(classify("catalog.prod.svcx", "shop", td), Name::External);
        assert_eq!(
            classify("catalog.", "shop", td),
            Name::Mesh(SvcKey::new("shop", "catalog"))
        );
        assert_eq!(
            classify("catalog.prod.svc.cluster.local", "shop", "cluster.local"),
            Name::Mesh(SvcKey::new("prod", "catalog"))
        );
    }
}
