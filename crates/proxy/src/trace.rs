//! Trace context: reading W3C `traceparent`/`tracestate` and B3 (single and
//! multi header) from a request, the head-sampling decision, and writing
//! the context of this hop's span onto the request it forwards.
//!
//! A header that does not parse is ignored as a whole (a new trace starts)
//! and never copied anywhere: only ids this module parsed or made travel on.

use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
pub const B3: HeaderName = HeaderName::from_static("b3");
pub const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
pub const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
pub const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
pub const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
pub const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");
/// Every trace header this module reads or writes.
const ALL: [HeaderName; 8] = [
    TRACEPARENT,
    TRACESTATE,
    B3,
    B3_TRACE_ID,
    B3_SPAN_ID,
    B3_PARENT_SPAN_ID,
    B3_SAMPLED,
    B3_FLAGS,
];

/// `tracestate` longer than this, or with more members, is dropped (W3C).
const MAX_TRACESTATE: usize = 512;
const MAX_TRACESTATE_MEMBERS: usize = 32;

pub type TraceId = [u8; 16];
pub type SpanId = [u8; 8];

/// How the caller sent its context; B3 callers get B3 back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The caller's context, as parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    /// None when the caller sent only a sampling decision (`b3: 1`).
    pub span_id: Option<SpanId>,
    /// The caller's sampling decision, when it made one.
    pub sampled: Option<bool>,
    pub tracestate: Option<String>,
    pub format: Format,
    /// B3 headers came too (beside a `traceparent`, which wins): the next
    /// hop gets B3 as well.
    pub also_b3: Option<Format>,
}

/// This hop's span context.
#[derive(Clone, Debug)]
pub struct SpanContext {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub parent_span_id: Option<SpanId>,
    pub sampled: bool,
    pub tracestate: Option<String>,
    /// B3 form to write besides `traceparent`, when the caller used B3.
    pub b3: Option<Format>,
}

impl SpanContext {
    /// A child of `parent` (or the root of a new trace). `sample` is the
    /// head decision, asked only when the caller made none.
    pub fn new(parent: Option<Parent>, sample: impl FnOnce() -> bool) -> SpanContext {
        let span_id = random_span_id();
        match parent {
            Some(p) => SpanContext {
                trace_id: p.trace_id,
                span_id,
                parent_span_id: p.span_id,
                sampled: p.sampled.unwrap_or_else(sample),
                tracestate: p.tracestate,
                b3: p.also_b3.or((p.format != Format::W3c).then_some(p.format)),
            },
            None => SpanContext {
                trace_id: random_trace_id(),
                span_id,
                parent_span_id: None,
                sampled: sample(),
                tracestate: None,
                b3: None,
            },
        }
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// `00-<trace id>-<span id>-<flags>`, in one allocation (it is made
    /// for every request).
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }

    /// Replaces every trace header on `headers` with this span's context.
    pub fn inject(&self, headers: &mut HeaderMap) {
        remove_all(headers);
        // Ids are new on every request: marked so that HTTP/2's header
        // compression sends them as literals and does not add each one to
        // its table (where it would only push out values that do repeat).
        let put = |h: &mut HeaderMap, name: HeaderName, v: String| {
            if let Ok(mut v) = HeaderValue::try_from(v) {
                v.set_sensitive(true);
                h.insert(name, v);
            }
        };
        put(headers, TRACEPARENT, self.traceparent());
        // The caller's tracestate repeats from request to request: indexed.
        if let Some(Ok(ts)) = self.tracestate.as_deref().map(HeaderValue::from_str) {
            headers.insert(TRACESTATE, ts);
        }
        let sampled = if self.sampled { "1" } else { "0" };
        match self.b3 {
            Some(Format::B3Single) => {
                let mut v = format!("{}-{}-{sampled}", hex(&self.trace_id), hex(&self.span_id));
                if let Some(p) = &self.parent_span_id {
                    v.push('-');
                    v.push_str(&hex(p));
                }
                put(headers, B3, v);
            }
            Some(Format::B3Multi) => {
                put(headers, B3_TRACE_ID, hex(&self.trace_id));
                put(headers, B3_SPAN_ID, hex(&self.span_id));
                if let Some(p) = &self.parent_span_id {
                    put(headers, B3_PARENT_SPAN_ID, hex(p));
                }
                put(headers, B3_SAMPLED, sampled.to_string());
            }
            _ => {}
        }
    }
}

