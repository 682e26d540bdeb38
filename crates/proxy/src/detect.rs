//! Protocol detection on a new connection: the HTTP/2 preface, an HTTP/1
//! request line, a peer proxy's opaque-TCP preamble, or else opaque TCP.
//!
//! Detection reads (never peeks) and replays what it read through `Rewind`,
//! so it works on any stream, including tunnels and TLS later on.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// What a peer proxy writes first on an opaque TCP connection, so the
/// inbound side forwards it without waiting for detection to time out.
pub const PEER_TCP_PREAMBLE: &[u8] = b"TRELLIS/TCP 1\r\n";
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
    /// A peer proxy's opaque TCP (the preamble is consumed).
    PeerTcp,
    /// A TLS ClientHello (from a peer proxy: mutual TLS).
    Tls,
    Opaque,
}

enum Verdict {
    Known(Protocol),
    NeedMore,
}

fn classify(buf: &[u8]) -> Verdict {
    // A TLS record of type handshake.
    if buf.first() == Some(&0x16) {
        return Verdict::Known(Protocol::Tls);
    }
    let candidates = std::iter::once(PEER_TCP_PREAMBLE)
        .chain(std::iter::once(H2_PREFACE))
        .chain(METHODS);
    let mut could_be = false;
    for c in candidates {
        if buf.len() >= c.len() {
            if buf.starts_with(c) {
                return Verdict::Known(if c == PEER_TCP_PREAMBLE {
                    Protocol::PeerTcp
                } else if c == H2_PREFACE {
                    Protocol::Http2
                } else {
                    Protocol::Http1
                });
            }
        } else if c.starts_with(buf) {
            could_be = true;
        }
    }
    if could_be {
        Verdict::NeedMore
    } else {
        Verdict::Known(Protocol::Opaque)
    }
}

/// Reads until the protocol is known. A client that sends nothing within
/// `timeout` (server-speaks-first protocols) is opaque TCP.
pub async fn detect<S: AsyncRead + Unpin>(
    mut io: S,
    timeout: Duration,
) -> io::Result<(Protocol, Rewind<S>)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    let protocol = loop {
        match classify(&buf) {
            Verdict::Known(p) => break p,
            Verdict::NeedMore => {}
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Err(_) => break Protocol::Opaque,
            Ok(Ok(0)) => break Protocol::Opaque,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    };
    if protocol == Protocol::PeerTcp {
        buf.advance(PEER_TCP_PREAMBLE.len());
    }
    Ok((
        protocol,
        Rewind {
            prefix: buf,
            inner: io,
        },
    ))
}

/// A stream that first replays bytes already read from it.
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(inner: S) -> Self {
        Rewind {
            prefix: BytesMut::new(),
            inner,
        }
    }

    /// Nothing was read before (detection saw a silent client, or one that
    /// closed at once).
    pub fn replays_nothing(&self) -> bool {
        self.prefix.is_empty()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    async fn run(input: &'static [u8], close: bool) -> (Protocol, Vec<u8>) {
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(input).await.unwrap();
        if close {
            drop(a);
            let (p, mut r) = detect(b, Duration::from_millis(200)).await.unwrap();
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            (p, out)
        } else {
            let (p, mut r) = detect(b, Duration::from_millis(100)).await.unwrap();
            drop(a);
            let mut out = Vec::new();
            r.read_to_end(&mut out).await.unwrap();
            (p, out)
        }
    }

    #[tokio::test]
    async fn detects_and_replays() {
        assert_eq!(
            run(b"GET / HTTP/1.1\r\n\r\n", true).await,
            (Protocol::Http1, b"GET / HTTP/1.1\r\n\r\n".to_vec())
        );
        assert_eq!(run(H2_PREFACE, true).await.0, Protocol::Http2);
        assert_eq!(
            run(b"TRELLIS/TCP 1\r\nhello", true).await,
            (Protocol::PeerTcp, b"hello".to_vec())
        );
        assert_eq!(run(b"\x16\x03\x01", true).await.0, Protocol::Tls);
        assert_eq!(run(b"HELO x", true).await.0, Protocol::Opaque);
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout() {
        let (p, out) = run(b"", false).await;
        assert_eq!((p, out), (Protocol::Opaque, vec![]));
        // A prefix of a method that never completes is opaque too.
        assert_eq!(run(b"GE", false).await.0, Protocol::Opaque);
    }
}
