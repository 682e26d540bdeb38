//! The size limits on what an apply may hold, and the checks of names,
//! labels and annotations, as Kubernetes has them, so that one oversized
//! input cannot tie up the control plane or the proxies, and the same
//! resource is accepted or refused alike by the CLI, the control plane and
//! (through this crate) the Kubernetes controller.

use std::collections::BTreeMap;

/// The most bytes one apply (a request body, or the files `trellis apply`
/// reads) may hold. A large mesh's resources are a few MiB.
pub const MAX_INPUT_BYTES: usize = 16 << 20;
/// The most YAML documents in one apply.
pub const MAX_DOCUMENTS: usize = 10_000;
/// The most resources in one apply (a JSON array is one document).
pub const MAX_RESOURCES: usize = 10_000;
/// The deepest nesting of lists and maps a document may have. Resources
/// nest about ten levels; libyaml's cost grows with the square of depth.
pub const MAX_NESTING: usize = 32;
/// The most bytes one resource may take as JSON (as stored and as sent to
/// proxies); Kubernetes allows about 1.5 MiB per object, but every proxy
/// that follows a Service receives its resources.
pub const MAX_RESOURCE_BYTES: usize = 512 << 10;
/// The most bytes of all of one object's annotations, keys and values
/// together (Kubernetes' limit).
pub const MAX_ANNOTATIONS_BYTES: usize = 256 << 10;
/// A DNS label (RFC 1123), e.g. a name or a label key's name part.
pub const MAX_LABEL_CHARS: usize = 63;
/// A DNS subdomain (RFC 1123), e.g. a label key's prefix.
pub const MAX_SUBDOMAIN_CHARS: usize = 253;
/// How much of a value an error message quotes.
pub const QUOTE_CHARS: usize = 64;

/// A value for an error message: itself when short, else its first
/// characters, an ellipsis and its size, so a huge input is never echoed.
pub fn clip(value: &str) -> String {
    if value.chars().count() <= QUOTE_CHARS {
        return value.to_string();
    }
    let head: String = value.chars().take(QUOTE_CHARS).collect();
    format!("{head}… ({} bytes)", value.len())
}

/// Shortens every long run between backticks or double quotes in a
/// message (serde's messages quote the offending key or value), and the
/// message itself when it is still long.
pub fn clip_message(message: &str) -> String {
    if message.len() <= 4 * QUOTE_CHARS {
        return message.to_string();
    }
    let mut out = String::with_capacity(8 * QUOTE_CHARS);
    let mut rest = message;
    while let Some(open) = rest.find(['`', '"']) {
        let quote = rest.as_bytes()[open];
        out.push_str(&rest[..=open]);
        rest = &rest[open + 1..];
        match rest.find(quote as char) {
            Some(close) => {
                out.push_str(&clip(&rest[..close]));
                out.push(quote as char);
                rest = &rest[close + 1..];
            }
            None => {
                out.push_str(&clip(rest));
                rest = "";
            }
        }
    }
    out.push_str(rest);
    if out.chars().count() > 16 * QUOTE_CHARS {
        let head: String = out.chars().take(16 * QUOTE_CHARS).collect();
        out = format!("{head}… ({} bytes in all)", message.len());
    }
    out
}

/// A problem as (field path, reason).
pub(crate) type Problem = (String, String);

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL_CHARS
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 label, as Kubernetes names most things.
pub fn dns_label(s: &str) -> Result<(), String> {
    if is_label(s) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid name: use at most {MAX_LABEL_CHARS} lowercase letters, digits and `-`, \
             starting and ending with a letter or digit",
            clip(s)
        ))
    }
}

/// RFC 1123 subdomain: labels joined by dots, at most 253 characters.
pub fn dns_subdomain(s: &str) -> Result<(), String> {
    if s.len() <= MAX_SUBDOMAIN_CHARS && s.split('.').all(is_label) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid DNS name: use at most {MAX_SUBDOMAIN_CHARS} lowercase letters, digits, \
             `-` and `.`, each part starting and ending with a letter or digit",
            clip(s)
        ))
    }
}

/// Kubernetes' "qualified name" part: alphanumerics with `-`, `_`, `.`
/// inside, at most 63 characters; `allow_empty` for label values.
fn is_qualified_part(s: &str, allow_empty: bool) -> bool {
    if s.is_empty() {
        return allow_empty;
    }
    let edge = |c: char| c.is_ascii_alphanumeric();
    s.len() <= MAX_LABEL_CHARS
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.starts_with(edge)
        && s.ends_with(edge)
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain
/// of at most 253 characters, the name at most 63.
pub fn qualified_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let prefix_ok = prefix.is_none_or(|p| dns_subdomain(p).is_ok());
    if prefix_ok && is_qualified_part(name, false) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid key: use `[prefix/]name`, the name at most {MAX_LABEL_CHARS} \
             letters, digits, `-`, `_` and `.` (starting and ending with a letter or digit), \
             the prefix a DNS name of at most {MAX_SUBDOMAIN_CHARS} characters",
            clip(key)
        ))
    }
}