/// Whether `name` is one of the trace headers this module reads or writes.
fn is_trace_header(name: &HeaderName) -> bool {
    ALL.contains(name)
}

/// Whether the headers carry any trace header: one pass over the names,
/// so that a request without any (most of them) costs no lookups.
fn carries_any(headers: &HeaderMap) -> bool {
    headers.keys().any(is_trace_header)
}

/// Removes every trace header this module reads or writes.
pub fn remove_all(headers: &mut HeaderMap) {
    if !carries_any(headers) {
        return;
    }
    for h in ALL {
        headers.remove(h);
    }
}

/// The caller's context: W3C first, then B3 single, then B3 multi. None
/// when there is none or it does not parse.
pub fn extract(headers: &HeaderMap) -> Option<Parent> {
    if !carries_any(headers) {
        return None;
    }
    let one = |name: &HeaderName| -> Option<&str> {
        let mut values = headers.get_all(name).iter();
        let v = values.next()?;
        // Two of a header that must be single is as bad as a malformed one.
        if values.next().is_some() {
            return None;
        }
        v.to_str().ok().map(str::trim)
    };
    if let Some(mut p) = one(&TRACEPARENT).and_then(parse_traceparent) {
        p.tracestate = tracestate(headers);
        p.also_b3 = if headers.contains_key(B3) {
            Some(Format::B3Single)
        } else if headers.contains_key(B3_TRACE_ID) {
            Some(Format::B3Multi)
        } else {
            None
        };
        return Some(p);
    }
    if let Some(p) = one(&B3).and_then(parse_b3_single) {
        return Some(p);
    }
    let trace_id = one(&B3_TRACE_ID).and_then(parse_b3_trace_id)?;
    let span_id = one(&B3_SPAN_ID).and_then(|s| parse_id::<8>(s, false))?;
    let debug = one(&B3_FLAGS) == Some("1");
    let sampled = match one(&B3_SAMPLED) {
        _ if debug => Some(true),
        Some("1") | Some("true") => Some(true),
        Some("0") | Some("false") => Some(false),
        None => None,
        Some(_) => return None,
    };
    Some(Parent {
        trace_id,
        span_id: Some(span_id),
        sampled,
        tracestate: None,
        format: Format::B3Multi,
        also_b3: None,
    })
}

/// `version-traceid-parentid-flags` (W3C Trace Context, level 1).
pub fn parse_traceparent(s: &str) -> Option<Parent> {
    let b = s.as_bytes();
    // The fields are ASCII hex at fixed offsets; anything else in them is
    // malformed (and slicing a `str` there could split a character).
    if b.len() < 55 || !b[..55].is_ascii() {
        return None;
    }
    let version = parse_id::<1>(&s[0..2], true)?[0];
    if version == 0xff || (version == 0 && b.len() != 55) || (b.len() > 55 && b[55] != b'-') {
        return None;
    }
    if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
        return None;
    }
    let trace_id = parse_id::<16>(&s[3..35], true)?;
    let span_id = parse_id::<8>(&s[36..52], true)?;
    let flags = parse_id::<1>(&s[53..55], true)?[0];
    Some(Parent {
        trace_id,
        span_id: Some(span_id),
        sampled: Some(flags & 1 == 1),
        tracestate: None,
        format: Format::W3c,
        also_b3: None,
    })
}

