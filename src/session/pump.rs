//! The byte pump between a client and its server connection: one task, both directions,
//! bounded buffers.
//!
//! Each direction reads only while the bytes queued for the other side stay under
//! [`HIGH_WATER`], so a peer that stops reading stops the flow instead of growing memory.
//! Reads and writes are polled together (never a blocking write while the other direction
//! waits), which avoids the deadlock of a server blocked on sending results while the proxy
//! is blocked on sending it more input. All state lives in [`Pump`], so the future may be
//! dropped (shutdown, timers) and resumed without losing bytes.

use std::collections::BTreeMap;
use std::future::{Future as _, poll_fn};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

use super::relay::{ClientStep, Relay, ServerProtocolError};
use crate::net::stream::{ReadArm, ReadHint};
use crate::pool::cache::PooledState;
use crate::protocol::frame::{FrameError, FrameScanner};
use crate::protocol::tracker::ConnTracker;

/// Bytes queued towards one side before the other side is no longer read.
pub const HIGH_WATER: usize = 256 * 1024;
const READ_CHUNK: usize = 64 * 1024;

/// Why the pump stopped.
#[derive(Debug, thiserror::Error)]
pub enum PumpEnd {
    /// The client sent Terminate.
    #[error("the client sent Terminate")]
    Terminated,
    /// The client closed its connection (or it failed).
    #[error("the client closed its connection{}", io_detail(.0))]
    ClientGone(Option<io::Error>),
    /// The client broke the framing.
    #[error("the client broke the protocol: {0}")]
    ClientProtocol(FrameError),
    /// The server closed its connection (or it failed).
    #[error("the server closed its connection{}", io_detail(.0))]
    ServerGone(Option<io::Error>),
    /// The server sent something malformed.
    #[error("the server broke the protocol: {0}")]
    ServerProtocol(ServerProtocolError),
    /// Transaction pooling: the transaction is over and the server connection may go back
    /// to its pool.
    #[error("the transaction is over")]
    Released,
    /// The client took none of the bytes pgtenant had for it for the client write timeout.
    #[error("the client took nothing of its results for {}", crate::config::format_duration(*.0))]
    ClientStalled(std::time::Duration),
    /// Transaction pooling: the client's transaction ended with a LISTEN and it keeps its
    /// server connection (pinned): its ReadyForQuery waits until the hub listens too.
    #[error("the client listens")]
    Listening,
}

fn io_detail(e: &Option<io::Error>) -> String {
    e.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
}

/// The server connection's parts the pump drives.
pub struct ServerSide<'a, S> {
    pub stream: &'a mut S,
    pub rbuf: &'a mut BytesMut,
    pub scanner: &'a mut FrameScanner,
    pub tracker: &'a mut ConnTracker,
    pub params: &'a mut BTreeMap<String, String>,
    pub pooled: &'a mut PooledState,
}

impl<'a> ServerSide<'a, crate::net::stream::ServerStream> {
    /// The parts of `conn` the pump drives.
    pub fn of(conn: &'a mut crate::pool::ServerConn) -> Self {
        Self::with_cancel(conn).0
    }

    /// [`ServerSide::of`], and the connection's cancel target beside it (borrowed: a
    /// transaction clones it only when it must cancel).
    pub fn with_cancel(
        conn: &'a mut crate::pool::ServerConn,
    ) -> (Self, &'a std::sync::Arc<crate::cancel::CancelTarget>) {
        let side = ServerSide {
            stream: &mut conn.stream,
            rbuf: &mut conn.rbuf,
            scanner: &mut conn.scanner,
            tracker: &mut conn.tracker,
            params: &mut conn.params,
            pooled: &mut conn.pooled,
        };
        (side, &conn.cancel)
    }
}

/// Buffers that outlive one `run` call.
#[derive(Default)]
pub struct Pump {
    client_in: BytesMut,
    to_server: BytesMut,
    to_client: BytesMut,
    flush_client: bool,
    flush_server: bool,
    /// How long the client may take nothing while bytes wait for it (`None`: forever).
    write_timeout: Option<std::time::Duration>,
    /// Armed when a write to the client could not proceed; disarmed by any progress.
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    stalled: bool,
    /// Bytes read from and written to the client since [`Pump::take_byte_counts`], and
    /// before.
    bytes_from_client: u64,
    bytes_to_client: u64,
    bytes_taken: (u64, u64),
    /// Every read of the client is noted here (only the pump reads it after the handshake):
    /// a read that would only register the same waker again is skipped.
    client_arm: ReadArm,
}

mod spare;

