//! LISTEN/NOTIFY under transaction pooling (DESIGN.md §6). Pooled connections never stay
//! listening. Instead, one connection per shard and login role, the hub, LISTENs on every
//! channel some client wants and fans the notifications out to those clients. Channel names
//! arrive already moved into the tenant's namespace by the guard, so a tenant can only
//! subscribe to its own channels. The hub reconnects and listens again when its connection
//! drops.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

use super::ServerConn;
use super::connect::{self, Login};
use crate::config::Shard;
use crate::protocol::frame::{FrameScanner, Piece, TagSet};
use crate::protocol::{encode, tag, take_cstr};
use crate::tenant::quote_ident;

/// Notifications waiting for one client, at most. A client that lets more pile up (it does not
/// read, or stays in one transaction while they arrive) is told and disconnected through its
/// [`Subscriber::overflow`]: nothing is dropped silently and nothing grows without bound.
pub const CLIENT_QUEUE: usize = 1024;

/// Where a client's notifications go.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub deliver: mpsc::Sender<Notification>,
    /// Woken when the client's queue was full and a notification could not be queued.
    pub overflow: Arc<tokio::sync::Notify>,
}

/// A notification for a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    /// Process id of the notifying server backend.
    pub pid: i32,
    /// The channel as the server knows it (namespaced).
    pub channel: String,
    pub payload: String,
}

enum Command {
    Listen {
        channel: String,
        client: u64,
        deliver: Subscriber,
        /// Told once the hub's connection is listening on the channel.
        done: Option<oneshot::Sender<()>>,
    },
    Unlisten {
        channel: Option<String>,
        client: u64,
    },
}

/// The shard's listening connection, shared by every pooled client of one login role.
pub struct NotifyHub {
    commands: mpsc::UnboundedSender<Command>,
}

type Tls = Option<(Arc<ClientConfig>, ServerName<'static>)>;

impl NotifyHub {
    /// Starts the hub's task (it connects when the first client listens).
    pub fn start(shard: Arc<Shard>, login: Login, tls: Tls, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(shard, login, tls, timeout, rx));
        NotifyHub { commands: tx }
    }

    /// Delivers notifications on `channel` to `client` through `deliver`. The receiver
    /// completes once the hub's connection listens on the channel (as on PostgreSQL, where a
    /// NOTIFY committed after LISTEN returned is delivered); it fails if the hub lost its
    /// connection first.
    pub fn listen(
        &self,
        channel: String,
        client: u64,
        deliver: Subscriber,
    ) -> oneshot::Receiver<()> {
        let (done, confirmed) = oneshot::channel();
        let _ = self.commands.send(Command::Listen {
            channel,
            client,
            deliver,
            done: Some(done),
        });
        confirmed
    }

    /// Stops delivering `channel` (or every channel) to `client`.
    pub fn unlisten(&self, channel: Option<String>, client: u64) {
        let _ = self.commands.send(Command::Unlisten { channel, client });
    }
}

type Subscribers = HashMap<String, HashMap<u64, Subscriber>>;

async fn send_query(conn: &mut ServerConn, sql: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    encode::raw(tag::QUERY, &body, &mut out);
    conn.stream.write_all(&out).await?;
    conn.stream.flush().await
}

/// Applies a command; returns the statement the connection must run, if any.
fn apply(subscribers: &mut Subscribers, command: Command) -> Option<String> {
    match command {
        Command::Listen {
            channel,
            client,
            deliver,
            ..
        } => {
            let entry = subscribers.entry(channel.clone()).or_default();
            let first = entry.is_empty();
            entry.insert(client, deliver);
            first.then(|| format!("LISTEN {}", quote_ident(&channel)))
        }
        Command::Unlisten { channel, client } => {
            let channels: Vec<String> = match channel {
                Some(c) => vec![c],
                None => subscribers.keys().cloned().collect(),
            };
            let mut emptied = Vec::new();
            for c in channels {
                if let Some(entry) = subscribers.get_mut(&c) {
                    entry.remove(&client);
                    if entry.is_empty() {
                        subscribers.remove(&c);
                        emptied.push(format!("UNLISTEN {}", quote_ident(&c)));
                    }
                }
            }
            (!emptied.is_empty()).then(|| emptied.join("; "))
        }
    }
}

/// The confirmation a Listen command carries.
fn take_done(command: &mut Command) -> Option<oneshot::Sender<()>> {
    match command {
        Command::Listen { done, .. } => done.take(),
        Command::Unlisten { .. } => None,
    }
}

/// Confirmations waiting for the ReadyForQuery of each statement the hub sent, in order.
type Pending = VecDeque<Vec<oneshot::Sender<()>>>;

/// Applies `command` on a connected hub: sends its statement, if any, and files its
/// confirmation behind the statement that makes it true. `Err` when the connection failed.
async fn apply_connected(
    conn: &mut ServerConn,
    subscribers: &mut Subscribers,
    pending: &mut Pending,
    mut command: Command,
) -> std::io::Result<()> {
    let done = take_done(&mut command);
    match apply(subscribers, command) {
        Some(sql) => {
            send_query(conn, &sql).await?;
            pending.push_back(done.into_iter().collect());
        }
        // Already listening, or about to be once the statements in flight finish.
        None => match (done, pending.back_mut()) {
            (Some(done), Some(last)) => last.push(done),
            (Some(done), None) => {
                let _ = done.send(());
            }
            (None, _) => {}
        },
    }
    Ok(())
}

