//! `spiffe://<trustDomain>/ns/<namespace>/sa/<serviceAccount>`.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0:?} is not a Trellis SPIFFE ID (spiffe://<trust domain>/ns/<namespace>/sa/<service account>)")]
pub struct ParseError(pub String);

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        let bad = || ParseError(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if !td.is_empty() && !ns.is_empty() && !sa.is_empty() => {
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(bad()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_other_forms() {
        let id: SpiffeId = "spiffe://trellis.local/ns/prod/sa/web".parse().unwrap();
        assert_eq!(id, SpiffeId::new("trellis.local", "prod", "web"));
        assert_eq!(id.to_string(), "spiffe://trellis.local/ns/prod/sa/web");
        for bad in [
            "spiffe://trellis.local/ns/prod/sa/web/x",
            "spiffe://trellis.local/ns//sa/web",
            "https://trellis.local/ns/prod/sa/web",
            "spiffe:///ns/prod/sa/web",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }
}