/// `tracestate`, kept as given when it is small and printable; the
/// combined value when the header came several times.
fn tracestate(headers: &HeaderMap) -> Option<String> {
    let mut out = String::new();
    for v in headers.get_all(TRACESTATE) {
        let v = v.to_str().ok()?.trim();
        if v.is_empty() {
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(v);
    }
    let members = out.split(',').filter(|m| !m.trim().is_empty()).count();
    let ok = !out.is_empty()
        && out.len() <= MAX_TRACESTATE
        && members <= MAX_TRACESTATE_MEMBERS
        && out.bytes().all(|c| (0x20..0x7f).contains(&c))
        && out.split(',').filter(|m| !m.trim().is_empty()).all(|m| {
            m.split_once('=')
                .is_some_and(|(k, v)| !k.trim().is_empty() && !v.is_empty())
        });
    ok.then_some(out)
}

/// `b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]`, or a bare
/// sampling decision (`0`, `1`, `d`).
pub fn parse_b3_single(s: &str) -> Option<Parent> {
    let sampled_of = |f: &str| match f {
        "1" | "d" => Some(true),
        "0" => Some(false),
        _ => None,
    };
    let parts: Vec<&str> = s.split('-').collect();
    match parts.as_slice() {
        [flag] => {
            // Sampling only: the trace starts here, with the caller's decision.
            let sampled = sampled_of(flag)?;
            Some(Parent {
                trace_id: random_trace_id(),
                span_id: None,
                sampled: Some(sampled),
                tracestate: None,
                format: Format::B3Single,
                also_b3: None,
            })
        }
        [trace, span, rest @ ..] if rest.len() <= 2 => {
            let trace_id = parse_b3_trace_id(trace)?;
            let span_id = parse_id::<8>(span, false)?;
            let sampled = match rest.first() {
                Some(f) => Some(sampled_of(f)?),
                None => None,
            };
            if let Some(p) = rest.get(1) {
                parse_id::<8>(p, false)?;
            }
            Some(Parent {
                trace_id,
                span_id: Some(span_id),
                sampled,
                tracestate: None,
                format: Format::B3Single,
                also_b3: None,
            })
        }
        _ => None,
    }
}

/// 64-bit B3 trace ids are padded on the left to 128 bits.
fn parse_b3_trace_id(s: &str) -> Option<TraceId> {
    match s.len() {
        32 => parse_id::<16>(s, false),
        16 => {
            let low = parse_id::<8>(s, false)?;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&low);
            Some(id)
        }
        _ => None,
    }
}

/// Exactly `2 * N` hex digits (lower case only when `strict`), not all zero
/// (but for one-byte fields: versions and flags may be zero).
fn parse_id<const N: usize>(s: &str, strict: bool) -> Option<[u8; N]> {
    let b = s.as_bytes();
    if b.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !strict => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = digit(b[2 * i])? << 4 | digit(b[2 * i + 1])?;
    }
    if N > 1 && out.iter().all(|&x| x == 0) {
        return None;
    }
    Some(out)
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    push_hex(&mut s, bytes);
    s
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
}

