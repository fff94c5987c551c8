//! The audit log (DESIGN.md §7): one JSON object per line, to a file or stdout. Events:
//! `connect`, `auth_ok`, `auth_fail`, `route`, `guard_refusal`, `quota_refusal`, `pin`,
//! `admin_command`, `disconnect` (with the session's counters). Each carries the time, the
//! session id, the client address and, once known, the tenant and user. Never a password,
//! never query text or parameters (a refusal carries its SQLSTATE and, for the guard's 42501,
//! the construct it names).
//!
//! Sessions hand lines to a writer task through a bounded queue and never wait for the disk:
//! when the queue is full the line is dropped and counted (reported in the log). The file is
//! reopened on SIGHUP, for rotation.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// Lines queued before new ones are dropped.
const QUEUE: usize = 16 * 1024;

enum Command {
    Line(String),
    Reopen,
}

/// Where audit lines go; cheap to clone. Disabled (every call a no-op) without `[audit]`.
#[derive(Clone, Default)]
pub struct Audit {
    tx: Option<mpsc::Sender<Command>>,
    dropped: Arc<AtomicU64>,
}

/// Who an event is about.
#[derive(Clone, Debug, Default)]
pub struct Who {
    pub session: u64,
    pub peer: Option<SocketAddr>,
    pub tenant: Option<String>,
    pub user: Option<String>,
}

impl Audit {
    /// An audit log writing to `path` (`"-"`: stdout), with its writer task.
    pub async fn open(path: PathBuf) -> std::io::Result<Audit> {
        let mut out = Output::open(&path).await?;
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let dropped = Arc::new(AtomicU64::new(0));
        let seen_dropped = Arc::clone(&dropped);
        tokio::spawn(async move {
            let mut reported = 0;
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                // Write what is queued in one go.
                while let Some(cmd) = next.take() {
                    match cmd {
                        Command::Line(line) => out.write(line.as_bytes()).await,
                        Command::Reopen => match Output::open(&path).await {
                            Ok(o) => {
                                out.flush().await;
                                out = o;
                            }
                            Err(e) => {
                                tracing::error!(error = %e, path = %path.display(), "audit log: cannot reopen; still writing to the old file")
                            }
                        },
                    }
                    next = rx.try_recv().ok();
                }
                out.flush().await;
                let d = seen_dropped.load(Ordering::Relaxed);
                if d > reported {
                    tracing::warn!(
                        dropped = d - reported,
                        "audit log: lines dropped (queue full)"
                    );
                    reported = d;
                }
            }
        });
        Ok(Audit {
            tx: Some(tx),
            dropped,
        })
    }

    /// Whether events are written.
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Reopens the file (after rotation).
    pub fn reopen(&self) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Command::Reopen);
        }
    }

    /// Writes event `kind` about `who` with extra `fields` (values are JSON already: use
    /// [`str_value`] for strings).
    pub fn event(&self, kind: &str, who: &Who, fields: &[(&str, String)]) {
        let Some(tx) = &self.tx else { return };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut line = format!(
            "{{\"time\":\"{}\",\"event\":{},\"session\":{}",
            rfc3339(now.as_secs(), now.subsec_millis()),
            json_string(kind),
            who.session
        );
        if let Some(peer) = who.peer {
            let _ = write!(line, ",\"client\":{}", json_string(&peer.to_string()));
        }
        if let Some(t) = &who.tenant {
            let _ = write!(line, ",\"tenant\":{}", json_string(t));
        }
        if let Some(u) = &who.user {
            let _ = write!(line, ",\"user\":{}", json_string(u));
        }
        for (k, v) in fields {
            let _ = write!(line, ",{}:{v}", json_string(k));
        }
        line.push_str("}\n");
        if tx.try_send(Command::Line(line)).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A JSON string value for [`Audit::event`].
pub fn str_value(s: &str) -> String {
    json_string(s)
}

/// UTC time as `2026-11-30T13:50:00.123Z` (civil-from-days, proleptic Gregorian).
fn rfc3339(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

enum Output {
    Stdout(tokio::io::Stdout),
    File(tokio::io::BufWriter<tokio::fs::File>),
}

impl Output {
    async fn open(path: &std::path::Path) -> std::io::Result<Output> {
        if path.as_os_str() == "-" {
            return Ok(Output::Stdout(tokio::io::stdout()));
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await?;
        Ok(Output::File(tokio::io::BufWriter::new(file)))
    }

    async fn write(&mut self, bytes: &[u8]) {
        let r = match self {
            Output::Stdout(s) => s.write_all(bytes).await,
            Output::File(f) => f.write_all(bytes).await,
        };
        if let Err(e) = r {
            tracing::error!(error = %e, "audit log: write failed");
        }
    }

    async fn flush(&mut self) {
        let _ = match self {
            Output::Stdout(s) => s.flush().await,
            Output::File(f) => f.flush().await,
        };
    }
}

/// A JSON string literal (serde_json's escaping: quotes, backslashes, control characters).
pub(crate) fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_046_600, 123), "2026-11-30T13:50:00.123Z");
        assert_eq!(rfc3339(951_782_400, 5), "2000-02-29T00:00:00.005Z");
    }
}