/// Delivers a NotificationResponse body to the channel's subscribers.
fn dispatch(subscribers: &mut Subscribers, body: &[u8]) {
    let Some((pid, rest)) = body.split_first_chunk::<4>() else {
        return;
    };
    let Some((channel, rest)) = take_cstr(rest) else {
        return;
    };
    let Some((payload, _)) = take_cstr(rest) else {
        return;
    };
    let channel = String::from_utf8_lossy(channel).into_owned();
    let Some(entry) = subscribers.get_mut(&channel) else {
        return;
    };
    let n = Notification {
        pid: i32::from_be_bytes(*pid),
        channel,
        payload: String::from_utf8_lossy(payload).into_owned(),
    };
    entry.retain(|client, sub| match sub.deliver.try_send(n.clone()) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(_)) => {
            tracing::warn!(client, channel = %n.channel, "client is not taking its notifications; disconnecting it");
            sub.overflow.notify_one();
            // It is disconnected: it would have missed this one and those after it.
            false
        }
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    });
}

async fn run(
    shard: Arc<Shard>,
    login: Login,
    tls: Tls,
    timeout: Duration,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut subscribers: Subscribers = HashMap::new();
    let mut backoff = Duration::from_millis(200);
    // Confirmations for listens that arrived while the hub had no connection.
    let mut waiting: Vec<oneshot::Sender<()>> = Vec::new();
    loop {
        // Connect only when someone listens.
        while subscribers.is_empty() {
            match commands.recv().await {
                Some(mut c) => {
                    waiting.extend(take_done(&mut c));
                    apply(&mut subscribers, c);
                }
                None => return,
            }
        }
        let mut conn = match connect::open(&shard, &login, tls.as_ref(), timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(shard = %shard.name, error = %e, "notification hub cannot connect; retrying");
                // Listeners waiting for confirmation go on without it.
                waiting.clear();
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        let all: Vec<String> = subscribers
            .keys()
            .map(|c| format!("LISTEN {}", quote_ident(c)))
            .collect();
        if send_query(&mut conn, &all.join("; ")).await.is_err() {
            waiting.clear();
            continue;
        }
        let mut pending: Pending = VecDeque::new();
        pending.push_back(std::mem::take(&mut waiting));
        let mut scanner = FrameScanner::new(
            TagSet::of(&[
                tag::NOTIFICATION_RESPONSE,
                tag::ERROR_RESPONSE,
                tag::READY_FOR_QUERY,
            ]),
            1 << 20,
        );
        let mut buf = BytesMut::with_capacity(8192);
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    if apply_connected(&mut conn, &mut subscribers, &mut pending, command)
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                read = conn.stream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    loop {
                        match scanner.next(&buf) {
                            Ok(Some(Piece::Whole { tag: t, len })) => {
                                if t == tag::NOTIFICATION_RESPONSE {
                                    dispatch(&mut subscribers, &buf[5..len]);
                                } else if t == tag::READY_FOR_QUERY {
                                    for done in pending.pop_front().unwrap_or_default() {
                                        let _ = done.send(());
                                    }
                                } else {
                                    let fields = crate::protocol::server_msgs::error_fields(&buf[5..len]).unwrap_or_default();
                                    tracing::warn!(code = %fields.code, message = %fields.message, "notification hub statement failed");
                                }
                                buf.advance(len);
                            }
                            Ok(Some(Piece::Pass { len, .. })) => buf.advance(len),
                            Ok(None) => break,
                            Err(_) => {
                                buf.clear();
                                break;
                            }
                        }
                    }
                }
            }
        }
        tracing::info!(shard = %shard.name, "notification hub connection lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(channel: &str, payload: &str) -> Vec<u8> {
        let mut b = 7i32.to_be_bytes().to_vec();
        b.extend_from_slice(channel.as_bytes());
        b.push(0);
        b.extend_from_slice(payload.as_bytes());
        b.push(0);
        b
    }

    #[tokio::test]
    async fn subscriptions_listen_once_and_fan_out() {
        let mut subs = Subscribers::new();
        let sub = |tx| Subscriber {
            deliver: tx,
            overflow: Arc::default(),
        };
        let (tx1, mut rx1) = mpsc::channel(4);
        let (tx2, mut rx2) = mpsc::channel(4);
        let (tx1, tx2) = (sub(tx1), sub(tx2));
        let listen = |client, deliver| Command::Listen {
            channel: "acme.ev".into(),
            client,
            deliver,
            done: None,
        };
        assert_eq!(
            apply(&mut subs, listen(1, tx1)),
            Some("LISTEN \"acme.ev\"".into())
        );
        assert_eq!(apply(&mut subs, listen(2, tx2)), None, "already listening");
        dispatch(&mut subs, &body("acme.ev", "hi"));
        dispatch(&mut subs, &body("globex.ev", "not yours"));
        assert_eq!(rx1.recv().await.unwrap().payload, "hi");
        assert_eq!(rx2.recv().await.unwrap().payload, "hi");
        assert!(rx1.try_recv().is_err());
        assert_eq!(
            apply(
                &mut subs,
                Command::Unlisten {
                    channel: None,
                    client: 1
                }
            ),
            None
        );
        assert_eq!(
            apply(
                &mut subs,
                Command::Unlisten {
                    channel: Some("acme.ev".into()),
                    client: 2
                }
            ),
            Some("UNLISTEN \"acme.ev\"".into())
        );
        assert!(subs.is_empty());
    }
}