fn random_trace_id() -> TraceId {
    loop {
        let id: TraceId = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

fn random_span_id() -> SpanId {
    loop {
        let id: SpanId = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quick_scan_sees_every_trace_header_and_only_those() {
        for h in ALL {
            assert!(is_trace_header(&h), "{h}");
            let mut m = HeaderMap::new();
            m.insert(h.clone(), HeaderValue::from_static("1"));
            m.insert(http::header::ACCEPT, HeaderValue::from_static("*/*"));
            remove_all(&mut m);
            assert!(!m.contains_key(&h), "{h} removed");
            assert!(m.contains_key(http::header::ACCEPT));
        }
        for h in ["accept", "x-b3", "tracer", "b3x", "x-trellis-source"] {
            assert!(!is_trace_header(&HeaderName::from_static(h)), "{h}");
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn reads_traceparent_and_tracestate() {
        let p = extract(&headers(&[
            ("traceparent", TP),
            ("tracestate", "congo=t61rcWkgMzE"),
            ("tracestate", "rojo=00f067aa0ba902b7"),
        ]))
        .unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id.unwrap()), "00f067aa0ba902b7");
        assert_eq!(p.sampled, Some(true));
        assert_eq!(
            p.tracestate.as_deref(),
            Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7")
        );
        let unsampled = TP.replace("-01", "-00");
        assert_eq!(parse_traceparent(&unsampled).unwrap().sampled, Some(false));
        // A later version may append fields after a dash.
        assert!(parse_traceparent(&format!("cc{}-what-ever", &TP[2..])).is_some());
    }

    #[test]
    fn refuses_malformed_traceparent() {
        for bad in [
            "",
            "00",
            &TP.to_uppercase(),
            &TP.replace(
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "00000000000000000000000000000000",
            ),
            &TP.replace("00f067aa0ba902b7", "0000000000000000"),
            &TP.replacen("00-", "ff-", 1),
            &format!("{TP}-extra"),
            &TP.replace('-', "_"),
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
            "\u{e9}0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
        // Two traceparents: ignored, and tracestate goes with it.
        assert!(extract(&headers(&[("traceparent", TP), ("traceparent", TP)])).is_none());
        let huge = "k=".to_string() + &"v".repeat(600);
        let p = extract(&headers(&[("traceparent", TP), ("tracestate", &huge)])).unwrap();
        assert_eq!(p.tracestate, None);
        let p = extract(&headers(&[("traceparent", TP), ("tracestate", "garbage")])).unwrap();
        assert_eq!(p.tracestate, None);
    }

    #[test]
    fn reads_b3_single_and_multi() {
        let p = extract(&headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]))
        .unwrap();
        assert_eq!(hex(&p.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
        assert_eq!(hex(&p.span_id.unwrap()), "e457b5a2e4d86bd1");
        assert_eq!(p.sampled, Some(true));
        assert_eq!(p.format, Format::B3Single);

        let p = extract(&headers(&[("b3", "0")])).unwrap();
        assert_eq!((p.sampled, p.span_id), (Some(false), None));

        let p = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-sampled", "0"),
        ]))
        .unwrap();
        assert_eq!(hex(&p.trace_id), "0000000000000000a3ce929d0e0e4736");
        assert_eq!(p.sampled, Some(false));
        assert_eq!(p.format, Format::B3Multi);
        let p = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
            ("x-b3-flags", "1"),
        ]))
        .unwrap();
        assert_eq!(p.sampled, Some(true));

        for bad in [
            "x",
            "1-2",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-7",
            "-",
        ] {
            assert!(parse_b3_single(bad).is_none(), "{bad:?}");
        }
        assert!(extract(&headers(&[
            ("x-b3-traceid", "zz"),
            ("x-b3-spanid", "00f067aa0ba902b7")
        ]))
        .is_none());
        // traceparent wins over B3.
        let p = extract(&headers(&[("traceparent", TP), ("b3", "0")])).unwrap();
        assert_eq!(p.format, Format::W3c);
        assert_eq!(p.also_b3, Some(Format::B3Single));
    }

    #[test]
    fn children_keep_the_trace_and_the_callers_decision() {
        let parent = parse_traceparent(TP).unwrap();
        let ctx = SpanContext::new(Some(parent.clone()), || panic!("the caller decided"));
        assert_eq!(ctx.trace_id, parent.trace_id);
        assert_eq!(ctx.parent_span_id, parent.span_id);
        assert!(ctx.sampled);
        let mut h = headers(&[("traceparent", TP), ("x-b3-sampled", "1"), ("b3", "1")]);
        ctx.inject(&mut h);
        let tp = h.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(
            tp,
            format!("00-{}-{}-01", ctx.trace_id_hex(), ctx.span_id_hex())
        );
        assert!(h.get("b3").is_none() && h.get("x-b3-sampled").is_none());

        let root = SpanContext::new(None, || false);
        assert!(!root.sampled && root.parent_span_id.is_none());

        // A B3 caller gets B3 back, in its own form.
        let b3 = parse_b3_single("80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1").unwrap();
        let ctx = SpanContext::new(Some(b3), || false);
        let mut h = HeaderMap::new();
        ctx.inject(&mut h);
        let v = h.get("b3").unwrap().to_str().unwrap().to_string();
        assert_eq!(
            v,
            format!(
                "80f198ee56343ba864fe8b2a57d3eff7-{}-1-e457b5a2e4d86bd1",
                ctx.span_id_hex()
            )
        );
        let multi = extract(&headers(&[
            ("x-b3-traceid", "a3ce929d0e0e4736"),
            ("x-b3-spanid", "00f067aa0ba902b7"),
        ]))
        .unwrap();
        let ctx = SpanContext::new(Some(multi), || true);
        let mut h = HeaderMap::new();
        ctx.inject(&mut h);
        assert_eq!(h.get("x-b3-parentspanid").unwrap(), "00f067aa0ba902b7");
        assert_eq!(h.get("x-b3-sampled").unwrap(), "1");
        assert!(h.get("traceparent").is_some());
    }
}
