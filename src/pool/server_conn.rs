//! One connection to a PostgreSQL server: its stream and read buffer, the parameters the server
//! reported, its cancel key, the tenant it is bound to, and the protocol state seen so far.
//!
//! Besides the byte stream the session forwards, pgtenant runs its own short exchanges here:
//! binding the tenant context, resetting before reuse (`DISCARD ALL`, PostgreSQL docs
//! "DISCARD"), and recovering a connection whose client left mid-request.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::cache::PooledState;
use crate::cancel::CancelTarget;
use crate::error::{ClientError, ErrorKind, Reportable, sqlstate};
use crate::net::stream::ServerStream;
use crate::protocol::frame::{FrameError, FrameScanner, Piece, TagSet};
use crate::protocol::server_msgs::{self, ErrorFields};
use crate::protocol::tracker::ConnTracker;
use crate::protocol::{TxStatus, encode, tag};
use crate::tenant::TenantId;

/// Server messages the proxy reads whole while forwarding; the rest streams through.
pub const SERVER_WHOLE: TagSet = TagSet::of(&[
    tag::READY_FOR_QUERY,
    tag::PARAMETER_STATUS,
    tag::BACKEND_KEY_DATA,
    tag::AUTHENTICATION,
    tag::ERROR_RESPONSE,
    tag::NOTIFICATION_RESPONSE,
    tag::PARSE_COMPLETE,
    tag::CLOSE_COMPLETE,
]);
/// Largest server message read whole (ParameterStatus, errors and notifications are small).
const MAX_SERVER_WHOLE: usize = 1 << 20;
/// Every message whole: used only during startup, when messages are small.
const ALL_WHOLE: TagSet = {
    let mut all = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        all[i] = i as u8;
        i += 1;
    }
    TagSet::of(&all)
};

/// A failure on a server connection.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS: {0}")]
    Tls(String),
    #[error("authentication: {0}")]
    Auth(String),
    #[error("server error {}: {}", .0.code, .0.message)]
    Server(ErrorFields),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("server closed the connection")]
    Closed,
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("timed out")]
    Timeout,
}

impl From<FrameError> for ServerError {
    fn from(e: FrameError) -> Self {
        ServerError::Protocol(e.to_string())
    }
}

impl Reportable for ServerError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::ServerUnavailable
    }

    fn client_error(&self) -> Option<ClientError> {
        let (code, message) = match self {
            ServerError::Connect { .. } | ServerError::Timeout => (
                sqlstate::UNABLE_TO_CONNECT,
                "could not connect to the tenant's database",
            ),
            ServerError::Auth(_) | ServerError::Tls(_) => (
                sqlstate::UNABLE_TO_CONNECT,
                "pgtenant could not log in to the tenant's database",
            ),
            _ => (
                sqlstate::CONNECTION_FAILURE,
                "the connection to the tenant's database was lost",
            ),
        };
        Some(
            ClientError::fatal(code, message)
                .with_hint("try again; if it persists, tell the operator"),
        )
    }
}

/// A live server connection.
pub struct ServerConn {
    pub(crate) stream: ServerStream,
    /// Bytes read from the server and not yet handled.
    pub(crate) rbuf: BytesMut,
    /// Where the server→client byte stream stands (it may stop inside a message).
    pub(crate) scanner: FrameScanner,
    pub(crate) tracker: ConnTracker,
    /// ParameterStatus values, as the server last reported them.
    pub params: BTreeMap<String, String>,
    pub(crate) cancel: Arc<CancelTarget>,
    /// The tenant whose context is bound, if any.
    pub bound: Option<TenantId>,
    /// Transaction-pooling state: prepared statements, whose settings are applied.
    pub pooled: PooledState,
    pub(crate) idle_since: Instant,
    /// The shard's health generation when it was opened (see `pool::health`).
    pub(crate) generation: u64,
}

