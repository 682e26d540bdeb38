//! Durations: the one parser Trellis has for them, and their short form.
//!
//! Two syntaxes share it. Resources take Gateway API durations (GEP-2257):
//! one to four `<number><unit>` parts, each number one to five digits,
//! units `h`, `m`, `s`, `ms` (`10s`, `500ms`, `1h30m`, `24h`). We accept
//! exactly what the Gateway API's own pattern accepts, so a manifest written
//! for another mesh, or checked by the Gateway API's CRD schema on
//! Kubernetes, reads the same here. Flags and query parameters, typed by
//! people, take the loose form of the same syntax: surrounding blanks,
//! any number of parts and digits (too large saturates). Neither takes
//! `1.5s`, `10`, `1d` or `-1s`; the error shows the right form.

use std::time::Duration;

const GATEWAY_MAX_PARTS: usize = 4;
const GATEWAY_MAX_DIGITS: usize = 5;

/// Why a duration was refused. Every message ends with an example of the
/// right form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("`{0}` is not a duration: it is empty; {HINT}")]
    Empty(String),
    #[error("`{0}` is not a duration: each part must start with a number; {HINT}")]
    NoNumber(String),
    #[error("`{0}` is not a duration: a number has no unit; {HINT}")]
    NoUnit(String),
    #[error("`{0}` is not a duration: the unit is not one of h, m, s, ms; {HINT}")]
    BadUnit(String),
    #[error("`{0}` is not a duration: a number may have at most 5 digits; {HINT}")]
    TooManyDigits(String),
    #[error("`{0}` is not a duration: it has more than 4 parts; {HINT}")]
    TooManyParts(String),
}

const HINT: &str = "write a whole number and a unit (h, m, s or ms), e.g. `10s`, `500ms`, `1h30m`";

/// So code whose errors are strings (the proxy compiling a config) can use
/// `?` on a duration.
impl From<DurationError> for String {
    fn from(e: DurationError) -> String {
        e.to_string()
    }
}

/// Which form of the syntax a parse accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Syntax {
    /// GEP-2257, for resources.
    GatewayApi,
    /// For flags and query parameters.
    Loose,
}

/// Parses a Gateway API duration, the form resources take.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    parse(s, Syntax::GatewayApi)
}

/// Parses an optional Gateway API duration field of a resource.
pub fn parse_optional_duration(s: Option<&str>) -> Result<Option<Duration>, DurationError> {
    s.map(parse_duration).transpose()
}

/// Parses a duration typed on a command line or in a query parameter:
/// every Gateway API duration, and also surrounding blanks, more than four
/// parts and more than five digits.
pub fn parse_duration_loose(s: &str) -> Result<Duration, DurationError> {
    parse(s, Syntax::Loose)
}

fn parse(input: &str, syntax: Syntax) -> Result<Duration, DurationError> {
    let s = match syntax {
        Syntax::GatewayApi => input,
        Syntax::Loose => input.trim(),
    };
    let owned = || input.to_string();
    if s.is_empty() {
        return Err(DurationError::Empty(owned()));
    }
    let bytes = s.as_bytes();
    let mut total = Duration::ZERO;
    let mut parts = 0;
    let mut i = 0;
    while i < bytes.len() {
        let start = i;
        while i < bytes.len() && bytes[i].is_ascii_digit() {
            i += 1;
        }
        let digits = &s[start..i];
        if digits.is_empty() {
            return Err(DurationError::NoNumber(owned()));
        }
        if syntax == Syntax::GatewayApi && digits.len() > GATEWAY_MAX_DIGITS {
            return Err(DurationError::TooManyDigits(owned()));
        }
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        // Only the loose form lets a number be too large for u64.
        let n: u64 = digits.parse().unwrap_or(u64::MAX);
        let part = match &s[unit_start..i] {
            "h" => Duration::from_secs(n.saturating_mul(3600)),
            "m" => Duration::from_secs(n.saturating_mul(60)),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "" => return Err(DurationError::NoUnit(owned())),
            _ => return Err(DurationError::BadUnit(owned())),
        };
        parts += 1;
        if syntax == Syntax::GatewayApi && parts > GATEWAY_MAX_PARTS {
            return Err(DurationError::TooManyParts(owned()));
        }
        total = total.saturating_add(part);
    }
    Ok(total)
}

/// The short form of a duration (`30s`, `1500ms`), which both syntaxes read
/// back as the same duration when it fits in five digits.
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if !ms.is_multiple_of(1000) {
        format!("{ms}ms")
    } else {
        format!("{}s", ms / 1000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_gateway_api_forms() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(
            parse_duration("1h2m3s4ms"),
            Ok(Duration::from_millis(3_723_004))
        );
        assert_eq!(
            parse_duration("99999h"),
            Ok(Duration::from_secs(99_999 * 3600))
        );
    }

    #[test]
    fn refuses_other_forms_with_a_hint() {
        for bad in [
            "",
            "10",
            "s",
            "1.5s",
            "-1s",
            "1d",
            "10 s",
            " 10s",
            "10S",
            "1h1m1s1ms1h",
            "123456s",
            "1sec",
            "ms",
            "ms5",
        ] {
            let err = parse_duration(bad).expect_err(bad).to_string();
            assert!(err.contains("e.g. `10s`"), "{bad}: {err}");
            assert!(err.contains(&format!("`{bad}`")), "{bad}: {err}");
        }
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let cases = [
            ("", DurationError::Empty("".into())),
            ("s", DurationError::NoNumber("s".into())),
            ("10", DurationError::NoUnit("10".into())),
            ("1d", DurationError::BadUnit("1d".into())),
            ("123456s", DurationError::TooManyDigits("123456s".into())),
            (
                "1h1m1s1ms1h",
                DurationError::TooManyParts("1h1m1s1ms1h".into()),
            ),
        ];
        for (input, want) in cases {
            assert_eq!(parse_duration(input), Err(want), "{input}");
        }
    }

    #[test]
    fn the_loose_form_is_a_superset_of_the_gateway_api_form() {
        for ok in ["10s", "500ms", "1h30m", "24h", "0s", "1h2m3s4ms", "99999h"] {
            assert_eq!(parse_duration_loose(ok), parse_duration(ok), "{ok}");
        }
        assert_eq!(parse_duration_loose(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(
            parse_duration_loose("123456s"),
            Ok(Duration::from_secs(123_456))
        );
        assert_eq!(
            parse_duration_loose("1m1m1m1m1m"),
            Ok(Duration::from_secs(300))
        );
        // Too large to count saturates rather than failing, as before.
        assert_eq!(
            parse_duration_loose("99999999999999999999999h"),
            Ok(Duration::from_secs(u64::MAX))
        );
        for bad in ["", " ", "5", "s", "1.5s", "-1s", "5d", "ms5", "1 s"] {
            assert!(parse_duration_loose(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn optional_fields_parse_when_present() {
        assert_eq!(parse_optional_duration(None), Ok(None));
        assert_eq!(
            parse_optional_duration(Some("2s")),
            Ok(Some(Duration::from_secs(2)))
        );
        assert!(parse_optional_duration(Some("2")).is_err());
    }

    #[test]
    fn formats_read_back() {
        assert_eq!(format_duration(Duration::from_secs(30)), "30s");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        for d in [Duration::from_secs(30), Duration::from_millis(1500)] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
    }
}
