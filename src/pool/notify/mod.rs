//! LISTEN/NOTIFY under transaction pooling (DESIGN.md §6). Pooled connections never stay
//! listening. Instead, one connection per shard and login role, the hub, LISTENs on every
//! channel some client wants and fans the notifications out to those clients. Channel names
//! arrive already moved into the tenant's namespace by the guard, so a tenant can only
//! subscribe to its own channels. The hub reconnects and listens again when its connection
//! drops.

use std::collections::{HashMap, HashSet, VecDeque};
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

/// Who sent a notification, for its pid field: the client's virtual pid (as its
/// BackendKeyData gave it), not the pooled backend's. Shared by a pool and its hub.
pub type Owners = Arc<std::sync::Mutex<Senders>>;

/// A notification as `(channel, payload)`.
type Note = (String, String);

/// What the pool knows about who notified from which backend.
#[derive(Debug, Default)]
pub struct Senders {
    /// Backend pid → the client using it last.
    last: HashMap<i32, i32>,
    /// Backend pid → notifications a client committed there that the hub has not seen yet
    /// (recorded at the commit's ReadyForQuery, before the backend can pass to anyone else).
    committed: HashMap<i32, VecDeque<(Note, i32)>>,
    /// Backend pid → notifications the hub attributed by `last` before their commit was
    /// recorded (the hub was faster than the notifying session).
    early: HashMap<i32, VecDeque<(Note, i32)>>,
}

/// Per backend, at most this many recorded notifications are kept either way.
const SENDERS_KEPT: usize = 64;

impl Senders {
    /// The client with virtual pid `client` now uses backend `server`.
    pub fn attach(&mut self, server: i32, client: i32, bound: usize) {
        // Entries of closed backends are not removed one by one: the maps start over.
        if self.last.len() > bound {
            self.last.clear();
            self.committed.clear();
            self.early.clear();
        }
        self.last.insert(server, client);
    }

    /// Client `client` committed `notes` on backend `server`.
    pub fn committed(&mut self, server: i32, client: i32, notes: Vec<Note>) {
        for note in notes {
            let early = self.early.entry(server).or_default();
            if let Some(i) = early.iter().position(|(n, c)| *n == note && *c == client) {
                early.remove(i);
                continue;
            }
            let queue = self.committed.entry(server).or_default();
            if queue.len() >= SENDERS_KEPT {
                queue.pop_front();
            }
            queue.push_back((note, client));
        }
    }

    /// The client that sent `note` from backend `server`, if a client of the pool did.
    fn sender(&mut self, server: i32, note: &Note) -> Option<i32> {
        if let Some(queue) = self.committed.get_mut(&server)
            && let Some(i) = queue.iter().position(|(n, _)| n == note)
        {
            return queue.remove(i).map(|(_, c)| c);
        }
        let client = *self.last.get(&server)?;
        let early = self.early.entry(server).or_default();
        if early.len() >= SENDERS_KEPT {
            early.pop_front();
        }
        early.push_back((note.clone(), client));
        Some(client)
    }
}

