//! LISTEN/NOTIFY for a transaction-pooled client: its queue at the shard's notification hub
//! and the notifications delivered between its transactions.

use super::*;

/// Queues a notification for the client, its channel under the client's own name (unless
/// it is the client's own, shown before its ReadyForQuery already).
pub(super) fn push_notification(
    relay: &mut Relay,
    pump: &mut Pump,
    prefix: &str,
    n: &notify::Notification,
) {
    if relay.shown_already(&n.channel, &n.payload) {
        return;
    }
    let channel = n.channel.strip_prefix(prefix).unwrap_or(&n.channel);
    let mut out = BytesMut::new();
    encode::notification(n.pid, channel, &n.payload, &mut out);
    pump.push_to_client(&out);
}

/// Passes the LISTEN/UNLISTEN the client ran to the shard's notification hub (making the
/// client's queue on its first LISTEN). Returns the hub's confirmations for the new listens.
pub(super) fn subscribe(
    relay: &mut Relay,
    pool: &Pool,
    client: u64,
    (deliver, queue): (
        &mut Option<notify::Subscriber>,
        &mut Option<tokio::sync::mpsc::Receiver<notify::Notification>>,
    ),
) -> Vec<tokio::sync::oneshot::Receiver<()>> {
    for channel in std::mem::take(&mut relay.unlistens) {
        pool.hub().unlisten(channel, client);
    }
    let listens = std::mem::take(&mut relay.listens);
    if listens.is_empty() {
        return Vec::new();
    }
    let deliver = deliver.get_or_insert_with(|| {
        let (tx, rx) = tokio::sync::mpsc::channel(notify::CLIENT_QUEUE);
        *queue = Some(rx);
        notify::Subscriber {
            deliver: tx,
            overflow: Arc::default(),
        }
    });
    listens
        .into_iter()
        .map(|channel| pool.hub().listen(channel, client, deliver.clone()))
        .collect()
}

/// The next notification queued for the client; never, before it listens.
pub(super) async fn next_notification(
    queue: &mut Option<tokio::sync::mpsc::Receiver<notify::Notification>>,
) -> Option<notify::Notification> {
    match queue {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Fires when the client's queue overflowed; never, before it listens.
pub(super) async fn overflowed(deliver: &Option<notify::Subscriber>) {
    match deliver {
        Some(d) => d.overflow.notified().await,
        None => std::future::pending().await,
    }
}

/// Bytes of notifications written to a client and not yet sent, at most; past it the session
/// stops taking notifications from its queue.
pub(super) const NOTIFY_BUFFERED: usize = 256 * 1024;

/// How long a client's ReadyForQuery after LISTEN waits for the hub to listen too.
pub(super) const LISTEN_CONFIRM: Duration = Duration::from_secs(5);

/// Waits until the hub listens on the channels just subscribed, so that, as on PostgreSQL, a
/// NOTIFY committed after the client's LISTEN returned reaches the client.
pub(super) async fn confirm_listens(confirmations: Vec<tokio::sync::oneshot::Receiver<()>>) {
    if confirmations.is_empty() {
        return;
    }
    let all = async {
        for confirmed in confirmations {
            let _ = confirmed.await;
        }
    };
    if crate::timers::timeout(LISTEN_CONFIRM, all).await.is_err() {
        tracing::warn!("the notification hub did not confirm LISTEN in time");
    }
}
