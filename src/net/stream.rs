//! A connection that is either plain TCP or TLS over TCP, for clients (rustls server side) and
//! servers (rustls client side) alike.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

/// Plain or TLS.
pub enum MaybeTls<T> {
    Plain(TcpStream),
    Tls(Box<T>),
}

/// A client connection.
pub type ClientStream = MaybeTls<tokio_rustls::server::TlsStream<TcpStream>>;
/// A server connection.
pub type ServerStream = MaybeTls<tokio_rustls::client::TlsStream<TcpStream>>;

/// Sends SSLRequest and, if the server agrees, runs the TLS handshake. A server that answers
/// `N` leaves a plain connection; the caller decides whether that is acceptable.
pub async fn start_tls(
    mut tcp: TcpStream,
    config: &Arc<ClientConfig>,
    name: &ServerName<'static>,
) -> std::io::Result<ServerStream> {
    let mut req = BytesMut::new();
    frontend::ssl_request(&mut req);
    tcp.write_all(&req).await?;
    match tcp.read_u8().await? {
        b'S' => {
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(config));
            let tls = connector.connect(name.clone(), tcp).await?;
            Ok(MaybeTls::Tls(Box::new(tls)))
        }
        _ => Ok(MaybeTls::Plain(tcp)),
    }
}