impl NotifyHub {
    /// Starts the hub's task (it connects when the first client listens).
    pub fn start(
        shard: Arc<Shard>,
        login: Login,
        tls: Tls,
        timeout: Duration,
        owners: Owners,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(shard, login, tls, timeout, owners, rx));
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

/// Channels whose LISTEN/UNLISTEN one statement of the hub carries, at most. The server's
/// cost of each is proportional to the channels it listens on, so one statement stays short
/// however many channels a tenant adds or drops at once.
const CHUNK: usize = 64;

/// What the hub wants its connection to listen on, what it does listen on, and the work in
/// between, queued per tenant and served round-robin: one tenant listening on (or leaving)
/// thousands of channels delays another tenant's LISTEN by one short statement at most.
#[derive(Default)]
struct Hub {
    /// Who wants each channel (the connection should listen on exactly these).
    subscribers: Subscribers,
    /// What the connection listens on, counting the statement in flight.
    listening: HashSet<String>,
    /// Channels whose wanted and actual state may differ, per tenant (the channel's prefix
    /// before the first dot), in arrival order.
    dirty: HashMap<String, (VecDeque<String>, HashSet<String>)>,
    /// Tenants with dirty channels, in turn order.
    turn: VecDeque<String>,
    /// Listens waiting to be confirmed, per channel.
    waiters: HashMap<String, Vec<oneshot::Sender<()>>>,
    /// The channels the statement in flight LISTENs on (`None`: no statement in flight).
    in_flight: Option<Vec<String>>,
}

/// The tenant a (namespaced) channel belongs to.
fn group_of(channel: &str) -> &str {
    channel.split_once('.').map_or("", |(g, _)| g)
}

impl Hub {
    fn mark_dirty(&mut self, channel: &str) {
        let group = group_of(channel).to_owned();
        let (queue, set) = self.dirty.entry(group.clone()).or_default();
        if set.insert(channel.to_owned()) {
            if queue.is_empty() {
                // A tenant with nothing queued goes before those working through a backlog.
                self.turn.push_front(group);
            }
            queue.push_back(channel.to_owned());
        }
    }

    /// Applies a command to the wanted state; a Listen's confirmation is kept until the
    /// connection listens on the channel (or sent now if it does already).
    fn apply(&mut self, command: Command) {
        match command {
            Command::Listen {
                channel,
                client,
                deliver,
                done,
            } => {
                self.subscribers
                    .entry(channel.clone())
                    .or_default()
                    .insert(client, deliver);
                let in_flight = self
                    .in_flight
                    .as_ref()
                    .is_some_and(|f| f.contains(&channel));
                if self.listening.contains(&channel) && !in_flight {
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                } else {
                    self.waiters
                        .entry(channel.clone())
                        .or_default()
                        .extend(done);
                    self.mark_dirty(&channel);
                }
            }
            Command::Unlisten { channel, client } => {
                let channels: Vec<String> = match channel {
                    Some(c) => vec![c],
                    None => self.subscribers.keys().cloned().collect(),
                };
                for c in channels {
                    if let Some(entry) = self.subscribers.get_mut(&c) {
                        entry.remove(&client);
                        if entry.is_empty() {
                            self.subscribers.remove(&c);
                            self.mark_dirty(&c);
                        }
                    }
                }
            }
        }
    }

    /// The next statement to send, taking up to [`CHUNK`] channels from the next tenant in
    /// turn; `None` while one is in flight or nothing is to do.
    fn next_statement(&mut self) -> Option<String> {
        if self.in_flight.is_some() {
            return None;
        }
        while let Some(group) = self.turn.pop_front() {
            let Some((queue, set)) = self.dirty.get_mut(&group) else {
                continue;
            };
            let mut sql = Vec::new();
            let mut listened = Vec::new();
            while sql.len() < CHUNK {
                let Some(channel) = queue.pop_front() else {
                    break;
                };
                set.remove(&channel);
                let wanted = self.subscribers.contains_key(&channel);
                if wanted && !self.listening.contains(&channel) {
                    sql.push(crate::own_sql::listen(&channel));
                    self.listening.insert(channel.clone());
                    listened.push(channel);
                } else if !wanted && self.listening.remove(&channel) {
                    sql.push(crate::own_sql::unlisten(&channel));
                } else if wanted {
                    // Listening already (a LISTEN in flight is handled when it completes).
                    for done in self.waiters.remove(&channel).unwrap_or_default() {
                        let _ = done.send(());
                    }
                }
            }
            if queue.is_empty() {
                self.dirty.remove(&group);
            } else {
                self.turn.push_back(group);
            }
            if !sql.is_empty() {
                self.in_flight = Some(listened);
                return Some(sql.join("; "));
            }
        }
        None
    }