fn reserve(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_CHUNK / 4 {
        buf.reserve(READ_CHUNK);
    }
}

/// Writes as much of `buf` as `w` takes now. `Err` ends the pump; `Ok(true)` means progress.
/// Nothing to write and nothing to flush (most calls) is answered inline, without a call.
#[inline(always)]
fn poll_drain<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
    flush: &mut bool,
) -> Result<bool, Option<io::Error>> {
    if buf.is_empty() && !*flush {
        return Ok(false);
    }
    poll_write_out(cx, w, buf, flush)
}

/// [`poll_drain`] with something to write or flush.
fn poll_write_out<W: AsyncWrite + Unpin>(
    cx: &mut Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
    flush: &mut bool,
) -> Result<bool, Option<io::Error>> {
    let mut progress = false;
    while !buf.is_empty() {
        match Pin::new(&mut *w).poll_write(cx, buf) {
            Poll::Ready(Ok(0)) => return Err(None),
            Poll::Ready(Ok(n)) => {
                buf.advance(n);
                *flush = true;
                progress = true;
            }
            Poll::Ready(Err(e)) => return Err(Some(e)),
            Poll::Pending => return Ok(progress),
        }
    }
    if *flush {
        match Pin::new(&mut *w).poll_flush(cx) {
            Poll::Ready(Ok(())) => *flush = false,
            Poll::Ready(Err(e)) => return Err(Some(e)),
            Poll::Pending => {}
        }
    }
    Ok(progress)
}

impl Pump {
    /// A pump that ends with [`PumpEnd::ClientStalled`] when the client takes nothing for
    /// `timeout` while bytes wait for it (zero: never).
    pub fn with_write_timeout(timeout: std::time::Duration) -> Self {
        Pump {
            write_timeout: (!timeout.is_zero()).then_some(timeout),
            ..Pump::default()
        }
    }

    /// Called after a write attempt to the client: `Ready` when the client has taken
    /// nothing for the write timeout. The timer is created on the first stall only.
    fn poll_stall(&mut self, cx: &mut Context<'_>, progress: bool) -> Poll<std::time::Duration> {
        let Some(limit) = self.write_timeout else {
            return Poll::Pending;
        };
        if progress || self.to_client.is_empty() {
            self.stalled = false;
            return Poll::Pending;
        }
        if !self.stalled {
            self.stalled = true;
            let deadline = tokio::time::Instant::now() + limit;
            match &mut self.stall {
                Some(sleep) => sleep.as_mut().reset(deadline),
                None => self.stall = Some(Box::pin(crate::timers::sleep_until(deadline))),
            }
        }
        match &mut self.stall {
            Some(sleep) => sleep.as_mut().poll(cx).map(|()| limit),
            None => Poll::Pending,
        }
    }

    /// Bytes waiting to be written to the client.
    /// Bytes read from and written to the client since the last call.
    pub fn take_byte_counts(&mut self) -> (u64, u64) {
        let taken = (
            std::mem::take(&mut self.bytes_from_client),
            std::mem::take(&mut self.bytes_to_client),
        );
        self.bytes_taken.0 += taken.0;
        self.bytes_taken.1 += taken.1;
        taken
    }

    /// Bytes read from and written to the client over the whole session.
    pub fn byte_totals(&self) -> (u64, u64) {
        (
            self.bytes_taken.0 + self.bytes_from_client,
            self.bytes_taken.1 + self.bytes_to_client,
        )
    }

    pub fn pending_to_client(&self) -> &[u8] {
        &self.to_client
    }

    /// Bytes waiting to be written to the server.
    pub fn take_to_server(&mut self) -> BytesMut {
        std::mem::take(&mut self.to_server)
    }

    /// Takes the bytes waiting for the client.
    pub fn take_to_client(&mut self) -> BytesMut {
        std::mem::take(&mut self.to_client)
    }

    /// The client's bytes read and not yet handled (between transactions: the start of the
    /// next one).
    pub fn pending_client(&self) -> &[u8] {
        &self.client_in
    }

    /// Transaction pooling, between transactions: flushes what is queued for the client and
    /// reads from it until it has sent something (`Ok`), or it left (`Err`). A lone Terminate
    /// ends the session without taking a server connection.
    pub async fn wait_for_client<C>(&mut self, client: &mut C) -> Result<(), PumpEnd>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    {
        poll_fn(|cx| self.poll_wait_for_client(cx, client)).await
    }

