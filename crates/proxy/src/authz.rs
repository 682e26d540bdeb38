//! AuthorizationPolicy evaluation in the inbound proxy, against the peer's
//! verified identity and the normalised request.
//!
//! DENY policies are evaluated first: any match refuses. Then, if any ALLOW
//! policy applies to this workload, the request must match one of them.
//! Otherwise `Mesh.defaultPolicy` decides.

use http::HeaderMap;
use trellis_identity::SpiffeId;
use trellis_resource::{AuthzAction, AuthzRule, DefaultPolicy, Resource, Spec};

/// What a request (or a TCP connection, which has no method, path or
/// headers) looks like to a policy.
pub struct Attrs<'a> {
    pub peer: Option<&'a SpiffeId>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub port: u16,
    pub headers: Option<&'a HeaderMap>,
}

/// Why the AuthorizationPolicies of a config cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("authorization policy: {0}")]
    Json(serde_json::Error),
    #[error("{0} is not an AuthorizationPolicy")]
    NotAPolicy(String),
}

#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused, and why (the policy that refused, or the default).
    Deny(String),
}

#[derive(Debug, Default)]
pub struct Authorizer {
    deny: Vec<(String, Vec<AuthzRule>)>,
    allow: Vec<(String, Vec<AuthzRule>)>,
    default_deny: bool,
}

/// `*`, `prefix*`, `*suffix` or exact.
fn pattern(p: &str, v: &str) -> bool {
    if p == "*" {
        return true;
    }
    if let Some(prefix) = p.strip_suffix('*') {
        return v.starts_with(prefix);
    }
    if let Some(suffix) = p.strip_prefix('*') {
        return v.ends_with(suffix);
    }
    p == v
}

fn rule_matches(rule: &AuthzRule, a: &Attrs<'_>) -> bool {
    let from_ok = rule.from.is_empty()
        || rule.from.iter().any(|src| {
            let Some(peer) = a.peer else { return false };
            let id = peer.to_string();
            (src.principals.is_empty() || src.principals.iter().any(|p| pattern(p, &id)))
                && (src.namespaces.is_empty()
                    || src.namespaces.iter().any(|n| pattern(n, &peer.namespace)))
        });
    let to_ok = rule.to.is_empty()
        || rule.to.iter().any(|op| {
            (op.methods.is_empty() || a.method.is_some_and(|m| op.methods.iter().any(|x| x == m)))
                && (op.paths.is_empty()
                    || a.path
                        .is_some_and(|p| op.paths.iter().any(|x| pattern(x, p))))
                && (op.ports.is_empty() || op.ports.contains(&a.port))
        });
    let when_ok = rule.when.iter().all(|c| {
        a.headers.is_some_and(|h| {
            h.get_all(c.header.as_str())
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| c.values.iter().any(|p| pattern(p, v)))
        })
    });
    from_ok && to_ok && when_ok
}

impl Authorizer {
    /// From the policies the control plane selected for this workload.
    pub fn build(
        policies_json: &[String],
        default: DefaultPolicy,
    ) -> Result<Authorizer, AuthzError> {
        let mut a = Authorizer {
            default_deny: default == DefaultPolicy::Deny,
            ..Default::default()
        };
        for json in policies_json {
            let r: Resource = serde_json::from_str(json).map_err(AuthzError::Json)?;
            let name = format!("{}/{}", r.metadata.namespace, r.metadata.name);
            let Spec::AuthorizationPolicy(spec) = r.spec else {
                return Err(AuthzError::NotAPolicy(name));
            };
            match spec.action {
                AuthzAction::Deny => a.deny.push((name, spec.rules)),
                AuthzAction::Allow => a.allow.push((name, spec.rules)),
            }
        }
        Ok(a)
    }

    pub fn evaluate(&self, a: &Attrs<'_>) -> Decision {
        for (name, rules) in &self.deny {
            if rules.iter().any(|r| rule_matches(r, a)) {
                return Decision::Deny(format!("DENY policy {name}"));
            }
        }
        if !self.allow.is_empty() {
            return if self
                .allow
                .iter()
                .any(|(_, rules)| rules.iter().any(|r| rule_matches(r, a)))
            {
                Decision::Allow
            } else {
                Decision::Deny("no ALLOW policy matches".into())
            };
        }
        if self.default_deny {
            Decision::Deny("Mesh.defaultPolicy is deny".into())
        } else {
            Decision::Allow
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(yaml: &str) -> Vec<String> {
        trellis_resource::parse_documents("p.yaml", yaml)
            .unwrap()
            .iter()
            .map(|r| serde_json::to_string(r).unwrap())
            .collect()
    }

    const POLICIES: &str = r#"
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: prod-only, namespace: prod}
spec:
  action: ALLOW
  rules: [{from: [{namespaces: [prod]}]}]
---
apiVersion: trellis.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: prod}
spec:
  action: DENY
  rules: [{to: [{paths: ["/admin*"]}]}]
"#;

    fn attrs<'a>(peer: Option<&'a SpiffeId>, path: &'a str) -> Attrs<'a> {
        Attrs {
            peer,
            method: Some("GET"),
            path: Some(path),
            port: 8080,
            headers: None,
        }
    }

    #[test]
    fn deny_first_then_allow_then_default() {
        let a = Authorizer::build(&policies(POLICIES), DefaultPolicy::Deny).unwrap();
        let prod = SpiffeId::new("trellis.local", "prod", "web");
        let dev = SpiffeId::new("trellis.local", "dev", "web");
        assert_eq!(a.evaluate(&attrs(Some(&prod), "/items")), Decision::Allow);
        assert!(matches!(
            a.evaluate(&attrs(Some(&dev), "/items")),
            Decision::Deny(_)
        ));
        assert!(
            matches!(a.evaluate(&attrs(Some(&prod), "/admin/users")), Decision::Deny(r) if r.contains("no-admin"))
        );
        assert!(
            matches!(a.evaluate(&attrs(None, "/items")), Decision::Deny(_)),
            "no identity, no namespace match"
        );

        let open = Authorizer::build(&[], DefaultPolicy::Allow).unwrap();
        assert_eq!(open.evaluate(&attrs(None, "/x")), Decision::Allow);
        let closed = Authorizer::build(&[], DefaultPolicy::Deny).unwrap();
        assert!(matches!(
            closed.evaluate(&attrs(Some(&prod), "/x")),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn patterns() {
        assert!(pattern("*", "anything"));
        assert!(pattern("/admin*", "/admin/x"));
        assert!(pattern("*.json", "/a/b.json"));
        assert!(!pattern("/admin", "/admin/"));
    }
}