impl<T> MaybeTls<T> {
    /// Whether the connection is encrypted.
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl ClientStream {
    /// The SNI host name the client sent, if on TLS.
    pub fn sni(&self) -> Option<&str> {
        match self {
            MaybeTls::Plain(_) => None,
            MaybeTls::Tls(tls) => tls.get_ref().1.server_name(),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for MaybeTls<T> {
    #[inline(always)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => poll_send(s, cx, buf),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_flush(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MaybeTls::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Writes to a plain socket as tokio's `poll_write` does (clears the write readiness when the
/// socket took less than offered, registers the task when it has none), with the system call
/// made directly (rustix's raw `sendto`): glibc's `send` wraps every call in its
/// thread-cancellation bookkeeping, which a process with more than one thread pays each time.
/// The readiness is looked at first (an atomic load) and the task registered only when there
/// is none: a write almost always goes through at once, and the cooperative budget is spent
/// by the reads that produce what is written.
#[inline(always)]
fn poll_send(tcp: &TcpStream, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
    loop {
        // A short write means the socket's buffer is full: the readiness is cleared (by
        // reporting `WouldBlock` to `try_io`, which clears only the readiness it saw before
        // the call, so a later edge is never lost) and the count returned.
        let mut partial = None;
        let sent = tcp.try_io(tokio::io::Interest::WRITABLE, || {
            let n = rustix::net::send(tcp, buf, rustix::net::SendFlags::NOSIGNAL)?;
            if n > 0 && n < buf.len() {
                partial = Some(n);
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match sent {
            Ok(n) => return Poll::Ready(Ok(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if let Some(n) = partial {
                    return Poll::Ready(Ok(n));
                }
                // No readiness (or it was cleared just now): registered, or ready again.
                std::task::ready!(tcp.poll_write_ready(cx))?;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
    }
}

/// What a socket shows of its read readiness, and a registration for it, without a read.
pub trait ReadHint {
    /// `false` only when a read would surely find nothing now: the runtime has seen no read
    /// readiness since a read last found the socket empty. The default is always `true`
    /// (never sure).
    fn may_read(&self) -> bool {
        true
    }

    /// Registers the task for the socket's next read readiness, as a read that finds nothing
    /// would, without the read's buffer handling: `Pending` when the socket has shown none
    /// since it was found empty, `Ready` when it has (then read it). The default is always
    /// `Ready`.
    fn poll_read_ready(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl<T> ReadHint for MaybeTls<T> {
    fn may_read(&self) -> bool {
        match self {
            // Tokio's readiness for the socket (an atomic load): no system call, no waker.
            MaybeTls::Plain(tcp) => tcp.try_io(tokio::io::Interest::READABLE, || Ok(())).is_ok(),
            // Plaintext that rustls holds does not show in the socket's readiness, and a TLS
            // read may have waited on a write.
            MaybeTls::Tls(_) => true,
        }
    }

    fn poll_read_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            // Tokio's registration, as its `poll_read` makes it before reading.
            MaybeTls::Plain(tcp) => tcp.poll_read_ready(cx),
            MaybeTls::Tls(_) => Poll::Ready(Ok(())),
        }
    }
}

impl ReadHint for tokio::io::DuplexStream {}

/// Whether a read of a socket that would find nothing may be skipped: a read that returns
/// `Pending` has registered the task's waker for the socket's next read readiness, and that
/// registration stays until readiness arrives (which [`ReadHint::may_read`] then shows), so
/// another read before then would only register the same waker again (in tokio: the
/// readiness lock, the waker comparison, the budget). Only correct when every read of the
/// socket is noted here.
#[derive(Debug, Default)]
pub struct ReadArm {
    /// The registered waker's identity (what `Waker::will_wake` compares), without a clone.
    armed: Option<(usize, usize)>,
}

impl ReadArm {
    fn id(cx: &Context<'_>) -> (usize, usize) {
        let waker = cx.waker();
        (
            waker.data() as usize,
            std::ptr::from_ref(waker.vtable()) as usize,
        )
    }

    /// After a read of the socket with `cx`: armed when it returned `Pending` with the task's
    /// budget left (a `Pending` for want of budget registers nothing on the socket).
    pub fn note<T>(&mut self, cx: &Context<'_>, read: &Poll<T>) {
        self.armed =
            (read.is_pending() && tokio::task::coop::has_budget_remaining()).then(|| Self::id(cx));
    }

    /// Whether reading `socket` now may be skipped: armed with this task's waker, and no read
    /// readiness since.
    pub fn skip<S: ReadHint>(&self, cx: &Context<'_>, socket: &S) -> bool {
        self.armed.is_some_and(|id| id == Self::id(cx)) && !socket.may_read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::poll_fn;
    use std::time::Duration;

    /// A plain client connection on a real socket, and its far end.
    async fn pair() -> (ClientStream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (MaybeTls::Plain(near.unwrap().0), far.unwrap())
    }

    fn read(s: &mut ClientStream, arm: &mut ReadArm, cx: &mut Context<'_>) -> Poll<usize> {
        let mut bytes = [0u8; 64];
        let mut buf = ReadBuf::new(&mut bytes);
        let read = Pin::new(&mut *s).poll_read(cx, &mut buf);
        arm.note(cx, &read);
        read.map(|r| {
            r.unwrap();
            buf.filled().len()
        })
    }

    /// Fails a test that would hang (a skipped read whose wake-up never comes).
    async fn within<F: std::future::Future>(f: F) -> F::Output {
        crate::timers::timeout(Duration::from_secs(20), f)
            .await
            .expect("woken")
    }

    /// The plain write path (`poll_send`): a peer that stops reading fills the socket, the
    /// writer sees short writes and then `Pending`, and is woken to finish once the peer
    /// reads again; every byte arrives, in order.
    #[tokio::test]
    async fn a_full_socket_makes_writes_wait_and_wakes_them_when_drained() {
        let (mut near, mut far) = pair().await;
        let data: Vec<u8> = (0..16u32 << 20).map(|i| (i % 251) as u8).collect();
        // Until the socket is full: nothing reads the far end yet.
        let mut sent = 0;
        let mut pending = false;
        poll_fn(|cx| {
            while sent < data.len() {
                match Pin::new(&mut near).poll_write(cx, &data[sent..]) {
                    Poll::Ready(n) => sent += n.unwrap(),
                    Poll::Pending => {
                        pending = true;
                        break;
                    }
                }
            }
            Poll::Ready(())
        })
        .await;
        assert!(pending, "16 MiB fit in the socket: the test shows nothing");
        assert!(sent > 0 && sent < data.len());
        // The rest is written by a task of its own (only its own registration can wake it)
        // while the far end reads everything.
        let rest = data[sent..].to_vec();
        let write = tokio::spawn(async move {
            near.write_all(&rest).await.unwrap();
            near.shutdown().await.unwrap();
        });
        let mut got = Vec::with_capacity(data.len());
        let read = within(far.read_to_end(&mut got)).await;
        assert_eq!(read.unwrap(), data.len());
        assert!(got == data, "bytes lost or reordered");
        write.await.unwrap();
    }

    #[tokio::test]
    async fn a_registered_read_is_skipped_only_until_the_socket_has_bytes() {
        let (mut near, mut far) = pair().await;
        let mut arm = ReadArm::default();
        poll_fn(|cx| {
            // Never read: nothing to skip for.
            assert!(!arm.skip(cx, &near));
            assert!(read(&mut near, &mut arm, cx).is_pending());
            assert!(arm.skip(cx, &near), "registered, nothing arrived");
            Poll::Ready(())
        })
        .await;
        // A task that skips its read is woken by the registration when bytes come.
        let wake = async {
            poll_fn(|cx| {
                if arm.skip(cx, &near) {
                    Poll::Pending
                } else {
                    Poll::Ready(())
                }
            })
            .await
        };
        let ((), written) = within(async { tokio::join!(wake, far.write_all(b"hello")) }).await;
        written.unwrap();
        let n = poll_fn(|cx| read(&mut near, &mut arm, cx)).await;
        assert_eq!(n, 5);
        poll_fn(|cx| {
            assert!(
                !arm.skip(cx, &near),
                "a read returned: no registration known"
            );
            Poll::Ready(())
        })
        .await;
        // The far end closing shows as readiness too.
        poll_fn(|cx| {
            assert!(read(&mut near, &mut arm, cx).is_pending());
            Poll::Ready(())
        })
        .await;
        drop(far);
        within(poll_fn(|cx| {
            if arm.skip(cx, &near) {
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        }))
        .await;
        assert_eq!(poll_fn(|cx| read(&mut near, &mut arm, cx)).await, 0);
    }

    #[tokio::test]
    async fn a_read_registered_by_another_task_or_refused_for_budget_is_not_skipped() {
        let (mut near, _far) = pair().await;
        let mut arm = ReadArm::default();
        poll_fn(|cx| {
            assert!(read(&mut near, &mut arm, cx).is_pending());
            Poll::Ready(())
        })
        .await;
        // Another task's waker was not registered.
        let other = std::task::Waker::noop();
        assert!(!arm.skip(&Context::from_waker(other), &near));

        // A task out of budget: its read is refused before the socket is looked at, which
        // registers nothing on the socket.
        let mut arm = ReadArm::default();
        poll_fn(|cx| {
            loop {
                let spend = std::pin::pin!(tokio::task::coop::consume_budget());
                if spend.poll(cx).is_pending() {
                    break;
                }
            }
            assert!(read(&mut near, &mut arm, cx).is_pending());
            assert!(!arm.skip(cx, &near), "armed by a read refused for budget");
            Poll::Ready(())
        })
        .await;
        // And a TLS stream is never skipped (its plaintext does not show): see `may_read`.
    }
}