/// How often a connection being retired has its statement cancelled again.
pub(crate) const RETIRE_CANCEL_EVERY: Duration = Duration::from_secs(2);

/// The text columns of a DataRow body.
fn data_row(body: &[u8]) -> Result<Vec<Option<String>>, ServerError> {
    let bad = || ServerError::Protocol("malformed DataRow".into());
    let (count, mut rest) = body.split_first_chunk::<2>().ok_or_else(bad)?;
    let mut row = Vec::new();
    for _ in 0..u16::from_be_bytes(*count) {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            row.push(None);
            rest = tail;
            continue;
        }
        let value = tail.get(..len as usize).ok_or_else(bad)?;
        row.push(Some(String::from_utf8_lossy(value).into_owned()));
        rest = &tail[len as usize..];
    }
    Ok(row)
}

impl ServerConn {
    pub(crate) fn new(stream: ServerStream, cancel: Arc<CancelTarget>) -> Self {
        let now = Instant::now();
        ServerConn {
            stream,
            rbuf: BytesMut::with_capacity(16 * 1024),
            scanner: FrameScanner::new(ALL_WHOLE, MAX_SERVER_WHOLE),
            tracker: ConnTracker::default(),
            params: BTreeMap::new(),
            cancel,
            bound: None,
            pooled: PooledState::default(),
            idle_since: now,
            generation: 0,
        }
    }

    /// Switches the scanner to forwarding mode once startup is over.
    pub(crate) fn startup_done(&mut self) {
        self.scanner = FrameScanner::new(SERVER_WHOLE, MAX_SERVER_WHOLE);
    }

    /// The cancel target for what this connection runs.
    pub fn cancel_target(&self) -> Arc<CancelTarget> {
        Arc::clone(&self.cancel)
    }

    /// The protocol state seen so far.
    pub fn tracker(&self) -> &ConnTracker {
        &self.tracker
    }

    /// Mutable access for the forwarding loop.
    pub fn parts(
        &mut self,
    ) -> (
        &mut ServerStream,
        &mut BytesMut,
        &mut FrameScanner,
        &mut ConnTracker,
    ) {
        (
            &mut self.stream,
            &mut self.rbuf,
            &mut self.scanner,
            &mut self.tracker,
        )
    }

