//! Properties of the one normalised request path
//! (`trellis_proxy::normalize`): it never panics; what it accepts comes out
//! absolute, without empty or dot segments, and normalises to itself; the
//! spelling of unreserved characters (raw or percent-encoded, either case)
//! does not change the result; an encoded slash is always refused; the
//! query is kept as it was.

use proptest::prelude::*;
use trellis_proxy::normalize::{normalize_path, normalize_path_and_query, PathError};

/// Path-ish text: segments of plain characters, dots, escapes (good and
/// bad) and the odd multi-byte character, joined by runs of slashes.
fn pathish() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => "[a-zA-Z0-9_~-]{1,6}",
        2 => Just(".".to_string()),
        2 => Just("..".to_string()),
        1 => "%[0-9a-fA-F]{2}",
        1 => Just("%2e%2E".to_string()),
        1 => "[ !$&'()*+,;=:@é€]{1,2}",
    ];
    prop::collection::vec((piece, 1..3usize), 0..10).prop_map(|parts| {
        let mut s = String::new();
        for (p, slashes) in parts {
            s.push_str(&"/".repeat(slashes));
            s.push_str(&p);
        }
        s
    })
}

/// An unreserved character, written raw or as an escape in either case.
fn spellings(c: char) -> Vec<String> {
    let b = c as u8;
    vec![c.to_string(), format!("%{b:02X}"), format!("%{b:02x}")]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_text_is_normalised_or_refused_without_a_panic(s in any::<String>()) {
        let _ = normalize_path(&s);
        let _ = normalize_path_and_query(&s);
    }

    #[test]
    fn an_accepted_path_is_absolute_clean_and_stable(path in pathish()) {
        let Ok(n) = normalize_path(&path) else {
            return Ok(());
        };
        prop_assert!(n.starts_with('/'), "{path:?} -> {n:?}");
        prop_assert!(!n.contains("//"), "{path:?} -> {n:?}");
        prop_assert!(!n.contains('#') && !n.contains('\\'), "{path:?} -> {n:?}");
        // Never above the root: no dot segment is left to climb with.
        prop_assert!(
            n.split('/').all(|seg| seg != "." && seg != ".."),
            "{path:?} -> {n:?}"
        );
        prop_assert_eq!(normalize_path(&n), Ok(n.clone()), "not idempotent for {:?}", path);
    }

    /// Segments of unreserved characters, each character spelt raw or
    /// percent-encoded: every spelling gives the raw path's result.
    #[test]
    fn unreserved_escapes_decode_consistently(
        segments in prop::collection::vec("[a-zA-Z0-9._~-]{1,8}", 1..6),
        choices in prop::collection::vec(0..3usize, 48),
    ) {
        let raw = format!("/{}", segments.join("/"));
        let mut choice = choices.iter().cycle();
        let spelt: String = raw
            .chars()
            .map(|c| if c == '/' { "/".to_string() } else { spellings(c)[*choice.next().unwrap()].clone() })
            .collect();
        prop_assert_eq!(normalize_path(&spelt), normalize_path(&raw), "{}", spelt);
    }

    #[test]
    fn an_encoded_slash_is_always_refused(
        before in "(/[a-z0-9._-]{0,6}){0,3}",
        after in "[a-z0-9/._-]{0,12}",
        slash in prop::sample::select(vec!["%2F", "%2f", "%5C", "%5c"]),
    ) {
        let path = format!("{before}/{slash}{after}");
        prop_assert_eq!(normalize_path(&path), Err(PathError::EncodedSlash), "{}", path);
    }

    #[test]
    fn the_query_is_kept_as_it_was(path in pathish(), query in "[ -\"$-~]{0,20}") {
        let with_query = format!("{path}?{query}");
        match normalize_path(&path) {
            Ok(n) => prop_assert_eq!(
                normalize_path_and_query(&with_query),
                Ok(format!("{n}?{query}"))
            ),
            Err(e) => prop_assert_eq!(normalize_path_and_query(&with_query), Err(e)),
        }
    }
}
