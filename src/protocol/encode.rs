//! Encoders for the messages pgtenant writes itself.
//!
//! Towards clients (backend messages, docs 55.7) the encoding is pgwire's message types;
//! towards servers (frontend messages) it is postgres-protocol's encoders, used directly by the
//! pool. Only encoding goes through pgwire: its decoders index past the end of malformed
//! bodies, so every decoder pgtenant applies to untrusted bytes is its own (`client_msgs`,
//! `server_msgs`, `startup`).

use bytes::{BufMut, Bytes, BytesMut};
use pgwire::messages::Message;
use pgwire::messages::response::{ErrorResponse, ReadyForQuery, TransactionStatus};
use pgwire::messages::startup::{
    Authentication, BackendKeyData, NegotiateProtocolVersion, ParameterStatus, SecretKey,
};

use postgres_protocol::message::frontend;

use super::{TxStatus, tag};

/// Appends `message`; if pgwire refuses it (over its size limit) nothing is appended and the
/// refusal is logged, since a half-written message would desynchronise the client.
fn put<M: Message>(message: &M, out: &mut BytesMut) {
    let start = out.len();
    if let Err(e) = message.encode(out) {
        out.truncate(start);
        tracing::warn!(error = %e, "message not encoded");
    }
}

/// ErrorResponse with the given `(field type, value)` pairs.
pub fn error_response(fields: Vec<(u8, String)>, out: &mut BytesMut) {
    put(&ErrorResponse::new(fields), out);
}

/// AuthenticationSASL listing `mechanisms`.
pub fn auth_sasl(mechanisms: &[&str], out: &mut BytesMut) {
    let list = mechanisms.iter().map(|m| (*m).to_owned()).collect();
    put(&Authentication::SASL(list), out);
}

/// AuthenticationSASLContinue.
pub fn auth_sasl_continue(data: &[u8], out: &mut BytesMut) {
    put(
        &Authentication::SASLContinue(Bytes::copy_from_slice(data)),
        out,
    );
}

/// AuthenticationSASLFinal.
pub fn auth_sasl_final(data: &[u8], out: &mut BytesMut) {
    put(
        &Authentication::SASLFinal(Bytes::copy_from_slice(data)),
        out,
    );
}

/// AuthenticationOk.
pub fn auth_ok(out: &mut BytesMut) {
    put(&Authentication::Ok, out);
}

/// ParameterStatus.
pub fn parameter_status(name: &str, value: &str, out: &mut BytesMut) {
    put(
        &ParameterStatus::new(name.to_owned(), value.to_owned()),
        out,
    );
}

/// BackendKeyData with a protocol 3.0 (4-byte) secret.
pub fn backend_key_data(pid: i32, secret: i32, out: &mut BytesMut) {
    put(&BackendKeyData::new(pid, SecretKey::I32(secret)), out);
}

/// ReadyForQuery.
pub fn ready_for_query(status: TxStatus, out: &mut BytesMut) {
    let status = match status {
        TxStatus::Idle => TransactionStatus::Idle,
        TxStatus::InTransaction => TransactionStatus::Transaction,
        TxStatus::Failed => TransactionStatus::Error,
    };
    put(&ReadyForQuery::new(status), out);
}

/// NegotiateProtocolVersion: pgtenant speaks 3.0 and no protocol options.
pub fn negotiate_protocol_version(unsupported: Vec<String>, out: &mut BytesMut) {
    put(&NegotiateProtocolVersion::new(0, unsupported), out);
}

/// A raw message with the given tag and body (used for CopyFail/Sync towards servers and in
/// tests).
pub fn notification(pid: i32, channel: &str, payload: &str, out: &mut BytesMut) {
    let mut body = Vec::with_capacity(4 + channel.len() + payload.len() + 2);
    body.extend_from_slice(&pid.to_be_bytes());
    body.extend_from_slice(channel.as_bytes());
    body.push(0);
    body.extend_from_slice(payload.as_bytes());
    body.push(0);
    raw(tag::NOTIFICATION_RESPONSE, &body, out);
}

