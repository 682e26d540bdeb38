//! JSON access logs, one line per request, to stdout or a file.
//!
//! The request path hands an entry to a bounded queue (`try_send`); one
//! writer thread formats and writes, so a slow disk never blocks a request:
//! a full queue drops the entry and counts it. Entries are completed when
//! the response body ends, so sizes and durations cover the whole answer.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::BodyExt;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use crate::http::BoxError;
use crate::telemetry::Settings;
use crate::Body;

/// Entries waiting for the writer; past this they are dropped.
pub const QUEUE: usize = 4096;

/// Where lines go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    File(PathBuf),
}

/// One line of the access log.
#[derive(Clone, Debug, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Entry {
    /// RFC 3339, UTC, when the request arrived.
    pub time: String,
    pub trace_id: String,
    pub span_id: String,
    pub direction: &'static str,
    pub source_identity: String,
    pub source_namespace: String,
    pub source_workload: String,
    pub destination_identity: String,
    pub destination_namespace: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub protocol: &'static str,
    pub route: String,
    pub status: u16,
    /// From the request to the last byte of the response.
    pub duration_ms: f64,
    /// Request body bytes, from its Content-Length.
    pub bytes_received: u64,
    /// Response body bytes sent.
    pub bytes_sent: u64,
    /// Envoy-style flags: `UF` upstream connect failure, `UT` upstream
    /// timeout, `UH` no healthy endpoint, `NR` no service or route, `DC`
    /// downstream closed before the end of the response; `-` for none.
    pub response_flags: String,
    pub tls: bool,
}

#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Entry>,
    dropped: Counter,
}

impl AccessLog {
    /// Starts the writer thread; it ends when every `AccessLog` is dropped.
    pub fn start(settings: Arc<ArcSwap<Settings>>, dropped: Counter) -> AccessLog {
        let (tx, rx) = sync_channel(QUEUE);
        let spawned = std::thread::Builder::new()
            .name("trellis-access-log".into())
            .spawn(move || write_loop(rx, settings));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start the access log writer; access logs are off");
        }
        AccessLog { tx, dropped }
    }

    pub fn submit(&self, entry: Entry) {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(entry)
        {
            self.dropped.inc();
        }
    }

    /// Wraps a response body so that the entry is logged when it ends.
    pub fn wrap(&self, body: Body, entry: Entry, started: Instant) -> Body {
        LoggedBody {
            inner: body,
            entry: Some(Box::new(entry)),
            sent: 0,
            started,
            log: self.clone(),
        }
        .boxed_unsync()
    }
}

struct LoggedBody {
    inner: Body,
    entry: Option<Box<Entry>>,
    sent: u64,
    started: Instant,
    log: AccessLog,
}

impl LoggedBody {
    fn finish(&mut self, closed_early: bool) {
        if let Some(mut e) = self.entry.take() {
            e.bytes_sent = self.sent;
            e.duration_ms = self.started.elapsed().as_secs_f64() * 1000.0;
            if closed_early {
                e.response_flags = match e.response_flags.as_str() {
                    "-" | "" => "DC".into(),
                    f => format!("{f},DC"),
                };
            }
            self.log.submit(*e);
        }
    }
}

impl http_body::Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    self.sent += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(false);
                }
            }
            Poll::Ready(None) => self.finish(false),
            Poll::Ready(Some(Err(_))) => self.finish(true),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        let early = !self.inner.is_end_stream();
        self.finish(early);
    }
}

fn write_loop(rx: Receiver<Entry>, settings: Arc<ArcSwap<Settings>>) {
    let mut current: Option<(Destination, Box<dyn Write>)> = None;
    let mut failed_for: Option<Destination> = None;
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(entry) = next {
            let Some(dest) = settings.load().access_log.clone() else {
                current = None;
                next = rx.try_recv().ok();
                continue;
            };
            if current.as_ref().is_none_or(|(d, _)| *d != dest) {
                current = open(&dest)
                    .map(|w| (dest.clone(), w))
                    .map_err(|e| {
                        if failed_for.as_ref() != Some(&dest) {
                            tracing::warn!(destination = ?dest, error = %e, "cannot open the access log; dropping lines");
                            failed_for = Some(dest.clone());
                        }
                    })
                    .ok();
            }
            if let Some((_, w)) = current.as_mut() {
                let mut line = serde_json::to_vec(&entry).unwrap_or_default();
                line.push(b'\n');
                if w.write_all(&line).is_err() {
                    current = None;
                }
            }
            next = rx.try_recv().ok();
        }
        if let Some((_, w)) = current.as_mut() {
            let _ = w.flush();
        }
    }
}

fn open(dest: &Destination) -> std::io::Result<Box<dyn Write>> {
    Ok(match dest {
        Destination::Stdout => Box::new(BufWriter::new(std::io::stdout())),
        Destination::File(path) => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            // O_APPEND: proxies sharing one file never interleave within a
            // line, since each line is one write.
            let f: File = OpenOptions::new().create(true).append(true).open(path)?;
            Box::new(LineWriter(f))
        }
    })
}

/// Writes each line with one `write` call (no buffering across lines), so
/// several processes can append to one file.
struct LineWriter(File);

impl Write for LineWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write_all(buf).map(|()| buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2024-05-01T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn formats_time() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_564_800_123);
        assert_eq!(rfc3339(t), "2024-05-01T12:00:00.123Z");
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
