//! Properties of trace-context parsing (`trellis_proxy::trace`): a
//! `traceparent` this proxy writes parses back to the same ids and
//! decision; invalid versions, all-zero ids and upper-case hex are refused;
//! and no header value, however odd, makes parsing panic.

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use trellis_proxy::trace::{
    extract, hex, parse_b3_single, parse_traceparent, Format, SpanContext, B3, B3_SAMPLED,
    B3_SPAN_ID, B3_TRACE_ID, TRACEPARENT, TRACESTATE,
};

fn nonzero<const N: usize>() -> impl Strategy<Value = [u8; N]>
where
    [u8; N]: Arbitrary,
{
    any::<[u8; N]>().prop_filter("not all zero", |id| id.iter().any(|&b| b != 0))
}

fn traceparent(version: &str, trace: &[u8], span: &[u8], flags: u8) -> String {
    format!("{version}-{}-{}-{flags:02x}", hex(trace), hex(span))
}

/// Header-value text: printable ASCII, biased toward trace-header shapes.
fn header_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,80}",
        "[0-9a-fA-F-]{0,70}",
        (
            "[0-9a-f]{2}",
            "[0-9a-fA-Fz-]{32}",
            "[0-9a-fA-F-]{16}",
            "[0-9a-f-]{2,8}"
        )
            .prop_map(|(v, t, s, f)| format!("{v}-{t}-{s}-{f}")),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn a_written_traceparent_parses_back(
        trace_id in nonzero::<16>(),
        span_id in nonzero::<8>(),
        sampled in any::<bool>(),
    ) {
        let ctx = SpanContext {
            trace_id,
            span_id,
            parent_span_id: None,
            sampled,
            tracestate: None,
            b3: None,
        };
        let p = parse_traceparent(&ctx.traceparent()).expect("our own traceparent parses");
        prop_assert_eq!(p.trace_id, trace_id);
        prop_assert_eq!(p.span_id, Some(span_id));
        prop_assert_eq!(p.sampled, Some(sampled));
        prop_assert_eq!(p.format, Format::W3c);
        // A child keeps the trace and the decision and names its parent.
        let child = SpanContext::new(Some(p), || !sampled);
        prop_assert_eq!(child.trace_id, trace_id);
        prop_assert_eq!(child.parent_span_id, Some(span_id));
        prop_assert_eq!(child.sampled, sampled);
    }

    /// The sampled flag is bit 0 of the flags; other bits are ignored.
    #[test]
    fn flags_give_the_sampling_decision(
        trace_id in nonzero::<16>(),
        span_id in nonzero::<8>(),
        flags in any::<u8>(),
    ) {
        let p = parse_traceparent(&traceparent("00", &trace_id, &span_id, flags)).unwrap();
        prop_assert_eq!(p.sampled, Some(flags & 1 == 1));
    }

    #[test]
    fn invalid_versions_zero_ids_and_upper_case_are_refused(
        trace_id in nonzero::<16>(),
        span_id in nonzero::<8>(),
        flags in any::<u8>(),
        future in 1u8..0xff,
        extra in "[ -~]{1,20}",
    ) {
        let refused = |tp: &str| parse_traceparent(tp).is_none();
        let ok = traceparent("00", &trace_id, &span_id, flags);
        prop_assert!(!refused(&ok), "{}", ok);
        // Version ff is invalid; version 00 has exactly four fields.
        let ff = traceparent("ff", &trace_id, &span_id, flags);
        prop_assert!(refused(&ff), "{}", ff);
        for longer in [format!("{ok}-{extra}"), format!("{ok}{extra}")] {
            prop_assert!(refused(&longer), "{}", longer);
        }
        // A later version may append fields after a dash, and no other way.
        let later = traceparent(&format!("{future:02x}"), &trace_id, &span_id, flags);
        let appended = format!("{later}-{extra}");
        prop_assert!(!refused(&appended), "{}", appended);
        if !extra.starts_with('-') {
            let glued = format!("{later}{extra}");
            prop_assert!(refused(&glued), "{}", glued);
        }
        // All-zero ids.
        for zero in [
            traceparent("00", &[0; 16], &span_id, flags),
            traceparent("00", &trace_id, &[0; 8], flags),
        ] {
            prop_assert!(refused(&zero), "{}", zero);
        }
        // Upper-case hex, wherever it is.
        let upper = ok.to_ascii_uppercase();
        if upper != ok {
            prop_assert!(refused(&upper), "{}", upper);
        }
    }

    /// Whatever the caller sends in the trace headers: no panic, and a
    /// context that is found is usable (non-zero trace id).
    #[test]
    fn odd_trace_headers_never_panic(
        tp in header_text(),
        ts in header_text(),
        b3 in header_text(),
        b3_trace in header_text(),
        b3_span in header_text(),
        b3_sampled in header_text(),
        which in prop::collection::vec(any::<bool>(), 6),
    ) {
        let _ = parse_traceparent(&tp);
        let _ = parse_b3_single(&b3);
        let mut headers = HeaderMap::new();
        for (on, (name, value)) in which.iter().zip([
            (TRACEPARENT, &tp),
            (TRACESTATE, &ts),
            (B3, &b3),
            (B3_TRACE_ID, &b3_trace),
            (B3_SPAN_ID, &b3_span),
            (B3_SAMPLED, &b3_sampled),
        ]) {
            if *on {
                headers.append(name, HeaderValue::from_str(value).unwrap());
            }
        }
        if let Some(p) = extract(&headers) {
            prop_assert!(p.trace_id.iter().any(|&b| b != 0), "{headers:?}");
            prop_assert!(p.span_id.is_none_or(|s| s.iter().any(|&b| b != 0)), "{headers:?}");
        }
    }

    /// `parse_traceparent` takes any `&str`, not only header values.
    #[test]
    fn any_text_never_panics(s in any::<String>()) {
        let _ = parse_traceparent(&s);
        let _ = parse_b3_single(&s);
    }
}