/// A message of type `tag` whose body `body` writes straight into `out` (its length is
/// filled in after).
pub fn message(tag: u8, out: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_u32(0);
    body(out);
    let len = u32::try_from(out.len() - at).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn raw(tag: u8, body: &[u8], out: &mut BytesMut) {
    out.put_u8(tag);
    out.put_u32((body.len() + 4) as u32);
    out.put_slice(body);
}

/// The name of the statement [`set_configs`] prepares and closes again. Client statement
/// names starting with `pgtenant_` or `pgt_` are refused, so it never meets a client's.
pub const OWN_STATEMENT: &str = "pgtenant_set";

/// pgtenant's own `SELECT set_config($1, $2, false), ...` for `pairs`, with every name and
/// value a Bind parameter (never SQL text the server lexes): Parse, Bind, Execute, Close,
/// Sync. Returns the message tags written, in order (for the connection's tracker); nothing
/// for no pairs, or when a value cannot be encoded (the caller fails closed).
pub fn set_configs(pairs: &[(&str, &str)], out: &mut BytesMut) -> &'static [u8] {
    const TAGS: &[u8] = &[tag::PARSE, tag::BIND, tag::EXECUTE, tag::CLOSE, tag::SYNC];
    if pairs.is_empty() {
        return &[];
    }
    let sql = crate::own_sql::set_configs(pairs.len());
    let mut msgs = BytesMut::new();
    let values = pairs.iter().flat_map(|(k, v)| [*k, *v]);
    let encoded = frontend::parse(OWN_STATEMENT, &sql, std::iter::empty::<u32>(), &mut msgs)
        .is_ok()
        && bind_execute(OWN_STATEMENT, values, &mut msgs)
        && frontend::close(b'S', OWN_STATEMENT, &mut msgs).is_ok();
    if !encoded {
        return &[];
    }
    frontend::sync(&mut msgs);
    out.extend_from_slice(&msgs);
    TAGS
}

/// Bind (unnamed portal, text parameters `values`) and Execute of `statement`; false when
/// they cannot be encoded (then nothing usable was written).
pub fn bind_execute<'a>(
    statement: &str,
    values: impl IntoIterator<Item = &'a str>,
    out: &mut BytesMut,
) -> bool {
    frontend::bind(
        "",
        statement,
        std::iter::empty::<i16>(),
        values,
        |v, buf| {
            buf.extend_from_slice(v.as_bytes());
            Ok(postgres_protocol::IsNull::No)
        },
        std::iter::empty::<i16>(),
        out,
    )
    .is_ok()
        && frontend::execute("", 0, out).is_ok()
}

/// A result set of text columns (the admin console's): RowDescription, a DataRow per row
/// (None: NULL) and CommandComplete with `command_tag`.
pub fn text_rows(
    columns: &[&str],
    rows: &[Vec<Option<String>>],
    command_tag: &str,
    out: &mut BytesMut,
) {
    use pgwire::messages::data::{DataRow, FieldDescription, RowDescription};
    use pgwire::messages::response::CommandComplete;
    const TEXT_OID: u32 = 25;
    let fields = columns
        .iter()
        .map(|name| FieldDescription::new((*name).to_owned(), 0, 0, TEXT_OID, -1, -1, 0))
        .collect();
    put(&RowDescription::new(fields), out);
    for row in rows {
        let mut data = BytesMut::new();
        for value in row {
            match value {
                None => data.put_i32(-1),
                Some(v) => {
                    data.put_i32(v.len() as i32);
                    data.put_slice(v.as_bytes());
                }
            }
        }
        put(&DataRow::new(data, row.len() as i16), out);
    }
    put(&CommandComplete::new(command_tag.to_owned()), out);
}

/// CommandComplete with `command_tag` (a command without rows).
pub fn command_complete(command_tag: &str, out: &mut BytesMut) {
    put(
        &pgwire::messages::response::CommandComplete::new(command_tag.to_owned()),
        out,
    );
}

/// EmptyQueryResponse (the query string held no command).
pub fn empty_query(out: &mut BytesMut) {
    put(&pgwire::messages::response::EmptyQueryResponse::new(), out);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::frame::split_whole;
    use crate::protocol::server_msgs;

    #[test]
    fn encoded_messages_decode_with_our_own_readers() {
        let mut out = BytesMut::new();
        parameter_status("TimeZone", "UTC", &mut out);
        backend_key_data(7, -3, &mut out);
        ready_for_query(TxStatus::Failed, &mut out);
        auth_sasl(&["SCRAM-SHA-256"], &mut out);
        let msgs: Vec<_> = split_whole(&out).map(|m| m.unwrap()).collect();
        assert_eq!(msgs.len(), 4);
        assert_eq!(
            server_msgs::parameter_status(msgs[0].1).unwrap(),
            ("TimeZone", "UTC")
        );
        assert_eq!(
            server_msgs::backend_key_data(msgs[1].1).unwrap(),
            (7, &(-3i32).to_be_bytes()[..])
        );
        assert_eq!(
            server_msgs::ready_for_query(msgs[2].1).unwrap(),
            TxStatus::Failed
        );
        assert_eq!(
            server_msgs::auth_request(msgs[3].1).unwrap(),
            server_msgs::AuthRequest::Sasl {
                mechanisms: vec!["SCRAM-SHA-256"]
            }
        );
    }

    #[test]
    fn oversize_messages_are_not_half_written() {
        let mut out = BytesMut::new();
        parameter_status("x", &"y".repeat(100_000), &mut out);
        assert!(out.is_empty());
    }
}
