//! Properties of protocol detection (`trellis_proxy::detect`): whatever
//! bytes arrive, in whatever pieces, detection finishes without a panic and
//! replays exactly what it read; every prefix of a TLS ClientHello, an
//! HTTP/1 request or the HTTP/2 preface is that protocol or (too short to
//! tell) opaque, never another one.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use proptest::prelude::*;
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use trellis_proxy::detect::{detect, Protocol, PEER_TCP_PREAMBLE};

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A stream that yields `chunks` one read at a time, then ends.
struct Chunks(Vec<Vec<u8>>);

impl AsyncRead for Chunks {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let Some(chunk) = self.0.first_mut() else {
            return Poll::Ready(Ok(()));
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            self.0.remove(0);
        }
        Poll::Ready(Ok(()))
    }
}

/// `bytes` cut at `cuts` (positions taken modulo the length).
fn split(bytes: &[u8], cuts: &[usize]) -> Vec<Vec<u8>> {
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|c| c % (bytes.len() + 1))
        .chain([0, bytes.len()])
        .collect();
    at.sort_unstable();
    at.dedup();
    at.windows(2).map(|w| bytes[w[0]..w[1]].to_vec()).collect()
}

/// Detects over `bytes` delivered in the pieces `cuts` make; returns the
/// protocol and everything the stream then yields.
fn run(bytes: &[u8], cuts: &[usize]) -> (Protocol, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        // The stream ends after the bytes, so the timeout never decides.
        let (p, mut rest) = detect(Chunks(split(bytes, cuts)), Duration::from_secs(60))
            .await
            .expect("an in-memory stream does not fail");
        let mut out = Vec::new();
        rest.read_to_end(&mut out).await.unwrap();
        (p, out)
    })
}

/// A TLS 1.2/1.3 ClientHello record header and some handshake bytes.
fn client_hello() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0x01u8, 0x03]),
        prop::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(minor, body)| {
            let mut v = vec![0x16, 0x03, minor];
            v.extend((body.len() as u16 + 4).to_be_bytes());
            v.extend([0x01, 0x00]);
            v.extend((body.len() as u16).to_be_bytes());
            v.extend(body);
            v
        })
}

fn http1_request() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
        ]),
        "/[a-z0-9/._-]{0,30}",
        prop::collection::vec(("[a-z-]{1,12}", "[ -~]{0,20}"), 0..4),
        prop::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(method, path, headers, body)| {
            let mut v = format!("{method} {path} HTTP/1.1\r\nhost: catalog:8080\r\n");
            for (k, val) in headers {
                v.push_str(&format!("{k}: {val}\r\n"));
            }
            v.push_str("\r\n");
            let mut v = v.into_bytes();
            v.extend(body);
            v
        })
}

fn http2_connection() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..64).prop_map(|frames| [H2_PREFACE, &frames].concat())
}

/// How many bytes of a message of `protocol` settle the question.
fn signature_len(protocol: Protocol, message: &[u8]) -> usize {
    match protocol {
        Protocol::Tls => 1,
        Protocol::Http2 => H2_PREFACE.len(),
        // The method and its space.
        Protocol::Http1 => message.iter().position(|&b| b == b' ').unwrap() + 1,
        Protocol::PeerTcp => PEER_TCP_PREAMBLE.len(),
        Protocol::Opaque => 0,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes: no panic, a verdict, and every byte replayed (the
    /// peer preamble, once recognised, is consumed).
    #[test]
    fn any_bytes_are_classified_and_replayed(
        bytes in prop::collection::vec(any::<u8>(), 0..128),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let (protocol, replayed) = run(&bytes, &cuts);
        let expected = if protocol == Protocol::PeerTcp {
            &bytes[PEER_TCP_PREAMBLE.len()..]
        } else {
            &bytes[..]
        };
        prop_assert_eq!(replayed, expected);
        // However the bytes were cut, the verdict is the same.
        prop_assert_eq!(run(&bytes, &[]).0, protocol);
    }

    /// Every prefix of a real message is its protocol once long enough to
    /// tell, and opaque (the peer closed) before: never another protocol.
    #[test]
    fn prefixes_of_real_messages_classify_consistently(
        (protocol, message) in prop_oneof![
            client_hello().prop_map(|m| (Protocol::Tls, m)),
            http1_request().prop_map(|m| (Protocol::Http1, m)),
            http2_connection().prop_map(|m| (Protocol::Http2, m)),
            prop::collection::vec(any::<u8>(), 0..32)
                .prop_map(|b| (Protocol::PeerTcp, [PEER_TCP_PREAMBLE, &b].concat())),
        ],
        len in any::<prop::sample::Index>(),
        cuts in prop::collection::vec(any::<usize>(), 0..6),
    ) {
        let prefix = &message[..len.index(message.len() + 1)];
        let (got, replayed) = run(prefix, &cuts);
        if prefix.len() >= signature_len(protocol, &message) {
            prop_assert_eq!(got, protocol);
        } else {
            prop_assert_eq!(got, Protocol::Opaque, "{:?}", String::from_utf8_lossy(prefix));
            prop_assert_eq!(replayed, prefix);
        }
    }
}
