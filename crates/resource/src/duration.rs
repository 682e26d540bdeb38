//! Gateway API durations (GEP-2257): one to four `<number><unit>` parts,
//! each number one to five digits, units `h`, `m`, `s`, `ms`. Examples:
//! `10s`, `500ms`, `1h30m`, `24h`.
//!
//! We accept exactly what the Gateway API's own pattern accepts, so a
//! manifest written for another mesh reads the same here; anything else
//! (`1.5s`, `10`, `1d`, `-1s`) is refused with an example of the right form.

use std::time::Duration;

const MAX_PARTS: usize = 4;
const MAX_DIGITS: usize = 5;

/// Parses a Gateway API duration.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let fail = |why: &str| {
        Err(format!(
            "`{s}` is not a duration: {why}; write a whole number and a unit \
             (h, m, s or ms), e.g. `10s`, `500ms`, `1h30m`"
        ))
    };
    if s.is_empty() {
        return fail("it is empty");
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
            return fail("each part must start with a number");
        }
        if digits.len() > MAX_DIGITS {
            return fail("a number may have at most 5 digits");
        }
        let unit_start = i;
        while i < bytes.len() && bytes[i].is_ascii_alphabetic() {
            i += 1;
        }
        // At most 5 digits, so this cannot overflow u64.
        let n: u64 = digits.parse().expect("1-5 ASCII digits");
        let part = match &s[unit_start..i] {
            "h" => Duration::from_secs(n * 3600),
            "m" => Duration::from_secs(n * 60),
            "s" => Duration::from_secs(n),
            "ms" => Duration::from_millis(n),
            "" => return fail("a number has no unit"),
            _ => return fail("the unit is not one of h, m, s, ms"),
        };
        parts += 1;
        if parts > MAX_PARTS {
            return fail("it has more than 4 parts");
        }
        total += part;
    }
    Ok(total)
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
        ] {
            let err = parse_duration(bad).expect_err(bad);
            assert!(err.contains("e.g. `10s`"), "{bad}: {err}");
        }
    }
}
