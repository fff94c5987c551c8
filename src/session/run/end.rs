//! How a session ends: one error type for every way ([`SessionEnd`]), reported like every
//! other stage's error ([`Reportable`]: a bounded kind, and what the client hears), and one
//! place that tells the client and the log ([`finish`]).

use super::*;
use crate::error::ErrorKind;

/// How forwarding ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum SessionEnd {
    #[error(transparent)]
    Pump(PumpEnd),
    #[error("pgtenant is shutting down")]
    Shutdown,
    /// The admin console ended the tenant's sessions (`KILL`).
    #[error("ended by the admin console")]
    Killed,
    /// A reload removed the tenant from the configuration.
    #[error("the tenant was removed from the configuration")]
    Removed,
    /// The tenant's placement changed in a way the session cannot follow.
    #[error("the tenant's placement changed in a way the session cannot follow")]
    Moved,
    #[error("idle in transaction for {}", crate::config::format_duration(*.0))]
    IdleInTransaction(Duration),
    /// Transaction pooling: no server connection for the next transaction.
    #[error("no server connection: {0}")]
    Checkout(PoolError),
    /// No server connection could be reset and bound for the next transaction.
    #[error("no server connection could be reset and bound: {0}")]
    Setup(crate::pool::ServerError),
    /// More notifications waited for the client than its queue holds.
    #[error(
        "more than {} notifications waited for the client",
        notify::CLIENT_QUEUE
    )]
    NotifyOverflow,
}

impl SessionEnd {
    /// The audit log's `end` value (bounded).
    pub(super) fn label(&self) -> &'static str {
        match self {
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::Killed => "killed",
            SessionEnd::Moved => "tenant_moved",
            SessionEnd::Removed => "tenant_removed",
            SessionEnd::IdleInTransaction(_) => "idle_in_transaction_timeout",
            SessionEnd::Checkout(_) => "checkout",
            SessionEnd::Setup(_) => "setup",
            SessionEnd::NotifyOverflow => "notify_overflow",
            SessionEnd::Pump(p) => match p {
                PumpEnd::ServerGone(_) | PumpEnd::ServerProtocol(_) => "server_gone",
                PumpEnd::ClientProtocol(FrameError::TooLarge { .. }) => "message_too_large",
                PumpEnd::ClientProtocol(_) => "client_protocol",
                PumpEnd::Terminated | PumpEnd::Released | PumpEnd::Listening => "terminate",
                PumpEnd::ClientGone(_) => "client_gone",
                PumpEnd::ClientStalled(_) => "client_write_timeout",
            },
        }
    }

    /// A client that left, or ended its session itself: nothing to tell or warn about.
    fn by_the_client(&self) -> bool {
        matches!(
            self,
            SessionEnd::Pump(
                PumpEnd::Terminated
                    | PumpEnd::Released
                    | PumpEnd::Listening
                    | PumpEnd::ClientGone(_)
            )
        )
    }
}

impl Reportable for SessionEnd {
    fn kind(&self) -> ErrorKind {
        match self {
            SessionEnd::Shutdown | SessionEnd::Killed => ErrorKind::Shutdown,
            SessionEnd::Moved | SessionEnd::Removed => ErrorKind::Routing,
            SessionEnd::IdleInTransaction(_) => ErrorKind::Timeout,
            SessionEnd::Checkout(e) => e.kind(),
            SessionEnd::Setup(e) => e.kind(),
            SessionEnd::NotifyOverflow => ErrorKind::Quota,
            SessionEnd::Pump(p) => match p {
                PumpEnd::ServerGone(_) | PumpEnd::ServerProtocol(_) => ErrorKind::ServerUnavailable,
                PumpEnd::ClientProtocol(_) => ErrorKind::Protocol,
                PumpEnd::ClientStalled(_) => ErrorKind::Timeout,
                PumpEnd::Terminated
                | PumpEnd::Released
                | PumpEnd::Listening
                | PumpEnd::ClientGone(_) => ErrorKind::ClientDisconnect,
            },
        }
    }