    /// The statement in flight completed: confirm the listens it made.
    fn statement_done(&mut self) {
        for channel in self.in_flight.take().unwrap_or_default() {
            for done in self.waiters.remove(&channel).unwrap_or_default() {
                let _ = done.send(());
            }
        }
    }

    /// A new connection listens on nothing: every wanted channel is work again.
    fn connected(&mut self) {
        self.listening.clear();
        self.in_flight = None;
        self.dirty.clear();
        self.turn.clear();
        let channels: Vec<String> = self.subscribers.keys().cloned().collect();
        for c in channels {
            self.mark_dirty(&c);
        }
    }

    /// The connection could not be made: listeners waiting for confirmation go on without
    /// it (their receivers see the sender dropped).
    fn give_up_waiting(&mut self) {
        self.waiters.clear();
    }
}

async fn send_query(conn: &mut ServerConn, sql: &str) -> std::io::Result<()> {
    let mut out = BytesMut::new();
    let mut body = sql.as_bytes().to_vec();
    body.push(0);
    encode::raw(tag::QUERY, &body, &mut out);
    conn.stream.write_all(&out).await?;
    conn.stream.flush().await
}

/// Delivers a NotificationResponse body to the channel's subscribers, with the notifying
/// client's virtual pid when a client of the pool sent it.
fn dispatch(subscribers: &mut Subscribers, owners: &Owners, body: &[u8]) {
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
    let pid = i32::from_be_bytes(*pid);
    let payload = String::from_utf8_lossy(payload).into_owned();
    let note = (channel.clone(), payload.clone());
    let owner = owners
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .sender(pid, &note);
    let n = Notification {
        pid: owner.unwrap_or(pid),
        channel,
        payload,
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

/// Sends the hub's next statement if none is in flight. `Err` when the connection failed.
async fn send_next(conn: &mut ServerConn, hub: &mut Hub) -> std::io::Result<()> {
    match hub.next_statement() {
        Some(sql) => send_query(conn, &sql).await,
        None => Ok(()),
    }
}

async fn run(
    shard: Arc<Shard>,
    login: Login,
    tls: Tls,
    timeout: Duration,
    owners: Owners,
    mut commands: mpsc::UnboundedReceiver<Command>,
) {
    let mut hub = Hub::default();
    let mut backoff = Duration::from_millis(200);
    loop {
        // Connect only when someone listens.
        while hub.subscribers.is_empty() {
            match commands.recv().await {
                Some(c) => hub.apply(c),
                None => return,
            }
        }
        let mut conn = match connect::open(&shard, &login, tls.as_ref(), timeout).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(shard = %shard.name, error = %e, "notification hub cannot connect; retrying");
                hub.give_up_waiting();
                crate::timers::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        backoff = Duration::from_millis(200);
        hub.connected();
        if send_next(&mut conn, &mut hub).await.is_err() {
            continue;
        }
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
                    hub.apply(command);
                    // Take whatever else is queued before deciding what to send.
                    while let Ok(more) = commands.try_recv() {
                        hub.apply(more);
                    }
                    if send_next(&mut conn, &mut hub).await.is_err() {
                        break;
                    }
                }
                read = conn.stream.read_buf(&mut buf) => {
                    match read {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    let mut ready = false;
                    loop {
                        match scanner.next(&buf) {
                            Ok(Some(Piece::Whole { tag: t, len })) => {
                                if t == tag::NOTIFICATION_RESPONSE {
                                    dispatch(&mut hub.subscribers, &owners, &buf[5..len]);
                                } else if t == tag::READY_FOR_QUERY {
                                    hub.statement_done();
                                    ready = true;
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
                    if ready && send_next(&mut conn, &mut hub).await.is_err() {
                        break;
                    }
                }
            }
        }
        tracing::info!(shard = %shard.name, "notification hub connection lost; reconnecting");
    }
}

#[cfg(test)]
mod tests;
