//! Opaque TCP: carrying bytes both ways between two connections until
//! either ends, or until nothing has moved for the idle timeout
//! (`--tcp-idle-timeout`), so a silent tunnel does not hold two
//! descriptors forever.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a splice ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Either side closed (or failed): bytes sent from `a` to `b` and back.
    Closed(u64, u64),
    /// Nothing moved for the idle timeout.
    Idle,
}

/// Copies `a` to `b` and `b` to `a`. Activity is checked once per `idle`,
/// so a silent splice ends between one and two idle periods after its
/// last byte; a busy one pays one atomic add per read.
pub async fn splice<A, B>(a: &mut A, b: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let moved = AtomicU64::new(0);
    let mut a = Counting {
        io: a,
        moved: &moved,
    };
    let mut b = Counting {
        io: b,
        moved: &moved,
    };
    let copy = tokio::io::copy_bidirectional(&mut a, &mut b);
    tokio::pin!(copy);
    let mut seen = 0;
    loop {
        tokio::select! {
            r = &mut copy => {
                let (to_b, to_a) = r.unwrap_or((0, 0));
                return Ended::Closed(to_b, to_a);
            }
            _ = tokio::time::sleep(idle) => {
                let now = moved.load(Ordering::Relaxed);
                if now == seen {
                    return Ended::Idle;
                }
                seen = now;
            }
        }
    }
}

struct Counting<'a, S: ?Sized> {
    io: &'a mut S,
    moved: &'a AtomicU64,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counting<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            self.moved.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counting<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_silent_splice_ends_and_a_busy_one_goes_on() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let idle = Duration::from_secs(10);
        let task = tokio::spawn(async move { splice(&mut a, &mut b, idle).await });
        // A byte every 6 s keeps it going past several idle periods.
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(6)).await;
            client.write_all(b"x").await.unwrap();
            let mut got = [0u8; 1];
            server.read_exact(&mut got).await.unwrap();
        }
        assert!(!task.is_finished(), "a busy splice ended");
        // Then silence: it ends within two idle periods.
        tokio::time::sleep(idle * 2).await;
        assert_eq!(task.await.unwrap(), Ended::Idle);
    }

    #[tokio::test]
    async fn a_closed_side_ends_it_with_the_bytes_carried() {
        let (mut client, mut a) = tokio::io::duplex(64);
        let (mut b, mut server) = tokio::io::duplex(64);
        let task =
            tokio::spawn(async move { splice(&mut a, &mut b, Duration::from_secs(60)).await });
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        server.write_all(b"hi").await.unwrap();
        client.read_exact(&mut got[..2]).await.unwrap();
        drop(client);
        drop(server);
        assert_eq!(task.await.unwrap(), Ended::Closed(5, 2));
    }
}
