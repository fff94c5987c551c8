//! A raw protocol client for tests that need exact messages: Flush without Sync, abrupt
//! disconnects mid-COPY, malformed frames, refused startup packets.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

/// A message from the server.
#[derive(Debug, Clone)]
pub struct Msg {
    pub tag: u8,
    pub body: Bytes,
}

impl Msg {
    /// The SQLSTATE of an ErrorResponse.
    pub fn sqlstate(&self) -> Option<String> {
        self.field(b'C')
    }

    /// A field of an ErrorResponse/NoticeResponse.
    pub fn field(&self, code: u8) -> Option<String> {
        let mut b = &self.body[..];
        while let Some((&c, rest)) = b.split_first() {
            if c == 0 {
                return None;
            }
            let end = rest.iter().position(|&x| x == 0)?;
            if c == code {
                return Some(String::from_utf8_lossy(&rest[..end]).into_owned());
            }
            b = &rest[end + 1..];
        }
        None
    }
}

impl Raw {
    /// The `(channel, payload)` of every NotificationResponse that arrives until nothing has
    /// come for `quiet`.
    pub async fn notifications(&mut self, quiet: std::time::Duration) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while let Ok(Some(m)) = tokio::time::timeout(quiet, self.try_recv()).await {
            if m.tag == b'A' {
                let mut parts = m.body[4..].split(|&b| b == 0);
                let mut next =
                    || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
                let channel = next();
                got.push((channel, next()));
            }
        }
        got
    }

    /// Wraps a connected stream (nothing sent yet).
    pub fn from_stream(stream: TcpStream) -> Raw {
        Raw {
            stream,
            buf: BytesMut::new(),
        }
    }

    /// Opens a TCP connection and sends a StartupMessage with `params`.
    pub async fn startup(addr: std::net::SocketAddr, params: &[(&str, &str)]) -> Raw {
        Raw::startup_from("127.0.0.1", addr, params).await
    }

    /// Like `startup`, from local address `source` (any 127.x.y.z works on Linux).
    pub async fn startup_from(
        source: &str,
        addr: std::net::SocketAddr,
        params: &[(&str, &str)],
    ) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket
            .bind(std::net::SocketAddr::new(source.parse().unwrap(), 0))
            .unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let mut raw = Raw {
            stream,
            buf: BytesMut::new(),
        };
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out).unwrap();
        raw.send(&out).await;
        raw
    }

    /// Connects and authenticates; returns the client after the first ReadyForQuery.
    pub async fn connect(
        addr: std::net::SocketAddr,
        params: &[(&str, &str)],
        password: &str,
    ) -> Raw {
        let mut raw = Raw::startup(addr, params).await;
        raw.authenticate(password).await.expect("authenticated");
        raw.until_ready().await;
        raw
    }

    /// Like `connect`, and the BackendKeyData the server sent: `(pid, secret)`.
    pub async fn connect_with_key(
        addr: std::net::SocketAddr,
        params: &[(&str, &str)],
        password: &str,
    ) -> (Raw, i32, i32) {
        let mut raw = Raw::startup(addr, params).await;
        raw.authenticate(password).await.expect("authenticated");
        let key = raw
            .until_ready()
            .await
            .into_iter()
            .find(|m| m.tag == b'K')
            .expect("BackendKeyData");
        let (pid, secret) = (&key.body[..4], &key.body[4..8]);
        (
            raw,
            i32::from_be_bytes(pid.try_into().unwrap()),
            i32::from_be_bytes(secret.try_into().unwrap()),
        )
    }

    /// Sends a CancelRequest for `(pid, secret)` to `addr` and waits until it is closed.
    pub async fn cancel(addr: std::net::SocketAddr, pid: i32, secret: i32) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut out = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut out);
        s.write_all(&out).await.unwrap();
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink).await;
    }

    /// Runs the SCRAM exchange; returns the ErrorResponse if authentication fails.
    pub async fn authenticate(&mut self, password: &str) -> Result<(), Msg> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            let m = self.recv().await;
            match m.tag {
                b'E' => return Err(m),
                b'v' => continue,
                b'R' => {}
                other => panic!("unexpected message {:?} during auth", other as char),
            }
            let code = (&m.body[..4]).get_i32();
            let mut out = BytesMut::new();
            match code {
                0 => return Ok(()),
                10 => {
                    let s = ScramSha256::new(password.as_bytes(), ChannelBinding::unsupported());
                    frontend::sasl_initial_response("SCRAM-SHA-256", s.message(), &mut out)
                        .unwrap();
                    scram = Some(s);
                }
                11 => {
                    let s = scram.as_mut().unwrap();
                    s.update(&m.body[4..]).unwrap();
                    frontend::sasl_response(s.message(), &mut out).unwrap();
                }
                12 => scram.as_mut().unwrap().finish(&m.body[4..]).unwrap(),
                other => panic!("unexpected auth request {other}"),
            }
            if !out.is_empty() {
                self.send(&out).await;
            }
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends a simple Query.
    pub async fn query(&mut self, sql: &str) {
        let mut out = BytesMut::new();
        frontend::query(sql, &mut out).unwrap();
        self.send(&out).await;
    }

    /// The next message, or `None` at end of stream.
    pub async fn try_recv(&mut self) -> Option<Msg> {
        loop {
            if self.buf.len() >= 5 {
                let len = (&self.buf[1..5]).get_u32() as usize;
                if self.buf.len() > len {
                    let mut msg = self.buf.split_to(len + 1);
                    let tag = msg.get_u8();
                    msg.advance(4);
                    return Some(Msg {
                        tag,
                        body: msg.freeze(),
                    });
                }
            }
            self.buf.reserve(64 * 1024);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn recv(&mut self) -> Msg {
        self.try_recv().await.expect("connection closed")
    }

    /// Messages up to and including the next ReadyForQuery.
    pub async fn until_ready(&mut self) -> Vec<Msg> {
        let mut out = Vec::new();
        loop {
            let m = self.recv().await;
            let done = m.tag == b'Z';
            out.push(m);
            if done {
                return out;
            }
        }
    }

    /// Appends a Bind of the unnamed statement to the unnamed portal, without parameters.
    pub fn put_bind_unnamed(out: &mut BytesMut) {
        frontend::bind(
            "",
            "",
            std::iter::empty::<i16>(),
            std::iter::empty::<&str>(),
            |_: &str, _: &mut BytesMut| Ok(postgres_protocol::IsNull::No),
            std::iter::empty::<i16>(),
            out,
        )
        .map_err(|_| "bind")
        .unwrap();
    }

    /// Appends a Bind of `statement` to the unnamed portal with text `values`, an Execute
    /// of it and a Sync.
    pub fn put_bind_execute_sync(out: &mut BytesMut, statement: &str, values: &[&str]) {
        frontend::bind(
            "",
            statement,
            [0i16],
            values.iter().copied(),
            |v: &str, buf: &mut BytesMut| {
                buf.extend_from_slice(v.as_bytes());
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            out,
        )
        .map_err(|_| "bind")
        .unwrap();
        frontend::execute("", 0, out).unwrap();
        frontend::sync(out);
    }

    /// Appends Parse, Bind and Execute of `sql` (unnamed statement and portal).
    pub fn put_parse_bind_execute(out: &mut BytesMut, sql: &str) {
        frontend::parse("", sql, std::iter::empty::<u32>(), out).unwrap();
        Raw::put_bind_unnamed(out);
        frontend::execute("", 0, out).unwrap();
    }

    /// Appends a raw message.
    pub fn put(out: &mut BytesMut, tag: u8, body: &[u8]) {
        out.put_u8(tag);
        out.put_u32(body.len() as u32 + 4);
        out.put_slice(body);
    }
}