    /// [`Pump::wait_for_client`] as a poll function, for a caller's own loop.
    pub fn poll_wait_for_client<C>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Poll<Result<(), PumpEnd>>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin,
    {
        loop {
            if let Err(e) = self.drain_client(cx, client) {
                return Poll::Ready(Err(PumpEnd::ClientGone(e)));
            }
            if !self.client_in.is_empty() {
                // A well-formed Terminate; a malformed one goes to the relay, which says so.
                if self
                    .client_in
                    .starts_with(&[crate::protocol::tag::TERMINATE, 0, 0, 0, 4])
                {
                    return Poll::Ready(Err(PumpEnd::Terminated));
                }
                if self.client_in.len() >= 5 || !self.to_client.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            let read = if self.client_in.is_empty() {
                // Idle: no buffer is held while waiting; the first bytes land on the stack.
                if self.to_client.is_empty() {
                    self.park();
                }
                // Registered already (during the transaction) and nothing arrived since.
                if self.client_arm.skip(cx, client) {
                    return Poll::Pending;
                }
                // Not zeroed: the read fills what it reports (`ReadBuf` tracks it).
                let mut first = [std::mem::MaybeUninit::<u8>::uninit(); 512];
                let mut buf = tokio::io::ReadBuf::uninit(&mut first);
                let read = Pin::new(&mut *client).poll_read(cx, &mut buf);
                self.client_arm.note(cx, &read);
                match read {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        if n > 0 {
                            spare::fill([&mut self.client_in]);
                            self.client_in.extend_from_slice(buf.filled());
                        }
                        Poll::Ready(Ok(n))
                    }
                    Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                    Poll::Pending => Poll::Pending,
                }
            } else {
                reserve(&mut self.client_in);
                let read = poll_read_buf(Pin::new(&mut *client), cx, &mut self.client_in);
                self.client_arm.note(cx, &read);
                read
            };
            match read {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(PumpEnd::ClientGone(None))),
                // Read more, or return once there is a message's header.
                Poll::Ready(Ok(n)) => self.bytes_from_client += n as u64,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(PumpEnd::ClientGone(Some(e)))),
                // Registered for the client's next bytes; the drain above already wrote
                // all the socket took: trying again now finds nothing.
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Between transactions, with nothing pending: the buffers go back to the thread's spares.
    fn park(&mut self) {
        spare::give_empty([
            &mut self.client_in,
            &mut self.to_server,
            &mut self.to_client,
        ]);
    }

    /// A transaction starts: buffers to write into, from the spares (a transaction waiting
    /// for its server connection holds only what it read).
    fn unpark(&mut self) {
        spare::fill([&mut self.to_server, &mut self.to_client]);
    }

    /// Queues `bytes` (whole messages) for the client.
    pub fn push_to_client(&mut self, bytes: &[u8]) {
        self.to_client.extend_from_slice(bytes);
    }

    /// Bytes waiting to be written to the client.
    pub fn to_client_len(&self) -> usize {
        self.to_client.len()
    }

    /// The bytes queued for the server (pgtenant's own statements go first). A transaction
    /// starts here, once it has its server connection: the buffers it writes into come from
    /// the spares now, not while it waits for a connection.
    pub fn to_server_mut(&mut self) -> &mut BytesMut {
        self.unpark();
        &mut self.to_server
    }

    /// Moves what the client already sent through the relay (after a server connection was
    /// attached).
    pub fn process_client<S>(
        &mut self,
        relay: &mut Relay,
        server: &mut ServerSide<'_, S>,
    ) -> Result<ClientStep, FrameError> {
        relay.client_bytes(
            &mut self.client_in,
            &mut self.to_server,
            server.tracker,
            server.pooled,
        )
    }

    /// Writes what the client's socket takes now of the bytes waiting for it, counting them
    /// (see [`poll_drain`]).
    #[inline(always)]
    fn drain_client<C: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Result<bool, Option<io::Error>> {
        let before = self.to_client.len();
        let drained = poll_drain(cx, client, &mut self.to_client, &mut self.flush_client);
        self.bytes_to_client += (before - self.to_client.len()) as u64;
        drained
    }

    /// Forwards in both directions until one side ends.
    pub async fn run<C, S>(
        &mut self,
        relay: &mut Relay,
        client: &mut C,
        server: &mut ServerSide<'_, S>,
    ) -> PumpEnd
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin,
        S: AsyncRead + AsyncWrite + ReadHint + Unpin,
    {
        poll_fn(|cx| self.poll_run(cx, relay, client, server)).await
    }

    /// [`Pump::run`] as a poll function, for a caller's own loop.
    pub fn poll_run<C, S>(
        &mut self,
        cx: &mut Context<'_>,
        relay: &mut Relay,
        client: &mut C,
        server: &mut ServerSide<'_, S>,
    ) -> Poll<PumpEnd>
    where
        C: AsyncRead + AsyncWrite + ReadHint + Unpin,
        S: AsyncRead + AsyncWrite + ReadHint + Unpin,
    {
        // A read that returned Pending has registered this task for the socket's next
        // readiness, which only the runtime's I/O driver sets: trying it again before this
        // call returns finds nothing (each try cost a waker registration).
        let (mut server_waits, mut client_waits) = (false, false);
        loop {
            let mut progress = false;

            match poll_drain(
                cx,
                server.stream,
                &mut self.to_server,
                &mut self.flush_server,
            ) {
                Ok(p) => progress |= p,
                Err(e) => return Poll::Ready(PumpEnd::ServerGone(e)),
            }
            if !relay.holds_client_output(server.tracker) {
                match self.drain_client(cx, client) {
                    Ok(p) => {
                        progress |= p;
                        if let Poll::Ready(limit) = self.poll_stall(cx, p) {
                            return Poll::Ready(PumpEnd::ClientStalled(limit));
                        }
                    }
                    Err(e) => return Poll::Ready(PumpEnd::ClientGone(e)),
                }
            }

            // Found empty and nothing seen since (as after sending it the transaction's
            // first statement): registered for its answer without a read.
            if !server_waits
                && self.to_client.len() < HIGH_WATER
                && !server.stream.may_read()
                && server.stream.poll_read_ready(cx).is_pending()
            {
                server_waits = true;
            }
            if !server_waits && self.to_client.len() < HIGH_WATER {
                reserve(server.rbuf);
                match poll_read_buf(Pin::new(&mut *server.stream), cx, server.rbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(PumpEnd::ServerGone(None)),
                    Poll::Ready(Ok(_)) => {
                        progress = true;
                        if let Err(e) = relay.server_bytes(
                            server.scanner,
                            server.rbuf,
                            &mut self.to_client,
                            server.tracker,
                            server.params,
                            server.pooled,
                        ) {
                            return Poll::Ready(PumpEnd::ServerProtocol(e));
                        }
                        if self.to_server.is_empty() && relay.at_release_point(server.tracker) {
                            // The client has its reply now, not after the release (what the
                            // socket does not take now goes before the client's next read).
                            // A ReadyForQuery owed after a LISTEN waits for the hub.
                            // A failure is left for the next write, which meets it again.
                            if !relay.holds_client_output(server.tracker) {
                                let _ = self.drain_client(cx, client);
                            }
                            return Poll::Ready(PumpEnd::Released);
                        }
                        if relay.holds_client_output(server.tracker) {
                            return Poll::Ready(PumpEnd::Listening);
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::ServerGone(Some(e))),
                    Poll::Pending => server_waits = true,
                }
            }

            // (A client read registered earlier with nothing arrived since is not repeated.)
            if !client_waits && self.client_arm.skip(cx, client) {
                client_waits = true;
            }
            // Registered for its next bytes without a read when it has none (as while the
            // server works on a statement; a read would only find nothing and register the
            // same way). Asked directly, not through `may_read` first: the socket is nearly
            // always empty here, and when it is not the read below takes the bytes.
            if !client_waits
                && self.to_server.len() < HIGH_WATER
                && client.poll_read_ready(cx).is_pending()
            {
                self.client_arm.note(cx, &Poll::<()>::Pending);
                client_waits = true;
            }
            if !client_waits && self.to_server.len() < HIGH_WATER {
                reserve(&mut self.client_in);
                let read = poll_read_buf(Pin::new(&mut *client), cx, &mut self.client_in);
                self.client_arm.note(cx, &read);
                match read {
                    Poll::Ready(Ok(0)) => return Poll::Ready(PumpEnd::ClientGone(None)),
                    Poll::Ready(Ok(n)) => {
                        self.bytes_from_client += n as u64;
                        progress = true;
                        match relay.client_bytes(
                            &mut self.client_in,
                            &mut self.to_server,
                            server.tracker,
                            server.pooled,
                        ) {
                            Ok(ClientStep::Continue) => {}
                            Ok(ClientStep::Terminate) => return Poll::Ready(PumpEnd::Terminated),
                            Err(e) => return Poll::Ready(PumpEnd::ClientProtocol(e)),
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(PumpEnd::ClientGone(Some(e))),
                    Poll::Pending => client_waits = true,
                }
            }

            // Both reads are registered and found nothing after this turn's writes: another
            // turn would write nothing new (only reads fill the buffers) and read nothing.
            if !progress || (server_waits && client_waits) {
                return Poll::Pending;
            }
        }
    }
}

#[cfg(test)]
mod tests;
