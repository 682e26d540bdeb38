//! The one normalised request path used for authorization, routing and
//! forwarding alike, so that no two components can disagree about what
//! path a request names.
//!
//! - Percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded (`%61dmin` → `admin`, `%2e%2e` → `..`); other escapes are kept,
//!   upper-cased.
//! - An encoded `/` (`%2F`) or `\` (`%5C`), and a raw `\`, are REFUSED
//!   (400): decoding them would change the path's segments, keeping them
//!   lets an app decode them differently from the proxy. Refusal is the
//!   choice that cannot be bypassed.
//! - Runs of `/` merge into one; `.` and `..` segments are removed as RFC
//!   3986 §5.2.4 says (`..` never climbs above the root).
//! - A fragment (`#...`) is dropped; the query is kept as it is.

use http::Request;

use crate::error::ProxyError;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the path holds an encoded '/' or '\\' (%2F, %5C), which Trellis refuses: send it unencoded or in the query")]
    EncodedSlash,
    #[error("the path holds a backslash, which Trellis refuses")]
    Backslash,
    #[error("the path holds a malformed percent-escape")]
    BadEscape,
    #[error("the path must start with '/'")]
    NotAbsolute,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Normalises a path (without query). Returns the path as it must be used
/// and forwarded.
pub fn normalize_path(path: &str) -> Result<String, PathError> {
    let path = path.split('#').next().unwrap_or("");
    if path.is_empty() {
        return Ok("/".into());
    }
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    // 1. Escapes.
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let (Some(h), Some(l)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(PathError::BadEscape);
                };
                let b = h * 16 + l;
                if b == b'/' || b == b'\\' {
                    return Err(PathError::EncodedSlash);
                }
                if unreserved(b) {
                    decoded.push(b as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[h as usize]));
                    decoded.push(char::from(b"0123456789ABCDEF"[l as usize]));
                }
                i += 3;
            }
            b'\\' => return Err(PathError::Backslash),
            _ => {
                // Multi-byte UTF-8 is copied whole.
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                decoded.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    // 2. Segments: merge slashes, remove dot segments.
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(decoded.len());
    for s in &out {
        result.push('/');
        result.push_str(s);
    }
    if result.is_empty() || (trailing && !result.ends_with('/')) {
        result.push('/');
    }
    Ok(result)
}

/// Normalises a request target's path and keeps its query.
pub fn normalize_path_and_query(pq: &str) -> Result<String, PathError> {
    let pq = pq.split('#').next().unwrap_or("");
    match pq.split_once('?') {
        Some((p, q)) => Ok(format!("{}?{q}", normalize_path(p)?)),
        None => normalize_path(pq),
    }
}

/// Rewrites a request's target to its normalised form: the one path that
/// authorization, routing and forwarding see from here on. A path that
/// cannot be normalised is the caller's error (400).
pub fn normalize_uri<B>(req: &mut Request<B>) -> Result<(), ProxyError> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let normalized =
        normalize_path_and_query(pq).map_err(|e| ProxyError::bad_request(e.to_string()))?;
    if normalized != pq {
        let mut parts = req.uri().clone().into_parts();
        parts.path_and_query = Some(normalized.parse().map_err(|_| {
            ProxyError::bad_request("the normalised path is not a valid request target")
        })?);
        *req.uri_mut() =
            http::Uri::from_parts(parts).map_err(|e| ProxyError::bad_request(e.to_string()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_admin_is_admin() {
        for p in [
            "/admin",
            "//admin",
            "/public/../admin",
            "/public/%2e%2e/admin",
            "/public/%2E%2E/admin",
            "/%61dmin",
            "/./admin",
            "/admin#frag",
            "///public//..//admin",
            "/../../admin",
        ] {
            assert_eq!(normalize_path(p).unwrap(), "/admin", "{p}");
        }
        assert_eq!(normalize_path("/admin/").unwrap(), "/admin/");
        assert_eq!(normalize_path("/a/b/..").unwrap(), "/a/");
    }

    #[test]
    fn encoded_slashes_and_backslashes_are_refused() {
        assert_eq!(normalize_path("/%2Fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/x%2fadmin"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/x%5Cadmin"), Err(PathError::EncodedSlash));
        assert_eq!(normalize_path("/x\\admin"), Err(PathError::Backslash));
        assert_eq!(normalize_path("/x%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/x%2"), Err(PathError::BadEscape));
    }

    #[test]
    fn reserved_escapes_stay_escaped_and_queries_stay() {
        assert_eq!(normalize_path("/a%3fb").unwrap(), "/a%3Fb");
        assert_eq!(normalize_path("/caf%C3%A9").unwrap(), "/caf%C3%A9");
        assert_eq!(
            normalize_path_and_query("//x/../y?a=../b#f").unwrap(),
            "/y?a=../b"
        );
        assert_eq!(normalize_path("").unwrap(), "/");
        assert_eq!(normalize_path("/").unwrap(), "/");
    }

    #[test]
    fn a_request_target_is_rewritten_to_its_normal_form() {
        let mut req = Request::get("http://catalog:8080//a/%2e%2e/b?q=../x")
            .body(())
            .unwrap();
        normalize_uri(&mut req).unwrap();
        assert_eq!(req.uri().to_string(), "http://catalog:8080/b?q=../x");
        let mut bad = Request::get("/a%2Fb").body(()).unwrap();
        let e = normalize_uri(&mut bad).unwrap_err();
        assert_eq!(e.status, http::StatusCode::BAD_REQUEST);
        assert_eq!(e.message, PathError::EncodedSlash.to_string());
    }
}