    fn client_error(&self) -> Option<ClientError> {
        let shutdown = |message: &str| Some(ClientError::fatal(sqlstate::ADMIN_SHUTDOWN, message));
        match self {
            SessionEnd::Shutdown => {
                shutdown("terminating connection because pgtenant is shutting down")
            }
            SessionEnd::Killed => shutdown("terminating connection due to administrator command"),
            SessionEnd::Moved => shutdown(
                "terminating connection: this tenant's placement changed and this session cannot follow it; reconnect",
            ),
            SessionEnd::Removed => shutdown(
                "terminating connection: this tenant was removed from pgtenant's configuration",
            ),
            SessionEnd::IdleInTransaction(limit) => Some(ClientError::fatal(
                sqlstate::IDLE_IN_TRANSACTION_TIMEOUT,
                format!(
                    "terminating connection due to idle-in-transaction timeout (this tenant's limit is {})",
                    crate::config::format_duration(*limit)
                ),
            )),
            SessionEnd::Checkout(e) => e.client_error(),
            SessionEnd::Setup(e) => e.client_error(),
            SessionEnd::NotifyOverflow => Some(
                ClientError::fatal(
                    sqlstate::CONFIGURATION_LIMIT_EXCEEDED,
                    format!(
                        "terminating connection: more than {} notifications waited for this client",
                        notify::CLIENT_QUEUE
                    ),
                )
                .with_hint(
                    "read notifications promptly, and do not stay in one transaction while many arrive",
                ),
            ),
            SessionEnd::Pump(p) => match p {
                PumpEnd::ServerGone(_) | PumpEnd::ServerProtocol(_) => Some(ClientError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "the connection to the tenant's database was lost",
                )),
                PumpEnd::ClientProtocol(FrameError::TooLarge { tag, len, limit }) => Some(
                    ClientError::fatal(
                        sqlstate::PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "a '{tag}' message of {len} bytes exceeds the limit of {limit} bytes through pgtenant"
                        ),
                    )
                    .with_hint("send large values in smaller statements, or with COPY"),
                ),
                PumpEnd::ClientProtocol(e) => Some(ClientError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    e.to_string(),
                )),
                // It does not read: nothing more is written to it.
                PumpEnd::ClientStalled(_) => None,
                PumpEnd::Terminated
                | PumpEnd::Released
                | PumpEnd::Listening
                | PumpEnd::ClientGone(_) => None,
            },
        }
    }
}

/// Logs how the session ended and tells the client, when it is still there to hear it (after
/// the whole messages it was still owed). Returns the audit log's `end` value.
pub(super) async fn finish(
    end: SessionEnd,
    stream: &mut ClientStream,
    pump: &mut Pump,
    pooled: Option<&PooledConn>,
) -> &'static str {
    let label = end.label();
    let kind = end.kind().as_str();
    if end.by_the_client() {
        tracing::info!(end = label, "session ended");
    } else if matches!(end, SessionEnd::Setup(_)) {
        tracing::warn!(end = label, kind, error = %end, "session ended");
    } else {
        tracing::info!(end = label, kind, error = %end, "session ended");
    }
    let Some(notice) = end.client_error() else {
        return label;
    };
    let mut out = pump.take_to_client();
    // An error may only follow whole messages.
    if pooled.is_some_and(|p| !p.conn.scanner.at_boundary()) {
        out.clear();
    }
    notice.encode(&mut out);
    let _ = crate::timers::timeout(Duration::from_secs(5), async {
        let _ = stream.write_all(&out).await;
        let _ = stream.flush().await;
    })
    .await;
    label
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_end_has_one_label_kind_and_client_error() {
        let too_large = FrameError::TooLarge {
            tag: 'Q',
            len: 9,
            limit: 8,
        };
        let cases: Vec<(SessionEnd, &str, Option<&str>)> = vec![
            (SessionEnd::Shutdown, "shutdown", Some("57P01")),
            (SessionEnd::Killed, "killed", Some("57P01")),
            (SessionEnd::Moved, "tenant_moved", Some("57P01")),
            (SessionEnd::Removed, "tenant_removed", Some("57P01")),
            (
                SessionEnd::IdleInTransaction(Duration::from_secs(5)),
                "idle_in_transaction_timeout",
                Some("25P03"),
            ),
            (SessionEnd::NotifyOverflow, "notify_overflow", Some("53400")),
            (
                SessionEnd::Pump(PumpEnd::ServerGone(None)),
                "server_gone",
                Some("08006"),
            ),
            (
                SessionEnd::Pump(PumpEnd::ClientProtocol(too_large)),
                "message_too_large",
                Some("54000"),
            ),
            (SessionEnd::Pump(PumpEnd::Terminated), "terminate", None),
            (
                SessionEnd::Pump(PumpEnd::ClientGone(None)),
                "client_gone",
                None,
            ),
            (
                SessionEnd::Pump(PumpEnd::ClientStalled(Duration::from_secs(1))),
                "client_write_timeout",
                None,
            ),
        ];
        for (end, label, code) in cases {
            assert_eq!(end.label(), label, "{end}");
            let told = end.client_error();
            assert_eq!(told.as_ref().map(|e| e.sqlstate.as_ref()), code, "{end}");
            if let Some(e) = told {
                assert_eq!(e.severity, crate::error::Severity::Fatal, "{end}");
            }
            assert!(!end.to_string().is_empty());
        }
        assert_eq!(
            SessionEnd::Pump(PumpEnd::ClientGone(None)).kind(),
            ErrorKind::ClientDisconnect
        );
        assert_eq!(SessionEnd::Killed.kind(), ErrorKind::Shutdown);
    }
}