    async fn fill(&mut self) -> Result<(), ServerError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(16 * 1024);
        }
        match self.stream.read_buf(&mut self.rbuf).await? {
            0 => Err(ServerError::Closed),
            _ => Ok(()),
        }
    }

    /// Reads one whole message (startup only, where every message is read whole).
    pub(crate) async fn read_message(&mut self) -> Result<(u8, Bytes), ServerError> {
        loop {
            if let Some(Piece::Whole { tag, len }) = self.scanner.next(&self.rbuf)? {
                let msg = self.rbuf.split_to(len).freeze();
                return Ok((tag, msg.slice(5..)));
            }
            self.fill().await?;
        }
    }

    pub(crate) async fn send(&mut self, bytes: &[u8]) -> Result<(), ServerError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    /// Reads until every owed ReadyForQuery has arrived, skipping result rows without
    /// buffering them and recording ParameterStatus. Returns the first error the server
    /// reported, if any.
    pub(crate) async fn drain(&mut self) -> Result<Option<ErrorFields>, ServerError> {
        let mut first_error = None;
        while self.tracker.pending() > 0 {
            let piece = self.scanner.next(&self.rbuf)?;
            match piece {
                None => self.fill().await?,
                Some(Piece::Pass { tag, len, .. }) => {
                    self.rbuf.advance(len);
                    if let Some(t) = tag {
                        self.tracker.server_message(t, None);
                    }
                }
                Some(Piece::Whole { tag: t, len }) => {
                    let msg = self.rbuf.split_to(len);
                    let body = &msg[5..];
                    match t {
                        tag::READY_FOR_QUERY => {
                            let status = server_msgs::ready_for_query(body)
                                .map_err(|e| ServerError::Protocol(e.to_string()))?;
                            self.tracker.server_message(t, Some(status));
                        }
                        tag::PARAMETER_STATUS => {
                            if let Ok((k, v)) = server_msgs::parameter_status(body) {
                                self.params.insert(k.to_owned(), v.to_owned());
                            }
                        }
                        tag::ERROR_RESPONSE => {
                            if first_error.is_none() {
                                first_error =
                                    Some(server_msgs::error_fields(body).unwrap_or_default());
                            }
                            self.tracker.server_message(t, None);
                        }
                        other => {
                            self.tracker.server_message(other, None);
                        }
                    }
                }
            }
        }
        Ok(first_error)
    }

    /// Runs one simple-query string of the proxy's own and waits for its ReadyForQuery.
    pub async fn run_own(&mut self, sql: &str) -> Result<(), ServerError> {
        // A simple Query drops the unnamed prepared statement.
        self.pooled.unnamed = None;
        let mut out = BytesMut::new();
        encode::raw(tag::QUERY, format!("{sql}\0").as_bytes(), &mut out);
        self.tracker.client_message(tag::QUERY);
        self.send(&out).await?;
        match self.drain().await? {
            Some(fields) => Err(ServerError::Server(fields)),
            None => Ok(()),
        }
    }

    /// Runs pgtenant's own constant `sql` (if any) and then `set_config` of `pairs`, every
    /// name and value a Bind parameter, pipelined; waits for both. Errors mean "close it".
    pub async fn run_setup(
        &mut self,
        sql: Option<&str>,
        pairs: &[(&str, &str)],
    ) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        if let Some(sql) = sql {
            encode::raw(tag::QUERY, format!("{sql}\0").as_bytes(), &mut out);
            self.tracker.client_message(tag::QUERY);
        }
        let tags = encode::set_configs(pairs, &mut out);
        if !pairs.is_empty() && tags.is_empty() {
            return Err(ServerError::Protocol(
                "a setting could not be encoded".into(),
            ));
        }
        for &t in tags {
            self.tracker.client_message(t);
        }
        if out.is_empty() {
            return Ok(());
        }
        self.send(&out).await?;
        match self.drain().await? {
            Some(fields) => Err(ServerError::Server(fields)),
            None => Ok(()),
        }
    }

    /// The backend's process id (from BackendKeyData).
    pub fn backend_pid(&self) -> i32 {
        self.cancel.pid
    }

    /// Runs one simple query of the proxy's own and returns its rows as text (for inspection
    /// commands; results are read whole, so keep them small).
    pub async fn query_rows(&mut self, sql: &str) -> Result<Vec<Vec<Option<String>>>, ServerError> {
        let mut out = BytesMut::new();
        encode::raw(tag::QUERY, format!("{sql}\0").as_bytes(), &mut out);
        self.send(&out).await?;
        let mut rows = Vec::new();
        let mut error = None;
        let mut inspect = FrameScanner::new(ALL_WHOLE, MAX_SERVER_WHOLE);
        std::mem::swap(&mut inspect, &mut self.scanner);
        let result = loop {
            let (t, body) = match self.read_message().await {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            match t {
                tag::DATA_ROW => rows.push(data_row(&body)?),
                tag::ERROR_RESPONSE => {
                    error = Some(server_msgs::error_fields(&body).unwrap_or_default());
                }
                tag::READY_FOR_QUERY => break Ok(()),
                _ => {}
            }
        };
        std::mem::swap(&mut inspect, &mut self.scanner);
        result?;
        match error {
            Some(fields) => Err(ServerError::Server(fields)),
            None => Ok(rows),
        }
    }

    /// Brings a connection whose client left mid-request back to idle: ends COPY, syncs,
    /// cancels what still runs, drains, and rolls back. Errors mean "close it".
    pub async fn recover(&mut self, patience: Duration) -> Result<(), ServerError> {
        let mut out = BytesMut::new();
        if self.tracker.copy_in() {
            encode::raw(tag::COPY_FAIL, b"client disconnected\0", &mut out);
            self.tracker.client_message(tag::COPY_FAIL);
        }
        if self.tracker.unsynced() {
            encode::raw(tag::SYNC, b"", &mut out);
            self.tracker.client_message(tag::SYNC);
        }
        if !out.is_empty() {
            self.send(&out).await?;
        }
        if self.tracker.pending() > 0 {
            // Give a nearly finished request a moment before cancelling it.
            if crate::timers::timeout(Duration::from_millis(100), self.drain())
                .await
                .is_err()
            {
                self.cancel.begin().send(patience).await?;
                crate::timers::timeout(patience, self.drain())
                    .await
                    .map_err(|_| ServerError::Timeout)??;
            }
        }
        if self.tracker.status() != TxStatus::Idle {
            crate::timers::timeout(patience, self.run_own("ROLLBACK"))
                .await
                .map_err(|_| ServerError::Timeout)??;
        }
        Ok(())
    }

    /// Returns the session to its just-connected state (settings, prepared statements,
    /// cursors, temporary tables, LISTEN registrations, advisory locks) and unbinds it.
    pub async fn reset(&mut self, patience: Duration) -> Result<(), ServerError> {
        self.bound = None;
        self.pooled = PooledState::default();
        crate::timers::timeout(patience, self.run_own(crate::own_sql::RESET))
            .await
            .map_err(|_| ServerError::Timeout)?
    }

    /// Closes the connection in a way that leaves no backend behind, and returns once the
    /// backend is gone (its end of the socket closed) or `patience` ran out (`false`). What
    /// still runs is cancelled (again every [`RETIRE_CANCEL_EVERY`] while it lasts); the
    /// server is asked to Terminate and its input is closed, so the backend exits as soon as
    /// the statement ends rather than when it next writes.
    /// `whole_messages` is false when pgtenant stopped writing in the middle of a message:
    /// then no Terminate can follow, and closing the input ends the backend's read.
    pub async fn close_and_wait(&mut self, whole_messages: bool, patience: Duration) -> bool {
        let mut out = BytesMut::new();
        if whole_messages {
            encode::raw(tag::TERMINATE, b"", &mut out);
        }
        let busy = !self.tracker.is_idle();
        let finished = async {
            if !out.is_empty() {
                let _ = self.stream.write_all(&out).await;
            }
            let _ = self.stream.shutdown().await;
            let mut sink = vec![0u8; 8192];
            loop {
                match crate::timers::timeout(RETIRE_CANCEL_EVERY, self.stream.read(&mut sink)).await
                {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(_)) => {}
                    Err(_) => {
                        // Still running: cancel it (again).
                        let _ = self.cancel.begin().send(RETIRE_CANCEL_EVERY).await;
                    }
                }
            }
        };
        if busy {
            let _ = self.cancel.begin().send(RETIRE_CANCEL_EVERY).await;
        }
        crate::timers::timeout(patience, finished).await.is_ok()
    }

    /// Whether the server has closed the connection or sent something unsolicited while idle.
    pub fn looks_closed(&mut self) -> bool {
        let mut probe = [0u8; 1];
        if let crate::net::stream::MaybeTls::Plain(tcp) = &self.stream {
            // Answered from the readiness tokio caches, with no waker stored (a mutex in
            // tokio's I/O registration); the read happens only when that says readable.
            return !matches!(
                tcp.try_read(&mut probe),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
            );
        }
        let mut buf = tokio::io::ReadBuf::new(&mut probe);
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        // Ready means EOF, an error, or bytes while idle (e.g. a FATAL before the server
        // exits): none of them leaves a usable connection.
        std::pin::Pin::new(&mut self.stream)
            .poll_read(&mut cx, &mut buf)
            .is_ready()
    }
}
