//! The patterns the resource types' JSON schemas carry (feature `schema`),
//! from which the Kubernetes CRDs are generated. Each says no more than the
//! loader's own checks in `validate` do, so the API server never refuses
//! what `trellis apply` accepts; the loader still checks the rest (the
//! references, regexes, combinations of fields) with better messages.

/// A Gateway API duration (GEP-2257), exactly what `parse_duration` takes.
pub const DURATION: &str = "^([0-9]{1,5}(h|m|s|ms)){1,4}$";
/// An RFC 1123 subdomain (the loader also bounds each label to 63).
pub const DNS_SUBDOMAIN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// An `http://` URL with a host.
pub const HTTP_URL: &str = r"^http://[^/\s]+(/|$)";
/// A SPIFFE ID, or a `*` pattern of one.
pub const PRINCIPAL: &str = r"^(\*|spiffe://)";
/// The methods an AuthorizationPolicy may name.
pub const HTTP_METHOD: &str = "^(GET|HEAD|POST|PUT|DELETE|CONNECT|OPTIONS|TRACE|PATCH)$";
/// An AuthorizationPolicy path: `/exact`, `/prefix*` or `*suffix`.
pub const AUTHZ_PATH: &str = "^[/*]";
/// An HTTP header name (an RFC 9110 token).
pub const HEADER_NAME: &str = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$";