/// A label value: empty, or at most 63 letters, digits, `-`, `_`, `.`,
/// starting and ending with a letter or digit.
pub fn label_value(value: &str) -> Result<(), String> {
    if is_qualified_part(value, true) {
        Ok(())
    } else {
        Err(format!(
            "`{}` is not a valid label value: use at most {MAX_LABEL_CHARS} letters, digits, \
             `-`, `_` and `.`, starting and ending with a letter or digit",
            clip(value)
        ))
    }
}

/// Checks a label map (`metadata.labels`, a selector) at `field`.
pub(crate) fn check_labels(field: &str, labels: &BTreeMap<String, String>) -> Vec<Problem> {
    let mut out = Vec::new();
    for (k, v) in labels {
        let at = format!("{field}.{}", clip(k));
        if let Err(e) = qualified_key(k) {
            out.push((at.clone(), e));
        }
        if let Err(e) = label_value(v) {
            out.push((at, e));
        }
    }
    out
}

/// Checks `metadata.annotations`: valid keys, and at most 256 KiB in all.
pub(crate) fn check_annotations(annotations: &BTreeMap<String, String>) -> Vec<Problem> {
    let mut out = Vec::new();
    for k in annotations.keys() {
        if let Err(e) = qualified_key(k) {
            out.push((format!("metadata.annotations.{}", clip(k)), e));
        }
    }
    let total: usize = annotations.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ANNOTATIONS_BYTES {
        let (largest, _) = annotations
            .iter()
            .max_by_key(|(k, v)| k.len() + v.len())
            .expect("over the limit, so not empty");
        out.push((
            format!("metadata.annotations.{}", clip(largest)),
            format!(
                "the annotations take {total} bytes, over the limit of {MAX_ANNOTATIONS_BYTES} \
                 bytes (256 KiB) for all of an object's annotations: keep large data out of \
                 annotations"
            ),
        ));
    }
    out
}

/// The byte count of a resource as JSON, when over the per-resource limit.
pub(crate) fn oversized<T: serde::Serialize>(resource: &T) -> Option<usize> {
    // Serialising a typed resource cannot fail (string keys only).
    let len = serde_json::to_vec(resource).map_or(0, |v| v.len());
    (len > MAX_RESOURCE_BYTES).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_short_values_and_shortens_long_ones() {
        assert_eq!(clip("catalog"), "catalog");
        let long = "x".repeat(5 << 20);
        let c = clip(&long);
        assert!(c.len() < 100, "{c}");
        assert!(c.ends_with("… (5242880 bytes)"), "{c}");
        let msg = format!("unknown field `{long}`, expected one of `a`, `b`");
        let m = clip_message(&msg);
        assert!(m.len() < 200, "{m}");
        assert!(
            m.starts_with("unknown field `xxx") && m.ends_with("`a`, `b`"),
            "{m}"
        );
    }

    #[test]
    fn keys_and_values_follow_kubernetes() {
        for ok in [
            "app",
            "app.kubernetes.io/name",
            "trellis.dev/load-balancer",
            "a_b.c",
        ] {
            assert!(qualified_key(ok).is_ok(), "{ok}");
        }
        let long_name = "a".repeat(64);
        let long_prefix = format!("{}/x", "a".repeat(254));
        for bad in [
            "",
            "-a",
            "a/",
            "/a",
            "UPPER/x",
            &long_name,
            &long_prefix,
            "a b",
        ] {
            assert!(qualified_key(bad).is_err(), "{bad}");
        }
        assert!(label_value("").is_ok());
        assert!(label_value("v1.2_x-y").is_ok());
        assert!(label_value(&"a".repeat(63)).is_ok());
        assert!(label_value(&"a".repeat(64)).is_err());
        assert!(label_value("-x").is_err());
        assert!(dns_label(&"a".repeat(64)).is_err());
        assert!(dns_subdomain(&format!("{}.b", "a".repeat(63))).is_ok());
    }

    #[test]
    fn annotations_have_a_total_budget() {
        let mut a = BTreeMap::new();
        a.insert("big".to_string(), "x".repeat(MAX_ANNOTATIONS_BYTES));
        let p = check_annotations(&a);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].0, "metadata.annotations.big");
        assert!(p[0].1.contains("262144"), "{}", p[0].1);
        a.insert("big".to_string(), "x".repeat(MAX_ANNOTATIONS_BYTES - 3));
        assert!(check_annotations(&a).is_empty());
    }
}
