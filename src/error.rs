//! What clients are told when something goes wrong, and how errors are labelled.
//!
//! Every stage has its own `thiserror` enum (handshake, auth, route, pool, session). Each one
//! implements [`Reportable`]: a bounded [`ErrorKind`] (safe as a metric or log label) and, when
//! the client should hear about it, a [`ClientError`] carrying the SQLSTATE and a message that
//! never names servers, shards or other tenants. SQLSTATEs follow PostgreSQL's Appendix A.

use std::borrow::Cow;

use bytes::BytesMut;

/// SQLSTATE codes pgtenant sends itself (PostgreSQL docs, Appendix A).
pub mod sqlstate {
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const UNABLE_TO_CONNECT: &str = "08001";
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INVALID_PASSWORD: &str = "28P01";
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const CONFIGURATION_LIMIT_EXCEEDED: &str = "53400";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const QUERY_CANCELED: &str = "57014";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    pub const UNDEFINED_OBJECT: &str = "42704";
    pub const LOCK_NOT_AVAILABLE: &str = "55P03";
    pub const OBJECT_IN_USE: &str = "55006";
    pub const INVALID_PARAMETER_VALUE: &str = "22023";
    pub const CONFIG_FILE_ERROR: &str = "F0000";
    pub const INTERNAL_ERROR: &str = "XX000";
    pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
}

/// A bounded classification of failures: usable as a metric label or log field.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The client broke the wire protocol.
    Protocol,
    /// Authentication failed or identity sources disagreed.
    Auth,
    /// No route for the requested database.
    Routing,
    /// Refused by tenant policy.
    Policy,
    /// A per-tenant limit was hit.
    Quota,
    /// A PostgreSQL server could not be reached or failed.
    ServerUnavailable,
    /// The client went away.
    ClientDisconnect,
    /// pgtenant is shutting down.
    Shutdown,
    /// A timeout pgtenant enforces.
    Timeout,
    /// A bug or an unexpected state.
    Internal,
}

impl ErrorKind {
    /// The label used in logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Protocol => "protocol",
            ErrorKind::Auth => "auth",
            ErrorKind::Routing => "routing",
            ErrorKind::Policy => "policy",
            ErrorKind::Quota => "quota",
            ErrorKind::ServerUnavailable => "server_unavailable",
            ErrorKind::ClientDisconnect => "client_disconnect",
            ErrorKind::Shutdown => "shutdown",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Internal => "internal",
        }
    }
}

/// Severity of an `ErrorResponse` pgtenant sends itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// The statement failed; the session goes on.
    Error,
    /// The session ends after this message.
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An `ErrorResponse` as the client will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientError {
    pub severity: Severity,
    pub sqlstate: Cow<'static, str>,
    pub message: String,
    pub hint: Option<String>,
    /// Character position (1-based) in the statement text.
    pub position: Option<usize>,
}

impl ClientError {
    /// A FATAL error: the connection closes after it.
    pub fn fatal(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Fatal,
            sqlstate: Cow::Borrowed(sqlstate),
            message: message.into(),
            hint: None,
            position: None,
        }
    }

    /// A FATAL error relaying what a server said (its code and message).
    pub fn fatal_from_server(code: &str, message: &str) -> Self {
        let valid = code.len() == 5 && code.bytes().all(|b| b.is_ascii_alphanumeric());
        ClientError {
            severity: Severity::Fatal,
            sqlstate: if valid {
                Cow::Owned(code.to_owned())
            } else {
                Cow::Borrowed(sqlstate::INTERNAL_ERROR)
            },
            message: message.to_owned(),
            hint: None,
            position: None,
        }
    }

    /// An ERROR: the statement fails, the session continues.
    pub fn error(sqlstate: &'static str, message: impl Into<String>) -> Self {
        ClientError {
            severity: Severity::Error,
            sqlstate: Cow::Borrowed(sqlstate),
            message: message.into(),
            hint: None,
            position: None,
        }
    }

    /// Points at a character of the statement (libpq shows a `LINE n:` excerpt with a caret).
    pub fn with_position(mut self, position: Option<usize>) -> Self {
        self.position = position;
        self
    }

    /// Adds a hint line (libpq prints it as `HINT:`).
    pub fn with_hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Appends the `ErrorResponse` message to `out`.
    pub fn encode(&self, out: &mut BytesMut) {
        let mut fields = vec![
            (b'S', self.severity.as_str().to_owned()),
            (b'V', self.severity.as_str().to_owned()),
            (b'C', self.sqlstate.to_string()),
            (b'M', self.message.clone()),
        ];
        if let Some(hint) = &self.hint {
            fields.push((b'H', hint.clone()));
        }
        if let Some(p) = self.position {
            fields.push((b'P', p.to_string()));
        }
        crate::protocol::encode::error_response(fields, out);
    }
}

/// Implemented by every stage error that can end or fail a client's request.
pub trait Reportable: std::error::Error {
    /// Bounded label for logs and metrics.
    fn kind(&self) -> ErrorKind;
    /// What the client is told, or `None` when it must hear nothing (it left, or it broke
    /// the protocol before a session existed).
    fn client_error(&self) -> Option<ClientError>;
}
